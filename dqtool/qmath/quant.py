"""Quantization math for DQ-BART: fake quantization for training, exact codes for packing.

DQ-BART (Li et al., ACL 2022) trains a distilled student with fake-quantized weights
(W), embeddings (E) and activations (A). This module is the arithmetic only: no
``nn.Module`` and no model state, so the training modules and the later integer
packer call the very same functions.

The central invariant, tested bit for bit::

    fake_quant(w, spec, clip) == dequantize(*quantize_weight(w, spec, clip), spec)

``fake_quant``'s forward value *is* computed as ``dequantize(quantize(...))`` through
the public functions below (same ops, same order, same dtype), never by a "shortcut"
formula such as ``round(w * s) / s``. A packed model that stores the int8 codes and the
scale tensor therefore reproduces the trained model's weights exactly.

Quantizers (semantics follow the authors' ``quant/utils_quant.py``, itself from
TernaryBERT):

* ``minmax`` -- symmetric uniform grid ``-qmax..qmax`` with ``qmax = 2**(bits-1) - 1``
  and ``scale = max|w| / qmax`` (per tensor, per row or per group). The grid is
  symmetric, so 8 bits use -127..127 (never -128), 4 bits -7..7, 3 bits -3..3, and
  2 bits -1..1 -- only 3 levels, the same count as ternary but with a min-max scale.
* ``ternary`` -- TWN (Li & Liu 2016): threshold ``delta = 0.7 * mean|w|``, codes
  ``sign(w) * (|w| > delta)`` in {-1, 0, 1}, scale ``alpha = mean|w|`` over the kept
  entries. DQ-BART uses it for every 2-bit weight; :meth:`QuantSpec.weight` picks it.
* ``lsq`` -- the ``minmax`` grid with a *learned* range ``clip`` (scale ``clip / qmax``)
  whose gradient is LSQ's step-size gradient (Esser et al. 2020). At 2 bits the grid is
  {-1, 0, 1}: a ternary quantizer with a learned scale ``alpha = clip``, codes
  ``clamp(round(w / alpha), -1, 1)`` (TBT's rule, Liu et al. ACL 2023, with alpha learned).
* ``seq`` -- ParetoQ's stretched elastic quant (Liu et al. 2025): ``2**bits`` balanced
  levels without a zero, ``{-3, -1, 1, 3} * alpha / 4`` at 2 bits, with a learned range
  ``alpha = clip`` (initialised at ``max|w|`` per row) and an LSQ-style gradient. Codes are
  the odd integers ``-(2**bits - 1) .. 2**bits - 1`` with scale ``alpha / 2**bits``, so the
  integer form is exact as int8; stored unsigned as ``(code + 2**bits - 1) / 2`` in ``bits``
  bits (:func:`dqtool.qmath.pack.pack_odd_codes`).
* ``tbt`` -- TBT's statistics-based ternary: ``alpha = 4/3 * mean|w|`` per slice, codes
  ``clamp(round(w / alpha), -1, 1)``, recomputed every step (no learned state).

:func:`init_weight_clip` gives the statistics-based start of a learned weight range:
``max|w|`` per slice (ParetoQ's initialisation, so ``lsq`` at 3+ bits starts exactly at
``minmax``), and ``4/3 * mean|w|`` for the 2-bit ``lsq`` grid (TBT's ternary scale).

A ``minmax`` quantizer given a ``clip`` tensor becomes PACT-style (Choi et al. 2018):
values are clamped to ``[-clip, clip]``, the scale is ``clip / qmax`` and the clip gets
the PACT gradient (the summed upstream gradient of the clipped elements, signed).

Activations are quantized per token (one dynamic range per row of the last dim) or per
tensor: symmetric dynamic min-max by default (DQ-BART's ``SymQuantizer``, whose range is
the whole batch's ``max|x|`` -- granularity ``tensor``), or asymmetric with a zero point
on the unsigned grid ``0..2**bits - 1`` following ONNX ``DynamicQuantizeLinear``, so an
integer runtime computes the same values. Per token, a sequence's codes never depend on
the other rows of its batch or on padding, and teacher-forced training sees the same
ranges as one-token-at-a-time decoding.

Granularity ``block`` is ONNX Runtime's own input quantizer of ``MatMulNBits`` at
``accuracy_level=4`` (int8, one scale per row and block of K, see
:func:`quantize_activation_block`): trained with it, a decoder Linear exports as the one
MatMulNBits node with no quantize ops around it, and the export is exact up to float sums.

Rounding is ``torch.round``: round half to even (2.5 -> 2, 3.5 -> 4), as ONNX
``QuantizeLinear`` does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from dqtool.base.errors import DQToolError

BITS = (8, 4, 3, 2)
GRANULARITIES = ("tensor", "row", "group")         # weights and embeddings
ACT_GRANULARITIES = ("token", "tensor", "block")  # activations: per row of the last dim, one, or per block of a row
# MLAS's int8 input quantizer of MatMulNBits at accuracy_level 4 (granularity "block"): 8-bit
# symmetric codes -127..127, one float scale max|x|/127 per row and block of K inputs.
BLOCK_ACT_BITS = 8
BLOCK_ACT_QMAX = 127.0
METHODS = ("minmax", "ternary", "lsq", "seq", "tbt")
# Weight methods whose range is a learned tensor (a ``clip`` per scale slice).
LEARNED_METHODS = ("lsq", "seq")
SEQ_BITS = (2, 3, 4)      # odd codes up to 2**bits - 1 fit int8 (8-bit seq would need 255)
# TBT ternary scale: alpha = 4/3 * mean|w| (also the start of a learned 2-bit lsq range).
TBT_FACTOR = 4.0 / 3.0
ROLES = ("weight", "embedding", "activation")
FLOAT_WORDS = ("none", "16", "32")  # a W-E-A slot left in floating point

# TWN's closed-form threshold factor: delta* ~= 0.7 * E|w| for Gaussian/uniform weights.
TERNARY_THRESHOLD = 0.7
# Smallest scale we ever divide by. An all-zero row would give max|w| = 0; clamping the
# scale keeps w / scale finite (0 / eps = 0) and the output still exactly 0.
SCALE_EPS = 1e-8


@functools.lru_cache(maxsize=None)
def _eps(dtype: torch.dtype) -> float:
    # 1e-8 underflows to 0 in float16; use its smallest normal number there instead.
    return max(SCALE_EPS, torch.finfo(dtype).tiny)


def _join(values) -> str:
    values = [str(v) for v in values]
    return ", ".join(values[:-1]) + " or " + values[-1]


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. Validated on construction.

    ``role`` names what is quantized (it only changes what is allowed and the wording
    of errors): ``weight`` and ``embedding`` must be symmetric (their codes are packed
    as int8 with one scale and no zero point); only ``activation`` may set
    ``symmetric=False``, and activations are per token or per tensor (``token``: one
    range per row of the last dim, for activations only). ``ternary`` needs 2 bits.
    Prefer the constructors :meth:`weight` and :meth:`activation`.

    Example:
        >>> QuantSpec(bits=8).qmax
        127
        >>> QuantSpec.weight(2).method
        'ternary'
        >>> QuantSpec(bits=5)
        Traceback (most recent call last):
        ...
        dqtool.base.errors.DQToolError: weight bits 5 is not supported: choose 8, 4, 3 or 2
    """

    bits: int
    granularity: str = "tensor"
    group_size: int | None = None
    method: str = "minmax"
    symmetric: bool = True
    role: str = "weight"

    def __post_init__(self):
        role = self.role
        if role not in ROLES:
            raise DQToolError(f"quantization role '{role}' is not supported: choose {_join(ROLES)}")
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise DQToolError(f"{role} bits {self.bits} is not supported: choose {_join(BITS)}")
        if self.method not in METHODS:
            raise DQToolError(f"{role} method '{self.method}' is not supported: choose {_join(METHODS)}")
        if self.method in ("ternary", "tbt") and self.bits != 2:
            raise DQToolError(
                f"{role} method '{self.method}' needs bits 2, got {self.bits}: use minmax or lsq for {self.bits} bits")
        if self.method == "seq" and self.bits not in SEQ_BITS:
            raise DQToolError(
                f"{role} method 'seq' needs bits {_join(SEQ_BITS)}, got {self.bits}: use minmax or lsq for "
                f"{self.bits} bits")
        allowed = ACT_GRANULARITIES if role == "activation" else GRANULARITIES
        if self.granularity not in allowed:
            why = "is for activations" if self.granularity == "token" else "is not supported"
            raise DQToolError(f"{role} granularity '{self.granularity}' {why}: choose {_join(allowed)}")
        if self.granularity in ("group", "block"):
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
                raise DQToolError(f"{role} group_size must be a positive integer with granularity "
                                  f"'{self.granularity}', got {self.group_size}")
        elif self.group_size is not None:
            raise DQToolError(
                f"{role} group_size {self.group_size} is only used with granularity 'group' (or 'block' for "
                f"activations): drop group_size or choose granularity group")
        if self.granularity == "block" and (self.bits != BLOCK_ACT_BITS or not self.symmetric
                                            or self.method != "minmax"):
            raise DQToolError(f"activation granularity 'block' is MatMulNBits' int8 input quantizer: it needs "
                              f"A bits 8, symmetric, dynamic min-max (got {self.bits} bits, "
                              f"symmetric={self.symmetric}, method {self.method})")
        if role == "activation":
            if self.method in ("ternary", "seq", "tbt"):
                raise DQToolError(f"activation method '{self.method}' is not supported: choose minmax or lsq")
            if not self.symmetric and self.method != "minmax":
                raise DQToolError(
                    f"activation method '{self.method}' is not supported with symmetric=False: choose minmax")
        elif not self.symmetric:
            raise DQToolError(
                f"{role} symmetric=False is not supported: choose symmetric=True (asymmetric is for activations only)")

    @classmethod
    def weight(cls, bits: int, granularity: str = "row", group_size: int | None = None,
               method: str | None = None, role: str = "weight") -> "QuantSpec":
        """A symmetric weight (or ``role="embedding"``) spec; 2 bits default to ternary.

        Example:
            >>> QuantSpec.weight(4, "group", 32)
            QuantSpec(bits=4, granularity='group', group_size=32, method='minmax', symmetric=True, role='weight')
            >>> QuantSpec.weight(2, role="embedding").method
            'ternary'
        """
        if method is None:
            method = "ternary" if bits == 2 else "minmax"
        return cls(bits=bits, granularity=granularity, group_size=group_size, method=method,
                   symmetric=True, role=role)

    @classmethod
    def activation(cls, bits: int, symmetric: bool = True, method: str = "minmax",
                   granularity: str = "token", block_size: int | None = None) -> "QuantSpec":
        """An activation spec: dynamic min-max per token (or ``granularity="tensor"``)
        unless a clip is learned (a learned clip is one range for every token).

        Example:
            >>> QuantSpec.activation(8, symmetric=False).qmax
            255
            >>> QuantSpec.activation(8, granularity="tensor").granularity
            'tensor'
        """
        return cls(bits=bits, granularity=granularity, group_size=block_size, method=method, symmetric=symmetric,
                   role="activation")

    @property
    def qmax(self) -> int:
        """Largest code: ``2**(bits-1) - 1`` symmetric (1 for ternary), ``2**bits - 1`` asymmetric
        and for ``seq`` (whose codes are the odd integers up to it)."""
        if self.method == "seq":
            return 2 ** self.bits - 1
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def qmin(self) -> int:
        """Smallest code: ``-qmax`` symmetric (no -2**(bits-1)), 0 asymmetric."""
        return -self.qmax if self.symmetric else 0

    @property
    def levels(self) -> int:
        """How many distinct codes exist: ``2**bits - 1`` symmetric, ``2**bits`` asymmetric and ``seq``."""
        if self.method == "seq":
            return 2 ** self.bits
        return self.qmax - self.qmin + 1

    @property
    def learned(self) -> bool:
        """True when the range is a learned tensor that :func:`fake_quant` needs as ``clip``."""
        return self.method in LEARNED_METHODS

    @property
    def code_dtype(self) -> torch.dtype:
        """``torch.int8`` for symmetric codes, ``torch.uint8`` for asymmetric ones."""
        return torch.int8 if self.symmetric else torch.uint8


