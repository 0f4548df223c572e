import json
import types

import pytest
import torch
from click.testing import CliRunner

from dqtool import __version__
from dqtool.cli import main
from dqtool.base.errors import DQToolError
from dqtool import formats
from dqtool.formats import detect as model_kind
from dqtool.runtimes.load import LOADERS
from dqtool.stages.evaluate import EvalConfig, evaluate_model

# Different lengths, so sorting by length reorders them and the test can see order restored.
ROWS = [{"id": f"r{i}", "source": "the cat sat on the mat " * (1 + i % 3) + str(i), "target": "the cat"}
        for i in range(5)]


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return d


def test_cli_eval_writes_json(tiny_dir, data, tmp_path):
    out = tmp_path / "res" / "eval.json"
    r = CliRunner().invoke(main, ["eval", str(tiny_dir("bart")), "--data", str(data), "--metrics", "rouge,bleu",
                                  "--max-length", "8", "--batch-size", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert set(res["metrics"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf"}
    assert res["samples"] == 5 and len(res["predictions"]) == 5 and res["ids"] == [r["id"] for r in ROWS]
    assert res["model_kind"] == "hf" and res["config"]["max_length"] == 8 and res["config"]["batch_size"] == 2
    assert res["config"]["num_beams"] == 1 and res["config"]["metrics"] == ["rouge", "bleu"]
    assert res["dqtool_version"] == __version__ and res["seconds"] >= 0
    assert res["model"]["kind"] == "folder" and "model.safetensors" in res["model"]["weights_sha256"]
    assert res["data"]["split"] == "test" and res["data"]["file"].endswith("test.jsonl")
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temp file left behind
    assert "rougeL" in r.output and "bleu" in r.output and "5 rows" in r.output


def test_cli_preset_and_overrides_reach_the_config(tiny_dir, data, tmp_path):
    out = tmp_path / "e.json"
    r = CliRunner().invoke(main, ["eval", str(tiny_dir("bart")), "--data", str(data), "--preset", "xsum",
                                  "--max-length", "20", "--min-length", "3", "--num-beams", "2",
                                  "--no-repeat-ngram-size", "2", "--max-samples", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    c = json.loads(out.read_text())["config"]
    assert (c["num_beams"], c["max_length"], c["min_length"], c["length_penalty"], c["no_repeat_ngram_size"]) == \
        (2, 20, 3, 1.0, 2)
    assert json.loads(out.read_text())["samples"] == 2


def test_batching_keeps_row_order(tiny_dir, data):
    one = evaluate_model(tiny_dir("t5"), None, EvalConfig(data=str(data), max_length=6, batch_size=1))
    many = evaluate_model(tiny_dir("t5"), None, EvalConfig(data=str(data), max_length=6, batch_size=4))
    assert len(one.predictions) == 5 and one.predictions == many.predictions
    assert one.ids == ["r0", "r1", "r2", "r3", "r4"] and one.references == ["the cat"] * 5


def test_predictions_match_unbatched_generate(tiny_dir, data):
    # The batched, length-sorted path gives each row what generating it alone gives.
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = tiny_dir("bart")
    res = evaluate_model(folder, None, EvalConfig(data=data, max_length=7, batch_size=3))
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    for row, pred in zip(ROWS, res.predictions):
        ids = model.generate(**tok(row["source"], return_tensors="pt"), max_length=7, num_beams=1, do_sample=False)
        assert pred == tok.decode(ids[0], skip_special_tokens=True).strip()


def test_presets_match_the_papers():
    x = EvalConfig.preset("xsum", data="d")
    c = EvalConfig.preset("cnndm", data="d")
    assert (x.num_beams, x.max_length, x.min_length, x.length_penalty, x.no_repeat_ngram_size) == (6, 62, 11, 1.0, 3)
    assert (c.num_beams, c.max_length, c.min_length, c.length_penalty, c.no_repeat_ngram_size) == (4, 142, 56, 2.0, 3)
    assert EvalConfig.preset("greedy", data="d").num_beams == 1
    assert c.generate_kwargs()["early_stopping"] is True
    with pytest.raises(DQToolError, match="--preset 'big' is unknown: choose greedy, xsum, cnndm"):
        EvalConfig.preset("big", data="d")


@pytest.mark.parametrize("kw,expected", [
    (dict(min_length=9, max_length=8), "--min-length must be between 0 and --max-length 8"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
    (dict(no_repeat_ngram_size=-1), "--no-repeat-ngram-size must be 0"),
    (dict(metrics=()), "--metrics is empty"),
    (dict(metrics=("rouge", "meteor")), "--metrics 'meteor' is not supported"),
    (dict(max_samples=0), "--max-samples must be at least 1"),
    (dict(device="gpu0"), "--device 'gpu0' is not a torch device"),
    (dict(length_penalty=float("nan")), "--length-penalty must be a finite number"),
])
def test_eval_config_validation(kw, expected):
    with pytest.raises(DQToolError, match=expected):
        EvalConfig(data="d", **kw)


def test_position_limit_caps_sources_and_rejects_long_generation(tiny_dir, tmp_path):
    # The tiny BART has 64 positions: a 300-token source is cut to 64 instead of an
    # IndexError deep in torch; generating more than 64 tokens is a clear error.
    d = tmp_path / "long"
    d.mkdir()
    (d / "test.jsonl").write_text(json.dumps({"source": "the cat sat " * 100, "target": "cat"}) + "\n")
    res = evaluate_model(tiny_dir("bart"), None, EvalConfig(data=d, max_length=5))
    assert res.source_max_length == 64 and len(res.predictions) == 1
    r = CliRunner().invoke(main, ["eval", str(tiny_dir("bart")), "--data", str(d), "--preset", "cnndm"])
    assert r.exit_code == 2 and "--max-length 142 is more than the 64 positions" in r.output
    assert "pass --max-length 64 or less" in r.output


def test_not_a_model_folder(tmp_path, data):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "empty"), "--data", str(data)])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "is not a model folder: pass a 'dqtool export'" in r.output and "'dqtool convert' output" in r.output
    assert "'dqtool qat' output" in r.output and "Hugging Face model folder" in r.output


def test_missing_model_and_out_is_a_folder(tmp_path, data, tiny_dir):
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "nope"), "--data", str(data)])
    assert r.exit_code == 2 and "not found" in r.output
    (tmp_path / "outdir").mkdir()
    r = CliRunner().invoke(main, ["eval", str(tiny_dir("bart")), "--data", str(data), "--out", str(tmp_path / "outdir")])
    assert r.exit_code == 2 and "is a directory" in r.output  # click's own check
    with pytest.raises(DQToolError, match=r"--out .*outdir is a folder: pass a file path such as"):
        evaluate_model(tiny_dir("bart"), tmp_path / "outdir", EvalConfig(data=data))


def test_model_without_tokenizer(tmp_path, data):
    from tiny import tiny_model

    tiny_model("bart").save_pretrained(tmp_path / "weights_only")
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "weights_only"), "--data", str(data)])
    assert r.exit_code == 2 and "has no tokenizer files" in r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error(tiny_dir, data):
    r = CliRunner().invoke(main, ["eval", str(tiny_dir("bart")), "--data", str(data), "--device", "cuda"])
    assert r.exit_code == 2 and "no CUDA GPU is visible here: pass --device cpu" in r.output


