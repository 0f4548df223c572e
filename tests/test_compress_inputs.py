"""dqtool compress re-runs a stage when any of its inputs changed, not only its config:
a retrained teacher at the same path, an edited data row, a changed tokenizer file and a
re-made upstream folder each re-run exactly the stages that read them, the plan says why,
and after the run every manifest chains to the new inputs.

Each change is made as a real retrain or edit would make it: new bytes *and* a new
mtime (the stat-keyed hash cache's own same-mtime case is in test_hashcache.py)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from dqtool.cli import main
from dqtool.compress import load_recipe, plan
from dqtool.formats.hashcache import digest
from dqtool.formats.inputs import is_tokenizer_file
from tiny import save_tiny, write_pairs

STAGES = ("student", "qat-2-2-8", "packed-2-2-8", "onnx-2-2-8", "bench")
MANIFEST = "dqtool-manifest.json"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()  # independent of dqtool's cache


def _top_files(folder: Path) -> dict:
    return {f.name: _sha(f) for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
            and f.suffix != ".md" and f.name != MANIFEST}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _recipe(root: Path, teacher: Path, data: Path) -> Path:
    import yaml

    r = {"teacher": str(teacher), "data": str(data), "work": str(root / "work"), "schemes": ["2-2-8"],
         "distill": {"encoder_layers": 2, "decoder_layers": 1},
         "qat": {"max_steps": 2, "save_steps": 2, "batch_size": 8, "source_max_length": 32,
                 "target_max_length": 16, "logits_loss": "kl", "temperature": 2.0},
         "convert": {"float_dtype": "float32", "check_samples": 1},
         "bench": {"max_samples": 2, "max_length": 4, "source_tokens": 8, "new_tokens": 2, "runs": 1, "warmup": 0,
                   "threads": 1, "plots": False}}
    p = root / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_dir):
    """A compress run on its own copies of the teacher and data, which the tests then change."""
    root = tmp_path_factory.mktemp("inputs")
    teacher = root / "teacher"
    shutil.copytree(tiny_dir("bart"), teacher)
    data = write_pairs(root / "data", (("train", 24), ("validation", 4), ("test", 4)))
    rec = _recipe(root, teacher, data)
    r = CliRunner().invoke(main, ["compress", str(rec)])
    assert r.exit_code == 0, r.output
    return root, rec, teacher, data


def _statuses(rec: Path) -> dict:
    return {s.out.name: s.status for s in plan(load_recipe(rec))}


def _dry_run(rec: Path) -> str:
    r = CliRunner().invoke(main, ["compress", str(rec), "--dry-run"])
    assert r.exit_code == 0, r.output
    return r.output


def _rerun_and_check_chain(root: Path, rec: Path, teacher: Path, data: Path, expect_run: set) -> None:
    """Run the recipe: exactly ``expect_run`` stages are made again, then nothing is left to
    run and every manifest records the inputs that are there now."""
    work = root / "work"
    before = {n: _sha(work / n / MANIFEST) for n in STAGES}
    r = CliRunner().invoke(main, ["compress", str(rec)])
    assert r.exit_code == 0, r.output
    remade = {n for n in STAGES if _sha(work / n / MANIFEST) != before[n]}
    assert remade == expect_run
    assert set(_statuses(rec).values()) == {"done"}

    teacher_now = _top_files(teacher)
    train_now, test_now = {"train.jsonl": _sha(data / "train.jsonl")}, {"test.jsonl": _sha(data / "test.jsonl")}
    d, q, c, e, b = (_manifest(work / n) for n in STAGES)
    assert d["inputs"]["teacher"]["files_sha256"] == teacher_now
    assert q["inputs"]["teacher"]["files_sha256"] == teacher_now
    assert q["inputs"]["student"]["manifest_sha256"] == _sha(work / "student" / MANIFEST)
    assert q["inputs"]["data"]["sha256"] == train_now  # the split qat reads (no eval_steps: no validation)
    assert c["inputs"]["qat"]["manifest_sha256"] == _sha(work / "qat-2-2-8" / MANIFEST)
    assert e["inputs"]["packed"]["manifest_sha256"] == _sha(work / "packed-2-2-8" / MANIFEST)
    src = b["inputs"]["sources"]
    assert src[str(work / "onnx-2-2-8")]["manifest_sha256"] == _sha(work / "onnx-2-2-8" / MANIFEST)
    assert src[str(work / "student")]["manifest_sha256"] == _sha(work / "student" / MANIFEST)
    assert src[str(teacher)]["files_sha256"] == teacher_now
    assert b["inputs"]["data"]["sha256"] == test_now


def test_unchanged_inputs_plan_nothing_and_do_not_reread_the_teacher(pipeline, monkeypatch):
    import dqtool.formats.hashcache as hc

    root, rec, teacher, data = pipeline
    assert set(_statuses(rec).values()) == {"done"}
    reads = []
    real = hc.sha256_bytes_of
    monkeypatch.setattr(hc, "sha256_bytes_of", lambda p, *a: reads.append(Path(p)) or real(p, *a))
    assert set(_statuses(rec).values()) == {"done"}
    teacher_reads = [p for p in reads if p.parent == teacher.resolve()]
    assert teacher_reads == []  # every teacher file answered by its unchanged stat key
    hc.HashCache(None).sha256(teacher / "model.safetensors")  # (the patch does see a real read)
    assert [p.name for p in reads] == ["model.safetensors"]


def test_edited_test_row_makes_only_bench_stale_and_restoring_it_undoes_that(pipeline):
    """Inputs are compared by content: only bench reads the test split; the same bytes
    written back (new mtime) are the same input again."""
    root, rec, teacher, data = pipeline
    f = data / "test.jsonl"
    original = f.read_bytes()
    rows = original.decode().splitlines()
    row = json.loads(rows[1])
    row["target"] = row["target"] + " edited"
    rows[1] = json.dumps(row)
    f.write_text("\n".join(rows) + "\n")
    assert _statuses(rec) == {"student": "done", "qat-2-2-8": "done", "packed-2-2-8": "done",
                              "onnx-2-2-8": "done", "bench": "run"}
    assert "(data (test) changed: test.jsonl sha256 " in _dry_run(rec)
    f.write_bytes(original)
    assert set(_statuses(rec).values()) == {"done"}


def test_changed_train_row_reruns_qat_and_after(pipeline):
    root, rec, teacher, data = pipeline
    f = data / "train.jsonl"
    old = _sha(f)
    rows = f.read_text().splitlines()
    row = json.loads(rows[3])
    row["target"] = "documentation server"
    rows[3] = json.dumps(row)
    f.write_text("\n".join(rows) + "\n")
    assert _statuses(rec) == {"student": "done", "qat-2-2-8": "run", "packed-2-2-8": "run", "onnx-2-2-8": "run",
                              "bench": "run"}
    out = _dry_run(rec)
    line = next(x for x in out.splitlines() if " qat " in x)
    assert f"data (train) changed: train.jsonl sha256 {old[:12]}... -> {_sha(f)[:12]}..." in line
    assert "after qat (qat-2-2-8)" in next(x for x in out.splitlines() if " convert " in x)
    _rerun_and_check_chain(root, rec, teacher, data, {"qat-2-2-8", "packed-2-2-8", "onnx-2-2-8", "bench"})


def test_remade_upstream_folder_reruns_what_reads_it(pipeline):
    """convert made again by hand (same config, new manifest): export and bench are stale."""
    from dqtool.stages.convert import convert

    root, rec, teacher, data = pipeline
    work = root / "work"
    old = _sha(work / "packed-2-2-8" / MANIFEST)
    import time

    time.sleep(1.1)  # the manifest's creation time has 1 s resolution: the remade one differs
    convert(work / "qat-2-2-8", work / "packed-2-2-8", load_recipe(rec).convert, force=True)
    new = _sha(work / "packed-2-2-8" / MANIFEST)
    assert new != old
    assert _statuses(rec) == {"student": "done", "qat-2-2-8": "done", "packed-2-2-8": "done", "onnx-2-2-8": "run",
                              "bench": "run"}
    out = _dry_run(rec)
    assert f"upstream convert changed: manifest sha256 {old[:12]}... -> {new[:12]}..." in out
    _rerun_and_check_chain(root, rec, teacher, data, {"onnx-2-2-8", "bench"})


def test_retrained_teacher_at_the_same_path_reruns_everything(pipeline):
    root, rec, teacher, data = pipeline
    w = teacher / "model.safetensors"
    old_w, old_size, old_mtime = _sha(w), w.stat().st_size, w.stat().st_mtime_ns
    model_before = {n: h for n, h in _top_files(teacher).items() if not is_tokenizer_file(n)}
    save_tiny(teacher, "bart", seed=7)  # other weights, same shapes: same size, new bytes and mtime
    assert w.stat().st_size == old_size and w.stat().st_mtime_ns != old_mtime and _sha(w) != old_w
    model_after = {n: h for n, h in _top_files(teacher).items() if not is_tokenizer_file(n)}
    assert set(_statuses(rec).values()) == {"run"}
    out = _dry_run(rec)
    line = next(x for x in out.splitlines() if " distill " in x)
    assert f"(teacher changed: sha256 {digest(model_before)[:12]}... -> {digest(model_after)[:12]}..." in line
    assert "model.safetensors" in line
    assert "after distill (student)" in next(x for x in out.splitlines() if " qat " in x)
    _rerun_and_check_chain(root, rec, teacher, data, set(STAGES))
    # The student really is copied from the new teacher.
    from safetensors.torch import load_file

    t, s = load_file(str(w)), load_file(str(root / "work" / "student" / "model.safetensors"))
    key = "model.shared.weight"
    assert key in s and (t[key] == s[key]).all()


def test_changed_tokenizer_file_reruns_everything(pipeline):
    root, rec, teacher, data = pipeline
    f = teacher / "tokenizer.json"
    doc = json.loads(f.read_text())
    assert doc.get("normalizer") is None
    doc["normalizer"] = {"type": "Lowercase"}  # a real tokenizer change that still loads
    before = {n: h for n, h in _top_files(teacher).items() if is_tokenizer_file(n)}
    f.write_text(json.dumps(doc))
    after = {n: h for n, h in _top_files(teacher).items() if is_tokenizer_file(n)}
    assert set(before) == set(after) and before != after
    assert set(_statuses(rec).values()) == {"run"}
    out = _dry_run(rec)
    line = next(x for x in out.splitlines() if " distill " in x)
    assert (f"(tokenizer changed: sha256 {digest(before)[:12]}... -> {digest(after)[:12]}... [tokenizer.json])"
            in line), line
    assert "teacher changed" not in line
    _rerun_and_check_chain(root, rec, teacher, data, set(STAGES))
    assert json.loads((root / "work" / "student" / "tokenizer.json").read_text())["normalizer"] == {"type": "Lowercase"}


def test_teacher_moved_with_the_same_bytes_is_not_a_change(pipeline, tmp_path):
    import yaml

    root, rec, teacher, data = pipeline
    moved = tmp_path / "teacher-copy"
    shutil.copytree(teacher, moved)
    r = yaml.safe_load(rec.read_text())
    r["teacher"] = str(moved)
    other = tmp_path / "moved.yaml"
    other.write_text(yaml.safe_dump(r))
    st = _statuses(other)
    assert st["student"] == "done" and st["qat-2-2-8"] == "done"


@pytest.mark.parametrize("key,value,message", [
    ("teacher", "{root}/no-such-teacher", "recipe key 'teacher': model '{root}/no-such-teacher' not found"),
    ("data", "{root}/no-such-data", "recipe key 'data': {root}/no-such-data not found"),
    ("data", "{root}/data-no-test", "recipe key 'bench.split': split 'test' is not in {root}/data-no-test "
                                   "(it has train, validation)"),
])
def test_dry_run_checks_that_teacher_and_data_exist(tmp_path, tiny_dir, key, value, message):
    import yaml

    write_pairs(tmp_path / "data-no-test", (("train", 4), ("validation", 2)))
    rec = _recipe(tmp_path, tiny_dir("bart"), write_pairs(tmp_path / "data", (("train", 4), ("validation", 2),
                                                                               ("test", 2))))
    r = yaml.safe_load(rec.read_text())
    r[key] = value.format(root=tmp_path)
    rec.write_text(yaml.safe_dump(r))
    res = CliRunner().invoke(main, ["compress", str(rec), "--dry-run"])
    assert res.exit_code == 2, res.output
    assert message.format(root=tmp_path) in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "work").exists()
