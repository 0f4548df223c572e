"""dqtool export --generation-graph beam: the whole generation as one ONNX graph (ONNX Runtime's
BeamSearch op) around the exported encoder/decoder, its tokens equal to Hugging Face's / dqtool's
runtime, the weights stored once, accepted by eval and bench, unsupported settings refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from transformers import GenerationConfig

from dqtool.base.errors import DQToolError
from dqtool.runtimes.beamgraph import (GenerationGraph, build_generation_graph, expected_sequences, restore_eos,
                                      unsupported)
from dqtool.runtimes.genconfig import resolve_generation_config
from test_ort_runtime import _batch, exported  # noqa: F401  (a fixture: lively tiny models, optimum-exported)

# Settings the op runs exactly (token ids, n-gram size and early stopping are fixed at export:
# one graph per setting here).
CONFIGS = [
    {},  # the generation config: greedy, max_length 21, forced EOS (= eos) at the end
    dict(num_beams=1, max_length=16, min_length=10, no_repeat_ngram_size=2),
    dict(num_beams=2, max_length=24, length_penalty=0.5, early_stopping=False, num_return_sequences=2),
    dict(num_beams=3, max_length=30, no_repeat_ngram_size=2, min_length=6, length_penalty=2.0, early_stopping=True),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=[str(k) for k in CONFIGS])
def test_graph_tokens_equal_hugging_face(exported, tmp_path, kw):  # noqa: F811
    hf, folder = exported("bart")
    shutil.copytree(folder, tmp_path / "onnx")
    gc = resolve_generation_config(hf, None, dict(kw))
    build_generation_graph(tmp_path / "onnx", gc, hf.config.d_model)
    graph = GenerationGraph.from_folder(tmp_path / "onnx", threads=1)
    ids, mask = _batch(hf.config.pad_token_id, hf.config.eos_token_id)
    with torch.inference_mode():
        want = hf.generate(input_ids=ids, attention_mask=mask, **kw)
    got = graph.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, want), f"\ngraph {got.tolist()}\nHF    {want.tolist()}"
    # rows really end at different steps (the EOS the op leaves out is put back)
    assert len({int((r != hf.config.pad_token_id).sum()) for r in want}) > 1
    # the op's raw layout is what expected_sequences predicts from Hugging Face's tokens
    raw = graph.run(ids.numpy(), mask.numpy(), resolve_generation_config(graph, None, dict(kw)))
    assert (raw.reshape(-1, raw.shape[-1]) == expected_sequences(want.numpy(), gc)).all()
    if kw.get("no_repeat_ngram_size"):  # fixed at export: another value is refused, not ignored
        with pytest.raises(ValueError, match="no_repeat_ngram_size 0 differs from the generation graph's"):
            graph.generate(input_ids=ids, attention_mask=mask, **dict(kw, no_repeat_ngram_size=0))


def test_unsupported_settings_are_refused_in_one_line():
    base = dict(decoder_start_token_id=2, eos_token_id=2, pad_token_id=1, max_length=20, num_beams=2)
    assert unsupported(GenerationConfig(**base)) is None
    assert unsupported(GenerationConfig(**base, forced_eos_token_id=2)) is None  # run as max_length - 1
    for extra, word in ((dict(forced_bos_token_id=0), "forced_bos_token_id"),
                        (dict(forced_eos_token_id=5), "forced_eos_token_id"),
                        (dict(eos_token_id=[2, 3]), "several eos_token_id"),
                        (dict(early_stopping="never"), "early_stopping 'never'"),
                        (dict(repetition_penalty=1.3), "repetition_penalty"),
                        (dict(bad_words_ids=[[7]]), "bad_words_ids")):
        why = unsupported(GenerationConfig(**{**base, **extra}))
        assert why and word in why and "\n" not in why, (extra, why)
    # Below 3 output positions onnxruntime's op fails (or reads out of bounds): refused, not run.
    for length, forced, ok in ((3, None, True), (2, None, False), (4, 2, True), (3, 2, False), (2, 2, False)):
        why = unsupported(GenerationConfig(**{**base, "max_length": length, "forced_eos_token_id": forced}))
        assert (why is None) == ok and (ok or "too short" in why), (length, forced, why)


def test_too_short_generations_are_refused_not_run(exported, tmp_path):  # noqa: F811
    hf, folder = exported("bart")
    shutil.copytree(folder, tmp_path / "onnx")
    build_generation_graph(tmp_path / "onnx", resolve_generation_config(hf, None, {}), hf.config.d_model)
    graph = GenerationGraph.from_folder(tmp_path / "onnx", threads=1)
    ids, mask = _batch(hf.config.pad_token_id, hf.config.eos_token_id)
    for n in (1, 2):   # the config forces EOS at the end: the op would get max_length n
        with pytest.raises(ValueError, match=f"too short .* ask for at least 3 new tokens"):
            graph.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n)
    with torch.inference_mode():
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert torch.equal(graph.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3), want)


def test_restore_eos_and_expected_layout_round_trip():
    gc = GenerationConfig(eos_token_id=2, pad_token_id=1, max_length=6, decoder_start_token_id=2)
    hf = np.array([[2, 5, 6, 2, 1, 1], [2, 7, 8, 9, 10, 11]])
    op = expected_sequences(hf, gc)
    assert op.tolist() == [[2, 5, 6, 1, 1, 1], [2, 7, 8, 9, 10, 11]]
    assert restore_eos(op, gc).tolist() == hf.tolist()


@pytest.fixture(scope="module")
def beam_export(tmp_path_factory):
    from dqtool.stages.export import ExportConfig, export
    from test_export import _packed

    root = tmp_path_factory.mktemp("gen-graph")
    packed = _packed(root, "bart", "2-2-8")
    r = export(packed, root / "onnx", ExportConfig(generation_graph="beam"))
    return r, root / "onnx", packed


def test_export_writes_a_validated_graph_with_the_weights_once(beam_export):
    from dqtool.formats.manifest import verify_folder
    from dqtool.formats.onnx import DATA_FILE, GENERATION_FILE

    r, out, _ = beam_export
    gg = r.check["generation_graph"]
    assert gg["greedy"] == "tokens equal" and gg["beam2"] == "tokens equal"
    m = verify_folder(out, "export")  # the graph is in the manifest, hashed
    assert f"onnx/{GENERATION_FILE}" in m["sizes"]
    assert json.loads((out / "export.json").read_text())["generation_graph"] == GENERATION_FILE
    # Weights once: the graph holds no tensor data of its own; every weight is a reference into
    # the one weights file the encoder and decoder graphs read, which did not grow.
    model = onnx.load(str(out / "onnx" / GENERATION_FILE), load_external_data=False)
    inline = sum(len(i.raw_data) for i in model.graph.initializer)
    assert inline < 1024
    locations = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {DATA_FILE}
    assert sorted(f.name for f in (out / "onnx").glob("*_data")) == [DATA_FILE]
    assert (out / "onnx" / DATA_FILE).stat().st_size == r.sizes["weights"]
    # no initializer inside the subgraphs (each weight in memory once, in the main graph)
    bs = next(n for n in model.graph.node if n.op_type == "BeamSearch")
    assert all(len(a.g.initializer) == 0 for a in bs.attribute if a.type == onnx.AttributeProto.GRAPH)
    assert {a.name for a in bs.attribute if a.type == onnx.AttributeProto.GRAPH} == {"encoder", "decoder"}


def test_eval_and_bench_accept_the_graph(beam_export, tmp_path):
    from dqtool.formats.onnx import GENERATION_FILE
    from dqtool.runtimes.load import load_model
    from dqtool.stages.bench.stage import BenchConfig, bench

    _, out, _ = beam_export
    path = out / "onnx" / GENERATION_FILE
    model, tok, kind = load_model(path, threads=1)
    folder_model, _, _ = load_model(out, threads=1)
    assert kind == "onnx-beam" and tok is not None
    ids, mask = _batch()
    for kw in (dict(num_beams=1), dict(num_beams=2, early_stopping=True)):
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kw),
                           folder_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kw))
    r = bench([str(path)], tmp_path / "bench", BenchConfig(runs=1, warmup=1, source_tokens=8, new_tokens=4,
                                                           batch_sizes=(1, 2), plots=False), log=lambda m: None)
    row = r.report["rows"][0]
    assert row["kind"] == "onnx-beam" and set(row["bytes"]["files"]) == {GENERATION_FILE, "weights.onnx_data"}
    assert row["latency"]["2"]["new_tokens"] == 4 and row["latency"]["1"]["decode_per_token"]["median_ms"] > 0
    assert row["kernels"][GENERATION_FILE]["ops"]


def test_export_refuses_a_config_the_op_cannot_run(beam_export, tmp_path):
    from dqtool.stages.export import ExportConfig, export

    _, _, packed = beam_export
    edited = tmp_path / "packed"
    shutil.copytree(packed, edited)
    gen = json.loads((edited / "generation_config.json").read_text())
    gen["forced_bos_token_id"] = 0
    (edited / "generation_config.json").write_text(json.dumps(gen))
    from dqtool.formats.manifest import write_manifest  # the packed manifest re-hashed after the edit
    m = json.loads((edited / "dqtool-manifest.json").read_text())
    write_manifest(edited, m["stage"], inputs=m.get("inputs", {}), config=m.get("config", {}),
                   extra={k: v for k, v in m.items() if k not in ("stage", "inputs", "config", "files")})
    with pytest.raises(DQToolError, match=r"^--generation-graph beam: forced_bos_token_id 0 is not supported"):
        export(edited, tmp_path / "onnx", ExportConfig(generation_graph="beam"))
    assert not (tmp_path / "onnx").exists()


def test_recipe_key_export_generation_graph():
    from dqtool.base.config_error import ConfigError
    from dqtool.base.errors import DQToolError as Err
    from dqtool.compress import recipe_from_dict

    base = {"teacher": "t", "data": "d", "work": "w", "schemes": ["2-2-8"]}
    rec = recipe_from_dict({**base, "export": {"generation_graph": "beam"}}, check_paths=False)
    assert rec.export.generation_graph == "beam"
    with pytest.raises((ConfigError, Err), match="generation_graph 'greedy' is not supported: choose none, beam"):
        recipe_from_dict({**base, "export": {"generation_graph": "greedy"}}, check_paths=False)
