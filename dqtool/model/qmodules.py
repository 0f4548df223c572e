"""Fake-quant modules for QAT, and ``prepare`` that swaps them into a HF model.

``prepare(model, scheme)`` replaces, per the architecture registry:

* every encoder/decoder Linear by :class:`QuantLinear` (W bits on the weight, A bits
  on its input);
* the token embedding and its tied aliases by :class:`QuantEmbedding` (E bits, per
  vocabulary row);
* each learned position table (BART, mBART) by :class:`QuantPositionEmbedding` when the
  scheme sets ``pos_bits`` (per row, like the token embedding);
* ``lm_head`` by a :class:`QuantLinear` with the *embedding* spec when it is tied to
  the embedding (the one stored matrix is trained at the precision export will use),
  and the weight spec when it is not (T5 v1.1);
* the attention function (BART family) by one that fake-quantizes the inputs of both
  attention matmuls (``q @ k^T`` and ``probs @ v``).

The modules hold the *same* ``nn.Parameter`` objects as the modules they replace and
keep their names (``weight``, ``bias``), so the state dict is the HF one plus the
learned quantizer ranges (activation clips, and ``weight_clip`` of a Linear whose weight
method learns its range: ``lsq``, ``seq``), and ``save_pretrained`` still writes a plain HF
checkpoint.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from dqtool.qmath.quant import QuantSpec, fake_quant, init_weight_clip
from dqtool.model.registry import ArchSpec, get_module, linears, runs_per_token, spec_for
from dqtool.qmath.scheme import QuantScheme
from dqtool.model.weight_cache import cached

ATTN_IMPL = "dqtool_qat"


class LastInput:
    """The last dynamic activation quantization of one model, for inference.

    Several Linears read the very same input tensor one after the other (an attention's
    q/k/v projections, T5 v1.1's two gated FFN inputs); with a dynamic range (no learned
    clip) their quantized inputs are equal, so the first computes it and the others reuse
    it. One entry per model: the input (weakly referenced, with its in-place version
    counter and data pointer), its spec and the result. The entry is replaced by the next different input
    and dropped as soon as its input is freed, so at most one extra activation is kept,
    and never beyond its input's lifetime. Training (an input that needs a gradient) and
    inference-mode tensors (no version counter) never use it.
    """

    __slots__ = ("ref", "version", "spec", "out", "__weakref__")

    def __init__(self):
        self.ref = self.version = self.spec = self.out = None

    def _drop(self, ref) -> None:
        if self.ref is ref:
            self.ref = self.version = self.spec = self.out = None

    def __reduce__(self):
        # A copied or pickled model starts empty (sharing between its modules is kept).
        return LastInput, ()

    def quantize(self, x: torch.Tensor, spec: QuantSpec, fn=fake_quant):
        """``fn(x, spec)`` (the fake-quant value, or e.g. the integer codes of
        :func:`~dqtool.qmath.quant.activation_codes`), reused while ``x`` is the last input."""
        if x.is_inference() or (x.requires_grad and torch.is_grad_enabled()):
            return fn(x, spec)
        ref = self.ref
        version = (x._version, x.data_ptr())   # in-place edits, and a reassigned .data
        key = spec if fn is fake_quant else (fn, spec)
        if ref is not None and ref() is x and self.version == version and (self.spec is key or self.spec == key):
            return self.out
        out = fn(x, spec)
        self.ref, self.version, self.spec, self.out = weakref.ref(x, self._drop), version, key, out
        return out


class _ActQuant(nn.Module):
    """Fake-quantizes a module input: dynamic per-tensor, or with a learned PACT clip.

    A learned clip is calibrated on the first batch it sees in training: it starts at
    the 99.9th percentile of |x|, so a few outliers are clipped from step 0 and PACT's
    gradient (which flows only through clipped values) can move it. ``calibrated`` is a
    buffer, so a resumed or reloaded model never re-calibrates. A dynamic quantizer given
    a :class:`LastInput` (``last``, shared by the Linears of one model) reuses the result
    of the same input in inference.
    """

    CALIBRATION_QUANTILE = 0.999

    def __init__(self, spec: QuantSpec | None, learned_clip: bool):
        super().__init__()
        self.spec = spec
        if spec is not None and learned_clip:
            self.clip = nn.Parameter(torch.tensor(1.0))
            self.register_buffer("calibrated", torch.tensor(False))
        else:
            self.clip = None

    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor) -> None:
        a = x.detach().abs().flatten().float()
        if a.numel() > 1_000_000:  # torch.quantile's input limit; a strided sample is plenty
            a = a[:: a.numel() // 1_000_000 + 1]
        self.clip.copy_(torch.quantile(a, self.CALIBRATION_QUANTILE).clamp_min(1e-4))
        self.calibrated.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is None:
            return x
        if self.clip is None:
            last = self.__dict__.get("last")   # a plain attribute, not a submodule
            return fake_quant(x, self.spec) if last is None else last.quantize(x, self.spec)
        if self.training and not bool(self.calibrated):
            self._calibrate(x)
        return fake_quant(x, self.spec, self.clip)


WEIGHT_CLIP = "weight_clip"


class QuantLinear(nn.Module):
    """``nn.Linear`` whose weight and input are fake-quantized.

    A weight method that learns its range (``lsq``, ``seq``) gets a ``weight_clip``
    parameter shaped like the scale (``[out, 1]`` per row), started from the weight's
    statistics by :func:`~dqtool.qmath.quant.init_weight_clip` when the module is built.

    Example:
        >>> lin = nn.Linear(8, 4)
        >>> q = QuantLinear(lin, QuantSpec.weight(4), QuantSpec.activation(8))
        >>> q.weight is lin.weight, q(torch.randn(2, 8)).shape
        (True, torch.Size([2, 4]))
    """

    def __init__(self, linear: nn.Linear, wspec: QuantSpec | None, aspec: QuantSpec | None,
                 learned_clip: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.wspec = wspec
        if wspec is not None and wspec.learned:
            self.weight_clip = nn.Parameter(init_weight_clip(linear.weight, wspec))
        else:
            self.weight_clip = None
        self.act = _ActQuant(aspec, learned_clip)

    weight_cacheable = True  # inference only: see dqtool.model.weight_cache (never while the weight needs a gradient)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward pass uses it (fake-quantized): [out, in]."""
        if self.wspec is None:
            return self.weight
        if self.weight_clip is None:  # the slot a tied embedding (same weight, same spec) shares
            return cached(self, (self.weight,), lambda: fake_quant(self.weight, self.wspec),
                          slot=("fake_quant", id(self.weight), self.wspec))
        # A learned range (lsq / seq) is a source too: its own slot, stale when the range changes.
        return cached(self, (self.weight, self.weight_clip),
                      lambda: fake_quant(self.weight, self.wspec, self.weight_clip),
                      slot=("fake_quant", id(self.weight), self.wspec, id(self.weight_clip)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in]
        return F.linear(self.act(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        w = "float" if self.wspec is None else f"{self.wspec.bits}b-{self.wspec.method}-{self.wspec.granularity}"
        w += ", learned range" if self.weight_clip is not None else ""
        a = "float" if self.act.spec is None else f"{self.act.spec.bits}b"
        return f"in={self.in_features}, out={self.out_features}, w={w}, a={a}"


class QuantEmbedding(nn.Module):
    """Token embedding whose table is fake-quantized per row (keeps BART's embed_scale)."""

    def __init__(self, emb: nn.Embedding, espec: QuantSpec | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx
        self.weight = emb.weight
        self.espec = espec
        # BartScaledWordEmbedding multiplies by sqrt(d_model) when config.scale_embedding.
        self.embed_scale = getattr(emb, "embed_scale", 1.0)

    weight_cacheable = True  # as QuantLinear; a tied lm_head and the aliases share one entry

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [B, T] -> [B, T, d]
        table = self.weight if self.espec is None else cached(
            self, (self.weight,), lambda: fake_quant(self.weight, self.espec),
            slot=("fake_quant", id(self.weight), self.espec))
        return F.embedding(ids, table, self.padding_idx) * self.embed_scale


def learned_position_ids(input_ids: torch.Tensor, past_key_values_length: int = 0,
                         position_ids: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """The positions BART's learned position table looks up (before its offset of 2), as
    ``BartLearnedPositionalEmbedding.forward`` computes them: ``[B, T]`` from
    ``past_key_values_length``, or ``[1, T]`` from the given ``position_ids``."""
    if position_ids is None:
        bsz, seq_len = input_ids.shape[:2]
        return torch.arange(past_key_values_length, past_key_values_length + seq_len, dtype=torch.long,
                            device=device).expand(bsz, -1)
    return position_ids.unsqueeze(0)


class QuantPositionEmbedding(nn.Module):
    """BART/mBART learned position table, fake-quantized per row (one scale per position).

    Same call signature and output as ``BartLearnedPositionalEmbedding`` (ids of the input
    only give its shape; rows ``position + offset`` are looked up), holding the same
    ``weight`` Parameter, so the state dict and ``save_pretrained`` are unchanged.

    Example:
        >>> from transformers.models.bart.modeling_bart import BartLearnedPositionalEmbedding
        >>> hf = BartLearnedPositionalEmbedding(10, 4)
        >>> q = QuantPositionEmbedding(hf, QuantSpec.weight(8, role="embedding"))
        >>> ids = torch.zeros(2, 3, dtype=torch.long)
        >>> q(ids).shape, torch.allclose(q(ids, 1), hf(ids, 1), atol=0.02)
        (torch.Size([2, 3, 4]), True)
    """

    def __init__(self, emb: nn.Embedding, pspec: QuantSpec):
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.offset = int(getattr(emb, "offset", 0))
        self.weight = emb.weight
        self.pspec = pspec

    def forward(self, input_ids: torch.Tensor, past_key_values_length: int = 0,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        pos = learned_position_ids(input_ids, past_key_values_length, position_ids, self.weight.device)
        return F.embedding(pos + self.offset, fake_quant(self.weight, self.pspec))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, offset={self.offset}, " \
               f"p={self.pspec.bits}b-{self.pspec.method}-row"
def _act_kept(module, act: nn.Module, t: torch.Tensor, role: str) -> torch.Tensor:
    """``act(t)``, reused while ``t`` is the same tensor at the same version (inference only).

    Generation hands cross-attention the same cached key/value tensors at every step;
    their quantized values are then computed once per ``generate`` call instead of once
    per token (self-attention's cache grows, so it is a new tensor each step and simply
    recomputed). Holds the last key/value of each attention module and their results.
    """
    clip = getattr(act, "clip", None)
    if t.is_inference() or (torch.is_grad_enabled() and (t.requires_grad or (clip is not None and clip.requires_grad))):
        return act(t)  # training, or a tensor without a version counter (inference mode: in place edits unseen)
    key = (t._version, None if clip is None else (id(clip), clip._version))
    kept = module.__dict__.setdefault("_dqtool_act_kept", {})
    hit = kept.get(role)
    if hit is not None and hit[0] is t and hit[1] == key:
        return hit[2]
    out = act(t)
    kept[role] = (t, key, out)
    return out


def qat_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, head_mask=None, **kwargs):
    """BART-family eager attention with the matmul inputs fake-quantized.

    query/key/value: [B, H, T, Dh]. Returns ([B, T, H, Dh], probs [B, H, Tq, Tk]); the
    returned probs are the float ones (the attention-distillation target), while the
    product with ``value`` uses their quantized values, as an integer kernel would.
    """
    act = getattr(module, "dqtool_act", None)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if act is not None:
        query, key = act(query), _act_kept(module, act, key, "key")
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1)
    if head_mask is not None:
        probs = probs * head_mask.view(1, -1, 1, 1)
    if module.training and dropout > 0:   # (a no-op otherwise: skipped, one op less per generated token)
        probs = F.dropout(probs, p=dropout, training=True)
    probs_q, value = (act(probs), _act_kept(module, act, value, "value")) if act is not None else (probs, value)
    out = torch.matmul(probs_q, value).transpose(1, 2).contiguous()
    return out, probs


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, qat_attention)


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(model, parent_path) if parent_path else model, name, new)


def prepare(model: nn.Module, scheme: QuantScheme, spec: ArchSpec | None = None) -> nn.Module:
    """Swap fake-quant modules into ``model`` in place (idempotent guard) and return it.

    Example:
        >>> from transformers import BartConfig, BartForConditionalGeneration
        >>> cfg = BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        ...                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50)
        >>> m = prepare(BartForConditionalGeneration(cfg), QuantScheme.from_wea("4-8-8"))
        >>> type(m.model.encoder.layers[0].fc1).__name__, type(m.lm_head).__name__
        ('QuantLinear', 'QuantLinear')
    """
    if getattr(model, "dqtool_scheme", None) is not None:
        raise ValueError("model is already prepared for QAT")
    spec = spec or spec_for(model.config)
    wspec, espec, aspec = scheme.weight_spec(), scheme.embedding_spec(), scheme.activation_spec()
    learned = scheme.act_clip == "pact"
    for name, lin in linears(model, spec).items():
        if wspec is not None and wspec.granularity == "group":
            from dqtool.qmath.quant import validate_width

            validate_width(wspec, lin.in_features, name)
        aspec = scheme.activation_spec(runs_per_token(name, spec))  # the encoder's may differ (encoder_act_granularity)
        if aspec is not None and aspec.granularity == "block":
            from dqtool.qmath.quant import validate_width

            validate_width(aspec, lin.in_features, name)
        _set_module(model, name, QuantLinear(lin, wspec, aspec, learned))
    emb = get_module(model, spec.token_embedding)
    tied = spec.lm_head_tied(model.config)
    for path in (spec.token_embedding, *spec.embedding_aliases):
        _set_module(model, path, QuantEmbedding(get_module(model, path), espec))
    pspec = scheme.position_spec()
    if pspec is not None and spec.positions_learned:
        for path in spec.position_embeddings:
            _set_module(model, path, QuantPositionEmbedding(get_module(model, path), pspec))
    head = get_module(model, spec.lm_head)
    assert (head.weight is emb.weight) == tied, "registry tie flag disagrees with the model"
    aspec = scheme.activation_spec()  # the lm_head runs once per generated token
    if aspec is not None and aspec.granularity == "block":
        from dqtool.qmath.quant import validate_width

        validate_width(aspec, head.in_features, spec.lm_head)
    _set_module(model, spec.lm_head, QuantLinear(head, espec if tied else wspec, aspec, learned))
    if aspec is not None and not learned:
        last = LastInput()   # one per model: Linears reading the same input quantize it once
        for mod in model.modules():
            if isinstance(mod, QuantLinear):
                mod.act.last = last
    if scheme.quantize_attention and aspec is not None and spec.attention_interface:
        _register_attention()
        for mod in model.modules():
            if hasattr(mod, "q_proj") and hasattr(mod, "out_proj"):
                mod.dqtool_act = _ActQuant(scheme.attention_activation_spec(), learned)
        model.config._attn_implementation = ATTN_IMPL
    model.dqtool_scheme = scheme
    return model


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Quantizer tensors (PACT clips and their calibration flags, learned weight ranges) by
    state-dict name.

    Empty for dynamic schemes, whose quantizers hold no state.
    """
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, _ActQuant):
            for k, v in mod.state_dict().items():
                out[f"{name}.{k}"] = v.detach().clone()
        elif isinstance(mod, QuantLinear) and mod.weight_clip is not None:
            out[f"{name}.{WEIGHT_CLIP}"] = mod.weight_clip.detach().clone()
    return out


def activation_quantizer_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the learned weight ranges: what a packed model still needs (its
    scales already hold the weight ranges)."""
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] != WEIGHT_CLIP}


def strip_quantizer_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain HF part of a prepared model's ``state`` dict (no quantizer tensors)."""
    q = quantizer_state(model)
    return {k: v for k, v in state.items() if k not in q}
