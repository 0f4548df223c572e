"""dqtool qat with several processes (torchrun / accelerate launch, gloo on CPU) and teacher
targets generated only for the rows training reads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dqtool.cli import main
from dqtool.formats.manifest import verify_folder
from dqtool.stages.distill import DistillConfig, distill
from dqtool.base.parallel import EpochShuffle, rows_read
from tiny import save_tiny, write_pairs

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# 2 processes x batch 4 == 1 process x batch 8: the same rows per step, gradients averaged
# over the processes. They differ only by float summation order (and by the loss being a
# mean per process: the token counts of the two halves weigh in slightly differently), so
# every tensor's weights agree to 1% of how far training moved it.
REL_TOL = 1e-2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qatpar")
    data = write_pairs(root / "data")
    save_tiny(root / "teacher", "bart", 4, 4)
    distill(root / "teacher", root / "student", DistillConfig(encoder_layers=2, decoder_layers=1))
    return root, data


def _args(root, data, out, batch, steps=4, *extra):
    return ["qat", str(root / "student"), str(out), "--data", str(data), "--teacher", str(root / "teacher"),
            "--max-steps", str(steps), "--save-steps", "2", "--batch-size", str(batch), "--lr", "1e-3",
            "--source-max-length", "32", "--target-max-length", "16", "--targets", "teacher", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DQTOOL_PROGRESS_SECONDS": "0"}


def _port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _torchrun() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", _port()]


def _launch(launcher: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, "-m", "dqtool.cli", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=240)


def _close(a: Path, b: Path, start: Path):
    wa, wb, ws = load_file(a / "model.safetensors"), load_file(b / "model.safetensors"), \
        load_file(start / "model.safetensors")
    assert wa.keys() == wb.keys()
    moved = 0
    for k in wa:
        step = float((wb[k] - ws[k]).abs().max()) if k in ws else float(wb[k].abs().max())
        moved += step > 0
        assert float((wa[k] - wb[k]).abs().max()) <= REL_TOL * step + 1e-7, k
    assert moved > len(wa) // 2  # training really changed the weights


@pytest.fixture(scope="module")
def one_process(setup):
    root, data = setup
    r = CliRunner().invoke(main, _args(root, data, root / "one", 8))
    assert r.exit_code == 0, r.output
    return root / "one"


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_like_one_with_the_same_global_batch(setup, one_process, launcher):
    root, data = setup
    out = root / f"two-{launcher}"
    cmd = _torchrun() if launcher == "torchrun" else \
        [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _port()]
    r = _launch(cmd, _args(root, data, out, 4), root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in text
    assert text.count("written to") == 1 and "global batch 8 rows = 4 per process x 1 accumulation steps x 2" in text
    assert not (root / f"{out.name}.partial").exists()
    m = verify_folder(out, "qat")
    assert m["world_size"] == 2 and m["global_batch_size"] == 8 and m["steps"] == 4
    # Generated once (by the main process) for exactly the rows 4 steps of 8 read.
    assert text.count("teacher targets: 32/32 rows") == 1
    assert m["teacher_targets"] == {"rows": 32, "generated": 32, "changed": m["teacher_targets"]["changed"],
                                    "trained_without_target": 0}
    one = verify_folder(one_process, "qat")
    assert one["world_size"] == 1 and one["global_batch_size"] == 8
    _close(out, one_process, root / "student")


# The CLI's qat with a test-only Trainer callback that sleeps 2 s per step (time to kill it
# between its step-2 checkpoint and the end).
_SLOW_QAT = """
import sys, time
from transformers import TrainerCallback
import dqtool.stages.qat as stage

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        time.sleep(2)

run = stage.qat
stage.qat = lambda *a, **k: run(*a, callbacks=(Slow(),), **k)
from dqtool.cli import main
main(sys.argv[1:])
"""


def test_resume_a_two_process_run(setup):
    """Killed after its step-2 checkpoint, a 2-process run resumes under torchrun to the
    weights of an uninterrupted 2-process run; resuming with 1 process is refused."""
    root, data = setup
    ref, out = root / "two-ref", root / "two-resumed"
    r = _launch(_torchrun(), _args(root, data, ref, 4), root)
    assert r.returncode == 0, r.stderr[-3000:]
    slow = root / "slow_qat.py"
    slow.write_text(_SLOW_QAT)
    p = subprocess.Popen([*_torchrun(), str(slow), *_args(root, data, out, 4)], cwd=root, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = root / "two-resumed.partial"
    try:
        import time

        deadline = time.time() + 300
        while not (work / "checkpoint-2" / "trainer_state.json").is_file():
            assert time.time() < deadline and p.poll() is None
            time.sleep(0.2)
    finally:
        import psutil  # (a dependency of accelerate)

        # torchrun starts its workers in sessions of their own: kill them by pid, then torchrun.
        procs = psutil.Process(p.pid).children(recursive=True)
        for c in procs:
            c.kill()
        p.kill()
        p.wait()
        psutil.wait_procs(procs, timeout=30)
    assert not out.exists() and not (work / "checkpoint-4").exists()
    r = CliRunner().invoke(main, _args(root, data, out, 4, 4, "--resume"))
    assert r.exit_code == 2 and "trained by 2 processes, this run has 1" in r.output
    r = _launch(_torchrun(), _args(root, data, out, 4, 4, "--resume"), root)
    assert r.returncode == 0, r.stderr[-3000:]
    m = verify_folder(out, "qat")
    assert m["resumed_from"].endswith("checkpoint-2") and m["world_size"] == 2
    wa, wb = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_teacher_targets_only_for_the_rows_training_reads(setup):
    root, data = setup
    r = CliRunner().invoke(main, _args(root, data, root / "t3", 4, 3))
    assert r.exit_code == 0, r.output
    t = verify_folder(root / "t3", "qat")["teacher_targets"]
    assert t["rows"] == t["generated"] == 3 * 4 < 48 and t["trained_without_target"] == 0
    # The rows are the sampler's first 12 of epoch 0, the same for every number of processes.
    assert rows_read(48, 42, 3, 4) == sorted(EpochShuffle(48, 42).order(0)[:12])
    # Past one epoch every row is read.
    r = CliRunner().invoke(main, _args(root, data, root / "t13", 4, 13))
    assert r.exit_code == 0, r.output
    t = verify_folder(root / "t13", "qat")["teacher_targets"]
    assert t["rows"] == t["generated"] == 48 and t["trained_without_target"] == 0
