"""Stage 2, ``qat``: quantization-aware fine-tuning of the student, distilled from the teacher.

    student folder (distill) + teacher --HF Trainer, fake-quant, distillation--> QAT folder

Training runs on Hugging Face's ``Seq2SeqTrainer`` (so ``accelerate launch`` / torchrun
run it on several GPUs unchanged, with mixed precision, gradient accumulation,
checkpoints, resume, evaluation with generation metrics and best-checkpoint selection).
dqtool only adds the loss: :class:`DistillTrainer.compute_loss` runs the float teacher
under ``no_grad`` and combines the terms of :mod:`dqtool.model.losses`.

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

from dqtool.base.config_error import ConfigError
from dqtool.base.errors import DQToolError
from dqtool.base.progress import is_tty
from dqtool.model.losses import LossConfig, distill_losses
from dqtool.formats.manifest import atomic_output, check_output, read_manifest, write_manifest
from dqtool.formats.qat import save_qat
from dqtool.model.qmodules import ATTN_IMPL, prepare
from dqtool.model.registry import num_layers, spec_for
from dqtool.qmath.scheme import QuantScheme

from dqtool.base.fsutil import locked

RUN_FILE = "dqtool-run.json"      # in OUT.partial/: what the run was started with (setup, inputs, processes)
LOSS_FILE = "dqtool-loss.json"    # in each checkpoint: the sum of the step losses so far
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
        dqtool.base.config_error.ConfigError: --batch-size must be at least 1, got 0
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

    FLAGS = {"learning_rate": "--lr"}  # ClassVar: command-line flags that differ from the field names

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "save_steps", "eval_samples", "eval_beams",
                     "source_max_length", "target_max_length", "logging_steps", "eval_max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):   # True is not a step count
                raise ConfigError(f"{{{name}}} must be an integer, got {v!r}", self.FLAGS)
            if v < 1:
                raise ConfigError(f"{{{name}}} must be at least 1, got {v}", self.FLAGS)
        if self.eval_steps is not None and (self.eval_steps < 1 or self.save_steps % self.eval_steps):
            raise ConfigError(f"{{eval_steps}} {self.eval_steps} must be >= 1 and divide {{save_steps}} "
                              f"{self.save_steps} (best-checkpoint selection needs an evaluation at every save)")
        if not self.learning_rate > 0:
            raise ConfigError(f"{{learning_rate}} must be > 0, got {self.learning_rate}", self.FLAGS)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{{warmup_ratio}} must be in [0, 1), got {self.warmup_ratio}")
        from dqtool.data.pairs import TOO_LONG

        if self.on_too_long not in TOO_LONG:
            raise ConfigError(f"{{on_too_long}} '{self.on_too_long}' is not supported: choose {', '.join(TOO_LONG)}")
        if self.targets not in TARGETS:
            raise ConfigError(f"{{targets}} '{self.targets}' is not supported: choose {' or '.join(TARGETS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{{precision}} '{self.precision}' is not supported: choose {', '.join(PRECISIONS)}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(f"{{teacher_dtype}} '{self.teacher_dtype}' is not supported: choose "
                              f"{', '.join(TEACHER_DTYPES)}")


@dataclass(frozen=True)
class QATResult:
    out_dir: Path
    steps: int
    seconds: float
    best_metric: float | None
    final_losses: dict
    main: bool = True   # False on the other processes of a multi-process run (they write nothing)


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
    """Tokenized rows: dicts of input_ids / attention_mask / labels lists. ``with_index``:
    items also carry ``row_idx`` (the trainer records which rows it trained on)."""

    def __init__(self, rows: list[dict], with_index: bool = False):
        self.rows = rows
        self.with_index = with_index

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {**self.rows[i], "row_idx": int(i)} if self.with_index else self.rows[i]


def _tokenized(cfg: QATConfig, tokenizer, split: str, limit: int | None) -> _Seq2SeqRows:
    from dqtool.data.pairs import DataConfig, load_pairs, tokenize_pairs

    dcfg = DataConfig(source_field=cfg.source_field, target_field=cfg.target_field, prefix=cfg.prefix,
                      source_max_length=cfg.source_max_length, target_max_length=cfg.target_max_length,
                      max_rows=limit, on_too_long=cfg.on_too_long)
    pairs = load_pairs(cfg.data, split, dcfg, tokenizer)
    if pairs.skipped:
        print(f"{split}: skipped {pairs.skipped} rows longer than --source-max-length {cfg.source_max_length} / "
              f"--target-max-length {cfg.target_max_length} (--on-too-long skip)")
    return _Seq2SeqRows(tokenize_pairs(pairs, tokenizer, dcfg))


@torch.no_grad()
def generate_targets(teacher, rows: _Seq2SeqRows, indices: list[int], max_new_tokens: int, pad_id: int,
                     batch_size: int = 64) -> dict[int, list[int]]:
    """The teacher's output (decoder start token dropped, cut after EOS) for the sources of
    the rows ``indices``, ``{index: labels}``, with progress. Batches go longest source
    first (little padding); the result does not depend on the order of ``indices``."""
    from dqtool.runtimes.textgen import pad as _pad
    from dqtool.base.progress import Progress

    order = sorted(set(indices), key=lambda i: (-len(rows.rows[i]["input_ids"]), i))
    device = next(teacher.parameters()).device
    eos = teacher.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    labels: dict[int, list[int]] = {}
    with Progress(len(order), "teacher targets", unit="rows") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = _pad([rows.rows[i]["input_ids"] for i in idx], pad_id, left=False)   # [B, S]
            gen = teacher.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False)          # [B, 1 + T]
            for i, seq in zip(idx, gen[:, 1:].tolist()):   # drop the decoder start token
                cut = next((k + 1 for k, t in enumerate(seq) if t in eos), len(seq))
                labels[i] = seq[:cut]
            bar.update(len(idx))
    return labels


def teacher_targets(teacher, rows: _Seq2SeqRows, max_new_tokens: int, pad_id: int, batch_size: int = 64,
                    indices: list[int] | None = None) -> int:
    """Sequence-level distillation (Kim & Rush, 2016): replace the labels of the rows
    ``indices`` (default: all) with the teacher's own output for their sources, decoded with
    the teacher's generation config (its beams, length limits) and at most
    ``max_new_tokens`` tokens. Returns how many rows' labels changed.

    Example (needs a trained teacher, so not run as a doctest)::
        changed = teacher_targets(teacher, train_rows, 64, tok.pad_token_id)
    """
    idx = list(range(len(rows))) if indices is None else list(indices)
    return _set_labels(rows, generate_targets(teacher, rows, idx, max_new_tokens, pad_id, batch_size))


def _set_labels(rows: _Seq2SeqRows, labels: dict[int, list[int]]) -> int:
    """Give row i the labels ``labels[i]`` (for the rows in ``labels``); returns how many changed."""
    changed = 0
    for i, lab in labels.items():
        row = rows.rows[i]
        changed += lab != row["labels"]
        row["labels"] = lab
    return changed


# --------------------------------------------------------------------------- trainer

def _make_trainer_class():
    from transformers import Seq2SeqTrainer

    class DistillTrainer(Seq2SeqTrainer):
        """Seq2SeqTrainer whose loss is DQ-BART's distillation objective."""

        def __init__(self, *a, teacher=None, loss_cfg: LossConfig, maps, **kw):
            super().__init__(*a, **kw)
            self.teacher, self.loss_cfg, self.maps = teacher, loss_cfg, maps
            self.last_terms: dict[str, float] = {}
            self.trained_rows: set[int] = set()   # training rows this process computed a loss on

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            rows = inputs.pop("row_idx", None)
            if rows is not None and model.training:
                self.trained_rows.update(rows.tolist())
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

        def _load_optimizer_and_scheduler(self, checkpoint):
            # transformers 4.57 loads the optimizer state with map_location=args.device when
            # several processes train; in accelerate's multi-CPU mode that is "cpu:1", which
            # torch.load refuses ("don't know how to restore data location"). Map to "cpu".
            if checkpoint is None or self.args.device.type != "cpu" or self.args.world_size == 1:
                return super()._load_optimizer_and_scheduler(checkpoint)
            load = torch.load

            def cpu_load(*a, **kw):
                if "map_location" in kw and str(kw["map_location"]).startswith("cpu"):
                    kw["map_location"] = "cpu"
                return load(*a, **kw)

            torch.load = cpu_load
            try:
                return super()._load_optimizer_and_scheduler(checkpoint)
            finally:
                torch.load = load

        def _get_train_sampler(self, train_dataset=None):
            # Known order (the same in every process): teacher targets are generated for
            # exactly the rows it reads (dqtool.base.parallel.rows_read).
            from dqtool.base.parallel import EpochShuffle

            ds = train_dataset if train_dataset is not None else self.train_dataset
            return EpochShuffle(len(ds), self.args.data_seed if self.args.data_seed is not None else self.args.seed)

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self.last_terms:
                logs.update({f"loss_{k}": round(v, 6) for k, v in self.last_terms.items() if k != "total"})
            super().log(logs, *args, **kwargs)

        # The Trainer's train_loss divides the losses of *this process* by the global step,
        # so after a resume it is wrong (0.0 when resuming at the last step). dqtool keeps
        # the sum of every step's loss in each checkpoint (LOSS_FILE) and adds it back.
        loss_sum_before = 0.0
        _loss_sum = None

        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
            return loss

        def loss_sum(self) -> float:
            return self.loss_sum_before + (float(self._loss_sum) if self._loss_sum is not None else 0.0)

        def _save_checkpoint(self, model, trial):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                if self.is_world_process_zero():   # one writer (every rank saving it raced), whole or absent
                    tmp = folder / (LOSS_FILE + ".tmp")
                    tmp.write_text(json.dumps({"loss_sum": self.loss_sum(), "step": self.state.global_step}))
                    os.replace(tmp, folder / LOSS_FILE)
                super()._save_checkpoint(model, trial)   # trainer_state.json last: the completeness mark
            except OSError as e:
                from dqtool.base.fsutil import io_error, is_write_error

                if not is_write_error(e):
                    raise
                shutil.rmtree(folder, ignore_errors=True)   # an incomplete checkpoint is useless
                work = Path(self.args.output_dir)
                if _last_checkpoint(work) is not None:
                    hint = (f"the complete checkpoints in {work} stay: free space and run again with --resume "
                            f"to continue from {Path(_last_checkpoint(work)).name}")
                else:
                    shutil.rmtree(work, ignore_errors=True)
                    hint = f"no checkpoint was complete, {work} was removed: free space and run the command again"
                raise io_error(e, folder, hint=hint) from e

    return DistillTrainer


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
    """:func:`dqtool.model.memory.estimate` for this run: the prepared student, the teacher as
    it will be held during training (None: not loaded), the longest rows of the data."""
    from dqtool.model.memory import estimate
    from dqtool.model.qmodules import QuantEmbedding, QuantLinear

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
                            cache_dir: Path | None, needed: list[int]) -> dict:
    """The teacher's outputs as the labels of the training rows ``needed`` (the rows training
    will read), reusing what a run with the same teacher weights, generation config and
    tokenized training sources already generated (``cache_dir/teacher-targets-<key>.json``,
    one entry per training row, ``null`` where not generated yet): the schemes of one
    ``dqtool compress`` run share one generation, and a longer run adds only its new rows.
    Returns ``{"rows", "generated", "changed"}``."""
    from dqtool.base.parallel import is_main
    from dqtool.formats.hf import describe_source

    # The tokenized sources stand for data, split, prefix, tokenizer and lengths at once.
    sources = hashlib.sha256(json.dumps([row["input_ids"] for row in train_ds.rows]).encode()).hexdigest()
    key_doc = {"teacher": describe_source(teacher_src).get("weights_sha256") or teacher_src,
               "generation": t_model.generation_config.to_dict(), "sources": sources,
               "max_new_tokens": cfg.target_max_length}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir / f"teacher-targets-{key}.json" if cache_dir is not None else None
    cached: list = [None] * len(train_ds)
    if path is not None and path.is_file():
        loaded = json.loads(path.read_text())
        if len(loaded) == len(train_ds):
            cached = loaded
    missing = [i for i in needed if cached[i] is None]
    t0 = time.time()
    if missing:
        if torch.cuda.is_available():
            t_model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        for i, lab in generate_targets(t_model, train_ds, missing, cfg.target_max_length, tok.pad_token_id).items():
            cached[i] = lab
        if path is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached))
            os.replace(tmp, path)  # a killed run never leaves a half-written cache
    changed = _set_labels(train_ds, {i: cached[i] for i in needed})
    if is_main():
        reused = len(needed) - len(missing)
        print(f"targets: the teacher's outputs for the {len(needed)} of {len(train_ds)} training rows that "
              f"{cfg.max_steps} steps read ({len(missing)} generated in {time.time() - t0:.0f}s"
              + (f", {reused} reused from {path}" if reused else "") + f"; {changed} differ from the references)")
    return {"rows": len(needed), "generated": len(missing), "changed": changed}


