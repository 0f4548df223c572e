"""Learned 2-bit weight quantizers (seq, lsq, tbt) through the pipeline: QAT modules and their
saved ranges, packed == QAT logits bit for bit, ONNX parity with the packed runtime."""

import json
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file

from dqtool.compress import recipe_from_dict
from dqtool.formats.onnx import graph_folder
from dqtool.formats.packed import LAYOUT_FILE, PACKED_FILE, load_packed
from dqtool.stages.convert import ConvertConfig, convert
from dqtool.base.errors import DQToolError
from dqtool.stages.export import DECODER_FILE, ENCODER_FILE, ExportConfig, _all_graphs, export
from dqtool.formats.manifest import write_manifest
from dqtool.qmath.pack import base3_row_bytes, row_bytes
from dqtool.formats.qat import QSTATE_FILE, load_qat, save_qat
from dqtool.model.qmodules import QuantLinear, prepare, quantizer_state
from dqtool.qmath.quant import init_weight_clip
from dqtool.qmath.scheme import QuantScheme
from tiny import tiny_model, tiny_tokenizer

SCHEMES = {  # name -> (W-E-A, weight method)
    "seq": ("2-2-8", "seq"),
    "lsq2": ("2-2-8", "lsq"),
    "tbt": ("2-2-8", "tbt"),
    "lsq4": ("4-4-8", "lsq"),
}


def _ids(n=3, t=9, seed=0):
    return torch.randint(4, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def _trained_qat(path: Path, arch: str, name: str, enc: int = 2, dec: int = 2, **scheme_kw) -> Path:
    """A QAT folder whose learned weight ranges moved away from their start (as after training),
    so a reload that re-initialised them could not reproduce the logits."""
    wea, method = SCHEMES[name]
    model = tiny_model(arch, enc, dec)
    scheme = QuantScheme.from_wea(wea, weight_method=method, **scheme_kw)
    prepare(model, scheme)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, QuantLinear) and mod.weight_clip is not None:
                mod.weight_clip.mul_(0.6 + 0.5 * torch.rand(mod.weight_clip.shape, generator=g))
    path.mkdir(parents=True)
    save_qat(model.eval(), tiny_tokenizer(), path, scheme)
    write_manifest(path, "qat", inputs={}, config={})
    return path


# --------------------------------------------------------------------------- QAT modules

@pytest.mark.parametrize("name", ["seq", "lsq2", "lsq4"])
def test_learned_weight_ranges_are_parameters_that_train(name):
    wea, method = SCHEMES[name]
    model = tiny_model("bart", 1, 1)
    prepare(model, QuantScheme.from_wea(wea, weight_method=method))
    fc1 = model.model.encoder.layers[0].fc1
    assert fc1.weight_clip.shape == (fc1.out_features, 1)
    assert torch.equal(fc1.weight_clip.detach(), init_weight_clip(fc1.weight, fc1.wspec))
    assert any(p is fc1.weight_clip for p in model.parameters())
    # the tied lm_head / embedding keep the embedding's (default) method and learn no range
    assert model.lm_head.weight_clip is None
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    clips = [m.weight_clip for m in model.modules() if isinstance(m, QuantLinear) and m.weight_clip is not None]
    assert clips and all(c.grad is not None and torch.isfinite(c.grad).all() for c in clips)
    assert sum(float(c.grad.abs().sum()) for c in clips) > 0
    assert all(k.endswith(".weight_clip") for k in quantizer_state(model))
    assert len(quantizer_state(model)) == len(clips)


def test_tbt_and_default_methods_learn_nothing():
    for method in ("tbt", None):
        model = tiny_model("bart", 1, 1)
        prepare(model, QuantScheme.from_wea("2-2-8", weight_method=method))
        assert quantizer_state(model) == {}


def test_saved_ranges_reload_bit_for_bit(tmp_path):
    q = _trained_qat(tmp_path / "qat", "bart", "seq")
    saved = load_file(str(q / QSTATE_FILE))
    assert saved and all(k.endswith(".weight_clip") for k in saved)
    assert not any(k.endswith("weight_clip") for k in load_file(str(q / "model.safetensors")))
    model, _ = load_qat(q)
    for k, v in saved.items():
        assert torch.equal(model.get_parameter(k).detach(), v)


# --------------------------------------------------------------------------- packed == QAT

