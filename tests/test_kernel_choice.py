"""The kernel each exported Linear runs: MatMulNBits widths chosen per Linear (``--nbits-kernel``,
the same integers re-packed at session start) and the encoder's own activation scheme
(``encoder_act_granularity``: the integer path over many rows, MatMulNBits per token)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dqtool.base.errors import DQToolError
from dqtool.formats.onnx import graph_folder
from dqtool.formats.packed import load_packed
from dqtool.qmath.onnx_ops import kernel_bits
from dqtool.qmath.scheme import QuantScheme
from dqtool.stages.export import DECODER_FILE, ENCODER_FILE, ExportConfig, _all_graphs, export
from tiny import pack_tiny, tiny_model


def _packed(root: Path, scheme: QuantScheme, d_model: int = 32) -> Path:
    model = tiny_model("bart", 2, 2, d_model=d_model, encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model)
    return pack_tiny(root, model, scheme)


def _matmuls(folder: Path, graph: str) -> set[tuple[str, int]]:
    """The ``(op_type, bits)`` kinds of the quantized matmuls in ``graph`` (all branches)."""
    m = onnx.load(str(graph_folder(folder) / graph), load_external_data=False)
    out = set()
    for g in _all_graphs(m.graph):
        for n in g.node:
            if n.op_type == "MatMulNBits":
                out.add(("MatMulNBits", {a.name: a.i for a in n.attribute}["bits"]))
            elif n.op_type in ("MatMulInteger", "MatMulIntegerToFloat"):   # the integer path (int8 codes)
                out.add(("MatMulInteger", 8))
    return out


def _run(folder: Path, ids: np.ndarray):
    """Encoder output and first-step decoder logits of the exported graphs (ORT, 1 thread)."""
    from dqtool.runtimes.ort import load_onnx

    m, _ = load_onnx(folder, threads=1)
    mask = np.ones_like(ids)
    enc = m.encode(ids, mask)
    logits, _ = m.decoder_step(np.full((ids.shape[0], 1), 2), enc, mask)
    return enc, np.asarray(logits)


def test_kernel_bits_rule():
    assert [kernel_bits(b, True) for b in (2, 4, 8)] == [4, 4, 8]
    assert [kernel_bits(b, False) for b in (2, 4, 8)] == [8, 8, 8]
    assert kernel_bits(2, True, lut_gemm=True) == 2 and kernel_bits(2, False, lut_gemm=True) == 8
    assert kernel_bits(2, True, odd_codes=True) == 2 and kernel_bits(2, False, odd_codes=True) == 2
    with pytest.raises(Exception, match="--nbits-kernel .16. is not supported: choose auto, weight"):
        ExportConfig(nbits_kernel="16")


def test_widened_kernels_compute_the_same_result(tmp_path):
    """--nbits-kernel auto runs 2-bit codes in 4-bit (per token) and 8-bit (encoder, cross
    keys/values) MatMulNBits: the same integers, so the same encoder output and logits as the
    2-bit kernels bit for bit (up to the order of float sums), and ORT folds the re-packing (one
    Gather of a 256-entry table) into initializers at session start; the file keeps 2 bits."""
    import onnxruntime as ort

    scheme = QuantScheme.from_wea("2-2-8", act_granularity="block", quantize_attention=False)
    packed = _packed(tmp_path, scheme)
    narrow = export(packed, tmp_path / "w", ExportConfig(nbits_kernel="weight"))
    wide = export(packed, tmp_path / "a", ExportConfig())
    assert narrow.check["argmax_equal"] and wide.check["argmax_equal"], (narrow.check, wide.check)
    enc_kinds = _matmuls(tmp_path / "a", ENCODER_FILE)
    dec_kinds = _matmuls(tmp_path / "a", DECODER_FILE)
    assert enc_kinds == {("MatMulNBits", 8)}
    assert dec_kinds == {("MatMulNBits", 4), ("MatMulNBits", 8)}
    assert _matmuls(tmp_path / "w", DECODER_FILE) == {("MatMulNBits", 2)}
    ids = np.random.default_rng(0).integers(4, 300, (2, 11))
    (e1, l1), (e2, l2) = _run(tmp_path / "w", ids), _run(tmp_path / "a", ids)
    assert np.allclose(e1, e2, rtol=0, atol=1e-5 * np.abs(e1).max()), np.abs(e1 - e2).max()
    assert np.allclose(l1, l2, rtol=0, atol=1e-5 * np.abs(l1).max()), np.abs(l1 - l2).max()
    # The file holds the narrow codes: the same weights on disk plus the re-packing tables
    # (256 x 2 and 256 x 4 bytes, stored once).
    assert 0 <= wide.sizes["weights"] - narrow.sizes["weights"] <= 256 * 6, (wide.sizes, narrow.sizes)
    ops = []
    for folder in ("w", "a"):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"opt-{folder}.onnx")
        ort.InferenceSession(str(graph_folder(tmp_path / folder) / ENCODER_FILE), so,
                             providers=["CPUExecutionProvider"])
        nodes = onnx.load(str(tmp_path / f"opt-{folder}.onnx"), load_external_data=False).graph.node
        ops.append(sorted(n.op_type for n in nodes))
    # After ORT's session-start folding both encoders run the very same ops (the re-packing is gone).
    assert "MatMulNBits" in ops[1] and ops[0] == ops[1], (len(ops[0]), len(ops[1]))


def test_encoder_act_granularity_splits_the_kernels(tmp_path):
    """encoder_act_granularity token with block activations: QAT quantizes the encoder's and the
    cross-attention keys/values' inputs per token (exported as MatMulIntegerToFloat on int8 codes) and
    every per-token Linear per block (MatMulNBits' own quantizer): the export is faithful and
    generates the packed runtime's tokens; the packed integer runtime runs the encoder part."""
    from dqtool.runtimes.ort import load_onnx

    scheme = QuantScheme.from_wea("2-2-8", act_granularity="block", encoder_act_granularity="token",
                                  quantize_attention=False)
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    packed = _packed(tmp_path, scheme)
    model, _ = load_packed(packed)
    specs = {n: m.act_spec.granularity for n, m in model.named_modules() if hasattr(m, "act_spec")}
    assert specs["model.encoder.layers.0.fc1"] == "token" and specs["model.decoder.layers.0.fc1"] == "block"
    assert specs["model.decoder.layers.1.encoder_attn.k_proj"] == "token"
    assert specs["model.decoder.layers.1.encoder_attn.q_proj"] == "block" and specs["lm_head"] == "block"
    r = export(packed, tmp_path / "onnx", ExportConfig())
    assert r.check["argmax_equal"] and r.check["decoder_logits_rel"] < 1e-3, r.check
    assert {k for k, _ in _matmuls(tmp_path / "onnx", ENCODER_FILE)} == {"MatMulInteger"}
    assert {k for k, _ in _matmuls(tmp_path / "onnx", DECODER_FILE)} == {"MatMulInteger", "MatMulNBits"}
    onnx_model, _ = load_onnx(tmp_path / "onnx", threads=1)
    ids = torch.randint(4, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    gen = dict(max_new_tokens=10, do_sample=False, num_beams=1)
    want = model.generate(input_ids=ids, attention_mask=mask, **gen).tolist()
    assert onnx_model.generate(input_ids=ids, attention_mask=mask, **gen).tolist() == want
    integer, _ = load_packed(packed, matmul="integer")
    assert integer.generate(input_ids=ids, attention_mask=mask, **gen).tolist() == want


def test_encoder_act_granularity_validation():
    with pytest.raises(DQToolError, match="encoder_act_granularity 'block' is not supported"):
        QuantScheme.from_wea("2-2-8", act_granularity="block", encoder_act_granularity="block")
    s = QuantScheme.from_wea("8-8-8", encoder_act_granularity="tensor")
    assert s.activation_spec().granularity == "token" and s.activation_spec(per_token=False).granularity == "tensor"
    assert QuantScheme.from_wea("8-8-8").activation_spec(per_token=False) == QuantScheme.from_wea("8-8-8").activation_spec()
