"""Stage 2, ``qat``: quantization-aware fine-tuning of the student, distilled from the teacher.

    student folder (distill) + teacher --HF Trainer, fake-quant, distillation--> QAT folder

Training runs on Hugging Face's ``Seq2SeqTrainer`` (so ``accelerate launch`` / torchrun
run it on several GPUs unchanged, with mixed precision, gradient accumulation,
checkpoints, resume, evaluation with generation metrics and best-checkpoint selection).
dqtool only adds the loss: :class:`DistillTrainer.compute_loss` runs the float teacher
under ``no_grad`` and combines the terms of :mod:`dqtool.losses`.

Checkpoints go to ``OUT.partial/``; ``--resume`` continues from the newest one there.
Only when training finished is the QAT folder assembled (temp folder + rename):

    config.json, model.safetensors   the float weights (a plain HF checkpoint)
    quantization.json                the W-E-A scheme (fake quant is applied on load)
    quantizers.safetensors           learned quantizer tensors (PACT clips), if any
    tokenizer files, generation_config.json, training_log.json, dqtool-manifest.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dqtool.errors import DQToolError
from dqtool.losses import LossConfig, distill_losses
from dqtool.manifest import atomic_output, check_output, hash_folder, read_manifest, sha256_file, write_manifest
from dqtool.qmodules import ATTN_IMPL, prepare, quantizer_state, strip_quantizer_state
from dqtool.registry import num_layers, spec_for
from dqtool.scheme import QuantScheme

SCHEME_FILE = "quantization.json"
QSTATE_FILE = "quantizers.safetensors"
PRECISIONS = ("auto", "no", "fp16", "bf16")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
TARGETS = ("data", "teacher")


@dataclass(frozen=True)
class QATConfig:
    """Everything the QAT stage needs besides its input and output folders.

    Example:
        >>> QATConfig(data="data/", max_steps=10).scheme.wea
        '8-8-8'
        >>> QATConfig(data="data/", batch_size=0)
        Traceback (most recent call last):
        ...
        dqtool.errors.DQToolError: --batch-size must be at least 1, got 0
    """

    data: str
    scheme: QuantScheme = field(default_factory=QuantScheme)
    losses: LossConfig = field(default_factory=LossConfig)
    train_split: str = "train"
    eval_split: str = "validation"
    source_field: str = "source"
    target_field: str = "target"
    prefix: str = ""
    source_max_length: int = 256
    target_max_length: int = 64
    max_train_samples: int | None = None
    on_too_long: str = "truncate"       # truncate | skip | error (rows over the max lengths)
    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    eval_steps: int | None = None       # None: evaluate once, at the end
    eval_samples: int = 200
    eval_beams: int = 1
    eval_max_length: int = 64
    save_steps: int = 200
    seed: int = 42
    precision: str = "auto"             # auto: bf16 on CUDA that supports it, else fp32
    logging_steps: int = 25
    targets: str = "data"               # data: the references | teacher: the teacher's outputs (sequence-level KD)
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward: less memory, ~30% slower
    teacher_dtype: str = "auto"         # auto: bfloat16 under bf16 mixed precision (GPU), else float32

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "save_steps", "eval_samples", "eval_beams",
                     "source_max_length", "target_max_length", "logging_steps", "eval_max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise DQToolError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if self.eval_steps is not None and (self.eval_steps < 1 or self.save_steps % self.eval_steps):
            raise DQToolError(f"--eval-steps {self.eval_steps} must be >= 1 and divide --save-steps "
                              f"{self.save_steps} (best-checkpoint selection needs an evaluation at every save)")
        if not self.learning_rate > 0:
            raise DQToolError(f"--lr must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise DQToolError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        from dqtool.data import TOO_LONG

        if self.on_too_long not in TOO_LONG:
            raise DQToolError(f"--on-too-long '{self.on_too_long}' is not supported: choose {', '.join(TOO_LONG)}")
        if self.targets not in TARGETS:
            raise DQToolError(f"--targets '{self.targets}' is not supported: choose {' or '.join(TARGETS)}")
        if self.precision not in PRECISIONS:
            raise DQToolError(f"--precision '{self.precision}' is not supported: choose {', '.join(PRECISIONS)}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise DQToolError(f"--teacher-dtype '{self.teacher_dtype}' is not supported: choose "
                              f"{', '.join(TEACHER_DTYPES)}")


@dataclass(frozen=True)
class QATResult:
    out_dir: Path
    steps: int
    seconds: float
    best_metric: float | None
    final_losses: dict


# --------------------------------------------------------------------------- loading

def load_qat(folder: str | os.PathLike, device: str | None = None):
    """``(model, tokenizer)`` of a QAT folder with its fake quantization applied.

    Example (needs real folders, so not run as a doctest)::
        model, tok = load_qat("runs/qat-2-2-8")
    """
    from safetensors.torch import load_file

    from dqtool.loading import load_seq2seq

    folder = Path(folder)
    scheme_path = folder / SCHEME_FILE
    if not scheme_path.is_file():
        raise DQToolError(f"{folder} has no {SCHEME_FILE}: it is not a QAT output folder")
    try:
        scheme = QuantScheme.from_dict(json.loads(scheme_path.read_text()))
    except ValueError as e:
        raise DQToolError(f"{scheme_path} is not valid JSON ({e}); re-run dqtool qat") from e
    model, tok = load_seq2seq(folder)
    prepare(model, scheme)
    qpath = folder / QSTATE_FILE
    if qpath.is_file():
        missing, unexpected = model.load_state_dict(load_file(qpath), strict=False)
        if unexpected:
            raise DQToolError(f"{qpath} holds unknown quantizer tensors {unexpected[:3]}: re-run dqtool qat")
    if device:
        model.to(device)
    return model.eval(), tok


def is_qat_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` was written by the QAT stage (holds quantization.json)."""
    return (Path(folder) / SCHEME_FILE).is_file()


