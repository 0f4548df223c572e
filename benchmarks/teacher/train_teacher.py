"""Train a BART teacher from scratch on the bundled Debian synopsis data.

The "demo" size is a fixture for dqtool's embedded default: it trains a fixed number of
steps (2600; about 4.5 minutes on a 2-core CPU, tokenization and saving included) and beats
trivial baselines clearly, so that distillation/quantization results on it mean
something.  The brief asked for 6+6 layers if they learn in time; they do not (see
benchmarks/teacher/RESULTS_demo_teacher.md): 6+6 at d_model 128-192 was still ignoring
the source after 5 minutes, so the demo teacher has 3 encoder + 3 decoder layers
(students can map 3 -> 2 or 3 -> 1, as in DQ-BART's 12-6 / 12-3 / 12-1 settings).

Two training phases share the step budget: a short "copy warm-up" (target = first
8 source words, a miniature of BART's denoising pre-training that makes the
cross-attention read the source) and then the synopsis task.

The "base" size is a BART-base-like shape (d_model 768, 6+6 layers, 12 heads) for a
GPU run later; it uses the same data and tokenizer, only the config and step count
differ.  It is not meant to run on a CPU.

Training uses HF ``Seq2SeqTrainer`` (no home-made loop).  A fixed ``max_steps`` makes
the result the same on any machine for a given seed/thread count: the time is reported
(``train_info.json``), never enforced by default, since a teacher stopped early by a wall
clock on a slow or busy machine once finished 200 of its 2600 steps and made every score
of the main job meaningless.  ``--max-minutes`` is an explicit opt-in for tuning runs; a
run it stops early says so loudly and exits with code 3.

Output folder (written atomically: temp folder in the same parent, then rename):
``config.json``, ``model.safetensors``, ``generation_config.json``, tokenizer files and
``train_info.json`` (timings, steps, final loss, hyper-parameters).

Usage::

    .venv/bin/python benchmarks/teacher/train_teacher.py --size demo --out runs/teacher_demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

T_START = time.time()  # the 5-minute budget counts from process start (imports included)

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BartConfig,
    BartForConditionalGeneration,
    BartTokenizerFast,
    DataCollatorForSeq2Seq,
    GenerationConfig,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
    set_seed,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO / "dqtool" / "assets" / "data" / "debian_synopsis"
DEFAULT_TOKENIZER = REPO / "dqtool" / "assets" / "tokenizer" / "debian_bpe8k"

# Model shapes.  Heads divide d_model; ffn = 4 x d_model as in BART.
SIZES = {
    "demo": dict(d_model=128, layers=3, heads=4, ffn=512, max_positions=256),
    "base": dict(d_model=768, layers=6, heads=12, ffn=3072, max_positions=1024),
}
# Training recipes.  "demo" was tuned on a 2-core AMD EPYC CPU to finish < 5 min.
RECIPES = {
    # steps counts both phases; copy_steps of them are the copy warm-up (see main()).
    "demo": dict(steps=2600, copy_steps=400, copy_words=8, batch_size=16, lr=1.5e-3, warmup=100,
                 weight_decay=0.01, max_source=64, max_target=32, dropout=0.1),
    "base": dict(steps=20000, copy_steps=2000, copy_words=8, batch_size=64, lr=5e-4, warmup=1000,
                 weight_decay=0.01, max_source=256, max_target=48, dropout=0.1),
}


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class TokenizedPairs(torch.utils.data.Dataset):
    """Pre-tokenized (source, target) pairs; items are dicts of python int lists.

    input_ids: [<s> src... </s>] (<= max_source), labels: [<s> tgt... </s>] (<= max_target).
    DataCollatorForSeq2Seq pads per batch and builds decoder_input_ids = shift_right(labels).
    """

    def __init__(self, rows, tok, max_source: int, max_target: int):
        enc = tok([r["source"] for r in rows], max_length=max_source, truncation=True)
        lab = tok(text_target=[r["target"] for r in rows], max_length=max_target, truncation=True)
        self.items = [
            {"input_ids": i, "attention_mask": a, "labels": t}
            for i, a, t in zip(enc["input_ids"], enc["attention_mask"], lab["input_ids"])
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        return self.items[idx]


class WallClockGuard(TrainerCallback):
    """Stop training when the process has used ``deadline_s`` seconds of wall time."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.stopped_early = False

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() - T_START > self.deadline_s:
            self.stopped_early = True
            control.should_training_stop = True
        return control


