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
ACT_BLOCK_SIZES = (16, 32, 64, 128, 256)   # MatMulNBits block sizes
DEFAULT_ACT_BLOCK = 32


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
    quantize_attention: bool = True       # also the inputs of the attention matmuls (q.k, probs.v)

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
        # Building the specs validates bits, granularity, group size and method.
        self.weight_spec()
        self.embedding_spec()
        self.activation_spec()

    @classmethod
    def from_wea(cls, wea: str, **overrides) -> "QuantScheme":
        """Scheme from a ``W-E-A`` string plus any other field."""
        w, e, a = parse_wea(wea)
        return cls(w_bits=w, e_bits=e, a_bits=a, **overrides)

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

    def activation_spec(self) -> QuantSpec | None:
        return None if self.a_bits is None else QuantSpec.activation(
            self.a_bits, symmetric=self.act_symmetric, granularity=self.act_granularity,
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