def _layer_maps(student_dir: Path, student_cfg, teacher_cfg) -> dict[str, list[int]]:
    # The distill manifest says which teacher layer each student layer came from; a
    # student of the teacher's own depth without a manifest is matched layer for layer.
    manifest = read_manifest(student_dir)
    if manifest and "layer_map" in manifest:
        return {k: list(v) for k, v in manifest["layer_map"].items()}
    spec = spec_for(student_cfg)
    maps = {}
    for name, stack in spec.stacks().items():
        n_s, n_t = num_layers(student_cfg, stack), num_layers(teacher_cfg, stack)
        if n_s != n_t:
            raise DQToolError(f"{student_dir} has no distill manifest and {n_s} {name} layers vs the teacher's {n_t}: "
                              f"create the student with 'dqtool distill' so its layer map is known")
        maps[name] = list(range(n_s))
    return maps


def _teacher_source(student_dir: Path, teacher: str | None) -> str:
    if teacher:
        return str(teacher)
    manifest = read_manifest(student_dir) or {}
    src = manifest.get("inputs", {}).get("teacher", {})
    path = src.get("path") or src.get("id")
    if not path:
        raise DQToolError(f"no teacher given and {student_dir} does not record one: pass --teacher")
    return path


# --------------------------------------------------------------------------- data

