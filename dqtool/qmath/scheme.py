"""The W-E-A quantization scheme of a student, as one frozen, validated config.

DQ-BART names a scheme by its weight, embedding and activation bits, e.g. ``2-2-8``:
ternary weights and embeddings, 8-bit activations. ``none`` leaves a slot in float
(``4-8-none`` is weight-only 4-bit with 8-bit embeddings).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from dqtool.base.errors import DQToolError
from dqtool.qmath.quant import QuantSpec, parse_wea

ACT_CLIPS = ("dynamic", "pact")
# Folders written before act_granularity existed were trained with per-tensor ranges.
LEGACY_ACT_GRANULARITY = "tensor"
ENCODER_ACT_GRANULARITIES = (None, "token", "tensor")  # None: as act_granularity
ACT_BLOCK_SIZES = (16, 32, 64, 128, 256)   # MatMulNBits block sizes
DEFAULT_ACT_BLOCK = 32


def parse_pos_bits(pos: str | int | None, e_bits: int | None) -> int | None:
    """``--pos-bits``: ``e`` follows the embedding bits, ``none`` keeps float, else 8/4/3/2.

    Example:
        >>> parse_pos_bits("e", 4), parse_pos_bits("none", 4), parse_pos_bits("8", 2)
        (4, None, 8)
    """
    if pos is None:
        return None
    word = str(pos).strip().lower()
    if word == "e":
        return e_bits
    if word in ("none", "float"):
        return None
    try:
        return int(word)
    except ValueError:
        raise DQToolError(f"position bits '{pos}' is not supported: choose e (the embedding bits), none, "
                          f"8, 4, 3 or 2") from None


@dataclass(frozen=True)
class QuantScheme:
    """Which tensors are fake-quantized during QAT, and how.

    Example:
        >>> s = QuantScheme.from_wea("2-2-8")
        >>> s.weight_spec().method, s.embedding_spec().granularity, s.activation_spec().bits
        ('ternary', 'row', 8)
        >>> s.wea
        '2-2-8'
    """

    w_bits: int | None = 8
    e_bits: int | None = 8
    a_bits: int | None = 8
    weight_granularity: str = "row"       # tensor | row | group (groups of input columns)
    weight_group_size: int | None = None
    weight_method: str | None = None      # None: ternary for 2 bits, min-max otherwise; or lsq, seq, tbt
    act_symmetric: bool = True
    act_clip: str = "dynamic"             # dynamic max|x| (per token/tensor), or a learned PACT clip
    act_granularity: str = "token"        # token: one dynamic range per row (batch-independent) | tensor
    #                                       | block: MatMulNBits' own int8 input quantizer (per row and block of K)
    act_block_size: int | None = None     # block only: None = the weight group size, else 32
    # The activations of the Linears that run over all source tokens (encoder, cross-attention
    # keys/values): None = act_granularity, or token / tensor. With act_granularity block this
    # puts them on ONNX Runtime's integer path (MatMulInteger, several times faster than
    # MatMulNBits over many rows) while the per-generated-token Linears keep MatMulNBits' own
    # input quantizer: each part trained as its kernel computes.
    encoder_act_granularity: str | None = None
    quantize_attention: bool = True       # also the inputs of the attention matmuls (q.k, probs.v)
    # Learned absolute positions (BART, mBART: one table per stack), per row like the token
    # embedding; None keeps them in float (folders written before this field existed).
    # Architectures with fixed or relative positions (Marian, Pegasus, T5) have none to quantize.
    pos_bits: int | None = None

    def __post_init__(self):
        if self.act_clip not in ACT_CLIPS:
            raise DQToolError(f"act_clip '{self.act_clip}' is not supported: choose {' or '.join(ACT_CLIPS)}")
        if self.act_clip == "pact" and not self.act_symmetric:
            raise DQToolError("act_clip 'pact' needs act_symmetric true: asymmetric activations are dynamic")
        if self.act_granularity != "block" and self.act_block_size is not None:
            raise DQToolError(f"act_block_size {self.act_block_size} is only used with act_granularity 'block'")
        if self.act_granularity == "block":
            if self.act_clip != "dynamic":
                raise DQToolError("act_granularity 'block' is dynamic (MatMulNBits quantizes its input itself): "
                                  "choose act_clip dynamic")
            b = self.resolved_act_block
            if isinstance(b, bool) or b not in ACT_BLOCK_SIZES:
                raise DQToolError(f"act_block_size {b} is not a MatMulNBits block size: choose "
                                  f"{', '.join(map(str, ACT_BLOCK_SIZES))}")
            if self.weight_granularity == "group" and b != self.weight_group_size:
                raise DQToolError(f"act_block_size {b} differs from weight_group_size {self.weight_group_size}: "
                                  f"MatMulNBits quantizes its input per weight block, so they must be equal")
        if self.encoder_act_granularity not in ENCODER_ACT_GRANULARITIES:
            raise DQToolError(f"encoder_act_granularity '{self.encoder_act_granularity}' is not supported: choose "
                              f"{' or '.join(g for g in ENCODER_ACT_GRANULARITIES if g)} (or leave it unset: as "
                              f"act_granularity)")
        # Building the specs validates bits, granularity, group size and method.
        self.weight_spec()
        self.embedding_spec()
        self.activation_spec()
        self.activation_spec(per_token=False)
        self.position_spec()

    @classmethod
    def from_wea(cls, wea: str, **overrides) -> "QuantScheme":
        """Scheme from a ``W-E-A`` string plus any other field."""
        w, e, a = parse_wea(wea)
        return cls(w_bits=w, e_bits=e, a_bits=a, **overrides)

    @classmethod
    def from_wea_pos(cls, wea: str, pos: str | int | None, **overrides) -> "QuantScheme":
        """:meth:`from_wea` with position bits given as ``"e"`` (the E bits), ``"none"`` or a number.

        Example:
            >>> QuantScheme.from_wea_pos("4-2-8", "e").pos_bits, QuantScheme.from_wea_pos("4-2-8", "none").pos_bits
            (2, None)
        """
        w, e, a = parse_wea(wea)
        return cls(w_bits=w, e_bits=e, a_bits=a, pos_bits=parse_pos_bits(pos, e), **overrides)

    @property
    def wea(self) -> str:
        return "-".join("none" if b is None else str(b) for b in (self.w_bits, self.e_bits, self.a_bits))

    def weight_spec(self) -> QuantSpec | None:
        if self.w_bits is None:
            return None
        return QuantSpec.weight(self.w_bits, self.weight_granularity, self.weight_group_size, self.weight_method)

    def embedding_spec(self) -> QuantSpec | None:
        # Per vocabulary row: one scale per token, which is also one scale per output
        # row of the tied lm_head, so the same codes serve both uses.
        return None if self.e_bits is None else QuantSpec.weight(self.e_bits, "row", role="embedding")

    @property
    def resolved_act_block(self) -> int | None:
        """The activation block of granularity ``block``: ``act_block_size``, else the weight
        group size, else 32 (None for other granularities)."""
        if self.act_granularity != "block":
            return None
        if self.act_block_size is not None:
            return self.act_block_size
        return self.weight_group_size if self.weight_granularity == "group" else DEFAULT_ACT_BLOCK
    def position_spec(self) -> QuantSpec | None:
        """Spec of the learned position tables: per row (one scale per position), ternary at 2 bits.

        Example:
            >>> QuantScheme.from_wea("2-2-8", pos_bits=2).position_spec().method
            'ternary'
        """
        return None if self.pos_bits is None else QuantSpec.weight(self.pos_bits, "row", role="embedding")

    def activation_spec(self, per_token: bool = True) -> QuantSpec | None:
        """The input quantizer of a Linear; ``per_token=False``: of one that runs over all source
        tokens (:func:`dqtool.model.registry.runs_per_token`), which ``encoder_act_granularity`` may set.

        Example:
            >>> s = QuantScheme.from_wea("2-2-8", act_granularity="block", encoder_act_granularity="token")
            >>> s.activation_spec().granularity, s.activation_spec(per_token=False).granularity
            ('block', 'token')
        """
        if self.a_bits is None:
            return None
        if not per_token and self.encoder_act_granularity not in (None, self.act_granularity):
            return QuantSpec.activation(self.a_bits, symmetric=self.act_symmetric,
                                        granularity=self.encoder_act_granularity)
        return QuantSpec.activation(self.a_bits, symmetric=self.act_symmetric, granularity=self.act_granularity,
                                    block_size=self.resolved_act_block)

    def attention_activation_spec(self) -> QuantSpec | None:
        """The inputs of the attention matmuls (q.k, probs.v): the activation spec, per token
        when the Linears' is per block (their last dim, a head or a key length, is no K block)."""
        if self.a_bits is None or self.act_granularity != "block":
            return self.activation_spec()
        return QuantSpec.activation(self.a_bits, symmetric=self.act_symmetric, granularity="token")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantScheme":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DQToolError(f"unknown quantization scheme keys {unknown}: allowed keys are {sorted(known)}")
        return cls(**{"act_granularity": LEGACY_ACT_GRANULARITY, **d})

    def with_(self, **kw) -> "QuantScheme":
        return replace(self, **kw)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
