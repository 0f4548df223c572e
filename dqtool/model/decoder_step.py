"""One decoder step with the cache, written lean for ONNX export (BART family).

``dqtool export --generation-graph beam`` runs the cached decoder step once per generated token
(ONNX Runtime's BeamSearch op). Hugging Face's decoder, exported by optimum, spends a third of
that step's kernel time on ~200 shape ops (heads split and merged with ``view`` / ``transpose`` on
sizes read at run time, masks built per step) around the quantized matmuls. This module is the
same computation with none of them: each attention is one ``com.microsoft.MultiHeadAttention``
node (heads split inside the kernel; self-attention appends to the cache itself), every Linear is
the export-mode packed Linear of :mod:`dqtool.qmath.onnx_ops` (the same quantized op as in the
optimum graph), and every other op is a LayerNorm, an add or the activation::

    input_ids [B, 1] int32, encoder_attention_mask [B, S] int32,
    past_key_self_i / past_value_self_i [B, N, P, Dh], past_key_cross_i / past_value_cross_i [B, N, S, Dh]
      h = embed_tokens(ids) + embed_positions(P)             [B, 1, d]   (layernorm_embedding)
      per layer (post-norm, BART; pre-norm, mBART: the norm before each block):
        q, k, v = q_proj(h), k_proj(h), v_proj(h)             [B, 1, d]
        a, present_k, present_v = MHA(q, k, v, past_k, past_v) [B, 1, d], [B, N, P + 1, Dh]
        h = LN(h + out_proj(a))
        a = MHA(q_proj(h), past_key_cross, past_value_cross, mask)
        h = LN(h + out_proj(a))
        h = LN(h + fc2(act(fc1(h))))
      logits = lm_head(h) + final_logits_bias                [B, 1, V]
    -> logits, present_key_self_i, present_value_self_i

Its PyTorch forward computes what the packed model's cached step computes (tests compare the
logits); the ONNX graph is checked like every export, by the generation graph's token parity.
Which architectures have it is the registry's ``decoder_step`` layout; a scheme that quantizes the
attention matmuls' inputs keeps the optimum graph (MultiHeadAttention computes them in float).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MS_MHA = "com.microsoft::MultiHeadAttention"
SLOTS_ATTR = "dqtool_slots"   # the MultiHeadAttention input positions of a node's inputs (fixed after export)
LAYOUTS = ("post-norm", "pre-norm")


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:       # [B, T, d] -> [B, N, T, Dh]
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


def _attend(q, k, v, n: int, mask=None) -> torch.Tensor:    # q [B, 1, d]; k, v [B, N, T, Dh] -> [B, 1, d]
    q = _heads(q, n)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    if mask is not None:                                    # [B, S]: 0 = padding
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    out = torch.matmul(F.softmax(scores, dim=-1), v)        # [B, N, 1, Dh]
    return out.transpose(1, 2).flatten(2)


class _SelfAttention(torch.autograd.Function):
    """Self-attention of one new token over the cache and itself; returns the cache grown by one."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, heads: int):
        present_k = torch.cat([past_k, _heads(k, heads)], dim=2)     # [B, N, P + 1, Dh]
        present_v = torch.cat([past_v, _heads(v, heads)], dim=2)
        return _attend(q, present_k, present_v, heads), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, heads):
        return g.op(MS_MHA, q, k, v, past_k, past_v, num_heads_i=heads, outputs=3,
                    **{f"{SLOTS_ATTR}_i": [0, 1, 2, 6, 7]})


class _CrossAttention(torch.autograd.Function):
    """Attention of the new token over the encoder's cached keys/values, padding masked."""

    @staticmethod
    def forward(ctx, q, k, v, mask, heads: int):
        return _attend(q, k, v, heads, mask)

    @staticmethod
    def symbolic(g, q, k, v, mask, heads):
        return g.op(MS_MHA, q, k, v, mask, num_heads_i=heads, **{f"{SLOTS_ATTR}_i": [0, 1, 2, 4]})


