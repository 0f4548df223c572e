"""Fault injection: dqtool's reliability spec, one section per promise.

Nothing wrong is ever produced silently. Whatever goes wrong (a damaged input folder, a
full disk, a bad path, a second process, a kill, a changed setup on resume), a command
either completes correctly or stops with ONE line on stderr and exit code 2 (130 for
Ctrl-C), leaving no output that looks whole and no useless partial output; the line
says what to do next (``--resume`` only where a resume works, else ``--force`` / run again).

Sections:
  1. resume checks          a changed setup is refused; Ctrl-C, disk full and unreadable
                            checkpoints say how to continue; train_loss is right after resume
  2. disk full (ENOSPC)     in every stage that writes (injected OSError)
  3. bad output paths       refused before any work
  4. locks and temp folders one process per output; stale temp folders of killed runs removed
  5. kills                  workers die with their parent; SIGKILL of compress + re-run
  6. damaged input folders  truncated / missing files through each command that reads them
  7. smaller promises       umask, reproducible bytes, position limits, clear refusals
All on tiny models (d_model 16), a few optimizer steps each.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dqtool.cli import main
from dqtool.stages.distill import DistillConfig, distill
from dqtool.formats.manifest import verify_folder
from tiny import write_pairs


def enospc(path="x"):
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def one_line_error(r, *needles, code=2):
    """The CLI result is exit ``code`` with one line holding every needle."""
    assert r.exit_code == code, r.output
    # The message is one line (progress bars and library warnings around it are not messages).
    text = re.sub(r"\s*\d+%\|[^\]\n]*\]", "\n", r.output)
    lines = [ln for ln in text.splitlines() if ln.startswith(("error:", "interrupted"))]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def hidden_leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("faults")
    data = write_pairs(root / "data", (("train", 32), ("validation", 8), ("test", 4)))
    teacher = tiny_dir("bart")
    distill(teacher, root / "student", DistillConfig(encoder_layers=2, decoder_layers=1))
    return root, data, teacher


def qat_args(root, data, out, *extra, steps=4):
    return ["qat", str(root / "student"), str(out), "--data", str(data), "--max-steps", str(steps),
            "--save-steps", "2", "--batch-size", "8", "--source-max-length", "32", "--target-max-length", "16",
            "--wea", "2-2-8", *extra]


def _train_loss(folder) -> float:
    log = json.loads((Path(folder) / "training_log.json").read_text())
    return next(e["train_loss"] for e in reversed(log) if "train_loss" in e)


@pytest.fixture(scope="module")
def ref_qat(env):
    """An uninterrupted 4-step 2-2-8 run: the reference for every resumed run."""
    root, data, _ = env
    out = root / "ref-qat"
    r = CliRunner().invoke(main, qat_args(root, data, out))
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def packed(env, ref_qat):
    root, _, _ = env
    out = root / "packed"
    r = CliRunner().invoke(main, ["convert", str(ref_qat), str(out), "--float-dtype", "float32",
                                  "--check-samples", "1"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def onnx_dir(env, packed):
    root, _, _ = env
    out = root / "onnx"
    r = CliRunner().invoke(main, ["export", str(packed), str(out)])
    assert r.exit_code == 0, r.output
    return out


def interrupt_after_step(monkeypatch, step: int, exc=KeyboardInterrupt):
    """The Trainer's checkpoint save at ``step`` completes, then ``exc`` is raised (Ctrl-C)."""
    from transformers import Trainer

    orig = Trainer._save_checkpoint

    def save(self, model, trial):
        orig(self, model, trial)
        if self.state.global_step >= step:
            raise exc()

    monkeypatch.setattr(Trainer, "_save_checkpoint", save)


# =========================================================================== 1. resume checks

