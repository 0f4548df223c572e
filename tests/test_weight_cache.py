"""The weight cache: packed (and QAT) models keep their dequantized weights between
forwards, with outputs bit for bit those of the uncached runtime, and never stale."""

import copy

import pytest
import torch

from dqtool.formats.packed import load_packed
from dqtool.stages.convert import ConvertConfig, convert
from dqtool.base.errors import DQToolError
from dqtool.model.packed import PackedEmbedding, PackedLinear
from dqtool.formats.qat import load_qat
from dqtool.model.weight_cache import cache_scope, set_weight_cache
from test_convert import SCHEMES, _ids, make_qat
from tiny import ARCHS


def _packed(tmp_path, arch="bart", scheme="2-2-8"):
    qat_dir = make_qat(tmp_path / "qat", arch, scheme)
    convert(qat_dir, tmp_path / "packed", ConvertConfig(float_dtype="float32", check_samples=1, check_length=4))
    return tmp_path / "packed"


def _logits(model, ids, dec):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=dec).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_cached_runtime_logits_bit_equal_to_uncached(tmp_path, arch, scheme):
    folder = _packed(tmp_path, arch, scheme)
    ref, _ = load_packed(folder, cache="none")   # the runtime as it was: dequantize on every forward
    ids, dec = _ids(), _ids(3, 5, seed=1)
    want = _logits(ref, ids, dec)
    gen = dict(max_new_tokens=6, do_sample=False, num_beams=1)
    want_gen = ref.generate(input_ids=ids, **gen)
    assert ref.dqtool_weight_cache.entries() == 0
    for mode in ("model", "generate"):
        model, _ = load_packed(folder, cache=mode)
        for _ in range(2):  # the second pass reads the kept weights (mode "model")
            assert torch.equal(_logits(model, ids, dec), want), mode
            assert torch.equal(model.generate(input_ids=ids, **gen), want_gen), mode
        n_linear = sum(isinstance(m, PackedLinear) and m.tied_to is None for m in model.modules())
        if mode == "model":
            assert model.dqtool_weight_cache.entries() >= n_linear > 0
        else:
            assert model.dqtool_weight_cache.entries() == 0   # freed when generate returned


@pytest.mark.parametrize("arch,scheme", [("bart", "2-2-8"), ("t5v1_1", "2-2-8"), ("marian", "8-8-8-pact"),
                                         ("bart", "8-8-8-asym"), ("mbart", "8-8-8-asym-tensor"),
                                         ("t5", "4-none-8-tensor")])
def test_inference_shortcuts_bit_equal_to_the_reference_runtime(tmp_path, monkeypatch, arch, scheme):
    # The packed runtime's inference shortcuts (activation fake quant in fewer ops, the
    # q/k/v input quantized once, embedding rows read from the kept table) against the
    # runtime without them: the public quantize/dequantize path for every activation,
    # every Linear quantizing its own input, embeddings gathered from the codes.
    import dqtool.model.packed as packed_mod
    import dqtool.qmath.quant as quant
    from dqtool.model.qmodules import _ActQuant

    folder = _packed(tmp_path, arch, scheme)
    model, _ = load_packed(folder, cache="model")
    ids, dec = _ids(), _ids(3, 5, seed=1)
    gen = dict(max_new_tokens=6, do_sample=False, num_beams=1)
    got, got_gen = _logits(model, ids, dec), model.generate(input_ids=ids, **gen)
    assert torch.equal(_logits(model, ids, dec), got)   # second pass: kept weights, kept table
    monkeypatch.setattr(quant, "fake_quant_activation_inference",
                        lambda x, spec, clip=None: quant._fake_quant_value(x, spec, clip))
    monkeypatch.setattr(packed_mod, "keeps", lambda *a: False)
    ref, _ = load_packed(folder, cache="none")
    for m in ref.modules():
        if isinstance(m, _ActQuant):
            m.__dict__.pop("last", None)
    assert torch.equal(_logits(ref, ids, dec), got)
    assert torch.equal(ref.generate(input_ids=ids, **gen), got_gen)


def test_linears_reading_one_input_quantize_it_once(tmp_path):
    from dqtool.model.qmodules import LastInput

    model, _ = load_packed(_packed(tmp_path), cache="model")
    attn = model.model.encoder.layers[0].self_attn
    last = attn.q_proj.act.last
    assert isinstance(last, LastInput) and attn.k_proj.act.last is last and model.lm_head.act.last is last
    x = torch.randn(1, 4, attn.q_proj.in_features)
    with torch.no_grad():
        q = attn.q_proj.act(x)
        assert attn.k_proj.act(x) is q and attn.v_proj.act(x) is q      # computed once
        x.mul_(2)                                                         # an in-place edit is seen
        q2 = attn.v_proj.act(x)
        assert q2 is not q and torch.equal(q2, attn.q_proj.act.__class__.forward(attn.k_proj.act, x.clone()))
    del x, q, q2
    assert last.out is None                                               # freed with its input
    # Training: an input that needs a gradient is never reused (each Linear's own graph).
    x = torch.randn(1, 4, attn.q_proj.in_features, requires_grad=True)
    assert attn.q_proj.act(x) is not attn.k_proj.act(x) and last.out is None
    twin = copy.deepcopy(model)
    assert twin.model.encoder.layers[0].self_attn.k_proj.act.last is twin.lm_head.act.last is not last


