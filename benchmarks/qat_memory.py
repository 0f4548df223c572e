"""Peak memory of ``dqtool qat`` by model size and batch: measured on this CPU at BART-base
shape, computed from dqtool's estimator for bart-large and for a bf16 GPU.

Measured: one QAT step (2-2-8, default losses: task + logits KL, so the teacher is
loaded) of a 6-3 student of a random-weight BART-base teacher, sources of 1024 tokens and
targets of 64, batch 1 and 2, and batch 2 with ``--gradient-checkpointing``; each run is
its own process and its peak RSS is read with ``os.wait4``. The estimate ``dqtool qat``
printed before training is recorded beside it. Computed rows call
:func:`dqtool.model.memory.estimate` with parameter counts of models built on the meta device.

Writes ``benchmarks/results/qat_memory.{json,md}``. Usage (heavy: run alone)::

    flock /tmp/dqtool-heavy.lock .venv/bin/python benchmarks/qat_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from stages_real_sizes import _BUILD, SHAPES, TOKENIZER, run_stage  # noqa: E402

LARGE = dict(SHAPES["bart-base"][1], d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
             decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096)


def long_data(folder: Path, rows: int, words: int) -> Path:
    """JSONL splits whose sources are ``words`` words (over 1024 BPE tokens: truncated)."""
    src = [json.loads(x) for x in (REPO / "dqtool/assets/data/debian_synopsis/train.jsonl").read_text().splitlines()]
    vocab = sorted({w for r in src[:2000] for w in r["source"].split()})
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(rows):
                f.write(json.dumps({"source": " ".join(rng.choice(vocab) for _ in range(words)),
                                    "target": " ".join(rng.choice(vocab) for _ in range(60))}) + "\n")
    return folder


def computed(shape_cfg: dict, student: tuple[int, int], batch: int, src: int, tgt: int, device: str,
             mixed: str | None, checkpointing: bool) -> dict:
    import torch
    from transformers import AutoModelForSeq2SeqLM, BartConfig

    from dqtool.model.memory import estimate
    from dqtool.stages.qat import _unique_numel
    from dqtool.model.registry import linears, spec_for

    tcfg = BartConfig(**shape_cfg)
    scfg = BartConfig(**{**shape_cfg, "encoder_layers": student[0], "decoder_layers": student[1]})
    with torch.device("meta"):
        teacher = AutoModelForSeq2SeqLM.from_config(tcfg)
        model = AutoModelForSeq2SeqLM.from_config(scfg)
    quantized = _unique_numel([m.weight for m in linears(model, spec_for(scfg)).values()]
                              + [model.model.shared.weight])
    n = _unique_numel(model.parameters())
    e = estimate(scfg, student_params=n, quantized_params=quantized, trainable_params=n,
                 teacher_params=_unique_numel(teacher.parameters()), teacher_bytes=2 if mixed == "bf16" else 4,
                 batch=batch, source_len=src, target_len=tgt, device=device, mixed_precision=mixed,
                 checkpointing=checkpointing)
    return {"estimate_gib": round(e.total / 2**30, 2), "parts": e.parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "qat_memory")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--source-tokens", type=int, default=1024)
    ap.add_argument("--target-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "qat_memory")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "dqtool.cli"]
    w = args.work
    logs = w / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    teacher, student = w / "teacher", w / "student"
    if not teacher.exists():
        run_stage("build teacher", [sys.executable, "-c", _BUILD, "bart", json.dumps(SHAPES["bart-base"][1]),
                                    str(teacher), str(TOKENIZER)], logs, 600, env)
    if not student.exists():
        run_stage("distill", cli + ["distill", str(teacher), str(student), "--encoder-layers", "6",
                                    "--decoder-layers", "3"], logs, 600, env)
    data = long_data(w / "data", 8, 1100)
    runs = [(int(b), False) for b in args.batches.split(",")] + [(int(args.batches.split(",")[-1]), True)]
    measured = []
    for batch, ckpt in runs:
        name = f"qat-b{batch}" + ("-ckpt" if ckpt else "")
        r = run_stage(name, cli + ["qat", str(student), str(w / name), "--data", str(data), "--wea", "2-2-8",
                                   "--max-steps", "1", "--batch-size", str(batch), "--max-train-samples", str(batch),
                                   "--source-max-length", str(args.source_tokens), "--target-max-length",
                                   str(args.target_tokens), "--save-steps", "100", "--force"]
                      + (["--gradient-checkpointing"] if ckpt else []), logs, 1200, env)
        est = re.search(r"total \(peak, \+-25%\)\s+([\d.]+) GiB", Path(r["log"]).read_text())
        r.update(batch=batch, checkpointing=ckpt, estimate_gib=float(est.group(1)) if est else None)
        measured.append(r)
    base = SHAPES["bart-base"][1]
    comp = []
    for label, shape, student_layers in (("bart-base 6-3", base, (6, 3)), ("bart-large 12-6", LARGE, (12, 6))):
        for device, mixed in (("cpu", None), ("cuda", "bf16")):
            for batch in (1, 4, 16):
                for ckpt in (False, True):
                    c = computed(shape, student_layers, batch, args.source_tokens, args.target_tokens, device, mixed,
                                 ckpt)
                    comp.append({"model": label, "device": device if not mixed else f"{device} {mixed}",
                                 "batch": batch, "checkpointing": ckpt, **c})
    report = {"source_tokens": args.source_tokens, "target_tokens": args.target_tokens, "measured": measured,
              "computed": comp}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    gib = 2 ** 30
    lines = ["# Peak memory of dqtool qat (2-2-8, task + logits KL, teacher loaded)", "",
             f"Sources of {args.source_tokens} tokens, targets of {args.target_tokens}. **Measured**: peak RSS of one "
             "training step on this CPU (2 cores, float32), one process per run, beside the estimate `dqtool qat` "
             "printed before training. **Computed**: `dqtool.model.memory.estimate` only (no run).", "",
             "| model | device | batch | grad. checkpointing | measured peak RSS GiB | estimate GiB | source |",
             "|---|---|---:|---|---:|---:|---|"]
    for r in measured:
        lines.append(f"| bart-base 6-3 | cpu | {r['batch']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{r['peak_rss_mib'] * 2**20 / gib:.2f} | {r['estimate_gib']} | measured |")
    for c in comp:
        lines.append(f"| {c['model']} | {c['device']} | {c['batch']} | {'yes' if c['checkpointing'] else 'no'} | | "
                     f"{c['estimate_gib']:.2f} | computed |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
