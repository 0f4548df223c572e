"""Bit packing of integer codes into bytes: pure tensor math, no modules.

Symmetric b-bit codes ``c`` in ``[-qmax, qmax]`` (ternary: ``{-1, 0, 1}``) are stored
unsigned as ``u = c + 2**(b-1)`` (the *zero point*: 128 for 8 bits, 8 for 4, 4 for 3,
2 for 2), so that ``u`` fits in ``b`` bits. Each row of ``u`` is written as a
little-endian bit stream: value ``j`` occupies bits ``[j*b, (j+1)*b)`` of the row, i.e.
byte ``j*b // 8`` from bit ``j*b % 8`` up. For b in {2, 4, 8} that is ``8//b`` values per
byte, lowest bits first, which is exactly ONNX Runtime's ``MatMulNBits`` layout (its
``B`` input holds per output row the K codes of that row, LSB first, zero point
``2**(b-1)`` by default), so the ONNX exporter reuses these bytes as they are. 3-bit
rows run across byte boundaries (8 values in 3 bytes).

ParetoQ's four-level ``seq`` codes are odd (-3, -1, 1, 3 at 2 bits) and fill all ``2**b``
stored values: they are stored as ``u = (code + 2**b - 1) / 2`` in the same byte layout
(:func:`pack_odd_codes`), which ``MatMulNBits`` reads with the float zero point
``(2**b - 1) / 2``.

A row of ``n`` codes takes ``ceil(n * b / 8)`` bytes; the unused high bits of the last
byte hold the code 0 (``u = zero point``) and are ignored on unpacking, which needs
``n`` (recorded by the packer as ``in_features``).

Example:
    >>> codes = torch.tensor([[-1, 0, 1, 1, -1]], dtype=torch.int8)
    >>> packed = pack_codes(codes, 2)
    >>> packed.shape, packed.dtype
    (torch.Size([1, 2]), torch.uint8)
    >>> torch.equal(unpack_codes(packed, 2, 5), codes)
    True
"""

from __future__ import annotations

import math

import torch

PACK_BITS = (8, 4, 3, 2)


def zero_point(bits: int) -> int:
    """The offset that makes symmetric ``bits``-bit codes unsigned: ``2**(bits-1)``.

    Example:
        >>> [zero_point(b) for b in (8, 4, 3, 2)]
        [128, 8, 4, 2]
    """
    _check_bits(bits)
    return 1 << (bits - 1)


def row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of ``n`` codes takes: ``ceil(n * bits / 8)``.

    Example:
        >>> row_bytes(768, 2), row_bytes(5, 4), row_bytes(10, 3)
        (192, 3, 4)
    """
    _check_bits(bits)
    return math.ceil(n * bits / 8)


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes: choose one of {PACK_BITS}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes ``[..., n]`` (int8) into ``[..., ceil(n*bits/8)]`` uint8 bytes.

    Codes must lie in ``[-(2**(bits-1)-1), 2**(bits-1)-1]``; a code outside the range is
    a ValueError (it would silently wrap).

    Example:
        >>> pack_codes(torch.tensor([[1, -1]], dtype=torch.int8), 4).tolist()   # 9 | 7 << 4
        [[121]]
    """
    _check_bits(bits)
    zp = zero_point(bits)
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < -(zp - 1) or int(c.max()) > zp - 1):
        raise ValueError(f"codes outside [{-(zp - 1)}, {zp - 1}] cannot be packed in {bits} bits")
    return _pack_unsigned((c + zp).to(torch.uint8), bits)


