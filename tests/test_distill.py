import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from dqtool.cli import main
from dqtool.stages.distill import DistillConfig, distill, teacher_key
from dqtool.formats.manifest import MANIFEST_NAME, sha256_file, verify_folder
from dqtool.model.registry import spec_for
from tiny import ARCHS


def _load(path):
    return AutoModelForSeq2SeqLM.from_pretrained(path).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_student_layers_equal_teacher_layers(arch, tiny_dir, tmp_path):
    teacher_dir = tiny_dir(arch)
    res = distill(teacher_dir, tmp_path / "s", DistillConfig(encoder_layers=2, decoder_layers=1))
    assert res.encoder_map == [0, 3] and res.decoder_map == [3]   # 1-layer decoder: the teacher's last
    teacher, student = _load(teacher_dir), _load(tmp_path / "s")
    spec = spec_for(teacher.config)
    maps = {"encoder": res.encoder_map, "decoder": res.decoder_map}
    t_state, s_state = teacher.state_dict(), student.state_dict()
    in_layers = 0
    for key, value in s_state.items():
        src = teacher_key(key, spec, maps)
        assert torch.equal(value, t_state[src]), f"{key} != teacher {src}"
        in_layers += src != key
    assert in_layers > 0
    # The student really is shallower, and every teacher layer it names is distinct data.
    assert student.config.to_dict()[spec.encoder.num_layers_attr] == 2
    assert student.config.to_dict()[spec.decoder.num_layers_attr] == 1
    assert res.student_params < res.teacher_params


def test_layer_copy_follows_an_explicit_map(tiny_dir, tmp_path):
    teacher_dir = tiny_dir("bart")
    distill(teacher_dir, tmp_path / "s", DistillConfig(encoder_map=(3, 1), decoder_map=(2,), encoder_layers=2,
                                                        decoder_layers=1))
    t, s = _load(teacher_dir), _load(tmp_path / "s")
    assert torch.equal(s.model.encoder.layers[0].fc1.weight, t.model.encoder.layers[3].fc1.weight)
    assert torch.equal(s.model.encoder.layers[1].self_attn.q_proj.bias, t.model.encoder.layers[1].self_attn.q_proj.bias)
    assert torch.equal(s.model.decoder.layers[0].encoder_attn.k_proj.weight, t.model.decoder.layers[2].encoder_attn.k_proj.weight)
    assert not torch.equal(s.model.decoder.layers[0].fc2.weight, t.model.decoder.layers[0].fc2.weight)


def test_t5_relative_bias_comes_from_teacher_layer0(tiny_dir, tmp_path):
    teacher_dir = tiny_dir("t5")
    distill(teacher_dir, tmp_path / "s", DistillConfig(encoder_map=(2,), decoder_map=(3, 1), encoder_layers=1,
                                                        decoder_layers=2))
    t, s = _load(teacher_dir), _load(tmp_path / "s")
    rel = "layer.0.SelfAttention.relative_attention_bias.weight"
    assert torch.equal(s.encoder.block[0].get_parameter(rel), t.encoder.block[0].get_parameter(rel))
    assert torch.equal(s.encoder.block[0].layer[0].SelfAttention.q.weight, t.encoder.block[2].layer[0].SelfAttention.q.weight)
    assert torch.equal(s.decoder.block[1].layer[2].DenseReluDense.wo.weight, t.decoder.block[1].layer[2].DenseReluDense.wo.weight)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_depth_student_reproduces_teacher_logits_and_generates(arch, tiny_dir, tmp_path):
    teacher_dir = tiny_dir(arch)
    distill(teacher_dir, tmp_path / "s", DistillConfig())
    teacher, student = _load(teacher_dir), _load(tmp_path / "s")
    tok = AutoTokenizer.from_pretrained(tmp_path / "s")
    batch = tok(["the cat sat on the mat", "a library"], return_tensors="pt", padding=True)
    dec = torch.tensor([[1, 5, 9, 4], [1, 7, 7, 2]])
    with torch.no_grad():
        lt = teacher(**batch, decoder_input_ids=dec).logits
        ls = student(**batch, decoder_input_ids=dec).logits
    assert torch.equal(lt, ls)
    with torch.no_grad():
        g_t = teacher.generate(**batch, max_new_tokens=6, num_beams=1, do_sample=False)
        g_s = student.generate(**batch, max_new_tokens=6, num_beams=1, do_sample=False)
    assert g_s.shape[0] == 2 and g_s.shape[1] > 1
    assert torch.equal(g_t, g_s)


