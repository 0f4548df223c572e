"""dqtool convert: packing is exact, the packed runtime equals the fake-quant student, and
the folder is whole, small and tamper-evident."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from dqtool.cli import main
from dqtool.stages.convert import ConvertConfig, convert
from dqtool.formats.packed import LAYOUT_FILE, PACKED_FILE, load_packed
from dqtool.base.errors import DQToolError
from dqtool.formats.manifest import verify_folder, write_manifest
from dqtool.qmath.pack import pack_codes, row_bytes, unpack_codes
from dqtool.model.packed import PackedEmbedding, PackedLinear
from dqtool.formats.qat import load_qat, save_qat
from dqtool.model.qmodules import prepare
from dqtool.qmath.quant import QuantSpec, quantize_weight
from dqtool.qmath.scheme import QuantScheme
from tiny import ARCHS, tiny_model, tiny_tokenizer

SCHEMES = {  # name -> (W-E-A, scheme overrides)
    "2-2-8": ("2-2-8", {}),
    "4-4-8-g8": ("4-4-8", dict(weight_granularity="group", weight_group_size=8)),
    "8-8-8-pact": ("8-8-8", dict(act_clip="pact")),
    "3-4-none": ("3-4-none", {}),
    "8-8-8-asym": ("8-8-8", dict(act_symmetric=False)),
    "8-8-8-asym-tensor": ("8-8-8", dict(act_symmetric=False, act_granularity="tensor")),
    "4-4-4-asym": ("4-4-4", dict(act_symmetric=False)),
    "4-none-8-tensor": ("4-none-8", dict(weight_granularity="tensor")),
}


def make_qat(path: Path, arch: str, name: str, enc: int = 2, dec: int = 2) -> Path:
    """A QAT folder as 'dqtool qat' writes it, without training: a tiny model with its
    quantizers prepared (PACT clips calibrated on one batch)."""
    wea, kw = SCHEMES[name]
    model = tiny_model(arch, enc, dec)
    scheme = QuantScheme.from_wea(wea, **kw)
    prepare(model, scheme)
    if scheme.act_clip == "pact":
        ids = torch.randint(4, 300, (2, 7), generator=torch.Generator().manual_seed(1))
        model.train()
        with torch.no_grad():
            model(input_ids=ids, decoder_input_ids=ids)
        model.eval()
    path.mkdir(parents=True)
    save_qat(model, tiny_tokenizer(), path, scheme)
    write_manifest(path, "qat", inputs={}, config={})
    return path


def _ids(n=3, t=9, seed=0):
    return torch.randint(4, 300, (n, t), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- packing math

@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("n", [1, 3, 5, 7, 8, 9, 13, 31, 33, 100])
def test_pack_unpack_exact_at_odd_widths(bits, n):
    q = 2 ** (bits - 1) - 1
    codes = torch.randint(-q, q + 1, (4, n), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (4, row_bytes(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_layout_is_lsb_first_with_zero_point():
    # 4-bit: codes (1, -1) -> unsigned (9, 7) -> one byte 9 | 7 << 4; 2-bit ternary -> 2 + code.
    assert pack_codes(torch.tensor([[1, -1]], dtype=torch.int8), 4).tolist() == [[9 | 7 << 4]]
    assert pack_codes(torch.tensor([[-1, 0, 1, 1]], dtype=torch.int8), 2).tolist() == [[1 | 2 << 2 | 3 << 4 | 3 << 6]]
    # Padding of a partial last byte holds the zero code and is ignored on unpacking.
    assert pack_codes(torch.tensor([[1]], dtype=torch.int8), 2).tolist() == [[3 | 2 << 2 | 2 << 4 | 2 << 6]]


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="cannot be packed in 4 bits"):
        pack_codes(torch.tensor([[8]], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(torch.zeros(1, 2, dtype=torch.uint8), 4, 5)


@pytest.mark.parametrize("spec", [QuantSpec.weight(2), QuantSpec.weight(3, "tensor"), QuantSpec.weight(4, "group", 4),
                                  QuantSpec.weight(8, "row")], ids=lambda s: f"{s.bits}-{s.granularity}")
def test_packed_linear_equals_fake_quant_linear_bit_for_bit(spec):
    from dqtool.model.qmodules import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 5)  # 12 columns: 2- and 3-bit rows end mid-byte
    q = QuantLinear(lin, spec, QuantSpec.activation(8))
    codes, scale = quantize_weight(lin.weight, spec)
    scale = scale if spec.granularity == "tensor" else scale.squeeze(-1)
    p = PackedLinear(12, 5, spec, pack_codes(codes, spec.bits), scale, lin.bias.detach().clone(), q.act)
    x = torch.randn(3, 4, 12)
    assert torch.equal(p(x), q(x))


# --------------------------------------------------------------------------- parity

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_packed_model_matches_qat_model_bit_for_bit(tmp_path, arch, scheme):
    qat_dir = make_qat(tmp_path / "qat", arch, scheme)
    r = convert(qat_dir, tmp_path / "packed", ConvertConfig(float_dtype="float32", check_samples=2, check_length=6))
    assert r.check["bit_exact"] and r.check["tokens_equal"]
    ref, _ = load_qat(qat_dir)
    model, tok = load_packed(tmp_path / "packed")
    assert tok is not None
    ids, dec = _ids(), _ids(3, 5, seed=1)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=dec).logits,
                           ref(input_ids=ids, decoder_input_ids=dec).logits)
    gen = dict(max_new_tokens=8, do_sample=False, num_beams=1)
    assert torch.equal(model.generate(input_ids=ids, **gen), ref.generate(input_ids=ids, **gen))
    # Beam search runs on the packed model too (cache reordering of packed modules).
    assert model.generate(input_ids=ids, max_new_tokens=4, num_beams=3).shape[0] == 3


def test_packed_folder_holds_no_float_copy_of_a_quantized_weight(tmp_path):
    qat_dir = make_qat(tmp_path / "qat", "bart", "2-2-8")
    convert(qat_dir, tmp_path / "packed", ConvertConfig(float_dtype="float32", check_samples=1))
    doc = json.loads((tmp_path / "packed" / LAYOUT_FILE).read_text())
    layout = doc["layout"]
    ref, _ = load_qat(qat_dir)
    quantized = {f"{name}.weight" for name in layout} | {"model.encoder.embed_tokens.weight",
                                                        "model.decoder.embed_tokens.weight", "lm_head.weight"}
    qshapes = {tuple(e["shape"]) for e in layout.values() if e["kind"] != "tied"}
    with safe_open(str(tmp_path / "packed" / PACKED_FILE), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            assert k not in quantized, k
            if t.is_floating_point():
                # No float tensor has a quantized weight's shape (only scales, biases, norms, positions).
                assert tuple(t.shape) not in qshapes, (k, tuple(t.shape))
            else:
                assert t.dtype == torch.uint8 and k.endswith(".qweight")
    # Every quantized Linear and the embedding is there as qweight + scale; lm_head is tied, stored once.
    assert layout["lm_head"] == {"kind": "tied", "to": "model.shared"}
    assert len([e for e in layout.values() if e["kind"] == "linear"]) == 2 * 6 + 2 * 10


def test_packed_modules_replace_every_quantized_module(tmp_path):
    qat_dir = make_qat(tmp_path / "qat", "t5v1_1", "4-4-8-g8")
    convert(qat_dir, tmp_path / "packed", ConvertConfig(float_dtype="float32", check_samples=1))
    model, _ = load_packed(tmp_path / "packed")
    assert isinstance(model.shared, PackedEmbedding) and model.encoder.embed_tokens is model.shared
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.tied_to is None  # v1.1: untied, own codes
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert not any(n.endswith(".weight") and ("DenseReluDense" in n or "SelfAttention.q" in n)
                   for n, _ in model.named_parameters())


def test_footprint_within_5_percent_of_bit_bound_and_smaller_than_teacher(tmp_path):
    # A wider model than the other tests so the safetensors header is not most of the file.
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=1024, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512,
                     max_position_embeddings=64)
    teacher = tmp_path / "teacher"
    BartForConditionalGeneration(cfg).save_pretrained(teacher)
    sizes = {}
    for wea in ("8-8-8", "4-4-8", "2-2-8"):
        model = prepare(BartForConditionalGeneration(cfg).eval(), QuantScheme.from_wea(wea))
        q = tmp_path / f"qat-{wea}"
        q.mkdir()
        save_qat(model, tiny_tokenizer(), q, model.dqtool_scheme)
        write_manifest(q, "qat", inputs={}, config={})
        r = convert(q, tmp_path / f"p-{wea}", ConvertConfig(float_dtype="float32", teacher=str(teacher),
                                                           check_samples=1))
        f = r.footprint
        assert f["packed_file_bytes"] >= f["bound"]["total"]
        assert f["over_bound"] < 0.05, f
        sizes[wea] = f["packed_file_bytes"]
        assert f["teacher_fp32_bytes"] == sum(p.numel() for p in BartForConditionalGeneration(cfg).parameters()) * 4 \
            + cfg.vocab_size * 4  # + final_logits_bias buffer
        assert f["ratio_to_teacher"] == round(f["teacher_fp32_bytes"] / f["packed_file_bytes"], 2)
    assert sizes["2-2-8"] < sizes["4-4-8"] < sizes["8-8-8"]


def test_auto_float_dtype_records_its_check(tmp_path):
    qat_dir = make_qat(tmp_path / "qat", "bart", "4-none-8-tensor")
    r = convert(qat_dir, tmp_path / "packed", ConvertConfig(check_samples=2, check_length=6))
    m = verify_folder(tmp_path / "packed", "convert")
    assert r.float_dtype in ("float16", "float32") and m["float_dtype"] == r.float_dtype
    fp16 = m["checks_tried"]["float16"]
    assert (r.float_dtype == "float16") == (fp16["tokens_equal"] and fp16["rel"] <= 1e-3)
    with safe_open(str(tmp_path / "packed" / PACKED_FILE), "pt") as f:
        assert f.get_tensor("model.encoder.layernorm_embedding.weight").dtype == getattr(torch, r.float_dtype)
        assert f.get_tensor("model.encoder.layers.0.fc1.scale").dtype == torch.float32  # grids keep their dtype
    # A forced float16 stays within a loose tolerance of the QAT model (stated in the manifest).
    r16 = convert(qat_dir, tmp_path / "p16", ConvertConfig(float_dtype="float16", check_samples=2, check_length=6))
    assert r16.float_dtype == "float16" and r16.check["rel"] < 0.05


# --------------------------------------------------------------------------- CLI and bad input

def test_cli_convert_then_eval_packed(tmp_path):
    qat_dir = make_qat(tmp_path / "qat", "bart", "2-2-8")
    out = tmp_path / "packed"
    r = CliRunner().invoke(main, ["convert", str(qat_dir), str(out), "--float-dtype", "float32",
                                  "--check-samples", "2"])
    assert r.exit_code == 0, r.output
    assert "bit bound" in r.output and "bit-exact" in r.output and "identical" in r.output
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps({"source": f"the cat sat on mat {i}", "target": "a cat"}) + "\n"
                                             for i in range(4)))
    outs = {}
    for name, folder in (("packed", out), ("qat", qat_dir)):
        res = tmp_path / f"{name}.json"
        r = CliRunner().invoke(main, ["eval", str(folder), "--data", str(data), "--max-length", "6",
                                      "--out", str(res)])
        assert r.exit_code == 0 and f"({name})" in r.output, r.output
        outs[name] = json.loads(res.read_text())
    assert outs["packed"]["predictions"] == outs["qat"]["predictions"]
    r = CliRunner().invoke(main, ["convert", str(qat_dir), str(out)])
    assert r.exit_code == 2 and "--force" in r.output


def test_truncated_or_tampered_packed_file_is_detected(tmp_path):
    qat_dir = make_qat(tmp_path / "qat", "bart", "2-2-8")
    out = tmp_path / "packed"
    convert(qat_dir, out, ConvertConfig(float_dtype="float32", check_samples=1))
    f = out / PACKED_FILE
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(DQToolError, match="does not match its hash"):
        load_packed(out)
    f.write_bytes(bytes(data[: len(data) // 2]))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"source": "the cat", "target": "a cat"}) + "\n")
    r = CliRunner().invoke(main, ["eval", str(out), "--data", str(rows)])
    assert r.exit_code == 2 and "truncated or modified" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["missing", "not-qat", "tampered-qat", "bad-dtype"])
def test_convert_bad_input_is_one_line_error_and_writes_nothing(tmp_path, case):
    qat_dir = make_qat(tmp_path / "qat", "bart", "2-2-8")
    args = ["convert", str(qat_dir), str(tmp_path / "out")]
    if case == "missing":
        args[1] = str(tmp_path / "nope")
        msg = "not found"
    elif case == "not-qat":
        (qat_dir / "quantization.json").unlink()
        msg = "quantization.json"
    elif case == "tampered-qat":
        (qat_dir / "model.safetensors").write_bytes(b"garbage")
        msg = "does not match its hash"
    else:
        args += ["--float-dtype", "int4"]
        msg = "int4"
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert msg in r.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
