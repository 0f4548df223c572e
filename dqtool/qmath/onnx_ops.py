"""Export-mode packed Linears: PyTorch forward = the packed runtime, ONNX symbolic = ORT's
quantized ops on the trained integers.

:func:`onnx_linear` is a packed Linear's forward while exporting (export's own module). It
computes exactly what the packed runtime computes (so optimum's tracing and
any check run the trained numerics); the TorchScript exporter calls the autograd
function's ``symbolic`` instead, which writes one of two ONNX Runtime paths:

``integer`` (activations quantized; weights per row or per tensor) -- bit-faithful up to
float rounding of the final rescale::

    x --(|x|max/qmax per token or tensor | PACT clip)--> codes (+128 as uint8, zero point
      128: ORT's fast u8s8 kernels) --MatMulInteger(int8 W codes [K, N])--> int32
      (8-bit W codes as uint8 + 128 with zero point 128: u8s8 saturates int16 pair sums on
      CPUs without VNNI, u8u8 is exact everywhere; see :func:`weight_as_uint8`)
      --Cast--> * s_x * s_w[N] + bias
    symmetric per token over many rows (encoder, cross-attention keys/values): the same codes and
    sums in five big ops, QuantizeLinear(x / s, 1, 128) -> MatMulIntegerToFloat(u8, W, 1, s_w, 128)
    * s + bias (:func:`_row_scaled_matmul`)
    asymmetric per tensor (8-bit): DynamicQuantizeLinear -> MatMulInteger(x_u8, W, x_zp)
    (ORT fuses these into DynamicQuantizeMatMul / MatMulIntegerToFloat)
    asymmetric per token: codes and per-row zero points computed in-graph as training
    does; MatMulInteger(x_u8, W) - zp * colsum(W) (exact int32; ORT's MatMulInteger
    takes scalar zero points only)

  W codes are stored packed (``qweight``, dqtool.qmath.pack layout); the graph unpacks them
  with BitShift/BitwiseAnd/Cast/Transpose on the initializer only, which ONNX Runtime
  constant-folds when the session starts: the file keeps 2/4 bits per weight, the
  kernels see int8.

``nbits`` (weight-only schemes, group-wise scales, or on request) -- ``MatMulNBits`` with
the packed codes as ``B`` ([N, K/block, block*bits/8], identical bytes) and the scales
repeated per block (exact: the same scale; ``seq``'s odd codes: twice the scale and the
float zero point ``(2^b - 1) / 2``, exact as well, see :func:`_nbits_inputs`).
The bias is the node's own input (no Add). Activations, when the scheme quantizes them, are
fake-quantized in the graph first; with
``accuracy_level=4`` ORT then re-quantizes A per block to int8 for speed (an approximation
of training's grid), with ``accuracy_level=0`` it computes in float (faithful, slower for 2/8 bits). For 8-bit
dynamic activations at level 4 the graph leaves the quantization to the kernel
(:func:`kernel_quantizes_input`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dqtool.qmath.pack import odd_offset, pack_codes, row_bytes, unpack_codes, unpack_method_codes, zero_point
from dqtool.qmath.quant import QuantSpec, dequantize, fake_quant

INTEGER, NBITS = "integer", "nbits"
NBITS_BITS = (2, 4, 8)            # MatMulNBits CPU kernels in onnxruntime 1.32 (not 3)
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class LinearPlan:
    """How one Linear is exported (decided, and validated, before export)."""

    path: str                  # integer | nbits
    bits: int
    in_features: int
    out_features: int
    a_bits: int | None         # None: activations stay float
    a_symmetric: bool
    clip: float                # learned PACT clip, 0.0 when dynamic
    a_granularity: str = "token"  # dynamic range per token (row of the last dim) or per tensor
    block_size: int = 0        # nbits only
    accuracy_level: int = 4    # nbits only
    odd_codes: bool = False    # seq weights: stored u = (code + 2^b - 1) / 2 (dqtool.qmath.pack.pack_odd_codes)
    # nbits only: the bits of the MatMulNBits kernel (0: ``bits``). Wider than ``bits``, the stored
    # codes are re-packed in the graph on initializers (constant-folded once at session start: the
    # file keeps the packed bits) with the same integers -- see :func:`kernel_bits`.
    kernel_bits: int = 0
    # Runs once per generated token (one row per sequence: decoder Linears, lm_head), not over all
    # source tokens (encoder, cross-attention keys/values); picks the integer path's op sequence.
    per_token: bool = False

    @property
    def nbits(self) -> int:
        """The ``bits`` attribute of this Linear's MatMulNBits node."""
        return self.kernel_bits or self.bits

    @property
    def per_row(self) -> bool:
        """One dynamic range per row of the input (per token); a learned clip is one range."""
        return self.a_granularity == "token" and self.clip == 0