class _Seq2SeqRows(torch.utils.data.Dataset):
    """Tokenized rows: dicts of input_ids / attention_mask / labels lists."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _tokenized(cfg: QATConfig, tokenizer, split: str, limit: int | None) -> _Seq2SeqRows:
    from dqtool.data import DataConfig, load_pairs, tokenize_pairs

    dcfg = DataConfig(source_field=cfg.source_field, target_field=cfg.target_field, prefix=cfg.prefix,
                      source_max_length=cfg.source_max_length, target_max_length=cfg.target_max_length,
                      max_rows=limit, on_too_long=cfg.on_too_long)
    pairs = load_pairs(cfg.data, split, dcfg, tokenizer)
    if pairs.skipped:
        print(f"{split}: skipped {pairs.skipped} rows longer than --source-max-length {cfg.source_max_length} / "
              f"--target-max-length {cfg.target_max_length} (--on-too-long skip)")
    return _Seq2SeqRows(tokenize_pairs(pairs, tokenizer, dcfg))


@torch.no_grad()
def teacher_targets(teacher, rows: _Seq2SeqRows, max_new_tokens: int, pad_id: int, batch_size: int = 64) -> int:
    """Sequence-level distillation (Kim & Rush, 2016): replace every row's labels with the
    teacher's own output for its source, decoded with the teacher's generation config
    (its beams, length limits) and at most ``max_new_tokens`` tokens. Returns how many
    rows' labels changed.

    Example (needs a trained teacher, so not run as a doctest)::
        changed = teacher_targets(teacher, train_rows, 64, tok.pad_token_id)
    """
    from dqtool.evaluate import _pad

    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))  # little padding per batch
    device = next(teacher.parameters()).device
    eos = teacher.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    labels: list[list[int]] = [[] for _ in range(len(rows))]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = _pad([rows[i]["input_ids"] for i in idx], pad_id, left=False)   # [B, S]
        gen = teacher.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                               max_new_tokens=max_new_tokens, do_sample=False)      # [B, 1 + T]
        for i, seq in zip(idx, gen[:, 1:].tolist()):   # drop the decoder start token
            cut = next((k + 1 for k, t in enumerate(seq) if t in eos), len(seq))
            labels[i] = seq[:cut]
    return _set_labels(rows, labels)


def _set_labels(rows: _Seq2SeqRows, labels: list[list[int]]) -> int:
    """Give row i the labels ``labels[i]``; returns how many rows changed."""
    changed = 0
    for row, lab in zip(rows, labels):
        changed += lab != row["labels"]
        row["labels"] = lab
    return changed


# --------------------------------------------------------------------------- trainer

def _make_trainer_class():
    from transformers import Seq2SeqTrainer, TrainerCallback

    class DistillTrainer(Seq2SeqTrainer):
        """Seq2SeqTrainer whose loss is DQ-BART's distillation objective."""

        def __init__(self, *a, teacher=None, loss_cfg: LossConfig, maps, **kw):
            super().__init__(*a, **kw)
            self.teacher, self.loss_cfg, self.maps = teacher, loss_cfg, maps
            self.last_terms: dict[str, float] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            lc = self.loss_cfg
            extra = dict(output_hidden_states=lc.needs_hidden, output_attentions=lc.needs_attention)
            s_out = model(**inputs, **extra)
            t_out = None
            if lc.needs_teacher:
                if self.teacher.device != s_out.logits.device:
                    self.teacher.to(s_out.logits.device)
                with torch.no_grad():
                    t_out = _as_dtype(self.teacher(**inputs, **extra), s_out.logits.dtype)
            labels = inputs["labels"]
            terms = distill_losses(s_out, t_out, lc, self.maps, inputs.get("attention_mask"), labels.ne(-100))
            if model.training:
                self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
            return (terms["total"], s_out) if return_outputs else terms["total"]

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self.last_terms:
                logs.update({f"loss_{k}": round(v, 6) for k, v in self.last_terms.items() if k != "total"})
            super().log(logs, *args, **kwargs)

    class StepSleep(TrainerCallback):
        """Debug throttle (env DQTOOL_DEBUG_STEP_SLEEP seconds per step): lets tests kill a run mid-way."""

        def __init__(self, seconds: float):
            self.seconds = seconds

        def on_step_end(self, args, state, control, **kw):
            time.sleep(self.seconds)

    return DistillTrainer, StepSleep


def _as_dtype(out, dtype: torch.dtype):
    """The teacher's float outputs in the student's dtype (a bf16 teacher beside a float32
    student): logits, hidden states and attentions, in place on the output object."""
    def cast(v):
        if isinstance(v, torch.Tensor):
            return v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v
        if isinstance(v, tuple):
            return tuple(cast(x) for x in v)
        return v

    for k in list(out.keys()):
        out[k] = cast(out[k])
    return out