@pytest.mark.parametrize("arch,name", [("bart", "seq"), ("t5", "seq"), ("t5v1_1", "lsq2"), ("bart", "tbt"),
                                       ("bart", "lsq4")])
def test_packed_equals_qat_bit_for_bit(tmp_path, arch, name):
    q = _trained_qat(tmp_path / "qat", arch, name)
    r = convert(q, tmp_path / "packed", ConvertConfig(float_dtype="float32", check_samples=2))
    assert r.check["bit_exact"] and r.check["tokens_equal"]
    qat_model, _ = load_qat(q)
    packed_model, _ = load_packed(tmp_path / "packed")
    ids = _ids()
    with torch.no_grad():
        a = qat_model(input_ids=ids, decoder_input_ids=ids).logits
        b = packed_model(input_ids=ids, decoder_input_ids=ids).logits
    assert torch.equal(a, b)
    doc = json.loads((tmp_path / "packed" / LAYOUT_FILE).read_text())
    linears = [e for e in doc["layout"].values() if e["kind"] == "linear"]
    bits = int(SCHEMES[name][0][0])
    assert linears and all(e["method"] == SCHEMES[name][1] and e["bits"] == bits for e in linears)
    tensors = load_file(str(tmp_path / "packed" / PACKED_FILE))
    for key, e in doc["layout"].items():
        if e["kind"] == "tied":
            continue
        nbytes = base3_row_bytes(e["shape"][1]) if e.get("storage") == "base3" else row_bytes(e["shape"][1], e["bits"])
        assert tensors[f"{key}.qweight"].shape == (e["shape"][0], nbytes)  # true bits (ternary codes: base 3)
        assert e.get("storage", "2bit") == ("base3" if e["bits"] == 2 and e["method"] != "seq" else "2bit")
        if e["method"] == "seq":
            assert e["codes"] == "odd" and e["zero_point"] == 1.5
    # the packed folder keeps no learned weight range (the scales hold them)
    assert doc["quantizers"] is None and not (tmp_path / "packed" / QSTATE_FILE).exists()


def test_seq_codes_use_all_four_levels_after_packing(tmp_path):
    q = _trained_qat(tmp_path / "qat", "bart", "seq")
    convert(q, tmp_path / "packed", ConvertConfig(float_dtype="float32", check_samples=1))
    model, _ = load_packed(tmp_path / "packed")
    w = model.model.encoder.layers[0].fc1.weight()
    scale = model.model.encoder.layers[0].fc1.scale
    codes = torch.round(w / scale.unsqueeze(-1))
    assert set(codes.unique().tolist()) == {-3.0, -1.0, 1.0, 3.0}
    assert all(row.unique().numel() <= 4 for row in w)


def test_pact_activations_and_learned_weights_together(tmp_path):
    q = _trained_qat(tmp_path / "qat", "bart", "seq", act_clip="pact")
    convert(q, tmp_path / "packed", ConvertConfig(float_dtype="float32", check_samples=1))
    kept = load_file(str(tmp_path / "packed" / QSTATE_FILE))
    assert kept and not any(k.endswith("weight_clip") for k in kept)
    assert set(kept) == {k for k in load_file(str(q / QSTATE_FILE)) if not k.endswith("weight_clip")}


# --------------------------------------------------------------------------- ONNX

def _ops(folder: Path) -> dict[str, list]:
    out = {}
    for f in (ENCODER_FILE, DECODER_FILE):
        m = onnx.load(str(graph_folder(folder) / f), load_external_data=False)
        for g in _all_graphs(m.graph):
            for n in g.node:
                out.setdefault(n.op_type, []).append(n)
    return out


@pytest.mark.parametrize("name,matmul", [("seq", "integer"), ("seq", "nbits"), ("lsq2", "nbits")])
def test_onnx_matches_packed_runtime(tmp_path, name, matmul):
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    q = _trained_qat(tmp_path / "qat", "bart", name)
    convert(q, tmp_path / "packed", ConvertConfig(float_dtype="float32", check_samples=1))
    r = export(tmp_path / "packed", tmp_path / "onnx", ExportConfig(matmul=matmul))
    assert r.check["argmax_equal"] and r.check["decoder_logits_rel"] <= r.check["rtol"]
    ops = _ops(tmp_path / "onnx")
    if matmul == "nbits":
        nodes = ops["MatMulNBits"]
        # seq: the float zero point input (1.5); ternary codes (and the lm_head tied to the
        # ternary embedding): ORT's default zero point (input 3 empty); the bias is input 5
        assert {bool(n.input[3]) for n in nodes} == ({True, False} if name == "seq" else {False})
        assert all(len(n.input) == 6 and n.input[5] for n in nodes)
    else:
        assert "MatMulInteger" in ops or "MatMulIntegerToFloat" in ops
        # integer path: exact codes and scales; only float rounding outside the integer matmul
        assert r.check["encoder_rel"] < 1e-3
    ref, _ = load_packed(tmp_path / "packed")
    ids = _ids(3, 9, seed=5)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    gen = dict(max_new_tokens=8, do_sample=False, num_beams=1)
    ort_model = ORTModelForSeq2SeqLM.from_pretrained(tmp_path / "onnx")
    assert ort_model.generate(input_ids=ids, attention_mask=mask, **gen).tolist() == \
        ref.generate(input_ids=ids, attention_mask=mask, **gen).tolist()