def test_model_kinds_are_detected_most_specific_first(tmp_path, tiny_dir, data, monkeypatch):
    hf = tiny_dir("bart")
    assert model_kind(hf) == "hf" and model_kind("some/hub-id") == "hf"
    qat_like = tmp_path / "qat_like"
    qat_like.mkdir()
    (qat_like / "config.json").write_text("{}")
    (qat_like / "quantization.json").write_text("{}")
    assert model_kind(qat_like) == "qat"
    # A later stage plugs in a folder kind by adding an entry; eval then uses its loader.
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    calls = []

    def load(src):
        calls.append(src)
        return AutoModelForSeq2SeqLM.from_pretrained(hf), AutoTokenizer.from_pretrained(hf)

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "marker.txt").write_text("x")
    odd_kind = types.SimpleNamespace(NAME="odd", ACCEPTS="an odd folder", detect=lambda p: (p / "marker.txt").is_file(),
                                     verify=lambda p: None)
    monkeypatch.setattr(formats, "KINDS", (odd_kind, *formats.KINDS))
    monkeypatch.setitem(LOADERS, "odd", lambda src, threads: load(src))
    res = evaluate_model(odd, None, EvalConfig(data=data, max_length=4))
    assert res.model_kind == "odd" and calls == [str(odd)] and len(res.predictions) == 5


def test_eval_matmul_integer_on_a_packed_folder(tmp_path, data, tiny_dir):
    # --matmul integer: the packed folder's Linears in integers; greedy predictions equal the
    # float runtime's on the tiny model; any other kind of folder is a one-line error.
    from test_weight_cache import _packed

    folder = _packed(tmp_path, "bart", "2-2-8")
    outs = {}
    for mm in ("float", "integer"):
        out = tmp_path / f"{mm}.json"
        r = CliRunner().invoke(main, ["eval", str(folder), "--data", str(data), "--max-length", "8",
                                      "--matmul", mm, "--out", str(out)])
        assert r.exit_code == 0, r.output
        outs[mm] = json.loads(out.read_text())
    assert outs["integer"]["config"]["matmul"] == "integer" and outs["integer"]["model_kind"] == "packed"
    assert outs["integer"]["predictions"] == outs["float"]["predictions"]
    r = CliRunner().invoke(main, ["eval", str(tiny_dir("bart")), "--data", str(data), "--matmul", "integer"])
    assert r.exit_code != 0 and "--matmul integer computes from packed integers" in r.output
    with pytest.raises(DQToolError, match="matmul"):
        EvalConfig(data="d", matmul="int4")