def test_generate_mode_keeps_weights_only_inside_the_call(tmp_path):
    model, _ = load_packed(_packed(tmp_path), cache="generate")
    ctl = model.dqtool_weight_cache
    seen = []
    model.model.decoder.register_forward_hook(lambda *a: seen.append(ctl.entries()))
    model.generate(input_ids=_ids(), max_new_tokens=3, do_sample=False)
    assert seen and min(seen[1:]) > 0 and ctl.entries() == 0 and ctl.nbytes() == 0
    _logits(model, _ids(), _ids(3, 2))            # a plain forward outside generate keeps nothing
    assert ctl.entries() == 0
    with cache_scope(model):
        _logits(model, _ids(), _ids(3, 2))
        assert ctl.entries() > 0 and ctl.nbytes() > 0
    assert ctl.entries() == 0


def test_tied_lm_head_shares_the_embedding_table(tmp_path):
    model, _ = load_packed(_packed(tmp_path), cache="model")
    assert isinstance(model.lm_head, PackedLinear) and isinstance(model.model.shared, PackedEmbedding)
    assert model.lm_head.weight() is model.model.shared.table()


def test_cache_is_never_stale_after_buffers_change(tmp_path):
    folder = _packed(tmp_path)
    ids, dec = _ids(), _ids(3, 5, seed=1)
    model, _ = load_packed(folder, cache="model")
    ref, _ = load_packed(folder, cache="none")
    assert torch.equal(_logits(model, ids, dec), _logits(ref, ids, dec))
    # In place (load_state_dict copies into the buffers): scales and codes change.
    other = {k: v.clone() for k, v in ref.state_dict().items()}
    for k in other:
        if k.endswith(".scale"):
            other[k] = other[k] * 1.5
        if k.endswith("fc1.qweight"):
            other[k] = other[k].flip(0)
    ref.load_state_dict(other)
    model.load_state_dict(other)
    assert torch.equal(_logits(model, ids, dec), _logits(ref, ids, dec))
    # A reassigned buffer.
    fc = model.model.encoder.layers[0].fc2
    fc.scale = fc.scale * 0.5
    ref.model.encoder.layers[0].fc2.scale = ref.model.encoder.layers[0].fc2.scale * 0.5
    assert torch.equal(_logits(model, ids, dec), _logits(ref, ids, dec))
    # .to(): moved/cast buffers drop the kept weights, which come back in the new dtype.
    model.to(torch.float64)
    ref.to(torch.float64)
    assert model.dqtool_weight_cache.entries() == 0
    got = _logits(model, ids, dec)
    assert got.dtype == torch.float64 and torch.equal(got, _logits(ref, ids, dec))
    assert model.model.encoder.layers[0].fc1.weight().dtype == torch.float64


def test_deepcopy_of_a_cached_model_is_independent(tmp_path):
    model, _ = load_packed(_packed(tmp_path), cache="generate")
    ids = _ids()
    twin = copy.deepcopy(model)
    assert twin.dqtool_weight_cache is not model.dqtool_weight_cache
    gen = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(twin.generate(input_ids=ids, **gen), model.generate(input_ids=ids, **gen))
    assert twin.dqtool_weight_cache.entries() == 0


def test_qat_model_cache_only_at_inference(tmp_path):
    qat_dir = make_qat(tmp_path / "qat", "bart", "2-2-8")
    ref, _ = load_qat(qat_dir)
    model, _ = load_qat(qat_dir)
    ctl = set_weight_cache(model, "model")
    ids, dec = _ids(), _ids(3, 5, seed=1)
    assert torch.equal(_logits(model, ids, dec), _logits(ref, ids, dec))
    # One entry for the embedding, its aliases and the tied lm_head (same weight, same spec).
    n_quant = sum(type(m).__name__ == "QuantLinear" and m.wspec is not None for m in model.modules())
    assert ctl.entries() == n_quant
    # Training: the weight needs a gradient, so nothing is read from or put in the cache ...
    ctl.clear()
    model.train()
    out = model(input_ids=ids, decoder_input_ids=dec, labels=dec)
    out.loss.backward()
    assert ctl.entries() == 0 and model.model.encoder.layers[0].fc1.weight.grad is not None
    # ... and an update of the weights (as an optimizer step makes) is seen by the next inference.
    model.eval()
    _logits(model, ids, dec)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            p.add_(0.01)
            q.copy_(p)
    assert torch.equal(_logits(model, ids, dec), _logits(ref, ids, dec))


