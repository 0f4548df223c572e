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

This module is the ONNX Runtime plumbing (sessions, feeds, the key/value cache); the
generation-config rules are :mod:`dqtool.runtimes.genconfig`'s and the searches
:mod:`dqtool.runtimes.search`'s.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from dqtool.base.errors import DQToolError
from dqtool.formats import onnx as onnx_format
from dqtool.formats.onnx import DECODER_FILE, ENCODER_FILE, MERGED_FILE, WITH_PAST_FILE, graph_folder
from dqtool.runtimes.genconfig import as_list, resolve_generation_config
from dqtool.runtimes.search import beam_search, greedy


_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")
_PRESENT_RE = re.compile(r"^present\.(\d+)\.(decoder|encoder)\.(key|value)$")
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}

LUT_GEMM_CONFIG = "mlas.use_lut_gemm"   # onnxruntime >= 1.32: T-MAC lookup-table kernel for 2-bit MatMulNBits


def lut_gemm_of(folder: str | os.PathLike) -> bool:
    """Whether ``dqtool export --lut-gemm`` asked for the lookup-table kernel (export.json)."""
    f = Path(folder) / "export.json"
    if not f.is_file():
        return False
    try:
        return bool(json.loads(f.read_text()).get("session_options", {}).get("use_lut_gemm", False))
    except (OSError, ValueError):
        return False


SPIN_CONFIG = "session.intra_op.allow_spinning"


def session_options(threads: int | None = None, lut_gemm: bool = False, spinning: bool = True):
    """ONNX Runtime session options used for every session here.

    All graph optimizations, ``threads`` intra-op threads (``None``: ONNX Runtime's default,
    one per physical core), one inter-op thread, sequential execution; ``lut_gemm`` turns on
    onnxruntime's lookup-table kernel for eligible 2-bit MatMulNBits (``mlas.use_lut_gemm``).
    ``spinning=False`` lets the session's idle threads sleep at once instead of spinning: for a
    session that runs once and hands over to another (the encoder before the decoder steps),
    whose spinning threads would otherwise take the cores from the next session's first runs.
    Measured (BART-base 6-3 2-2-8 generation graph, 2 threads on 2 vCPUs, batch 1): 107 ms after
    a spinning encoder session's run vs 73 ms after a sleeping one; the generation session itself
    keeps spinning (65 ms spinning, 85-95 ms not).

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
    if not spinning:
        so.add_session_config_entry(SPIN_CONFIG, "0")
    if lut_gemm:
        # Opt-in T-MAC kernel: 2-bit MatMulNBits whose K and block are multiples of 32 and N of
        # 128 run from activation lookup tables (its own, coarser, activation rounding).
        so.add_session_config_entry(LUT_GEMM_CONFIG, "1")
    return so


def load_onnx(folder: str | os.PathLike, threads: int | None = None, providers=None, decoder: str = "merged"):
    """``(model, tokenizer_or_None)`` of an exported folder, like the other loaders of ``dqtool eval``.

    A ``dqtool export`` folder is checked against its manifest first (a plain optimum export
    has none, see :mod:`dqtool.formats.onnx`).

    Example (needs an exported folder, so not run as a doctest)::
        model, tok = load_onnx("runs/onnx-2-2-8", threads=1)
        model.generate(**tok(["some text"], return_tensors="pt"), num_beams=4)
    """
    onnx_format.verify(folder)
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
        lut = lut_gemm_of(p)
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]

        def session(name: str):
            # the encoder runs once per generation and hands over to the decoder: its threads sleep
            so = session_options(threads, lut_gemm=lut, spinning=name != ENCODER_FILE)
            try:
                return ort.InferenceSession(str(p / name), sess_options=so, providers=providers)
            except Exception as e:  # onnxruntime raises its own (unexported) exception types
                # ORT's messages run over several lines ("[ONNXRuntimeError] : 1 : FAIL : ...\n..."): keep one.
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                reason = " ".join(lines)[:300] if lines else type(e).__name__
                raise DQToolError(f"ONNX Runtime cannot load {p / name} ({reason}): the folder is truncated or "
                                  f"damaged; re-export it") from e

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

    def start_decoding(self, enc: np.ndarray, mask: np.ndarray) -> "Decoding":
        """The decoder state of one generation over ``enc`` [N, S, d] / ``mask`` [N, S]."""
        return Decoding(self, enc, mask)

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
        gc = resolve_generation_config(self, generation_config, dict(
            num_beams=num_beams, max_length=max_length, max_new_tokens=max_new_tokens, min_length=min_length,
            length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            early_stopping=early_stopping, do_sample=do_sample, **kwargs))
        ids = _to_numpy(input_ids).astype(np.int64, copy=False)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, source_length], got shape {tuple(ids.shape)}")
        if attention_mask is None:
            # Hugging Face: the mask is inferred from the pad token when it is in the input and is not EOS.
            pad, eos = gc.pad_token_id, as_list(gc.eos_token_id)
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
            search = greedy if gc.num_beams == 1 else beam_search
            out = search(self.start_decoding, enc, mask, gc)
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


# ---------------------------------------------------------------------- internals

class Decoding:
    """One generation's decoder state for :mod:`dqtool.runtimes.search`: the feeds that stay
    the same (encoder output and mask) and the key/value cache, advanced one token per
    :meth:`step`."""

    def __init__(self, model: OnnxSeq2Seq, enc: np.ndarray, mask: np.ndarray):
        self.model = model
        self.static = model._static_feeds(enc, mask)
        self.ids_type = model._first_io.ids_type
        self.cache: KVCache | None = None

    def step(self, seqs: np.ndarray) -> np.ndarray:
        """Next-token logits [N, V] after ``seqs`` [N, cur] (the whole prefix when the folder
        has no cache decoder; only the last token otherwise)."""
        ids = seqs[:, -1:] if self.model.uses_cache else seqs
        logits, self.cache = self.model._step(ids.astype(self.ids_type), self.static, self.cache)
        return logits

    def reorder(self, rows: np.ndarray) -> None:
        """Beam search moved rows: row ``i`` continues old row ``rows[i]``."""
        if self.cache is not None:
            self.cache.reorder(rows)


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
