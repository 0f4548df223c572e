"""dqtool.qmath.quant: level counts, STE gradients, the fake-quant == packed bit-exact invariant, errors."""

import pytest
import torch

from dqtool.base.errors import DQToolError
from dqtool.qmath.quant import (
    QuantSpec,
    activation_qparams,
    compute_scale,
    dequantize,
    fake_quant,
    fake_quant_activation,
    parse_wea,
    quantize,
    quantize_weight,
    ternary_scale_and_codes,
    validate_width,
)

BITS = (8, 4, 3, 2)
# (granularity, group_size, shape): odd widths for tensor/row, two group sizes for groups.
LAYOUTS = [("tensor", None, (7, 13)), ("row", None, (7, 13)), ("group", 8, (5, 24)), ("group", 12, (5, 24))]


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _slices(t, granularity, group_size):
    """The sets of values that share one scale."""
    if granularity == "tensor":
        return [t.flatten()]
    if granularity == "row":
        return list(t)
    return list(t.reshape(-1, group_size))


# --------------------------------------------------------------------------- levels

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity,group_size,shape", LAYOUTS)
def test_minmax_levels_per_slice(bits, granularity, group_size, shape):
    spec = QuantSpec(bits=bits, granularity=granularity, group_size=group_size)
    w = _randn(*shape, seed=bits)
    q = fake_quant(w, spec)
    codes, _ = quantize_weight(w, spec)
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= -(2 ** (bits - 1) - 1) and int(codes.max()) <= 2 ** (bits - 1) - 1
    for sl in _slices(q, granularity, group_size):
        # Symmetric grid: at most 2^b - 1 levels (no -2^(b-1) code).
        assert sl.unique().numel() <= 2 ** bits - 1
    # The max-abs entry of each slice is representable exactly (scale = max|w| / qmax).
    for orig, sl in zip(_slices(w, granularity, group_size), _slices(q, granularity, group_size)):
        i = orig.abs().argmax()
        assert torch.allclose(sl[i], orig[i], rtol=1e-6, atol=0)


def test_symmetric_codes_saturate_at_minus_qmax():
    for bits in BITS:
        qmax = 2 ** (bits - 1) - 1
        codes = quantize(torch.tensor([-qmax - 1.0, -1000.0, 1000.0]), torch.tensor(1.0), QuantSpec(bits=bits))
        assert codes.tolist() == [-qmax, -qmax, qmax]  # 8 bits: -127, never -128


@pytest.mark.parametrize("granularity,group_size,shape", [("tensor", None, (6, 64)), ("row", None, (6, 64)),
                                                          ("group", 16, (6, 64))])
def test_ternary_has_exactly_three_values(granularity, group_size, shape):
    w = _randn(*shape, seed=3)
    q = fake_quant(w, QuantSpec.weight(2, granularity, group_size))
    alpha, codes = ternary_scale_and_codes(w, granularity, group_size)
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    for sl in _slices(q, granularity, group_size):
        vals = sl.unique()
        assert vals.numel() == 3 and 0.0 in vals.tolist()
        assert vals[0] == -vals[2]  # {-alpha, 0, alpha}
    # TWN rule: kept entries are exactly those above 0.7 * mean|w| of their slice.
    for orig, c in zip(_slices(w, granularity, group_size), _slices(codes, granularity, group_size)):
        assert torch.equal(c != 0, orig.abs() > 0.7 * orig.abs().mean())


def test_two_bit_minmax_is_three_levels_not_ternary():
    w = _randn(4, 32, seed=4)
    mm = fake_quant(w, QuantSpec(bits=2, granularity="row"))
    tw = fake_quant(w, QuantSpec.weight(2, "row"))
    for row in mm:
        assert row.unique().numel() <= 3
    assert not torch.equal(mm, tw)


# --------------------------------------------------------------------------- invariant