def teacher_dtype(cfg: QATConfig) -> torch.dtype:
    """The frozen teacher's storage dtype: ``cfg.teacher_dtype``, or for ``auto`` bfloat16
    when training runs under bf16 autocast (its matmuls already compute in bf16 there, so
    its outputs stay what they were while its memory halves) and float32 otherwise (on
    CPU a bf16 teacher would change the distillation targets; fp16 risks overflow)."""
    if cfg.teacher_dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.teacher_dtype]
    return torch.bfloat16 if _precision(cfg).get("bf16") else torch.float32


def _unique_numel(params) -> int:
    # By object: tied weights share one Parameter (data pointers are all 0 on the meta device).
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def memory_estimate(model, t_model, cfg: QATConfig, train_ds):
    """:func:`dqtool.memory.estimate` for this run: the prepared student, the teacher as it
    will be held during training (None: not loaded), the longest rows of the data."""
    from dqtool.memory import estimate
    from dqtool.qmodules import QuantEmbedding, QuantLinear

    quantized = _unique_numel([m.weight for m in model.modules()
                               if (isinstance(m, QuantLinear) and m.wspec is not None)
                               or (isinstance(m, QuantEmbedding) and m.espec is not None)])
    src = max((len(r["input_ids"]) for r in train_ds), default=cfg.source_max_length)
    tgt = max((len(r["labels"]) for r in train_ds), default=cfg.target_max_length)
    prec = _precision(cfg)
    mixed = "bf16" if prec.get("bf16") else "fp16" if prec.get("fp16") else None
    lc = cfg.losses
    return estimate(model.config, student_params=_unique_numel(model.parameters()), quantized_params=quantized,
                    trainable_params=_unique_numel(p for p in model.parameters() if p.requires_grad),
                    teacher_params=_unique_numel(t_model.parameters()) if t_model is not None else 0,
                    teacher_bytes=next(t_model.parameters()).element_size() if t_model is not None else 4,
                    batch=cfg.batch_size, source_len=src, target_len=tgt,
                    device="cuda" if torch.cuda.is_available() else "cpu", mixed_precision=mixed,
                    checkpointing=cfg.gradient_checkpointing, kl=lc.logits > 0 and lc.logits_kind == "kl",
                    hidden_loss=lc.needs_hidden, attention_loss=lc.needs_attention)


def _precision(cfg: QATConfig) -> dict:
    if cfg.precision == "auto":
        if torch.cuda.is_available():
            return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
        return {}
    return {"fp16": True} if cfg.precision == "fp16" else {"bf16": True} if cfg.precision == "bf16" else {}


def _last_checkpoint(work: Path) -> str | None:
    """Newest *complete* ``checkpoint-N`` in ``work``.

    The Trainer writes ``trainer_state.json`` last, after the weights, optimizer,
    scheduler and RNG state; a run killed while saving leaves a folder without it, which
    transformers' ``get_last_checkpoint`` would still pick (and resume with a fresh
    optimizer). Such a folder is skipped here.
    """
    if not work.is_dir():
        return None
    done = [p for p in work.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _cached_teacher_targets(t_model, train_ds: _Seq2SeqRows, cfg: QATConfig, tok, teacher_src: str,
                            cache_dir: Path | None) -> int:
    """:func:`teacher_targets`, reusing the labels a run with the same teacher weights,
    generation config and tokenized training sources already generated
    (``cache_dir/teacher-targets-<key>.json``): the schemes of one ``dqtool compress`` run
    share one generation."""
    from dqtool.loading import describe_source

    # The tokenized sources stand for data, split, prefix, tokenizer and lengths at once.
    sources = hashlib.sha256(json.dumps([row["input_ids"] for row in train_ds]).encode()).hexdigest()
    key_doc = {"teacher": describe_source(teacher_src).get("weights_sha256") or teacher_src,
               "generation": t_model.generation_config.to_dict(), "sources": sources,
               "max_new_tokens": cfg.target_max_length}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir / f"teacher-targets-{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        labels = json.loads(path.read_text())
        if len(labels) == len(train_ds):
            print(f"targets: the teacher's outputs for {len(train_ds)} training rows, reused from {path}")
            return _set_labels(train_ds, labels)
    t0 = time.time()
    if torch.cuda.is_available():
        t_model.to("cuda")
    changed = teacher_targets(t_model, train_ds, cfg.target_max_length, tok.pad_token_id)
    print(f"targets: the teacher's outputs for {len(train_ds)} training rows ({changed} differ from the "
          f"references) in {time.time() - t0:.0f}s")
    if path is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([row["labels"] for row in train_ds]))
        os.replace(tmp, path)  # a killed run never leaves a half-written cache
    return changed


