import json

import pytest
from click.testing import CliRunner

from dqtool.cli import main
from dqtool.data.pairs import DataConfig, available_splits, load_pairs, tokenize_pairs
from dqtool.base.errors import DQToolError

ROWS = [{"id": "a", "source": "first long text", "target": "first"},
        {"id": "b", "source": "second long text here", "target": "second"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- formats

def test_jsonl_folder_with_splits(tmp_path):
    _jsonl(tmp_path / "train.jsonl", ROWS)
    _jsonl(tmp_path / "test.jsonl", ROWS[:1])
    assert available_splits(tmp_path) == ["test", "train"]
    p = load_pairs(tmp_path, "train", DataConfig())
    assert p.sources == ["first long text", "second long text here"] and p.ids == ["a", "b"]
    assert p.path.endswith("train.jsonl") and p.skipped == 0
    assert load_pairs(tmp_path, "test", DataConfig()).targets == ["first"]


def test_folder_mixes_formats_per_split(tmp_path):
    _jsonl(tmp_path / "train.jsonl", ROWS)
    (tmp_path / "validation.csv").write_text("source,target\nv text,v\n", encoding="utf-8")
    (tmp_path / "test.tsv").write_text("source\ttarget\nt text\tt\n", encoding="utf-8")
    assert available_splits(tmp_path) == ["test", "train", "validation"]
    assert load_pairs(tmp_path, "validation", DataConfig()).targets == ["v"]
    assert load_pairs(tmp_path, "test", DataConfig()).targets == ["t"]


@pytest.mark.parametrize("suffix,delim", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_with_custom_fields(tmp_path, suffix, delim):
    f = tmp_path / f"validation{suffix}"
    # CSV: a quoted comma and a quoted newline inside one value; TSV: a bare comma.
    f.write_text('doc,summary\n"x, y",x\n"two\nlines",two\nhello world,hello\n' if delim == "," else
                 "doc\tsummary\nx, y\tx\ntwo lines\ttwo\nhello world\thello\n", encoding="utf-8")
    cfg = DataConfig(source_field="doc", target_field="summary")
    p = load_pairs(tmp_path, "validation", cfg)
    assert p.sources[0] == "x, y" and p.targets == ["x", "two", "hello"]
    assert p.sources[1] == ("two\nlines" if delim == "," else "two lines")
    # A single file is used whatever split is asked for.
    assert load_pairs(f, "anything", cfg).targets == ["x", "two", "hello"]


def test_byte_order_mark_is_ignored(tmp_path):
    # Excel and Windows editors start UTF-8 files with a BOM; it must not become part of a name.
    (tmp_path / "train.csv").write_bytes(b"\xef\xbb\xbfsource,target\nhello,h\n")
    (tmp_path / "test.jsonl").write_bytes(b'\xef\xbb\xbf{"source": "s", "target": "t"}\n')
    assert load_pairs(tmp_path, "train", DataConfig()).sources == ["hello"]
    assert load_pairs(tmp_path, "test", DataConfig()).sources == ["s"]


def test_datasets_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[1:])}).save_to_disk(tmp_path / "dd")
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "one")
    assert available_splits(tmp_path / "dd") == ["train", "test"]
    assert load_pairs(tmp_path / "dd", "test", DataConfig()).sources == ["second long text here"]
    assert load_pairs(tmp_path / "one", "train", DataConfig()).ids == ["a", "b"]
    with pytest.raises(DQToolError, match="split 'validation' not found .*train, test"):
        load_pairs(tmp_path / "dd", "validation", DataConfig())


def test_datasets_folder_bad_rows_name_split_and_row(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"document": "x", "summary": "y"}]).save_to_disk(tmp_path / "one")
    with pytest.raises(DQToolError, match=r"one \[train\], row 1: missing field 'source' "
                                          r"\(fields present: document, summary\)"):
        load_pairs(tmp_path / "one", "train", DataConfig())
    Dataset.from_list([{"source": "ok", "target": "y"}, {"source": None, "target": "y"}]).save_to_disk(tmp_path / "n")
    with pytest.raises(DQToolError, match=r"row 2: field 'source' must be text, got NoneType"):
        load_pairs(tmp_path / "n", "train", DataConfig())


