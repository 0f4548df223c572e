"""``dqtool eval``: generate on a data split and score it.

Model folders are recognised by what they hold (:func:`load_for_eval`): a Hugging Face
folder (teacher or distilled student) or a QAT folder (fake quantization applied).
Later stages add packed-integer and ONNX folders to the same function.

Presets follow the generation settings of the BART / DQ-BART papers for their data
sets: ``xsum`` (6 beams, 11..62 tokens, length penalty 1.0) and ``cnndm`` (4 beams,
56..142 tokens, length penalty 2.0), both with no repeated trigrams; ``greedy`` is
one beam, for fast checks and for comparing runtimes token for token.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

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
        for name in ("num_beams", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise DQToolError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.min_length <= self.max_length:
            raise DQToolError(f"--min-length must be between 0 and --max-length {self.max_length}, got {self.min_length}")
        if self.max_samples is not None and self.max_samples < 1:
            raise DQToolError(f"--max-samples must be at least 1, got {self.max_samples}")
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise DQToolError(f"--metrics '{bad[0]}' is not supported: choose from {', '.join(METRICS)}")

    @classmethod
    def preset(cls, name: str, **kw) -> "EvalConfig":
        if name not in PRESETS:
            raise DQToolError(f"--preset '{name}' is unknown: choose {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **kw})

    def generate_kwargs(self) -> dict:
        return dict(num_beams=self.num_beams, max_length=self.max_length, min_length=self.min_length,
                    length_penalty=self.length_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
                    do_sample=False, early_stopping=self.num_beams > 1)


@dataclass
class EvalResult:
    metrics: dict
    predictions: list[str]
    references: list[str]
    seconds: float
    model_kind: str

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "samples": len(self.predictions), "seconds": round(self.seconds, 3),
                "model_kind": self.model_kind}


def model_kind(folder: str | os.PathLike) -> str:
    """What kind of model a folder holds: ``qat`` or ``hf`` (errors list what is accepted)."""
    from dqtool.qat import is_qat_folder

    p = Path(folder)
    if p.is_dir() and is_qat_folder(p):
        return "qat"
    if p.is_dir() and (p / "config.json").is_file():
        return "hf"
    if p.is_dir():
        raise DQToolError(f"{p} is not a model folder: pass a Hugging Face model folder (config.json + weights) "
                          f"or a dqtool qat output")
    return "hf"  # a hub id: load_seq2seq gives the offline error


def load_for_eval(source: str | os.PathLike, device: str = "cpu"):
    """``(model, tokenizer, kind)`` ready for ``generate``."""
    from dqtool.loading import load_seq2seq
    from dqtool.qat import load_qat

    kind = model_kind(source)
    model, tok = load_qat(source) if kind == "qat" else load_seq2seq(source)
    if tok is None:
        raise DQToolError(f"{source} has no tokenizer files: save the tokenizer into the model folder")
    return model.to(device).eval(), tok, kind


def generate(model, tok, sources: list[str], cfg: EvalConfig, max_source_length: int) -> list[str]:
    """Decoded generations for ``sources``, batched by length and returned in input order."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[str] = [""] * len(sources)
    with torch.inference_mode():
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            batch = tok([sources[i] for i in idx], max_length=max_source_length, truncation=True,
                        padding=True, return_tensors="pt").to(cfg.device)
            ids = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 **cfg.generate_kwargs())
            for i, text in zip(idx, tok.batch_decode(ids, skip_special_tokens=True)):
                out[i] = text.strip()
    return out


def evaluate_model(source: str | os.PathLike, out_path: str | os.PathLike | None, cfg: EvalConfig) -> EvalResult:
    """Generate on ``cfg.split`` of ``cfg.data``, score, and optionally write JSON.

    Example (needs real folders, so not run as a doctest)::
        evaluate_model("runs/student", "eval.json", EvalConfig(data="dqtool/assets/data/debian_synopsis"))
    """
    from dqtool import __version__
    from dqtool.loading import describe_source

    dcfg = cfg.data_cfg if cfg.max_samples is None else replace(cfg.data_cfg, max_rows=cfg.max_samples)
    pairs = load_pairs(cfg.data, cfg.split, dcfg)
    model, tok, kind = load_for_eval(source, cfg.device)
    t0 = time.perf_counter()
    preds = generate(model, tok, [dcfg.prefix + s for s in pairs.sources], cfg, dcfg.source_max_length)
    seconds = time.perf_counter() - t0
    result = EvalResult(score(preds, pairs.targets, cfg.metrics), preds, pairs.targets, seconds, kind)
    if out_path is not None:
        out = Path(out_path)
        payload = {"dqtool_version": __version__, "model": describe_source(source), **result.to_json(),
                   "data": {"path": str(cfg.data), "split": cfg.split, "file": pairs.path},
                   "config": _jsonable(cfg), "predictions": preds}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    return result


def _jsonable(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
