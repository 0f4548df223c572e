"""QAT memory: the printed estimate, gradient checkpointing, the teacher's dtype."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

from dqtool.cli import main
from dqtool.stages.distill import DistillConfig, distill
from dqtool.model.losses import LossConfig
from dqtool.formats.manifest import verify_folder
from dqtool.model.memory import activation_floats, estimate
from dqtool.stages.qat import QATConfig, teacher_dtype
from tiny import tiny_config, write_pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("qatmem")
    data = write_pairs(root / "data")
    distill(tiny_dir("bart"), root / "student", DistillConfig(encoder_layers=2, decoder_layers=1))
    return root, data


def _run(root, data, out, *extra):
    return CliRunner().invoke(main, ["qat", str(root / "student"), str(out), "--data", str(data), "--max-steps", "3",
                                     "--save-steps", "100", "--batch-size", "4", "--source-max-length", "32",
                                     "--target-max-length", "16", "--wea", "2-2-8", *extra])


def _api(root, data, out, **kw):
    from dqtool.stages.qat import qat
    from dqtool.qmath.scheme import QuantScheme

    cfg = QATConfig(data=str(data), scheme=QuantScheme.from_wea("2-2-8"), max_steps=3, save_steps=100, batch_size=4,
                    source_max_length=32, target_max_length=16, logging_steps=1, **kw)
    return qat(root / "student", out, cfg, progress=False)


def _losses(out):
    return [e["loss"] for e in json.loads((out / "training_log.json").read_text()) if "loss" in e]


def test_qat_prints_the_estimate_and_checkpointing_trains_the_same(setup):
    root, data = setup
    r = _run(root, data, root / "plain")
    assert r.exit_code == 0, r.output
    m = re.search(r"memory estimate \(peak\) for training:.*?total \(peak, \+-25%\)\s+([\d.]+) GiB", r.output, re.S)
    assert m and float(m.group(1)) > 0
    assert "teacher" in r.output and "optimizer state" in r.output
    man = verify_folder(root / "plain", "qat")
    parts = man["memory_estimate_bytes"]
    assert parts["teacher"] > 0 and parts["optimizer_state"] == 2 * parts["gradients"]
    assert man["teacher_dtype"] == "torch.float32"  # CPU: the teacher stays float32
    r = _run(root, data, root / "ckpt", "--gradient-checkpointing")
    assert r.exit_code == 0, r.output
    assert verify_folder(root / "ckpt", "qat")["config"]["gradient_checkpointing"] is True
    _api(root, data, root / "plain1")
    _api(root, data, root / "ckpt1", gradient_checkpointing=True)
    a, b = _losses(root / "plain1"), _losses(root / "ckpt1")
    assert len(a) == len(b) == 3 and a == pytest.approx(b, rel=1e-5)   # recomputed, not changed


def test_bf16_teacher_trains_beside_a_float32_student(setup):
    root, data = setup
    r = _run(root, data, root / "bf16", "--teacher-dtype", "bfloat16", "--loss-hidden", "1")
    assert r.exit_code == 0, r.output
    assert verify_folder(root / "bf16", "qat")["teacher_dtype"] == "torch.bfloat16"
    _api(root, data, root / "bf16api", teacher_dtype="bfloat16", losses=LossConfig(hidden=1.0))
    assert all(torch.isfinite(torch.tensor(_losses(root / "bf16"))))


def test_teacher_not_loaded_without_a_teacher_loss(setup):
    root, data = setup
    r = _run(root, data, root / "noteacher", "--loss-logits", "0", "--targets", "teacher")
    assert r.exit_code == 0, r.output
    assert verify_folder(root / "noteacher", "qat")["memory_estimate_bytes"]["teacher"] == 0


def test_teacher_dtype_auto_and_bad_value():
    assert teacher_dtype(QATConfig(data="d")) == torch.float32   # CPU: float32
    assert teacher_dtype(QATConfig(data="d", teacher_dtype="bfloat16")) == torch.bfloat16
    with pytest.raises(Exception, match="--teacher-dtype 'int8'"):
        QATConfig(data="d", teacher_dtype="int8")


def test_estimate_scales_with_batch_and_checkpointing():
    cfg = tiny_config("bart", 2, 1)
    a1 = activation_floats(cfg, 1, 128, 32)
    assert activation_floats(cfg, 4, 128, 32) == 4 * a1
    assert activation_floats(cfg, 4, 128, 32, checkpointing=True) < activation_floats(cfg, 4, 128, 32) / 2
    kw = dict(student_params=1000, quantized_params=900, trainable_params=1000, batch=2, source_len=64, target_len=16)
    e = estimate(cfg, teacher_params=0, **kw)
    assert e.parts["teacher"] == 0 and e.parts["optimizer_state"] == 8000 and e.parts["gradients"] == 4000
    assert estimate(cfg, teacher_params=500, teacher_bytes=2, **kw).parts["teacher"] == 1000
    gpu = estimate(cfg, teacher_params=500, device="cuda", mixed_precision="bf16", **kw)
    assert gpu.parts["activations"] == e.parts["activations"] // 2
    assert "total" in e.describe() and e.total == sum(e.parts.values())
    assert LossConfig().needs_teacher
