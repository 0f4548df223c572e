"""Greedy-token parity of ONNX exports with the packed PyTorch runtime on the demo teacher's
students, per-tensor vs per-token activation ranges (issue: dqtool export must-show).

For each activation granularity (``tensor``: DQ-BART's per-batch range; ``token``: one range
per row, dqtool's default) and each W-E-A scheme, through dqtool's Python API:

    qat      the 2+1 layer-copied student, demo-recipe settings (task + logits KL, asymmetric
             activations, attention products in float)
    convert  packed ints;  export  ONNX (default --matmul auto)
    eval     packed and ONNX, on the first N test rows, at batch 64 and at batch 1

and counts rows whose greedy predictions are identical: packed vs ONNX (the must-show), and
each runtime batched vs alone (batch invariance). As the floor every float model has, the
float teacher in PyTorch is compared with optimum's fp32 ONNX export of it in the same way.
Writes ``benchmarks/results/export_parity_demo.{json,md}``. Finished folders are reused;
``export_parity_divergences.py`` then examines the rows that still differ.

Usage::

    .venv/bin/python benchmarks/export_parity_demo.py --teacher runs/teacher_demo --student runs/qat_demo/student
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
from dqtool.stages.export import ExportConfig, export
from dqtool.model.losses import LossConfig
from dqtool.stages.qat import QATConfig, qat
from dqtool.qmath.scheme import QuantScheme

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dqtool" / "assets" / "data" / "debian_synopsis"


def _same(a, b) -> int:
    return sum(x == y for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--student", type=Path, required=True, help="a 'dqtool distill' folder of the teacher")
    ap.add_argument("--work", type=Path, default=Path("runs/export_parity"))
    ap.add_argument("--schemes", default="8-8-8,4-4-8,2-2-8")
    ap.add_argument("--granularities", default="tensor,token")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export_parity_demo")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    def predictions(folder: Path, batch: int) -> tuple[list[str], float]:
        cfg = EvalConfig(data=str(DATA), split="test", data_cfg=DataConfig(source_max_length=128),
                         max_samples=args.eval_samples, max_length=32, batch_size=batch)
        r = evaluate_model(folder, None, cfg)
        return r.predictions, round(r.metrics["rougeL"], 2)

    def compare(name: str, ref: Path, onnx_dir: Path, extra: dict) -> dict:
        p64, rl_p = predictions(ref, 64)
        o64, rl_o = predictions(onnx_dir, 64)
        p1, _ = predictions(ref, 1)
        o1, _ = predictions(onnx_dir, 1)
        row = {"model": name, **extra, "rows": len(p64), "ref_rougeL": rl_p, "onnx_rougeL": rl_o,
               "same_b64": _same(p64, o64), "same_b1": _same(p1, o1),
               "ref_b1_vs_b64": _same(p1, p64), "onnx_b1_vs_b64": _same(o1, o64)}
        print(json.dumps(row), flush=True)
        return row

    rows = []
    # The floor: a float model and its optimum fp32 ONNX export.
    from dqtool.stages.bench.peers import _ort_fp32_folder

    fp32 = _ort_fp32_folder(args.teacher, work, "teacher-", print)
    rows.append(compare("teacher, float (PyTorch vs optimum fp32 ONNX)", args.teacher, fp32,
                        {"granularity": "-", "wea": "float"}))
    for gran in args.granularities.split(","):
        for wea in args.schemes.split(","):
            tag = f"{wea}-{gran}"
            q, p, o = work / f"qat-{tag}", work / f"packed-{tag}", work / f"onnx-{tag}"
            t0 = time.time()
            if not q.exists():
                scheme = QuantScheme.from_wea(wea, act_symmetric=False, act_granularity=gran,
                                              quantize_attention=False)
                qat(args.student, q, QATConfig(data=str(DATA), scheme=scheme, losses=LossConfig(),
                                               max_steps=args.steps, batch_size=16, learning_rate=5e-4,
                                               source_max_length=128, target_max_length=32,
                                               save_steps=args.steps), teacher=args.teacher, progress=False)
            if not p.exists():
                convert(q, p, ConvertConfig())
            check = export(p, o, ExportConfig(), force=True).check
            rows.append(compare(f"student 2+1 {wea}, activations per {gran} (packed vs ONNX)", p, o,
                                {"granularity": gran, "wea": wea, "logits_rel": check["decoder_logits_rel"],
                                 "seconds": round(time.time() - t0, 1)}))
    meta = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
            "torch": torch.__version__, "teacher": str(args.teacher), "student": str(args.student),
            "eval_rows": args.eval_samples, "decode": "greedy, max 32 tokens", "qat_steps": args.steps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Greedy parity: ONNX export vs packed PyTorch runtime (demo teacher's 2+1 students)", "",
             f"Machine: {meta['machine']}, torch {meta['torch']}. Test split, first {args.eval_samples} rows, "
             f"{meta['decode']}. QAT {args.steps} steps (task + logits KL T=2, asymmetric activations, attention "
             f"products float). Counts are rows whose whole prediction is identical.", "",
             "| model | RL (ref / ONNX) | same, batch 64 | same, batch 1 | ref batch 1 vs 64 | ONNX batch 1 vs 64 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = r["rows"]
        lines.append(f"| {r['model']} | {r['ref_rougeL']} / {r['onnx_rougeL']} | {r['same_b64']}/{n} | "
                     f"{r['same_b1']}/{n} | {r['ref_b1_vs_b64']}/{n} | {r['onnx_b1_vs_b64']}/{n} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
