"""Activation granularity ``block``: QAT trains with ONNX Runtime MatMulNBits' own int8 input
quantizer (accuracy_level 4), so the exported decoder Linears are the one MatMulNBits node
each, and the export generates the packed runtime's tokens."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dqtool.formats.packed import load_packed
from dqtool.base.errors import DQToolError
from dqtool.formats.onnx import graph_folder
from dqtool.stages.export import DECODER_FILE, ENCODER_FILE, ExportConfig, _all_graphs, export
from dqtool.qmath.quant import QuantSpec, fake_quant, fake_quant_activation, quantize_activation_block
from dqtool.qmath.scheme import QuantScheme
from tiny import pack_tiny, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def mlas_quantize_a(x: np.ndarray, block: int) -> np.ndarray:
    """numpy re-implementation of MLAS QuantizeARow_CompInt8 (sqnbitgemm_kernel_avx512.cpp):
    per block, scale = max|a| / 127.f, inverse = 127.f / max|a| (0 if max is 0), codes =
    int8(round-to-nearest-even(a * inverse)); returns the values codes * scale in float32."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty_like(x)
    rows = x.reshape(-1, x.shape[-1])
    flat = out.reshape(-1, x.shape[-1])
    for r in range(rows.shape[0]):
        for k in range(0, rows.shape[1], block):
            a = rows[r, k:k + block]
            m = np.float32(np.max(np.abs(a)))
            scale = np.float32(m / np.float32(127.0))
            inv = np.float32(np.float32(127.0) / m) if m != 0 else np.float32(0.0)
            q = np.rint(np.multiply(a, inv, dtype=np.float32)).astype(np.int32).astype(np.int8)  # half to even
            flat[r, k:k + block] = np.multiply(q.astype(np.float32), scale, dtype=np.float32)
    return out


@pytest.mark.parametrize("block", [16, 32, 64])
def test_block_fake_quant_equals_mlas_bit_for_bit(block):
    g = torch.Generator().manual_seed(block)
    x = torch.randn(3, 5, 4 * block, generator=g) * torch.rand(3, 5, 1, generator=g) * 10
    x[0, 0, :block] = 0.0                                                # an all-zero block
    x[0, 1, :block] = torch.arange(block) - block / 2                    # max 8..32: ties after * 127/m
    x[0, 2, :block] = torch.linspace(-127, 127, block)
    x[0, 2, 0] = 127.0
    x[0, 2, 1:5] = torch.tensor([2.5, -3.5, 0.5, -0.5])                  # exact .5 ties (inv = 1)
    spec = QuantSpec.activation(8, granularity="block", block_size=block)
    got = fake_quant(x, spec)
    want = mlas_quantize_a(x.numpy(), block)
    assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32))
    codes, _ = quantize_activation_block(x, spec)
    assert codes[0, 2, 1:5].tolist() == [2, -4, 0, 0]                    # half to even
    assert codes.abs().max() == 127
    # Not the per-token grid: a block's range is its own.
    assert not torch.equal(got, fake_quant_activation(x, 8))
    # Straight-through gradient; bf16 inputs are quantized in float32 and returned as bf16.
    xg = x.clone().requires_grad_(True)
    fake_quant(xg, spec).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))
    xb = x.to(torch.bfloat16)
    assert fake_quant(xb, spec).dtype == torch.bfloat16