def test_max_rows_and_tokenize(tmp_path):
    from transformers import DataCollatorForSeq2Seq

    from tiny import tiny_tokenizer

    _jsonl(tmp_path / "train.jsonl", ROWS)
    assert len(load_pairs(tmp_path, "train", DataConfig(max_rows=1))) == 1
    p = load_pairs(tmp_path, "train", DataConfig())
    tok = tiny_tokenizer()
    cfg = DataConfig(source_max_length=3, target_max_length=2, prefix="summarize: ")
    rows = tokenize_pairs(p, tok, cfg)
    assert rows[0]["input_ids"] == tok("summarize: first long text")["input_ids"][:3]  # prefix, then truncation
    assert rows[1]["labels"] == tok(text_target="second")["input_ids"][:2]
    batch = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)([{**rows[0], "labels": [5]}, rows[1]])
    assert batch["labels"].tolist()[0] == [5, -100]  # labels padded with -100, ignored by the loss


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case,content,expected", [
    ("missing field", '{"source": "x", "summary": "y"}\n',
     r"train.jsonl, line 1: missing field 'target' \(fields present: source, summary\); set --source-field"),
    ("empty value", '{"source": "x", "target": "ok"}\n{"source": "  ", "target": "y"}\n',
     r"train.jsonl, line 2: field 'source' is empty"),
    ("not text", '{"source": 5, "target": "y"}\n', r"line 1: field 'source' must be text, got int"),
    ("bad json", '{"source": "x", "target": "y"}\n{oops\n', r"line 2: not valid JSON"),
    ("json array", '[{"source": "x", "target": "y"},\n{"source": "x", "target": "y"}]\n',
     r"line 1: not valid JSON .*one JSON array: write one JSON object per line"),
    ("not an object", '["x", "y"]\n', r"line 1: expected a JSON object, got list"),
    ("empty file", "", r"train.jsonl is empty: add rows"),
    ("blank lines only", "\n\n", r"train.jsonl has no rows"),
])
def test_bad_jsonl(tmp_path, case, content, expected):
    (tmp_path / "train.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DQToolError, match=expected):
        load_pairs(tmp_path, "train", DataConfig())


def test_line_numbers_count_blank_lines(tmp_path):
    # The number is the line an editor shows, not the index among non-blank rows.
    (tmp_path / "train.jsonl").write_text('{"source": "a", "target": "b"}\n\n{"source": "a"}\n')
    with pytest.raises(DQToolError, match=r"line 3: missing field 'target'"):
        load_pairs(tmp_path, "train", DataConfig())


def test_non_utf8_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"source": "x", "target": "y"}\n{"source": "caf\xe9", "target": "y"}\n')
    with pytest.raises(DQToolError, match=r"train.jsonl, line 2: not valid UTF-8.*re-encode"):
        load_pairs(tmp_path, "train", DataConfig())
    (tmp_path / "test.csv").write_bytes(b"source,target\nok,ok\nbad\xff,x\n")
    with pytest.raises(DQToolError, match=r"test.csv, line 3: not valid UTF-8"):
        load_pairs(tmp_path, "test", DataConfig())


def test_csv_missing_column_lists_columns(tmp_path):
    (tmp_path / "train.csv").write_text("text,summary\na,b\n")
    with pytest.raises(DQToolError, match=r"train.csv, line 2: missing field 'source' \(fields present: text, summary\)"):
        load_pairs(tmp_path, "train", DataConfig())


