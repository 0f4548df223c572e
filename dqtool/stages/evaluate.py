"""``dqtool eval``: generate on a data split and score it.

Model folders are recognised by what they hold (:func:`dqtool.formats.detect`, most specific
first): an ONNX folder (``dqtool export``, run by :mod:`dqtool.runtimes.ort`), a packed
folder (integer weights, ``dqtool convert``), a QAT folder (fake quantization applied) or a
Hugging Face folder (teacher or distilled student), each checked against its manifest and
loaded by :func:`dqtool.runtimes.load.load_model`. Whatever it returns only needs Hugging
Face's ``generate(input_ids=, attention_mask=, **kwargs)`` and a ``config``.

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

import torch

from dqtool.base.config_error import ConfigError
from dqtool.base.errors import DQToolError
from dqtool.data.metrics import METRICS, score
from dqtool.data.pairs import DataConfig, load_pairs
from dqtool.model.registry import position_limit
from dqtool.model.packed import MATMULS
from dqtool.runtimes.load import load_model
from dqtool.runtimes.textgen import generate_texts

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
        dqtool.base.config_error.ConfigError: --num-beams must be at least 1, got 0
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
    matmul: str = "float"   # packed folders: float (the QAT logits bit for bit) | integer (int8 x codes, faster)

    def __post_init__(self):
        # Paths and lists are accepted from Python callers; store the JSON-friendly forms.
        object.__setattr__(self, "data", str(self.data))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        for name in ("num_beams", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{{{name}}} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.min_length <= self.max_length:
            raise ConfigError(f"{{min_length}} must be between 0 and {{max_length}} {self.max_length}, got {self.min_length}")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"{{no_repeat_ngram_size}} must be 0 (off) or more, got {self.no_repeat_ngram_size}")
        if not math.isfinite(self.length_penalty):
            raise ConfigError(f"{{length_penalty}} must be a finite number, got {self.length_penalty}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"{{max_samples}} must be at least 1, got {self.max_samples}")
        if not self.metrics:
            raise ConfigError(f"{{metrics}} is empty: name at least one of {', '.join(METRICS)}")
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ConfigError(f"{{metrics}} '{bad[0]}' is not supported: choose from {', '.join(METRICS)}")
        if self.matmul not in MATMULS:
            raise ConfigError(f"{{matmul}} '{self.matmul}' is not supported: choose {' or '.join(MATMULS)}")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ConfigError(f"{{device}} '{self.device}' is not a torch device: use cpu, cuda or cuda:N") from e

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


# --------------------------------------------------------------------------- generation

def generate(model, tok, sources: list[str], cfg: EvalConfig, max_source_length: int) -> list[str]:
    """Decoded generations for ``sources`` with ``cfg``'s settings, in input order
    (:func:`dqtool.runtimes.textgen.generate_texts`).

    Example (needs a model, so not run as a doctest)::
        preds = generate(model, tok, ["summarize: some text"], EvalConfig(data="d"), 512)
    """
    return generate_texts(model, tok, sources, cfg.generate_kwargs(), cfg.batch_size, cfg.device, max_source_length)


# --------------------------------------------------------------------------- evaluate

def _check_out_path(out_path: str | os.PathLike | None) -> Path | None:
    # Checked before loading anything, so a wrong --out costs no generation time.
    if out_path is None:
        return None
    out = Path(out_path)
    if out.is_dir():
        raise DQToolError(f"--out {out} is a folder: pass a file path such as {out / 'eval.json'}")
    if out.is_symlink() and not out.exists():
        raise DQToolError(f"--out {out} is a symlink to {os.readlink(out)}, which does not exist: remove the link or "
                          f"choose another path")
    from dqtool.base.fsutil import check_output_path, io_error

    check_output_path(out, "--out")
    # Can a file be written there at all (permissions, read-only or full disk)? Found out now,
    # not after the generation.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise io_error(e, out, hint="nothing was generated") from e
    return out


def _write_json_atomic(out: Path, payload: dict) -> None:
    # A temp file in the same folder, then os.replace: readers never see half a file.
    out.parent.mkdir(parents=True, exist_ok=True)
    from dqtool.base.fsutil import apply_umask, io_error, is_write_error

    text = json.dumps(payload, indent=1, ensure_ascii=False) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise io_error(e, out) from e
    try:
        apply_umask(tmp, folder=False)  # mkstemp makes 0600; the JSON follows the umask like any file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if not is_write_error(e):
            raise
        scores = ", ".join(f"{k} {v:.2f}" for k, v in (payload.get("metrics") or {}).items())
        raise io_error(e, out, needed=len(text.encode()),
                       hint=f"{out} was not written" + (f" (scores: {scores})" if scores else "")) from e
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
    from dqtool.base.version import __version__
    from dqtool.formats.hf import describe_source

    out = _check_out_path(out_path)
    dcfg = cfg.data_cfg if cfg.max_samples is None else replace(cfg.data_cfg, max_rows=cfg.max_samples)
    pairs = load_pairs(cfg.data, cfg.split, dcfg)  # data errors surface before the model loads
    t0 = time.perf_counter()
    model, tok, kind = load_model(source, cfg.device, matmul=cfg.matmul)  # detected and verified (dqtool.formats)
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