def test_ctrl_c_says_resume_and_a_changed_setup_is_refused_on_resume(env, ref_qat, monkeypatch):
    root, data, _ = env
    out = root / "q-ctrl-c"
    with monkeypatch.context() as m:
        interrupt_after_step(m, 2)
        r = CliRunner().invoke(main, qat_args(root, data, out))
    one_line_error(r, "interrupted", "checkpoint-2", "--resume", code=130)
    assert not out.exists() and (root / "q-ctrl-c.partial" / "checkpoint-2" / "trainer_state.json").is_file()
    # A 2-2-8 checkpoint resumed as 4-4-8, or with another LR schedule or activation scheme: refused.
    for extra, field in ((["--wea", "4-4-8"], "scheme.w_bits"), (["--lr", "0.001"], "learning_rate (0.0001 -> 0.001)"),
                         (["--act-granularity", "tensor"], "scheme.act_granularity"),
                         (["--loss-hidden", "1"], "losses.hidden"), (["--batch-size", "4"], "batch_size"),
                         (["--max-steps", "6"], "max_steps")):
        r = CliRunner().invoke(main, qat_args(root, data, out, "--resume", *extra))
        one_line_error(r, "was started with a different setup", "--force")
        assert field.split(" ")[0] in r.output and (" " not in field or field in r.output), (field, r.output)
    # Other data is refused too.
    other = write_pairs(root / "data-other", (("train", 32), ("validation", 8)), seed=1)
    r = CliRunner().invoke(main, [*qat_args(root, other, out, "--resume")])
    one_line_error(r, "data files", "--force")
    # The same setup resumes, and the result equals the uninterrupted run (loss included).
    r = CliRunner().invoke(main, qat_args(root, data, out, "--resume"))
    assert r.exit_code == 0, r.output
    m = verify_folder(out, "qat")
    assert m["wea"] == "2-2-8" and m["resumed_from"].endswith("checkpoint-2")
    assert _train_loss(out) == pytest.approx(_train_loss(ref_qat), rel=1e-5)


def test_unreadable_checkpoint_is_one_line(env, monkeypatch):
    root, data, _ = env
    out = root / "q-pickle"
    with monkeypatch.context() as m:
        interrupt_after_step(m, 2)
        CliRunner().invoke(main, qat_args(root, data, out))
    ckpt = root / "q-pickle.partial" / "checkpoint-2"
    (ckpt / "optimizer.pt").write_bytes(b"not a pickle at all")
    r = CliRunner().invoke(main, qat_args(root, data, out, "--resume"))
    one_line_error(r, "checkpoint", "unreadable", "--force")
    assert not out.exists()


def test_disk_full_in_the_first_checkpoint_leaves_nothing(env, monkeypatch):
    root, data, _ = env
    from transformers import Trainer

    def full(self, model, trial):
        raise enospc(Path(self.args.output_dir) / "checkpoint-2" / "optimizer.pt")

    monkeypatch.setattr(Trainer, "_save_checkpoint", full)
    out = root / "q-full-1"
    r = CliRunner().invoke(main, qat_args(root, data, out))
    one_line_error(r, "disk full", "optimizer.pt", "no checkpoint was complete", "run the command again")
    assert not out.exists() and not (root / "q-full-1.partial").exists()


def test_disk_full_in_a_later_checkpoint_keeps_the_resumable_one(env, ref_qat, monkeypatch):
    root, data, _ = env
    from transformers import Trainer

    orig = Trainer._save_checkpoint

    def full_at_4(self, model, trial):
        if self.state.global_step == 4:
            raise enospc(Path(self.args.output_dir) / "checkpoint-4" / "model.safetensors")
        orig(self, model, trial)

    out = root / "q-full-4"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_checkpoint", full_at_4)
        r = CliRunner().invoke(main, qat_args(root, data, out))
    one_line_error(r, "disk full", "--resume", "checkpoint-2")
    partial = root / "q-full-4.partial"
    assert sorted(p.name for p in partial.glob("checkpoint-*")) == ["checkpoint-2"]  # the broken one is gone
    r = CliRunner().invoke(main, qat_args(root, data, out, "--resume"))
    assert r.exit_code == 0, r.output
    assert _train_loss(out) == pytest.approx(_train_loss(ref_qat), rel=1e-5)


def test_disk_full_writing_the_qat_output_resumes_without_training(env, ref_qat, monkeypatch):
    root, data, _ = env
    import dqtool.stages.qat

    out = root / "q-full-out"
    with monkeypatch.context() as m:
        m.setattr(dqtool.stages.qat, "save_qat", lambda model, tok, folder, scheme: (_ for _ in ()).throw(
            enospc(folder / "model.safetensors")))
        r = CliRunner().invoke(main, qat_args(root, data, out))
    one_line_error(r, "disk full", "--resume")
    assert not out.exists() and hidden_leftovers(root, "q-full-out") == []
    r = CliRunner().invoke(main, qat_args(root, data, out, "--resume"))
    assert r.exit_code == 0, r.output
    # Resumed at the last step: no step runs, yet train_loss is the whole run's mean (was 0.0).
    assert _train_loss(out) == pytest.approx(_train_loss(ref_qat), rel=1e-5)
    assert _train_loss(out) > 0