@pytest.mark.parametrize("bits,method", [(b, "minmax") for b in BITS] + [(2, "ternary")])
@pytest.mark.parametrize("granularity,group_size,shape", LAYOUTS)
def test_fake_quant_equals_dequantize_quantize_bit_exact(bits, granularity, group_size, shape, method):
    spec = QuantSpec(bits=bits, granularity=granularity, group_size=group_size, method=method)
    w = _randn(*shape, seed=10 + bits) * 0.05
    w[1] = 0.0  # an all-zero row: the epsilon guard must still give exact zeros
    fq = fake_quant(w.clone().requires_grad_(), spec)
    codes, scale = quantize_weight(w, spec)
    packed = dequantize(codes, scale, spec)
    assert torch.equal(fq.detach(), packed)
    assert torch.isfinite(fq).all() and (fq[1] == 0).all()
    # A packer that only sees the fake-quant values recovers the same codes.
    assert torch.equal(quantize(fq.detach(), scale, spec), codes)
    if method == "minmax":
        s = compute_scale(w, spec)
        assert torch.equal(fq.detach(), dequantize(quantize(w, s, spec), s, spec))
        expected_shape = {"tensor": (), "row": (shape[0], 1), "group": (shape[0], shape[1] // (group_size or 1), 1)}
        assert tuple(s.shape) == expected_shape[granularity]


@pytest.mark.parametrize("method", ["minmax", "lsq", "ternary"])
@pytest.mark.parametrize("granularity,group_size,shape", LAYOUTS)
def test_bit_exact_with_clip(method, granularity, group_size, shape):
    bits = 2 if method == "ternary" else 4
    spec = QuantSpec(bits=bits, granularity=granularity, group_size=group_size, method=method)
    w = _randn(*shape, seed=20)
    scale_shape = compute_scale(w, QuantSpec(bits=4, granularity=granularity, group_size=group_size)).shape
    clip = torch.full(scale_shape, 0.8, requires_grad=True)
    fq = fake_quant(w, spec, clip)
    codes, scale = quantize_weight(w, spec, clip)
    assert torch.equal(fq.detach(), dequantize(codes, scale, spec))
    assert fq.abs().max() <= 0.8 + 1e-6


def test_bfloat16_keeps_dtype_and_invariant():
    spec = QuantSpec.weight(4, "group", 8)
    w = _randn(3, 16, seed=5).to(torch.bfloat16)
    fq = fake_quant(w, spec)
    codes, scale = quantize_weight(w, spec)
    assert fq.dtype == torch.bfloat16 and scale.dtype == torch.bfloat16
    assert torch.equal(fq, dequantize(codes, scale, spec))


def test_round_half_to_even():
    spec = QuantSpec(bits=8)
    codes = quantize(torch.tensor([0.5, 1.5, 2.5, -2.5, 127.0]), torch.tensor(1.0), spec)
    assert codes.tolist() == [0, 2, 2, -2, 127]


def test_deterministic():
    w = _randn(9, 40, seed=6)
    for spec in (QuantSpec.weight(4, "row"), QuantSpec.weight(2, "group", 8), QuantSpec(bits=3)):
        assert torch.equal(fake_quant(w, spec), fake_quant(w.clone(), spec))
    x = _randn(2, 5, 7, seed=7)
    assert torch.equal(fake_quant_activation(x, 8, symmetric=False), fake_quant_activation(x.clone(), 8, False))


# --------------------------------------------------------------------------- gradients

def test_dynamic_minmax_gradient_is_identity():
    w = _randn(5, 11, seed=8).requires_grad_()
    up = _randn(5, 11, seed=9)
    fake_quant(w, QuantSpec.weight(4, "row")).backward(up)
    assert torch.equal(w.grad, up)


def test_ternary_gradient_passes_unchanged():
    w = _randn(5, 11, seed=8).requires_grad_()
    up = _randn(5, 11, seed=9)
    fake_quant(w, QuantSpec.weight(2, "row")).backward(up)
    assert torch.equal(w.grad, up)


@pytest.mark.parametrize("method,bits", [("minmax", 8), ("minmax", 4), ("lsq", 4), ("ternary", 2)])
def test_gradient_zero_outside_clip_and_passes_inside(method, bits):
    x = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.3, 0.99, 1.0, 1.01, 2.5], requires_grad=True)
    clip = torch.tensor(1.0)
    up = torch.arange(1.0, 10.0)
    fake_quant(x, QuantSpec(bits=bits, method=method), clip).backward(up)
    inside = x.detach().abs() <= 1.0
    assert torch.equal(x.grad[inside], up[inside])
    assert (x.grad[~inside] == 0).all() and (~inside).sum() == 3


