"""Scheme variants on the main job's students: an A/B of QuantScheme fields at the recipe's QAT.

For each scheme of the recipe (default ``recipes/demo.yaml``: 2-2-8 and 8-8-8 of the 3+2
student of the demo teacher) and each variant (a set of QuantScheme field overrides, e.g.
``act_granularity=block``), runs the recipe's own QAT with the same seed, data order, steps,
losses and teacher-output targets, and scores each trained student with its fake
quantization (bit for bit the packed model's logits) on the test split.

Resumable: finished QAT folders are reused and scores cached in ``WORK/scores.json``.
Usage (heavy: one QAT run per scheme x variant)::

    .venv/bin/python benchmarks/scheme_ab_demo.py --teacher runs/demo/teacher \\
        --variant recipe: --variant block:act_granularity=block,act_asymmetric=false --out benchmarks/results/act_block_demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_scoring import student_and_scorer  # noqa: E402  (benchmarks/demo_scoring.py)


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    over = {}
    for kv in filter(None, body.split(",")):
        k, _, v = kv.partition("=")
        over[k.strip()] = {"true": True, "false": False, "none": None}.get(v.strip().lower(),
                                                                         int(v) if v.strip().isdigit() else v.strip())
    return name, over


def main() -> None:
    from dqtool.compress import load_recipe
    from dqtool.stages.qat import qat

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml")
    ap.add_argument("--work", type=Path, default=Path("runs/scheme_ab_demo"))
    ap.add_argument("--variant", action="append", required=True, help="NAME:field=value,... (QuantScheme fields; "
                    "the recipe's own scheme: 'recipe:')")
    ap.add_argument("--schemes", default=None, help="W-E-A list (default: the recipe's)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--eval-samples", type=int, default=None, help="test rows scored (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    variants = dict(parse_variant(v) for v in args.variant)
    weas = args.schemes.split(",") if args.schemes else list(recipe.qats)
    work = args.work
    student, score = student_and_scorer(args.teacher, recipe, work, args.eval_samples)

    teacher = score("teacher", args.teacher)
    rows = []
    for wea in weas:
        base = recipe.qats[wea]
        for vname, over in variants.items():
            name = f"{wea}-{vname}-seed{args.seed}"
            q = work / f"qat-{name}"
            t0 = time.time()
            if not q.exists():
                cfg = dataclasses.replace(base, scheme=base.scheme.with_(**over), seed=args.seed, eval_steps=None)
                qat(student, q, cfg, teacher=str(args.teacher), progress=False, cache_dir=work / "cache")
            rows.append({"wea": wea, "variant": vname, "overrides": over, "seed": args.seed, **score(name, q),
                         "seconds": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
    meta = {"machine": f"{platform.machine()}, {args.threads} threads", "torch": torch.__version__,
            "teacher": str(args.teacher), "recipe": str(args.recipe), "seed": args.seed, "test_rows": teacher["rows"],
            "command": "benchmarks/scheme_ab_demo.py " + " ".join(f"--variant '{v}'" for v in args.variant)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "teacher": teacher, "rows": rows},
                                                        indent=1) + "\n")
    lines = [f"# Scheme variants on the main job's students ({', '.join(variants)})", "",
             f"Recipe `{args.recipe.name}` (its distill and QAT settings; only the listed scheme fields change), "
             f"teacher {args.teacher} (float ROUGE-L {teacher['rougeL']:.2f}), seed {args.seed}. Scored with the fake "
             f"quantization (= the packed model bit for bit) on {teacher['rows']} test rows, greedy. "
             f"Command: `.venv/bin/python {meta['command']}`", "",
             "| W-E-A | variant | overrides | ROUGE-1 | ROUGE-2 | ROUGE-L | drop vs teacher |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['wea']} | {r['variant']} | {r['overrides'] or 'recipe'} | {r['rouge1']:.2f} | "
                     f"{r['rouge2']:.2f} | {r['rougeL']:.2f} | {100 * (1 - r['rougeL'] / teacher['rougeL']):.1f}% |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