@locked("out_dir")
def qat(student: str | os.PathLike, out_dir: str | os.PathLike, cfg: QATConfig, teacher: str | None = None,
        force: bool = False, resume: bool = False, progress: bool = True,
        cache_dir: str | os.PathLike | None = None, callbacks: tuple = ()) -> QATResult:
    """Fine-tune ``student`` with fake quantization and distillation; write the QAT folder.

    ``cache_dir`` (optional) keeps the teacher's outputs of ``targets="teacher"`` for
    later runs with the same teacher, data and tokenization. ``callbacks``: extra
    ``transformers.TrainerCallback`` objects (progress hooks; tests use one to kill a run
    at a known step).

    Example (needs real folders, so not run as a doctest)::
        qat("runs/student", "runs/qat", QATConfig(data="data/", scheme=QuantScheme.from_wea("2-2-8")))
    """
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments, set_seed

    from dqtool.formats.hf import describe_source, load_seq2seq

    from dqtool.base.parallel import is_main, rows_read, world_size

    out = check_output(out_dir, force)
    work = out.with_name(out.name + ".partial")
    checkpoint = _last_checkpoint(work)
    if work.exists() and not resume and not force:
        if checkpoint is None:
            raise DQToolError(f"{work} holds an interrupted run with no complete checkpoint: pass --force to "
                              f"start over")
        raise DQToolError(f"{work} holds an interrupted run: pass --resume to continue it or --force to start over")
    if resume and checkpoint is None:
        raise DQToolError(f"--resume given but {work} has no checkpoint: run without --resume")
    world = world_size()
    global_batch = cfg.batch_size * cfg.grad_accum * world
    if resume:
        _check_resume_world(work, world)
    student_dir = Path(student)
    teacher_src = _teacher_source(student_dir, teacher)
    record = {**run_record(student_dir, teacher_src, cfg), "world_size": world, "global_batch_size": global_batch}
    if resume:
        diff = resume_mismatch(work, record)
        if diff:
            raise DQToolError(f"{work} was started with a different setup, {diff}: resume with the options it was "
                              f"started with, or pass --force to start over")
    elif work.exists() and is_main():
        shutil.rmtree(work, ignore_errors=True)

    set_seed(cfg.seed)
    model, tok = load_seq2seq(student_dir)
    if tok is None:
        raise DQToolError(f"{student_dir} has no tokenizer files: save the tokenizer with the model")
    cfg_used = _cap_lengths(cfg, model, student_dir)
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

    train_ds = _tokenized(cfg_used, tok, cfg.train_split, cfg.max_train_samples)
    train_ds.with_index = True
    eval_ds = _tokenized(cfg_used, tok, cfg.eval_split, cfg.eval_samples) if cfg.eval_steps else None

    from dqtool.data.metrics import score

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
        predict_with_generate=True, generation_max_length=cfg_used.eval_max_length, generation_num_beams=cfg.eval_beams,
        report_to=[], dataloader_num_workers=0, save_safetensors=True, remove_unused_columns=False,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        # Off a terminal the Trainer prints its log lines (every --logging-steps) instead of a bar.
        disable_tqdm=not progress or not is_tty(),
        # Under torchrun on a machine without CUDA, accelerate would initialize a gloo process
        # group yet report no distributed mode (it looks for a GPU when LOCAL_RANK is set), so
        # the Trainer trained each process alone: use_cpu selects its multi-CPU mode (DDP on gloo).
        use_cpu=world > 1 and not torch.cuda.is_available(),
        ddp_timeout=6 * 3600,  # the other processes wait while the main one generates teacher targets
        **_precision(cfg))
    if args.world_size != world:  # (initializes the process group when launched with several)
        raise DQToolError(f"the launcher says {world} processes but the Trainer sees {args.world_size}; "
                          f"launch with torchrun or accelerate launch")
    with args.main_process_first(local=False, desc="clear the partial folder"):
        if is_main() and work.exists() and not resume:
            shutil.rmtree(work)
        if is_main():
            work.mkdir(parents=True, exist_ok=True)
            (work / RUN_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
    if is_main():
        print(f"qat: global batch {global_batch} rows = {cfg.batch_size} per process x {cfg.grad_accum} "
              f"accumulation steps x {world} process{'es' if world > 1 else ''}")
    targets = None
    if cfg.targets == "teacher":
        # Only the rows training reads; the main process generates them (into the cache, or
        # the partial folder when none is given) while the others wait, then read them.
        needed = rows_read(len(train_ds), cfg.seed, cfg.max_steps, global_batch)
        cache = Path(cache_dir) if cache_dir is not None else work
        with args.main_process_first(local=False, desc="teacher targets"):
            targets = _cached_teacher_targets(t_model, train_ds, cfg_used, tok, teacher_src, cache, needed)
        if not cfg.losses.needs_teacher:
            t_model = None  # only its outputs were needed
    if t_model is not None and teacher_dtype(cfg) != torch.float32:
        t_model.to(teacher_dtype(cfg))  # after generating targets: those come from the float32 teacher
    mem = memory_estimate(model, t_model, cfg, train_ds)
    if is_main():
        print(f"memory estimate (peak) for training:\n{mem.describe()}", flush=True)
    DistillTrainer = _make_trainer_class()
    trainer = DistillTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tok, model=None, label_pad_token_id=-100),
        processing_class=tok, compute_metrics=compute_metrics if do_eval else None, callbacks=list(callbacks),
        teacher=t_model, loss_cfg=cfg.losses, maps=maps)
    if resume:
        loss_file = Path(checkpoint) / LOSS_FILE
        if loss_file.is_file():
            trainer.loss_sum_before = float(json.loads(loss_file.read_text())["loss_sum"])
    t0 = time.time()
    try:
        trainer.train(resume_from_checkpoint=checkpoint if resume else None)
    except KeyboardInterrupt:
        done = _last_checkpoint(work)
        raise KeyboardInterrupt(
            f"{out}: training stopped; " + (f"continue from {Path(done).name} with the same command and --resume"
                                            if done else "no checkpoint was saved yet: run again with --force")
        ) from None
    except Exception as e:
        if resume and _is_unreadable(e):
            raise DQToolError(f"checkpoint {checkpoint} is unreadable ({_first_line(e)}): delete that folder to "
                              f"resume from an earlier checkpoint, or pass --force to start over") from e
        raise
    seconds = time.time() - t0
    _fix_train_loss(trainer)
    if targets is not None:
        # Rows this process trained on that have no teacher output (0 unless the order changed).
        targets["trained_without_target"] = len(trainer.trained_rows - set(needed))
    if not is_main():
        trainer.accelerator.wait_for_everyone()  # until the main process has written OUT
        return QATResult(out, trainer.state.global_step, seconds, trainer.state.best_metric, {}, main=False)

    with atomic_output(out, force=force, hint=f"the checkpoints in {work} stay: free space and run again with "
                                              f"--resume to write {out} without training again") as tmp:
        save_qat(model, tok, tmp, cfg.scheme)
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
                              "world_size": world, "global_batch_size": global_batch,
                              "teacher_relabelled_rows": targets["changed"] if targets else None,
                              "teacher_targets": targets,
                              "teacher_dtype": str(next(t_model.parameters()).dtype) if t_model is not None else None,
                              "memory_estimate_bytes": mem.parts,
                              "lengths_used": {k: getattr(cfg_used, k) for k in
                                               ("source_max_length", "target_max_length", "eval_max_length")}})
    trainer.accelerator.wait_for_everyone()
    shutil.rmtree(work, ignore_errors=True)
    return QATResult(out, trainer.state.global_step, seconds, best, final)


