"""Packed-integer models: turn a fake-quant (QAT) model into packed tensors, and back
into a runnable PyTorch model that computes from them.

Tensor names are the module's name plus ``qweight`` / ``scale`` (and the module's own
``bias``), the same in code (module buffers), in ``packed.safetensors`` and in the ONNX
initializers the exporter writes:

    model.encoder.layers.0.fc1.qweight   uint8 [out, ceil(in*bits/8)]  (dqtool.qmath.pack layout)
    model.encoder.layers.0.fc1.scale     float [] | [out] | [out, in/G] (per tensor/row/group)
    model.encoder.layers.0.fc1.bias      float [out]
    model.shared.qweight / .scale        the token embedding, per vocabulary row; a tied
                                         lm_head reads these (stored once)
    model.encoder.embed_positions.qweight / .scale
                                         learned positions when the scheme quantizes them
                                         (``pos_bits``), per position row

On disk 2-bit codes may be stored in base 3 (five per byte, ``"storage": "base3"`` in the
layout entry, :func:`encode_storage`); :func:`decode_storage` restores the 2-bit layout
above exactly when a folder is loaded, so the modules always hold 2-bit rows.

Everything else (layer norms, float learned positions, BART's final_logits_bias, an untied
float lm_head) is stored as a float under its Hugging Face name. Fixed sinusoidal
positions (Marian, Pegasus) are not stored: the model rebuilds them from its config.

Numerics: :class:`PackedLinear` unpacks its codes and calls the very
:func:`dqtool.qmath.quant.dequantize` that fake quantization uses, with the stored scale, and
keeps the QAT activation quantizers; the packed model therefore reproduces the QAT
model's logits bit for bit when floats are kept in float32.

Speed: the dequantized weight can be kept between forwards (once per model, per
``generate`` call, or never) by :func:`dqtool.model.weight_cache.set_weight_cache`; a kept
weight is the very tensor the forward would compute, so the logits do not change.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dqtool.base.errors import DQToolError

from dqtool.qmath.pack import ODD_CODE_METHODS, base3_row_bytes, base3_to_2bit, pack_base3, pack_codes, \
    pack_method_codes, row_bytes, unpack_codes, unpack_method_codes, zero_point
from dqtool.model.qmodules import (QuantEmbedding, QuantLinear, QuantPositionEmbedding, learned_position_ids, prepare,
                                   quantizer_state)
from dqtool.qmath.quant import QuantSpec, activation_codes, dequantize, quantize_weight
from dqtool.model.registry import ArchSpec, get_module, spec_for
from dqtool.qmath.scheme import QuantScheme
from dqtool.model.weight_cache import cached, drop_entry, exporting, keeps


def _scale_view(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    # Stored scale ([] | [out] | [out, groups]) -> the shape dequantize() expects.
    return scale if spec.granularity == "tensor" else scale.unsqueeze(-1)


def spec_from_layout(entry: dict) -> QuantSpec:
    """The :class:`QuantSpec` a packed tensor's layout entry records."""
    return QuantSpec(bits=entry["bits"], granularity=entry["granularity"], group_size=entry.get("group_size"),
                     method=entry["method"], role=entry.get("role", "weight"))