def build_config(size: str, vocab_size: int, tok, dropout: float, max_target: int) -> BartConfig:
    s = SIZES[size]
    return BartConfig(
        vocab_size=vocab_size,
        d_model=s["d_model"],
        encoder_layers=s["layers"],
        decoder_layers=s["layers"],
        encoder_attention_heads=s["heads"],
        decoder_attention_heads=s["heads"],
        encoder_ffn_dim=s["ffn"],
        decoder_ffn_dim=s["ffn"],
        max_position_embeddings=s["max_positions"],
        dropout=dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="gelu",
        scale_embedding=False,  # like facebook/bart-*
        # BART's init_std 0.02 suits d_model 768-1024 (about 0.55/sqrt(d)).  For a small
        # d_model it makes the cross-attention path (v_proj @ out_proj, both ~0.02) so weak
        # that training from scratch sits at a saddle: the decoder learns a plain language
        # model, the encoder output collapses to a constant and the source is ignored
        # (observed: identical loss with shuffled sources after 900 steps).  Scaling the
        # init like BART-base per dimension fixes it; for "base" this is ~0.02 anyway.
        init_std=0.55 / math.sqrt(s["d_model"]),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,  # BART convention: decoding starts at </s>
        forced_eos_token_id=tok.eos_token_id,
    )


def generation_config(tok, max_target: int) -> GenerationConfig:
    # Beam 4 like BART's summarization checkpoints; synopses are short, so max_length
    # is the target truncation length.  no_repeat_ngram_size avoids loops of tiny models.
    return GenerationConfig(
        decoder_start_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        forced_eos_token_id=tok.eos_token_id,
        num_beams=4,
        max_length=max_target,
        min_length=3,
        early_stopping=True,
        no_repeat_ngram_size=3,
        length_penalty=1.0,
    )