@pytest.mark.parametrize("body,expected", [
    ("a,b,c\n", r"line 2: 3 columns but the header has 2; quote values holding ','"),
    ("ok,fine\nonly\n", r"line 3: 1 columns but the header has 2"),
    ("", r"train.csv has no rows \(only blank lines or a header\)"),
])
def test_csv_ragged_rows_and_header_only(tmp_path, body, expected):
    (tmp_path / "train.csv").write_text("source,target\n" + body)
    with pytest.raises(DQToolError, match=expected):
        load_pairs(tmp_path, "train", DataConfig())


def test_too_long_rows_error_or_skip(tmp_path):
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    _jsonl(tmp_path / "train.jsonl", ROWS + [{"source": "the cat " * 40, "target": "cat"}])
    with pytest.raises(DQToolError, match=r"train.jsonl, line 3: \d+ source / \d+ target tokens exceed "
                                          r"--source-max-length 20 .*--on-too-long truncate or skip"):
        load_pairs(tmp_path, "train", DataConfig(source_max_length=20, on_too_long="error"), tok)
    p = load_pairs(tmp_path, "train", DataConfig(source_max_length=20, on_too_long="skip"), tok)
    assert len(p) == 2 and p.skipped == 1 and p.ids == ["a", "b"]
    assert len(load_pairs(tmp_path, "train", DataConfig(source_max_length=20), tok)) == 3  # truncate keeps it
    with pytest.raises(DQToolError, match=r"all 3 rows are too long: raise --source-max-length"):
        load_pairs(tmp_path, "train", DataConfig(source_max_length=2, on_too_long="skip"), tok)


def test_missing_path_unknown_split_and_ambiguous_files(tmp_path):
    with pytest.raises(DQToolError, match="does not exist: pass a folder of split files"):
        load_pairs(tmp_path / "nope", "train", DataConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DQToolError, match="has no split files"):
        load_pairs(tmp_path / "empty", "train", DataConfig())
    _jsonl(tmp_path / "train.jsonl", ROWS)
    _jsonl(tmp_path / "validation.jsonl", ROWS)
    with pytest.raises(DQToolError, match="split 'test' not found .*available splits are train, validation"):
        load_pairs(tmp_path, "test", DataConfig())
    (tmp_path / "train.csv").write_text("source,target\na,b\n")
    with pytest.raises(DQToolError, match=r"several files for split 'train' \(train.jsonl, train.csv\)"):
        load_pairs(tmp_path, "train", DataConfig())
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DQToolError, match=r"unsupported file type '.txt': use .jsonl, .csv or .tsv"):
        load_pairs(tmp_path / "data.txt", "train", DataConfig())


@pytest.mark.parametrize("kw,expected", [
    (dict(on_too_long="drop"), "--on-too-long 'drop' is not supported"),
    (dict(source_max_length=0), "--source-max-length must be at least 1"),
    (dict(max_rows=0), "--max-rows must be at least 1"),
    (dict(target_field=""), "--source-field and --target-field must not be empty"),
])
def test_data_config_validation(kw, expected):
    with pytest.raises(DQToolError, match=expected):
        DataConfig(**kw)


@pytest.mark.parametrize("content,expected", [
    ('{"text": "x", "target": "y"}\n', "test.jsonl, line 1: missing field 'source' (fields present: text, target)"),
    (b'{"source": "\xff", "target": "y"}\n', "test.jsonl, line 1: not valid UTF-8"),
    ("", "test.jsonl is empty"),
])
def test_cli_eval_bad_data_is_one_line_exit_2(tmp_path, tiny_dir, content, expected):
    f = tmp_path / "test.jsonl"
    f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    r = CliRunner().invoke(main, ["eval", str(tiny_dir("bart")), "--data", str(tmp_path)])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: ") and expected in r.output


def test_cli_eval_unknown_split_lists_splits(tmp_path, tiny_dir):
    _jsonl(tmp_path / "train.jsonl", ROWS)
    r = CliRunner().invoke(main, ["eval", str(tiny_dir("bart")), "--data", str(tmp_path), "--split", "dev"])
    assert r.exit_code == 2 and "split 'dev' not found" in r.output and "available splits are train" in r.output
