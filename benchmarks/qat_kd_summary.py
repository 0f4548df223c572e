"""Distillation vs none across seeds (issue: dqtool qat must-show), on the whole test split.

Scores every QAT folder that ``qat_demo.py --work WORK --seed S`` trained (cells x seeds)
on all rows of the demo test split (greedy, 32 tokens) and tabulates ROUGE-L per seed, the
mean, and each cell's gain over "no distill" with the same seed. Writes
``benchmarks/results/qat_kd_summary.{json,md}``.

Usage::

    .venv/bin/python benchmarks/qat_kd_summary.py --work runs/qat_kd --seeds 42,1,2
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from dqtool.data.pairs import DataConfig
from dqtool.stages.evaluate import EvalConfig, evaluate_model
from dqtool.stages.qat import QATConfig

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dqtool" / "assets" / "data" / "debian_synopsis"
CELLS = ("2-2-8 no distill", "2-2-8 logits-KL only", "2-2-8 seq-KD", "2-2-8 seq-KD + logits-KL")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/qat_kd"))
    ap.add_argument("--teacher", type=Path, default=Path("runs/teacher_demo"))
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "qat_kd_summary")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    ecfg = EvalConfig(data=str(DATA), split="test", data_cfg=DataConfig(source_max_length=128), max_length=32,
                      batch_size=64)
    teacher = evaluate_model(args.teacher, None, ecfg)
    table = {}
    for cell in CELLS:
        for seed in seeds:
            folder = args.work / (cell.replace(" ", "_") + ("" if seed == QATConfig.seed else f"_seed{seed}"))
            if folder.is_dir():
                r = evaluate_model(folder, None, ecfg)
                table.setdefault(cell, {})[seed] = round(r.metrics["rougeL"], 2)
                print(cell, seed, table[cell][seed], flush=True)
    rows = len(teacher.predictions)
    base = table.get(CELLS[0], {})
    doc = {"machine": f"{platform.machine()} {args.threads} threads", "torch": torch.__version__,
           "test_rows": rows, "teacher_rougeL": round(teacher.metrics["rougeL"], 2), "rougeL": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    head = " | ".join(f"seed {s}" for s in seeds)
    md = ["# 2-2-8 QAT of the demo teacher's 2+1 student: distillation vs none", "",
          f"All {rows} test rows, greedy, 32 tokens; ROUGE-L. Teacher (float, 3+3): {doc['teacher_rougeL']}. "
          f"600 QAT steps, batch 16, lr 5e-4, per-token activations. gain = cell minus 'no distill' at the "
          f"same seed.", "",
          f"| cell | {head} | mean | gain per seed | mean gain |", "|---|" + "---:|" * (len(seeds) + 3)]
    for cell, by_seed in table.items():
        vals = [by_seed.get(s) for s in seeds]
        got = [v for v in vals if v is not None]
        gains = [round(by_seed[s] - base[s], 2) for s in seeds if s in by_seed and s in base]
        md.append(f"| {cell} | " + " | ".join("" if v is None else f"{v:.2f}" for v in vals)
                  + f" | {sum(got) / len(got):.2f} | {', '.join(f'{g:+.2f}' for g in gains)} | "
                  + (f"{sum(gains) / len(gains):+.2f} |" if gains else " |"))
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
