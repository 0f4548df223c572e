import json

import pytest
from click.testing import CliRunner

from dqtool.cli import main
from dqtool.data import DataConfig, available_splits, load_pairs, tokenize_pairs
from dqtool.errors import DQToolError

ROWS = [{"id": "a", "source": "first long text", "target": "first"},
        {"id": "b", "source": "second long text here", "target": "second"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_folder_with_splits(tmp_path):
    _jsonl(tmp_path / "train.jsonl", ROWS)
    _jsonl(tmp_path / "test.jsonl", ROWS[:1])
    assert available_splits(tmp_path) == ["test", "train"]
    p = load_pairs(tmp_path, "train", DataConfig())
    assert p.sources == ["first long text", "second long text here"] and p.ids == ["a", "b"]
    assert load_pairs(tmp_path, "test", DataConfig()).targets == ["first"]


@pytest.mark.parametrize("suffix,delim", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_with_custom_fields(tmp_path, suffix, delim):
    f = tmp_path / f"validation{suffix}"
    f.write_text(f"doc{delim}summary\n\"x, y\"{delim}x\nhello world{delim}hello\n" if delim == "," else
                 f"doc{delim}summary\nx, y{delim}x\nhello world{delim}hello\n", encoding="utf-8")
    p = load_pairs(tmp_path, "validation", DataConfig(source_field="doc", target_field="summary"))
    assert p.sources == ["x, y", "hello world"] and p.targets == ["x", "hello"]
    assert load_pairs(f, "anything", DataConfig(source_field="doc", target_field="summary")).targets == ["x", "hello"]


def test_datasets_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[1:])}).save_to_disk(tmp_path / "dd")
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "one")
    assert load_pairs(tmp_path / "dd", "test", DataConfig()).sources == ["second long text here"]
    assert len(load_pairs(tmp_path / "one", "train", DataConfig())) == 2
    with pytest.raises(DQToolError, match="split 'validation' not found .*train, test"):
        load_pairs(tmp_path / "dd", "validation", DataConfig())


def test_max_rows_and_tokenize(tmp_path):
    from tiny import tiny_tokenizer

    _jsonl(tmp_path / "train.jsonl", ROWS)
    p = load_pairs(tmp_path, "train", DataConfig(max_rows=1))
    assert len(p) == 1
    tok = tiny_tokenizer()
    rows = tokenize_pairs(p, tok, DataConfig(source_max_length=3, prefix="summarize: "))
    assert rows[0]["input_ids"] == tok("summarize: first long text")["input_ids"][:3]  # prefix, then truncation
    assert rows[0]["labels"] == tok(text_target="first")["input_ids"]


@pytest.mark.parametrize("case,content,expected", [
    ("missing field", '{"source": "x", "summary": "y"}\n', r"train.jsonl, row 1: missing field 'target' \(fields present: source, summary\)"),
    ("empty value", '{"source": "x", "target": "ok"}\n{"source": "  ", "target": "y"}\n', r"row 2: field 'source' is empty"),
    ("not text", '{"source": 5, "target": "y"}\n', r"row 1: field 'source' must be text"),
    ("bad json", '{"source": "x", "target": "y"}\n{oops\n', r"line 2: not valid JSON"),
    ("empty file", "", r"train.jsonl is empty"),
])
def test_bad_jsonl(tmp_path, case, content, expected):
    (tmp_path / "train.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DQToolError, match=expected):
        load_pairs(tmp_path, "train", DataConfig())


def test_non_utf8_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"source": "x", "target": "y"}\n{"source": "caf\xe9", "target": "y"}\n')
    with pytest.raises(DQToolError, match=r"train.jsonl, line 2: not valid UTF-8"):
        load_pairs(tmp_path, "train", DataConfig())
    (tmp_path / "test.csv").write_bytes(b"source,target\nok,ok\nbad\xff,x\n")
    with pytest.raises(DQToolError, match=r"test.csv, line 3: not valid UTF-8"):
        load_pairs(tmp_path, "test", DataConfig())


def test_csv_missing_column_lists_columns(tmp_path):
    (tmp_path / "train.csv").write_text("text,summary\na,b\n")
    with pytest.raises(DQToolError, match=r"missing field 'source' \(fields present: text, summary\)"):
        load_pairs(tmp_path, "train", DataConfig())


def test_too_long_rows_error_or_skip(tmp_path):
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    _jsonl(tmp_path / "train.jsonl", ROWS + [{"source": "the cat " * 40, "target": "cat"}])
    with pytest.raises(DQToolError, match=r"train.jsonl, row 3: \d+ source / \d+ target tokens exceed"):
        load_pairs(tmp_path, "train", DataConfig(source_max_length=20, on_too_long="error"), tok)
    p = load_pairs(tmp_path, "train", DataConfig(source_max_length=20, on_too_long="skip"), tok)
    assert len(p) == 2 and p.skipped == 1
    assert len(load_pairs(tmp_path, "train", DataConfig(source_max_length=20), tok)) == 3  # truncate keeps it


def test_missing_path_and_unknown_split(tmp_path):
    with pytest.raises(DQToolError, match="does not exist"):
        load_pairs(tmp_path / "nope", "train", DataConfig())
    _jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DQToolError, match="split 'test' not found .*available splits are train"):
        load_pairs(tmp_path, "test", DataConfig())


def test_cli_eval_bad_data_is_one_line_exit_2(tmp_path, tiny_dir):
    (tmp_path / "test.jsonl").write_text('{"text": "x", "target": "y"}\n')
    r = CliRunner().invoke(main, ["eval", str(tiny_dir("bart")), "--data", str(tmp_path)])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "test.jsonl, row 1: missing field 'source'" in r.output
