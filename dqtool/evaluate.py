"""``dqtool eval``: generate on a data split and score it.

Model folders are recognised by what they hold (:data:`MODEL_KINDS`, most specific
first): an ONNX folder (``dqtool export``, run by :mod:`dqtool.ort_runtime`), a packed
folder (integer weights, ``dqtool convert``), a QAT folder (fake quantization applied) or a
Hugging Face folder (teacher or distilled student). Whatever a kind's loader returns only
needs Hugging Face's ``generate(input_ids=, attention_mask=, **kwargs)`` and a ``config``.

Presets are the generation settings of the DQ-BART code (``run_summarization_no_trainer.py``
sets them per data set) and of the fine-tuned BART checkpoints' ``task_specific_params``:
``xsum`` = 6 beams, 11..62 tokens, length penalty 1.0; ``cnndm`` = 4 beams, 56..142
tokens, length penalty 2.0. Both add no repeated trigrams: the DQ-BART code does not
pass it, but BART's configs set ``no_repeat_ngram_size=3``, which ``generate`` then
uses; fairseq's BART README uses the same settings (its lengths are 2 lower because
fairseq does not count BOS/EOS). ``greedy`` is one beam, for fast checks.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from dqtool.data import DataConfig, load_pairs
from dqtool.errors import DQToolError
from dqtool.metrics import METRICS, score

PRESETS = {
    "greedy": dict(num_beams=1, max_length=64, min_length=0, length_penalty=1.0, no_repeat_ngram_size=0),
    "xsum": dict(num_beams=6, max_length=62, min_length=11, length_penalty=1.0, no_repeat_ngram_size=3),
    "cnndm": dict(num_beams=4, max_length=142, min_length=56, length_penalty=2.0, no_repeat_ngram_size=3),
}


@dataclass(frozen=True)
class EvalConfig:
    """What to generate on and how.

    ``max_length``/``min_length`` count generated tokens as Hugging Face's ``generate``
    does for encoder-decoder models (the decoder start token included).

    Example:
        >>> EvalConfig.preset("xsum", data="d").num_beams
        6
        >>> EvalConfig(data="d", num_beams=0)
        Traceback (most recent call last):
        ...
        dqtool.errors.DQToolError: --num-beams must be at least 1, got 0
    """

    data: str
    split: str = "test"
    data_cfg: DataConfig = field(default_factory=DataConfig)
    num_beams: int = 1
    max_length: int = 64
    min_length: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 32
    max_samples: int | None = None
    metrics: tuple[str, ...] = ("rouge",)
    device: str = "cpu"

    def __post_init__(self):
        # Paths and lists are accepted from Python callers; store the JSON-friendly forms.
        object.__setattr__(self, "data", str(self.data))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        for name in ("num_beams", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise DQToolError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.min_length <= self.max_length:
            raise DQToolError(f"--min-length must be between 0 and --max-length {self.max_length}, got {self.min_length}")
        if self.no_repeat_ngram_size < 0:
            raise DQToolError(f"--no-repeat-ngram-size must be 0 (off) or more, got {self.no_repeat_ngram_size}")
        if not math.isfinite(self.length_penalty):
            raise DQToolError(f"--length-penalty must be a finite number, got {self.length_penalty}")
        if self.max_samples is not None and self.max_samples < 1:
            raise DQToolError(f"--max-samples must be at least 1, got {self.max_samples}")
        if not self.metrics:
            raise DQToolError(f"--metrics is empty: name at least one of {', '.join(METRICS)}")
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise DQToolError(f"--metrics '{bad[0]}' is not supported: choose from {', '.join(METRICS)}")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise DQToolError(f"--device '{self.device}' is not a torch device: use cpu, cuda or cuda:N") from e

    @classmethod
    def preset(cls, name: str, **kw) -> "EvalConfig":
        """A config from a preset's generation settings, any of them overridden by ``kw``.

        Example:
            >>> EvalConfig.preset("cnndm", data="d", num_beams=2).length_penalty
            2.0
        """
        if name not in PRESETS:
            raise DQToolError(f"--preset '{name}' is unknown: choose {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **kw})

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate``.

        Example:
            >>> EvalConfig(data="d").generate_kwargs()["do_sample"]
            False
        """
        # early_stopping=True (stop when num_beams hypotheses are done) as in BART's configs.
        return dict(num_beams=self.num_beams, max_length=self.max_length, min_length=self.min_length,
                    length_penalty=self.length_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
                    do_sample=False, early_stopping=self.num_beams > 1)


