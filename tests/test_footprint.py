"""Footprint features: base-3 storage of ternary codes, quantized learned positions, float16
per float group, and folders written before them still loading."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from dqtool.cli import main
from dqtool.formats.packed import LAYOUT_FILE, PACKED_FILE, load_packed
from dqtool.stages.convert import ConvertConfig, convert
from dqtool.base.errors import DQToolError
from dqtool.formats.manifest import verify_folder, write_manifest
from dqtool.qmath.pack import base3_row_bytes, base3_to_2bit, pack_base3, pack_codes, unpack_base3
from dqtool.model.packed import PackedPositionEmbedding
from dqtool.formats.qat import load_qat, save_qat
from dqtool.model.qmodules import QuantPositionEmbedding, prepare
from dqtool.qmath.scheme import QuantScheme
from tiny import tiny_model, tiny_tokenizer

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"


def _qat(path: Path, arch: str, wea: str, pos="e", enc=2, dec=2, edit=None) -> Path:
    model = tiny_model(arch, enc, dec)
    if edit is not None:
        edit(model)
    scheme = QuantScheme.from_wea_pos(wea, pos)
    prepare(model, scheme)
    path.mkdir(parents=True)
    save_qat(model, tiny_tokenizer(), path, scheme)
    write_manifest(path, "qat", inputs={}, config={})
    return path


def _ids(n=3, t=9, seed=0):
    return torch.randint(4, 300, (n, t), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- base-3 math

@pytest.mark.parametrize("n", [n for n in range(1, 101) if n % 5])
def test_base3_pack_unpack_exact_at_odd_lengths(n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(-1, 2, (3, n), dtype=torch.int8, generator=g)
    packed = pack_base3(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, base3_row_bytes(n))
    assert int(packed.max()) <= 242
    assert torch.equal(unpack_base3(packed, n), codes)
    # Decoded to exactly the 2-bit layout the kernels read (padding included).
    assert torch.equal(base3_to_2bit(packed, n), pack_codes(codes, 2))


def test_base3_layout_and_bad_input():
    # Lowest trit first, t = code + 1; the unused trits of the last byte hold code 0 (t = 1).
    assert pack_base3(torch.tensor([[1, -1, 0, 0, 1, 1]], dtype=torch.int8)).tolist() == \
        [[2 + 0 * 3 + 1 * 9 + 1 * 27 + 2 * 81, 2 + 1 * 3 + 1 * 9 + 1 * 27 + 1 * 81]]
    with pytest.raises(ValueError, match="base 3"):
        pack_base3(torch.tensor([[2]], dtype=torch.int8))
    with pytest.raises(ValueError, match="not a base-3 byte"):
        unpack_base3(torch.tensor([[243]], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="takes 2 bytes"):
        unpack_base3(torch.zeros(1, 1, dtype=torch.uint8), 6)


@pytest.mark.parametrize("n", [1, 4, 7, 13, 20, 25, 32, 45, 99])  # slice, none, pad (25, 45)
def test_onnx_base3_decode_nodes_equal_the_pytorch_decoder(n):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from dqtool.qmath.onnx_ops import base3_decode_nodes
    from dqtool.qmath.pack import row_bytes

    codes = torch.randint(-1, 2, (5, n), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    b3 = pack_base3(codes)
    graph = helper.make_graph(
        base3_decode_nodes("b3", "out", 5, n), "decode",
        [helper.make_tensor_value_info("b3", TensorProto.UINT8, [5, base3_row_bytes(n)])],
        [helper.make_tensor_value_info("out", TensorProto.UINT8, [5, row_bytes(n, 2)])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"b3": b3.numpy()})[0]
    assert np.array_equal(out, pack_codes(codes, 2).numpy())


# --------------------------------------------------------------------------- quantized positions

@pytest.mark.parametrize("arch,wea,pos", [("bart", "2-2-8", "e"), ("mbart", "4-4-8", "8"), ("bart", "8-8-8", "4")])
def test_packed_equals_qat_bit_for_bit_with_quantized_positions(tmp_path, arch, wea, pos):
    q = _qat(tmp_path / "qat", arch, wea, pos)
    ref, _ = load_qat(q)
    assert isinstance(ref.model.encoder.embed_positions, QuantPositionEmbedding)
    r = convert(q, tmp_path / "packed", ConvertConfig(float_dtype="float32", check_samples=2, check_length=6))
    assert r.check["bit_exact"] and r.check["tokens_equal"]
    doc = json.loads((tmp_path / "packed" / LAYOUT_FILE).read_text())
    for stack in ("encoder", "decoder"):
        e = doc["layout"][f"model.{stack}.embed_positions"]
        assert e["kind"] == "position" and e["offset"] == 2 and e["shape"] == [64 + 2, 16]
        assert e["bits"] == (QuantScheme.from_wea_pos(wea, pos).pos_bits)
    assert doc["format_version"] == 2
    with safe_open(str(tmp_path / "packed" / PACKED_FILE), "pt") as f:
        keys = set(f.keys())
    assert "model.encoder.embed_positions.weight" not in keys and "model.encoder.embed_positions.qweight" in keys
    assert r.footprint["bound"]["positions"] > 0
    model, _ = load_packed(tmp_path / "packed")
    assert isinstance(model.model.decoder.embed_positions, PackedPositionEmbedding)
    ids, dec = _ids(), _ids(3, 5, seed=1)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=dec).logits,
                           ref(input_ids=ids, decoder_input_ids=dec).logits)
    gen = dict(max_new_tokens=8, do_sample=False, num_beams=1)   # cached decoding: positions from cache_position
    assert torch.equal(model.generate(input_ids=ids, **gen), ref.generate(input_ids=ids, **gen))
    # The table the model uses is the quantized one, not the float weights.
    qt = ref.model.encoder.embed_positions
    from dqtool.qmath.quant import fake_quant

    assert not torch.equal(fake_quant(qt.weight, qt.pspec), qt.weight)


def test_quantized_positions_train_through_the_fake_quant(tmp_path):
    # QAT: the position table gets gradients through the straight-through estimator.
    model = prepare(tiny_model("bart", 1, 1).train(), QuantScheme.from_wea_pos("2-2-8", "e"))
    out = model(input_ids=_ids(), decoder_input_ids=_ids(3, 5, 1), labels=_ids(3, 5, 2))
    out.loss.backward()
    g = model.model.encoder.embed_positions.weight.grad
    assert g is not None and g[2:11].abs().sum() > 0 and g[11:].abs().sum() == 0   # rows 2.. = positions 0..8


def test_position_bits_on_architectures_without_learned_positions_change_nothing():
    for arch in ("marian", "t5"):
        m = prepare(tiny_model(arch, 1, 1), QuantScheme.from_wea_pos("2-2-8", "e"))
        assert not any(isinstance(x, QuantPositionEmbedding) for x in m.modules())
    with pytest.raises(DQToolError, match="position bits"):
        QuantScheme.from_wea_pos("2-2-8", "x")
    with pytest.raises(DQToolError, match="bits 5"):
        QuantScheme.from_wea_pos("2-2-8", "5")


# --------------------------------------------------------------------------- ONNX

def test_onnx_parity_with_quantized_positions_and_base3_storage(tmp_path):
    import onnx
    import onnxruntime as ort

    from dqtool.runtimes.ort import load_onnx
    from dqtool.formats.onnx import DATA_FILE, graph_folder
    from dqtool.stages.export import DECODER_FILE, ENCODER_FILE, ExportConfig, _all_graphs, export

    q = _qat(tmp_path / "qat", "bart", "2-2-8", "e")
    packed = tmp_path / "packed"
    convert(q, packed, ConvertConfig(float_dtype="float32", check_samples=1))
    doc = json.loads((packed / LAYOUT_FILE).read_text())
    assert {e.get("storage") for e in doc["layout"].values() if e["kind"] != "tied"} == {"base3"}
    r = export(packed, tmp_path / "onnx", ExportConfig())
    out = tmp_path / "onnx"
    gdir = graph_folder(out)  # the graphs and their external data (OUT/onnx/)
    m = verify_folder(out, "export")
    assert "model.shared.qweight" in m["base3_tables"] and "model.encoder.embed_positions.qweight" in m["base3_tables"]
    assert r.check["argmax_equal"] and r.check["encoder_rel"] < 1e-3
    # The ONNX external data holds the base-3 bytes of packed.safetensors under the packed names.
    enc = onnx.load(str(gdir / ENCODER_FILE), load_external_data=False)
    inits = {i.name: i for g in _all_graphs(enc.graph) for i in g.initializer}
    with safe_open(str(packed / PACKED_FILE), "pt") as f:
        for name in ("model.encoder.layers.0.fc1.qweight", "model.encoder.embed_positions.qweight"):
            t = f.get_tensor(name)
            assert list(inits[name].dims) == list(t.shape)
            arr = onnx.numpy_helper.to_array(inits[name], base_dir=str(gdir))
            assert np.array_equal(arr, t.numpy())
    assert "BitwiseOr" in {n.op_type for n in enc.graph.node}   # only the base-3 decoding uses BitwiseOr
    # ORT folds the decoding at session start: the optimized graphs keep no BitwiseOr and no base-3 input.
    for fname in (ENCODER_FILE, DECODER_FILE):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(tmp_path / f"opt-{fname}")
        ort.InferenceSession(str(gdir / fname), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(str(tmp_path / f"opt-{fname}"), load_external_data=False)
        ops = [n.op_type for g in _all_graphs(opt.graph) for n in g.node]
        assert "BitwiseOr" not in ops, fname
        used = {x for g in _all_graphs(opt.graph) for n in g.node for x in n.input}
        assert not any(n.endswith(".qweight") and n in used for n in m["base3_tables"]), fname
    assert (gdir / DATA_FILE).is_file()  # one shared data file (the default)
    # The report reads the bound per tensor group from either folder's manifest.
    from dqtool.stages.bench.stage import bit_bound_of

    bound = bit_bound_of(str(packed))
    assert bound == bit_bound_of(str(out)) and set(bound) == {"codes", "scales", "floats", "positions", "total"}
    assert bound["positions"] > 0 and bound["total"] == sum(v for k, v in bound.items() if k != "total")
    # Greedy generation: ONNX Runtime == the packed runtime == the QAT model.
    ref, _ = load_packed(packed)
    qat_model, _ = load_qat(q)
    rt, _ = load_onnx(out)
    ids = _ids(3, 11, seed=4)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    gen = dict(max_new_tokens=10, do_sample=False, num_beams=1)
    tokens = ref.generate(input_ids=ids, attention_mask=mask, **gen)
    assert torch.equal(tokens, qat_model.generate(input_ids=ids, attention_mask=mask, **gen))
    assert np.array_equal(rt.generate(input_ids=ids, attention_mask=mask, **gen), tokens.numpy())


# --------------------------------------------------------------------------- float groups

def test_float16_is_chosen_per_tensor(tmp_path):
    # final_logits_bias beyond float16's range (inf): the biases group fails as a whole, and
    # the halving search keeps only that tensor float32; the other biases, the norms and the
    # positions go to float16 within tolerance.
    def edit(model):
        with torch.no_grad():
            model.final_logits_bias[0, 7] = 70000.0

    q = _qat(tmp_path / "qat", "bart", "2-2-8", "none", edit=edit)
    r = convert(q, tmp_path / "packed", ConvertConfig(check_samples=2, check_length=6))
    assert r.float_dtype == "mixed", r.float_dtypes
    assert r.float_dtypes["biases"].startswith("mixed ("), r.float_dtypes
    assert r.float_dtypes["norms"] == "float16" and r.float_dtypes["positions"] == "float16"
    m = verify_folder(tmp_path / "packed", "convert")
    assert not m["checks_tried"]["float16"]["tokens_equal"] or m["checks_tried"]["float16"]["rel"] > 1e-3
    with safe_open(str(tmp_path / "packed" / PACKED_FILE), "pt") as f:
        assert f.get_tensor("final_logits_bias").dtype == torch.float32
        assert f.get_tensor("model.encoder.layers.0.fc1.bias").dtype == torch.float16
        biases32 = [k for k in f.keys() if k.endswith("bias") and f.get_tensor(k).dtype == torch.float32]
        assert biases32 == ["final_logits_bias"]
        n_biases = len([k for k in f.keys() if k.endswith("bias") and "norm" not in k])
        assert f.get_tensor("model.encoder.layernorm_embedding.weight").dtype == torch.float16
        assert f.get_tensor("model.encoder.embed_positions.weight").dtype == torch.float16
    assert r.float_dtypes["biases"] == f"mixed ({n_biases - 1} of {n_biases} float16)", r.float_dtypes
    assert r.check["tokens_equal"] and r.check["rel"] <= 1e-3
    model, _ = load_packed(tmp_path / "packed")   # mixed dtypes load (cast to the compute dtype)
    assert model(input_ids=_ids(), decoder_input_ids=_ids(3, 4, 1)).logits.dtype == torch.float32


# --------------------------------------------------------------------------- old folders

def test_legacy_folders_still_load_and_convert_unchanged(tmp_path):
    qat_dir, packed_dir = tmp_path / "qat", tmp_path / "packed"
    shutil.copytree(LEGACY / "qat-2-2-8", qat_dir)
    shutil.copytree(LEGACY / "packed-2-2-8", packed_dir)
    assert "pos_bits" not in json.loads((qat_dir / "quantization.json").read_text())
    assert json.loads((packed_dir / LAYOUT_FILE).read_text())["format_version"] == 1
    ref, _ = load_qat(qat_dir)
    assert ref.dqtool_scheme.pos_bits is None
    old, _ = load_packed(packed_dir)
    ids, dec = _ids(), _ids(3, 5, seed=1)
    with torch.no_grad():
        assert torch.equal(old(input_ids=ids, decoder_input_ids=dec).logits,
                           ref(input_ids=ids, decoder_input_ids=dec).logits)
    # Converted again with 2-bit storage: the same format-1 folder (every tensor, dtype and
    # layout entry; safetensors' header order of metadata keys is not deterministic).
    convert(qat_dir, tmp_path / "again", ConvertConfig(float_dtype="float32", check_samples=1, ternary_storage="2bit"))
    new_doc = json.loads((tmp_path / "again" / LAYOUT_FILE).read_text())
    old_doc = json.loads((packed_dir / LAYOUT_FILE).read_text())
    assert new_doc["format_version"] == 1 and new_doc["layout"] == old_doc["layout"]
    with safe_open(str(tmp_path / "again" / PACKED_FILE), "pt") as a, safe_open(str(packed_dir / PACKED_FILE), "pt") as b:
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and torch.equal(x, y), k
    # And with base-3 storage: smaller codes, same logits.
    convert(qat_dir, tmp_path / "b3", ConvertConfig(float_dtype="float32", check_samples=1))
    b3, _ = load_packed(tmp_path / "b3")
    with torch.no_grad():
        assert torch.equal(b3(input_ids=ids, decoder_input_ids=dec).logits,
                           ref(input_ids=ids, decoder_input_ids=dec).logits)


def test_cli_convert_shows_bound_per_group_and_takes_storage(tmp_path):
    q = _qat(tmp_path / "qat", "bart", "2-2-8", "e")
    for storage in ("base3", "2bit"):
        r = CliRunner().invoke(main, ["convert", str(q), str(tmp_path / storage), "--float-dtype", "float32",
                                      "--check-samples", "1", "--ternary-storage", storage])
        assert r.exit_code == 0, r.output
        for group in ("codes", "scales", "floats", "positions"):
            assert f"    {group}" in r.output
    a, b = ((tmp_path / s / PACKED_FILE).stat().st_size for s in ("base3", "2bit"))
    assert a < b
    r = CliRunner().invoke(main, ["convert", str(q), str(tmp_path / "x"), "--ternary-storage", "base4"])
    assert r.exit_code == 2 and not (tmp_path / "x").exists()


def test_recipe_and_cli_take_position_bits():
    from dqtool.compress import recipe_from_dict

    r = recipe_from_dict({"teacher": "t", "data": "d", "work": "w", "schemes": ["2-2-8", "8-8-8"],
                          "qat": {"pos_bits": "e"}, "convert": {"ternary_storage": "2bit"}},
                         check_paths=False)
    assert {w: c.scheme.pos_bits for w, c in r.qats.items()} == {"2-2-8": 2, "8-8-8": 8}
    assert r.convert.ternary_storage == "2bit"
    assert all(c.scheme.pos_bits is None for c in recipe_from_dict({"teacher": "t", "data": "d", "work": "w"},
                                                                   check_paths=False).qats.values())
    with pytest.raises(DQToolError, match="convert.ternary_storage"):
        recipe_from_dict({"teacher": "t", "data": "d", "work": "w", "convert": {"ternary_storage": "base4"}}, check_paths=False)
    r = CliRunner().invoke(main, ["qat", "s", "o", "--data", "d", "--pos-bits", "7"])
    assert r.exit_code == 2 and "position bits" in r.output or "bits 7" in r.output