def test_compress_restarts_an_interrupted_qat_whose_recipe_changed(env, tmp_path, monkeypatch):
    import yaml

    from dqtool.compress import describe, load_recipe, plan
    from dqtool.stages.qat import qat

    root, data, teacher = env
    recipe = {"teacher": str(teacher), "data": str(data), "work": str(tmp_path / "work"), "schemes": ["2-2-8"],
              "distill": {"encoder_layers": 2, "decoder_layers": 1},
              "qat": {"max_steps": 4, "save_steps": 2, "batch_size": 8, "source_max_length": 32,
                      "target_max_length": 16, "learning_rate": 5.0e-4, "act_granularity": "tensor"}}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    rec = load_recipe(p)
    distill(teacher, rec.work / "student", rec.distill)
    with monkeypatch.context() as m:
        interrupt_after_step(m, 2)
        with pytest.raises(KeyboardInterrupt):
            qat(rec.work / "student", rec.work / "qat-2-2-8", rec.qats["2-2-8"], teacher=str(teacher))
    assert {s.out.name: s.status for s in plan(rec)}["qat-2-2-8"] == "resume"
    recipe["qat"].update(learning_rate=1.0e-3, act_granularity="token")
    p.write_text(yaml.safe_dump(recipe))
    steps = plan(load_recipe(p))
    q = next(s for s in steps if s.stage == "qat")
    assert q.status == "run" and "learning_rate" in q.reason and "act_granularity" in q.reason
    assert "starts over" in describe(steps)


# =========================================================================== 2. disk full

def _no_output(parent: Path, name: str):
    assert not (parent / name).exists()
    assert hidden_leftovers(parent, name) == []


def test_disk_full_in_distill(env, tmp_path, monkeypatch):
    root, data, teacher = env
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                        lambda self, folder, **kw: (_ for _ in ()).throw(enospc(Path(folder) / "model.safetensors")))
    r = CliRunner().invoke(main, ["distill", str(teacher), str(tmp_path / "s"), "--encoder-layers", "1"])
    one_line_error(r, "disk full", "model.safetensors", "run the command again")
    _no_output(tmp_path, "s")


def test_disk_full_in_convert(env, ref_qat, tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda tensors, path, metadata=None: (_ for _ in ()).throw(enospc(path)))
    r = CliRunner().invoke(main, ["convert", str(ref_qat), str(tmp_path / "p"), "--check-samples", "1"])
    one_line_error(r, "disk full", "packed.safetensors")
    _no_output(tmp_path, "p")


def test_disk_full_in_export(env, packed, tmp_path, monkeypatch):
    import dqtool.stages.export

    monkeypatch.setattr(dqtool.stages.export, "share_external_data",
                        lambda models, folder, **kw: (_ for _ in ()).throw(enospc(folder / "weights.onnx_data")))
    r = CliRunner().invoke(main, ["export", str(packed), str(tmp_path / "o")])
    one_line_error(r, "disk full", "weights.onnx_data")
    _no_output(tmp_path, "o")


def test_eval_out_checks_it_can_write_before_generating(env, ref_qat, tmp_path, monkeypatch):
    import tempfile

    import dqtool.stages.evaluate

    root, data, _ = env
    monkeypatch.setattr(dqtool.stages.evaluate, "generate", lambda *a, **k: pytest.fail("generated before the check"))
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(enospc(tmp_path / "tmpfile")))
    r = CliRunner().invoke(main, ["eval", str(ref_qat), "--data", str(data), "--out", str(tmp_path / "e.json")])
    one_line_error(r, "disk full", "nothing was generated")


def test_disk_full_writing_eval_json_keeps_the_scores_in_the_message(env, ref_qat, tmp_path, monkeypatch):
    root, data, _ = env
    out = tmp_path / "e.json"
    real = os.replace

    def replace(a, b):
        if Path(b) == out:
            raise enospc(out)
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    r = CliRunner().invoke(main, ["eval", str(ref_qat), "--data", str(data), "--split", "test", "--max-length", "4",
                                  "--out", str(out)])
    one_line_error(r, "disk full", "e.json", "bytes needed", "scores: rouge1")
    assert list(tmp_path.iterdir()) == []


