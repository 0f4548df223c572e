"""Teacher targets of the main job (recipes/demo.yaml, --targets teacher): rows generated
before (every training row) and now (only the rows the QAT steps read).

The generation time scales with the rows generated (batches of 64, longest first; the rows
read are a uniform random subset, so the same length mix). Writes
benchmarks/results/teacher_targets_rows.{json,md}.

    python benchmarks/teacher_targets_rows.py
"""

import json
from pathlib import Path

import yaml

from dqtool.base.parallel import rows_read
from dqtool.stages.qat import QATConfig

ROOT = Path(__file__).resolve().parent.parent
# Measured before this change (issue 18): the whole 15,000-row split on the demo teacher.
BEFORE_MINUTES = {"quiet machine": 2.9, "busy machine": 35.0}


def main():
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    q = recipe["qat"]
    cfg = QATConfig(data=recipe["data"])
    n = sum(1 for line in open(ROOT / recipe["data"] / "train.jsonl") if line.strip())
    gb = q["batch_size"] * q.get("grad_accum", 1)
    now = len(rows_read(n, cfg.seed, q["max_steps"], gb))
    share = now / n
    res = {"recipe": "recipes/demo.yaml", "train_rows": n, "max_steps": q["max_steps"], "global_batch": gb,
           "rows_generated_before": n, "rows_generated_now": now, "share": round(share, 4),
           "minutes_before": BEFORE_MINUTES,
           "minutes_now_estimated": {k: round(v * share, 2) for k, v in BEFORE_MINUTES.items()},
           "note": "estimate: time proportional to rows generated; not re-timed (the demo teacher is not built here)"}
    out = ROOT / "benchmarks" / "results"
    (out / "teacher_targets_rows.json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["# Teacher targets of the main job: rows generated", "",
          f"`{res['recipe']}`: {q['max_steps']} steps x global batch {gb} read {now:,} of the {n:,} training rows.", "",
          "| | rows generated | quiet machine | busy machine |", "|---|---:|---:|---:|",
          f"| before (every row) | {n:,} | {BEFORE_MINUTES['quiet machine']} min | {BEFORE_MINUTES['busy machine']} min |",
          f"| now (rows read) | {now:,} | ~{res['minutes_now_estimated']['quiet machine']} min | "
          f"~{res['minutes_now_estimated']['busy machine']} min |", "",
          f"Before: measured in issue 18. Now: {share:.0%} of the rows; the minutes are that share of the "
          "measured ones (generation time is proportional to the rows: batches of 64, longest first, and the "
          "rows read are a uniform random subset), not re-timed here.", ""]
    (out / "teacher_targets_rows.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
