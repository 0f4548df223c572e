"""Learned 2-bit weight quantizers: ParetoQ's four-level ``seq``, learned-scale ``lsq`` (a
ternary at 2 bits), TBT's statistics ternary ``tbt``: levels, gradients, the fake-quant ==
dequantize(quantize_weight) invariant, exact packing."""

import math

import pytest
import torch

from dqtool.base.errors import DQToolError
from dqtool.qmath.pack import pack_odd_codes, row_bytes, unpack_odd_codes
from dqtool.qmath.quant import (
    QuantSpec,
    dequantize,
    fake_quant,
    init_weight_clip,
    quantize,
    quantize_weight,
    seq_alpha,
)

LAYOUTS = [("tensor", None, (7, 13)), ("row", None, (7, 13)), ("group", 8, (5, 24))]


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _rows(t, granularity, group_size):
    if granularity == "tensor":
        return [t.flatten()]
    return list(t) if granularity == "row" else list(t.reshape(-1, group_size))


def _paretoq_seq(w, alpha, bits):
    """ParetoQ's StretchedElasticQuant forward (models/utils_quant.py), written out."""
    n = 2 ** (bits - 1)
    return (torch.round(torch.clamp(w / alpha, -0.99, 0.99) * n - 0.5) + 0.5) / n * alpha


# --------------------------------------------------------------------------- levels

@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("granularity,group_size,shape", LAYOUTS)
def test_seq_levels_balanced_and_no_zero(bits, granularity, group_size, shape):
    spec = QuantSpec.weight(bits, granularity, group_size, method="seq")
    w = _randn(*shape, seed=bits)
    clip = init_weight_clip(w, spec)
    q = fake_quant(w, spec, clip)
    codes, scale = quantize_weight(w, spec, clip)
    assert codes.dtype == torch.int8
    assert set(codes.unique().tolist()) <= set(range(-(2 ** bits - 1), 2 ** bits, 2))  # odd codes only
    for sl, a in zip(_rows(q, granularity, group_size), clip.flatten().expand(len(_rows(q, granularity, group_size)))):
        vals = sl.unique()
        assert vals.numel() <= 2 ** bits
        assert 0.0 not in vals.tolist()
        # the levels are odd multiples of alpha / 2**bits, at most +-(2**bits - 1) / 2**bits * alpha
        assert float(vals.abs().max()) <= (2 ** bits - 1) / 2 ** bits * float(a) * (1 + 1e-6)
    if bits == 2:
        # a Gaussian row of 13+ values uses all four levels {-3, -1, 1, 3} * alpha / 4
        assert set(codes.unique().tolist()) == {-3, -1, 1, 3}
        assert torch.equal(torch.sort(dequantize(torch.tensor([-3, -1, 1, 3], dtype=torch.int8),
                                                 torch.tensor(1.0), QuantSpec(bits=2, method="seq"))).values,
                           torch.tensor([-3.0, -1.0, 1.0, 3.0]))


@pytest.mark.parametrize("bits", (2, 4))
def test_seq_matches_paretoq_forward(bits):
    spec = QuantSpec.weight(bits, "row", method="seq")
    w = _randn(16, 40, seed=7) * 0.05
    alpha = init_weight_clip(w, spec) * 0.8        # some entries beyond alpha (saturated)
    ours = fake_quant(w, spec, alpha)
    ref = _paretoq_seq(w, seq_alpha(alpha, bits), bits)
    assert torch.equal(ours, ref)


def test_seq_alpha_clears_low_bits_only():
    a = torch.rand(1000) * 3 + 1e-3
    for bits in (2, 3, 4):
        s = seq_alpha(a, bits)
        assert torch.all(s <= a) and torch.all((a - s) / a < 2.0 ** -(23 - bits))
        m, _ = torch.frexp(s)
        assert torch.equal(m * 2 ** (24 - bits), torch.round(m * 2 ** (24 - bits)))   # b spare significand bits
        assert torch.equal(seq_alpha(s, bits), s)                                    # idempotent


