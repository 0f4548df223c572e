"""The lean cached decoder step of the generation graph (dqtool.model.decoder_step): its PyTorch
forward is Hugging Face's cached step, its ONNX graph runs one MultiHeadAttention node per attention
and no head reshaping, the BeamSearch graph around it gives the ONNX runtime's tokens (export's own
check) and holds every weight once; architectures and schemes it does not cover keep optimum's step."""

from __future__ import annotations

import collections
from pathlib import Path

import onnx
import pytest
import torch

from dqtool.base.config_error import ConfigError
from dqtool.formats.onnx import GENERATION_FILE
from dqtool.model.decoder_step import DecoderStep, fix_attention_inputs, quantizes_attention
from dqtool.model.registry import spec_for
from dqtool.qmath.scheme import QuantScheme
from dqtool.stages.export import ExportConfig, export
from tiny import pack_tiny, tiny_model

MAIN = dict(act_granularity="block", encoder_act_granularity="token", quantize_attention=False)


def _cached_step_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = model.config.vocab_size
    ids = torch.randint(4, v, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    dec = torch.randint(4, v, (2, 5), generator=g)
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :4], use_cache=True)
    legacy = out.past_key_values.to_legacy_cache()   # (before the next step grows the cache in place)
    past = [t.clone() for layer in legacy for t in layer[:2]] + [t.clone() for layer in legacy for t in layer[2:]]
    ref = model(encoder_outputs=(out.encoder_last_hidden_state,), attention_mask=mask, decoder_input_ids=dec[:, 4:],
                past_key_values=out.past_key_values, use_cache=True)
    return (dec[:, 4:].int(), mask.int(), *past), ref


@pytest.mark.parametrize("arch", ["bart", "mbart"])
@torch.no_grad()
def test_step_forward_is_hugging_faces_cached_step(arch):
    model = tiny_model(arch, 2, 2).eval()
    layout = spec_for(model.config).decoder_step
    assert layout == {"bart": "post-norm", "mbart": "pre-norm"}[arch]
    args, ref = _cached_step_inputs(model)
    out = DecoderStep(model, layout)(*args)
    assert torch.allclose(out[0], ref.logits, atol=1e-5), float((out[0] - ref.logits).abs().max())
    legacy = ref.past_key_values.to_legacy_cache()
    for i, layer in enumerate(legacy):   # the cache grown by the new token, as Hugging Face's
        assert torch.allclose(out[1 + 2 * i], layer[0], atol=1e-6)
        assert torch.allclose(out[2 + 2 * i], layer[1], atol=1e-6)
    # the other layout is not the same computation: the test can fail
    other = "pre-norm" if layout == "post-norm" else "post-norm"
    assert not torch.allclose(DecoderStep(model, other)(*args)[0], ref.logits, atol=1e-3)


def test_registry_has_step_layouts_only_where_the_module_fits():
    assert {a: spec_for(tiny_model(a, 1, 1).config).decoder_step for a in ("marian", "pegasus", "t5")} == \
        {"marian": "", "pegasus": "", "t5": ""}
    with pytest.raises(ValueError, match="layout 'x' is unknown"):
        DecoderStep(tiny_model("bart", 1, 1), "x")


def test_fix_attention_inputs_puts_inputs_at_their_slots():
    from onnx import helper

    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "pk", "pv"], ["o"], domain="com.microsoft",
                            num_heads=2, dqtool_slots=[0, 1, 2, 6, 7])
    graph = helper.make_graph([node], "g", [], [])
    assert fix_attention_inputs(graph) == 1
    assert list(graph.node[0].input) == ["q", "k", "v", "", "", "", "pk", "pv"]
    assert [a.name for a in graph.node[0].attribute] == ["num_heads"]
    assert fix_attention_inputs(graph) == 0


def _decoder_subgraph(folder: Path):
    m = onnx.load(str(folder / "onnx" / GENERATION_FILE), load_external_data=False)
    bs = next(n for n in m.graph.node if n.op_type == "BeamSearch")
    dec = next(a.g for a in bs.attribute if a.name == "decoder")
    return m, collections.Counter(n.op_type for n in dec.node)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    root = tmp_path_factory.mktemp("step")
    model = tiny_model("bart", 2, 2, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128)
    packed = pack_tiny(root, model, QuantScheme.from_wea_pos("2-2-8", "e", **MAIN))
    out = {s: export(packed, root / s, ExportConfig(generation_graph="beam", decoder_step=s))
           for s in ("lean", "optimum")}
    return out, root