@dataclass
class EvalResult:
    """Scores, row-aligned predictions/references/ids and timing of one evaluation."""

    metrics: dict
    predictions: list[str]
    references: list[str]
    seconds: float  # generation only (tokenizing, generate, decoding), not model loading
    model_kind: str
    ids: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    source_max_length: int = 0  # source tokens kept: --source-max-length capped by the model's positions

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "samples": len(self.predictions), "seconds": round(self.seconds, 3),
                "load_seconds": round(self.load_seconds, 3), "model_kind": self.model_kind,
                "source_max_length": self.source_max_length}


# --------------------------------------------------------------------------- model kinds

@dataclass(frozen=True)
class ModelKind:
    """One kind of model folder ``dqtool eval`` accepts.

    ``detect(path)`` says whether a folder is of this kind; ``load(source)`` returns
    ``(model, tokenizer_or_None)`` where ``model`` has HF ``generate`` and ``config``.
    """

    name: str
    accepts: str  # for the error listing what is accepted
    detect: Callable[[Path], bool]
    load: Callable[[str], tuple]


def _is_qat(p: Path) -> bool:
    from dqtool.qat import is_qat_folder

    return is_qat_folder(p)


def _load_qat(source: str):
    from dqtool.qat import load_qat
    from dqtool.weight_cache import set_weight_cache

    model, tok = load_qat(source)
    set_weight_cache(model, "model")  # fake-quantize each weight once, not on every forward
    return model, tok


def _load_hf(source: str):
    from dqtool.loading import load_seq2seq

    return load_seq2seq(source)


def _is_packed(p: Path) -> bool:
    from dqtool.convert import is_packed_folder

    return is_packed_folder(p)


def _load_packed(source: str):
    from dqtool.convert import load_packed

    return load_packed(source)


def _is_onnx(p: Path) -> bool:
    from dqtool.ort_runtime import is_onnx_folder

    return is_onnx_folder(p)


def _load_onnx(source: str):
    from dqtool.manifest import read_manifest, verify_folder
    from dqtool.ort_runtime import load_onnx

    if read_manifest(source) is not None:
        verify_folder(source, "export")  # a dqtool export: truncated/edited files fail here
    return load_onnx(source, threads=torch.get_num_threads())


# Most specific first: a QAT folder is also a valid HF folder (its fake quantization
# would silently be dropped if the HF loader saw it first).
MODEL_KINDS: list[ModelKind] = [
    ModelKind("onnx", "a 'dqtool export' / optimum ONNX folder (encoder_model.onnx)", _is_onnx, _load_onnx),
    ModelKind("packed", "a 'dqtool convert' output (packing.json)", _is_packed, _load_packed),
    ModelKind("qat", "a 'dqtool qat' output (quantization.json)", _is_qat, _load_qat),
    ModelKind("hf", "a Hugging Face model folder (config.json + weights)", lambda p: (p / "config.json").is_file(),
              _load_hf),
]


def model_kind(source: str | os.PathLike) -> str:
    """Name of the :class:`ModelKind` of ``source``; a hub id (not a folder) is ``hf``.

    Example:
        >>> import tempfile
        >>> model_kind(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        dqtool.errors.DQToolError: ... is not a model folder: pass a 'dqtool export' / optimum ONNX folder (encoder_model.onnx) or a 'dqtool convert' output (packing.json) or a 'dqtool qat' output (quantization.json) or a Hugging Face model folder (config.json + weights)
    """
    p = Path(source)
    if not p.is_dir():
        return "hf"  # a hub id or a wrong path: load_seq2seq gives the offline / not-found error
    for kind in MODEL_KINDS:
        if kind.detect(p):
            return kind.name
    raise DQToolError(f"{p} is not a model folder: pass " + " or ".join(k.accepts for k in MODEL_KINDS))