def choose_block(spec: QuantSpec, k: int) -> int:
    """MatMulNBits block size for a weight: its group size, or (row/tensor scales) the
    largest of 32/16 dividing K; 0 when none fits.

    Example:
        >>> choose_block(QuantSpec.weight(4, "row"), 768), choose_block(QuantSpec.weight(4, "group", 64), 768)
        (32, 64)
    """
    if spec.granularity == "group":
        return spec.group_size if spec.group_size in BLOCK_SIZES else 0
    for b in (32, 16):
        if k % b == 0:
            return b
    return 0


# MatMulNBits kernel widths, measured with benchmarks/nbits_kernels.py (onnxruntime 1.32, 2 threads,
# microseconds per call at BART-base shapes; benchmarks/results/nbits_kernels_rows_*.md):
#                          AMD EPYC, AVX-512 VNNI              Intel Xeon, AVX-512 VNNI + AMX
#   M=1   768x768 / 768x3072 / 3072x768 / 768x50265
#     2-bit                16.7 / 73 / 60 / 653                31 / 68 / 63
#     4-bit                16.4 / 30 / 32 / 678                17 / 69 / 36
#   M=8   2-bit            106 / 202 / 319 / 3899              183 / 359 / 349
#         4-bit             62 / 129 / 167 / 2523               50 / 172 / 170
#   M=128 4-bit            486 / 1530 / 1869                   652 / 2457 / 2550
#         8-bit            413 / 1326 / 1773                   596 / 2219 / 2249
# The 2-bit kernel is compute-bound, not bandwidth-bound, at these sizes (the lm_head's 9.7 MB
# in 653 us is 15 GB/s): 4-bit runs one-row Linears as fast or faster (within 4% on the
# lm_head at M=1, 1.5x faster at M=8), and 8-bit is the fastest MatMulNBits over many rows.
KERNEL_BITS_CHOICES = ("auto", "weight")


def kernel_bits(bits: int, per_token: bool, odd_codes: bool = False, lut_gemm: bool = False) -> int:
    """The MatMulNBits width for ``bits``-bit weight codes under ``--nbits-kernel auto``: Linears
    that run over all source tokens (encoder, cross-attention keys/values) 8 bits, Linears run
    once per generated token at least 4 (see the measurements above). The codes are the same
    integers at any width, and at accuracy level 4 the kernel quantizes its input the same way,
    so the choice changes speed and memory at run time, never the result. Odd codes (seq weights,
    float zero points) and 2-bit Linears for the LUT kernel keep their own bits.

    Example:
        >>> kernel_bits(2, per_token=True), kernel_bits(2, per_token=False), kernel_bits(8, per_token=True)
        (4, 8, 8)
        >>> kernel_bits(2, per_token=True, lut_gemm=True), kernel_bits(2, per_token=False, odd_codes=True)
        (2, 2)
    """
    if odd_codes:
        return bits
    if not per_token:
        return 8
    return bits if lut_gemm else max(bits, 4)


# --------------------------------------------------------------------------- symbolic helpers

def _const(g, value, dtype):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _onnx_type(name: str) -> int:
    import onnx

    return getattr(onnx.TensorProto, name)


def _reduce(g, op, x, per_token: bool):
    # per token: over the last axis, kept as [..., 1]; per tensor: a scalar.
    return g.op(op, x, _const(g, [-1], torch.int64), keepdims_i=1) if per_token else g.op(op, x, keepdims_i=0)


def _token_zero_points(plan: LinearPlan) -> bool:
    # Asymmetric per-token codes: one float zero point per row (see _act_codes).
    return not plan.a_symmetric and plan.per_row