def test_seq_nbits_weights_are_the_trained_ones_bit_for_bit(tmp_path):
    """MatMulNBits with the float zero point 1.5 and scale 2s dequantizes the stored 2-bit
    codes to exactly the trained seq weights (identity input, accuracy level 0)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from dqtool.qmath.pack import pack_odd_codes
    from dqtool.qmath.quant import QuantSpec, dequantize, quantize_weight

    spec = QuantSpec.weight(2, "row", method="seq")
    k, n, block = 64, 48, 32
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.07
    clip = init_weight_clip(w, spec) * (0.5 + torch.rand(n, 1, generator=torch.Generator().manual_seed(1)))
    codes, scale = quantize_weight(w, spec, clip)
    trained = dequantize(codes, scale, spec).numpy()
    b = pack_odd_codes(codes, 2).numpy().reshape(n, k // block, block * 2 // 8)
    s = np.repeat(2 * scale.numpy(), k // block, axis=1).astype(np.float32)
    zp = np.full((n, k // block), 1.5, np.float32)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S"), numpy_helper.from_array(zp, "Z")]
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=2,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"A": np.eye(k, dtype=np.float32)})[0]
    assert np.array_equal(y, trained.T)


# --------------------------------------------------------------------------- scheme / recipe

def test_recipe_weight_method_per_bit_width():
    base = {"teacher": "t", "data": "d", "work": "w", "schemes": ["2-2-8", "8-8-8"]}
    r = recipe_from_dict({**base, "qat": {"weight_method": {2: "seq"}}}, check_paths=False)
    assert r.qats["2-2-8"].scheme.weight_spec().method == "seq"
    assert r.qats["8-8-8"].scheme.weight_spec().method == "minmax"
    r = recipe_from_dict({**base, "qat": {"weight_method": "lsq"}}, check_paths=False)
    assert {q.scheme.weight_spec().method for q in r.qats.values()} == {"lsq"}
    with pytest.raises(DQToolError, match="method 'seq' needs bits 2, 3 or 4"):
        recipe_from_dict({**base, "qat": {"weight_method": "seq"}}, check_paths=False)
    with pytest.raises(DQToolError, match="weight_method"):
        recipe_from_dict({**base, "qat": {"weight_method": ["seq"]}}, check_paths=False)


def test_scheme_round_trips_weight_method():
    s = QuantScheme.from_wea("2-2-8", weight_method="seq")
    assert QuantScheme.from_dict(json.loads(s.dumps())) == s
    with pytest.raises(DQToolError, match="method 'tbt' needs bits 2"):
        QuantScheme.from_wea("4-4-8", weight_method="tbt")


def test_cli_weight_method_reaches_the_scheme(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import dqtool.stages.qat
    from dqtool.cli import main

    seen = {}

    def fake_qat(student, out, cfg, **kw):
        seen["scheme"] = cfg.scheme
        raise DQToolError("stop here")

    monkeypatch.setattr(dqtool.stages.qat, "qat", fake_qat)
    r = CliRunner().invoke(main, ["qat", "s", str(tmp_path / "o"), "--data", "d", "--wea", "2-2-8",
                                  "--weight-method", "seq"])
    assert r.exit_code == 2 and "stop here" in r.output
    assert seen["scheme"].weight_spec().method == "seq"
    r = CliRunner().invoke(main, ["qat", "s", str(tmp_path / "o"), "--data", "d", "--wea", "8-8-8",
                                  "--weight-method", "seq"])
    assert r.exit_code == 2 and "needs bits 2, 3 or 4" in r.output
