"""QAT with and without distillation on the demo teacher (issue: dqtool qat must-show).

Runs, through dqtool's own Python API (the same code as the CLI):

    distill  teacher -> student (E encoder / D decoder layers)
    qat      8-8-8 with distillation, 2-2-8 with distillation, 2-2-8 task loss only
    eval     teacher, un-tuned student and every QAT student on the test split

and writes ``benchmarks/results/qat_demo.{json,md}``. Each cell is skipped when its
output folder already exists, so an interrupted run continues where it stopped.

Usage::

    .venv/bin/python benchmarks/qat_demo.py --teacher runs/demo/teacher --work runs/qat_demo
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dqtool.data.pairs import DataConfig
from dqtool.stages.distill import DistillConfig, distill
from dqtool.stages.evaluate import EvalConfig, evaluate_model
from dqtool.model.losses import LossConfig
from dqtool.stages.qat import QATConfig, qat
from dqtool.qmath.scheme import QuantScheme

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dqtool" / "assets" / "data" / "debian_synopsis"

# Every weight, logits kind and temperature is explicit: LossConfig's defaults changed (now task +
# logits KL T=2), and each cell must keep meaning what its name and the recorded results say.
PAPER = dict(task=1, logits=1, hidden=1, attention=1, enc_last=1)  # the former defaults (logits MSE, T=1)
CELLS = {  # name -> (W-E-A, loss config)
    "8-8-8 distill": ("8-8-8", LossConfig(**PAPER, logits_kind="mse", temperature=1.0)),
    "2-2-8 distill": ("2-2-8", LossConfig(**PAPER, logits_kind="mse", temperature=1.0)),
    "2-2-8 no distill": ("2-2-8", LossConfig(task=1, logits=0, hidden=0, attention=0, enc_last=0)),
    "2-2-8 distill KL": ("2-2-8", LossConfig(**PAPER, logits_kind="kl", temperature=2.0)),
    "2-2-8 logits-KL only": ("2-2-8", LossConfig(logits_kind="kl", temperature=2.0, hidden=0, attention=0,
                                                 enc_last=0)),
    "2-2-8 logits-MSE only": ("2-2-8", LossConfig(logits_kind="mse", temperature=1.0, hidden=0, attention=0,
                                                  enc_last=0)),
    "8-8-8 distill KL": ("8-8-8", LossConfig(**PAPER, logits_kind="kl", temperature=2.0)),
    "8-8-8 no distill": ("8-8-8", LossConfig(task=1, logits=0, hidden=0, attention=0, enc_last=0)),
    "2-2-8 distill KL light": ("2-2-8", LossConfig(logits_kind="kl", temperature=2.0, hidden=0.1, attention=0.1,
                                                   enc_last=0.1)),
    "8-8-8 distill KL light": ("8-8-8", LossConfig(logits_kind="kl", temperature=2.0, hidden=0.1, attention=0.1,
                                                   enc_last=0.1)),
    # Sequence-level distillation (QATConfig.targets="teacher"): trained on the teacher's outputs.
    "2-2-8 seq-KD": ("2-2-8", LossConfig(task=1, logits=0, hidden=0, attention=0, enc_last=0), "teacher"),
    "2-2-8 seq-KD + logits-KL": ("2-2-8", LossConfig(logits_kind="kl", temperature=2.0, hidden=0, attention=0,
                                                     enc_last=0), "teacher"),
}
DEFAULT_CELLS = ("8-8-8 distill", "2-2-8 distill", "2-2-8 no distill")


def _describe(losses: LossConfig) -> str:
    """The loss weights that are on, e.g. ``task 1, logits 1 (kl T=2), hidden 0.1``."""
    parts = []
    for t in LossConfig.TERMS:
        w = getattr(losses, t)
        if w:
            extra = "" if t != "logits" else (f" (kl T={losses.temperature:g})" if losses.logits_kind == "kl"
                                              else f" ({losses.logits_kind})")
            parts.append(f"{t} {w:g}{extra}")
    return ", ".join(parts)


def _seconds(row: dict) -> str:
    if row.get("train_seconds") is not None:
        return str(row["train_seconds"])
    return f"{row['trainer_seconds']}*" if row.get("trainer_seconds") is not None else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("runs/qat_demo"))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--encoder-layers", type=int, default=2)
    ap.add_argument("--decoder-layers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=QATConfig.seed,
                    help="QAT seed (QATConfig.seed); a non-default seed is added to each cell's folder name")
    ap.add_argument("--cells", default=",".join(DEFAULT_CELLS),
                    help=f"comma-separated cells to run, from: {', '.join(CELLS)}")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "qat_demo")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work
    student = work / "student"
    if not student.exists():
        distill(args.teacher, student, DistillConfig(encoder_layers=args.encoder_layers,
                                                     decoder_layers=args.decoder_layers))
    dcfg = DataConfig(source_max_length=128)
    ecfg = EvalConfig(data=str(args.data), split="test", data_cfg=dcfg, max_samples=args.eval_samples,
                      max_length=32, batch_size=64)
    rows = []

    def evaluate(name, folder, extra):
        r = evaluate_model(folder, None, ecfg)
        rows.append({"model": name, **{k: round(v, 2) for k, v in r.metrics.items()},
                     "eval_seconds": round(r.seconds, 1), **extra})
        print(rows[-1], flush=True)

    evaluate("teacher (float)", args.teacher, {})
    evaluate(f"student {args.encoder_layers}-{args.decoder_layers} layer copy, no tuning", student, {})
    for name in args.cells.split(","):
        wea, losses, *rest = CELLS[name]
        targets = rest[0] if rest else "data"
        out = work / (name.replace(" ", "_") + ("" if args.seed == QATConfig.seed else f"_seed{args.seed}"))
        seconds = None
        if not out.exists():
            t0 = time.time()
            qat(student, out, QATConfig(data=str(args.data), scheme=QuantScheme.from_wea(wea), losses=losses,
                                        max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                                        source_max_length=128, target_max_length=32, save_steps=args.steps,
                                        seed=args.seed, targets=targets),
                progress=False, cache_dir=work / "cache")
            seconds = round(time.time() - t0, 1)
        trainer_seconds = json.loads((out / "dqtool-manifest.json").read_text()).get("seconds")
        evaluate(f"student {args.encoder_layers}-{args.decoder_layers} QAT {name}", out,
                 {"train_seconds": seconds, "trainer_seconds": trainer_seconds, "steps": args.steps, "seed": args.seed, "losses": _describe(losses) + (", teacher's outputs as targets" if targets == "teacher" else "")})
    meta = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
            "torch": torch.__version__, "teacher": str(args.teacher), "eval_rows": args.eval_samples,
            "decode": "greedy, max 32 tokens", "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "student_layers": [args.encoder_layers, args.decoder_layers]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# QAT with and without distillation (demo teacher)", "",
             f"Machine: {meta['machine']}, torch {meta['torch']}. Test split, first {args.eval_samples} rows, "
             f"{meta['decode']}. QAT: {args.steps} steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}.", "",
             "train s: wall time of the qat() call (model loading included); * = cell trained by an earlier "
             "run, its manifest's trainer time instead.", "",
             "| model | losses | ROUGE-1 | ROUGE-2 | ROUGE-L | train s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('losses', '')} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | "
                     f"{r['rougeL']:.2f} | {_seconds(r)} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