def fix_attention_inputs(graph) -> int:
    """Put each MultiHeadAttention node's inputs at their op positions (empty names for the optional
    inputs it skips) and drop the marker attribute; returns how many nodes were fixed. The exporter
    cannot write an empty optional input, so the symbolic functions pass only the used inputs and
    name their positions in :data:`SLOTS_ATTR`."""
    fixed = 0
    for node in graph.node:
        marks = [a for a in node.attribute if a.name == SLOTS_ATTR]
        if not marks:
            continue
        slots = list(marks[0].ints)
        inputs = [""] * (max(slots) + 1)
        for slot, name in zip(slots, list(node.input)):
            inputs[slot] = name
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.remove(marks[0])
        fixed += 1
    return fixed


class DecoderStep(nn.Module):
    """The cached decoder step of a BART-family ``*ForConditionalGeneration`` ``model`` (its packed
    Linears swapped for export-mode ones, or not: the forward is the same computation either way).

    It registers the model's own submodules under their paths (``model``, ``lm_head``,
    ``final_logits_bias``), so an export names every initializer as the model's state dict does.
    """

    def __init__(self, model: nn.Module, layout: str):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"decoder step layout '{layout}' is unknown: choose {', '.join(LAYOUTS)}")
        self.layout = layout
        self.model = model.model
        self.lm_head = model.lm_head
        bias = getattr(model, "final_logits_bias", None)
        if bias is not None:
            self.register_buffer("final_logits_bias", bias)
        else:
            self.final_logits_bias = None
        cfg = model.config
        self.heads = int(cfg.decoder_attention_heads)
        self.layers = len(self.model.decoder.layers)

    def input_names(self) -> list[str]:
        names = ["input_ids", "encoder_attention_mask"]
        for tag in ("self", "cross"):
            for i in range(self.layers):
                names += [f"past_key_{tag}_{i}", f"past_value_{tag}_{i}"]
        return names

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present_{kv}_self_{i}" for i in range(self.layers) for kv in ("key", "value")]

    def forward(self, input_ids, encoder_attention_mask, *past):
        # input_ids [B, 1] int32; mask [B, S] int32; past: self k, v per layer, then cross k, v per layer
        dec = self.model.decoder
        n = self.layers
        self_kv, cross_kv = past[:2 * n], past[2 * n:]
        ids = input_ids.long()
        h = dec.embed_tokens(ids)                                           # [B, 1, d] (embed_scale inside)
        h = h + dec.embed_positions(ids, self_kv[0].shape[2])               # position P (+ offset)
        if getattr(dec, "layernorm_embedding", None) is not None:
            h = dec.layernorm_embedding(h)
        pre = self.layout == "pre-norm"
        presents = []
        for i, layer in enumerate(dec.layers):
            sa, ca = layer.self_attn, layer.encoder_attn
            x = layer.self_attn_layer_norm(h) if pre else h
            a, pk, pv = _SelfAttention.apply(sa.q_proj(x), sa.k_proj(x), sa.v_proj(x),
                                             self_kv[2 * i], self_kv[2 * i + 1], self.heads)
            presents += [pk, pv]
            h = h + sa.out_proj(a)
            h = h if pre else layer.self_attn_layer_norm(h)
            x = layer.encoder_attn_layer_norm(h) if pre else h
            a = _CrossAttention.apply(ca.q_proj(x), cross_kv[2 * i], cross_kv[2 * i + 1],
                                      encoder_attention_mask, self.heads)
            h = h + ca.out_proj(a)
            h = h if pre else layer.encoder_attn_layer_norm(h)
            x = layer.final_layer_norm(h) if pre else h
            h = h + layer.fc2(layer.activation_fn(layer.fc1(x)))
            h = h if pre else layer.final_layer_norm(h)
        if pre and getattr(dec, "layer_norm", None) is not None:
            h = dec.layer_norm(h)
        logits = self.lm_head(h)                                            # [B, 1, V]
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        return (logits, *presents)


def quantizes_attention(model: nn.Module) -> bool:
    """True when the model fake-quantizes its attention matmuls' inputs (QAT's ``quantize_attention``):
    the lean step, whose MultiHeadAttention computes them in float, would not be faithful."""
    return any(getattr(m, "dqtool_act", None) is not None for m in model.modules())