def _act_grid(g, x, plan: LinearPlan):
    """``(r, scale, zero_point)``: the activation's codes as float integers on training's grid
    (symmetric ``-qmax..qmax``, zero point None; asymmetric per token ``0..2^b-1`` with a
    float ``[..., 1]`` zero point), computed with the same float ops as
    :func:`dqtool.qmath.quant.quantize` / ``activation_qparams``."""
    f32 = torch.float32
    if not plan.a_symmetric:
        qmax = float(2 ** plan.a_bits - 1)
        lo = g.op("Min", _reduce(g, "ReduceMin", x, True), _const(g, 0.0, f32))
        hi = g.op("Max", _reduce(g, "ReduceMax", x, True), _const(g, 0.0, f32))
        s = g.op("Max", g.op("Div", g.op("Sub", hi, lo), _const(g, qmax, f32)), _const(g, 1e-8, f32))
        zp = g.op("Clip", g.op("Round", g.op("Div", g.op("Neg", lo), s)), _const(g, 0.0, f32), _const(g, qmax, f32))
        r = g.op("Add", g.op("Round", g.op("Div", x, s)), zp)
        return g.op("Clip", r, _const(g, 0.0, f32), _const(g, qmax, f32)), s, zp
    qmax = 2 ** (plan.a_bits - 1) - 1
    if plan.clip > 0:
        c = torch.tensor(plan.clip, dtype=f32)
        x = g.op("Clip", x, _const(g, -c.item(), f32), _const(g, c.item(), f32))
        s = _const(g, (c / qmax).clamp_min(1e-8).item(), f32)
    else:
        amax = _reduce(g, "ReduceMax", g.op("Abs", x), plan.per_row)
        s = g.op("Max", g.op("Div", amax, _const(g, float(qmax), f32)), _const(g, 1e-8, f32))
    r = g.op("Round", g.op("Div", x, s))
    if plan.clip > 0:
        r = g.op("Clip", r, _const(g, float(-qmax), f32), _const(g, float(qmax), f32))
    # (Dynamic ranges need no Clip: |x| <= max|x| = s * qmax, so |x / s| rounds to <= qmax.)
    return r, s, None


def _act_codes(g, x, plan: LinearPlan):
    """``(codes uint8, scale, zero_point)`` of the activation for MatMulInteger.

    The zero point is the uint8 scalar 128 (symmetric codes stored +128), the uint8
    scalar of ``DynamicQuantizeLinear`` (asymmetric per tensor: exactly training's
    quantizer), or -- asymmetric per token -- a float ``[..., 1]`` tensor, which
    MatMulInteger cannot take (ORT: scalar zero points only) and :func:`_integer_matmul`
    subtracts itself."""
    if not plan.a_symmetric and not _token_zero_points(plan):
        q, s, zp = g.op("DynamicQuantizeLinear", x, outputs=3)
        return q, s, zp
    r, s, zp = _act_grid(g, x, plan)
    if zp is not None:
        return g.op("Cast", r, to_i=_onnx_type("UINT8")), s, zp
    # Stored as uint8 code + 128 with zero point 128: the same integers (MatMulInteger
    # subtracts the zero point exactly), but ORT's fast u8s8 kernels instead of s8s8.
    u = g.op("Cast", g.op("Add", r, _const(g, 128.0, torch.float32)), to_i=_onnx_type("UINT8"))
    return u, s, _const(g, 128, torch.uint8)


def _block_fake_quant_act(g, x, plan: LinearPlan):
    """MatMulNBits' own int8 input quantizer written as float ops (for ``accuracy_level=0``, or
    a block the kernel computes in float): per row and block of ``block_size`` inputs,
    ``round(x * (127 / m)) * (m / 127)`` with ``m = max|x|`` (0 where ``m == 0``), as
    :func:`dqtool.quant.quantize_activation_block`."""
    f32 = torch.float32
    xb = g.op("Reshape", x, _const(g, [-1, plan.block_size], torch.int64))          # [rows * K/B, B]
    m = g.op("ReduceMax", g.op("Abs", xb), _const(g, [-1], torch.int64), keepdims_i=1)
    qmax = _const(g, 127.0, f32)
    s = g.op("Div", m, qmax)
    inv = g.op("Where", g.op("Equal", m, _const(g, 0.0, f32)), _const(g, 0.0, f32), g.op("Div", qmax, m))
    v = g.op("Mul", g.op("Round", g.op("Mul", xb, inv)), s)
    return g.op("Reshape", v, g.op("Shape", x))


