"""Quantized learned positions vs float positions on the main job's students (A/B).

For each scheme of the recipe (default ``recipes/demo.yaml``: 2-2-8 and 8-8-8 of the 3+2
student of the demo teacher), runs the recipe's own QAT twice -- learned positions in float
(``pos_bits: none``) and quantized per row at the E bits (``pos_bits: e``) -- with the same
seed, data order, steps, losses and teacher-output targets, then scores each trained student
with its fake quantization (bit for bit the packed model's logits) on the test split, and
converts it (the recipe's convert settings) to report the packed file size.

Resumable: finished QAT folders are reused and scores cached in ``WORK/scores.json``.
Writes ``benchmarks/results/positions_demo.{json,md}``. Usage (heavy: 4 QAT runs)::

    .venv/bin/python benchmarks/positions_demo.py --teacher runs/demo/teacher --seeds 42
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_scoring import student_and_scorer  # noqa: E402  (benchmarks/demo_scoring.py)
MB = 1e6


def main() -> None:
    from dqtool.compress import load_recipe
    from dqtool.stages.convert import convert
    from dqtool.stages.qat import qat

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml")
    ap.add_argument("--work", type=Path, default=Path("runs/positions_demo"))
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--eval-samples", type=int, default=None, help="test rows scored (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "positions_demo")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work
    student, score = student_and_scorer(args.teacher, recipe, work, args.eval_samples)

    teacher = score("teacher", args.teacher)
    rows = []
    for wea, base in recipe.qats.items():
        for pos in ("none", "e"):
            pos_bits = None if pos == "none" else base.scheme.e_bits
            for seed in seeds:
                name = f"{wea}-pos-{pos}-seed{seed}"
                q, p = work / f"qat-{name}", work / f"packed-{name}"
                t0 = time.time()
                if not q.exists():
                    cfg = dataclasses.replace(base, scheme=base.scheme.with_(pos_bits=pos_bits), seed=seed,
                                              eval_steps=None)
                    qat(student, q, cfg, teacher=str(args.teacher), progress=False, cache_dir=work / "cache")
                if not p.exists():
                    convert(q, p, recipe.convert)
                s = score(name, q)
                rows.append({"wea": wea, "positions": "float" if pos_bits is None else f"{pos_bits}-bit",
                             "seed": seed, **s, "packed_bytes": (p / "packed.safetensors").stat().st_size,
                             "seconds": round(time.time() - t0, 1)})
                print(rows[-1], flush=True)
    meta = {"machine": f"{platform.machine()}, {args.threads} threads", "torch": torch.__version__,
            "teacher": str(args.teacher), "recipe": str(args.recipe.relative_to(REPO) if args.recipe.is_absolute()
                                                         and REPO in args.recipe.parents else args.recipe),
            "seeds": seeds, "test_rows": teacher["rows"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "teacher": teacher, "rows": rows},
                                                        indent=1) + "\n")
    lines = ["# Quantized learned positions vs float positions (the main job's students)", "",
             f"Recipe `{meta['recipe']}` (its distill, QAT and convert settings; only `qat.pos_bits` changes), "
             f"teacher {args.teacher} (float ROUGE-L {teacher['rougeL']:.2f}), seeds {seeds}. Scored with the fake "
             f"quantization (= the packed model bit for bit) on {teacher['rows']} test rows, greedy. "
             f"Command: `.venv/bin/python benchmarks/positions_demo.py --teacher {args.teacher} --seeds {args.seeds}`", "",
             "| W-E-A | positions | seed | ROUGE-1 | ROUGE-2 | ROUGE-L | packed.safetensors MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['wea']} | {r['positions']} | {r['seed']} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | "
                     f"{r['rougeL']:.2f} | {r['packed_bytes'] / MB:.3f} |")
    for wea in recipe.qats:
        by = {pos: [r["rougeL"] for r in rows if r["wea"] == wea and r["positions"] == pos]
              for pos in {r["positions"] for r in rows if r["wea"] == wea}}
        if len(by) == 2:
            (a, la), (b, lb) = sorted(by.items(), key=lambda kv: kv[0] != "float")
            lines.append(f"\n{wea}: ROUGE-L mean {statistics.fmean(la):.2f} ({a}) vs {statistics.fmean(lb):.2f} ({b}), "
                         f"difference {statistics.fmean(lb) - statistics.fmean(la):+.2f}.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
