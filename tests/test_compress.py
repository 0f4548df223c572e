"""dqtool compress / bench: recipe validation, the whole pipeline on a tiny teacher, resume
after an interruption, the report's schema, and each gate's exit code."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from dqtool.stages.bench.stage import SCHEMA_VERSION
from dqtool.cli import main
from dqtool.compress import load_recipe, plan
from tiny import write_pairs

@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("compress")
    data = write_pairs(root / "data", (("train", 48), ("validation", 8), ("test", 6)))
    return root, data, tiny_dir("bart")


def _recipe(root: Path, data: Path, teacher: Path, name="recipe.yaml", **over) -> Path:
    r = {"teacher": str(teacher), "data": str(data), "work": str(root / "work"), "schemes": ["2-2-8"],
         "distill": {"encoder_layers": 2, "decoder_layers": 1},
         "qat": {"max_steps": 4, "save_steps": 2, "batch_size": 8, "source_max_length": 32, "target_max_length": 16,
                 "logits_loss": "kl", "temperature": 2.0},
         "convert": {"float_dtype": "float32", "check_samples": 1},
         "bench": {"max_samples": 4, "max_length": 6, "source_tokens": 8, "new_tokens": 4, "runs": 2, "warmup": 0,
                   "threads": 1, "plots": True},
         "gates": {}}
    for k, v in over.items():
        r[k] = v if not isinstance(v, dict) else {**r.get(k, {}), **v}
    p = root / name
    import yaml

    p.write_text(yaml.safe_dump(r))
    return p


@pytest.mark.parametrize("over,message", [
    ({"tacher": "x"}, "recipe key 'recipe.tacher' is unknown: allowed keys in 'recipe' are teacher"),
    ({"qat": {"max_step": 3}}, "recipe key 'qat.max_step' is unknown"),
    ({"schemes": ["5-2-8"]}, "schemes '5-2-8': weight bits '5' is not supported"),
    ({"bench": {"runs": 0}}, "error: bench.runs must be at least 1"),
    ({"qat": {"learning_rate": 0}}, "error: qat.learning_rate must be > 0"),
    ({"qat": {"loss_task": -1}}, "error: qat.loss_task must be a number >= 0"),
    ({"qat": {"logits_loss": "l1"}}, "error: qat.logits_loss 'l1' is not supported"),
    ({"distill": {"layer_map": "odd"}}, "error: distill.layer_map 'odd' is unknown"),
    ({"convert": {"tolerance": 0}}, "error: convert.tolerance must be > 0"),
    ({"bench": {"peers": ["onnx-magic"]}}, "peer 'onnx-magic' is unknown"),
    ({"export": {"matmul": "fast"}}, "error: export.matmul 'fast' is not supported"),
    # Types, paths and data splits are checked up front too, naming the recipe key (issue 14, defect 12).
    ({"gates": {"min_ratio": "x"}}, "recipe key 'gates.min_ratio' must be a number or null, got 'x'"),
    ({"distill": {"encoder_layers": 1.5}}, "recipe key 'distill.encoder_layers' must be an integer or null"),
    ({"qat": {"max_steps": True}}, "recipe key 'qat.max_steps' must be an integer, got True"),
    ({"bench": {"runs": "3"}}, "recipe key 'bench.runs' must be an integer, got '3'"),
    ({"distill": {"encoder_map": [0, "a"]}}, "recipe key 'distill.encoder_map' must be a list of integers"),
    ({"data": "/no/such/data"}, "recipe key 'data': /no/such/data not found"),
    ({"bench": {"split": "dev"}}, "recipe key 'bench.split': split 'dev' is not in"),
    ({"qat": {"train_split": "training"}}, "recipe key 'qat.train_split': split 'training' is not in"),
    ({"gates": {"min_ratios": 3}}, "recipe key 'gates.min_ratios' is unknown: allowed keys in 'gates' are min_ratio"),
])
def test_bad_recipe_is_one_line_error_before_anything_runs(setup, tmp_path, over, message):
    root, data, teacher = setup
    over = dict(over)
    rec = _recipe(tmp_path, over.pop("data", data), teacher, **over)
    r = CliRunner().invoke(main, ["compress", str(rec), "--dry-run"])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()


def test_dry_run_prints_the_plan(setup, tmp_path):
    root, data, teacher = setup
    r = CliRunner().invoke(main, ["compress", str(_recipe(tmp_path, data, teacher, schemes=["2-2-8", "8-8-8"])),
                                  "--dry-run"])
    assert r.exit_code == 0, r.output
    for stage in ("distill", "qat", "convert", "export", "bench"):
        assert stage in r.output
    assert r.output.count(" run ") == 1 + 3 * 2 + 1 and "qat-8-8-8" in r.output
    assert not (tmp_path / "work").exists()


@pytest.fixture(scope="module")
def done(setup):
    """The whole pipeline once, on the tiny teacher."""
    root, data, teacher = setup
    rec = _recipe(root, data, teacher)
    r = CliRunner().invoke(main, ["compress", str(rec)])
    assert r.exit_code == 0, r.output
    return root, rec, r.output


def test_compress_runs_every_stage_and_writes_the_report(done):
    root, rec, output = done
    work = root / "work"
    for folder, stage in (("student", "distill"), ("qat-2-2-8", "qat"), ("packed-2-2-8", "convert"),
                          ("onnx-2-2-8", "export"), ("bench", "bench")):
        m = json.loads((work / folder / "dqtool-manifest.json").read_text())
        assert m["stage"] == stage
    rep = json.loads((work / "bench" / "bench.json").read_text())
    assert rep["schema_version"] == SCHEMA_VERSION and rep["teacher_fp32_bytes"] > 0
    roles = {r["name"]: r["role"] for r in rep["rows"]}
    assert roles["onnx-2-2-8"] == "dqtool" and "teacher" in roles.values() and "student" in roles.values()
    d = next(r for r in rep["rows"] if r["role"] == "dqtool")
    # (On a d=16 model the graph structure outweighs the weights: only the arithmetic is checked.)
    assert d["kind"] == "onnx" and d["ratio_to_teacher_fp32"] == round(rep["teacher_fp32_bytes"] / d["bytes"]["total"], 2)
    assert set(d["bytes"]["files"]) == {"encoder_model.onnx", "decoder_model_merged.onnx", "weights.onnx_data"}
    assert set(d["latency"]["1"]) >= {"encoder", "generate", "decode_per_token"}
    assert d["latency"]["1"]["new_tokens"] == 4 and d["latency"]["1"]["generate"]["n"] == 2
    assert set(d["quality"]) >= {"rouge1", "rouge2", "rougeL"} and d["quality"]["rows"] == 4
    assert set(d["vs"]) == {r["name"] for r in rep["rows"] if r["role"] != "dqtool"}
    assert (work / "bench" / "size_quality.png").stat().st_size > 1000
    assert (work / "bench" / "latency.png").stat().st_size > 1000
    assert "| onnx-2-2-8 | dqtool |" in output


def test_rerun_skips_done_stages_and_gates_set_the_exit_code(done):
    root, rec, _ = done
    r = CliRunner().invoke(main, ["compress", str(rec), "--dry-run"])
    assert r.exit_code == 0 and r.output.count(" done ") == 5 and " run " not in r.output
    r = CliRunner().invoke(main, ["compress", str(rec), "--min-ratio", "0.1", "--max-latency", "100000"])
    assert r.exit_code == 0, r.output
    assert "min-ratio" in r.output and "max-latency" in r.output and "FAIL" not in r.output
    r = CliRunner().invoke(main, ["compress", str(rec), "--min-ratio", "100000"])
    assert r.exit_code == 1 and "FAIL" in r.output and "a gate failed" in r.output
    r = CliRunner().invoke(main, ["compress", str(rec), "--max-latency", "0.000001"])
    assert r.exit_code == 1 and "max-latency" in r.output
    # A random tiny teacher scores ROUGE-L 0, so the relative drop is undefined: a gate on a
    # missing value fails (never passes silently).
    r = CliRunner().invoke(main, ["compress", str(rec), "--max-quality-drop", "0.5"])
    assert r.exit_code == 1 and "max-quality-drop" in r.output and "missing" in r.output


def test_resume_after_interruption_reruns_only_what_is_missing(done, tmp_path):
    root, rec, _ = done
    work = root / "work"
    # An interrupted export leaves only a temp folder (atomic output): the export folder is missing.
    shutil.rmtree(work / "onnx-2-2-8")
    steps = {s.out.name: s.status for s in plan(load_recipe(rec))}
    assert steps == {"student": "done", "qat-2-2-8": "done", "packed-2-2-8": "done", "onnx-2-2-8": "run",
                     "bench": "run"}
    # A truncated packed file fails its hash: convert and everything after it run again.
    f = work / "packed-2-2-8" / "packed.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    steps = {s.out.name: s.status for s in plan(load_recipe(rec))}
    assert steps["packed-2-2-8"] == "run" and steps["qat-2-2-8"] == "done"
    r = CliRunner().invoke(main, ["compress", str(rec)])
    assert r.exit_code == 0, r.output
    assert all(s.status == "done" for s in plan(load_recipe(rec)))


def test_changed_config_reruns_that_stage_and_after(done):
    root, rec, _ = done
    import yaml

    r = yaml.safe_load(rec.read_text())
    r["export"] = {"matmul": "nbits"}
    changed = rec.with_name("changed.yaml")
    changed.write_text(yaml.safe_dump(r))
    steps = {s.out.name: s.status for s in plan(load_recipe(changed))}
    assert steps == {"student": "done", "qat-2-2-8": "done", "packed-2-2-8": "done", "onnx-2-2-8": "run",
                     "bench": "run"}


def test_bench_cli_on_folders(done, tmp_path):
    root, rec, _ = done
    work = root / "work"
    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["bench", str(work / "onnx-2-2-8"), str(work / "packed-2-2-8"), "--out", str(out),
                                  "--runs", "1", "--warmup", "0", "--source-tokens", "8", "--new-tokens", "3",
                                  "--threads", "1", "--no-plots", "--batch-sizes", "1,2"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "bench.json").read_text())
    assert [row["kind"] for row in rep["rows"]] == ["onnx", "packed"]
    assert set(rep["rows"][0]["latency"]) == {"1", "2"} and rep["rows"][0]["quality"] is None
    # The report states the kernels each ONNX graph runs, the CPU features and tokens/s per batch.
    kern = rep["rows"][0]["kernels"]
    assert kern["lut_gemm"] is False and sum(kern["decoder_model_merged.onnx"]["ops"].values()) > 0
    assert "kernels" not in rep["rows"][1]                                  # packed: no ONNX graph
    assert isinstance(rep["machine"]["cpu_features"], list)
    assert all(rep["rows"][0]["latency"][b]["tokens_per_s"] > 0 for b in ("1", "2"))
    md = (out / "bench.md").read_text()
    assert "CPU features" in md and "batch 2 end to end" in md and "ONNX Runtime kernels" in md
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "nope"), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "not found" in r.output


def test_bench_leaves_the_thread_count_as_it_was(done, tmp_path):
    import torch

    from dqtool.stages.bench.stage import BenchConfig, bench

    root, rec, _ = done
    before = torch.get_num_threads()
    bench([str(root / "work" / "packed-2-2-8")], tmp_path / "b",
          BenchConfig(runs=1, warmup=0, source_tokens=4, new_tokens=2, threads=before + 1, plots=False), log=lambda m: None)
    assert torch.get_num_threads() == before


def test_bench_cuda_without_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the error path cannot be reached")
    r = CliRunner().invoke(main, ["bench", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert r.exit_code == 2 and "no CUDA GPU" in r.output


def test_shipped_recipes_validate():
    """The recipes in recipes/ load: the demo trains on the teacher's outputs with MatMulNBits-block
    activations; the paper recipes keep DQ-BART's per-batch (per-tensor) ranges."""
    from dqtool.compress import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    demo = load_recipe(root / "demo.yaml")
    assert {c.targets for c in demo.qats.values()} == {"teacher"}
    assert {c.scheme.act_granularity for c in demo.qats.values()} == {"block"}   # issue 16: one MatMulNBits per Linear
    # ... per token, one Linear: the encoder's many rows on MatMulInteger (issue 16)
    assert {c.scheme.encoder_act_granularity for c in demo.qats.values()} == {"token"}
    assert all(c.scheme.act_symmetric for c in demo.qats.values())
    # issue 15: the 2-bit student's weights are a learned ternary (lsq), 8-bit ones min-max
    assert {w: c.scheme.weight_spec().method for w, c in demo.qats.items()} == {"2-2-8": "lsq", "8-8-8": "minmax"}
    for p in sorted((root / "paper-demo").glob("*.yaml")):   # the paper's table on the demo teacher
        r = load_recipe(p, check_paths=False)
        assert r.qats["2-2-8"].scheme.weight_spec().method == "lsq" and r.qats["2-2-8"].learning_rate == 2e-3, p
    papers = sorted((root / "paper").glob("*.yaml"))
    assert len(papers) == 3
    for p in papers:
        r = load_recipe(p, check_paths=False)  # their data (data/xsum, ...) is the user's to fetch
        assert {c.scheme.act_granularity for c in r.qats.values()} == {"tensor"}, p
