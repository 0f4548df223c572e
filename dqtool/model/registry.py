"""Every per-architecture difference, in one place.

dqtool never tests a model's name anywhere else: stages ask :func:`spec_for` for the
:class:`ArchSpec` of a config and work from its paths. Specs are keyed by the Hugging
Face config class, so a fine-tuned checkpoint of any of these families is recognised
whatever its name.

Paths are dotted module/parameter paths relative to the ``*ForConditionalGeneration``
model; ``{i}`` marks a layer index. Layer-relative names (``linear_names``,
``layer_norm_names``) are relative to one encoder/decoder layer module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dqtool.base.errors import DQToolError


@dataclass(frozen=True)
class StackSpec:
    """One layer stack (encoder or decoder) of a seq2seq model."""

    layers_path: str          # ModuleList of layers, e.g. "model.encoder.layers"
    num_layers_attr: str      # config attribute holding its depth, e.g. "encoder_layers"
    linear_names: tuple[str, ...]      # Linear modules to quantize, relative to a layer
    layer_norm_names: tuple[str, ...]  # norms inside a layer (kept in float)
    norm_paths: tuple[str, ...] = ()   # norms outside the layers (embedding / final norm)
    # Parameters that exist only in the stack's first layer and are shared by all
    # others (T5's relative attention bias); a student's layer 0 takes them from the
    # teacher's layer 0 whatever layer it was copied from.
    first_layer_only: tuple[str, ...] = ()
    # Linears fed by the encoder output (cross-attention keys/values): in generation they
    # run once over all source tokens, not once per new token.
    memory_linears: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture family lays out its weights.

    Example:
        >>> from transformers import BartConfig
        >>> spec_for(BartConfig()).encoder.layers_path
        'model.encoder.layers'
    """

    name: str
    config_class: str
    encoder: StackSpec
    decoder: StackSpec
    token_embedding: str                    # the shared input embedding module
    embedding_aliases: tuple[str, ...]      # modules that share token_embedding's weight
    lm_head: str = "lm_head"
    # Absolute positions learned per stack (BART, mBART); sinusoidal ones (Marian,
    # Pegasus) are fixed buffers/params that are copied but never trained or quantized.
    position_embeddings: tuple[str, ...] = ()
    positions_learned: bool = True
    # Config attribute that says whether lm_head shares the embedding's weight.
    tie_attr: str = "tie_word_embeddings"
    extra_params: tuple[str, ...] = ()      # e.g. BART's final_logits_bias buffer
    # True when attention goes through transformers' AttentionInterface (config
    # ._attn_implementation), which lets QAT quantize the attention matmul inputs.
    # T5's attention computes its matmuls inline, so only its Linear inputs are quantized.
    attention_interface: bool = True
    # False when positions are relative (T5): no table of max_position_embeddings rows bounds the input.
    position_table: bool = True
    # Layout of the lean cached decoder step (dqtool.model.decoder_step: "post-norm" or "pre-norm")
    # that the BeamSearch generation graph runs per token; "" = the optimum-exported step.
    decoder_step: str = ""
    notes: str = ""

    def stacks(self) -> dict[str, StackSpec]:
        """``{"encoder": ..., "decoder": ...}``."""
        return {"encoder": self.encoder, "decoder": self.decoder}

    def lm_head_tied(self, config) -> bool:
        """True when lm_head.weight is the token embedding's weight (stored once)."""
        return bool(getattr(config, self.tie_attr, True))


_BART_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
_BART_XATTN = ("encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.out_proj")
_BART_FFN = ("fc1", "fc2")
_BART_ENC_LN = ("self_attn_layer_norm", "final_layer_norm")
_BART_DEC_LN = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
_BART_ALIASES = ("model.encoder.embed_tokens", "model.decoder.embed_tokens")


def _bart_like(name: str, config_class: str, enc_norms: tuple, dec_norms: tuple,
               learned_pos: bool, notes: str, decoder_step: str = "") -> ArchSpec:
    return ArchSpec(
        name=name,
        config_class=config_class,
        encoder=StackSpec("model.encoder.layers", "encoder_layers", _BART_ATTN + _BART_FFN, _BART_ENC_LN, enc_norms),
        decoder=StackSpec("model.decoder.layers", "decoder_layers", _BART_ATTN + _BART_XATTN + _BART_FFN,
                          _BART_DEC_LN, dec_norms, memory_linears=("encoder_attn.k_proj", "encoder_attn.v_proj")),
        token_embedding="model.shared",
        embedding_aliases=_BART_ALIASES,
        position_embeddings=("model.encoder.embed_positions", "model.decoder.embed_positions"),
        positions_learned=learned_pos,
        extra_params=("final_logits_bias",),
        decoder_step=decoder_step,
        notes=notes,
    )


# T5 v1.0 has one ReLU FFN (wi, wo); v1.1 / flan-T5 a gated GELU FFN (wi_0, wi_1, wo)
# and an untied lm_head. Both namings are listed; linears() keeps those present.
_T5_ENC = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.0.SelfAttention.o",
           "layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
           "layer.1.DenseReluDense.wo")
_T5_DEC = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.0.SelfAttention.o",
           "layer.1.EncDecAttention.q", "layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v",
           "layer.1.EncDecAttention.o",
           "layer.2.DenseReluDense.wi", "layer.2.DenseReluDense.wi_0", "layer.2.DenseReluDense.wi_1",
           "layer.2.DenseReluDense.wo")

