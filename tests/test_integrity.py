"""One integrity policy for every folder dqtool reads, through every command that reads it.

A folder dqtool wrote (distilled student, QAT, packed, ONNX export) is checked against its
manifest before anything uses it: one flipped byte or a missing manifest is one line naming
the problem and exit 2, with no output left behind. (Issue 13; issue 14 items 3 and 4.)
"""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from dqtool.cli import main
from dqtool.formats.manifest import MANIFEST_NAME
from dqtool.stages.convert import ConvertConfig, convert
from dqtool.stages.distill import DistillConfig, distill
from dqtool.stages.export import export
from test_convert import make_qat

# The file whose byte is flipped: the weights each kind's runtime reads.
WEIGHTS = {"qat": "model.safetensors", "packed": "packed.safetensors", "onnx": "onnx/weights.onnx_data",
           "student": "model.safetensors"}


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_dir):
    """Good folders of every kind, made once: student (distill), qat, packed, onnx; and data."""
    root = tmp_path_factory.mktemp("integrity")
    folders = {"qat": make_qat(root / "qat", "bart", "2-2-8")}
    convert(folders["qat"], root / "packed", ConvertConfig(float_dtype="float32", check_samples=1))
    folders["packed"] = root / "packed"
    export(folders["packed"], root / "onnx")
    folders["onnx"] = root / "onnx"
    distill(tiny_dir("bart"), root / "student", DistillConfig(encoder_layers=1, decoder_layers=1))
    folders["student"] = root / "student"
    data = root / "data"
    data.mkdir()
    rows = [{"source": f"the cat sat on the mat {i}", "target": "the cat"} for i in range(4)]
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folders, data


def _damaged(made, tmp_path: Path, kind: str, damage: str) -> Path:
    folders, _ = made
    folder = tmp_path / kind
    shutil.copytree(folders[kind], folder)
    if damage == "flipped-byte":
        f = folder / WEIGHTS[kind]
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        f.write_bytes(bytes(raw))
    else:
        (folder / MANIFEST_NAME).unlink()
    return folder


def _expect_refused(r, kind: str, damage: str, out: Path | None = None) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [x for x in r.output.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, r.output
    if damage == "flipped-byte":
        assert WEIGHTS[kind] in lines[0] and "does not match its hash" in lines[0], lines[0]
    else:
        assert MANIFEST_NAME in lines[0], lines[0]
    if out is not None:
        assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


DAMAGES = ("flipped-byte", "no-manifest")


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", ["onnx", "qat", "packed"])
def test_bench_refuses_a_damaged_folder(made, tmp_path, kind, damage):
    folder = _damaged(made, tmp_path, kind, damage)
    out = tmp_path / "bench"
    r = CliRunner().invoke(main, ["bench", str(folder), "--out", str(out), "--runs", "1", "--warmup", "0"])
    _expect_refused(r, kind, damage, out)


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", ["onnx", "qat", "packed"])
def test_eval_refuses_a_damaged_folder(made, tmp_path, kind, damage):
    folder = _damaged(made, tmp_path, kind, damage)
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(main, ["eval", str(folder), "--data", str(made[1]), "--max-length", "4",
                                  "--out", str(out)])
    _expect_refused(r, kind, damage)
    assert not out.exists()


@pytest.mark.parametrize("damage", DAMAGES)
def test_convert_refuses_a_damaged_qat_folder(made, tmp_path, damage):
    folder = _damaged(made, tmp_path, "qat", damage)
    out = tmp_path / "packed"
    r = CliRunner().invoke(main, ["convert", str(folder), str(out)])
    _expect_refused(r, "qat", damage, out)


@pytest.mark.parametrize("damage", DAMAGES)
def test_export_refuses_a_damaged_packed_folder(made, tmp_path, damage):
    folder = _damaged(made, tmp_path, "packed", damage)
    out = tmp_path / "onnx"
    r = CliRunner().invoke(main, ["export", str(folder), str(out)])
    _expect_refused(r, "packed", damage, out)


def test_qat_refuses_a_distilled_student_with_a_flipped_byte(made, tmp_path, tiny_dir):
    student = _damaged(made, tmp_path, "student", "flipped-byte")
    out = tmp_path / "qat"
    r = CliRunner().invoke(main, ["qat", str(student), str(out), "--data", str(made[1]),
                                  "--teacher", str(tiny_dir("bart")), "--max-steps", "1"])
    _expect_refused(r, "student", "flipped-byte", out)


def test_python_loaders_verify_too(made, tmp_path):
    from dqtool import DQToolError, load_onnx, load_packed
    from dqtool.formats.qat import load_qat

    for kind, load in (("qat", load_qat), ("packed", load_packed), ("onnx", load_onnx)):
        folder = _damaged(made, tmp_path / "py", kind, "flipped-byte")
        with pytest.raises(DQToolError, match=f"{WEIGHTS[kind]} does not match its hash"):
            load(folder)


def test_a_plain_hugging_face_folder_is_accepted_and_hashed_as_input(made, tmp_path, tiny_dir):
    from dqtool import formats

    teacher = tiny_dir("bart")
    assert not (teacher / MANIFEST_NAME).exists()
    assert formats.detect(teacher) == "hf" and formats.verify(teacher) is None
    student_manifest = json.loads((made[0]["student"] / MANIFEST_NAME).read_text())
    assert "model.safetensors" in student_manifest["inputs"]["teacher"]["weights_sha256"]