def _fake_quant_act(g, x, plan: LinearPlan):
    """The activation's dequantized value ``(codes - zero point) * scale`` (float ops only,
    no integer casts: the input of MatMulNBits)."""
    if plan.a_granularity == "block":
        return _block_fake_quant_act(g, x, plan)
    if not plan.a_symmetric and not _token_zero_points(plan):
        return g.op("DequantizeLinear", *g.op("DynamicQuantizeLinear", x, outputs=3))
    r, s, zp = _act_grid(g, x, plan)
    return g.op("Mul", r if zp is None else g.op("Sub", r, zp), s)


# u8s8 int8 GEMMs on x86 CPUs without VNNI (AVX2, AVX-512 before VNNI) sum pairs of uint8 x int8
# products in int16 with saturation (vpmaddubsw): 255 * |w| * 2 must stay <= 32767, so weight
# codes up to 64 in magnitude are exact everywhere, larger ones (8-bit weights) are not.
U8S8_SAFE_MAX_CODE = 64


def weight_max_code(bits: int, odd_codes: bool) -> int:
    """Largest magnitude of a ``bits``-bit weight code (symmetric: ``2**(bits-1)``; odd codes:
    ``2**bits - 1``).

    Example:
        >>> weight_max_code(8, False), weight_max_code(4, False), weight_max_code(2, True)
        (128, 8, 3)
    """
    return odd_offset(bits) if odd_codes else zero_point(bits)


def weight_as_uint8(plan: LinearPlan) -> bool:
    """Whether the integer path stores this Linear's weight codes as uint8 ``code + 128`` with
    the zero point 128 (ORT's u8u8 kernels, exact on every CPU) instead of int8 (u8s8, which
    saturates on CPUs without VNNI once codes exceed :data:`U8S8_SAFE_MAX_CODE`: 8-bit weights).

    Example:
        >>> [weight_max_code(b, False) > U8S8_SAFE_MAX_CODE for b in (8, 4, 3, 2)]   # the test below, per bits
        [True, False, False, False]
    """
    return weight_max_code(plan.bits, plan.odd_codes) > U8S8_SAFE_MAX_CODE


def _stored_codes(g, qweight, plan: LinearPlan):
    """The stored unsigned codes ``[N, K]`` (uint8, ``0 .. 2^bits - 1``) of the packed ``[N, row_bytes]``
    rows (bit-unpacked on the initializer: constant-folded by ORT)."""
    bits, k, n = plan.bits, plan.in_features, plan.out_features
    u = qweight
    if bits != 8:
        per = 8 // bits
        shifts = _const(g, [i * bits for i in range(per)], torch.uint8)
        u = g.op("BitShift", g.op("Unsqueeze", u, _const(g, [-1], torch.int64)), shifts, direction_s="RIGHT")
        u = g.op("BitwiseAnd", u, _const(g, (1 << bits) - 1, torch.uint8))
        u = g.op("Reshape", u, _const(g, [n, row_bytes(k, bits) * per], torch.int64))
        u = g.op("Slice", u, _const(g, [0], torch.int64), _const(g, [k], torch.int64), _const(g, [1], torch.int64))
    return u