def _rows_codes(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    # activation_codes of x [..., in] as rows [M, in] (an integer matmul's 2-D input).
    return activation_codes(x.reshape(-1, x.shape[-1]), spec)


class PackedLinear(nn.Module):
    """A Linear that computes from packed integer weights.

    ``weight()`` unpacks ``qweight`` and dequantizes with ``scale`` (exactly the values
    fake quantization trained with); the input goes through the QAT activation
    quantizer ``act``. A tied lm_head passes ``tied_to`` (the packed embedding) and
    holds no tensors of its own.

    Example:
        >>> spec = QuantSpec.weight(4, "row")
        >>> lin = nn.Linear(6, 3)
        >>> codes, scale = quantize_weight(lin.weight, spec)
        >>> p = PackedLinear(6, 3, spec, pack_codes(codes, 4), scale.squeeze(-1), lin.bias.detach())
        >>> x = torch.randn(2, 6)
        >>> from dqtool.qmath.quant import fake_quant
        >>> torch.equal(p(x), F.linear(x, fake_quant(lin.weight, spec), lin.bias))
        True
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, qweight: torch.Tensor | None,
                 scale: torch.Tensor | None, bias: torch.Tensor | None, act: nn.Module | None = None,
                 tied_to: "PackedEmbedding | None" = None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        if tied_to is None:
            if qweight.shape != (out_features, row_bytes(in_features, spec.bits)):
                raise ValueError(f"qweight shape {tuple(qweight.shape)} does not fit [{out_features}, "
                                 f"{row_bytes(in_features, spec.bits)}] for {spec.bits}-bit rows of {in_features}")
            self.register_buffer("qweight", qweight)
            self.register_buffer("scale", scale)
        # Not a registered submodule: the embedding is registered at its own path, and a
        # second registration would move/cast its buffers into separate copies.
        object.__setattr__(self, "tied_to", tied_to)
        if bias is not None:
            self.register_buffer("bias", bias)
        else:
            self.bias = None
        self.act = act if act is not None else nn.Identity()

    @property
    def act_spec(self) -> QuantSpec | None:
        """The input's activation quantization spec (None: the input stays float)."""
        return getattr(self.act, "spec", None)

    weight_cacheable = True  # see dqtool.model.weight_cache

    def weight(self) -> torch.Tensor:
        """The dequantized weight ``[out, in]`` (fake-quant values, bit for bit).

        Kept between calls when the model's weight cache allows (a tied lm_head shares
        the embedding's kept table).
        """
        if self.tied_to is not None:
            return self.tied_to.table()
        return cached(self, (self.qweight, self.scale), self._dequantize)

    def _dequantize(self) -> torch.Tensor:
        codes = unpack_method_codes(self.qweight, self.spec.bits, self.in_features, self.spec.method)  # [out, in]
        return dequantize(codes, _scale_view(self.scale, self.spec), self.spec)

    def _apply(self, fn, recurse=True):
        drop_entry(self)  # moved or cast buffers: the kept weight is recomputed from them
        drop_entry(self, ("codes", id(self)))
        return super()._apply(fn, recurse)

    matmul = "float"   # or "integer" (set_matmul): the arithmetic of forward()

    def integer_capable(self) -> bool:
        """Whether the integer matmul applies: weights per row or tensor (one scale per
        output) and a symmetric min-max activation of at most 8 bits per token or tensor."""
        w = self.tied_to.spec if self.tied_to is not None else self.spec
        a = self.act_spec
        return w.granularity in ("row", "tensor") and w.symmetric and a is not None and a.role == "activation" \
            and a.symmetric and a.method == "minmax" and a.granularity in ("token", "tensor") and a.bits <= 8

    def codes(self) -> torch.Tensor:
        """The unpacked weight codes ``[out, in]`` int8 (value = code x scale), kept between
        calls when the weight cache allows (1 byte per weight; a tied lm_head shares the
        embedding's)."""
        owner = self.tied_to if self.tied_to is not None else self
        return cached(owner, (owner.qweight, owner.scale), lambda: unpack_method_codes(
            owner.qweight, owner.spec.bits, self.in_features, owner.spec.method), slot=("codes", id(owner)))

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = (sum_k xq[m,k] wq[n,k]) * sx[m] * sw[n] + b: the int32 sum is exact (what ONNX
        # MatMulInteger computes), the scales are applied once to it.
        act = self.act
        last = act.__dict__.get("last")   # q/k/v projections read one input: its codes once
        clip = getattr(act, "clip", None)
        if clip is not None:
            xq, sx = activation_codes(x.reshape(-1, self.in_features), act.spec, clip)
        elif last is not None:
            xq, sx = last.quantize(x, act.spec, _rows_codes)              # [M, in] int8, [M, 1]
        else:
            xq, sx = _rows_codes(x, act.spec)
        owner = self.tied_to if self.tied_to is not None else self
        acc = torch._int_mm(xq, self.codes().t())                         # [M, out] int32
        y = acc.to(torch.float32).mul_(sx.to(torch.float32)).mul_(owner.scale.to(torch.float32))
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if self.matmul == "integer" and not exporting() and not (torch.is_grad_enabled() and x.requires_grad):
            return self._integer_forward(x)
        return F.linear(self.act(x), self.weight(), self.bias)

    def extra_repr(self) -> str:
        tied = ", tied to the embedding" if self.tied_to is not None else ""
        return f"in={self.in_features}, out={self.out_features}, w={self.spec.bits}b-{self.spec.method}-" \
               f"{self.spec.granularity}{tied}"


class PackedEmbedding(nn.Module):
    """Token embedding stored as packed per-row codes; only the looked-up rows are unpacked
    (or, while the weight cache keeps the dequantized table, its rows are read).

    Gathering codes and scales and then multiplying gives the same floats as gathering
    rows of the dequantized table (the same elementwise product), so it matches
    :class:`~dqtool.model.qmodules.QuantEmbedding` bit for bit either way.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, qweight: torch.Tensor,
                 scale: torch.Tensor, embed_scale=1.0, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.spec = num_embeddings, embedding_dim, spec
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight)   # [V, ceil(d*bits/8)]
        self.register_buffer("scale", scale)       # [V]
        self.embed_scale = embed_scale

    weight_cacheable = True  # see dqtool.model.weight_cache

    keep_table = True   # False under the integer matmul (set_matmul): a tied lm_head keeps int8 codes instead

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [B, T] -> [B, T, d]
        if self.keep_table and keeps(self, (self.qweight, self.scale)):
            # The kept table (a tied lm_head keeps it anyway): rows of the same products.
            return F.embedding(ids, self.table()) * self.embed_scale
        codes = unpack_method_codes(self.qweight[ids], self.spec.bits, self.embedding_dim, self.spec.method)
        return (codes.to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)) * self.embed_scale

    def table(self) -> torch.Tensor:
        """The whole dequantized table ``[V, d]`` (without ``embed_scale``): what a tied
        lm_head multiplies by; kept between calls when the weight cache allows."""
        return cached(self, (self.qweight, self.scale), self._dequantize)

    def _dequantize(self) -> torch.Tensor:
        codes = unpack_method_codes(self.qweight, self.spec.bits, self.embedding_dim, self.spec.method)  # [V, d]
        return dequantize(codes, _scale_view(self.scale, self.spec), self.spec)

    def _apply(self, fn, recurse=True):
        drop_entry(self)
        drop_entry(self, ("codes", id(self)))   # a tied integer lm_head's codes
        return super()._apply(fn, recurse)


class PackedPositionEmbedding(nn.Module):
    """Learned position table stored as packed per-row codes (BART, mBART with ``pos_bits``).

    Call signature of ``BartLearnedPositionalEmbedding``; gathers the rows' codes and
    scales and multiplies, the same elementwise product as gathering rows of the
    fake-quantized table, so it matches :class:`~dqtool.qmodules.QuantPositionEmbedding`
    bit for bit.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, qweight: torch.Tensor,
                 scale: torch.Tensor, offset: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.spec, self.offset = num_embeddings, embedding_dim, spec, offset
        self.register_buffer("qweight", qweight)   # [P, ceil(d*bits/8)]
        self.register_buffer("scale", scale)       # [P]

    def forward(self, input_ids: torch.Tensor, past_key_values_length: int = 0,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        rows = learned_position_ids(input_ids, past_key_values_length, position_ids, self.qweight.device) + self.offset
        codes = unpack_codes(self.qweight[rows], self.spec.bits, self.embedding_dim)      # [B, T, d]
        return codes.to(self.scale.dtype) * self.scale[rows].unsqueeze(-1)


MATMULS = ("float", "integer")


def set_matmul(model: nn.Module, mode: str) -> int:
    """Choose the arithmetic of ``model``'s packed Linears; returns how many compute in integers.

    ``"float"`` (default): the dequantized weight times the fake-quantized input, the QAT
    model's logits bit for bit. ``"integer"``: the input's int8 codes times the weight's
    codes in an exact int32 sum (``torch._int_mm``), then the two scales: the arithmetic of
    ONNX ``MatMulInteger``; it equals the float result up to float32 rounding (the float
    path rounds every partial sum, this one only the two scale products), keeps 1 byte
    per weight instead of 4 when weights are kept (:mod:`dqtool.model.weight_cache`) and
    reads a quarter of the bytes per generated token. Linears it cannot run (weights per
    group, block or asymmetric activations, float inputs) keep the float arithmetic.
    """
    if mode not in MATMULS:
        raise DQToolError(f"matmul '{mode}' is not supported: choose {' or '.join(MATMULS)}")
    n, read_as_codes = 0, set()
    for m in model.modules():
        if isinstance(m, PackedLinear):
            use = mode == "integer" and m.integer_capable()
            m.matmul = "integer" if use else "float"
            n += use
            if use and m.tied_to is not None:
                read_as_codes.add(id(m.tied_to))
    for m in model.modules():   # a tied integer lm_head reads codes: do not keep the float table for lookups
        if isinstance(m, PackedEmbedding):
            m.keep_table = id(m) not in read_as_codes
    model.__dict__["dqtool_matmul"] = mode
    return n


# --------------------------------------------------------------------------- QAT -> packed

def _entry(kind: str, spec: QuantSpec, out: int, inp: int) -> dict:
    e = {"kind": kind, "bits": spec.bits, "method": spec.method, "granularity": spec.granularity,
         "group_size": spec.group_size, "role": spec.role, "shape": [out, inp],
         "row_bytes": row_bytes(inp, spec.bits), "zero_point": zero_point(spec.bits),
         "padding_bits": row_bytes(inp, spec.bits) * 8 - inp * spec.bits}
    if spec.method in ODD_CODE_METHODS:
        # stored u = (code + 2^b - 1) / 2: value = (u - zero_point) * 2 * scale (a float zero point)
        e["zero_point"] = (2 ** spec.bits - 1) / 2
        e["codes"] = "odd"
    return e


def _pack_one(weight: torch.Tensor, spec: QuantSpec, clip=None) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scale = quantize_weight(weight, spec, clip)   # exactly what fake_quant used
    scale = scale if spec.granularity == "tensor" else scale.squeeze(-1)
    return pack_method_codes(codes, spec.bits, spec.method), scale.contiguous()


def skipped_float_keys(spec: ArchSpec) -> tuple[str, ...]:
    """State-dict keys never stored: fixed sinusoidal positions, rebuilt from the config."""
    if spec.positions_learned:
        return ()
    return tuple(f"{p}.weight" for p in spec.position_embeddings)


def float_state(model: nn.Module, exclude_ptrs: set[int], spec: ArchSpec) -> dict[str, torch.Tensor]:
    """The float tensors of ``model`` to store: each storage once, under its first name.

    Skips tensors whose storage is in ``exclude_ptrs`` (quantized weights), quantizer
    tensors, and :func:`skipped_float_keys`.
    """
    qkeys = set(quantizer_state(model))
    skip = set(skipped_float_keys(spec))
    seen = set(exclude_ptrs)
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if k in qkeys or k in skip or not torch.is_floating_point(v):
            continue
        ptr = v.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach()
    return out


def pack_model(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, torch.Tensor]]:
    """``(packed, layout, floats)`` of a QAT-prepared model.

    ``packed``: ``{name.qweight, name.scale}`` per quantized Linear and embedding;
    ``layout``: per module name, how it was packed (bits, method, granularity, group
    size, shape, row bytes, padding) or ``{"kind": "tied", "to": ...}`` for a tied
    lm_head; ``floats``: every other float tensor, by HF name (once per storage).

    Example:
        >>> from transformers import BartConfig, BartForConditionalGeneration
        >>> cfg = BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        ...                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50)
        >>> m = prepare(BartForConditionalGeneration(cfg), QuantScheme.from_wea("2-4-8"))
        >>> packed, layout, floats = pack_model(m)
        >>> packed["model.encoder.layers.0.fc1.qweight"].shape, layout["lm_head"]
        (torch.Size([32, 4]), {'kind': 'tied', 'to': 'model.shared'})
        >>> "model.encoder.layers.0.fc1.weight" in floats, "model.encoder.layers.0.fc1.bias" in floats
        (False, True)
    """
    spec = spec_for(model.config)
    packed: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    ptrs: set[int] = set()
    emb = get_module(model, spec.token_embedding)
    if isinstance(emb, QuantEmbedding) and emb.espec is not None:
        packed[f"{spec.token_embedding}.qweight"], packed[f"{spec.token_embedding}.scale"] = _pack_one(emb.weight,
                                                                                                      emb.espec)
        layout[spec.token_embedding] = _entry("embedding", emb.espec, emb.num_embeddings, emb.embedding_dim)
        ptrs.add(emb.weight.data_ptr())
    for name, mod in model.named_modules():
        if isinstance(mod, QuantPositionEmbedding):
            packed[f"{name}.qweight"], packed[f"{name}.scale"] = _pack_one(mod.weight, mod.pspec)
            layout[name] = {**_entry("position", mod.pspec, mod.num_embeddings, mod.embedding_dim),
                            "offset": mod.offset}
            ptrs.add(mod.weight.data_ptr())
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear) or mod.wspec is None:
            continue
        if mod.weight.data_ptr() == emb.weight.data_ptr():
            if spec.token_embedding in layout and mod.wspec == emb.espec:
                layout[name] = {"kind": "tied", "to": spec.token_embedding}
                continue
            raise ValueError(f"{name} shares the embedding's weight but not its quantization spec")
        packed[f"{name}.qweight"], packed[f"{name}.scale"] = _pack_one(mod.weight, mod.wspec, mod.weight_clip)
        layout[name] = _entry("linear", mod.wspec, mod.out_features, mod.in_features)
        ptrs.add(mod.weight.data_ptr())
    return packed, layout, float_state(model, ptrs, spec)


# --------------------------------------------------------------------------- packed -> model

def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(model, parent) if parent else model, name, new)