def run_record(student_dir: Path, teacher_src: str, cfg: QATConfig) -> dict:
    """What a QAT run is started with: its whole config and its inputs (student and teacher
    weight hashes, data file hashes). Kept in ``OUT.partial/`` and compared on resume."""
    from dqtool.formats.hf import describe_source
    from dqtool.formats.manifest import jsonable as _jsonable

    def weights(src):
        d = describe_source(src)
        return d.get("weights_sha256") or d.get("id")

    return {"config": _jsonable(cfg), "student": weights(student_dir), "teacher": weights(teacher_src),
            "data": _describe_data(cfg)["sha256"]}


def _flat(d, prefix=""):
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 24 else text[:21] + "..."


def resume_mismatch(work: Path, record: dict) -> str:
    """'' when the interrupted run in ``work`` was started with ``record``; else the fields
    that differ, e.g. ``scheme.wea ("2-2-8" -> "4-4-8"), learning_rate (0.0005 -> 0.001)``."""
    path = Path(work) / RUN_FILE
    if not path.is_file():
        return f"unknown ({path} is missing, so the run cannot be checked)"
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return f"unknown ({path} is not valid JSON)"
    a, b = _flat({k: old.get(k) for k in record}), _flat(json.loads(json.dumps(record, default=str)))
    names = {"student": "student weights", "teacher": "teacher weights", "data": "data files"}
    diffs = []
    for key in sorted(set(a) | set(b), key=lambda k: (k.split(".")[0] != "config", k)):
        if a.get(key) != b.get(key):
            top = key.split(".")[0]
            if top in names:
                if names[top] not in diffs:
                    diffs.append(names[top])
                continue
            diffs.append(f"{key.removeprefix('config.')} ({_short(a.get(key))} -> {_short(b.get(key))})")
    return ", ".join(diffs)