def validate_width(spec: QuantSpec, in_features: int, name: str) -> None:
    """Check, before training, that ``spec`` fits a layer whose input width is ``in_features``.

    Groups run along the input dimension and must tile it exactly: QAT never pads (the
    packer is the place that records any padding).

    Example:
        >>> validate_width(QuantSpec.weight(4, "group", 64), 768, "encoder.layers.0.fc1")
        >>> validate_width(QuantSpec.weight(4, "group", 64), 100, "lm_head")
        Traceback (most recent call last):
        ...
        dqtool.base.errors.DQToolError: group_size 64 does not divide the input width 100 of lm_head: choose ...
    """
    if spec.granularity in ("group", "block") and in_features % spec.group_size != 0:
        raise DQToolError(
            f"group_size {spec.group_size} does not divide the input width {in_features} of {name}: "
            f"choose a group_size that divides {in_features}")


def parse_wea(text: str, option: str = "--wea") -> tuple[int | None, int | None, int | None]:
    """Parse a DQ-BART ``W-E-A`` bit setting; ``none``, ``16`` or ``32`` keep a slot in float.

    ``option`` is the flag name used in error messages.

    Example:
        >>> parse_wea("2-2-8")
        (2, 2, 8)
        >>> parse_wea("4-8-none")
        (4, 8, None)
        >>> parse_wea("2-2")
        Traceback (most recent call last):
        ...
        dqtool.base.errors.DQToolError: --wea '2-2' is not W-E-A: give three bit widths joined by '-', e.g. 2-2-8 or 4-8-none
    """
    parts = str(text).strip().lower().split("-")
    if len(parts) != 3:
        raise DQToolError(
            f"{option} '{text}' is not W-E-A: give three bit widths joined by '-', e.g. 2-2-8 or 4-8-none")
    out: list[int | None] = []
    for slot, part in zip(("weight", "embedding", "activation"), parts):
        part = part.strip()
        if part in FLOAT_WORDS:
            out.append(None)
        elif part in {str(b) for b in BITS}:
            out.append(int(part))
        else:
            raise DQToolError(
                f"{option} '{text}': {slot} bits '{part}' is not supported: choose {', '.join(map(str, BITS))}, "
                f"or none/16/32 for float")
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------- views