def load_for_eval(source: str | os.PathLike, device: str = "cpu"):
    """``(model, tokenizer, kind)`` ready for ``generate`` on ``device``.

    Example (needs a real folder, so not run as a doctest)::
        model, tok, kind = load_for_eval("runs/qat-2-2-8")   # kind == "qat"
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise DQToolError(f"--device {device} but no CUDA GPU is visible here: pass --device cpu")
    name = model_kind(source)
    kind = next(k for k in MODEL_KINDS if k.name == name)
    model, tok = kind.load(str(source))
    if tok is None:
        raise DQToolError(f"{source} has no tokenizer files: save the tokenizer into the model folder "
                          f"(tokenizer.save_pretrained)")
    return model.to(device).eval(), tok, name


def position_limit(model) -> int | None:
    """Most tokens the model's position table holds, or ``None`` when unbounded.

    BART/mBART (learned) and Marian/Pegasus (sinusoidal) positions are a table of
    ``max_position_embeddings`` rows; a longer input is an index error deep in torch.
    T5's relative positions have no table.

    Example:
        >>> from transformers import BartConfig
        >>> class M: config = BartConfig(max_position_embeddings=256)
        >>> position_limit(M)
        256
    """
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) in ("t5", "mt5", "umt5", "longt5"):
        return None
    return getattr(cfg, "max_position_embeddings", None)


# --------------------------------------------------------------------------- generation

def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to ``ids [B, S]`` and ``mask [B, S]`` (1 = real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, sl] = torch.tensor(s, dtype=torch.long)
        mask[row, sl] = 1
    return ids, mask


def generate(model, tok, sources: list[str], cfg: EvalConfig, max_source_length: int) -> list[str]:
    """Decoded generations for ``sources``, in input order.

    Rows are generated longest first, so batches hold similar lengths (little padding)
    and an out-of-memory batch size fails on the first batch, not the last.

    Example (needs a model, so not run as a doctest)::
        preds = generate(model, tok, ["summarize: some text"], EvalConfig(data="d"), 512)
    """
    enc = tok(sources, max_length=max_source_length, truncation=True)["input_ids"]
    # Stable sort: equal lengths keep input order, so the batches are reproducible.
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    left = getattr(tok, "padding_side", "right") == "left"
    out: list[str] = [""] * len(sources)
    with torch.inference_mode():
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            ids, mask = _pad([enc[i] for i in idx], pad_id, left)  # [B, S], [B, S]
            gen = model.generate(input_ids=ids.to(cfg.device), attention_mask=mask.to(cfg.device),
                                 **cfg.generate_kwargs())  # [B, T]
            for i, text in zip(idx, tok.batch_decode(gen, skip_special_tokens=True)):
                out[i] = text.strip()
    return out


# --------------------------------------------------------------------------- evaluate

def _check_out_path(out_path: str | os.PathLike | None) -> Path | None:
    # Checked before loading anything, so a wrong --out costs no generation time.
    if out_path is None:
        return None
    out = Path(out_path)
    if out.is_dir():
        raise DQToolError(f"--out {out} is a folder: pass a file path such as {out / 'eval.json'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise DQToolError(f"--out {out}: {out.parent} is a file, not a folder; choose another path")
    return out


def _write_json_atomic(out: Path, payload: dict) -> None:
    # A temp file in the same folder, then os.replace: readers never see half a file.
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluate_model(source: str | os.PathLike, out_path: str | os.PathLike | None, cfg: EvalConfig) -> EvalResult:
    """Generate on ``cfg.split`` of ``cfg.data``, score, and optionally write JSON.

    The JSON holds the metrics, the config, the model (path, kind, weight hashes), the
    data file, the number of samples, timings, the dqtool version, and the predictions
    with their row ids.

    Example (needs real folders, so not run as a doctest)::
        r = evaluate_model("runs/student", "eval.json", EvalConfig(data="dqtool/assets/data/debian_synopsis"))
        r.metrics["rougeL"]
    """
    from dqtool import __version__
    from dqtool.loading import describe_source

    out = _check_out_path(out_path)
    dcfg = cfg.data_cfg if cfg.max_samples is None else replace(cfg.data_cfg, max_rows=cfg.max_samples)
    pairs = load_pairs(cfg.data, cfg.split, dcfg)  # data errors surface before the model loads
    t0 = time.perf_counter()
    model, tok, kind = load_for_eval(source, cfg.device)
    load_seconds = time.perf_counter() - t0
    limit = position_limit(model)
    if limit is not None and cfg.max_length > limit:
        raise DQToolError(f"--max-length {cfg.max_length} is more than the {limit} positions of {source}: "
                          f"pass --max-length {limit} or less")
    # Longer sources are truncated anyway (--source-max-length); cap at the model's table.
    src_len = dcfg.source_max_length if limit is None else min(dcfg.source_max_length, limit)
    t0 = time.perf_counter()
    preds = generate(model, tok, [dcfg.prefix + s for s in pairs.sources], cfg, src_len)
    seconds = time.perf_counter() - t0
    result = EvalResult(score(preds, pairs.targets, cfg.metrics), preds, pairs.targets, seconds, kind,
                        ids=list(pairs.ids), load_seconds=load_seconds, source_max_length=src_len)
    if out is not None:
        payload = {"dqtool_version": __version__, "model": {**describe_source(source), "model_kind": kind},
                   **result.to_json(),
                   "data": {"path": cfg.data, "split": cfg.split, "file": pairs.path},
                   "config": asdict(cfg), "ids": result.ids, "predictions": preds}
        _write_json_atomic(out, payload)
    return result
