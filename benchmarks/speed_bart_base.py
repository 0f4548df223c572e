"""Decode latency at facebook/bart-base's shape: dqtool's ONNX vs the peers, same run, same CPU.

Latency does not depend on the weight values, so a BART-base-shaped teacher (d 768, 6+6
layers, FFN 3072, vocab 50265) is built from its config with random weights, saved, and
then everything goes through the real code: ``dqtool distill`` (6+6 -> E+D), a QAT folder
written without training (prepare + save: the packed/exported graph is the same as after
training), ``dqtool convert``, ``dqtool export``, and ``dqtool bench``'s latency measurement
with the peers built by ``dqtool.stages.bench.peers`` from the same teacher. Quality is not measured
(random weights). Writes ``benchmarks/results/speed_bart_base.{json,md}``.

Usage::

    .venv/bin/python benchmarks/speed_bart_base.py --threads 2 --student 6-3 --wea 2-2-8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import BartConfig, BartForConditionalGeneration

from dqtool.stages.bench.stage import BenchConfig, machine, measure
from dqtool.stages.bench.target import folder_target
from dqtool.stages.convert import ConvertConfig, convert
from dqtool.stages.distill import DistillConfig, distill
from dqtool.stages.export import ExportConfig, export
from dqtool.formats.hf import load_seq2seq
from dqtool.formats.manifest import write_manifest
from dqtool.stages.bench.peers import build_peers
from dqtool.formats.qat import save_qat
from dqtool.model.qmodules import prepare
from dqtool.qmath.scheme import QuantScheme

REPO = Path(__file__).resolve().parents[1]
BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
            decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/speed_bart_base"))
    ap.add_argument("--student", default="6-3")
    ap.add_argument("--wea", default="2-2-8")
    ap.add_argument("--act-granularity", default="token", choices=["token", "tensor", "block"],
                    help="activation ranges of the dqtool student (folders of 'tensor' runs have no suffix); "
                         "block: MatMulNBits' own input quantizer (symmetric, every Linear MatMulNBits)")
    ap.add_argument("--lut-gemm", action="store_true", help="export with onnxruntime's LUT kernel for 2-bit Linears")
    ap.add_argument("--act-symmetric", action="store_true", help="symmetric activation codes (default asymmetric)")
    ap.add_argument("--also", type=Path, nargs="*", default=[],
                    help="more dqtool ONNX folders to measure in the same run (e.g. the other granularity)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--source-tokens", type=int, default=128)
    ap.add_argument("--peers", default="pytorch-int8-dynamic,ort-fp32,ort-int8-dynamic,ort-int4-rtn,"
                    "student-ort-int8-dynamic,student-ort-int4-rtn,ctranslate2-int8")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speed_bart_base")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = args.work
    teacher = w / "teacher"
    if not teacher.exists():
        from transformers import BartTokenizerFast

        torch.manual_seed(0)
        BartForConditionalGeneration(BartConfig(**BASE)).save_pretrained(teacher)
        # Any BART tokenizer works for latency; the bundled one (8k tokens) maps ids < 8000.
        BartTokenizerFast.from_pretrained(REPO / "dqtool" / "assets" / "tokenizer" / "debian_bpe8k").save_pretrained(
            teacher)
    enc, dec = (int(x) for x in args.student.split("-"))
    student = w / f"student-{enc}-{dec}"
    if not student.exists():
        distill(teacher, student, DistillConfig(encoder_layers=enc, decoder_layers=dec))
    if args.act_granularity == "block":
        args.act_symmetric = True          # MatMulNBits' int8 input quantizer is symmetric
    scheme = QuantScheme.from_wea(args.wea, act_symmetric=args.act_symmetric, quantize_attention=False,
                                  act_granularity=args.act_granularity)
    tag = f"{args.student}-{args.wea}" + ({"token": "-token", "block": "-block"}.get(args.act_granularity, "")) \
        + ("-sym" if args.act_symmetric else "")
    qat_dir = w / f"qat-{tag}"
    if not qat_dir.exists():
        model, tok = load_seq2seq(student)
        prepare(model, scheme)
        qat_dir.mkdir(parents=True)
        save_qat(model, tok, qat_dir, scheme)
        write_manifest(qat_dir, "qat", {"student": str(student)}, {"note": "untrained: latency only"})
    packed = w / f"packed-{tag}"
    if not packed.exists():
        convert(qat_dir, packed, ConvertConfig(float_dtype="float32", teacher=str(teacher), check_samples=2))
    onnx = w / (f"onnx-{tag}" + ("-lut" if args.lut_gemm else ""))
    if not onnx.exists():
        export(packed, onnx, ExportConfig(lut_gemm=args.lut_gemm))
    cfg = BenchConfig(source_tokens=args.source_tokens, new_tokens=args.new_tokens, runs=args.runs, warmup=2,
                      threads=args.threads, teacher=str(teacher), student=str(student),
                      peers=tuple(p for p in args.peers.split(",") if p))
    targets = [folder_target(onnx, "dqtool", args.threads,
                             f"dqtool {args.student} {args.wea} per-{args.act_granularity} (ONNX)")]
    targets += [folder_target(p, "dqtool", args.threads, f"dqtool {p.name} (ONNX)") for p in args.also]
    targets += [folder_target(teacher, "teacher", args.threads, "teacher fp32 (PyTorch)")]
    targets += build_peers(cfg.peers, str(teacher), str(student), w / "peers", args.threads)
    rows = []
    for t in targets:
        r = measure(t, cfg)
        rows.append(r)
        lat = r["latency"]["1"]
        print(f"{r['name']}: {r['bytes']['total']:,} bytes, decode {lat['decode_per_token']['median_ms']} ms/token, "
              f"generate {lat['generate']['median_ms']} ms", flush=True)
    report = {"machine": machine(), "threads": args.threads, "student": args.student, "wea": args.wea,
              "act_granularity": args.act_granularity,
              "source_tokens": args.source_tokens, "new_tokens": args.new_tokens, "runs": args.runs, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    d = rows[0]["latency"]["1"]["decode_per_token"]["median_ms"]
    lines = ["# Decode latency at BART-base shape (random weights; latency only)", "",
             f"{report['machine']['description']}, {args.threads} threads, batch 1, {args.source_tokens} source "
             f"tokens, {args.new_tokens} greedy tokens, median of {args.runs} runs (p10-p90). dqtool: student "
             f"{args.student} of a 6+6 teacher at {args.wea} ({'symmetric' if args.act_symmetric else 'asymmetric'} activations per {args.act_granularity}, float "
             f"attention products).", "",
             "| model | MB | encoder ms | decode ms/token | generate ms | dqtool decode speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lat = r["latency"]["1"]
        enc_ms = f"{lat['encoder']['median_ms']:.1f}" if lat.get("encoder") else ""
        p = lat["decode_per_token"]
        lines.append(f"| {r['name']} | {r['bytes']['total'] / 1e6:.1f} | {enc_ms} | "
                     f"{p['median_ms']:.2f} [{p['p10_ms']:.2f}-{p['p90_ms']:.2f}] | {lat['generate']['median_ms']:.0f} | "
                     f"{p['median_ms'] / d:.2f}x |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