def test_manifest_records_teacher_hash_map_and_config(tiny_dir, tmp_path):
    teacher_dir = tiny_dir("bart")
    distill(teacher_dir, tmp_path / "s", DistillConfig(encoder_layers=3, decoder_layers=1, map_scheme="dqbart"))
    m = verify_folder(tmp_path / "s", "distill")
    assert m["layer_map"] == {"encoder": [0, 2, 3], "decoder": [3]}  # dqbart: 1-layer student keeps the last
    assert m["inputs"]["teacher"]["weights_sha256"]["model.safetensors"] == sha256_file(teacher_dir / "model.safetensors")
    assert m["config"]["map_scheme"] == "dqbart"
    assert m["architecture"] == "bart"
    assert "model.safetensors" in m["files"] and "tokenizer.json" in m["files"]
    assert (tmp_path / "s" / "generation_config.json").is_file()


def _cli_distill(tiny_dir, out, *layers):
    return CliRunner().invoke(main, ["distill", str(tiny_dir("bart")), str(out), *layers])


def test_cli_distill_prints_the_layer_map(tiny_dir, tmp_path):
    r = _cli_distill(tiny_dir, tmp_path / "s", "--encoder-layers", "2", "--decoder-layers", "2")
    assert r.exit_code == 0, r.output
    assert "[0, 3]" in r.output


def test_cli_distill_force_replaces_out_and_leaves_no_temp_folders(tiny_dir, tmp_path):
    out = tmp_path / "s"
    assert _cli_distill(tiny_dir, out, "--encoder-layers", "2", "--decoder-layers", "2").exit_code == 0
    first = sha256_file(out / "model.safetensors")
    r = _cli_distill(tiny_dir, out, "--encoder-layers", "1", "--force")
    assert r.exit_code == 0, r.output
    assert sha256_file(out / "model.safetensors") != first
    assert json.loads((out / MANIFEST_NAME).read_text())["layer_map"]["encoder"] == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp or backup folders left


def _bad_cases(tiny_dir, tmp_path):
    teacher = str(tiny_dir("bart"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in Path(teacher).iterdir():
        data = f.read_bytes()
        (corrupt / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20)).save_pretrained(gpt2)
    existing = tmp_path / "exists"
    existing.mkdir()
    return {
        "too many layers": ([teacher, "--encoder-layers", "5"], "more than the teacher's 4 encoder layers"),
        "map out of range": ([teacher, "--decoder-map", "0,7"], "decoder map index 7 is out of range"),
        "missing teacher": ([str(tmp_path / "nope")], "not found"),
        "hub id offline": (["facebook/bart-base-does-not-exist"], "not found"),
        "corrupt teacher": ([str(corrupt)], "corrupt"),
        "unsupported arch": ([str(gpt2)], "unsupported architecture 'gpt2'"),
        "bad map text": ([teacher, "--encoder-map", "0,x"], "not a comma-separated list"),
        "existing out": ([teacher], "--force"),
    }, existing


@pytest.mark.parametrize("case", ["too many layers", "map out of range", "missing teacher", "hub id offline",
                                  "corrupt teacher", "unsupported arch", "bad map text", "existing out"])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(case, tiny_dir, tmp_path):
    cases, existing = _bad_cases(tiny_dir, tmp_path)
    args, expected = cases[case]
    out = existing if case == "existing out" else tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(main, ["distill", args[0], str(out), *args[1:]])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert expected in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp folder
    if case == "existing out":
        assert list(existing.iterdir()) == []