def test_lean_step_graph_tokens_equal_and_weights_once(two_steps):
    out, root = two_steps
    lean, opt = out["lean"], out["optimum"]
    # export's own check: greedy and beam tokens equal to the ONNX runtime's (step by step)
    assert lean.check["generation_graph"]["decoder_step"] == "lean (MultiHeadAttention)"
    assert lean.check["generation_graph"]["greedy"] == lean.check["generation_graph"]["beam2"] == "tokens equal"
    assert opt.check["generation_graph"]["decoder_step"] == "optimum"
    m_lean, ops_lean = _decoder_subgraph(root / "lean")
    m_opt, ops_opt = _decoder_subgraph(root / "optimum")
    layers, linears = 2, 2 * 8 + 1   # q, k, v, o, cross q, cross o, fc1, fc2 per layer; lm_head
    assert ops_lean["MultiHeadAttention"] == 2 * layers
    assert ops_lean["MatMulNBits"] == ops_opt["MatMulNBits"] == linears
    # heads split inside the attention op: the Reshapes left unpack the looked-up embedding and position rows
    assert "Transpose" not in ops_lean and ops_lean["Reshape"] <= 4 < ops_opt["Reshape"]
    assert sum(ops_lean.values()) < sum(ops_opt.values()) / 2
    # weights once: the same initializers, and the weight unpacking both subgraphs read is one set of
    # main-graph nodes (the lean step's copies merged), so ORT folds each weight once
    assert {i.name for i in m_lean.graph.initializer} == {i.name for i in m_opt.graph.initializer}
    assert len(m_lean.graph.node) <= len(m_opt.graph.node)
    assert (root / "lean" / "onnx" / GENERATION_FILE).stat().st_size <= \
        (root / "optimum" / "onnx" / GENERATION_FILE).stat().st_size


def test_steps_the_lean_graph_does_not_cover_keep_optimums(tmp_path):
    # a scheme that quantizes the attention matmuls' inputs (MultiHeadAttention computes them in float)
    model = tiny_model("bart", 1, 1)
    packed = pack_tiny(tmp_path / "a", model, QuantScheme.from_wea("8-8-8"))
    from dqtool.formats.packed import load_packed

    assert quantizes_attention(load_packed(packed)[0])
    r = export(packed, tmp_path / "a" / "onnx", ExportConfig(generation_graph="beam"))
    assert r.check["generation_graph"]["decoder_step"] == "optimum"
    # an architecture without a registry layout
    model = tiny_model("pegasus", 1, 1, forced_eos_token_id=None)
    packed = pack_tiny(tmp_path / "m", model, QuantScheme.from_wea("8-8-8", quantize_attention=False))
    r = export(packed, tmp_path / "m" / "onnx", ExportConfig(generation_graph="beam"))
    assert r.check["generation_graph"]["decoder_step"] == "optimum"


def test_decoder_step_choice_is_validated():
    with pytest.raises(ConfigError, match="--decoder-step 'x' is not supported: choose lean, optimum"):
        ExportConfig(decoder_step="x")


def test_pre_norm_step_with_float_positions_exports_with_equal_tokens(tmp_path):
    # mBART: the pre-norm layout, a final layer norm, scaled embeddings, float (unquantized) positions
    model = tiny_model("mbart", 2, 2, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, scale_embedding=True)
    packed = pack_tiny(tmp_path, model, QuantScheme.from_wea("2-2-8", **MAIN))
    r = export(packed, tmp_path / "onnx", ExportConfig(generation_graph="beam"))
    gg = r.check["generation_graph"]
    assert gg["decoder_step"] == "lean (MultiHeadAttention)"
    assert gg["greedy"] == gg["beam2"] == "tokens equal"
    _, ops = _decoder_subgraph(tmp_path / "onnx")
    assert ops["MultiHeadAttention"] == 4 and ops["LayerNormalization"] == 2 * 3 + 2   # + embedding and final norms


def test_graph_timing_split_runs_in_the_graphs_own_session(two_steps):
    # bench times a generation graph's encoder as a 2-token generation in the graph's own session and
    # divides the rest of a generation by the cached steps beyond it (no second session beside it)
    from dqtool.runtimes.beamgraph import MIN_OP_LENGTH, GenerationGraph
    from dqtool.stages.bench.stage import BenchConfig, measure_latency
    from dqtool.stages.bench.target import folder_target

    _, root = two_steps
    target = folder_target(root / "lean" / "onnx" / GENERATION_FILE, "dqtool", 1)
    model, tok = target.load()
    assert isinstance(model, GenerationGraph) and model.encode_steps == MIN_OP_LENGTH - 2
    row = measure_latency(target, model, tok, BenchConfig(source_tokens=8, new_tokens=12, runs=2, warmup=1,
                                                         threads=1, batch_sizes=(1,)))["1"]
    assert row["new_tokens"] == 12 and row["encoder_includes_decoder_steps"] == 2
    # the config's forced EOS: the op runs max_length - 1, so 10 cached steps, 9 beyond the encoder's one
    assert model.last_steps == 10
    assert row["decode_per_token"]["median_ms"] > 0 and row["encoder"]["median_ms"] > 0
