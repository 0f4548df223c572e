"""Hugging Face's generation-config rules, for runtimes that are not Hugging Face models.

:func:`resolve_generation_config` turns a ``generate`` call's arguments and a model's
generation config into the one config that call runs with — precedence (call > passed
config > model's config > legacy model-config parameters), special tokens and lengths as
transformers 4.57 computes them — and refuses (``ValueError``) every setting the numpy
search (:mod:`dqtool.runtimes.search`) or CTranslate2 cannot honour, rather than ignoring it.
"""

from __future__ import annotations

import copy

# Generation settings this runtime cannot honour: name -> the value that means "off".
# A generation config or a call that turns one on is an error, not a silent difference.
UNSUPPORTED = {
    "num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": None, "constraints": None,
    "force_words_ids": None, "guidance_scale": None, "sequence_bias": None, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "suppress_tokens": None, "begin_suppress_tokens": None,
    "exponential_decay_length_penalty": None, "renormalize_logits": False, "remove_invalid_values": False,
    "max_time": None, "stop_strings": None, "watermarking_config": None, "token_healing": False,
    "output_scores": False, "output_logits": False, "output_attentions": False, "output_hidden_states": False,
    "return_dict_in_generate": False, "prefill_chunk_size": None,
}
# Keyword arguments Hugging Face's generate takes that change nothing here.
IGNORED_KWARGS = {"use_cache", "synced_gpus", "tokenizer", "use_model_defaults"}
# Keyword arguments of Hugging Face's generate this runtime has no equivalent for (an error when set).
UNSUPPORTED_KWARGS = {"logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                       "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate",
                       "decoder_input_ids", "encoder_outputs"}


def as_list(tokens) -> list[int]:
    """Token id(s) as a list of ints (``None`` -> ``[]``).

    Example:
        >>> as_list(2), as_list([1, 2]), as_list(None)
        ([2], [1, 2], [])
    """
    if tokens is None:
        return []
    if isinstance(tokens, (list, tuple)):
        return [int(t) for t in tokens]
    if hasattr(tokens, "tolist"):
        t = tokens.tolist()
        return [int(x) for x in t] if isinstance(t, list) else [int(t)]
    return [int(tokens)]


def resolve_generation_config(model, generation_config, kwargs: dict):
    """The generation config of one ``generate`` call, following Hugging Face's precedence and length rules.

    ``model`` is any runtime with ``config`` and ``generation_config`` (its generation config
    may be replaced by the model config's legacy generation parameters, as Hugging Face does).
    """
    from transformers import GenerationConfig

    if generation_config is None:
        gen = model.generation_config
        # Hugging Face's legacy rule: an unmodified generation config made from the model
        # config gives way to generation parameters set in the model config.
        if (getattr(gen, "_from_model_config", False)
                and getattr(gen, "_original_object_hash", None) == hash(gen)
                and len(model.config._get_non_default_generation_parameters()) > 0):
            from_config = GenerationConfig.from_model_config(model.config)
            if from_config != gen:
                model.generation_config = from_config
    base = model.generation_config if generation_config is None else generation_config
    if not isinstance(base, GenerationConfig):
        raise ValueError(f"generation_config must be a transformers.GenerationConfig, got {type(base).__name__}")
    gc = copy.deepcopy(base)
    if generation_config is not None:
        # Hugging Face (model generation config from 4.50 on): unset values of a passed
        # config fall back to the model's non-default values.
        default = GenerationConfig()
        for key, value in model.generation_config.__dict__.items():
            if key.startswith("_") or key == "transformers_version":
                continue
            if getattr(gc, key, None) == getattr(default, key, None) and value != getattr(default, key, None):
                setattr(gc, key, value)
    passed = {k: v for k, v in kwargs.items() if v is not None}
    unsupported = sorted(k for k, v in passed.items() if k in UNSUPPORTED_KWARGS and not (
        isinstance(v, (list, tuple)) and len(v) == 0))
    if unsupported:
        raise ValueError(f"generate arguments {unsupported} are not supported by the ONNX runtime: leave them out")
    unknown = [k for k in passed if k not in IGNORED_KWARGS and k not in UNSUPPORTED_KWARGS
               and not hasattr(gc, k)]
    if unknown:
        raise ValueError(f"generate got unknown arguments {sorted(unknown)}: this runtime takes "
                         f"input_ids, attention_mask and generation settings")
    gc.update(**{k: v for k, v in passed.items() if k not in IGNORED_KWARGS and k not in UNSUPPORTED_KWARGS})
    if gc.do_sample:
        raise ValueError("do_sample=True is not supported by the ONNX runtime (greedy and beam search only): "
                         "pass do_sample=False")
    bad = {k: getattr(gc, k, off) for k, off in UNSUPPORTED.items() if getattr(gc, k, off) not in (off, None)
           and not (k == "guidance_scale" and getattr(gc, k) == 1)}
    if bad:
        raise ValueError(f"generation settings {bad} are not supported by the ONNX runtime: unset them")
    if gc.num_beams is None or gc.num_beams < 1:
        raise ValueError(f"num_beams must be 1 or more, got {gc.num_beams}")
    nrs = gc.num_return_sequences or 1
    if nrs > gc.num_beams:
        raise ValueError(f"num_return_sequences ({nrs}) must be at most num_beams ({gc.num_beams})")
    # Special tokens as in Hugging Face's _prepare_special_tokens.
    if gc.decoder_start_token_id is None:
        gc.decoder_start_token_id = gc.bos_token_id
    if gc.decoder_start_token_id is None:
        raise ValueError("decoder_start_token_id or bos_token_id has to be set for encoder-decoder generation")
    if isinstance(gc.decoder_start_token_id, (list, tuple)):
        raise ValueError("a per-row decoder_start_token_id is not supported: pass one id")
    eos = as_list(gc.eos_token_id)
    if gc.pad_token_id is None and eos:
        gc.pad_token_id = eos[0]
    # Lengths as in Hugging Face's _prepare_generated_length (the decoder prompt is 1 token).
    if gc.max_new_tokens is not None:
        gc.max_length = gc.max_new_tokens + 1
    elif kwargs.get("max_length") is None and gc.max_length == GenerationConfig().max_length:
        gc.max_length = gc.max_length + 1
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None:
            gc.max_length = min(gc.max_length, positions)
    if gc.min_new_tokens is not None:
        gc.min_length = gc.min_new_tokens + 1
    if gc.max_length is None or gc.max_length <= 1:
        raise ValueError(f"max_length {gc.max_length} leaves no room after the decoder start token: "
                         f"pass max_length 2 or more (or max_new_tokens 1 or more)")
    return gc