@pytest.mark.parametrize("granularity,group_size,shape", LAYOUTS)
def test_lsq_two_bit_is_ternary_with_tbt_start(granularity, group_size, shape):
    spec = QuantSpec.weight(2, granularity, group_size, method="lsq")
    w = _randn(*shape, seed=11)
    clip = init_weight_clip(w, spec)
    for orig, c in zip(_rows(w, granularity, group_size), clip.flatten().expand(len(_rows(w, granularity, group_size)))):
        assert torch.allclose(c, 4 / 3 * orig.abs().mean())
    q = fake_quant(w, spec, clip)
    codes, scale = quantize_weight(w, spec, clip)
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    for sl in _rows(q, granularity, group_size):
        vals = sl.unique()
        assert vals.numel() == 3 and vals[0] == -vals[2] and vals[1] == 0
    # TBT's rule: codes = round(clamp(w / alpha, -1, 1))
    expect = torch.round(torch.clamp(w.reshape(-1, shape[-1] if granularity != "group" else group_size)
                                     / (clip.reshape(-1, 1) if granularity != "tensor" else clip), -1, 1))
    assert torch.equal(codes.reshape(expect.shape).float(), expect)


def test_tbt_statistics_ternary():
    spec = QuantSpec.weight(2, "row", method="tbt")
    w = _randn(6, 32, seed=4)
    alpha = 4 / 3 * w.abs().mean(dim=1, keepdim=True)
    assert torch.equal(fake_quant(w, spec), torch.round(torch.clamp(w / alpha, -1, 1)) * alpha)
    assert all(r.unique().numel() <= 3 for r in fake_quant(w, spec))


def test_lsq_four_bit_starts_at_minmax():
    w = _randn(6, 32, seed=5)
    spec = QuantSpec.weight(4, "row", method="lsq")
    assert torch.equal(fake_quant(w, spec, init_weight_clip(w, spec)), fake_quant(w, QuantSpec.weight(4, "row")))


# --------------------------------------------------------------------------- invariant

@pytest.mark.parametrize("method,bits", [("seq", 2), ("seq", 3), ("seq", 4), ("lsq", 2), ("lsq", 3), ("lsq", 4),
                                         ("tbt", 2)])
@pytest.mark.parametrize("granularity,group_size,shape", LAYOUTS)
def test_fake_quant_equals_dequantize_quantize_weight(method, bits, granularity, group_size, shape):
    spec = QuantSpec.weight(bits, granularity, group_size, method=method)
    w = _randn(*shape, seed=bits + 20)
    clip = init_weight_clip(w, spec) * 0.9 if spec.learned else None
    codes, scale = quantize_weight(w, spec, clip)
    assert torch.equal(fake_quant(w, spec, clip), dequantize(codes, scale, spec))
    # quantize() recovers the codes of the quantized values (the grid projection)
    assert torch.equal(quantize(dequantize(codes, scale, spec), scale, spec), codes)


def test_learned_methods_need_clip():
    w = _randn(3, 8)
    for method in ("seq", "lsq"):
        with pytest.raises(ValueError, match="learns its range"):
            fake_quant(w, QuantSpec.weight(2, method=method))


@pytest.mark.parametrize("kwargs,words", [
    (dict(bits=8, method="seq"), "method 'seq' needs bits 2, 3 or 4"),
    (dict(bits=4, method="tbt"), "method 'tbt' needs bits 2"),
    (dict(bits=8, method="seq", role="activation", granularity="token"), "needs bits"),
    (dict(bits=2, method="seq", role="activation", granularity="token"), "activation method 'seq'"),
])
def test_bad_method_spec_raises(kwargs, words):
    with pytest.raises(DQToolError, match=words):
        QuantSpec(**kwargs)


# --------------------------------------------------------------------------- gradients

def test_seq_gradients_inside_outside():
    spec = QuantSpec.weight(2, "row", method="seq")
    w = torch.tensor([[0.1, -0.6, 0.9, 1.5, -2.0, 0.3]], requires_grad=True)
    alpha = torch.tensor([[1.0]], requires_grad=True)
    y = fake_quant(w, spec, alpha)
    assert y.tolist() == [[0.25, -0.75, 0.75, 0.75, -0.75, 0.25]]
    y.sum().backward()
    # STE inside |w| <= alpha, zero outside
    assert w.grad.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0, 1.0]]
    # dy/dalpha: L - w/alpha inside, +-3/4 outside; LSQ scale 1/sqrt(N * 1) with N = 6
    expect = ((0.25 - 0.1) + (-0.75 + 0.6) + (0.75 - 0.9) + 0.75 - 0.75 + (0.25 - 0.3)) / math.sqrt(6)
    assert alpha.grad.shape == (1, 1)
    assert math.isclose(alpha.grad.item(), expect, rel_tol=1e-5, abs_tol=1e-7)


