"""Packed footprint and parity on the demo teacher's QAT students (issue: dqtool convert).

For each QAT folder: ``dqtool convert`` (float32 floats, so parity is bit-exact, and auto),
then ``dqtool eval`` of the QAT (fake-quant) student and of the packed student on the same
test rows; the predictions must be identical. Writes ``benchmarks/results/convert_demo.{json,md}``.

Usage::

    .venv/bin/python benchmarks/convert_demo.py --teacher runs/teacher_demo \\
        runs/qat_demo/8-8-8_distill runs/qat_demo/4-4-8_distill_KL runs/qat_demo/2-2-8_distill_KL
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dqtool.stages.convert import ConvertConfig, convert
from dqtool.data.pairs import DataConfig
from dqtool.stages.evaluate import EvalConfig, evaluate_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dqtool" / "assets" / "data" / "debian_synopsis"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("qat", nargs="+", type=Path)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("runs/convert_demo"))
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "convert_demo")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ecfg = EvalConfig(data=str(DATA), split="test", data_cfg=DataConfig(source_max_length=128),
                      max_samples=args.eval_samples, max_length=32, batch_size=64)
    rows = []
    for q in args.qat:
        for fdt in ("float32", "auto"):
            out = args.work / f"{q.parent.name}-{q.name}-{fdt}"
            t0 = time.time()
            r = convert(q, out, ConvertConfig(float_dtype=fdt, teacher=str(args.teacher)), force=True)
            seconds = time.time() - t0
            row = {"qat": str(q), "float_dtype_asked": fdt, "float_dtype": r.float_dtype, "wea": r.wea,
                   "packed_file_bytes": r.footprint["packed_file_bytes"], "bound_bytes": r.footprint["bound"]["total"],
                   "bound": r.footprint["bound"], "over_bound": r.footprint["over_bound"],
                   "teacher_fp32_bytes": r.footprint["teacher_fp32_bytes"],
                   "ratio_to_teacher": r.footprint["ratio_to_teacher"], "check": r.check,
                   "convert_seconds": round(seconds, 1)}
            if fdt == "float32":
                a = evaluate_model(q, None, ecfg)
                b = evaluate_model(out, None, ecfg)
                row.update(qat_rougeL=round(a.metrics["rougeL"], 2), packed_rougeL=round(b.metrics["rougeL"], 2),
                           predictions_identical=a.predictions == b.predictions, eval_rows=len(a.predictions),
                           qat_eval_seconds=round(a.seconds, 1), packed_eval_seconds=round(b.seconds, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"machine": f"{platform.machine()}, {args.threads} threads", "torch": torch.__version__,
            "teacher": str(args.teacher), "eval_rows": args.eval_samples}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# dqtool convert on the demo teacher's QAT students", "",
             f"Machine: {meta['machine']}, torch {meta['torch']}. fp32 teacher {args.teacher}. Parity: greedy "
             f"predictions of the QAT (fake-quant) and packed students on the first {args.eval_samples} test rows.", "",
             "| QAT folder | W-E-A | floats | packed bytes | bit bound | above bound | x smaller than fp32 teacher | "
             "QAT RL | packed RL | predictions identical |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['qat']} | {r['wea']} | {r['float_dtype']} | {r['packed_file_bytes']:,} | "
                     f"{r['bound_bytes']:,} | {100 * r['over_bound']:.1f}% | {r['ratio_to_teacher']} | "
                     f"{r.get('qat_rougeL', '')} | {r.get('packed_rougeL', '')} | {r.get('predictions_identical', '')} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
