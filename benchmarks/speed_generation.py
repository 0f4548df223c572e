"""Decode speed of dqtool's ONNX exports (decoder runtime and the one-graph BeamSearch generation)
against every peer, batch 1 and 8, ms per token and end to end, with the weight-bandwidth bound.

Latency does not depend on the weight values: students are layer copies of the teacher with
their quantizers prepared but not trained (the packed/exported graphs are those of a trained
student), then ``dqtool convert`` and ``dqtool export --generation-graph beam``; peers are built
by ``dqtool.stages.bench.peers`` from the same teacher and student. Shapes:

* ``--shape demo``: the demo teacher (3+3, d 128; pass ``--teacher``), student 3-2;
* ``--shape bart-base``: a facebook/bart-base-shaped teacher with random weights, student 6-3.

Each target is measured by ``dqtool bench``'s ``measure`` (encoder, greedy generate of exactly
``--new-tokens`` tokens, decode per token = (generate - encoder) / tokens). The work is split so
that each step fits one acquisition of the shared CPU lock::

    python benchmarks/speed_generation.py --shape demo --teacher runs/demo/teacher --build
    python benchmarks/speed_generation.py --shape demo --target 0-5   # targets 0..5, one lock each group
    python benchmarks/speed_generation.py --shape demo --report       # JSON + Markdown
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BART_BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                 max_position_embeddings=1024, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                 decoder_start_token_id=2, forced_eos_token_id=2)
PEERS = ("pytorch-int8-dynamic,ort-fp32,ort-int8-dynamic,ort-int4-rtn,student-ort-int8-dynamic,"
         "student-ort-int4-rtn,ctranslate2-int8")


def args_():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["demo", "bart-base"], required=True)
    ap.add_argument("--teacher", type=Path, help="demo: the trained demo teacher folder")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--student")
    ap.add_argument("--schemes", default="2-2-8,8-8-8")
    ap.add_argument("--act-granularity", default="token", choices=["token", "block"],
                    help="token: the demo recipe's asymmetric per-token activations; block: MatMulNBits' own "
                         "symmetric per-row-per-block int8 input quantizer (each decoder Linear one MatMulNBits)")
    ap.add_argument("--encoder-act-granularity", choices=["token", "tensor"],
                    help="the encoder's and cross-attention keys/values' activations (default: as "
                         "--act-granularity); token with block: the integer path over many rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--source-tokens", type=int, default=64)
    ap.add_argument("--peers", default=PEERS)
    ap.add_argument("--no-teacher", action="store_true", help="leave the PyTorch fp32 teacher row out")
    ap.add_argument("--optimum-step", action="store_true",
                    help="also a BeamSearch graph around optimum's cached decoder step (export --decoder-step "
                         "optimum), the lean step's before")
    ap.add_argument("--build", action="store_true", help="build students, exports and peers")
    ap.add_argument("--target", help="measure target K, or targets K-L (saved under WORK/rows)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--note", default="", help="a sentence for the report (e.g. how busy the machine was)")
    a = ap.parse_args()
    a.work = a.work or Path(f"runs/speed_generation_{a.shape.replace('-', '_')}")
    a.student = a.student or ("3-2" if a.shape == "demo" else "6-3")
    a.out = a.out or REPO / "benchmarks" / "results" / f"speed_generation_{a.shape.replace('-', '_')}"
    return a


def bench_cfg(a):
    from dqtool.stages.bench.stage import BenchConfig

    return BenchConfig(source_tokens=a.source_tokens, new_tokens=a.new_tokens, runs=a.runs, warmup=2,
                       threads=a.threads, batch_sizes=(1, 8), teacher=str(a.work / "teacher"),
                       student=str(a.work / f"student-{a.student}"), peers=tuple(p for p in a.peers.split(",") if p))


def _suffix(a) -> str:
    return ("-block" if a.act_granularity == "block" else "") + \
        (f"-enc-{a.encoder_act_granularity}" if a.encoder_act_granularity else "")


def exports(a) -> list[tuple[str, Path]]:
    return [(s, a.work / f"onnx-{a.student}-{s}{_suffix(a)}") for s in a.schemes.split(",")]


def _optimum_step(onnx: Path) -> Path:
    return onnx.with_name(onnx.name + "-optimum-step")


def build(a) -> None:
    from dqtool.formats.hf import load_seq2seq
    from dqtool.formats.manifest import write_manifest
    from dqtool.formats.qat import save_qat
    from dqtool.model.qmodules import prepare
    from dqtool.qmath.scheme import QuantScheme
    from dqtool.stages.bench.peers import build_peers
    from dqtool.stages.convert import ConvertConfig, convert
    from dqtool.stages.distill import DistillConfig, distill
    from dqtool.stages.export import ExportConfig, export

    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    teacher = w / "teacher"
    if not teacher.exists():
        if a.shape == "demo":
            teacher.symlink_to(a.teacher.resolve())
        else:
            from transformers import BartConfig, BartForConditionalGeneration, BartTokenizerFast

            torch.manual_seed(0)
            BartForConditionalGeneration(BartConfig(**BART_BASE)).save_pretrained(teacher)
            BartTokenizerFast.from_pretrained(REPO / "dqtool" / "assets" / "tokenizer" / "debian_bpe8k") \
                .save_pretrained(teacher)
    enc, dec = (int(x) for x in a.student.split("-"))
    student = w / f"student-{a.student}"
    if not student.exists():
        distill(teacher, student, DistillConfig(encoder_layers=enc, decoder_layers=dec))
    for wea, onnx in exports(a):
        block = a.act_granularity == "block"
        scheme = QuantScheme.from_wea(wea, act_symmetric=block, quantize_attention=False,
                                      act_granularity=a.act_granularity,
                                      encoder_act_granularity=a.encoder_act_granularity)
        qat = w / f"qat-{a.student}-{wea}{_suffix(a)}"
        if not qat.exists():
            model, tok = load_seq2seq(student)
            prepare(model, scheme)
            qat.mkdir(parents=True)
            save_qat(model, tok, qat, scheme)
            write_manifest(qat, "qat", {"student": str(student)}, {"note": "untrained: latency only"})
        packed = w / f"packed-{a.student}-{wea}{_suffix(a)}"
        if not packed.exists():
            convert(qat, packed, ConvertConfig(float_dtype="float32", teacher=str(teacher), check_samples=2))
        if not onnx.exists():
            export(packed, onnx, ExportConfig(generation_graph="beam"))
        if a.optimum_step and not _optimum_step(onnx).exists():
            export(packed, _optimum_step(onnx), ExportConfig(generation_graph="beam", decoder_step="optimum"))
    cfg = bench_cfg(a)
    build_peers(cfg.peers, cfg.teacher, cfg.student, w / "peers", a.threads)


def targets(a):
    from dqtool.formats.onnx import GENERATION_FILE
    from dqtool.stages.bench.peers import build_peers
    from dqtool.stages.bench.target import folder_target

    cfg = bench_cfg(a)
    out = []
    for wea, onnx in exports(a):
        out.append(folder_target(onnx, "dqtool", a.threads, f"dqtool {a.student} {wea} (ONNX, decoder runtime)"))
        out.append(folder_target(onnx / "onnx" / GENERATION_FILE, "dqtool", a.threads,
                                 f"dqtool {a.student} {wea} (ONNX, one BeamSearch graph)"))
        if a.optimum_step:
            out.append(folder_target(_optimum_step(onnx) / "onnx" / GENERATION_FILE, "dqtool", a.threads,
                                     f"dqtool {a.student} {wea} (ONNX, one BeamSearch graph, optimum's decoder step)"))
    if not a.no_teacher:
        out.append(folder_target(a.work / "teacher", "teacher", a.threads, "teacher fp32 (PyTorch)"))
    out += build_peers(cfg.peers, cfg.teacher, cfg.student, a.work / "peers", a.threads, log=lambda m: None)
    return out


def measure_one(a, k: int) -> None:
    from dqtool.stages.bench.stage import measure

    torch.set_num_threads(a.threads)
    import os

    t = targets(a)[k]
    before = os.getloadavg()[0]
    row = measure(t, bench_cfg(a))
    # the machine is shared: the 1-minute load average around the measurement says how busy it was
    row["loadavg_1min"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    (a.work / "rows").mkdir(exist_ok=True)
    (a.work / "rows" / f"{k:02d}.json").write_text(json.dumps(row, indent=1) + "\n")
    lat = row["latency"]
    print(f"{row['name']}: " + "; ".join(f"batch {b}: {v['decode_per_token']['median_ms']} ms/token, generate "
                                         f"{v['generate']['median_ms']} ms" for b, v in lat.items()))


def copy_bandwidth_gbs(mb: int = 256, reps: int = 5) -> float:
    """One-thread memory read+write bandwidth (numpy copy of a buffer far larger than the caches), GB/s
    counted as bytes read (a decode step reads its weights)."""
    src = np.ones(mb << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return src.nbytes / best / 1e9


def per_token_weights(teacher: Path, dec_layers: int) -> tuple[int, int, int]:
    """Weights one decode step reads: (decoder Linears run per token, lm_head, total). Cross-attention
    keys/values are computed once from the encoder output, not per token."""
    c = json.loads((teacher / "config.json").read_text())
    d, ffn, vocab = c["d_model"], c["decoder_ffn_dim"], c["vocab_size"]
    layers = dec_layers * (4 * d * d + 2 * d * d + 2 * d * ffn)
    return layers, d * vocab, layers + d * vocab


def report(a) -> None:
    from dqtool.stages.bench.stage import cpu_features, machine

    rows = [json.loads(f.read_text()) for f in sorted((a.work / "rows").glob("*.json"))]
    bw = copy_bandwidth_gbs()
    layers, head, total = per_token_weights(a.work / "teacher", int(a.student.split("-")[1]))
    bounds = {}
    for wea, _ in exports(a):
        w_bits, e_bits = int(wea.split("-")[0]), int(wea.split("-")[1])
        nbytes = layers * w_bits / 8 + head * e_bits / 8
        bounds[wea] = {"bytes": int(nbytes), "ms": round(nbytes / (bw * 1e9) * 1e3, 4)}
    import onnxruntime

    rep = {"machine": machine(), "cpu_features": cpu_features(), "onnxruntime": onnxruntime.__version__,
           "shape": a.shape, "student": a.student, "threads": a.threads, "source_tokens": a.source_tokens,
           "new_tokens": a.new_tokens, "runs": a.runs, "batch_sizes": [1, 8], "copy_bandwidth_gbs": round(bw, 2),
           "per_token_weights": {"decoder_linears": layers, "lm_head": head, "total": total},
           "weight_bandwidth_bound": bounds, "rows": rows, "note": a.note,
           "act_granularity": a.act_granularity, "encoder_act_granularity": a.encoder_act_granularity,
           "command": f"benchmarks/speed_generation.py --shape {a.shape} --student {a.student} --schemes {a.schemes} "
                      f"--peers {a.peers} {'--no-teacher ' if a.no_teacher else ''}"
                      f"{'--optimum-step ' if a.optimum_step else ''}"
                      f"--act-granularity {a.act_granularity} "
                      + (f"--encoder-act-granularity {a.encoder_act_granularity} " if a.encoder_act_granularity else "")
                      + f"--threads {a.threads} --runs {a.runs} --new-tokens {a.new_tokens} --source-tokens "
                      f"{a.source_tokens} (--build, --target K for each target, --report; each under "
                      f"flock /tmp/dqtool-heavy.lock)"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(rep, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(markdown(rep))
    plot(rep, a.out.with_suffix(".png"))
    print(markdown(rep))


def _machine_text(m) -> str:
    return m.get("description", str(m)) if isinstance(m, dict) else str(m)


def plot(rep: dict, path: Path) -> None:
    """``path``: end-to-end generate time per model at batch 1 and 8 (horizontal bars, fastest first at
    batch 1; dqtool's rows dark), from the report's rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rep["rows"], key=lambda r: r["latency"]["1"]["generate"]["median_ms"])
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.5), sharey=True)
    for ax, b in zip(axes, ("1", "8")):
        vals = [r["latency"].get(b, {}).get("generate", {}).get("median_ms", 0) for r in rows]
        colors = ["#1f3b73" if r.get("role") == "dqtool" or r["name"].startswith("dqtool") else "#9bb0d3" for r in rows]
        ax.barh(range(len(rows)), vals, color=colors)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
        ax.set_title(f"batch {b}: generate {rep['new_tokens']} tokens (ms, lower is better)", fontsize=10)
        ax.set_xlim(0, max(vals) * 1.18)
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels(names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"{rep['shape']} shape, student {rep['student']}, {rep['source_tokens']} source tokens, "
                 f"{rep['threads']} threads, {_machine_text(rep['machine'])}, onnxruntime {rep['onnxruntime']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rep: dict) -> str:
    def lat(r, b, *k):
        x = r["latency"].get(str(b), {})
        for p in k:
            x = x.get(p, {}) if isinstance(x, dict) else {}
        return x if not isinstance(x, dict) else None

    ref = {b: min(lat(r, b, "generate", "median_ms") for r in rep["rows"]) for b in (1, 8)}
    lines = [f"# Decode speed, {rep['shape']} shape: dqtool ONNX (decoder runtime and one BeamSearch graph) vs peers", "",
             f"Command: `{rep['command']}`", "",
             f"{rep['machine'].get('description', '')}; CPU features {', '.join(rep['cpu_features'])}; onnxruntime "
             f"{rep['onnxruntime']}; {rep['threads']} threads; {rep['source_tokens']} source tokens, exactly "
             f"{rep['new_tokens']} greedy tokens; median of {rep['runs']} runs after 2 warm-up runs; every row "
             f"measured in this run, one target per lock acquisition. Students are untrained layer copies "
             f"({rep['student']}) of the teacher (latency does not depend on weight values), activations "
             f"per {rep.get('act_granularity', 'token')}"
             + (f" (encoder and cross-attention keys/values per {rep['encoder_act_granularity']})"
                if rep.get("encoder_act_granularity") else "") + ". ms/token = "
             f"(generate - encoder) / tokens; the BeamSearch graph's encoder is timed with the folder's encoder "
             f"graph (the same ops its encoder subgraph runs). With the config's forced EOS the BeamSearch "
             f"graph runs one decoder step fewer than the step-by-step runtimes (the op is given max_length - 1 "
             f"and the forced EOS is appended: the same tokens), about 1/{rep['new_tokens']} of the decode time."
             + (f" {rep['note']}" if rep.get("note") else ""), "",
             "| model | MB | b1 encoder ms | b1 ms/token | b1 generate ms | b8 ms/token | b8 generate ms | b8 tokens/s "
             "| b1 generate vs fastest | load avg (before, after) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rep["rows"], key=lambda r: lat(r, 1, "generate", "median_ms")):
        e = lat(r, 1, "encoder", "median_ms")
        lines.append(
            f"| {r['name']} | {r['bytes']['total'] / 1e6:.2f} | {'' if e is None else f'{e:.2f}'} | "
            f"{lat(r, 1, 'decode_per_token', 'median_ms'):.3f} | {lat(r, 1, 'generate', 'median_ms'):.1f} | "
            f"{lat(r, 8, 'decode_per_token', 'median_ms'):.3f} | {lat(r, 8, 'generate', 'median_ms'):.1f} | "
            f"{lat(r, 8, 'tokens_per_s')} | {lat(r, 1, 'generate', 'median_ms') / ref[1]:.2f}x | "
            f"{r.get('loadavg_1min', '')} |")
    pw = rep["per_token_weights"]
    lines += ["", f"Weight-bandwidth bound: a decode step reads {pw['total'] / 1e6:.2f}M weights (decoder Linears "
              f"{pw['decoder_linears'] / 1e6:.2f}M, lm_head {pw['lm_head'] / 1e6:.2f}M); one-thread copy bandwidth "
              f"{rep['copy_bandwidth_gbs']} GB/s (numpy copy of 256 MB)."]
    for wea, b in rep["weight_bandwidth_bound"].items():
        mine = [r for r in rep["rows"] if r["role"] == "dqtool" and f" {wea} " in r["name"]]
        best = min((lat(r, 1, "decode_per_token", "median_ms") for r in mine), default=None)
        lines.append(f"- {wea}: {b['bytes'] / 1e6:.2f} MB of packed weights per token -> {b['ms']:.3f} ms/token at that "
                     f"bandwidth; dqtool's best batch-1 decode {best:.3f} ms/token = {best / b['ms']:.1f}x the bound"
                     + (" (the weights fit in the caches at this size: the bound is not what limits it)"
                        if b["bytes"] < 8 << 20 else "") + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    a = args_()
    if a.build:
        build(a)
    if a.target is not None:
        lo, _, hi = a.target.partition("-")
        for k in range(int(lo), int(hi or lo) + 1):
            measure_one(a, k)
    if a.report:
        report(a)
    if not (a.build or a.target is not None or a.report):
        for i, t in enumerate(targets(a)):
            print(i, t.name)


if __name__ == "__main__":
    main()
