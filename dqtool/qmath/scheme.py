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
    weight_method: str | None = None      # None: ternary for 2 bits, min-max otherwise
    act_symmetric: bool = True
    act_clip: str = "dynamic"             # dynamic max|x| (per token/tensor), or a learned PACT clip
    act_granularity: str = "token"        # token: one dynamic range per row (batch-independent) | tensor
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
        # Building the specs validates bits, granularity, group size and method.
        self.weight_spec()
        self.embedding_spec()
        self.activation_spec()
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

    def position_spec(self) -> QuantSpec | None:
        """Spec of the learned position tables: per row (one scale per position), ternary at 2 bits.

        Example:
            >>> QuantScheme.from_wea("2-2-8", pos_bits=2).position_spec().method
            'ternary'
        """
        return None if self.pos_bits is None else QuantSpec.weight(self.pos_bits, "row", role="embedding")

    def activation_spec(self) -> QuantSpec | None:
        return None if self.a_bits is None else QuantSpec.activation(
            self.a_bits, symmetric=self.act_symmetric, granularity=self.act_granularity)

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
