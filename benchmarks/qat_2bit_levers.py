"""2-bit weight quantizers on the demo student: TWN ternary vs ParetoQ's four-level seq vs a
learned-scale ternary (lsq at 2 bits, TBT's 4/3 mean|w| start), same budget, same seeds.

Every cell is QAT at the main job's settings (``recipes/demo.yaml``'s 2-2-8 qat section:
batch, learning rate, lengths, losses, teacher-output targets, activation scheme), with only
the weight method, the step count and the seed changed, on the recipe's layer-copied student
(3+2 of the 3+3 demo teacher). Each trained student is scored with its fake quantization
(bit for bit the packed model's logits) on the test split; the table gives ROUGE-1/2/L per
seed, the mean and spread of ROUGE-L, and the relative drop from the float teacher.

Resumable: a cell whose QAT folder exists is not retrained, and its scores are cached in
``WORK/scores.json``; run it in pieces (``--methods``, ``--seeds``) and re-run to tabulate.
Writes ``OUT.json`` and ``OUT.md`` (default ``benchmarks/results/qat_2bit_levers``).

Usage (wrap in ``flock /tmp/dqtool-heavy.lock`` on a shared machine)::

    .venv/bin/python benchmarks/qat_2bit_levers.py --teacher runs/demo/teacher --steps 300 --seeds 42,1,2
    .venv/bin/python benchmarks/qat_2bit_levers.py --teacher runs/demo/teacher --steps 20 --seeds 42 \\
        --eval-samples 50 --work runs/levers_smoke --out runs/levers_smoke/result    # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = {  # cell name -> weight method at 2 bits
    "ternary": "ternary",      # TWN (DQ-BART's 2-bit weights), the default
    "seq": "seq",              # ParetoQ stretched elastic quant: {-3, -1, 1, 3} * alpha / 4, learned alpha
    "lsq-ternary": "lsq",      # {-1, 0, 1} * alpha, learned alpha started at 4/3 mean|w| (TBT)
    "tbt": "tbt",              # {-1, 0, 1} * 4/3 mean|w|, recomputed every step
}
DEFAULT_METHODS = ("ternary", "seq", "lsq-ternary")


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> None:
    from dqtool.compress import load_recipe
    from dqtool.data.pairs import DataConfig
    from dqtool.stages.distill import distill
    from dqtool.stages.evaluate import EvalConfig, evaluate_model
    from dqtool.stages.qat import qat

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True, help="the demo teacher folder (train_teacher.py --size demo)")
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml",
                    help="recipe whose distill and 2-2-8 qat settings every cell uses")
    ap.add_argument("--work", type=Path, default=Path("runs/qat_2bit_levers"))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"cells, from: {', '.join(METHODS)}")
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--steps", type=int, default=300, help="QAT steps per cell (the demo recipe: 300)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    ap.add_argument("--eval-samples", type=int, default=None, help="test rows scored (default: all)")
    ap.add_argument("--max-train-samples", type=int, default=None,
                    help="training rows used (default: the recipe's, i.e. all); for smoke runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "qat_2bit_levers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not (args.teacher / "config.json").is_file():
        ap.error(f"{args.teacher} is not a model folder: train it with benchmarks/teacher/train_teacher.py "
                 f"--size demo --out {args.teacher}")

    recipe = load_recipe(args.recipe)
    base = recipe.qats.get("2-2-8")
    if base is None:
        ap.error(f"{args.recipe} has no 2-2-8 scheme")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    student = work / "student"
    if not student.exists():
        distill(args.teacher, student, recipe.distill)
    ecfg = EvalConfig(data=base.data, split="test",
                      data_cfg=DataConfig(source_max_length=base.source_max_length, prefix=base.prefix),
                      max_length=base.target_max_length, batch_size=64, max_samples=args.eval_samples)
    score_file = work / "scores.json"
    scores = _load_json(score_file)
    key = f"eval_samples={args.eval_samples}"
    cache = scores.setdefault(key, {})

    def score(name: str, folder: Path) -> dict:
        if name not in cache:
            r = evaluate_model(folder, None, ecfg)
            cache[name] = {"rouge1": round(r.metrics["rouge1"], 2), "rouge2": round(r.metrics["rouge2"], 2),
                           "rougeL": round(r.metrics["rougeL"], 2), "rows": len(r.predictions)}
            score_file.write_text(json.dumps(scores, indent=1) + "\n")
        return cache[name]

    teacher = score("teacher", args.teacher)
    print("teacher", teacher, flush=True)
    lr = args.lr if args.lr is not None else base.learning_rate
    cells: dict[str, dict] = {}
    for name in methods:
        for seed in seeds:
            rows_tag = f"_rows{args.max_train_samples}" if args.max_train_samples else ""
            cell = f"{name}_steps{args.steps}_lr{lr:g}{rows_tag}_seed{seed}"
            out = work / cell
            seconds = None
            if not out.exists():
                cfg = dataclasses.replace(base, scheme=base.scheme.with_(weight_method=METHODS[name]),
                                          max_steps=args.steps, save_steps=args.steps, seed=seed, learning_rate=lr,
                                          eval_steps=None, max_train_samples=args.max_train_samples
                                          or base.max_train_samples)
                t0 = time.time()
                qat(student, out, cfg, teacher=str(args.teacher), progress=False, cache_dir=work / "cache")
                seconds = round(time.time() - t0, 1)
            s = score(cell, out)
            cells.setdefault(name, {})[seed] = {**s, "train_seconds": seconds}
            print(name, seed, cells[name][seed], flush=True)

    rows = []
    for name, by_seed in cells.items():
        ls = [by_seed[s]["rougeL"] for s in seeds]
        mean = statistics.fmean(ls)
        rows.append({"method": name, "weight_method": METHODS[name], "per_seed": by_seed,
                     "rougeL_mean": round(mean, 2), "rougeL_std": round(statistics.stdev(ls), 2) if len(ls) > 1 else 0.0,
                     "rougeL_min": min(ls), "rougeL_max": max(ls),
                     "drop_vs_teacher": round(1 - mean / teacher["rougeL"], 4) if teacher["rougeL"] else None})
    meta = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads", "torch": torch.__version__,
            "teacher": str(args.teacher), "recipe": str(args.recipe), "wea": "2-2-8",
            "student_layers": [recipe.distill.encoder_layers, recipe.distill.decoder_layers],
            "steps": args.steps, "lr": lr, "batch_size": base.batch_size, "targets": base.targets,
            "seeds": seeds, "test_rows": teacher["rows"], "decode": f"greedy, max {base.target_max_length} tokens"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "teacher": teacher, "rows": rows},
                                                        indent=1) + "\n")
    head = " | ".join(f"seed {s}" for s in seeds)
    md = ["# 2-bit weight quantizers on the demo student (3+2, 2-2-8)", "",
          f"Machine: {meta['machine']}, torch {meta['torch']}; timings are not compared here. QAT at "
          f"{args.recipe.name}'s 2-2-8 settings, {args.steps} steps, lr {lr:g}, batch {base.batch_size}, targets "
          f"{base.targets}. Scored on {teacher['rows']} test rows, {meta['decode']}, with the fake "
          f"quantization (= the packed model bit for bit). Teacher (float): ROUGE-L {teacher['rougeL']:.2f}.", "",
          f"| method | {head} | ROUGE-L mean | spread (min..max) | drop vs teacher |",
          "|---|" + "---:|" * (len(seeds) + 3)]
    for r in rows:
        md.append(f"| {r['method']} | " + " | ".join(f"{r['per_seed'][s]['rougeL']:.2f}" for s in seeds)
                  + f" | {r['rougeL_mean']:.2f} | {r['rougeL_min']:.2f}..{r['rougeL_max']:.2f} | "
                  + (f"{100 * r['drop_vs_teacher']:.1f}% |" if r["drop_vs_teacher"] is not None else " |"))
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
