"""dqtool export: ORT quantized ops on the trained integers, validated against the packed
PyTorch runtime; one copy of every weight; clear errors for what ORT cannot run."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from dqtool.cli import main
from dqtool.formats.packed import load_packed
from dqtool.stages.convert import ConvertConfig, convert
from dqtool.stages.export import DATA_FILE, DECODER_FILE, ENCODER_FILE, ExportConfig, _all_graphs, export, float_copies
from dqtool.formats.manifest import verify_folder
from dqtool.formats.onnx import graph_folder
from test_convert import make_qat


def _packed(root: Path, arch: str, scheme: str) -> Path:
    q = make_qat(root / "qat", arch, scheme)
    convert(q, root / "packed", ConvertConfig(float_dtype="float32", check_samples=1))
    return root / "packed"


def _ops(folder: Path) -> set[str]:
    ops = set()
    for f in (ENCODER_FILE, DECODER_FILE):
        m = onnx.load(str(graph_folder(folder) / f), load_external_data=False)
        ops |= {n.op_type for g in _all_graphs(m.graph) for n in g.node}
    return ops


def _inits(folder: Path, fname: str) -> dict:
    m = onnx.load(str(graph_folder(folder) / fname), load_external_data=False)
    return {i.name: i for g in _all_graphs(m.graph) for i in g.initializer}


@pytest.mark.parametrize("arch,scheme,matmul,op", [
    ("bart", "2-2-8", "auto", "MatMulInteger"),
    ("t5", "2-2-8", "auto", "MatMulInteger"),
    ("marian", "8-8-8-asym", "auto", "MatMulInteger"),
    ("bart", "8-8-8-asym-tensor", "auto", "DynamicQuantizeLinear"),
    ("bart", "4-4-4-asym", "auto", "MatMulInteger"),
    ("bart", "2-2-8", "nbits", "MatMulNBits"),
    ("t5v1_1", "8-8-8-pact", "auto", "MatMulInteger"),
])
def test_export_uses_quantized_ops_and_generates_like_packed_runtime(tmp_path, arch, scheme, matmul, op):
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    packed = _packed(tmp_path, arch, scheme)
    r = export(packed, tmp_path / "onnx", ExportConfig(matmul=matmul))
    out = tmp_path / "onnx"
    m = verify_folder(out, "export")
    ops = _ops(out)
    # (plain MatMul remains for the attention products q.k and probs.v); the integer path is
    # MatMulInteger, or MatMulIntegerToFloat for symmetric per-token activations (onnx_ops._row_scaled_matmul)
    assert op in ops or (op == "MatMulInteger" and "MatMulIntegerToFloat" in ops)
    assert r.paths[matmul if matmul != "auto" else "integer"] > 0
    if (arch, scheme, matmul) == ("bart", "2-2-8", "auto"):
        # symmetric per-token codes: five big ops over many rows (encoder, cross-attention keys/values),
        # the nine small ops per generated token, faster at one row (onnx_ops._row_scaled_matmul)
        plans = json.loads((out / "export.json").read_text())["plans"]
        for name, p in plans.items():
            assert p["per_token"] == (name.startswith("model.decoder.") and "encoder_attn.k_proj" not in name
                                      and "encoder_attn.v_proj" not in name or name == "lm_head"), name
        enc = onnx.load(str(graph_folder(out) / ENCODER_FILE), load_external_data=False)
        assert {n.op_type for n in enc.graph.node} >= {"MatMulIntegerToFloat", "QuantizeLinear"}
        assert "MatMulInteger" not in {n.op_type for n in enc.graph.node}
        dec_ops = {n.op_type for g in _all_graphs(onnx.load(str(graph_folder(out) / DECODER_FILE),
                                                               load_external_data=False).graph) for n in g.node}
        assert {"MatMulInteger", "MatMulIntegerToFloat"} <= dec_ops
    assert r.check["argmax_equal"] and r.check["decoder_logits_rel"] <= r.check["rtol"]
    if matmul == "auto":
        # Integer path: codes and scales exact; only float rounding outside the integer matmul.
        assert r.check["encoder_rel"] < 1e-3
    assert m["check"] == r.check
    # optimum's ORTModelForSeq2SeqLM loads the folder (shared external data) and generates the
    # packed PyTorch runtime's greedy tokens.
    ref, _ = load_packed(packed)
    ids = torch.randint(4, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ort_model = ORTModelForSeq2SeqLM.from_pretrained(out)
    gen = dict(max_new_tokens=8, do_sample=False, num_beams=1)
    assert ort_model.generate(input_ids=ids, attention_mask=mask, **gen).tolist() == \
        ref.generate(input_ids=ids, attention_mask=mask, **gen).tolist()


@pytest.mark.parametrize("scheme,wide", [("8-8-8-asym", True), ("8-8-8-asym-tensor", True), ("8-8-8-pact", True),
                                         ("2-2-8", False)])
def test_integer_weights_cannot_saturate_u8s8_kernels(tmp_path, scheme, wide):
    """ORT's u8s8 int8 GEMMs on CPUs without VNNI (AVX2) sum pairs of uint8 x int8 products in
    int16 with saturation, so an int8 weight code above 64 in magnitude can give wrong sums
    (8-bit weights did: the export check failed on an AVX2 machine, passed on AVX-512 VNNI).
    Whatever the CPU, every int8 weight ORT's kernels see stays within 64; 8-bit weights go
    to MatMulInteger as uint8 + 128 with zero point 128 (u8u8: exact everywhere)."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from dqtool.qmath.onnx_ops import U8S8_SAFE_MAX_CODE

    packed = _packed(tmp_path, "bart", scheme)
    export(packed, tmp_path / "onnx")
    gdir = graph_folder(tmp_path / "onnx")
    seen = {"uint8": 0, "int8": 0}
    for fname in (ENCODER_FILE, DECODER_FILE):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(gdir / f"opt-{fname}")   # beside the external data it names
        ort.InferenceSession(str(gdir / fname), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(str(gdir / f"opt-{fname}"))
        inits = {i.name: i for g in _all_graphs(opt.graph) for i in g.initializer}
        for g in _all_graphs(opt.graph):
            for n in g.node:
                if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") and n.input[1] in inits:
                    b = numpy_helper.to_array(inits[n.input[1]])
                    if b.dtype == np.int8:
                        seen["int8"] += 1
                        assert int(np.abs(b.astype(np.int32)).max()) <= U8S8_SAFE_MAX_CODE, (fname, n.name)
                    else:
                        assert b.dtype == np.uint8, (fname, n.name, b.dtype)
                        seen["uint8"] += 1
    assert seen["uint8" if wide else "int8"] > 0 and seen["int8" if wide else "uint8"] == 0, seen


def test_ort_u8u8_matmul_integer_is_exact_at_the_extremes():
    """The premise of the uint8 weights above, on this machine's kernels: MatMulInteger with
    uint8 A at 255 and uint8 B at 0 or 255 with zero point 128 (codes -128 / +127) gives the
    exact int32 sums (a u8s8 kernel without VNNI saturates these at 32767 per pair)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k = 64
    node = helper.make_node("MatMulInteger", ["a", "b", "", "bzp"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])],
        [helper.make_tensor("b", TensorProto.UINT8, [k, 2], [0, 255] * k),
         helper.make_tensor("bzp", TensorProto.UINT8, [], [128])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.full((2, k), 255, np.uint8)
    a[1, ::2] = 0
    y = sess.run(None, {"a": a})[0]
    want = (a.astype(np.int64) @ (np.array([[0, 255]] * k, np.int64) - 128))
    assert np.array_equal(y, want), (y, want)


@pytest.mark.parametrize("scheme", ["2-2-8", "8-8-8-asym"])
def test_per_token_activations_make_a_row_independent_of_its_batch(tmp_path, scheme):
    """With per-token activation ranges a request's tokens do not depend on what else is in
    the batch, or on how much padding that adds: alone or batched, in the packed runtime
    and in ONNX Runtime, greedy tokens are the same (per-tensor ranges broke this)."""
    from dqtool.runtimes.ort import load_onnx

    packed = _packed(tmp_path, "bart", scheme)
    export(packed, tmp_path / "onnx")
    ref, _ = load_packed(packed)
    rt, _ = load_onnx(tmp_path / "onnx")
    ids = torch.randint(4, 300, (3, 11), generator=torch.Generator().manual_seed(3))
    ids[2] = torch.arange(290, 301)  # a row with other token statistics
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[1, 8:] = 0
    gen = dict(max_new_tokens=10, do_sample=False, num_beams=1)
    batched = ref.generate(input_ids=ids, attention_mask=mask, **gen)
    assert np.array_equal(rt.generate(input_ids=ids, attention_mask=mask, **gen), batched.numpy())
    for i in range(3):
        n = int(mask[i].sum())
        alone = ref.generate(input_ids=ids[i:i + 1, :n], **gen)
        row = batched[i, :alone.shape[1]]
        assert torch.equal(alone[0], row), i
        assert (batched[i, alone.shape[1]:] == ref.config.pad_token_id).all()
        assert np.array_equal(rt.generate(input_ids=ids[i:i + 1, :n], **gen)[0], row.numpy()), i


@pytest.mark.parametrize("external_data", ["per-graph", "shared"])
def test_weights_are_stored_once_under_packed_names(tmp_path, external_data):
    """Graphs under onnx/ with packed tensor names. shared: one weights.onnx_data, every
    tensor once; per-graph (transformers.js' <graph>.onnx_data): every tensor once per graph
    file, so only the tied embedding (used by both graphs) is stored twice."""
    packed = _packed(tmp_path, "bart", "2-2-8")
    export(packed, tmp_path / "onnx", ExportConfig(external_data=external_data))
    out = tmp_path / "onnx"
    gdir = out / "onnx"
    assert sorted(p.name for p in gdir.iterdir()) == sorted(
        [ENCODER_FILE, DECODER_FILE] + ([DATA_FILE] if external_data == "shared" else
                                        [ENCODER_FILE + "_data", DECODER_FILE + "_data"]))
    js = json.loads((out / "config.json").read_text()).get("transformers.js_config", {})
    assert js.get("use_external_data_format") == (
        None if external_data == "shared" else {ENCODER_FILE: 1, DECODER_FILE: 1})
    enc, dec = _inits(out, ENCODER_FILE), _inits(out, DECODER_FILE)
    # Packed names, as in packed.safetensors; the tied embedding is one tensor for
    # encoder Gather, decoder Gather and lm_head.
    assert "model.encoder.layers.0.fc1.qweight" in enc and "model.decoder.layers.0.fc1.qweight" in dec
    assert "model.shared.qweight" in enc and "model.shared.qweight" in dec
    assert not any("lm_head" in n and "qweight" in n for n in dec)
    locs: dict[str, dict] = {}
    for fname, inits in ((ENCODER_FILE, enc), (DECODER_FILE, dec)):
        for name, init in inits.items():
            if init.data_location == onnx.TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in init.external_data}
                assert ext["location"] == (DATA_FILE if external_data == "shared" else fname + "_data")
                locs.setdefault(ext["location"], {}).setdefault(name, set()).add((ext["offset"], ext["length"]))
    for per_file in locs.values():
        assert all(len(v) == 1 for v in per_file.values())  # same bytes wherever a graph uses the tensor
        spans = sorted((int(o), int(n)) for v in per_file.values() for o, n in v)
        assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no tensor written twice in a file
    in_both = set.intersection(*(set(v) for v in locs.values())) if len(locs) == 2 else set()
    # Large constants (the tracer's copies of model buffers, the base-3 decode table) are
    # initializers named by content, so both graphs may use one; no Constant node keeps 1 KB.
    in_both = {n for n in in_both if not n.startswith("const.")}
    for fname in (ENCODER_FILE, DECODER_FILE):
        m = onnx.load(str(gdir / fname), load_external_data=False)
        big = [n.output[0] for g in _all_graphs(m.graph) for n in g.node if n.op_type == "Constant"
               and n.ByteSize() >= 1024]
        assert not big, (fname, big)
    assert in_both == ({"model.shared.qweight", "model.shared.scale"} & set(enc)
                       if external_data == "per-graph" else set())
    # The weights files are the packed weights (codes at their bit width), not an unpacked copy.
    packed_bytes = (packed / "packed.safetensors").stat().st_size
    data_bytes = sum((gdir / f).stat().st_size for f in locs)
    dup = sum(int(next(iter(locs[DECODER_FILE + "_data"][n]))[1]) for n in in_both)
    assert data_bytes - dup < 1.2 * packed_bytes
    qw = dec["model.decoder.layers.0.fc1.qweight"]
    assert qw.data_type == onnx.TensorProto.UINT8 and list(qw.dims) == [32, 4]  # 16 ternary codes in 4 bytes


def test_initializer_scan_finds_a_float_copy(tmp_path):
    packed = _packed(tmp_path, "bart", "2-2-8")
    export(packed, tmp_path / "onnx")
    out = tmp_path / "onnx"
    model, _ = load_packed(packed)
    models = {f: onnx.load(str(out / "onnx" / f)) for f in (ENCODER_FILE, DECODER_FILE)}
    assert float_copies(models, out / "onnx", model) == []
    w = model.model.encoder.layers[0].fc1.weight().detach().numpy()
    models[ENCODER_FILE].graph.initializer.append(onnx.numpy_helper.from_array(w.T.copy(), "leak"))
    assert float_copies(models, out / "onnx", model) == [f"{ENCODER_FILE}:leak == model.encoder.layers.0.fc1"]


@pytest.mark.parametrize("scheme,args,message", [
    ("3-4-none", [], "choose W bits 2, 4 or 8"),
    ("4-4-8-g8", [], "choose a group size of 16"),
    ("4-4-8-g8", ["--matmul", "integer"], "group-wise weight scales vary"),
])
def test_unsupported_scheme_is_refused_before_export(tmp_path, scheme, args, message):
    packed = _packed(tmp_path, "bart", scheme)
    r = CliRunner().invoke(main, ["export", str(packed), str(tmp_path / "onnx"), *args])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")]


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """One packed folder and its export through the CLI, shared by the CLI tests below."""
    root = tmp_path_factory.mktemp("cli_export")
    packed = _packed(root, "bart", "2-2-8")
    r = CliRunner().invoke(main, ["export", str(packed), str(root / "onnx")])
    return root, packed, r


def test_cli_export_reports_ops_and_parity(cli_export):
    _, _, r = cli_export
    assert r.exit_code == 0, r.output
    assert "MatMulInteger" in r.output and "identical" in r.output


def test_cli_export_existing_out_needs_force(cli_export):
    root, packed, _ = cli_export
    r = CliRunner().invoke(main, ["export", str(packed), str(root / "onnx")])
    assert r.exit_code == 2 and "--force" in r.output


def test_cli_export_refuses_a_folder_that_is_not_packed(cli_export):
    root, _, _ = cli_export
    r = CliRunner().invoke(main, ["export", str(root / "qat"), str(root / "o2")])
    assert r.exit_code == 2 and "not a packed folder" in r.output
    assert not (root / "o2").exists()


def test_cli_export_refuses_an_edited_packed_folder(cli_export, tmp_path):
    root, packed, _ = cli_export
    edited = tmp_path / "packed"
    shutil.copytree(packed, edited)
    (edited / "packing.json").write_text(json.dumps({"tampered": True}))
    r = CliRunner().invoke(main, ["export", str(edited), str(tmp_path / "o3")])
    assert r.exit_code == 2 and "does not match its hash" in r.output
    assert not (tmp_path / "o3").exists()


def test_auto_plan_integer_for_many_rows_nbits_per_token(tmp_path):
    from dqtool.stages.export import plan_linears

    model, _ = load_packed(_packed(tmp_path, "bart", "2-2-8"))
    plans = plan_linears(model, ExportConfig(nbits_min_weights=1))  # tiny model: treat its decoder as memory-bound
    assert plans["model.encoder.layers.0.fc1"].path == "integer"
    assert plans["model.decoder.layers.0.encoder_attn.k_proj"].path == "integer"  # over all source tokens
    assert plans["model.decoder.layers.0.fc1"].path == "nbits"                    # once per new token
    assert plans["lm_head"].path == "nbits" and plans["lm_head"].bits == 2
    assert {p.path for p in plan_linears(model, ExportConfig(matmul="integer")).values()} == {"integer"}
    assert {p.path for p in plan_linears(model, ExportConfig()).values()} == {"integer"}  # 2^23 default: a tiny decoder fits in cache