def test_seq_alpha_gradient_sign():
    # Every weight beyond alpha (positive): the loss sum(y) grows with alpha -> positive gradient;
    # every weight tiny (inside, below the first level): L - w/alpha > 0 as well, and with the
    # loss -sum(y) the sign flips.
    spec = QuantSpec.weight(2, "row", method="seq")
    for w0, sgn in ((torch.full((2, 8), 3.0), 1.0), (torch.full((2, 8), 0.05), 1.0)):
        for loss_sign in (1.0, -1.0):
            w = w0.clone().requires_grad_(True)
            alpha = torch.ones(2, 1, requires_grad=True)
            (loss_sign * fake_quant(w, spec, alpha).sum()).backward()
            assert torch.all(torch.isfinite(alpha.grad))
            assert torch.all(torch.sign(alpha.grad) == sgn * loss_sign)


def test_seq_training_moves_alpha_towards_the_weights():
    # Fitting y = w (MSE) from a too-wide range: alpha shrinks and the error falls.
    torch.manual_seed(0)
    spec = QuantSpec.weight(2, "row", method="seq")
    w = torch.randn(4, 256)
    alpha = (init_weight_clip(w, spec) * 3).requires_grad_(True)
    err0 = (fake_quant(w, spec, alpha) - w).pow(2).mean().item()
    opt = torch.optim.Adam([alpha], lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        (fake_quant(w, spec, alpha) - w).pow(2).mean().backward()
        opt.step()
    assert torch.all(alpha < init_weight_clip(w, spec) * 3)
    assert (fake_quant(w, spec, alpha) - w).pow(2).mean().item() < 0.5 * err0


@pytest.mark.parametrize("bits", (2, 4))
def test_lsq_weight_gradients(bits):
    spec = QuantSpec.weight(bits, "row", method="lsq")
    w = (_randn(3, 16, seed=2) * 0.5).requires_grad_(True)
    clip = (init_weight_clip(w, spec) * 0.7).requires_grad_(True)
    fake_quant(w, spec, clip).pow(2).sum().backward()
    inside = w.detach().abs() <= clip.detach()
    assert torch.equal(w.grad == 0, ~inside | (fake_quant(w.detach(), spec, clip.detach()) == 0))
    assert clip.grad.shape == (3, 1) and torch.all(torch.isfinite(clip.grad))
    # clipped entries pull the range outwards: with this loss (|y| grows with the clip) the gradient is positive
    assert torch.all(clip.grad > 0)


def test_tbt_gradient_passes_unchanged():
    w = _randn(3, 8).requires_grad_(True)
    fake_quant(w, QuantSpec.weight(2, method="tbt")).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


# --------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("n", (1, 5, 8, 13))
def test_odd_codes_pack_round_trip(bits, n):
    g = torch.Generator().manual_seed(n)
    top = 2 ** bits - 1
    codes = (2 * torch.randint(0, 2 ** bits, (3, n), generator=g) - top).to(torch.int8)
    packed = pack_odd_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, row_bytes(n, bits))
    assert torch.equal(unpack_odd_codes(packed, bits, n), codes)


def test_odd_codes_layout_and_errors():
    # 2 bits: u = (q + 3) / 2, LSB first: [-3, -1, 1, 3] -> u [0, 1, 2, 3] -> 0 | 1<<2 | 2<<4 | 3<<6
    assert pack_odd_codes(torch.tensor([[-3, -1, 1, 3]], dtype=torch.int8), 2).tolist() == [[0 | 4 | 32 | 192]]
    with pytest.raises(ValueError, match="odd"):
        pack_odd_codes(torch.tensor([[0, 1]], dtype=torch.int8), 2)
    with pytest.raises(ValueError, match="odd"):
        pack_odd_codes(torch.tensor([[5, 1]], dtype=torch.int8), 2)