def _pack_unsigned(u: torch.Tensor, bits: int) -> torch.Tensor:
    # u: [..., n] uint8 values < 2**bits -> [..., ceil(n*bits/8)] bytes, LSB first; the
    # padding of the last byte holds the zero point.
    zp = zero_point(bits)
    n = u.shape[-1]
    lead = u.shape[:-1]
    nbytes = row_bytes(n, bits)
    if 8 % bits == 0:
        per = 8 // bits
        u = torch.nn.functional.pad(u, (0, nbytes * per - n), value=zp)
        u = u.reshape(*lead, nbytes, per).to(torch.int32)         # [..., nbytes, per]
        shifts = torch.arange(0, 8, bits, device=u.device, dtype=torch.int32)
        return (u << shifts).sum(-1).to(torch.uint8)
    # General bit stream (3 bits): expand to bits, pad to whole bytes, regroup by 8.
    pad_codes = (nbytes * 8 - n * bits) // bits + 1
    u = torch.nn.functional.pad(u, (0, pad_codes), value=zp)       # enough codes to cover nbytes*8 bits
    weights = torch.arange(bits, device=u.device, dtype=torch.int32)
    stream = ((u.to(torch.int32).unsqueeze(-1) >> weights) & 1).reshape(*lead, -1)[..., : nbytes * 8]
    byte_w = torch.arange(8, device=u.device, dtype=torch.int32)
    return (stream.reshape(*lead, nbytes, 8) << byte_w).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., nbytes]`` uint8 -> ``[..., n]`` int8 codes.

    Works on any device (shifts and masks only), so the CUDA runtime unpacks on the GPU.

    Example:
        >>> unpack_codes(torch.tensor([[121]], dtype=torch.uint8), 4, 2).tolist()
        [[1, -1]]
    """
    return (_unpack_unsigned(packed, bits, n) - zero_point(bits)).to(torch.int8)


def _unpack_unsigned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    # Inverse of _pack_unsigned: [..., nbytes] uint8 -> [..., n] int32 values in 0..2**bits-1.
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    nbytes = packed.shape[-1]
    if nbytes != row_bytes(n, bits):
        raise ValueError(f"a row of {n} {bits}-bit codes takes {row_bytes(n, bits)} bytes, got {nbytes}")
    lead = packed.shape[:-1]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        u = (packed.unsqueeze(-1) >> shifts) & mask                # [..., nbytes, per]
        u = u.reshape(*lead, -1)[..., :n]
    else:
        byte_w = torch.arange(8, device=packed.device, dtype=torch.uint8)
        stream = ((packed.unsqueeze(-1) >> byte_w) & 1).reshape(*lead, -1)[..., : n * bits]
        weights = torch.arange(bits, device=packed.device, dtype=torch.uint8)
        u = (stream.reshape(*lead, n, bits) << weights).sum(-1, dtype=torch.int32)
    return u.to(torch.int32)


# --------------------------------------------------------------------------- odd codes (seq)

def odd_offset(bits: int) -> int:
    """Largest odd code of ``bits`` bits, ``2**bits - 1``: stored ``u = (code + odd_offset) / 2``.

    ParetoQ's ``seq`` levels are the odd codes ``-(2**bits - 1) .. 2**bits - 1`` (four at 2
    bits: -3, -1, 1, 3), which fill all ``2**bits`` stored values ``u`` with no zero.

    Example:
        >>> [odd_offset(b) for b in (2, 3, 4)]
        [3, 7, 15]
    """
    _check_bits(bits)
    return (1 << bits) - 1


def pack_odd_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack odd codes ``[..., n]`` (int8 in ``-(2**bits-1) .. 2**bits-1``) as ``u = (code +
    2**bits - 1) / 2`` in ``bits`` bits per code, in :func:`pack_codes`' byte layout.

    The value of a code is ``code * s``; of a stored ``u`` it is ``(u - (2**bits - 1) / 2)
    * 2s``, i.e. ONNX Runtime's ``MatMulNBits`` with scale ``2s`` and the float zero point
    ``(2**bits - 1) / 2`` (1.5 at 2 bits). An even or out-of-range code is a ValueError.

    Example:
        >>> pack_odd_codes(torch.tensor([[-3, 3]], dtype=torch.int8), 2).tolist()   # u 0 | 3 << 2 | pad 2 << 4, 6
        [[172]]
    """
    top = odd_offset(bits)
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < -top or int(c.max()) > top or bool((c % 2 == 0).any())):
        raise ValueError(f"seq codes must be odd integers in [{-top}, {top}] to be packed in {bits} bits")
    return _pack_unsigned(((c + top) // 2).to(torch.uint8), bits)


def unpack_odd_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_odd_codes`: ``[..., nbytes]`` uint8 -> ``[..., n]`` int8 odd codes.

    Example:
        >>> unpack_odd_codes(torch.tensor([[172]], dtype=torch.uint8), 2, 2).tolist()
        [[-3, 3]]
    """
    return (2 * _unpack_unsigned(packed, bits, n) - odd_offset(bits)).to(torch.int8)


# Quantizer methods whose codes are stored as odd codes (dqtool.quant's ``seq``).
ODD_CODE_METHODS = ("seq",)


def pack_method_codes(codes: torch.Tensor, bits: int, method: str) -> torch.Tensor:
    """:func:`pack_odd_codes` for the ``seq`` method, :func:`pack_codes` for every other one.

    Example:
        >>> c = torch.tensor([[-3, -1, 1, 3]], dtype=torch.int8)
        >>> torch.equal(unpack_method_codes(pack_method_codes(c, 2, "seq"), 2, 4, "seq"), c)
        True
    """
    return pack_odd_codes(codes, bits) if method in ODD_CODE_METHODS else pack_codes(codes, bits)


def unpack_method_codes(packed: torch.Tensor, bits: int, n: int, method: str) -> torch.Tensor:
    """Inverse of :func:`pack_method_codes`: int8 codes ``[..., n]`` of ``method``."""
    return unpack_odd_codes(packed, bits, n) if method in ODD_CODE_METHODS else unpack_codes(packed, bits, n)