# =========================================================================== 3. bad output paths

@pytest.fixture
def bad_paths(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    return {"parent is a file": (f / "out", "is a file"), "dangling symlink": (link, "does not exist")}


@pytest.mark.parametrize("kind", ["parent is a file", "dangling symlink"])
@pytest.mark.parametrize("command", ["distill", "qat", "convert", "export", "bench", "eval"])
def test_bad_output_path_is_refused_before_any_work(env, ref_qat, packed, bad_paths, command, kind, monkeypatch):
    root, data, teacher = env
    import dqtool.formats.hf

    # Nothing may be loaded before the path check.
    monkeypatch.setattr(dqtool.formats.hf, "load_seq2seq", lambda *a, **k: pytest.fail("loaded a model first"))
    out, needle = bad_paths[kind]
    args = {"distill": ["distill", str(teacher), str(out)],
            "qat": qat_args(root, data, out),
            "convert": ["convert", str(ref_qat), str(out)],
            "export": ["export", str(packed), str(out)],
            "bench": ["bench", str(packed), "--out", str(out)],
            "eval": ["eval", str(ref_qat), "--data", str(data), "--out", str(out)]}[command]
    t0 = time.time()
    r = CliRunner().invoke(main, args)
    one_line_error(r, needle)
    assert time.time() - t0 < 5


def test_recipe_work_that_is_a_file_is_refused_by_dry_run(env, tmp_path):
    import yaml

    root, data, teacher = env
    (tmp_path / "work").write_text("x")
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"teacher": str(teacher), "data": str(data), "work": str(tmp_path / "work")}))
    one_line_error(CliRunner().invoke(main, ["compress", str(p), "--dry-run"]), "recipe key 'work'", "is a file")


# =========================================================================== 4. locks, temp folders

@pytest.fixture
def holder():
    """Another process holding the lock of a path (as a running dqtool stage does)."""
    procs = []

    def hold(path: Path) -> subprocess.Popen:
        code = ("import sys, time; from dqtool.base.fsutil import output_lock\n"
                "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")
        p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_second_process_on_the_same_output_says_who_holds_it(env, tmp_path, holder):
    root, data, teacher = env
    p = holder(tmp_path / "s")
    r = CliRunner().invoke(main, ["distill", str(teacher), str(tmp_path / "s"), "--encoder-layers", "1"])
    one_line_error(r, "in use by dqtool process", str(p.pid))
    assert not (tmp_path / "s").exists()


def test_second_compress_on_the_same_work_folder_says_who_holds_it(env, tmp_path, holder):
    import yaml

    root, data, teacher = env
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"teacher": str(teacher), "data": str(data), "work": str(tmp_path / "work")}))
    h = holder(tmp_path / "work")
    one_line_error(CliRunner().invoke(main, ["compress", str(p)]), "in use by dqtool process", str(h.pid))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_folders_of_killed_runs_are_removed_on_the_next_run(env, tmp_path):
    root, data, teacher = env
    dead = _dead_pid()
    stale = [tmp_path / f".s.tmp-{dead}-abc123", tmp_path / f".s.old-{dead}"]
    live = tmp_path / f".s.tmp-{os.getppid()}-xyz"   # owner alive: maybe still writing, kept
    for d in [*stale, live]:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"0" * 100)
    r = CliRunner().invoke(main, ["distill", str(teacher), str(tmp_path / "s"), "--encoder-layers", "1"])
    assert r.exit_code == 0, r.output
    assert not any(d.exists() for d in stale) and live.exists()


# =========================================================================== 5. kills

def test_a_worker_dies_with_its_parent():
    code = ("import sys; from dqtool.base.fsutil import popen_child\n"
            "popen_child([sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(60)'])"
            ".wait()")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 5
    while time.time() < deadline and _running(child):
        time.sleep(0.05)
    assert not _running(child)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_bench_runs_its_workers_through_popen_child(monkeypatch):
    """bench's measuring workers are started so that they die with bench (see above)."""
    import dqtool.base.fsutil
    from dqtool.base.errors import DQToolError
    from dqtool.stages.bench.stage import BenchConfig, _measure_isolated

    seen = []

    import io

    class FakeProc:
        returncode = 1

        def __init__(self):
            self.stdin, self.stderr = io.StringIO(), io.StringIO("boom\n")

        def wait(self):
            return 1

    def fake(cmd, **kw):
        seen.append(cmd)
        return FakeProc()

    class Target:
        name = "t"

        def describe(self):
            return {}

    monkeypatch.setattr(dqtool.base.fsutil, "popen_child", fake)
    with pytest.raises(DQToolError, match="boom"):
        _measure_isolated(Target(), BenchConfig(), log=lambda m: None)
    assert seen and seen[0][0] == sys.executable


