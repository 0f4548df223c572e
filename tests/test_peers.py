"""dqtool.stages.bench.peers: every peer builds from a tiny BART teacher (and student), is smaller than
fp32 where it should be, holds the quantized ops it claims, and generates as bench calls it.

The tiny models have d_model 64 (at 16, ONNX graph overhead outweighs the weights and a
quantized graph is not smaller) and, like tests/test_ort_runtime.py, untied unit-scale
weights, so greedy outputs depend on the input and rows end at different steps. Their
vocabulary (320 rows) is larger than the tokenizer's (300 tokens), as in padded
checkpoints, which the CTranslate2 conversion has to handle.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch

from dqtool.stages.bench.stage import _greedy_exact
from dqtool.base.errors import DQToolError
from dqtool.stages.evaluate import EvalConfig
from dqtool.stages.export import _all_graphs
from dqtool.stages.bench.peers import PEERS, STAMP_FILE, _build, build_peers, ctranslate2_int8_peer

LENGTHS = (9, 4, 12, 6, 7, 3)  # one padded batch of different source lengths
INT8 = ("pytorch-int8-dynamic", "ort-int8-dynamic", "student-ort-int8-dynamic", "ctranslate2-int8")


def _model(dec_layers: int, seed: int, eos_scale: float, eos_bias: float):
    from tiny import tiny_config
    from transformers import AutoModelForSeq2SeqLM

    cfg = tiny_config("bart", 2, dec_layers)
    cfg.d_model, cfg.encoder_ffn_dim, cfg.decoder_ffn_dim = 64, 128, 128
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.get_output_embeddings().weight[cfg.eos_token_id] *= eos_scale  # EOS now and then
        model.final_logits_bias[0, cfg.eos_token_id] += eos_bias
        for module in model.modules():  # untied: save_pretrained keeps every copy
            emb = getattr(module, "embed_tokens", None)
            if isinstance(emb, torch.nn.Embedding):
                emb.weight = torch.nn.Parameter(emb.weight.detach().clone())
    return model


def _save(path: Path, dec_layers: int, seed: int, eos_scale: float, eos_bias: float) -> Path:
    from tiny import tiny_tokenizer

    _model(dec_layers, seed, eos_scale, eos_bias).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(LENGTHS), max(LENGTHS)), 1, dtype=torch.long)  # pad 1
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        ids[row, :n] = torch.randint(3, 300, (n,), generator=g)
        ids[row, n - 1] = 2  # EOS
        mask[row, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """All peers built once: targets by name, loaded models, the HF teacher and student."""
    from transformers import AutoModelForSeq2SeqLM

    root = tmp_path_factory.mktemp("peers")
    # (EOS scale, bias) chosen so that greedy rows of both end at different steps
    teacher, student = _save(root / "teacher", 2, 0, 5.0, 2.0), _save(root / "student", 1, 1, 2.0, 0.0)
    logs = []
    targets = build_peers(PEERS, teacher, student, root / "work", threads=1, log=logs.append)
    loaded = {}

    def load(name):
        if name not in loaded:
            loaded[name] = by_name[name].load()
        return loaded[name]

    by_name = {t.name: t for t in targets}
    hf = {k: AutoModelForSeq2SeqLM.from_pretrained(p).eval() for k, p in (("teacher", teacher), ("student", student))}
    return SimpleNamespace(root=root, teacher=teacher, student=student, work=root / "work", targets=targets,
                           by_name=by_name, load=load, hf=hf, logs=logs)


def _hf_for(name: str, peers):
    return peers.hf["student" if name.startswith("student-") else "teacher"]


def _size(files) -> int:
    return sum(Path(f).stat().st_size for f in files)


def _walk(folder: Path):
    """(all nodes, names of float initializers) over every graph and subgraph of a folder."""
    nodes, floats = [], set()
    for f in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        m = onnx.load(str(folder / f))
        for g in _all_graphs(m.graph):
            nodes += list(g.node)
            floats |= {i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return nodes, floats


# --------------------------------------------------------------------------- errors


def test_unknown_peer_and_missing_inputs(tmp_path, tiny_dir):
    teacher = tiny_dir("bart", 2, 2)
    with pytest.raises(DQToolError, match="peer 'onnx-int3' is unknown: choose from pytorch-int8-dynamic"):
        build_peers(["onnx-int3"], teacher, None, tmp_path, threads=1)
    with pytest.raises(DQToolError, match="pass --student"):
        build_peers(["ort-fp32", "student-ort-int4-rtn"], teacher, None, tmp_path, threads=1)
    with pytest.raises(DQToolError, match="not found"):
        build_peers(["ort-fp32"], tmp_path / "nope", None, tmp_path, threads=1)
    assert not any(tmp_path.iterdir())  # checked before anything was built


def test_missing_ctranslate2_says_how_to_install(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import ctranslate2 -> ImportError
    with pytest.raises(DQToolError, match="pip install ctranslate2"):
        build_peers(["ctranslate2-int8"], tiny_dir("bart", 2, 2), None, tmp_path, threads=1)


def test_build_is_atomic_and_stamped(tmp_path):
    def fail(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("quantizer exploded")

    with pytest.raises(DQToolError, match="building peer demo failed .*quantizer exploded"):
        _build("demo", tmp_path / "demo", {"recipe": 1}, fail, log=print)
    assert list(tmp_path.iterdir()) == []  # nothing half-built left behind
    made = []
    for recipe in (1, 1, 2):  # built, reused, rebuilt for a new recipe
        _build("demo", tmp_path / "demo", {"recipe": recipe}, lambda tmp: made.append(tmp), log=print)
    assert len(made) == 2 and (tmp_path / "demo" / STAMP_FILE).is_file()


# --------------------------------------------------------------------------- what was built


def test_targets(peers):
    assert [t.name for t in peers.targets] == list(PEERS)
    for t in peers.targets:
        assert t.role == "peer" and t.kind and len(t.notes) > 40, t.name
        assert t.files and all(Path(f).is_file() for f in t.files), t.name
        assert (t.encode is None) == (t.kind == "ctranslate2"), t.name
    onnx_peers = [t for t in peers.targets if t.kind == "onnx"]
    for t in onnx_peers:  # the footprint is what OnnxSeq2Seq loads: encoder + one merged decoder
        assert sorted(Path(f).name for f in t.files) == ["decoder_model_merged.onnx", "encoder_model.onnx"]
    assert "per_channel=True" in peers.by_name["ort-int8-dynamic"].notes
    assert "block_size=32" in peers.by_name["ort-int4-rtn"].notes


def test_footprints_shrink(peers):
    fp32 = {who: _size(sorted((peers.work / f"{who}ort-fp32").glob("*.onnx"))) for who in ("", "student-")}
    size = {t.name: _size(t.files) for t in peers.targets}
    assert size["ort-fp32"] == fp32[""]
    for who in ("", "student-"):
        assert size[f"{who}ort-int8-dynamic"] < 0.7 * fp32[who]
        assert size[f"{who}ort-int4-rtn"] < 0.7 * fp32[who]
    weights = (peers.teacher / "model.safetensors").stat().st_size
    assert size["pytorch-int8-dynamic"] < 0.7 * weights
    assert size["ctranslate2-int8"] < 0.4 * weights  # int8 weights and embeddings


def test_quantized_ops(peers):
    for name in ("ort-int8-dynamic", "student-ort-int8-dynamic"):
        nodes, floats = _walk(Path(peers.by_name[name].path))
        ops = {n.op_type for n in nodes}
        assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, name
        # every weight MatMul quantized, in the If branches of the merged decoder too
        assert not [n for n in nodes if n.op_type == "MatMul" and n.input[1] in floats], name
    for name in ("ort-int4-rtn", "student-ort-int4-rtn"):
        nodes, floats = _walk(Path(peers.by_name[name].path))
        nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
        assert nbits, name
        for n in nbits:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 4), attrs
            assert len([i for i in n.input if i]) == 3, "symmetric: A, B, scales, no zero points"
        assert not [n for n in nodes if n.op_type == "MatMul" and n.input[1] in floats], name
    linears = [m for m in peers.load("pytorch-int8-dynamic")[0].modules() if isinstance(m, torch.nn.Linear)]
    assert not linears  # every nn.Linear replaced by a dynamically quantized one


def test_reuse(peers):
    before = {t.name: [Path(f).stat().st_mtime_ns for f in t.files] for t in peers.targets}
    logs = []
    again = build_peers(PEERS, peers.teacher, peers.student, peers.work, threads=1, log=logs.append)
    assert {t.name: [Path(f).stat().st_mtime_ns for f in t.files] for t in again} == before
    assert sum("reusing" in line for line in logs) >= len(PEERS)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", PEERS)
def test_latency_kwargs_give_exactly_n_tokens(peers, name):
    model, _ = peers.load(name)
    ids, mask = _batch()
    for n in (1, 5):
        out = model.generate(input_ids=ids, attention_mask=mask, **_greedy_exact(n))
        assert out.dtype == torch.long and tuple(out.shape) == (len(LENGTHS), n + 1), (name, n)
        assert (out[:, 0] == 2).all()  # BART's decoder start token


@pytest.mark.parametrize("name", PEERS)
def test_quality_kwargs_give_hf_style_output(peers, name):
    model, tok = peers.load(name)
    ids, mask = _batch()
    greedy = EvalConfig(data="d", max_length=20)  # what bench's quality runs
    beams = EvalConfig(data="d", num_beams=3, max_length=20, min_length=6, no_repeat_ngram_size=3)
    for cfg in (greedy, beams):
        out = model.generate(input_ids=ids, attention_mask=mask, **cfg.generate_kwargs())
        assert out.shape[0] == len(LENGTHS) and out.shape[1] <= 20, (name, tuple(out.shape))
        assert (out[:, 0] == 2).all() and int(out.max()) < 320
        for row in out.tolist():
            end = row.index(2, 1) if 2 in row[1:] else len(row)
            assert end >= cfg.min_length, (name, row)  # no EOS before min_length (start token counted)
            assert all(t == 1 for t in row[end + 1:]), (name, row)  # pad after EOS
        assert len(tok.batch_decode(out, skip_special_tokens=True)) == len(LENGTHS)
        if name in INT8 and cfg is greedy:  # int8 stays close to fp32 on these well-separated logits
            with torch.inference_mode():
                want = _hf_for(name, peers).generate(input_ids=ids, attention_mask=mask, **cfg.generate_kwargs())
            width = min(want.shape[1], out.shape[1])
            assert (want[:, :width] == out[:, :width]).float().mean() > 0.5, (name, out.tolist(), want.tolist())


@pytest.mark.parametrize("kwargs", [_greedy_exact(7), EvalConfig(data="d", max_length=20).generate_kwargs(),
                                    dict(num_beams=1, max_length=12, min_length=9)])
def test_ort_fp32_equals_hf(peers, kwargs):
    ids, mask = _batch()
    with torch.inference_mode():
        want = peers.hf["teacher"].generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = peers.load("ort-fp32")[0].generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, want), f"\nORT {got.tolist()}\nHF  {want.tolist()}"


@pytest.mark.parametrize("kwargs", [
    _greedy_exact(7),                                                   # forced EOS as the last token
    EvalConfig(data="d", max_length=20).generate_kwargs(),              # EOS at different steps, padding
    dict(num_beams=1, max_length=12, min_length=9, do_sample=False),    # min_length counts the start token
    dict(num_beams=1, max_length=12, min_new_tokens=8, forced_bos_token_id=0),  # BOS as a target prefix
])
def test_ctranslate2_wrapper_equals_hf_at_float32(peers, kwargs):
    """At float32 CTranslate2 computes what HF computes, so greedy tokens must match exactly:
    this checks the wrapper's mapping of lengths and special tokens (int8 then only adds noise)."""
    target = ctranslate2_int8_peer(peers.teacher, peers.work, threads=1, log=lambda *a: None,
                                   quantization="float32", name="ctranslate2-float32")
    model, _ = target.load()
    ids, mask = _batch()
    with torch.inference_mode():
        want = peers.hf["teacher"].generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, want), f"\nCT2 {got.tolist()}\nHF  {want.tolist()}"