def build_packed_model(config, scheme: QuantScheme, packed: dict[str, torch.Tensor], layout: dict[str, dict],
                       floats: dict[str, torch.Tensor], qstate: dict[str, torch.Tensor] | None = None,
                       dtype: torch.dtype = torch.float32):
    """A runnable model from packed tensors (as :func:`pack_model` returns or a packed folder holds).

    Builds the architecture from ``config``, swaps in the QAT quantizers (activation
    semantics identical to training), replaces every packed module by a
    :class:`PackedLinear` / :class:`PackedEmbedding`, then loads the floats (cast to
    ``dtype``) and the quantizer state. Any stored tensor left unused, or model tensor
    left unloaded, is a ValueError.
    """
    from transformers import AutoModelForSeq2SeqLM

    spec = spec_for(config)
    model = AutoModelForSeq2SeqLM.from_config(config, dtype=dtype)
    prepare(model, scheme, spec)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in packed:
            raise ValueError(f"packed tensor {key} is missing")
        used.add(key)
        return packed[key]

    emb_path = spec.token_embedding
    packed_emb = None
    if emb_path in layout:
        e = layout[emb_path]
        espec = spec_from_layout(e)
        old = get_module(model, emb_path)
        scales = {float(getattr(get_module(model, p), "embed_scale", 1.0)) for p in (emb_path, *spec.embedding_aliases)}
        if len(scales) != 1:
            raise ValueError(f"embedding aliases of {emb_path} scale differently ({scales}); cannot share one table")
        packed_emb = PackedEmbedding(e["shape"][0], e["shape"][1], espec, take(f"{emb_path}.qweight"),
                                     take(f"{emb_path}.scale").to(dtype), old.embed_scale, old.padding_idx)
        for p in (emb_path, *spec.embedding_aliases):
            _set(model, p, packed_emb)
    for name, e in layout.items():
        if name == emb_path:
            continue
        old = get_module(model, name)
        if e["kind"] == "position":
            if not isinstance(old, QuantPositionEmbedding) or e["shape"] != [old.num_embeddings, old.embedding_dim]:
                raise ValueError(f"layout names {name} as a quantized position table, which this architecture and "
                                 f"scheme do not have")
            _set(model, name, PackedPositionEmbedding(old.num_embeddings, old.embedding_dim, spec_from_layout(e),
                                                      take(f"{name}.qweight"), take(f"{name}.scale").to(dtype),
                                                      old.offset))
            continue
        if not isinstance(old, QuantLinear):
            raise ValueError(f"layout names {name}, which is not a quantized Linear of this architecture")
        if e["kind"] == "tied":
            if packed_emb is None or e["to"] != emb_path:
                raise ValueError(f"{name} is tied to {e['to']}, which is not packed")
            new = PackedLinear(old.in_features, old.out_features, packed_emb.spec, None, None,
                               _bias(old, floats, name, used, dtype), old.act, tied_to=packed_emb)
        else:
            lspec = spec_from_layout(e)
            if e["shape"] != [old.out_features, old.in_features]:
                raise ValueError(f"{name}: packed shape {e['shape']} does not match the config's "
                                 f"[{old.out_features}, {old.in_features}]")
            new = PackedLinear(old.in_features, old.out_features, lspec, take(f"{name}.qweight"),
                               take(f"{name}.scale").to(dtype), _bias(old, floats, name, used, dtype), old.act)
        _set(model, name, new)
    unused = sorted(set(packed) - used)
    if unused:
        raise ValueError(f"packed tensors {unused[:3]} belong to no module of this architecture")
    # Floats the model still needs: its float tensors minus the packed buffers (scales)
    # and the biases already moved into packed modules.
    expected = {k for k in float_state(model, set(), spec) if k not in used and k not in packed}
    missing = sorted(expected - set(floats))
    extra = sorted(set(floats) - expected - used)
    if missing or extra:
        raise ValueError(f"float tensors do not match the architecture: missing {missing[:3]}, unknown {extra[:3]}")
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for k in expected:
            src = floats[k]
            if tuple(src.shape) != tuple(state[k].shape):
                raise ValueError(f"{k}: stored shape {tuple(src.shape)} != model shape {tuple(state[k].shape)}")
            state[k].copy_(src.to(state[k].dtype))
    if qstate:
        _, unexpected = model.load_state_dict(qstate, strict=False)
        if unexpected:
            raise ValueError(f"unknown quantizer tensors {unexpected[:3]}")
    return model.eval()