def test_pact_clip_gradient_from_clipped_elements():
    x = torch.tensor([-3.0, -0.5, 0.2, 0.7, 2.0, 4.0], requires_grad=True)
    clip = torch.tensor(1.0, requires_grad=True)
    up = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 5.0])
    fake_quant_activation(x, 8, clip=clip).backward(up)
    # PACT: sum of sign(x) * upstream over the clipped elements: -1 + 2 + 5.
    assert clip.grad.item() == pytest.approx(6.0)
    clip.grad = None
    fake_quant_activation(x.detach() * 0.1, 8, clip=clip).sum().backward()
    assert clip.grad.item() == 0.0  # nothing clipped, no PACT gradient


def test_lsq_clip_gradient_nonzero_and_per_row_shape():
    w = _randn(4, 16, seed=11)
    clip = torch.full((4, 1), 0.5, requires_grad=True)
    fake_quant(w, QuantSpec(bits=4, granularity="row", method="lsq"), clip).pow(2).sum().backward()
    assert clip.grad.shape == (4, 1)
    assert (clip.grad != 0).all()


def test_per_group_clip_gradient_shape():
    w = _randn(3, 24, seed=12)
    clip = torch.full((3, 3, 1), 0.5, requires_grad=True)
    fake_quant(w, QuantSpec(bits=8, granularity="group", group_size=8), clip).sum().backward()
    assert clip.grad.shape == (3, 3, 1) and clip.grad.abs().sum() > 0


def test_lsq_needs_clip():
    with pytest.raises(ValueError, match="clip"):
        fake_quant(torch.ones(3), QuantSpec(bits=4, method="lsq"))


# --------------------------------------------------------------------------- activations

