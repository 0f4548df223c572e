"""Quantized learned positions vs float positions on a small trained BART (quick check).

Trains (or reuses) a teacher with ``benchmarks/teacher/train_teacher.py --size demo``
(optionally fewer steps), copies a student, runs the same QAT twice per scheme -- learned
positions in float (``--pos-bits none``) and quantized at the E bits (``--pos-bits e``),
same seed, data, steps and losses (task + logits KL) -- converts both (float32 floats,
bit-exact) and evaluates the packed students greedily on the test split.

Writes ``benchmarks/results/positions_demo.{json,md}``. Usage (heavy)::

    flock /tmp/dqtool-heavy.lock .venv/bin/python benchmarks/positions_demo.py --work runs/positions_demo
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from dqtool.data.pairs import DataConfig
from dqtool.model.losses import LossConfig
from dqtool.qmath.scheme import QuantScheme
from dqtool.stages.convert import ConvertConfig, convert
from dqtool.stages.distill import DistillConfig, distill
from dqtool.stages.evaluate import EvalConfig, evaluate_model
from dqtool.stages.qat import QATConfig, qat

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dqtool" / "assets" / "data" / "debian_synopsis"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/positions_demo"))
    ap.add_argument("--teacher", type=Path, default=None, help="a trained teacher (default: train one into WORK)")
    ap.add_argument("--teacher-steps", type=int, default=None, help="train_teacher.py --steps (default: its recipe)")
    ap.add_argument("--encoder-layers", type=int, default=2)
    ap.add_argument("--decoder-layers", type=int, default=1)
    ap.add_argument("--schemes", default="2-2-8,8-8-8")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "positions_demo")
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher or work / "teacher"
    if not teacher.exists():
        cmd = [sys.executable, str(REPO / "benchmarks" / "teacher" / "train_teacher.py"), "--size", "demo",
               "--out", str(teacher)] + (["--steps", str(args.teacher_steps)] if args.teacher_steps else [])
        subprocess.run(cmd, check=True)
    student = work / "student"
    if not student.exists():
        distill(teacher, student, DistillConfig(encoder_layers=args.encoder_layers,
                                                decoder_layers=args.decoder_layers))
    ecfg = EvalConfig(data=str(DATA), split="test", data_cfg=DataConfig(source_max_length=128),
                      max_samples=args.eval_samples, max_length=32, batch_size=64)
    rows = []
    t = evaluate_model(str(teacher), None, ecfg)
    rows.append({"model": "teacher (float)", **{k: round(v, 2) for k, v in t.metrics.items()}})
    for wea in args.schemes.split(","):
        for pos in ("none", "e"):
            scheme = QuantScheme.from_wea_pos(wea, pos)
            q = work / f"qat-{wea}-pos-{pos}"
            t0 = time.time()
            if not q.exists():
                qat(student, q, QATConfig(data=str(DATA), scheme=scheme, losses=LossConfig(), max_steps=args.steps,
                                          batch_size=16, learning_rate=5e-4, source_max_length=128,
                                          target_max_length=32, save_steps=args.steps, seed=args.seed),
                    progress=False)
            p = work / f"packed-{wea}-pos-{pos}"
            if not p.exists():
                convert(q, p, ConvertConfig(float_dtype="float32", check_samples=2))
            r = evaluate_model(str(p), None, ecfg)
            rows.append({"model": f"{args.encoder_layers}+{args.decoder_layers} {wea}", "pos_bits": scheme.pos_bits,
                         **{k: round(v, 2) for k, v in r.metrics.items()},
                         "packed_bytes": (p / "packed.safetensors").stat().st_size,
                         "seconds": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
    meta = {"machine": f"{platform.machine()}, 2 threads (shared machine)", "torch": torch.__version__,
            "teacher": str(teacher), "teacher_steps": args.teacher_steps, "qat_steps": args.steps, "seed": args.seed,
            "eval_rows": args.eval_samples, "decode": "greedy, max 32 tokens", "losses": "task + logits KL T=2"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Quantized learned positions vs float (small trained BART)", "",
             f"Teacher: demo BART trained here ({args.teacher_steps or 'recipe'} steps); student "
             f"{args.encoder_layers}+{args.decoder_layers}, QAT {args.steps} steps (task + logits KL, seed "
             f"{args.seed}), packed with float32 floats; test split, first {args.eval_samples} rows, greedy. One "
             f"seed: differences below ~0.5 ROUGE-L are within the seed spread measured in qat_kd_summary.md.", "",
             "| model | positions | ROUGE-1 | ROUGE-2 | ROUGE-L | packed.safetensors bytes |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        pos = "" if "pos_bits" not in r else ("float" if r["pos_bits"] is None else f"{r['pos_bits']}-bit")
        lines.append(f"| {r['model']} | {pos} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | "
                     f"{r.get('packed_bytes', '')} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