def _cap_lengths(cfg: QATConfig, model, where) -> QATConfig:
    """Token lengths above the model's position table would be an IndexError mid-step:
    cap them at the table, with a note."""
    from dqtool.model.registry import position_limit

    limit = position_limit(model)
    if limit is None:
        return cfg
    over = {k: limit for k in ("source_max_length", "target_max_length", "eval_max_length") if getattr(cfg, k) > limit}
    for k in over:
        print(f"note: --{k.replace('_', '-')} {getattr(cfg, k)} is more than the {limit} positions of {where}; "
              f"using {limit}")
    return dataclasses.replace(cfg, **over) if over else cfg


def _is_unreadable(e: BaseException) -> bool:
    import pickle

    from safetensors import SafetensorError

    if isinstance(e, (pickle.UnpicklingError, EOFError, SafetensorError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ("PytorchStreamReader", "zip archive", "pickle"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _fix_train_loss(trainer) -> None:
    """The mean loss over every step of the run, including those before a resume."""
    steps = trainer.state.global_step
    if not steps:
        return
    mean = trainer.loss_sum() / steps
    for entry in reversed(trainer.state.log_history):
        if "train_loss" in entry:
            entry["train_loss"] = mean
            break
def _check_resume_world(work: Path, world: int) -> None:
    """A run resumes with the number of processes it started with (the checkpoint's
    per-process RNG states and the rows already read depend on it)."""
    f = work / RUN_FILE
    if f.is_file():
        was = json.loads(f.read_text()).get("world_size", 1)
        if was != world:
            raise DQToolError(f"{work} was trained by {was} process{'es' if was > 1 else ''}, this run has {world}: "
                              f"resume with the same number of processes (or pass --force to start over)")


def _describe_data(cfg: QATConfig) -> dict:
    # The files of the splits read, keyed by relative path (nested datasets files cannot
    # collide by name), hashed through the stat-keyed cache.
    from dqtool.data.pairs import split_files
    from dqtool.formats.hashcache import describe_data

    splits = [cfg.train_split] + ([cfg.eval_split] if cfg.eval_steps else [])
    return describe_data(cfg.data, {k: v for s in splits for k, v in split_files(cfg.data, s).items()})