@pytest.mark.parametrize("granularity", ["tensor", "token"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shift", [0.0, 1.5, -4.0, 20.0])
def test_asymmetric_activation_round_trip(bits, shift, granularity):
    x = _randn(4, 6, 10, seed=bits) * 2.0 + shift
    scale, zp = activation_qparams(x, bits, symmetric=False, granularity=granularity)
    assert scale.shape == ((4, 6, 1) if granularity == "token" else ())
    spec = QuantSpec.activation(bits, symmetric=False, granularity=granularity)
    codes = quantize(x, scale, spec, zp)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
    rows = codes.reshape(-1, 10) if granularity == "token" else codes.reshape(1, -1)
    assert max(r.unique().numel() for r in rows) <= 2 ** bits
    deq = dequantize(codes, scale, spec, zp)
    assert torch.equal(fake_quant_activation(x, bits, symmetric=False, granularity=granularity), deq)
    assert ((x - deq).abs() <= scale / 2 * (1 + 1e-5)).all()
    if x.min() >= 0:
        assert (zp == 0).all()
    # 0 is exactly representable (ONNX widens the range to include it).
    zero = dequantize(quantize(torch.zeros_like(x), scale, spec, zp), scale, spec, zp)
    assert (zero == 0.0).all()


def test_symmetric_activation_is_dynamic_per_tensor():
    x = _randn(2, 3, 8, seed=13)
    spec = QuantSpec.activation(8, granularity="tensor")
    scale, zp = activation_qparams(x, 8, granularity="tensor")
    assert scale.shape == () and zp.item() == 0
    assert torch.allclose(scale, x.abs().max() / 127)
    y = fake_quant_activation(x, 8, granularity="tensor")
    assert y.unique().numel() <= 255
    assert torch.equal(y, dequantize(quantize(x, scale, spec), scale, spec))
    assert not torch.equal(activation_qparams(x * 2, 8, granularity="tensor")[0], scale)  # scale follows the batch


def test_symmetric_activation_per_token():
    x = _randn(2, 3, 8, seed=13)
    spec = QuantSpec.activation(8)
    assert spec.granularity == "token"
    scale, zp = activation_qparams(x, 8)
    assert scale.shape == (2, 3, 1) and torch.allclose(scale, x.abs().amax(-1, keepdim=True) / 127)
    y = fake_quant_activation(x, 8)
    assert torch.equal(y, dequantize(quantize(x, scale, spec), scale, spec))
    assert all(r.unique().numel() <= 255 for r in y.reshape(-1, 8))
    assert (y.abs().amax(-1) == x.abs().amax(-1)).all()  # every row's max is on its own grid


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_activation_ignores_the_rest_of_the_batch(symmetric):
    """A row's codes are the same alone, in a batch, or next to a padded/huge row;
    per-tensor codes change with the batch (what made batched ONNX and PyTorch
    generation disagree on rows a runtime padded differently)."""
    x = _randn(3, 5, 16, seed=21)
    other = torch.cat([x, 100 * _randn(1, 5, 16, seed=22)])
    for g, invariant in (("token", True), ("tensor", False)):
        alone = fake_quant_activation(x[:1], 8, symmetric, granularity=g)
        in_batch = fake_quant_activation(other, 8, symmetric, granularity=g)[:1]
        assert torch.equal(alone, in_batch) is invariant


def test_token_granularity_is_for_activations():
    with pytest.raises(DQToolError, match="granularity 'token' is for activations"):
        QuantSpec.weight(4, "token")
    with pytest.raises(DQToolError, match="choose token, tensor or block"):
        QuantSpec.activation(8, granularity="row")


def test_asymmetric_activation_rejects_clip():
    with pytest.raises(ValueError, match="clip"):
        fake_quant_activation(torch.ones(3), 8, symmetric=False, clip=1.0)


# --------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("kwargs,words", [
    (dict(bits=5), ["weight bits 5", "8, 4, 3 or 2"]),
    (dict(bits=16, role="activation"), ["activation bits 16", "8, 4, 3 or 2"]),
    (dict(bits=8, granularity="channel"), ["granularity 'channel'", "tensor, row or group"]),
    (dict(bits=8, granularity="group"), ["group_size", "positive"]),
    (dict(bits=8, granularity="group", group_size=0), ["group_size", "positive"]),
    (dict(bits=8, granularity="row", group_size=32), ["group_size", "granularity"]),
    (dict(bits=8, method="kmeans"), ["method 'kmeans'", "minmax, ternary, lsq, seq or tbt"]),
    (dict(bits=4, method="ternary"), ["ternary", "bits 2"]),
    (dict(bits=8, symmetric=False), ["symmetric", "activations only"]),
    (dict(bits=8, granularity="row", role="activation"), ["activation granularity", "tensor"]),
])
def test_bad_spec_raises_naming_option(kwargs, words):
    with pytest.raises(DQToolError) as err:
        QuantSpec(**kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_weight_constructor_defaults():
    assert QuantSpec.weight(2).method == "ternary"
    assert QuantSpec.weight(2, method="minmax").method == "minmax"
    assert QuantSpec.weight(8).granularity == "row"
    assert QuantSpec.activation(8, symmetric=False).qmin == 0
    assert QuantSpec(bits=8).levels == 255 and QuantSpec.activation(4, symmetric=False).levels == 16


def test_group_size_must_divide_width():
    spec = QuantSpec.weight(4, "group", 32)
    validate_width(spec, 768, "fc1")
    with pytest.raises(DQToolError, match=r"group_size 32 .* of decoder\.layers\.0\.fc2"):
        validate_width(spec, 100, "decoder.layers.0.fc2")
    with pytest.raises(DQToolError, match="group_size"):
        fake_quant(torch.ones(2, 100), spec)


@pytest.mark.parametrize("text,expected", [
    ("2-2-8", (2, 2, 8)), ("4-8-none", (4, 8, None)), ("8-8-8", (8, 8, 8)),
    ("32-16-NONE", (None, None, None)), (" 3-4-2 ", (3, 4, 2)),
])
def test_parse_wea(text, expected):
    assert parse_wea(text) == expected


@pytest.mark.parametrize("text,words", [
    ("2-2", ["--wea '2-2'", "W-E-A"]), ("2-2-8-8", ["W-E-A"]), ("", ["W-E-A"]),
    ("5-2-8", ["weight bits '5'", "none"]), ("2-1-8", ["embedding bits '1'"]),
    ("2-2-fp", ["activation bits 'fp'"]), ("2--8", ["embedding bits ''"]),
])
def test_parse_wea_errors(text, words):
    with pytest.raises(DQToolError) as err:
        parse_wea(text)
    for w in words:
        assert w in str(err.value)


def test_parse_wea_custom_option_name():
    with pytest.raises(DQToolError, match="^--bits "):
        parse_wea("x", option="--bits")


def _bits(t):
    return t.view({torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                   torch.float64: torch.int64}[t.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_inference_activation_path_is_the_reference_bit_for_bit(dtype, symmetric, granularity):
    # The fewer-ops inference path of activations (generation) against the public
    # quantize/dequantize path, compared as raw bits: ties, zeros, -0.0, all-positive and
    # all-negative rows, tiny and large magnitudes, with and without a clip.
    from dqtool.qmath.quant import _fake_quant_value, fake_quant_activation_inference

    g = torch.Generator().manual_seed(0)
    for bits in (8, 4, 3, 2):
        spec = QuantSpec.activation(bits, symmetric=symmetric, granularity=granularity)
        for clip in ([None, torch.tensor(0.7), torch.tensor([1.3])] if symmetric else [None]):
            for trial in range(10):
                x = torch.randn(3, 4, 17, generator=g) * 10.0 ** (trial % 5 - 2)
                if trial % 4 == 1:
                    x[0, 0] = 0
                    x[1, 2, :3] = -0.0
                elif trial % 4 == 2:
                    x = torch.round(x * 4) / 4
                elif trial % 4 == 3:
                    x = x.abs() if trial % 2 else -x.abs()
                x = x.to(dtype)
                c = None if clip is None else clip.to(dtype)
                want = _fake_quant_value(x, spec, c)
                got = fake_quant_activation_inference(x, spec, c)
                assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)), (bits, clip, trial)
                with torch.no_grad():
                    assert torch.equal(_bits(fake_quant(x, spec, c)), _bits(want))   # fake_quant's inference branch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_code_rounding_is_round_half_to_even(dtype):
    # The inference path's rounding (an add/sub pair, no OpenMP region) against torch.round
    # on every half-integer and random values across the code ranges, zeros as +0.0.
    from dqtool.qmath.quant import _round_codes_

    halves = torch.arange(-600, 601, dtype=torch.float64) / 2
    rand = (torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * 520
    for v in (halves, rand, torch.tensor([-0.0, 0.0, -0.3, 0.3, -0.5, 0.5], dtype=torch.float64)):
        v = v.to(dtype)
        want = torch.round(v) + 0.0
        got = _round_codes_(v.clone())
        assert torch.equal(_bits(got), _bits(want))
