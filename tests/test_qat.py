import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dqtool.cli import main
from transformers import AutoModelForSeq2SeqLM
from dqtool.stages.distill import DistillConfig, distill
from dqtool.formats.manifest import verify_folder
from dqtool.formats.qat import QSTATE_FILE, load_qat
from dqtool.model.qmodules import QuantLinear, prepare
from dqtool.qmath.scheme import QuantScheme
from tiny import write_pairs

@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("qat")
    data = write_pairs(root / "data")
    distill(tiny_dir("bart"), root / "student", DistillConfig(encoder_layers=2, decoder_layers=1))
    return root, data


def _args(root, data, out, *extra):
    return ["qat", str(root / "student"), str(out), "--data", str(data), "--max-steps", "6", "--save-steps", "2",
            "--batch-size", "8", "--source-max-length", "32", "--target-max-length", "16", *extra]


def test_qat_writes_a_folder_that_loads_with_fake_quant(setup):
    root, data = setup
    out = root / "q228"
    r = CliRunner().invoke(main, _args(root, data, out, "--wea", "2-2-8", "--act-clip", "pact",
                                       "--eval-steps", "2", "--eval-samples", "4"))
    assert r.exit_code == 0, r.output
    m = verify_folder(out, "qat")
    assert m["wea"] == "2-2-8" and m["steps"] == 6 and m["layer_map"] == {"encoder": [0, 3], "decoder": [3]}
    assert not (root / "q228.partial").exists()
    model, tok = load_qat(out)
    assert isinstance(model.model.encoder.layers[0].fc1, QuantLinear)
    # Clips were calibrated on the first batch (away from their 1.0 placeholder) and are
    # restored from quantizers.safetensors. (That PACT moves them is tested in test_quant.)
    clips = load_file(out / QSTATE_FILE)
    assert all(bool(v) for k, v in clips.items() if k.endswith("calibrated"))
    assert all(float(v) != 1.0 for k, v in clips.items() if k.endswith(".clip"))
    assert torch.equal(model.model.encoder.layers[0].fc1.act.clip.detach(),
                       clips["model.encoder.layers.0.fc1.act.clip"])
    # The plain checkpoint holds float weights that really changed during training.
    plain = AutoModelForSeq2SeqLM.from_pretrained(out)
    start = AutoModelForSeq2SeqLM.from_pretrained(root / "student")
    start = AutoModelForSeq2SeqLM.from_pretrained(root / "student")
    assert not torch.equal(plain.model.encoder.layers[0].fc1.weight, start.model.encoder.layers[0].fc1.weight)
    # load_qat == prepare(plain HF weights) + clips: the same logits.
    prepare(plain, QuantScheme.from_dict(json.loads((out / "quantization.json").read_text())))
    plain.load_state_dict(clips, strict=False)
    batch = tok(["this package provides data"], return_tensors="pt")
    with torch.no_grad():
        a = model(**batch, decoder_input_ids=torch.tensor([[2, 5, 6]])).logits
        b = plain.eval()(**batch, decoder_input_ids=torch.tensor([[2, 5, 6]])).logits
    assert torch.equal(a, b)
    r = CliRunner().invoke(main, ["eval", str(out), "--data", str(data), "--split", "validation", "--max-length", "6"])
    assert r.exit_code == 0 and "(qat)" in r.output


def test_resume_skips_a_checkpoint_killed_while_saving(tmp_path):
    from dqtool.stages.qat import _last_checkpoint

    assert _last_checkpoint(tmp_path / "none") is None
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()  # killed mid-save: weights maybe, trainer state not yet
    (tmp_path / "checkpoint-10" / "model.safetensors").write_bytes(b"x")
    assert _last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def _weights(folder):
    return load_file(Path(folder) / "model.safetensors")


# Run in the killed child: the CLI's qat with one extra Trainer callback that SIGKILLs the
# process right after checkpoint-2 is complete (a test-only hook, no debug switch in dqtool).
_KILL_AFTER_CHECKPOINT_2 = """
import os, signal, sys
from transformers import TrainerCallback
import dqtool.stages.qat as stage

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGKILL)

run = stage.qat
stage.qat = lambda *a, **k: run(*a, callbacks=(KillAfterSave(),), **k)
from dqtool.cli import main
main(sys.argv[1:])
"""