# --------------------------------------------------------------------------- storage on disk

STORAGES = ("base3", "2bit")


def encode_storage(packed: dict[str, torch.Tensor], layout: dict[str, dict],
                   ternary: str = "base3") -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``(tensors, layout)`` as written to disk: with ``ternary="base3"`` every 2-bit code
    table (3 levels: ternary or 2-bit min-max) is stored five codes per byte
    (:func:`dqtool.qmath.pack.pack_base3`) and its layout entry records ``storage``/``row_bytes``;
    ``"2bit"`` stores the 2-bit layout as it is (the format of folders without ``storage``).

    Example:
        >>> lay = {"l": {"kind": "linear", "bits": 2, "shape": [1, 7], "row_bytes": 2}}
        >>> t = {"l.qweight": pack_codes(torch.tensor([[1, 0, -1, 1, 1, 0, -1]], dtype=torch.int8), 2)}
        >>> d, dl = encode_storage(t, lay)
        >>> d["l.qweight"].shape, dl["l"]["storage"], torch.equal(decode_storage(d, dl)[0]["l.qweight"], t["l.qweight"])
        (torch.Size([1, 2]), 'base3', True)
    """
    if ternary not in STORAGES:
        raise ValueError(f"ternary storage '{ternary}' is not supported: choose {' or '.join(STORAGES)}")
    out, lay = dict(packed), {k: dict(v) for k, v in layout.items()}
    if ternary == "2bit":
        return out, lay
    for name, e in lay.items():
        if e.get("kind") == "tied" or e["bits"] != 2 or e.get("method") in ODD_CODE_METHODS:
            continue  # seq's four odd codes are 2 bits of information: nothing to gain
        rows, n = e["shape"]
        out[f"{name}.qweight"] = pack_base3(unpack_codes(packed[f"{name}.qweight"], 2, n))
        e.update(storage="base3", row_bytes=base3_row_bytes(n), padding_trits=base3_row_bytes(n) * 5 - n)
    return out, lay


def decode_storage(tensors: dict[str, torch.Tensor], layout: dict[str, dict]) -> tuple[dict, dict]:
    """Inverse of :func:`encode_storage`: base-3 tables back to the exact 2-bit layout the
    modules (and kernels) read; entries without ``storage`` are returned as they are."""
    out, lay = dict(tensors), {}
    for name, e in layout.items():
        e = dict(e)
        if e.pop("storage", "2bit") == "base3":
            n = e["shape"][1]
            out[f"{name}.qweight"] = base3_to_2bit(tensors[f"{name}.qweight"], n)
            e.pop("padding_trits", None)
            e["row_bytes"] = row_bytes(n, 2)
        lay[name] = e
    return out, lay


def _bias(old: QuantLinear, floats: dict, name: str, used: set, dtype) -> torch.Tensor | None:
    # The Linear's bias is a float tensor under its HF name; it moves into the packed module.
    if old.bias is None:
        return None
    key = f"{name}.bias"
    if key not in floats:
        raise ValueError(f"float tensor {key} is missing")
    used.add(key)
    return floats[key].to(dtype).clone()
