import json

import pytest
from click.testing import CliRunner

from dqtool.cli import main
from dqtool.errors import DQToolError
from dqtool.evaluate import EvalConfig, evaluate_model

ROWS = [{"source": f"the cat sat on the mat {i}", "target": "the cat"} for i in range(5)]


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
    assert res["samples"] == 5 and len(res["predictions"]) == 5
    assert res["model_kind"] == "hf" and res["config"]["max_length"] == 8
    assert "rougeL" in r.output


def test_batching_keeps_row_order(tiny_dir, data):
    one = evaluate_model(tiny_dir("t5"), None, EvalConfig(data=str(data), max_length=6, batch_size=1))
    many = evaluate_model(tiny_dir("t5"), None, EvalConfig(data=str(data), max_length=6, batch_size=4))
    assert one.predictions == many.predictions


def test_presets_match_the_papers():
    x = EvalConfig.preset("xsum", data="d")
    c = EvalConfig.preset("cnndm", data="d")
    assert (x.num_beams, x.max_length, x.min_length, x.length_penalty) == (6, 62, 11, 1.0)
    assert (c.num_beams, c.max_length, c.min_length, c.length_penalty) == (4, 142, 56, 2.0)
    with pytest.raises(DQToolError, match="--preset 'big' is unknown"):
        EvalConfig.preset("big", data="d")


def test_not_a_model_folder(tmp_path, data):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "empty"), "--data", str(data)])
    assert r.exit_code == 2 and "is not a model folder" in r.output