def test_sigkill_of_compress_then_rerun_completes(env, tmp_path):
    """compress killed by SIGKILL during QAT and again during bench, then run again: it
    resumes the QAT, leaves no worker behind, and finishes with every stage done."""
    import yaml

    from dqtool.compress import load_recipe, plan

    root, data, teacher = env
    work = tmp_path / "work"
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({
        "teacher": str(teacher), "data": str(data), "work": str(work), "schemes": ["2-2-8"],
        "distill": {"encoder_layers": 2, "decoder_layers": 1},
        # 12 steps: the kill after checkpoint-2 lands while QAT still runs.
        "qat": {"max_steps": 12, "save_steps": 2, "batch_size": 8, "source_max_length": 32, "target_max_length": 16},
        "convert": {"float_dtype": "float32", "check_samples": 1},
        "bench": {"max_samples": 2, "max_length": 4, "source_tokens": 8, "new_tokens": 3, "runs": 200, "warmup": 0,
                  "threads": 1, "plots": False}}))
    env_vars = {**os.environ,
                "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "dqtool.cli", "compress", str(p)]

    def run_until(ready, what):
        # A new session: its id (the PID) finds the workers of this compress after the kill.
        proc = subprocess.Popen(cmd, env=env_vars, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not ready(proc.pid):
            time.sleep(0.05)
        assert proc.poll() is None, f"compress ended before {what}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return proc

    # 1. During QAT, after its first checkpoint.
    run_until(lambda sid: (work / "qat-2-2-8.partial" / "checkpoint-2" / "trainer_state.json").is_file(), "qat")
    assert not (work / "qat-2-2-8").exists()
    assert {s.out.name: s.status for s in plan(load_recipe(p))}["qat-2-2-8"] == "resume"

    # 2. During bench, while a measuring worker runs (200 timed runs keep it busy).
    proc = run_until(lambda sid: _bench_workers(sid) != [], "bench")
    deadline = time.time() + 5
    while time.time() < deadline and _bench_workers(proc.pid):
        time.sleep(0.05)
    assert _bench_workers(proc.pid) == []      # no orphan left measuring
    assert not (work / "bench").exists()       # and no report that looks whole
    # 3. Run again, to the end: the stale temp folders go, every stage is done.
    rec = yaml.safe_load(p.read_text())
    rec["bench"]["runs"] = 1
    p.write_text(yaml.safe_dump(rec))
    r = CliRunner().invoke(main, ["compress", str(p)])
    assert r.exit_code == 0, r.output
    assert all(s.status == "done" for s in plan(load_recipe(p)))
    assert hidden_leftovers(work, "bench") == [] and hidden_leftovers(work, "qat-2-2-8") == []
    assert re.search(r"checkpoint-\d+$", verify_folder(work / "qat-2-2-8", "qat")["resumed_from"])


def _bench_workers(session: int) -> list[int]:
    """PIDs of live bench worker processes in ``session`` (the killed compress's session)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
            sid = int((d / "stat").read_text().split(")")[-1].split()[3])
        except (OSError, ValueError, IndexError):
            continue
        if sid == session and "_worker" in cmdline and _running(int(d.name)):
            out.append(int(d.name))
    return out


# =========================================================================== 6. damaged input folders

def _truncate(folder: Path, name: str) -> None:
    f = folder / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("kind,command", [
    ("student", "qat"), ("student", "eval"),
    ("qat", "convert"), ("qat", "eval"),
    ("packed", "export"), ("packed", "eval"),
    ("onnx", "eval"),
])
def test_truncated_weights_are_one_line_through_each_command(env, ref_qat, packed, onnx_dir, tmp_path, kind, command):
    root, data, _ = env
    src = {"student": root / "student", "qat": ref_qat, "packed": packed, "onnx": onnx_dir}[kind]
    weights = {"student": "model.safetensors", "qat": "model.safetensors", "packed": "packed.safetensors",
               "onnx": "onnx/weights.onnx_data"}[kind]
    bad = tmp_path / kind
    shutil.copytree(src, bad)
    _truncate(bad, weights)
    out = tmp_path / "out"
    args = {"qat": ["qat", str(bad), str(out), "--data", str(data), "--max-steps", "2", "--batch-size", "8"],
            "convert": ["convert", str(bad), str(out)],
            "export": ["export", str(bad), str(out)],
            "eval": ["eval", str(bad), "--data", str(data), "--split", "test", "--max-length", "4"]}[command]
    r = CliRunner().invoke(main, args)
    one_line_error(r)
    assert not out.exists()


def _flip(folder: Path, name: str) -> None:
    f = folder / name
    data = bytearray(f.read_bytes())
    data[len(data) - 7] ^= 0x10      # in the tensor data, not the header: the file still parses
    f.write_bytes(bytes(data))


_FOLDERS = {"student": "model.safetensors", "qat": "model.safetensors", "packed": "packed.safetensors",
            "onnx": "onnx/weights.onnx_data"}


def _reader_args(command, bad, out, data):
    return {"qat": ["qat", str(bad), str(out), "--data", str(data), "--max-steps", "2", "--batch-size", "8"],
            "convert": ["convert", str(bad), str(out)],
            "export": ["export", str(bad), str(out)],
            "eval": ["eval", str(bad), "--data", str(data), "--split", "test", "--max-length", "4"],
            "bench": ["bench", str(bad), "--out", str(out), "--runs", "1", "--warmup", "0", "--source-tokens", "8",
                      "--new-tokens", "2", "--threads", "1", "--no-plots"]}[command]


# Every dqtool folder kind through every command that reads it (issue 14, items 3 and 4, fixed
# by issue 13's one integrity policy): a flipped byte is refused, never used.
READERS = [("student", "qat"), ("student", "eval"), ("qat", "convert"), ("qat", "eval"), ("qat", "bench"),
           ("packed", "export"), ("packed", "eval"), ("packed", "bench"), ("onnx", "eval"), ("onnx", "bench")]


@pytest.mark.parametrize("kind,command", READERS)
def test_flipped_byte_is_refused_through_each_command(env, ref_qat, packed, onnx_dir, tmp_path, kind, command):
    root, data, _ = env
    src = {"student": root / "student", "qat": ref_qat, "packed": packed, "onnx": onnx_dir}[kind]
    bad = tmp_path / kind
    shutil.copytree(src, bad)
    _flip(bad, _FOLDERS[kind])
    out = tmp_path / "out"
    one_line_error(CliRunner().invoke(main, _reader_args(command, bad, out, data)), "does not match its hash")
    assert not out.exists()


@pytest.mark.parametrize("kind,command", [("qat", "convert"), ("packed", "export"), ("packed", "eval")])
def test_missing_manifest_is_one_line(env, ref_qat, packed, tmp_path, kind, command):
    root, data, _ = env
    bad = tmp_path / kind
    shutil.copytree({"qat": ref_qat, "packed": packed}[kind], bad)
    (bad / "dqtool-manifest.json").unlink()
    one_line_error(CliRunner().invoke(main, _reader_args(command, bad, tmp_path / "out", data)),
                   "dqtool-manifest.json")
    assert not (tmp_path / "out").exists()


def test_onnx_runtime_load_error_is_one_line(onnx_dir, tmp_path):
    from dqtool.base.errors import DQToolError
    from dqtool.runtimes.ort import OnnxSeq2Seq

    bad = tmp_path / "onnx"
    shutil.copytree(onnx_dir, bad)
    _truncate(bad, "onnx/weights.onnx_data")
    with pytest.raises(DQToolError) as e:
        OnnxSeq2Seq.from_folder(bad)
    assert "\n" not in str(e.value) and "re-export" in str(e.value)


# =========================================================================== 7. smaller promises

def test_outputs_follow_the_umask(env, ref_qat, tmp_path):
    root, data, teacher = env
    old = os.umask(0o022)
    try:
        r = CliRunner().invoke(main, ["distill", str(teacher), str(tmp_path / "s"), "--encoder-layers", "1"])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(main, ["eval", str(ref_qat), "--data", str(data), "--split", "test", "--max-length",
                                      "4", "--out", str(tmp_path / "e.json")])
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "e.json").stat().st_mode & 0o777 == 0o644


def test_packed_file_is_byte_reproducible(ref_qat, tmp_path):
    from dqtool.stages.convert import ConvertConfig, convert

    digests = set()
    for i in range(2):   # safetensors' header order varied from call to call (a Rust HashMap)
        convert(ref_qat, tmp_path / f"p{i}", ConvertConfig(float_dtype="float32", check_samples=1))
        data = (tmp_path / f"p{i}" / "packed.safetensors").read_bytes()
        digests.add(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n], object_pairs_hook=list)[0][1]   # the header's first entry, in order
        assert [k for k, _ in meta] == sorted(k for k, _ in meta)       # written in one canonical order
    assert len(digests) == 1


def _long_data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    words = "the package provides a library with tools for files and data".split()
    for split, n in (("train", 16), ("validation", 4)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                src = " ".join(words[(i + k) % len(words)] for k in range(150))   # > 64 positions
                f.write(json.dumps({"source": src, "target": " ".join(words[:3])}) + "\n")
    return folder


def test_source_max_length_above_the_position_table_is_capped_with_a_note(env, tmp_path):
    root, _, _ = env
    data = _long_data(tmp_path / "long")
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["qat", str(root / "student"), str(out), "--data", str(data), "--max-steps", "2",
                                  "--save-steps", "2", "--batch-size", "8", "--source-max-length", "4096"])
    assert r.exit_code == 0, r.output
    assert "--source-max-length 4096 is more than the 64 positions" in r.output
    assert verify_folder(out, "qat")["lengths_used"]["source_max_length"] == 64


def test_export_refusal_names_every_unsupported_bit_width(env, tmp_path):
    root, data, _ = env
    q = tmp_path / "q338"
    r = CliRunner().invoke(main, ["qat", str(root / "student"), str(q), "--data", str(data), "--max-steps", "1",
                                  "--save-steps", "1", "--batch-size", "8", "--source-max-length", "32",
                                  "--target-max-length", "16", "--wea", "3-3-8"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["convert", str(q), str(tmp_path / "p338"), "--float-dtype", "float32",
                                  "--check-samples", "1"])
    assert r.exit_code == 0, r.output
    one_line_error(CliRunner().invoke(main, ["export", str(tmp_path / "p338"), str(tmp_path / "o")]),
                   "3-bit weights and 3-bit embeddings", "W and E bits 2, 4 or 8")


def test_student_drops_the_teachers_auto_map(env, tmp_path):
    root, _, teacher = env
    t = tmp_path / "teacher"
    shutil.copytree(teacher, t)
    cfg = json.loads((t / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForSeq2SeqLM": "modeling_x.XModel"}
    (t / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["distill", str(t), str(tmp_path / "s"), "--encoder-layers", "1"])
    assert r.exit_code == 0, r.output
    assert "auto_map" not in json.loads((tmp_path / "s" / "config.json").read_text())


def test_bench_report_without_data_says_quality_was_not_measured():
    from dqtool.stages.bench.stage import markdown

    report = {"config": {"batch_sizes": [1], "threads": 1, "source_tokens": 8, "new_tokens": 4, "runs": 1,
                         "warmup": 0, "max_samples": 200, "data": None, "split": "test"},
              "machine": {"description": "cpu", "torch": "x", "onnxruntime": "y"}, "rows": []}
    text = markdown(report)
    assert "None" not in text and "not measured" in text


def test_bench_source_tokens_above_the_position_table_is_refused_before_measuring(packed, tmp_path):
    r = CliRunner().invoke(main, ["bench", str(packed), "--out", str(tmp_path / "b"), "--source-tokens", "4096"])
    one_line_error(r, "--source-tokens 4096 is more than the 64 positions", "--source-tokens 64 or less")
    assert not (tmp_path / "b").exists()


def test_demo_teacher_trains_its_fixed_steps_on_any_machine():
    """The main job's teacher is the same on a slow or busy machine: no wall clock stops it
    by default (it once stopped after 200 of 2600 steps and every score was meaningless)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "teacher" / "train_teacher.py"
    spec = importlib.util.spec_from_file_location("train_teacher", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.build_parser().parse_args(["--out", "x"])
    assert args.max_minutes is None and mod.RECIPES["demo"]["steps"] == 2600
    guard = mod.WallClockGuard(deadline_s=float("inf"))
    mod.T_START -= 10 * 3600   # ten hours in: a slow machine still trains on

    class Control:
        should_training_stop = False

    assert not guard.on_step_end(None, None, Control()).should_training_stop
