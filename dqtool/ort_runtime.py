"""Generation with ONNX Runtime from an exported seq2seq folder (no torch model needed).

A folder in optimum's seq2seq layout holds ``encoder_model.onnx`` and either
``decoder_model_merged.onnx`` (one decoder with a ``use_cache_branch`` switch) or the pair
``decoder_model.onnx`` + ``decoder_with_past_model.onnx``, next to ``config.json``,
``generation_config.json`` and the tokenizer files; the graphs may also sit in an ``onnx/``
subfolder (the layout ``dqtool export`` writes and transformers.js loads, see
:func:`graph_folder`). :class:`OnnxSeq2Seq` runs the encoder
once and the decoder one token at a time with its key/value cache, in numpy, and its
``generate`` returns what Hugging Face's ``generate`` (transformers 4.57) returns for greedy
and beam search: the same tokens, padding, lengths and defaults from the generation config.

What ``generate`` reproduces of Hugging Face (and raises a ``ValueError`` for anything else
that would change the output):

* greedy (``num_beams=1``) and beam search (``num_beams>1``; ``length_penalty``,
  ``early_stopping`` True/False/"never", ``num_return_sequences``);
* ``max_length`` (counts the decoder start token) / ``max_new_tokens``, ``min_length`` /
  ``min_new_tokens`` (end-of-sequence suppressed), ``no_repeat_ngram_size``,
  ``repetition_penalty``, ``bad_words_ids``, ``forced_bos_token_id``,
  ``forced_eos_token_id``, applied in Hugging Face's order;
* finished rows padded with ``pad_token_id`` (beam search pads with ``eos_token_id`` when
  the pad id is 0 or unset, as Hugging Face does).

The cross-attention keys/values of the beams of one input are identical, so a beam reorder
moves only the self-attention cache (and only the rows that change). A folder with only
``decoder_model.onnx`` runs without a cache (the whole prefix every step).

One difference from Hugging Face that needs exactly equal scores to show: equal candidates
are ranked lower index first, where ``torch.topk`` leaves their order unspecified.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from dqtool.errors import DQToolError

ENCODER_FILE = "encoder_model.onnx"
MERGED_FILE = "decoder_model_merged.onnx"
DECODER_FILE = "decoder_model.onnx"
WITH_PAST_FILE = "decoder_with_past_model.onnx"
ONNX_SUBDIR = "onnx"  # transformers.js (and the Hub's ONNX repos) keep the graphs here

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")
_PRESENT_RE = re.compile(r"^present\.(\d+)\.(decoder|encoder)\.(key|value)$")
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
_NEG = np.float32(-1.0e9)  # Hugging Face's "finished / unused beam" score

# Generation settings this runtime cannot honour: name -> the value that means "off".
# A generation config or a call that turns one on is an error, not a silent difference.
_UNSUPPORTED = {
    "num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": None, "constraints": None,
    "force_words_ids": None, "guidance_scale": None, "sequence_bias": None, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "suppress_tokens": None, "begin_suppress_tokens": None,
    "exponential_decay_length_penalty": None, "renormalize_logits": False, "remove_invalid_values": False,
    "max_time": None, "stop_strings": None, "watermarking_config": None, "token_healing": False,
    "output_scores": False, "output_logits": False, "output_attentions": False, "output_hidden_states": False,
    "return_dict_in_generate": False, "prefill_chunk_size": None,
}
# Keyword arguments Hugging Face's generate takes that change nothing here.
_IGNORED_KWARGS = {"use_cache", "synced_gpus", "tokenizer", "use_model_defaults"}
# Keyword arguments of Hugging Face's generate this runtime has no equivalent for (an error when set).
_UNSUPPORTED_KWARGS = {"logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                       "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate",
                       "decoder_input_ids", "encoder_outputs"}


def graph_folder(folder: str | os.PathLike) -> Path:
    """Where the graphs of a model folder are: ``folder/onnx`` when it holds the encoder graph
    (the layout ``dqtool export`` writes), else ``folder`` (optimum's flat layout, older exports).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); (d / "onnx").mkdir(); _ = (d / "onnx" / ENCODER_FILE).write_bytes(b"")
        >>> graph_folder(d).name
        'onnx'
    """
    p = Path(folder)
    return p / ONNX_SUBDIR if (p / ONNX_SUBDIR / ENCODER_FILE).is_file() else p


def is_onnx_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds an exported seq2seq model (encoder + a decoder with cache),
    at its root or under ``onnx/``.

    Example:
        >>> import tempfile
        >>> is_onnx_folder(tempfile.mkdtemp())
        False
    """
    p = graph_folder(folder)
    return (p / ENCODER_FILE).is_file() and ((p / MERGED_FILE).is_file() or (p / DECODER_FILE).is_file())


def session_options(threads: int | None = None):
    """ONNX Runtime session options used for every session here.

    All graph optimizations, ``threads`` intra-op threads (``None``: ONNX Runtime's default,
    one per physical core), one inter-op thread, sequential execution.

    Example:
        >>> session_options(1).intra_op_num_threads
        1
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if threads < 1:
            raise DQToolError(f"threads must be 1 or more (or None for ONNX Runtime's default), got {threads}")
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def load_onnx(folder: str | os.PathLike, threads: int | None = None, providers=None, decoder: str = "merged"):
    """``(model, tokenizer_or_None)`` of an exported folder, like the other loaders of ``dqtool eval``.

    Example (needs an exported folder, so not run as a doctest)::
        model, tok = load_onnx("runs/onnx-2-2-8", threads=1)
        model.generate(**tok(["some text"], return_tensors="pt"), num_beams=4)
    """
    model = OnnxSeq2Seq.from_folder(folder, threads=threads, providers=providers, decoder=decoder)
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError):
        tok = None  # no tokenizer files: the caller says what it needs
    return model, tok


class KVCache:
    """The decoder's key/value cache after some steps.

    ``self_kv``: the self-attention keys/values, one array ``[rows, heads, length, head_dim]``
    per decoder past input (in the session's input order); ``cross_kv``: the
    cross-attention ones ``[rows, heads, source_length, head_dim]``, computed on the first
    step and reused; ``length``: decoder tokens cached so far.
    """

    __slots__ = ("self_kv", "cross_kv", "length")

    def __init__(self, self_kv: list, cross_kv: list, length: int):
        self.self_kv = self_kv
        self.cross_kv = cross_kv
        self.length = length

    def reorder(self, rows: np.ndarray) -> "KVCache":
        """Row ``i`` of the self-attention cache becomes row ``rows[i]`` (a beam reorder), in place.

        Only the rows that change are copied. The cross-attention cache is not touched: a
        reorder only moves rows between the beams of one input, whose cross-attention
        keys/values are the same.
        """
        moved = np.flatnonzero(rows != np.arange(len(rows)))
        if moved.size:
            src = rows[moved]
            for i, kv in enumerate(self.self_kv):
                if kv.flags.writeable:
                    kv[moved] = kv[src]  # the right side is a copy: safe when rows swap
                else:
                    self.self_kv[i] = kv.take(rows, axis=0)
        return self


class OnnxSeq2Seq:
    """An exported encoder-decoder run with ONNX Runtime, used like a Hugging Face model.

    Build it with :meth:`from_folder`. ``config`` / ``generation_config`` are the
    Hugging Face ones of the folder; ``generate`` returns a ``torch.LongTensor`` like
    Hugging Face's. ``encode`` and ``decoder_step`` expose the two halves for timing.

    Example (needs an exported folder, so not run as a doctest)::
        model = OnnxSeq2Seq.from_folder("runs/onnx-2-2-8", threads=1)
        out = model.generate(input_ids=ids, attention_mask=mask, num_beams=4, max_length=62)
    """

    main_input_name = "input_ids"

    def __init__(self, folder: Path, encoder, decoder, decoder_with_past, config, generation_config):
        import torch

        self.folder = folder
        self.encoder = encoder
        self.decoder = decoder  # the merged decoder, or the first-step decoder of a pair
        self.decoder_with_past = decoder_with_past  # None for a merged decoder (or no cache at all)
        self.config = config
        self.generation_config = generation_config
        self.device = torch.device("cpu")
        self._setup_io()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_folder(cls, path: str | os.PathLike, threads: int | None = None, providers=None,
                    decoder: str = "merged") -> "OnnxSeq2Seq":
        """Load the sessions, config and generation config of an exported folder.

        ``threads``: intra-op threads of each session (``None``: ONNX Runtime's default);
        ``providers``: ONNX Runtime execution providers (default: CPU); ``decoder``: which
        decoder files to run when the folder has both, ``"merged"`` (one session, the
        weights loaded once) or ``"pair"`` (``decoder_model`` + ``decoder_with_past_model``:
        twice the decoder weights in memory, but no ``If`` node per step, so a little
        faster per token).
        """
        import onnxruntime as ort
        from transformers import AutoConfig, GenerationConfig

        if decoder not in ("merged", "pair"):
            raise DQToolError(f"decoder must be 'merged' or 'pair', got {decoder!r}")
        root = Path(path)
        if not root.is_dir():
            raise DQToolError(f"ONNX folder {root} not found: pass a folder written by the ONNX export")
        p = graph_folder(root)
        has_merged = (p / MERGED_FILE).is_file()
        has_pair = (p / DECODER_FILE).is_file()
        if not (p / ENCODER_FILE).is_file() or not (has_merged or has_pair):
            raise DQToolError(
                f"{p} is not an exported seq2seq folder: it needs {ENCODER_FILE} and {MERGED_FILE} "
                f"(or {DECODER_FILE} + {WITH_PAST_FILE}); export it with the ONNX export "
                f"(optimum task text2text-generation-with-past)")
        if not (root / "config.json").is_file():
            raise DQToolError(f"{root} has no config.json: export writes it next to the .onnx files; copy it from "
                              f"the source model folder")
        so = session_options(threads)
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]

        def session(name: str):
            try:
                return ort.InferenceSession(str(p / name), sess_options=so, providers=providers)
            except Exception as e:  # onnxruntime raises its own (unexported) exception types
                raise DQToolError(f"ONNX Runtime cannot load {p / name}: {e}; re-export the folder") from e

        encoder = session(ENCODER_FILE)
        if has_merged and (decoder == "merged" or not (p / WITH_PAST_FILE).is_file() or not has_pair):
            decoder, with_past = session(MERGED_FILE), None
        else:
            decoder = session(DECODER_FILE)
            with_past = session(WITH_PAST_FILE) if (p / WITH_PAST_FILE).is_file() else None
        config = AutoConfig.from_pretrained(str(root))
        if (root / "generation_config.json").is_file():
            gen = GenerationConfig.from_pretrained(str(root))
        else:
            gen = GenerationConfig.from_model_config(config)
        return cls(root, encoder, decoder, with_past, config, gen)

    def _setup_io(self) -> None:
        enc_in = {i.name: i for i in self.encoder.get_inputs()}
        if "input_ids" not in enc_in:
            raise DQToolError(f"{graph_folder(self.folder) / ENCODER_FILE} has no input_ids input: "
                              f"not a text encoder export")
        self._enc_has_mask = "attention_mask" in enc_in
        self._enc_ids_type = _NP_TYPES.get(enc_in["input_ids"].type, np.int64)
        self._enc_output = "last_hidden_state"
        if self._enc_output not in {o.name for o in self.encoder.get_outputs()}:
            self._enc_output = self.encoder.get_outputs()[0].name

        first = self.decoder
        later = self.decoder_with_past or self.decoder
        self._merged = "use_cache_branch" in {i.name for i in first.get_inputs()}
        self._first_io = _DecoderIO(first)
        self._later_io = _DecoderIO(later) if later is not first else self._first_io
        # A cache is usable when the later-step session takes past inputs and the first
        # step gives every one of them (self-attention presents + cross-attention presents).
        self.uses_cache = bool(self._later_io.past_names) and self._first_io.gives_all(self._later_io)
        if not self._merged and self.decoder_with_past is None:
            self.uses_cache = False
        # Shapes of the empty past fed to a merged decoder's first step (as optimum does):
        # heads and head size from the graph, else from the config.
        cfg = getattr(self.config, "decoder", self.config)
        heads = getattr(cfg, "decoder_attention_heads", None) or getattr(cfg, "num_heads", None) or 1
        dim = getattr(cfg, "d_kv", None) or getattr(cfg, "d_model", heads) // heads
        self._dummy_shapes = [(h or heads, d or dim) for h, d in self._first_io.past_shapes]
        if self._merged and not self.uses_cache:
            raise DQToolError(f"{graph_folder(self.folder) / MERGED_FILE} has a use_cache_branch input but no matching "
                              f"past/present key-value names: re-export the folder")

    # ------------------------------------------------------------------ HF-model surface

    def to(self, device: Any = "cpu") -> "OnnxSeq2Seq":
        """Stay on the CPU (the only device these sessions run on here); other devices are an error."""
        import torch

        if isinstance(device, torch.dtype):
            if device == torch.float32:
                return self
            raise DQToolError(f"an ONNX model's dtype is fixed at export, cannot convert to {device}: "
                              f"re-export the folder instead")
        if torch.device(device).type != "cpu":
            raise DQToolError(f"the ONNX runtime runs on the CPU, not on {device}: pass --device cpu")
        return self

    def eval(self) -> "OnnxSeq2Seq":
        return self

    def __repr__(self) -> str:
        kind = "merged" if self._merged else ("pair" if self.decoder_with_past is not None else "no-cache")
        return f"OnnxSeq2Seq({str(self.folder)!r}, {self.config.model_type}, decoder={kind})"

    # ------------------------------------------------------------------ the two halves

    def encode(self, input_ids, attention_mask=None) -> np.ndarray:
        """Encoder output ``last_hidden_state`` [B, S, d] for ``input_ids`` [B, S]."""
        ids = np.ascontiguousarray(_to_numpy(input_ids), dtype=self._enc_ids_type)
        feed = {"input_ids": ids}
        if self._enc_has_mask:
            mask = np.ones_like(ids) if attention_mask is None else _to_numpy(attention_mask)
            feed["attention_mask"] = np.ascontiguousarray(mask, dtype=self._enc_ids_type)
        return self.encoder.run([self._enc_output], feed)[0]

    def decoder_step(self, input_ids, encoder_hidden_states: np.ndarray, encoder_attention_mask,
                     cache: KVCache | None = None) -> tuple[np.ndarray, KVCache | None]:
        """One decoder step: ``(logits [B, V] of the last position, the new cache)``.

        ``input_ids`` [B, 1] is the newest token of each row (with ``cache=None``: the
        decoder start; a folder without a cache takes the whole prefix [B, T] each step and
        returns ``None`` as the cache). ``encoder_attention_mask`` [B, S] int64.
        """
        ids = np.ascontiguousarray(_to_numpy(input_ids), dtype=self._first_io.ids_type)
        return self._step(ids, self._static_feeds(encoder_hidden_states, _to_numpy(encoder_attention_mask)), cache)

    def _static_feeds(self, enc: np.ndarray, mask: np.ndarray) -> tuple[dict, dict]:
        """The inputs that stay the same over one generation: (first step, later steps)."""
        common = {"encoder_attention_mask": np.ascontiguousarray(mask, dtype=self._first_io.mask_type),
                  "encoder_hidden_states": enc}
        first = dict(common)
        if self._merged:
            first["use_cache_branch"] = np.zeros(1, dtype=np.bool_)
            b, io = enc.shape[0], self._first_io
            for name, (heads, dim) in zip(io.past_names, self._dummy_shapes):
                first[name] = np.zeros((b, heads, 0, dim), dtype=io.kv_dtype)
        later = dict(common)
        if self._merged:
            later["use_cache_branch"] = np.ones(1, dtype=np.bool_)
        return self._first_io.feed(first), self._later_io.feed(later)

    def _step(self, ids: np.ndarray, static: tuple[dict, dict], cache: KVCache | None):
        """:meth:`decoder_step` on prepared arrays (``ids`` contiguous, of the session's type; ``static``
        from :meth:`_static_feeds`)."""
        if cache is None:
            io = self._first_io
            feed = dict(static[0])
            feed["input_ids"] = ids
            if not self.uses_cache:
                return io.session.run(io.logits_only, feed)[0][:, -1, :], None
            outs = io.session.run(io.first_outputs, feed)
            n_self = len(io.self_present)
            return outs[0][:, -1, :], KVCache(outs[1:1 + n_self], outs[1 + n_self:], ids.shape[1])
        io = self._later_io
        feed = dict(static[1])
        feed["input_ids"] = ids
        feed.update(zip(io.self_past, cache.self_kv))
        feed.update(zip(io.cross_past, cache.cross_kv))
        outs = io.session.run(io.later_outputs, feed)
        return outs[0][:, -1, :], KVCache(outs[1:], cache.cross_kv, cache.length + ids.shape[1])

    # ------------------------------------------------------------------ generate

    def generate(self, input_ids=None, attention_mask=None, num_beams: int | None = None,
                 max_length: int | None = None, max_new_tokens: int | None = None, min_length: int | None = None,
                 length_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                 early_stopping: bool | str | None = None, do_sample: bool | None = None, generation_config=None,
                 **kwargs):
        """Decoder sequences ``torch.LongTensor [B * num_return_sequences, T]`` like Hugging Face's ``generate``.

        Every argument left ``None`` comes from ``generation_config`` (default: the folder's),
        as in Hugging Face. Sequences start with the decoder start token; finished rows are
        padded. Sampling is not implemented (``do_sample=True`` is a ``ValueError``).
        """
        import torch

        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("generate needs input_ids [batch, source_length]")
        gc = self._resolve_config(generation_config, dict(
            num_beams=num_beams, max_length=max_length, max_new_tokens=max_new_tokens, min_length=min_length,
            length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            early_stopping=early_stopping, do_sample=do_sample, **kwargs))
        ids = _to_numpy(input_ids).astype(np.int64, copy=False)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, source_length], got shape {tuple(ids.shape)}")
        if attention_mask is None:
            # Hugging Face: the mask is inferred from the pad token when it is in the input and is not EOS.
            pad, eos = gc.pad_token_id, _as_list(gc.eos_token_id)
            if pad is not None and (ids == pad).any() and pad not in eos:
                mask = (ids != pad).astype(np.int64)
            else:
                mask = np.ones_like(ids)
        else:
            mask = _to_numpy(attention_mask).astype(np.int64, copy=False)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
        try:
            enc = self.encode(ids, mask)
            run = _Run(self, gc)
            out = run.greedy(enc, mask) if gc.num_beams == 1 else run.beam_search(enc, mask)
        except Exception as e:
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            positions = getattr(self.config, "max_position_embeddings", None)
            hint = ""
            if positions is not None and max(gc.max_length, ids.shape[1]) > positions:
                hint = (f" (the model has {positions} positions; source length {ids.shape[1]}, "
                        f"max_length {gc.max_length}: truncate the source or lower max_length)")
            raise DQToolError(f"ONNX Runtime failed in generate{hint}: {e}") from e
        return torch.from_numpy(out)

    def _resolve_config(self, generation_config, kwargs: dict):
        """The generation config of one call, following Hugging Face's precedence and length rules."""
        from transformers import GenerationConfig

        if generation_config is None:
            gen = self.generation_config
            # Hugging Face's legacy rule: an unmodified generation config made from the model
            # config gives way to generation parameters set in the model config.
            if (getattr(gen, "_from_model_config", False)
                    and getattr(gen, "_original_object_hash", None) == hash(gen)
                    and len(self.config._get_non_default_generation_parameters()) > 0):
                from_config = GenerationConfig.from_model_config(self.config)
                if from_config != gen:
                    self.generation_config = from_config
        base = self.generation_config if generation_config is None else generation_config
        if not isinstance(base, GenerationConfig):
            raise ValueError(f"generation_config must be a transformers.GenerationConfig, got {type(base).__name__}")
        gc = copy.deepcopy(base)
        if generation_config is not None:
            # Hugging Face (model generation config from 4.50 on): unset values of a passed
            # config fall back to the model's non-default values.
            default = GenerationConfig()
            for key, value in self.generation_config.__dict__.items():
                if key.startswith("_") or key == "transformers_version":
                    continue
                if getattr(gc, key, None) == getattr(default, key, None) and value != getattr(default, key, None):
                    setattr(gc, key, value)
        passed = {k: v for k, v in kwargs.items() if v is not None}
        unsupported = sorted(k for k, v in passed.items() if k in _UNSUPPORTED_KWARGS and not (
            isinstance(v, (list, tuple)) and len(v) == 0))
        if unsupported:
            raise ValueError(f"generate arguments {unsupported} are not supported by the ONNX runtime: leave them out")
        unknown = [k for k in passed if k not in _IGNORED_KWARGS and k not in _UNSUPPORTED_KWARGS
                   and not hasattr(gc, k)]
        if unknown:
            raise ValueError(f"generate got unknown arguments {sorted(unknown)}: this runtime takes "
                             f"input_ids, attention_mask and generation settings")
        gc.update(**{k: v for k, v in passed.items() if k not in _IGNORED_KWARGS and k not in _UNSUPPORTED_KWARGS})
        if gc.do_sample:
            raise ValueError("do_sample=True is not supported by the ONNX runtime (greedy and beam search only): "
                             "pass do_sample=False")
        bad = {k: getattr(gc, k, off) for k, off in _UNSUPPORTED.items() if getattr(gc, k, off) not in (off, None)
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
        eos = _as_list(gc.eos_token_id)
        if gc.pad_token_id is None and eos:
            gc.pad_token_id = eos[0]
        # Lengths as in Hugging Face's _prepare_generated_length (the decoder prompt is 1 token).
        if gc.max_new_tokens is not None:
            gc.max_length = gc.max_new_tokens + 1
        elif kwargs.get("max_length") is None and gc.max_length == GenerationConfig().max_length:
            gc.max_length = gc.max_length + 1
            positions = getattr(self.config, "max_position_embeddings", None)
            if positions is not None:
                gc.max_length = min(gc.max_length, positions)
        if gc.min_new_tokens is not None:
            gc.min_length = gc.min_new_tokens + 1
        if gc.max_length is None or gc.max_length <= 1:
            raise ValueError(f"max_length {gc.max_length} leaves no room after the decoder start token: "
                             f"pass max_length 2 or more (or max_new_tokens 1 or more)")
        return gc


# ---------------------------------------------------------------------- internals

class _DecoderIO:
    """Input/output names of one decoder session, grouped once."""

    def __init__(self, session):
        self.session = session
        ins = session.get_inputs()
        self.input_names = [i.name for i in ins]
        past = sorted(((int(m[1]), m[2], m[3]), i) for i in ins if (m := _PAST_RE.match(i.name)))
        self.past_names = [i.name for _, i in past]
        self.self_past = [i.name for (_, kind, _), i in past if kind == "decoder"]
        self.cross_past = [i.name for (_, kind, _), i in past if kind == "encoder"]
        types = {i.name: _NP_TYPES.get(i.type) for i in ins}
        self.ids_type = types.get("input_ids") or np.int64
        self.mask_type = types.get("encoder_attention_mask") or np.int64
        self.past_shapes = []
        self.kv_dtype = np.float32
        for _, i in past:
            heads, dim = i.shape[1], i.shape[3]
            self.past_shapes.append((heads if isinstance(heads, int) else None, dim if isinstance(dim, int) else None))
            self.kv_dtype = _NP_TYPES.get(i.type, np.float32)
        outs = [o.name for o in session.get_outputs()]
        self.logits = "logits" if "logits" in outs else outs[0]
        present = {(int(m[1]), m[2], m[3]): o for o in outs if (m := _PRESENT_RE.match(o))}
        self.self_present = [present[k] for k in sorted(present) if k[1] == "decoder"]
        self.cross_present = [present[k] for k in sorted(present) if k[1] == "encoder"]
        self.first_outputs = [self.logits] + self.self_present + self.cross_present
        self.later_outputs = [self.logits] + self.self_present
        self.logits_only = [self.logits]
        self._names = set(self.input_names)

    def gives_all(self, later: "_DecoderIO") -> bool:
        """Whether this session's presents fill every past input of ``later``, in the same order."""
        def key(name):
            m = _PAST_RE.match(name) or _PRESENT_RE.match(name)
            return int(m[1]), m[2], m[3]
        return ([key(n) for n in self.self_present] == [key(n) for n in later.self_past]
                and [key(n) for n in self.cross_present] == [key(n) for n in later.cross_past])

    def feed(self, values: dict) -> dict:
        """Only the inputs this session declares (a with-past decoder takes no encoder_hidden_states)."""
        return {k: v for k, v in values.items() if k in self._names}


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_list(tokens) -> list[int]:
    if tokens is None:
        return []
    if isinstance(tokens, (list, tuple)):
        return [int(t) for t in tokens]
    if hasattr(tokens, "tolist"):
        t = tokens.tolist()
        return [int(x) for x in t] if isinstance(t, list) else [int(t)]
    return [int(tokens)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of each row of ``x`` [R, N], largest first (ties: lower index first).

    Long rows (beams x vocabulary) skip a full partition: the ``k``-th largest of the
    maxima of 256-wide chunks is a lower bound of the ``k``-th largest entry, so only the
    entries at or above it are sorted.

    Example:
        >>> _topk(np.array([[1.0, 3.0, 3.0, 2.0]]), 3).tolist()
        [[1, 2, 3]]
    """
    rows, n = x.shape
    k = min(k, n)
    chunk = 256
    if n < 16 * chunk or k > n // chunk:
        thr = np.partition(x, n - k, axis=1)[:, n - k]  # the k-th largest entry itself
    else:
        full = n // chunk * chunk
        cmax = x[:, :full].reshape(rows, -1, chunk).max(axis=2)
        if full < n:
            cmax = np.concatenate([cmax, x[:, full:].max(axis=1, keepdims=True)], axis=1)
        thr = np.partition(cmax, cmax.shape[1] - k, axis=1)[:, cmax.shape[1] - k]
    out = np.empty((rows, k), dtype=np.int64)
    for r in range(rows):
        cand = np.flatnonzero(x[r] >= thr[r])
        out[r] = cand[np.lexsort((cand, -x[r, cand]))[:k]]
    return out


class _Run:
    """One ``generate`` call: the processors and the two search loops."""

    def __init__(self, model: OnnxSeq2Seq, gc):
        self.model = model
        self.gc = gc
        self.max_length = int(gc.max_length)
        self.start = int(gc.decoder_start_token_id)
        self.eos = _as_list(gc.eos_token_id)
        self.eos_arr = np.array(self.eos, dtype=np.int64)
        self.pad = gc.pad_token_id
        self.ngram = int(gc.no_repeat_ngram_size or 0)
        self.min_length = int(gc.min_length or 0) if self.eos else 0
        self.rep_penalty = gc.repetition_penalty if gc.repetition_penalty not in (None, 1.0) else None
        self.forced_bos = gc.forced_bos_token_id
        self.forced_eos = _as_list(gc.forced_eos_token_id) if gc.forced_eos_token_id is not None else None
        self.bad_single: list[int] = []
        self.bad_multi: list[tuple[list[int], int]] = []
        if gc.bad_words_ids is not None:
            for seq in gc.bad_words_ids:  # Hugging Face drops bad words that are a lone EOS
                if any(list(seq) == [e] for e in self.eos):
                    continue
                if len(seq) == 1:
                    self.bad_single.append(int(seq[0]))
                else:
                    self.bad_multi.append(([int(t) for t in seq[:-1]], int(seq[-1])))

    def is_eos(self, tokens: np.ndarray) -> np.ndarray:
        if len(self.eos) == 1:
            return tokens == self.eos[0]
        return (tokens[..., None] == self.eos_arr).any(axis=-1)

    # Hugging Face's processor order: repetition penalty, no-repeat n-gram, bad words,
    # min length, forced BOS, forced EOS.
    def process(self, seqs: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Apply the logits processors in place; ``seqs`` [N, cur_len] are the sequences so far."""
        cur_len = seqs.shape[1]
        if self.rep_penalty is not None:
            p = np.float32(self.rep_penalty)
            for r in range(seqs.shape[0]):
                toks = np.unique(seqs[r])
                s = scores[r, toks]
                scores[r, toks] = np.where(s < 0, s * p, s / p)
        if self.ngram > 0 and cur_len + 1 >= self.ngram:
            n = self.ngram
            for r, row in enumerate(seqs.tolist()):
                prefix = row[cur_len - n + 1:]
                banned = [row[i + n - 1] for i in range(cur_len - n + 1) if row[i:i + n - 1] == prefix]
                if banned:
                    scores[r, banned] = -np.inf
        if self.bad_single:
            scores[:, self.bad_single] = -np.inf
        for prefix, last in self.bad_multi:
            if len(prefix) + 1 <= cur_len:
                hit = (seqs[:, cur_len - len(prefix):] == np.array(prefix)).all(axis=1)
                scores[hit, last] = -np.inf
        if cur_len < self.min_length:
            scores[:, self.eos] = -np.inf
        if self.forced_bos is not None and cur_len == 1:
            scores[:] = -np.inf
            scores[:, self.forced_bos] = 0
        if self.forced_eos is not None and cur_len == self.max_length - 1:
            scores[:] = -np.inf
            scores[:, self.forced_eos] = 0
        return scores

    def greedy(self, enc: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Hugging Face's greedy search (``_sample`` without sampling)."""
        model, b = self.model, enc.shape[0]
        if (self.gc.num_return_sequences or 1) != 1:
            raise ValueError("greedy search returns one sequence per input: pass num_return_sequences=1 "
                             "or num_beams > 1")
        seqs = np.empty((b, self.max_length), dtype=np.int64)
        seqs[:, 0] = self.start
        cur = 1
        has_eos = bool(self.eos)
        unfinished = np.ones(b, dtype=bool)
        static = model._static_feeds(enc, mask)
        ids_type = model._first_io.ids_type
        cache = None
        while True:
            step_ids = (seqs[:, cur - 1:cur] if model.uses_cache else seqs[:, :cur]).astype(ids_type)
            logits, cache = model._step(step_ids, static, cache)
            scores = self.process(seqs[:, :cur], np.asarray(logits, dtype=np.float32))
            nxt = scores.argmax(axis=-1)
            if has_eos:
                nxt = np.where(unfinished, nxt, self.pad)
                unfinished &= ~self.is_eos(nxt)
            seqs[:, cur] = nxt
            cur += 1
            if cur >= self.max_length or not unfinished.any():
                return seqs[:, :cur]

    def beam_search(self, enc: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Hugging Face's vectorized beam search (transformers 4.57 ``_beam_search``), in numpy."""
        model, gc = self.model, self.gc
        nb, b = int(gc.num_beams), enc.shape[0]
        max_length = self.max_length
        early_stopping = gc.early_stopping
        lp_exp = float(gc.length_penalty if gc.length_penalty is not None else 1.0)
        nrs = int(gc.num_return_sequences or 1)
        keep = max(2, 1 + len(self.eos)) * nb
        top_mask = np.zeros(keep, dtype=bool)
        top_mask[:nb] = True
        # Hugging Face: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1`.
        fill = (self.pad if self.pad else self.eos[0]) if self.eos else -1
        prompt = 1
        rows = np.arange(b)[:, None]

        enc = np.repeat(enc, nb, axis=0)
        mask = np.repeat(mask, nb, axis=0)
        running = np.full((b, nb, max_length), fill, dtype=np.int64)
        running[:, :, 0] = self.start
        sequences = running.copy()
        running_scores = np.zeros((b, nb), dtype=np.float32)
        running_scores[:, 1:] = _NEG
        beam_scores = np.full((b, nb), _NEG, dtype=np.float32)
        finished = np.zeros((b, nb), dtype=bool)
        unsatisfied = np.ones((b, 1), dtype=bool)
        running_idx = np.full((b, nb, max_length - prompt), -1, dtype=np.int32)
        beam_idx = running_idx.copy()
        static = model._static_feeds(enc, mask)
        ids_type = model._first_io.ids_type
        cache = None
        cur = prompt
        while True:
            flat = running[:, :, :cur].reshape(b * nb, cur)
            logits, cache = model._step((flat[:, -1:] if model.uses_cache else flat).astype(ids_type), static, cache)
            vocab = logits.shape[-1]
            logp = self.process(flat, _log_softmax(logits.astype(np.float32, copy=False)))
            logp = (logp.reshape(b, nb, vocab) + running_scores[:, :, None]).reshape(b, nb * vocab)

            # top-k continuations
            top = _topk(logp, keep)
            top_lp = np.take_along_axis(logp, top, axis=1)
            src = top // vocab
            tok = top % vocab
            top_seq = running[rows, src]  # [b, keep, max_length]
            top_idx = running_idx[rows, src]
            top_seq[:, :, cur] = tok
            top_idx[:, :, cur - prompt] = src + rows * nb
            hits = self.is_eos(tok) | (cur + 1 >= max_length)

            # running beams for the next step: the best that did not stop
            run_lp = top_lp + hits.astype(np.float32) * _NEG
            nxt = _topk(run_lp, nb)
            running = np.take_along_axis(top_seq, nxt[:, :, None], axis=1)
            running_scores = np.take_along_axis(run_lp, nxt, axis=1)
            running_idx = np.take_along_axis(top_idx, nxt[:, :, None], axis=1)

            # finished beams: add the ones that just stopped, if they beat the kept ones
            just = hits & top_mask[None, :]
            fin_lp = top_lp / np.float32((cur + 1 - prompt) ** lp_exp)
            full = finished.all(axis=-1, keepdims=True) & (early_stopping is True)
            fin_lp = fin_lp + full.astype(np.float32) * _NEG
            fin_lp = fin_lp + (~unsatisfied).astype(np.float32) * _NEG
            fin_lp = fin_lp + (~just).astype(np.float32) * _NEG
            merged_scores = np.concatenate([beam_scores, fin_lp], axis=1)
            best = _topk(merged_scores, nb)
            sequences = np.take_along_axis(np.concatenate([sequences, top_seq], axis=1), best[:, :, None], axis=1)
            beam_scores = np.take_along_axis(merged_scores, best, axis=1)
            beam_idx = np.take_along_axis(np.concatenate([beam_idx, top_idx], axis=1), best[:, :, None], axis=1)
            finished = np.take_along_axis(np.concatenate([finished, just], axis=1), best, axis=1)

            if cache is not None:
                cache.reorder(running_idx[:, :, cur - prompt].reshape(-1))
            cur += 1

            # early-stop heuristic and loop condition
            if early_stopping == "never" and lp_exp > 0.0:
                best_len = max_length - prompt
            else:
                best_len = cur - prompt
            best_running = running_scores[:, :1] / np.float32(best_len ** lp_exp)
            worst_finished = np.where(finished, beam_scores.min(axis=1, keepdims=True), _NEG)
            unsatisfied = unsatisfied & (best_running > worst_finished).any(axis=-1, keepdims=True)
            open_beam = not (finished.all() and early_stopping is True)
            if not (unsatisfied.any() and open_beam and not hits.all()):
                break

        sequences = sequences[:, :nrs].reshape(b * nrs, max_length)
        beam_idx = beam_idx[:, :nrs].reshape(b * nrs, -1)
        generated = int((beam_idx != -1).sum(axis=1).max())
        return np.ascontiguousarray(sequences[:, :prompt + generated])