def test_sigkill_then_resume_matches_uninterrupted(setup):
    root, data = setup
    # The killed child must compute like this process (same thread count, same float sums).
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = root / "killed"
    cmd = [sys.executable, "-c", _KILL_AFTER_CHECKPOINT_2, *_args(root, data, killed, "--wea", "4-4-8")]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (root / "killed.partial" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not killed.exists()  # no output that looks whole
    r = CliRunner().invoke(main, _args(root, data, killed, "--wea", "4-4-8"))
    assert r.exit_code == 2 and "--resume" in r.output
    r = CliRunner().invoke(main, _args(root, data, killed, "--wea", "4-4-8", "--resume"))
    assert r.exit_code == 0, r.output
    assert verify_folder(killed, "qat")["resumed_from"].endswith("checkpoint-2")
    full = root / "full"
    r = CliRunner().invoke(main, _args(root, data, full, "--wea", "4-4-8"))
    assert r.exit_code == 0, r.output
    a, b = _weights(killed), _weights(full)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("extra,message", [
    (["--wea", "5-8-8"], "--wea"),
    (["--wea", "4-8-8", "--weight-granularity", "group", "--group-size", "5"], "group_size"),
    (["--loss-task", "0", "--loss-logits", "0", "--loss-hidden", "0", "--loss-attention", "0", "--loss-enc-last", "0"],
     "all loss weights are 0"),
    (["--eval-steps", "3"], "--eval-steps 3 must be >= 1 and divide --save-steps"),
    (["--resume"], "has no checkpoint"),
])
def test_bad_config_is_one_line_error(setup, extra, message):
    root, data = setup
    out = root / "bad"
    r = CliRunner().invoke(main, _args(root, data, out, *extra))
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1 and message in r.output, r.output
    assert not out.exists() and not (root / "bad.partial").exists()


def test_on_too_long_error_and_skip(setup, tmp_path):
    root, data = setup
    long_data = tmp_path / "data"
    long_data.mkdir()
    rows = [json.dumps({"source": "this package provides data", "target": "data"})] * 8
    rows[3] = json.dumps({"source": " ".join(["library"] * 80), "target": "data"})
    (long_data / "train.jsonl").write_text("\n".join(rows) + "\n")
    (long_data / "validation.jsonl").write_text(rows[0] + "\n")
    args = ["qat", str(root / "student"), str(tmp_path / "q"), "--data", str(long_data), "--max-steps", "1",
            "--batch-size", "4", "--source-max-length", "48", "--target-max-length", "16", "--save-steps", "1"]
    r = CliRunner().invoke(main, args + ["--on-too-long", "error"])
    assert r.exit_code == 2 and "train.jsonl, line 4" in r.output and "--on-too-long" in r.output
    assert not (tmp_path / "q").exists()
    r = CliRunner().invoke(main, args + ["--on-too-long", "skip"])
    assert r.exit_code == 0, r.output
    assert "skipped 1 rows" in r.output


def test_teacher_targets_replace_labels_with_the_teachers_outputs(setup, tiny_dir):
    """Sequence-level distillation: each row's labels become the teacher's own output for
    its source (decoder start token dropped, cut after EOS); a QAT run with --targets
    teacher records how many rows it relabelled."""
    from dqtool.runtimes.textgen import pad
    from dqtool.formats.hf import load_seq2seq
    from dqtool.stages.qat import _Seq2SeqRows, teacher_targets

    root, data = setup
    teacher, tok = load_seq2seq(tiny_dir("bart"))
    teacher.eval()
    srcs = ["this package provides data", "a library for parsing files and more files", "tools"]
    rows = _Seq2SeqRows([{"input_ids": tok(s)["input_ids"], "attention_mask": [1] * len(tok(s)["input_ids"]),
                          "labels": [0, 5, 2]} for s in srcs])
    changed = teacher_targets(teacher, rows, 7, tok.pad_token_id, batch_size=2)
    eos = teacher.generation_config.eos_token_id
    for s, row in zip(srcs, rows):
        ids, mask = pad([tok(s)["input_ids"]], tok.pad_token_id, left=False)
        ref = teacher.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False)[0, 1:].tolist()
        assert row["labels"] == (ref[:ref.index(eos) + 1] if eos in ref else ref)
        assert 0 < len(row["labels"]) <= 7
    assert changed == sum(r["labels"] != [0, 5, 2] for r in rows) == 3
    out = root / "qseq"
    r = CliRunner().invoke(main, _args(root, data, out, "--wea", "8-8-8", "--targets", "teacher"))
    assert r.exit_code == 0, r.output
    assert "targets: the teacher's outputs for" in r.output
    m = verify_folder(out, "qat")
    assert m["config"]["targets"] == "teacher" and m["teacher_relabelled_rows"] > 0
    # A cache dir lets a second scheme reuse the first one's generation, with the same labels.
    from dqtool.stages.qat import QATConfig, qat
    from dqtool.qmath.scheme import QuantScheme

    cfg = QATConfig(data=str(data), scheme=QuantScheme.from_wea("2-2-8"), targets="teacher", max_steps=1,
                    save_steps=1, batch_size=4, source_max_length=32, target_max_length=16)
    first = qat(root / "student", root / "qc1", cfg, progress=False, cache_dir=root / "cache")
    cached = list((root / "cache").glob("teacher-targets-*.json"))
    assert len(cached) == 1 and not list((root / "cache").glob("*.tmp"))
    second = qat(root / "student", root / "qc2", cfg, progress=False, cache_dir=root / "cache")
    m1, m2 = verify_folder(first.out_dir, "qat"), verify_folder(second.out_dir, "qat")
    # (1 step of 4 reads 4 rows: only those get the teacher's outputs; the second run generates none.)
    assert m1["teacher_relabelled_rows"] == m2["teacher_relabelled_rows"] == m1["teacher_targets"]["rows"] == 4
    assert m1["teacher_targets"]["generated"] == 4 and m2["teacher_targets"]["generated"] == 0
    assert _weights(first.out_dir).keys() == _weights(second.out_dir).keys()
    assert all(torch.equal(a, b) for a, b in zip(_weights(first.out_dir).values(), _weights(second.out_dir).values()))
    r = CliRunner().invoke(main, _args(root, data, root / "qbad", "--targets", "model"))
    assert r.exit_code == 2 and "--targets" in r.output