def save_atomically(out: Path, model, tok, gen_cfg, info: dict) -> None:
    """Save the teacher through dqtool's atomic output (temp folder + rename, old kept until then)."""
    from dqtool.formats.manifest import atomic_output

    with atomic_output(out, force=True) as tmp:
        model.generation_config = gen_cfg
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "train_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def run_phase(model, tok, ds, steps, recipe, seed, collator, guard) -> Seq2SeqTrainer:
    """One Seq2SeqTrainer run of ``steps`` optimizer steps (fresh AdamW + linear schedule)."""
    work = tempfile.mkdtemp(prefix="teacher_trainer_")
    targs = Seq2SeqTrainingArguments(
        output_dir=work,
        per_device_train_batch_size=recipe["batch_size"],
        learning_rate=recipe["lr"],
        weight_decay=recipe["weight_decay"],
        warmup_steps=min(recipe["warmup"], steps // 10),
        lr_scheduler_type="linear",
        max_steps=steps,
        max_grad_norm=1.0,
        # Batches of similar source length waste less compute on padding.
        group_by_length=True,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        disable_tqdm=True,
    )
    shutil.rmtree(work, ignore_errors=True)  # nothing is saved there (save_strategy="no")
    return Seq2SeqTrainer(model=model, args=targs, train_dataset=ds, data_collator=collator,
                          processing_class=tok, callbacks=[guard])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train a BART teacher from scratch (demo: 2600 steps, ~4.5 min on "
                                             "2 CPU cores).")
    ap.add_argument("--size", choices=sorted(SIZES), default="demo")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.jsonl")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="opt-in wall-clock budget for tuning runs (default: none, the fixed step count always "
                         "runs); a run stopped early by it is flagged in train_info.json and exits 3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    # Optional overrides of the recipe (used while tuning; defaults come from RECIPES).
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--max-source", type=int)
    ap.add_argument("--dropout", type=float)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--copy-steps", type=int)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    torch.set_num_threads(args.threads)
    recipe = dict(RECIPES[args.size])
    for key in ("steps", "lr", "batch_size", "max_source", "dropout", "warmup", "copy_steps"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    if args.d_model is not None:
        SIZES[args.size].update(d_model=args.d_model, ffn=4 * args.d_model)
    if args.layers is not None:
        SIZES[args.size]["layers"] = args.layers

    set_seed(args.seed)
    tok = BartTokenizerFast.from_pretrained(args.tokenizer)
    rows = read_jsonl(args.data / "train.jsonl")
    train_ds = TokenizedPairs(rows, tok, recipe["max_source"], recipe["max_target"])
    t_tok = time.time() - T_START

    config = build_config(args.size, len(tok), tok, recipe["dropout"], recipe["max_target"])
    model = BartForConditionalGeneration(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[teacher] size={args.size} params={n_params/1e6:.2f}M rows={len(train_ds)} "
          f"setup={t_tok:.1f}s recipe={recipe}", flush=True)

    # Only with --max-minutes: leave ~20 s of the budget for saving the model and train_info.json.
    guard = WallClockGuard(deadline_s=args.max_minutes * 60 - 20 if args.max_minutes else float("inf"))
    collator = DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100)
    t0 = time.time()
    phases = []
    if recipe["copy_steps"] > 0:
        # Phase 1, "copy warm-up" (a miniature of BART's denoising pre-training): target =
        # the first copy_words words of the source.  Copying is learned within a few
        # hundred steps and teaches the cross-attention to read the source; synopses are
        # largely re-worded first sentences, so phase 2 starts from a useful alignment.
        copy_rows = [{"source": r["source"], "target": " ".join(r["source"].split()[:recipe["copy_words"]])}
                     for r in rows]
        copy_ds = TokenizedPairs(copy_rows, tok, recipe["max_source"], recipe["max_target"])
        phases.append(("copy", copy_ds, recipe["copy_steps"]))
    phases.append(("synopsis", train_ds, recipe["steps"] - recipe["copy_steps"]))
    history, result = [], None
    for phase, ds, steps in phases:
        if guard.stopped_early:
            break
        trainer = run_phase(model, tok, ds, steps, recipe, args.seed, collator, guard)
        result = trainer.train()
        history += [dict(h, phase=phase) for h in trainer.state.log_history if "loss" in h]
        if history:
            print(f"[teacher] phase {phase}: {trainer.state.global_step} steps, "
                  f"last loss {history[-1]['loss']}", flush=True)
        model = trainer.model
    train_s = time.time() - t0
    steps_done = {ph: max((h["step"] for h in history if h["phase"] == ph), default=0) for ph, _, _ in phases}
    losses = [h["loss"] for h in history if h["phase"] == "synopsis"]

    info = {
        "size": args.size,
        "params": n_params,
        "config": {k: SIZES[args.size][k] for k in SIZES[args.size]},
        "recipe": recipe,
        "seed": args.seed,
        "threads": args.threads,
        "train_rows": len(train_ds),
        "steps": sum(steps_done.values()),
        "steps_per_phase": steps_done,
        "epochs": round(sum(steps_done.values()) * recipe["batch_size"] / len(train_ds), 3),
        "stopped_early_by_wall_clock": guard.stopped_early,
        "final_logged_loss": losses[-1] if losses else None,
        "mean_train_loss": result.training_loss,
        "loss_curve": [(h["phase"], h["step"], h["loss"]) for h in history],
        "setup_seconds": round(t_tok, 1),
        "train_seconds": round(train_s, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "torch": torch.__version__,
    }
    model = model.to("cpu").eval()
    # Wall time from process start up to the save (saving itself takes ~1 s for demo).
    info["total_seconds"] = round(time.time() - T_START, 1)
    save_atomically(args.out, model, tok, generation_config(tok, recipe["max_target"]), info)
    total = time.time() - T_START
    print(f"[teacher] steps={info['steps']} final_loss={info['final_logged_loss']} "
          f"train={train_s:.1f}s total={total:.1f}s -> {args.out}", flush=True)
    if not math.isfinite(result.training_loss):
        print("[teacher] training loss is not finite", file=sys.stderr)
        return 1
    if guard.stopped_early:
        print(f"[teacher] WARNING: --max-minutes {args.max_minutes} stopped training after {info['steps']} of "
              f"{recipe['steps']} steps; this teacher is not the demo teacher (scores on it are not comparable)",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