_SPECS: tuple[ArchSpec, ...] = (
    _bart_like("bart", "BartConfig",
               ("model.encoder.layernorm_embedding",), ("model.decoder.layernorm_embedding",), True,
               "post-norm; learned positions with offset 2", decoder_step="post-norm"),
    _bart_like("mbart", "MBartConfig",
               ("model.encoder.layernorm_embedding", "model.encoder.layer_norm"),
               ("model.decoder.layernorm_embedding", "model.decoder.layer_norm"), True,
               "pre-norm with final layer norms", decoder_step="pre-norm"),
    _bart_like("marian", "MarianConfig", (), (), False,
               "sinusoidal positions; no embedding layer norm"),
    _bart_like("pegasus", "PegasusConfig", ("model.encoder.layer_norm",), ("model.decoder.layer_norm",), False,
               "pre-norm; sinusoidal positions"),
    ArchSpec(
        name="t5",
        config_class="T5Config",
        encoder=StackSpec("encoder.block", "num_layers", _T5_ENC,
                          ("layer.0.layer_norm", "layer.1.layer_norm"), ("encoder.final_layer_norm",),
                          ("layer.0.SelfAttention.relative_attention_bias.weight",)),
        decoder=StackSpec("decoder.block", "num_decoder_layers", _T5_DEC,
                          ("layer.0.layer_norm", "layer.1.layer_norm", "layer.2.layer_norm"),
                          ("decoder.final_layer_norm",),
                          ("layer.0.SelfAttention.relative_attention_bias.weight",),
                          memory_linears=("layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v")),
        token_embedding="shared",
        embedding_aliases=("encoder.embed_tokens", "decoder.embed_tokens"),
        positions_learned=False,
        attention_interface=False,
        position_table=False,
        notes="relative position bias in layer 0 only; v1.0 (wi/wo, tied) and v1.1 (wi_0/wi_1/wo, untied) FFNs",
    ),
)

_BY_CLASS = {s.config_class: s for s in _SPECS}


def supported() -> list[str]:
    """Names of the supported architecture families.

    Example:
        >>> supported()
        ['bart', 'mbart', 'marian', 'pegasus', 't5']
    """
    return [s.name for s in _SPECS]


def spec_for(config) -> ArchSpec:
    """The :class:`ArchSpec` for a Hugging Face config (by its class, walking base classes).

    Unknown architectures raise a DQToolError listing the supported ones.

    Example:
        >>> from transformers import T5Config
        >>> spec_for(T5Config()).decoder.num_layers_attr
        'num_decoder_layers'
    """
    for cls in type(config).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    model_type = getattr(config, "model_type", type(config).__name__)
    raise DQToolError(
        f"unsupported architecture '{model_type}' ({type(config).__name__}): dqtool supports "
        f"{', '.join(supported())}; convert the model to one of these families")


def position_limit(model) -> int | None:
    """Most tokens the model's position table holds, or ``None`` when unbounded.

    BART/mBART (learned) and Marian/Pegasus (sinusoidal) positions are a table of
    ``max_position_embeddings`` rows; a longer input is an index error deep in torch.
    T5's relative positions have no table.

    Example:
        >>> from transformers import BartConfig, T5Config
        >>> class M: config = BartConfig(max_position_embeddings=256)
        >>> class T: config = T5Config()
        >>> position_limit(M), position_limit(T)
        (256, None)
    """
    cfg = getattr(model, "config", None)
    try:
        if cfg is not None and not spec_for(cfg).position_table:
            return None
    except DQToolError:
        pass  # not a family dqtool trains; its config still says how many positions it has
    return getattr(cfg, "max_position_embeddings", None)


def get_module(model, path: str):
    """Resolve a dotted path (``"model.encoder.layers"``) on a module."""
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def num_layers(config, stack: StackSpec) -> int:
    """Depth of one stack as the config records it (T5 falls back to num_layers)."""
    n = getattr(config, stack.num_layers_attr, None)
    if n is None:  # T5Config leaves num_decoder_layers None to mean "same as encoder"
        n = config.num_layers
    return int(n)


def runs_per_token(name: str, spec: ArchSpec) -> bool:
    """True for Linears that run once per generated token (decoder self-attention, FFN,
    lm_head), False for those that run over all source tokens (encoder, cross-attention
    keys/values).

    Example:
        >>> from transformers import BartConfig
        >>> s = spec_for(BartConfig())
        >>> [runs_per_token(n, s) for n in ("model.decoder.layers.0.fc1", "model.decoder.layers.0.encoder_attn.k_proj",
        ...                                 "model.encoder.layers.0.fc1", "lm_head")]
        [True, False, False, True]
    """
    if name == spec.lm_head:
        return True
    prefix = spec.decoder.layers_path + "."
    if not name.startswith(prefix):
        return False
    rest = name[len(prefix):].split(".", 1)[1]
    return rest not in spec.decoder.memory_linears


def linears(model, spec: ArchSpec) -> dict[str, object]:
    """``{qualified name: nn.Linear}`` of every Linear to quantize, in model order.

    Example:
        >>> from transformers import BartConfig, BartForConditionalGeneration
        >>> cfg = BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        ...                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50)
        >>> len(linears(BartForConditionalGeneration(cfg), spec_for(cfg)))
        16
    """
    import torch.nn as nn

    out: dict[str, object] = {}
    for stack in (spec.encoder, spec.decoder):
        layers = get_module(model, stack.layers_path)
        for i, layer in enumerate(layers):
            for name in stack.linear_names:
                try:
                    mod = get_module(layer, name)
                except AttributeError:
                    continue  # the other T5 FFN naming
                if isinstance(mod, nn.Linear):
                    out[f"{stack.layers_path}.{i}.{name}"] = mod
    return out