def test_unknown_cache_mode_is_one_line_error(tmp_path):
    with pytest.raises(DQToolError, match="weight cache 'always'"):
        load_packed(tmp_path, cache="always")
    with pytest.raises(DQToolError, match="weight cache"):
        ConvertConfig(weight_cache="fast")


# --------------------------------------------------------------------------- integer matmul

INTEGER_CASES = [("bart", "2-2-8"), ("mbart", "2-2-8"), ("marian", "8-8-8-pact"), ("pegasus", "2-2-8"),
                 ("t5", "4-none-8-tensor"), ("t5v1_1", "2-2-8")]


@pytest.mark.parametrize("arch,scheme", INTEGER_CASES)
def test_integer_matmul_equals_float_runtime_up_to_rounding(tmp_path, arch, scheme):
    # matmul="integer": int8 input codes x weight codes summed exactly in int32, then the two
    # scales. Logits equal the float runtime's (the QAT model's) up to float32 rounding; the
    # greedy tokens are the same.
    from dqtool.model.packed import PackedLinear

    folder = _packed(tmp_path, arch, scheme)
    ref, _ = load_packed(folder)
    model, _ = load_packed(folder, matmul="integer")
    n_int = sum(isinstance(m, PackedLinear) and m.matmul == "integer" for m in model.modules())
    assert n_int == sum(isinstance(m, PackedLinear) and m.integer_capable() for m in model.modules()) > 0
    ids, dec = _ids(), _ids(3, 5, seed=1)
    want, got = _logits(ref, ids, dec), _logits(model, ids, dec)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max() + 1e-6
    gen = dict(max_new_tokens=6, do_sample=False, num_beams=1)
    assert torch.equal(model.generate(input_ids=ids, **gen), ref.generate(input_ids=ids, **gen))
    assert torch.equal(_logits(model, ids, dec), got)   # kept codes: the same result again


def test_integer_linear_is_the_exact_integer_sum_times_the_scales(tmp_path):
    # One Linear against a float64 computation of sum(xq * wq) * sx * sw + b: the int32 sum is
    # exact, so only the final products round (a few float32 ulps), whereas the float runtime
    # rounds every partial sum.
    from dqtool.model.packed import PackedLinear, set_matmul
    from dqtool.qmath.quant import activation_codes

    model, _ = load_packed(_packed(tmp_path, "bart", "2-2-8"))
    lin = next(m for m in model.modules() if isinstance(m, PackedLinear) and m.tied_to is None)
    set_matmul(model, "integer")
    x = torch.randn(5, 3, lin.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = lin(x)
    xq, sx = activation_codes(x.reshape(-1, lin.in_features), lin.act_spec)
    exact = (xq.double() @ lin.codes().double().t()) * sx.double() * lin.scale.double() + lin.bias.double()
    err = (y.reshape(-1, lin.out_features).double() - exact).abs()
    assert err.max() <= 4 * 2.0 ** -24 * (exact.abs() + lin.bias.double().abs()).max()
    assert lin.codes().dtype == torch.int8


def test_integer_matmul_keeps_one_byte_per_weight(tmp_path):
    from dqtool.model.packed import PackedLinear

    folder = _packed(tmp_path, "bart", "2-2-8")
    model, _ = load_packed(folder, matmul="integer")
    ids, dec = _ids(), _ids(3, 5, seed=1)
    _logits(model, ids, dec)
    kept = model.dqtool_weight_cache._entries.values()
    assert kept and all(t.dtype == torch.int8 for _, t in kept)   # no float copy of any weight or table
    n_weights = sum(m.out_features * m.in_features for m in model.modules()
                    if isinstance(m, PackedLinear) and m.tied_to is None) \
        + sum(m.num_embeddings * m.embedding_dim for m in model.modules() if isinstance(m, PackedEmbedding))
    assert model.dqtool_weight_cache.nbytes() == n_weights


def test_integer_matmul_errors_are_one_line(tmp_path):
    with pytest.raises(DQToolError, match="matmul 'int4'"):
        load_packed(tmp_path, matmul="int4")
    folder = _packed(tmp_path, "bart", "3-4-none")   # float activations: nothing can run in integers
    with pytest.raises(DQToolError, match="no Linear of scheme 3-4-none can compute in integers"):
        load_packed(folder, matmul="integer")
    model, _ = load_packed(_packed(tmp_path / "g", "bart", "4-4-8-g8"), matmul="integer")  # group scales: float
    from dqtool.model.packed import PackedLinear

    assert any(isinstance(m, PackedLinear) and m.matmul == "float" for m in model.modules())