def qat(student: str | os.PathLike, out_dir: str | os.PathLike, cfg: QATConfig, teacher: str | None = None,
        force: bool = False, resume: bool = False, progress: bool = True,
        cache_dir: str | os.PathLike | None = None) -> QATResult:
    """Fine-tune ``student`` with fake quantization and distillation; write the QAT folder.

    ``cache_dir`` (optional) keeps the teacher's outputs of ``targets="teacher"`` for
    later runs with the same teacher, data and tokenization.

    Example (needs real folders, so not run as a doctest)::
        qat("runs/student", "runs/qat", QATConfig(data="data/", scheme=QuantScheme.from_wea("2-2-8")))
    """
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments, set_seed

    from dqtool.loading import describe_source, load_seq2seq

    out = check_output(out_dir, force)
    work = out.with_name(out.name + ".partial")
    checkpoint = _last_checkpoint(work)
    if work.exists() and not resume and not force:
        raise DQToolError(f"{work} holds an interrupted run: pass --resume to continue it or --force to start over")
    if resume and checkpoint is None:
        raise DQToolError(f"--resume given but {work} has no checkpoint: run without --resume")
    if work.exists() and not resume:
        shutil.rmtree(work)
    student_dir = Path(student)
    teacher_src = _teacher_source(student_dir, teacher)

    set_seed(cfg.seed)
    model, tok = load_seq2seq(student_dir)
    if tok is None:
        raise DQToolError(f"{student_dir} has no tokenizer files: save the tokenizer with the model")
    t_model = None
    if cfg.losses.needs_teacher or cfg.targets == "teacher":
        t_model, _ = load_seq2seq(teacher_src)
        if cfg.losses.needs_attention:
            t_model.config._attn_implementation = "eager"  # sdpa returns no attention probabilities
        t_model.eval().requires_grad_(False)
    maps = _layer_maps(student_dir, model.config, t_model.config if t_model is not None else model.config)
    if cfg.losses.needs_attention and model.config._attn_implementation != ATTN_IMPL:
        model.config._attn_implementation = "eager"
    prepare(model, cfg.scheme)

    train_ds = _tokenized(cfg, tok, cfg.train_split, cfg.max_train_samples)
    eval_ds = _tokenized(cfg, tok, cfg.eval_split, cfg.eval_samples) if cfg.eval_steps else None
    relabelled = None
    if cfg.targets == "teacher":
        relabelled = _cached_teacher_targets(t_model, train_ds, cfg, tok, teacher_src,
                                             Path(cache_dir) if cache_dir is not None else None)
        if not cfg.losses.needs_teacher:
            t_model = None  # only its outputs were needed
    if t_model is not None and teacher_dtype(cfg) != torch.float32:
        t_model.to(teacher_dtype(cfg))  # after generating targets: those come from the float32 teacher
    mem = memory_estimate(model, t_model, cfg, train_ds)
    print(f"memory estimate (peak) for training:\n{mem.describe()}", flush=True)

    from dqtool.metrics import score

    def compute_metrics(pred):
        import numpy as np

        preds = np.where(pred.predictions < 0, tok.pad_token_id, pred.predictions)
        labels = np.where(pred.label_ids < 0, tok.pad_token_id, pred.label_ids)
        p = tok.batch_decode(preds, skip_special_tokens=True)
        r = tok.batch_decode(labels, skip_special_tokens=True)
        return score(p, r, metrics=("rouge",))

    do_eval = cfg.eval_steps is not None
    args = Seq2SeqTrainingArguments(
        output_dir=str(work), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear", seed=cfg.seed, data_seed=cfg.seed, logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        eval_strategy="steps" if do_eval else "no", eval_steps=cfg.eval_steps,
        load_best_model_at_end=do_eval, metric_for_best_model="rougeL" if do_eval else None,
        greater_is_better=True if do_eval else None,
        predict_with_generate=True, generation_max_length=cfg.eval_max_length, generation_num_beams=cfg.eval_beams,
        report_to=[], disable_tqdm=not progress, dataloader_num_workers=0, save_safetensors=True,
        remove_unused_columns=False, gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        **_precision(cfg))
    DistillTrainer, StepSleep = _make_trainer_class()
    callbacks = []
    if os.environ.get("DQTOOL_DEBUG_STEP_SLEEP"):
        callbacks.append(StepSleep(float(os.environ["DQTOOL_DEBUG_STEP_SLEEP"])))
    trainer = DistillTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tok, model=None, label_pad_token_id=-100),
        processing_class=tok, compute_metrics=compute_metrics if do_eval else None, callbacks=callbacks,
        teacher=t_model, loss_cfg=cfg.losses, maps=maps)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=checkpoint if resume else None)
    seconds = time.time() - t0

    with atomic_output(out, force=force) as tmp:
        _save_qat(model, tok, tmp, cfg.scheme)
        log = trainer.state.log_history
        (tmp / "training_log.json").write_text(json.dumps(log, indent=1))
        best = trainer.state.best_metric
        final = {k: v for k, v in (log[-2] if len(log) > 1 else {}).items() if k.startswith("loss")}
        write_manifest(tmp, "qat",
                       inputs={"student": describe_source(student_dir), "teacher": describe_source(teacher_src),
                               "data": _describe_data(cfg)},
                       config=cfg,
                       extra={"layer_map": maps, "scheme": cfg.scheme.to_dict(), "wea": cfg.scheme.wea,
                              "steps": trainer.state.global_step, "seconds": round(seconds, 1),
                              "best_metric": best, "resumed_from": checkpoint if resume else None,
                              "teacher_relabelled_rows": relabelled,
                              "teacher_dtype": str(next(t_model.parameters()).dtype) if t_model is not None else None,
                              "memory_estimate_bytes": mem.parts})
    shutil.rmtree(work, ignore_errors=True)
    return QATResult(out, trainer.state.global_step, seconds, best, final)


def _describe_data(cfg: QATConfig) -> dict:
    # hash_folder keys by relative path, so nested datasets files cannot collide by name.
    p = Path(cfg.data)
    hashes = hash_folder(p, exclude=()) if p.is_dir() else {p.name: sha256_file(p)}
    return {"path": str(p.resolve()), "sha256": hashes}


def _save_qat(model, tok, folder: Path, scheme: QuantScheme) -> None:
    """Write the plain HF checkpoint, the scheme and the quantizer state into ``folder``."""
    from safetensors.torch import save_file

    state = model.state_dict()
    attn = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # not saved; keeps the HF folder loadable anywhere
    model.save_pretrained(folder, state_dict=strip_quantizer_state(model, state))
    model.config._attn_implementation = attn
    tok.save_pretrained(folder)
    (folder / SCHEME_FILE).write_text(scheme.dumps() + "\n")
    qstate = quantizer_state(model)
    if qstate:
        save_file({k: v.contiguous() for k, v in qstate.items()}, str(folder / QSTATE_FILE))