def widening_table(bits: int, kb: int) -> torch.Tensor:
    """``[256, 8 // bits * kb // 8]`` uint8: for each stored byte (``8 / bits`` codes, first in the
    low bits) the bytes of the same signed codes at ``kb`` bits (``u - 2^(bits-1) + 2^(kb-1)``,
    packed ``8 / kb`` per byte, first in the low bits) -- MatMulNBits' layout.

    Example:
        >>> widening_table(2, 4)[0b11100100].tolist()     # codes -2, -1, 0, 1 -> 4-bit 6, 7, 8, 9
        [118, 152]
        >>> widening_table(2, 8)[0b11100100].tolist()
        [126, 127, 128, 129]
    """
    every_byte = torch.arange(256, dtype=torch.uint8).unsqueeze(-1)                   # [256, 1]
    return pack_codes(unpack_codes(every_byte, bits, 8 // bits), kb)                 # the packed layout = MatMulNBits'


def _widened_blob(g, qweight, plan: LinearPlan):
    """MatMulNBits' ``B [N, K/block, block * kb / 8]`` at the kernel's ``kb`` bits from the stored
    ``bits``-bit rows: one ``Gather`` of each stored byte's wider bytes (:func:`widening_table`),
    constant-folded by ORT at session start, so the file keeps the narrow codes."""
    kb, k, n = plan.nbits, plan.in_features, plan.out_features
    table = g.op("Constant", value_t=widening_table(plan.bits, kb))
    idx = g.op("Cast", qweight, to_i=_onnx_type("INT32"))                             # [N, K * bits / 8]
    wide = g.op("Gather", table, idx, axis_i=0)                                       # [N, K * bits / 8, 8 / bits * kb / 8]
    return g.op("Reshape", wide, _const(g, [n, k // plan.block_size, plan.block_size * kb // 8], torch.int64))


def _weight_codes_kn(g, qweight, plan: LinearPlan):
    """``(codes [K, N], zero point)`` from the packed ``[N, row_bytes]`` initializer (constant-folded
    by ORT): int8 codes and no zero point, or -- :func:`weight_as_uint8` -- uint8 ``code + 128``
    and the uint8 zero point 128 (the same integers to MatMulInteger)."""
    bits = plan.bits
    c = g.op("Cast", _stored_codes(g, qweight, plan), to_i=_onnx_type("INT32"))
    if plan.odd_codes:
        # seq: code = 2u - (2^b - 1), the odd int8 codes training used (scale alpha / 2^b): exact
        c = g.op("Sub", g.op("Mul", c, _const(g, 2, torch.int32)), _const(g, odd_offset(bits), torch.int32))
    else:
        c = g.op("Sub", c, _const(g, zero_point(bits), torch.int32))
    if weight_as_uint8(plan):
        c = g.op("Add", c, _const(g, 128, torch.int32))
        return g.op("Transpose", g.op("Cast", c, to_i=_onnx_type("UINT8")), perm_i=[1, 0]), _const(g, 128, torch.uint8)
    return g.op("Transpose", g.op("Cast", c, to_i=_onnx_type("INT8")), perm_i=[1, 0]), None


def _nbits_inputs(g, qweight, scale, plan: LinearPlan, spec: QuantSpec):
    """MatMulNBits' ``B [N, K/block, blob]``, ``scales [N, K/block]`` and zero points (None:
    the default ``2^(b-1)``) from the stored packed rows and scales (Reshape/Expand on
    initializers: constant-folded by ORT, so the file holds each tensor once, also for a
    tied lm_head).

    seq (odd codes): value = code * s = (u - (2^b - 1)/2) * 2s, so the scales are ``2s``
    and the zero points the float ``(2^b - 1) / 2`` (1.5 at 2 bits). ORT computes
    ``u * 2s - zp * 2s``; both products and the difference are exact because the trained
    alpha keeps ``b`` spare significand bits (:func:`dqtool.qmath.quant.seq_alpha`), so the
    kernel's weights are the trained ones bit for bit. ORT runs float zero points in
    float whatever the accuracy level (no int8 A kernel)."""
    n, nb = plan.out_features, plan.in_features // plan.block_size
    if plan.nbits != plan.bits:
        b = _widened_blob(g, qweight, plan)
    else:
        b = g.op("Reshape", qweight, _const(g, [n, nb, plan.block_size * plan.bits // 8], torch.int64))
    if spec.granularity == "group":
        s = scale
    else:
        col = g.op("Reshape", scale, _const(g, [-1, 1], torch.int64))          # [N, 1] or [1, 1]
        s = g.op("Expand", col, _const(g, [n, nb], torch.int64))
    zp = None
    if plan.odd_codes:
        s = g.op("Mul", s, _const(g, 2.0, torch.float32))                       # exact (power of two)
        zp = g.op("Expand", _const(g, (2 ** plan.bits - 1) / 2, torch.float32), _const(g, [n, nb], torch.int64))
    return b, s, zp


def _integer_matmul(g, q, w, w_zp, zp, plan: LinearPlan):
    """int32 ``(q - zp) @ (w - w_zp)``: MatMulInteger with a scalar zero point, or (per-token
    zero points) with zero point 0, minus ``zp * colsum(w - w_zp)`` -- exact in int32."""
    if not _token_zero_points(plan):
        return g.op("MatMulInteger", q, w, zp) if w_zp is None else g.op("MatMulInteger", q, w, zp, w_zp)
    signed = g.op("Cast", w, to_i=_onnx_type("INT32"))
    if w_zp is not None:
        signed = g.op("Sub", signed, _const(g, 128, torch.int32))
    colsum = g.op("ReduceSum", signed, _const(g, [0], torch.int64), keepdims_i=0)   # [N], constant-folded
    mm = g.op("MatMulInteger", q, w) if w_zp is None else g.op("MatMulInteger", q, w, _const(g, 0, torch.uint8), w_zp)
    return g.op("Sub", mm, g.op("Mul", g.op("Cast", zp, to_i=_onnx_type("INT32")), colsum))


def _absent(g):
    """An omitted optional input (an empty name in ONNX)."""
    n = g.op("prim::Constant")
    n.setType(torch._C.OptionalType.ofTensor())
    return n


def _matmul_nbits(g, a, b, sc, zp, bias, plan: LinearPlan):
    """One MatMulNBits node with the bias as its input 5 (after the zero points and ``g_idx``): no
    Add node per Linear (each node costs ~1-3 us per call at one row)."""
    return g.op("com.microsoft::MatMulNBits", a, b, sc, zp if zp is not None else _absent(g), _absent(g), bias,
                K_i=plan.in_features, N_i=plan.out_features, bits_i=plan.nbits, block_size_i=plan.block_size,
                accuracy_level_i=plan.accuracy_level)


def _row_scaled_matmul(g, x, w, w_zp, w_scale, plan: LinearPlan):
    """Symmetric per-token activations on the integer path in five big ops (was nine: Div, Round,
    Add, Cast, MatMulInteger, Cast, Mul, Mul and the range's Abs)::

        m = max(ReduceMax(x), -ReduceMin(x))             [..., 1]  (= max|x|, no |x| tensor)
        s = max(m / qmax, 1e-8)                          [..., 1]  (training's scale, same float ops)
        u = QuantizeLinear(x / s, 1, 128)                uint8     (round half to even + 128: the codes + 128)
        y = MatMulIntegerToFloat(u, W, 1, s_w, 128, w_zp) * s      (int32 sums, one rescale by s_w[N])

    The codes are training's bit for bit (``x / s`` is the same division; ``QuantizeLinear`` by 1 only
    rounds, saturation never triggers as ``|x / s| <= qmax``); the int32 sums are exact; only the
    float rescale rounds differently (``acc * s_w * s`` instead of ``acc * s * s_w``). Used for the
    Linears over many rows (encoder, cross-attention keys/values); the per-token Linears keep the
    nine small ops, as fast at 8 rows and faster at one (``benchmarks/results/integer_chain.md``,
    onnxruntime 1.32, 2 threads, Intel Xeon AVX-512 VNNI: 1.22-1.41x faster at 128 and 1024 rows,
    1.02x at 8, 0.88x at 1)."""
    f32 = torch.float32
    qmax = 2 ** (plan.a_bits - 1) - 1
    axis = _const(g, [-1], torch.int64)
    m = g.op("Max", g.op("ReduceMax", x, axis, keepdims_i=1), g.op("Neg", g.op("ReduceMin", x, axis, keepdims_i=1)))
    s = g.op("Max", g.op("Div", m, _const(g, float(qmax), f32)), _const(g, 1e-8, f32))
    one, z128 = _const(g, 1.0, f32), _const(g, 128, torch.uint8)
    u = g.op("QuantizeLinear", g.op("Div", x, s), one, z128)
    zps = [w_zp] if w_zp is not None else []
    acc = g.op("com.microsoft::MatMulIntegerToFloat", u, w, one, w_scale, z128, *zps)
    return g.op("Mul", acc, s)


def kernel_int8_compute(bits: int, block_size: int) -> bool:
    """Whether onnxruntime's MatMulNBits at ``accuracy_level=4`` really computes in int8 (and so
    quantizes its input A per row and block) for these weights. Measured on onnxruntime 1.32
    (x86-64, AVX-512 VNNI; ``tests/test_block_act.py`` checks it): 2-bit weights in blocks of 16 fall
    back to float compute (A is used as is); every other 2/4/8-bit block size quantizes A.

    Example:
        >>> kernel_int8_compute(2, 16), kernel_int8_compute(2, 32), kernel_int8_compute(4, 16)
        (False, True, True)
    """
    return not (bits == 2 and block_size < 32)


def kernel_quantizes_input(plan: LinearPlan) -> bool:
    """True when MatMulNBits quantizes the float input itself and the graph need not:
    8-bit dynamic activations at ``accuracy_level=4``, where ORT's kernel rounds A to int8
    per row and block of ``block_size`` inputs.

    * activation granularity ``block`` (the block of the plan): this *is* training's
      quantizer (:func:`dqtool.quant.quantize_activation_block`), so the graph is the one
      MatMulNBits node and exact up to float sums;
    * per token / per tensor: the kernel's grid is finer than training's, so
      fake-quantizing first would only add a second rounding and a dozen small ops per
      Linear per generated token (an approximation: measure it with the export check).
    """
    # (Not with float zero points -- seq weights --, which ORT runs in float at any level.)
    if not (plan.path == NBITS and plan.a_bits == 8 and plan.accuracy_level == 4 and plan.clip == 0
            and not plan.odd_codes):
        return False
    return kernel_int8_compute(plan.nbits, plan.block_size) or plan.a_granularity != "block"


class _QLinearFn(torch.autograd.Function):
    """Forward: the packed runtime's numerics. Symbolic: ORT's quantized ops."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias, plan: LinearPlan, spec: QuantSpec, aspec: QuantSpec | None):
        if aspec is not None:
            clip = torch.tensor(plan.clip, dtype=x.dtype) if plan.clip > 0 else None
            x = fake_quant(x, aspec, clip)
        codes = unpack_method_codes(qweight, plan.bits, plan.in_features, spec.method)  # [N, K] int8
        s = scale if spec.granularity == "tensor" else scale.unsqueeze(-1)
        return F.linear(x, dequantize(codes, s, spec), bias)

    @staticmethod
    def symbolic(g, x, qweight, scale, bias, plan: LinearPlan, spec, aspec):
        if plan.path == INTEGER:
            w, w_zp = _weight_codes_kn(g, qweight, plan)
            if plan.per_row and plan.a_symmetric and not plan.per_token:
                return g.op("Add", _row_scaled_matmul(g, x, w, w_zp, scale, plan), bias)
            q, s, zp = _act_codes(g, x, plan)
            y = _integer_matmul(g, q, w, w_zp, zp, plan)
            y = g.op("Cast", y, to_i=_onnx_type("FLOAT"))
            if plan.per_row:
                # (y * s[..., 1]) * s_w[N]: not Mul(y, Mul(s, s_w)), which ORT would fuse into
                # MatMulIntegerToFloat, whose kernel takes one A scale (wrong for per-row s).
                y = g.op("Mul", g.op("Mul", y, s), scale)
            else:
                y = g.op("Mul", y, g.op("Mul", s, scale))
        else:
            a = x
            if plan.a_bits is not None and not kernel_quantizes_input(plan):
                a = _fake_quant_act(g, x, plan)
            b, sc, zp = _nbits_inputs(g, qweight, scale, plan, spec)
            return _matmul_nbits(g, a, b, sc, zp, bias, plan)
        return g.op("Add", y, bias)


def onnx_linear(linear, x: torch.Tensor, plan: LinearPlan) -> torch.Tensor:
    """Forward of a packed Linear in export mode (:class:`dqtool.stages.export.OnnxLinear`).

    ``linear`` holds the packed ``qweight`` / ``scale`` (or ``tied_to``, the embedding whose
    buffers it shares), ``bias``, ``spec`` and ``act_spec``; its buffers stay under their
    packed names, so they become ONNX initializers under those names, and a tied matrix is
    one initializer. A Linear without bias adds a zero vector, so every exported Linear
    has the same node pattern.
    """
    src = linear.tied_to if linear.tied_to is not None else linear
    bias = linear.bias if linear.bias is not None else torch.zeros(plan.out_features, dtype=src.scale.dtype)
    return _QLinearFn.apply(x, src.qweight, src.scale, bias, plan, linear.spec, linear.act_spec)


# --------------------------------------------------------------------------- base-3 storage

def base3_decode_nodes(src: str, dst: str, rows: int, n: int) -> list:
    """ONNX nodes that turn the base-3 initializer ``src`` (uint8 ``[rows, ceil(n/5)]``,
    :func:`dqtool.qmath.pack.pack_base3`) into ``dst``: the same codes in the 2-bit layout (uint8
    ``[rows, ceil(n/4)]``, :func:`dqtool.qmath.pack.pack_codes`), exactly.

    A Gather into a 243x5 table turns each byte into its five 2-bit values (``trit + 1`` =
    ``code + 2``, the 2-bit zero point; base 3's padding trit 1 is the 2-bit padding value
    2), then four values at a time are shifted into one byte (BitShift, BitwiseOr on
    uint8). Only an initializer feeds them, so ONNX Runtime constant-folds them when the
    session starts and the kernels read the same 2-bit bytes as without base-3 storage;
    nothing runs per step.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from dqtool.qmath.pack import TRITS_PER_BYTE, base3_row_bytes, row_bytes

    nb, m = base3_row_bytes(n), row_bytes(n, 2)
    have, need = nb * TRITS_PER_BYTE, m * 4
    p = f"{dst}/"
    lut = np.array([[(b // 3 ** i) % 3 + 1 for i in range(TRITS_PER_BYTE)] for b in range(3 ** TRITS_PER_BYTE)],
                   dtype=np.uint8)

    def const(name, arr):  # (unnamed values: identical ones across tables are merged by the exporter)
        return helper.make_node("Constant", [], [p + name], value=numpy_helper.from_array(np.asarray(arr)))

    consts = [const("lut", lut), const("shape_vals", np.array([rows, have], dtype=np.int64)),
              const("shape_quads", np.array([rows, m, 4], dtype=np.int64)),
              const("shape_out", np.array([rows, m], dtype=np.int64))]
    nodes = [helper.make_node("Cast", [src], [p + "idx"], to=TensorProto.INT32),
             helper.make_node("Gather", [p + "lut", p + "idx"], [p + "vals5"], axis=0),       # [rows, nb, 5]
             helper.make_node("Reshape", [p + "vals5", p + "shape_vals"], [p + "vals"])]    # [rows, 5 nb]
    vals = p + "vals"
    if have > need:
        consts += [const("zero", np.array([0], dtype=np.int64)), const("need", np.array([need], dtype=np.int64)),
                   const("axis1", np.array([1], dtype=np.int64))]
        nodes.append(helper.make_node("Slice", [vals, p + "zero", p + "need", p + "axis1"], [p + "cut"]))
        vals = p + "cut"
    elif have < need:   # pad with the value of code 0
        consts += [const("two", np.array(2, dtype=np.uint8)),
                   const("pad_shape", np.array([rows, need - have], dtype=np.int64))]
        nodes += [helper.make_node("Expand", [p + "two", p + "pad_shape"], [p + "pad"]),
                  helper.make_node("Concat", [vals, p + "pad"], [p + "padded"], axis=1)]
        vals = p + "padded"
    consts += [const("s2", np.array(2, dtype=np.uint8)), const("s4", np.array(4, dtype=np.uint8)),
               const("s6", np.array(6, dtype=np.uint8))]
    nodes += [helper.make_node("Reshape", [vals, p + "shape_quads"], [p + "quads"]),
              helper.make_node("Split", [p + "quads"], [p + f"v{i}" for i in range(4)], axis=2, num_outputs=4),
              helper.make_node("BitShift", [p + "v1", p + "s2"], [p + "w1"], direction="LEFT"),
              helper.make_node("BitShift", [p + "v2", p + "s4"], [p + "w2"], direction="LEFT"),
              helper.make_node("BitShift", [p + "v3", p + "s6"], [p + "w3"], direction="LEFT"),
              helper.make_node("BitwiseOr", [p + "v0", p + "w1"], [p + "o1"]),
              helper.make_node("BitwiseOr", [p + "o1", p + "w2"], [p + "o2"]),
              helper.make_node("BitwiseOr", [p + "o2", p + "w3"], [p + "o3"]),
              helper.make_node("Reshape", [p + "o3", p + "shape_out"], [dst])]
    return consts + nodes