def test_block_quantizer_matches_onnxruntime_matmulnbits():
    """ORT's own kernel (MatMulNBits, accuracy_level 4) on an identity weight returns the input
    as it quantized it: within float-sum noise of the block quantizer, a step away from the float
    input. 2-bit weights in blocks of 16 compute in float (kernel_int8_compute says so)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from dqtool.qmath.onnx_ops import kernel_int8_compute

    k = 128
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, k)) * rng.uniform(0.1, 5, (4, 1))).astype(np.float32)
    for bits, block in [(2, 32), (2, 64), (4, 16), (4, 32), (8, 32), (2, 16)]:
        zp = 1 << (bits - 1)
        codes = np.full((k, k), zp, np.int32)
        codes[np.arange(k), np.arange(k)] = zp + 1                     # identity, scale 1
        per = 8 // bits
        packed = (codes.reshape(k, k // per, per) << (np.arange(per) * bits)).sum(-1).astype(np.uint8)
        node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=k,
                                bits=bits, block_size=block, accuracy_level=4)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", k])],
            [numpy_helper.from_array(packed.reshape(k, k // block, block * bits // 8), "B"),
             numpy_helper.from_array(np.ones((k, k // block), np.float32), "S")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                        helper.make_opsetid("com.microsoft", 1)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {"A": x})[0]
        step = np.abs(x).max(-1, keepdims=True) / 127
        want = mlas_quantize_a(x, block) if kernel_int8_compute(bits, block) else x
        assert np.abs(y - want).max() / step.min() < 0.05, (bits, block)
        if kernel_int8_compute(bits, block):
            assert np.abs(y - x).max() / step.min() > 0.3, (bits, block)


def test_scheme_block_validation():
    s = QuantScheme.from_wea("2-2-8", act_granularity="block")
    assert s.activation_spec().group_size == 32 and s.attention_activation_spec().granularity == "token"
    assert QuantScheme.from_wea("4-8-8", weight_granularity="group", weight_group_size=64,
                                act_granularity="block").activation_spec().group_size == 64
    assert QuantScheme.from_dict(s.to_dict()) == s
    for kw, msg in [(dict(act_granularity="block", act_block_size=24), "not a MatMulNBits block size"),
                    (dict(act_block_size=32), "only used with act_granularity 'block'"),
                    (dict(act_granularity="block", act_clip="pact"), "choose act_clip dynamic"),
                    (dict(act_granularity="block", act_symmetric=False), "symmetric"),
                    (dict(act_granularity="block", weight_granularity="group", weight_group_size=16,
                          act_block_size=32), "differs from weight_group_size")]:
        with pytest.raises(DQToolError, match=msg):
            QuantScheme.from_wea("2-2-8", **kw)
    with pytest.raises(DQToolError, match="A bits 8"):
        QuantScheme.from_wea("2-2-4", act_granularity="block")


def _packed(root: Path, wea: str, d_model: int, block: int) -> Path:
    """A tiny BART (d_model ``d_model``) prepared with block activations, saved as QAT, converted."""
    model = tiny_model("bart", 2, 2, d_model=d_model, encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model)
    return pack_tiny(root, model, QuantScheme.from_wea(wea, act_granularity="block", act_block_size=block))


QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "Round"}


def _decoder_nodes(folder: Path):
    m = onnx.load(str(graph_folder(folder) / DECODER_FILE), load_external_data=False)
    return [n for g in _all_graphs(m.graph) for n in g.node]


@pytest.mark.parametrize("wea,d_model,block", [("2-2-8", 32, 32), ("4-8-8", 16, 16)])
def test_block_export_is_only_matmulnbits_and_generates_packed_tokens(tmp_path, wea, d_model, block):
    from dqtool.runtimes.ort import load_onnx

    packed = _packed(tmp_path, wea, d_model, block)
    r = export(packed, tmp_path / "onnx", ExportConfig())
    assert r.paths == {"integer": 0, "nbits": r.paths["nbits"]} and r.paths["nbits"] > 0
    nodes = _decoder_nodes(tmp_path / "onnx")
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert nbits and all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    assert all({a.name: a.i for a in n.attribute}["block_size"] == block for n in nbits)
    # No quantize ops anywhere in the graph (the attention inputs' per-token fake quant is traced
    # as Round; block schemes here leave no other Round), and each MatMulNBits reads its input
    # straight from a float producer that is no Mul-by-scale of a rounding.
    producers = {o: n for n in nodes for o in n.output}
    for n in nbits:
        src = producers.get(n.input[0])
        assert src is None or src.op_type not in QUANT_OPS | {"Mul"} or \
            producers.get(src.input[0]) is None or producers[src.input[0]].op_type != "Round"
    assert not {n.op_type for n in nodes} & (QUANT_OPS - {"Round"})
    # Faithful: logits within float-sum noise, teacher-forced argmax identical.
    assert r.check["argmax_equal"], r.check
    assert r.check["decoder_logits_rel"] < 1e-3, r.check
    # Greedy generation equals the packed PyTorch runtime.
    ref, _ = load_packed(packed)
    onnx_model, _ = load_onnx(tmp_path / "onnx", threads=1)
    ids = torch.randint(4, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    gen = dict(max_new_tokens=10, do_sample=False, num_beams=1)
    assert onnx_model.generate(input_ids=ids, attention_mask=mask, **gen).tolist() == \
        ref.generate(input_ids=ids, attention_mask=mask, **gen).tolist()


@pytest.mark.parametrize("wea,block,level", [("2-2-8", 16, 4), ("4-8-8", 16, 0)])
def test_block_export_writes_the_quantizer_in_graph_where_the_kernel_computes_in_float(tmp_path, wea, block,
                                                                                       level):
    """Where the kernel computes in float (2-bit blocks of 16 at accuracy level 4, or level 0)
    the graph quantizes the input itself with the same float ops: still exact."""
    packed = _packed(tmp_path, wea, 16, block)
    # (--nbits-kernel weight: the 2-bit kernel itself; auto would run these blocks as 4-bit, which
    # computes in int8 and quantizes the input as training did)
    r = export(packed, tmp_path / "onnx", ExportConfig(accuracy_level=level, nbits_kernel="weight"))
    nodes = _decoder_nodes(tmp_path / "onnx")
    producers = {o: n for n in nodes for o in n.output}
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert nbits and all(producers[n.input[0]].op_type == "Reshape" for n in nbits)   # in-graph quantizer
    assert r.check["argmax_equal"] and r.check["decoder_logits_rel"] < 1e-3, r.check


def test_lut_gemm_session_option_is_wired(tmp_path):
    """``export --lut-gemm`` is recorded in export.json; the runtime's sessions then set
    mlas.use_lut_gemm, which switches an eligible 2-bit MatMulNBits to the LUT kernel (its
    output then differs from the int8 acc-4 kernel's: its own activation rounding)."""
    import json

    import onnxruntime as ort

    from dqtool.runtimes.ort import LUT_GEMM_CONFIG, lut_gemm_of, session_options
    from nbits_kernels import nbits_graph

    assert session_options(1, lut_gemm=True).get_session_config_entry(LUT_GEMM_CONFIG) == "1"
    assert not lut_gemm_of(tmp_path)
    (tmp_path / "export.json").write_text(json.dumps({"session_options": {"use_lut_gemm": True}}))
    assert lut_gemm_of(tmp_path)
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, (128, 128)).astype(np.int8)
    model = nbits_graph(codes, np.full((128, 4), 0.02, np.float32), 2, 32).SerializeToString()
    x = rng.standard_normal((1, 128)).astype(np.float32)
    ys = [ort.InferenceSession(model, session_options(1, lut_gemm=lut), providers=["CPUExecutionProvider"])
          .run(None, {"A": x})[0] for lut in (False, True)]
    assert not np.array_equal(ys[0], ys[1]) and np.abs(ys[0] - ys[1]).max() < 0.05 * np.abs(ys[0]).max()