def _view(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The view in which one scale covers one slice of the last dim.

    tensor: t as is (any shape), token: t as is (one scale per row of the last dim),
    row: [out, in], group: [out, in] -> [out, in//G, G], block: [..., K] -> [..., K//B, B].
    """
    if spec.granularity in ("tensor", "token"):
        return t
    if spec.granularity == "block":               # [..., K] -> [..., K//B, B]
        validate_width(spec, t.shape[-1], f"an activation of shape {tuple(t.shape)}")
        return t.reshape(*t.shape[:-1], t.shape[-1] // spec.group_size, spec.group_size)
    if t.dim() != 2:
        raise ValueError(f"granularity '{spec.granularity}' needs a 2-D weight [out, in], got {tuple(t.shape)}")
    if spec.granularity == "row":
        return t
    out, width = t.shape
    validate_width(spec, width, f"a weight of shape {tuple(t.shape)}")
    return t.reshape(out, width // spec.group_size, spec.group_size)


def _scale_shape(t: torch.Tensor, spec: QuantSpec) -> tuple[int, ...]:
    # tensor: [], token: [..., 1], row: [out, 1], group: [out, in//G, 1]
    if spec.granularity == "tensor":
        return ()
    if spec.granularity == "token":
        return (*t.shape[:-1], 1)
    v = _view(t, spec)
    return (*v.shape[:-1], 1)


def _as_clip(clip, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Detached clip in x's dtype, shaped [] (one clip) or like the scale (one per slice)."""
    c = torch.as_tensor(clip, dtype=x.dtype, device=x.device).detach()
    if c.numel() == 1:
        return c.reshape(())
    shape = _scale_shape(x, spec)
    if tuple(c.shape) != shape:
        raise ValueError(f"clip of shape {tuple(c.shape)} does not match the scale shape {shape}: "
                         f"pass one value or one per {spec.granularity}")
    return c


def _clamp(x: torch.Tensor, clip, spec: QuantSpec) -> torch.Tensor:
    # [-clip, clip] per slice, in the scale view, returned in x's shape.
    c = _as_clip(clip, x, spec)
    return torch.clamp(_view(x, spec), -c, c).reshape(x.shape)


# --------------------------------------------------------------------------- core math

def compute_scale(w: torch.Tensor, spec: QuantSpec, clip=None) -> torch.Tensor:
    """Symmetric min-max scale ``max|w| / qmax`` (or ``clip / qmax`` when a clip is given).

    Shapes for a weight ``[out, in]``: tensor ``[]``, row ``[out, 1]``, group
    ``[out, in//G, 1]`` (it scales ``w`` viewed as ``[out, in//G, G]``). The scale is
    detached, in ``w``'s dtype, and never below ``1e-8`` (float16: its smallest normal)
    so an all-zero slice quantizes to exact zeros instead of NaN. Ternary specs get
    their scale from :func:`ternary_scale_and_codes`; asymmetric ones from
    :func:`activation_qparams`.

    Example:
        >>> w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
        >>> compute_scale(w, QuantSpec.weight(3, "row")).flatten().tolist()
        [0.6666666865348816, 0.1666666716337204]
        >>> compute_scale(torch.zeros(3), QuantSpec(bits=8)).item() > 0
        True
    """
    if spec.method in ("ternary", "seq", "tbt"):
        raise ValueError(f"{spec.method} scales come from quantize_weight(), not compute_scale()")
    if not spec.symmetric:
        raise ValueError("asymmetric scales come from activation_qparams(), not compute_scale()")
    if spec.granularity == "block":
        raise ValueError("block activation scales come from quantize_activation_block(), not compute_scale()")
    w = w.detach()
    if clip is not None:
        amax = _as_clip(clip, w, spec).expand(_scale_shape(w, spec))
    elif spec.granularity == "tensor":
        amax = w.abs().amax()
    else:
        amax = _view(w, spec).abs().amax(dim=-1, keepdim=True)
    # clone: an expanded clip must not alias into the stored scale.
    return (amax / spec.qmax).clamp_min(_eps(w.dtype)).clone()


def ternary_scale_and_codes(w: torch.Tensor, granularity: str = "tensor",
                            group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN ternarization: ``(alpha, codes)`` with ``w ~= codes * alpha``.

    Per tensor / row / group: ``delta = 0.7 * mean|w|``, ``codes = sign(w) * (|w| > delta)``
    (int8 in {-1, 0, 1}, shape of ``w``), ``alpha = mean of |w| over the kept entries``,
    shaped like :func:`compute_scale`'s scale. An all-zero slice keeps nothing; its
    alpha is clamped to ``1e-8`` so it stays a valid (divisible) scale, and its
    values are exactly 0.

    Example:
        >>> alpha, codes = ternary_scale_and_codes(torch.tensor([[0.0, -3.0, 2.0, 4.0]]), "row")
        >>> codes.tolist(), alpha.flatten().tolist()
        ([[0, -1, 1, 1]], [3.0])
    """
    spec = QuantSpec(bits=2, granularity=granularity, group_size=group_size, method="ternary")
    w = w.detach()
    a = _view(w, spec).abs()
    if granularity == "tensor":
        delta = TERNARY_THRESHOLD * a.mean()
        keep = a > delta
        alpha = (a * keep).sum() / keep.sum().clamp_min(1)
    else:
        delta = TERNARY_THRESHOLD * a.mean(dim=-1, keepdim=True)
        keep = a > delta
        alpha = (a * keep).sum(dim=-1, keepdim=True) / keep.sum(dim=-1, keepdim=True).clamp_min(1)
    alpha = alpha.clamp_min(_eps(w.dtype))
    codes = (torch.sign(_view(w, spec)) * keep).to(torch.int8).reshape(w.shape)
    return alpha, codes


def init_weight_clip(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Statistics-based start of a learned weight range, shaped like the scale (detached).

    ``max|w|`` per slice (ParetoQ: ``seq`` at 2 bits and LSQ at 3/4 bits; ``lsq`` then
    starts exactly at the ``minmax`` grid), and TBT's ``4/3 * mean|w|`` for the 2-bit
    ``lsq`` grid {-1, 0, 1} (a learned ternary). Never below ``1e-8``.

    Example:
        >>> w = torch.tensor([[1.0, -3.0], [0.5, 0.25]])
        >>> init_weight_clip(w, QuantSpec.weight(2, method="seq")).flatten().tolist()
        [3.0, 0.5]
        >>> init_weight_clip(w, QuantSpec.weight(2, method="lsq")).flatten().tolist()
        [2.6666667461395264, 0.5]
    """
    a = _view(w.detach(), spec).abs()
    over = {} if spec.granularity == "tensor" else dict(dim=-1, keepdim=True)
    stat = TBT_FACTOR * a.mean(**over) if spec.method == "lsq" and spec.bits == 2 else a.amax(**over)
    return stat.clamp_min(_eps(w.dtype)).clone()


def tbt_scale(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """TBT's ternary scale ``4/3 * mean|w|`` per slice (shaped like :func:`compute_scale`'s).

    Example:
        >>> tbt_scale(torch.tensor([[0.0, -3.0, 2.0, 1.0]]), QuantSpec.weight(2, "row", method="tbt")).tolist()
        [[2.0]]
    """
    a = _view(w.detach(), spec).abs()
    mean = a.mean() if spec.granularity == "tensor" else a.mean(dim=-1, keepdim=True)
    return (TBT_FACTOR * mean).clamp_min(_eps(w.dtype))


def _mantissa_bits(dtype: torch.dtype) -> int:
    # Stored significand bits: 23 for float32, 10 for float16, 7 for bfloat16.
    return int(round(-math.log2(torch.finfo(dtype).eps)))


def seq_alpha(clip: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``seq`` range actually used: ``clip`` (at least 1e-8) with its lowest ``bits``
    significand bits cleared (relative change below ``2**(bits - 23)`` in float32).

    The spare low bits make ``u * alpha / 2**(bits-1)`` and ``(2**bits - 1) / 2 * alpha /
    2**(bits-1)`` exact for every stored code ``u < 2**bits``, so ONNX Runtime's
    ``MatMulNBits`` with the float zero point ``(2**bits - 1) / 2`` (it computes
    ``u * s - zp * s``) dequantizes to exactly the trained values.

    Example:
        >>> a = seq_alpha(torch.tensor(1.0 + 2.0 ** -23), 2)
        >>> a.item() == 1.0, seq_alpha(torch.tensor(0.75), 2).item()
        (True, 0.75)
    """
    a = clip.clamp_min(_eps(clip.dtype))
    m, e = torch.frexp(a)                                     # a = m * 2**e, m in [0.5, 1)
    keep = 2.0 ** (_mantissa_bits(a.dtype) + 1 - bits)       # significant bits kept
    m = torch.floor(m * keep) / keep                          # exact: powers of two, floor
    return torch.ldexp(m, e).to(a.dtype)


def seq_scale(clip, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Scale of the odd ``seq`` codes: ``seq_alpha(clip) / 2**bits``, shaped like the scale.

    Example:
        >>> seq_scale(torch.tensor([[2.0]]), torch.zeros(1, 3), QuantSpec.weight(2, method="seq")).tolist()
        [[0.5]]
    """
    c = _as_clip(clip, x, spec).expand(_scale_shape(x, spec))
    return (seq_alpha(c, spec.bits) / 2 ** spec.bits).clone()


def quantize(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec,
             zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) [+ zero_point], qmin, qmax)``, shape of ``x``.

    ``round`` is half-to-even (``torch.round``); the zero point is added after rounding,
    as ONNX ``QuantizeLinear`` does. Codes are int8 (symmetric) or uint8 (asymmetric,
    ``zero_point`` required). ``scale`` has :func:`compute_scale`'s shape. For a ternary
    spec this is the grid projection onto {-1, 0, 1}: it recovers the codes of an
    already-ternary tensor, but raw weights are ternarized by
    :func:`ternary_scale_and_codes`.

    Example:
        >>> quantize(torch.tensor([127.0, 2.5, 3.5, -300.0]), torch.tensor(1.0), QuantSpec(bits=8)).tolist()
        [127, 2, 4, -127]
    """
    v = _view(x.detach(), spec)
    if spec.method == "seq":
        # Odd codes 2c + 1, c = round((x/s - 1) / 2) in [-2**(b-1), 2**(b-1) - 1]: ParetoQ's
        # round(clamp(x/alpha) * 2**(b-1) - 1/2) with s = alpha / 2**b (exact powers of two).
        n = 2 ** (spec.bits - 1)
        c = torch.clamp(torch.round((v / scale - 1) / 2), -n, n - 1)
        return (2 * c + 1).to(torch.int8).reshape(x.shape)
    q = torch.round(v / scale)
    if not spec.symmetric:
        if zero_point is None:
            raise ValueError("asymmetric quantize() needs the zero_point from activation_qparams()")
        q = q + zero_point.to(q.dtype)
    return torch.clamp(q, spec.qmin, spec.qmax).to(spec.code_dtype).reshape(x.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, spec: QuantSpec,
               zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Float values ``(codes [- zero_point]) * scale`` in ``scale``'s dtype, shape of ``codes``.

    This is the only place codes become floats, for fake quantization and packed
    inference alike.

    Example:
        >>> dequantize(torch.tensor([1, -3], dtype=torch.int8), torch.tensor(0.5), QuantSpec(bits=3)).tolist()
        [0.5, -1.5]
    """
    v = _view(codes, spec).to(scale.dtype)
    if not spec.symmetric:
        if zero_point is None:
            raise ValueError("asymmetric dequantize() needs the zero_point from activation_qparams()")
        v = v - zero_point.to(scale.dtype)
    return (v * scale).reshape(codes.shape)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, clip=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of a symmetric spec: what a packer stores for ``w``.

    ``dequantize(codes, scale, spec)`` equals ``fake_quant(w, spec, clip)`` bit for bit.
    With ``clip``, ``w`` is first clamped to ``[-clip, clip]`` and the min-max scale is
    ``clip / qmax`` (ternary: the TWN threshold and alpha are taken on the clamped
    values, as DQ-BART does).

    Example:
        >>> spec = QuantSpec.weight(4, "row")
        >>> w = torch.tensor([[0.7, -0.1], [1.4, 0.6]])
        >>> codes, scale = quantize_weight(w, spec)
        >>> codes.tolist()
        [[7, -1], [7, 3]]
        >>> torch.equal(dequantize(codes, scale, spec), fake_quant(w, spec))
        True
    """
    if not spec.symmetric:
        raise ValueError("quantize_weight() is for symmetric specs; use activation_qparams() + quantize()")
    if spec.method == "seq":
        # The clamp is the code range itself (values beyond alpha take the outer level).
        if clip is None:
            raise ValueError("method 'seq' learns its range: pass clip (e.g. init_weight_clip(w, spec))")
        scale = seq_scale(clip, w, spec)
        return quantize(w, scale, spec), scale
    x = w.detach() if clip is None else _clamp(w.detach(), clip, spec)
    if spec.method == "ternary":
        alpha, codes = ternary_scale_and_codes(x, spec.granularity, spec.group_size)
        return codes, alpha
    if spec.method == "tbt":
        scale = tbt_scale(x, spec)
        return quantize(x, scale, spec), scale
    scale = compute_scale(x, spec, clip=clip)
    return quantize(x, scale, spec), scale


def activation_qparams(x: torch.Tensor, bits: int, symmetric: bool = True,
                       granularity: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic ``(scale, zero_point)`` for an activation: shape ``[..., 1]`` per token (one
    per row of the last dim), ``[]`` with ``granularity="tensor"``.

    Symmetric: ``scale = max|x| / (2**(bits-1) - 1)``, zero point int8 0. Asymmetric
    (ONNX ``DynamicQuantizeLinear``): the range is widened to include 0 so that 0 is
    exactly representable, ``scale = (max - min) / (2**bits - 1)``, zero point
    ``round(-min / scale)`` as uint8. Scales are never below ``1e-8``.

    Example:
        >>> s, zp = activation_qparams(torch.tensor([-1.0, 0.0, 3.0]), 8, symmetric=False)
        >>> round(s.item() * 255, 5), zp.item()
        (4.0, 64)
        >>> activation_qparams(torch.tensor([[1.0, -2.0], [0.5, 0.25]]), 3)[0].flatten().tolist()
        [0.6666666865348816, 0.1666666716337204]
    """
    spec = QuantSpec.activation(bits, symmetric=symmetric, granularity=granularity)
    x = x.detach()
    if symmetric:
        return compute_scale(x, spec), torch.zeros((), dtype=torch.int8, device=x.device)
    over = dict(dim=-1, keepdim=True) if granularity == "token" else {}   # per row, or the whole tensor
    lo = torch.clamp(x.amin(**over), max=0)
    hi = torch.clamp(x.amax(**over), min=0)
    scale = ((hi - lo) / spec.qmax).clamp_min(_eps(x.dtype))
    zero_point = torch.clamp(torch.round(-lo / scale), 0, spec.qmax).to(torch.uint8)
    return scale, zero_point


def quantize_activation_block(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [..., K], scale float32 [..., K//B, 1])``: ONNX Runtime's MatMulNBits input
    quantizer at ``accuracy_level=4`` (MLAS ``QuantizeARow_CompInt8``), op for op.

    Per row and block of ``B = spec.group_size`` inputs, in float32::

        m     = max|x|                    (over the block)
        scale = m / 127                   (stored; the kernel multiplies by it)
        inv   = 127 / m, or 0 when m == 0 (the reciprocal: x is multiplied, never divided)
        codes = round_half_even(x * inv)  (-127..127; the kernel's _MM_ROUND_NEAREST)

    so the value ``codes * scale`` is what the kernel's int8 dot products compute with (up to
    the order of the float sums). Multiplying by ``127 / m`` is not dividing by ``m / 127``:
    the two differ in the last bit for some inputs and then round to different codes. An
    all-zero block has scale 0 and codes 0. Inputs of other dtypes are quantized in float32.

    Example:
        >>> spec = QuantSpec.activation(8, granularity="block", block_size=2)
        >>> codes, scale = quantize_activation_block(torch.tensor([[127.0, 2.5, 0.0, 0.0]]), spec)
        >>> codes.tolist(), scale.flatten().tolist()
        ([[127, 2, 0, 0]], [1.0, 0.0])
    """
    if spec.granularity != "block":
        raise ValueError(f"quantize_activation_block() needs granularity 'block', got '{spec.granularity}'")
    v = _view(x.detach().to(torch.float32), spec)                       # [..., K//B, B]
    m = v.abs().amax(dim=-1, keepdim=True)
    qmax = torch.tensor(BLOCK_ACT_QMAX, dtype=torch.float32, device=x.device)
    scale = m / qmax
    inv = torch.where(m != 0, qmax / torch.where(m != 0, m, torch.ones_like(m)), torch.zeros_like(m))
    codes = torch.clamp(torch.round(v * inv), -BLOCK_ACT_QMAX, BLOCK_ACT_QMAX)   # (a no-op: |x * inv| <= 127)
    return codes.to(torch.int8).reshape(x.shape), scale


# --------------------------------------------------------------------------- fake quant

def _fake_quant_value(x: torch.Tensor, spec: QuantSpec, clip) -> torch.Tensor:
    # The forward value, built only from the public quantize/dequantize path (the invariant).
    if spec.granularity == "block":
        codes, scale = quantize_activation_block(x, spec)
        return dequantize(codes, scale, spec).to(x.dtype)
    if not spec.symmetric:
        scale, zero_point = activation_qparams(x, spec.bits, symmetric=False, granularity=spec.granularity)
        return dequantize(quantize(x, scale, spec, zero_point), scale, spec, zero_point)
    codes, scale = quantize_weight(x, spec, clip)
    return dequantize(codes, scale, spec)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: the quantized value. Backward: straight-through estimator.

    * no clip (dynamic min-max, ternary, asymmetric): identity. For min-max the range
      is max|x| itself, so nothing is ever clipped; ternary passes the gradient through
      unchanged as TWN / TernaryBERT do (alpha gets no gradient).
    * with clip: the gradient wrt x is zero where |x| > clip (clipped) and passes where
      |x| <= clip; the clip gets the PACT gradient (minmax), LSQ gradient (lsq) or
      ParetoQ's stretched-elastic gradient (seq); ternary and tbt clips are fixed (no
      gradient).
    """

    @staticmethod
    def forward(ctx, x, clip, spec):
        ctx.spec = spec
        ctx.save_for_backward(x if clip is not None else None, clip)
        return _fake_quant_value(x, spec, clip)

    @staticmethod
    def backward(ctx, grad):
        x, clip = ctx.saved_tensors
        spec = ctx.spec
        if clip is None:
            return grad, None, None
        c = _as_clip(clip, x, spec)                 # [] or scale shape
        v, gv = _view(x, spec), _view(grad, spec)   # scale view of x and of its gradient
        inside = v.abs() <= c
        grad_x = torch.where(inside, gv, torch.zeros_like(gv)).reshape(x.shape)
        grad_clip = None
        if ctx.needs_input_grad[1] and spec.method in ("minmax", "lsq", "seq"):
            sign = torch.sign(v)
            if spec.method == "minmax":
                # PACT: y = clip * sign(x) outside the range, independent of clip inside.
                d = torch.where(inside, torch.zeros_like(v), sign)
            elif spec.method == "seq":
                # ParetoQ: y = alpha * L(x/alpha) with levels L = code / 2**b; dy/dalpha =
                # L - x/alpha inside (straight through L), L = +-(2**b - 1) / 2**b outside;
                # LSQ's gradient scale 1 / sqrt(N * max(2**(b-1) - 1, 1)).
                s = seq_scale(clip, x, spec)
                level = _view(quantize(x, s, spec), spec).to(v.dtype) / 2 ** spec.bits
                d = torch.where(inside, level - v / (s * 2 ** spec.bits), sign * (spec.qmax / 2 ** spec.bits))
                d = d / math.sqrt(v.numel() / c.numel() * max(2 ** (spec.bits - 1) - 1, 1))
            else:
                # LSQ with step s = clip / qmax: dy/ds = round(x/s) - x/s inside and
                # +-qmax outside; chain to clip (/ qmax) and apply LSQ's gradient scale
                # g = 1 / sqrt(N * qmax), N = elements sharing one step, so the step
                # learns at a rate comparable to the weights.
                s = compute_scale(x, spec, clip=clip)
                r = v / s
                d = torch.where(inside, (torch.round(r) - r) / spec.qmax, sign)
                d = d / math.sqrt(v.numel() / c.numel() * spec.qmax)
            g = gv * d
            grad_clip = g.sum() if c.dim() == 0 else g.sum_to_size(c.shape)
            grad_clip = grad_clip.reshape(clip.shape).to(clip.dtype)
        return grad_x, grad_clip, None


def fake_quant(x: torch.Tensor, spec: QuantSpec, clip=None) -> torch.Tensor:
    """Quantize-dequantize ``x`` in the forward pass, straight-through in the backward.

    ``clip`` (float or tensor, possibly a learned parameter; one value or one per
    row/group, shaped like the scale) clamps ``x`` to ``[-clip, clip]`` and fixes the
    min-max scale at ``clip / qmax``; the gradient wrt ``x`` is zero outside that range,
    and a clip that requires grad receives the PACT (``minmax``) or LSQ (``lsq``)
    gradient. ``lsq`` needs a clip; asymmetric activations are dynamic and take none.
    The value equals ``dequantize(*quantize_weight(x, spec, clip), spec)`` exactly.

    Example:
        >>> w = torch.tensor([[0.3, -1.0, 0.55]], requires_grad=True)
        >>> fake_quant(w, QuantSpec.weight(3, "row")).tolist()
        [[0.3333333432674408, -1.0, 0.6666666865348816]]
        >>> x = torch.tensor([0.3, 2.0, 0.9], requires_grad=True)
        >>> clip = torch.tensor(0.5, requires_grad=True)
        >>> fake_quant(x, QuantSpec(bits=8), clip).sum().backward()
        >>> x.grad.tolist(), clip.grad.item()
        ([1.0, 0.0, 0.0], 2.0)
    """
    if clip is None and spec.learned:
        raise ValueError(f"method '{spec.method}' learns its range: pass clip (e.g. init_weight_clip(w, spec))")
    if clip is not None and not spec.symmetric:
        raise ValueError("asymmetric activation quantization is dynamic: clip is not supported")
    if clip is not None and spec.granularity == "block":
        raise ValueError("block activation quantization is dynamic (MatMulNBits' own): clip is not supported")
    if clip is not None and not isinstance(clip, torch.Tensor):
        clip = torch.tensor(float(clip), dtype=x.dtype, device=x.device)
    if not torch.is_grad_enabled() or not (x.requires_grad or (clip is not None and clip.requires_grad)):
        if spec.role == "activation" and spec.method == "minmax" and spec.granularity != "block":
            return fake_quant_activation_inference(x, spec, clip)   # the same value in fewer ops
        return _fake_quant_value(x, spec, clip)   # inference: the same forward value, no autograd node
    return _FakeQuantSTE.apply(x, clip, spec)


# x + c - c rounds half to even for |x| <= 2**(mantissa bits - 1), exactly as torch.round,
# and gives +0.0 where torch.round gives -0.0 (what the int8 round trip of the reference
# path gives too). bfloat16 (8 bits) cannot hold 8-bit codes this way: torch.round there.
_ROUND_MAGIC = {torch.float32: 1.5 * 2 ** 23, torch.float64: 1.5 * 2 ** 52, torch.float16: 1.5 * 2 ** 10}


def _round_codes_(t: torch.Tensor) -> torch.Tensor:
    # In place: round half to even of values within +-(2**bits) (codes before the clamp),
    # zeros as +0.0. torch.round on CPU opens an OpenMP region from about a thousand
    # elements (a key/value cache, an FFN row): with 2 threads on a busy machine that is
    # milliseconds per call, while the add/sub pair stays on one thread at these sizes.
    c = _ROUND_MAGIC.get(t.dtype)
    return t.round_().add_(0.0) if c is None else t.add_(c).sub_(c)


def fake_quant_activation_inference(x: torch.Tensor, spec: QuantSpec, clip=None) -> torch.Tensor:
    """The forward value of :func:`fake_quant` for a ``minmax`` activation (per token or per
    tensor, symmetric with or without a clip, or asymmetric), bit for bit, in fewer ops.

    Inference (generation) calls the activation quantizer dozens of times per generated
    token on tensors of one row, where each op costs more in dispatch than in arithmetic.
    This computes the very same float operations as :func:`_fake_quant_value` (the same
    scale, the same ``round(x / scale)``, the same clamp, the same product with the same
    scale, in the same order and dtype) and leaves out only what cannot change a value:
    the round trip of the integer codes through int8/uint8 (exact for integers in the
    code range), the defensive clone of the scale and the reshapes of per-token views; the
    rest runs in place on fresh tensors (``x`` is read, never written). Rounding half to
    even is ``v + c - c`` (``c = 1.5 * 2**23`` in float32), the same integers as
    ``torch.round`` for every code-range value and +0.0 where the reference's int8 round
    trip makes +0.0 of a rounded -0.0 (bfloat16: ``torch.round`` and ``+ 0.0``). The one
    difference: a NaN input under a clip stays NaN here (the int8 round trip gives it an
    arbitrary code); without a clip a NaN makes its row's scale NaN in both. No autograd:
    call it only where nothing needs a gradient (:func:`fake_quant` does).

    Example:
        >>> spec = QuantSpec.activation(8)
        >>> x = torch.tensor([[0.3, -1.0, 0.001], [2.0, 0.0, -0.5]])
        >>> torch.equal(fake_quant_activation_inference(x, spec), _fake_quant_value(x, spec, None))
        True
    """
    if spec.role != "activation" or spec.granularity not in ("token", "tensor") or spec.method != "minmax":
        raise ValueError(f"fake_quant_activation_inference() is for minmax activations per token or tensor, got "
                         f"{spec.role} {spec.method} per {spec.granularity}")
    token = spec.granularity == "token"
    qmax = float(spec.qmax)
    if not spec.symmetric:
        if clip is not None:
            raise ValueError("asymmetric activation quantization is dynamic: clip is not supported")
        # activation_qparams(), quantize() and dequantize() with the zero point kept as a float.
        lo = torch.clamp(x.amin(dim=-1, keepdim=True) if token else x.amin(), max=0)
        hi = torch.clamp(x.amax(dim=-1, keepdim=True) if token else x.amax(), min=0)
        scale = hi.sub_(lo).div_(qmax).clamp_min_(_eps(x.dtype))
        zp = torch.round(lo.neg_().div_(scale)).clamp_(0.0, qmax)
        q = _round_codes_(torch.div(x, scale)).add_(zp).clamp_(0.0, qmax)
        return q.sub_(zp).mul_(scale)
    if clip is None:   # compute_scale(): max|x| / qmax
        scale = _dynamic_scale(x, token, qmax)
    else:              # quantize_weight() with a clip: clamp to [-clip, clip], scale clip / qmax
        c = torch.as_tensor(clip, dtype=x.dtype, device=x.device).detach()
        if c.numel() != 1:    # one clip per token: rare, the reference path handles the shapes
            return _fake_quant_value(x, spec, clip)
        c = c.reshape(())
        x = torch.clamp(x, -c, c)
        scale = (c / qmax).clamp_min(_eps(x.dtype))
    return _symmetric_float_codes(x, scale, qmax).mul_(scale)


def _dynamic_scale(x: torch.Tensor, token: bool, qmax: float) -> torch.Tensor:
    # compute_scale()'s max|x| / qmax (per row [..., 1], or []) in fewer ops, on fresh tensors.
    a = x.abs()
    return (a.amax(dim=-1, keepdim=True) if token else a.amax()).div_(qmax).clamp_min_(_eps(x.dtype))


def _symmetric_float_codes(x: torch.Tensor, scale: torch.Tensor, qmax: float) -> torch.Tensor:
    # quantize()'s clamp(round(x / scale)) as floats of x's dtype (a fresh tensor; x is only read).
    return _round_codes_(torch.div(x, scale)).clamp_(-qmax, qmax)


def activation_codes(x: torch.Tensor, spec: QuantSpec, clip=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8, scale)`` of a symmetric ``minmax`` activation per token or per tensor:
    the integers an integer matmul multiplies (ONNX ``MatMulInteger``'s input), with
    ``dequantize(codes, scale, spec)`` equal to ``fake_quant(x, spec, clip)`` bit for bit.

    ``scale`` is ``[..., 1]`` per token, ``[]`` per tensor (:func:`compute_scale`'s shapes).
    Without a clip this is :func:`fake_quant_activation_inference`'s op sequence up to the
    codes (fewer ops than :func:`quantize_weight`, the same values); with a clip it is
    :func:`quantize_weight`. No autograd: inference only.

    Example:
        >>> spec = QuantSpec.activation(8)
        >>> x = torch.tensor([[0.3, -1.0, 0.001], [2.0, 0.0, -0.5]])
        >>> codes, scale = activation_codes(x, spec)
        >>> codes.tolist(), torch.equal(dequantize(codes, scale, spec), fake_quant(x, spec))
        ([[38, -127, 0], [127, 0, -32]], True)
    """
    if spec.role != "activation" or not spec.symmetric or spec.method != "minmax" \
            or spec.granularity not in ("token", "tensor") or spec.bits > 8:
        raise ValueError(f"activation_codes() is for symmetric minmax activations of <= 8 bits per token or "
                         f"tensor, got {spec.role} {spec.method} {spec.bits}-bit per {spec.granularity}")
    if clip is not None:
        return quantize_weight(x, spec, clip)
    qmax, x = float(spec.qmax), x.detach()
    scale = _dynamic_scale(x, spec.granularity == "token", qmax)
    return _symmetric_float_codes(x, scale, qmax).to(torch.int8), scale


def fake_quant_activation(x: torch.Tensor, bits: int, symmetric: bool = True, clip=None,
                          granularity: str = "token", block_size: int | None = None) -> torch.Tensor:
    """Activation fake quantization (per token, or per tensor): dynamic min-max, or PACT with a ``clip``.

    Asymmetric values are exactly what ``quantize`` + ``dequantize`` with
    :func:`activation_qparams` give, i.e. what an ONNX integer runtime computes.

    Example:
        >>> fake_quant_activation(torch.tensor([-1.0, 0.5, 2.0]), 2, symmetric=False).tolist()
        [-1.0, 0.0, 2.0]
    """
    return fake_quant(x, QuantSpec.activation(bits, symmetric=symmetric, granularity=granularity,
                                              block_size=block_size), clip)
