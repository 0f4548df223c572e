"""Microbenchmark: onnxruntime's quantized matmul kernels at BART-base decoder shapes, M=1 and M=8 (``--rows``).

Kernels, each one ONNX node on random weights (one graph per kernel and shape):

* ``matmul_fp32``       -- float MatMul (reference)
* ``matmulinteger_u8``  -- DynamicQuantizeLinear + MatMulInteger (int8 weights) + rescale, which
                          ORT fuses into DynamicQuantizeMatMul (its int8 dynamic quantization path)
* ``nbits{b}_acc4``     -- MatMulNBits, b-bit weights, block 32, accuracy_level 4 (int8 compute)
* ``nbits2_lut``        -- MatMulNBits 2-bit, block 32, with the session config ``mlas.use_lut_gemm=1``
                          (T-MAC; needs K and block multiples of 32 and N of 128)

For each: median microseconds per call (after warm-up), and how far its output is from
dqtool's training semantics -- ``block``: x quantized by :func:`dqtool.quant.quantize_activation_block`
(MatMulNBits' own int8 input quantizer) times the dequantized weight; reported as max|y - ref|
over max|ref|. Float MatMul and MatMulInteger are compared with their own semantics (float x;
per-tensor uint8 x), so the column says whether the *block* semantics hold for the nbits kernels.

The CPU is shared: run under ``flock /tmp/dqtool-heavy.lock`` and read ratios, not absolute
times. Writes ``benchmarks/results/nbits_kernels.{json,md}``.

Usage::

    flock /tmp/dqtool-heavy.lock .venv/bin/python benchmarks/nbits_kernels.py --threads 1 --iters 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from dqtool.stages.bench.stage import cpu_features, machine
from dqtool.runtimes.ort import LUT_GEMM_CONFIG
from dqtool.qmath.quant import QuantSpec, fake_quant

REPO = Path(__file__).resolve().parents[1]
# BART-base decoder Linears (K, N): self/cross q,k,v,out 768x768, fc1 768->3072, fc2 3072->768,
# lm_head 768->50265 (N not a multiple of 128: the LUT kernel does not take it).
SHAPES = {"attn_768x768": (768, 768), "fc1_768x3072": (768, 3072), "fc2_3072x768": (3072, 768),
          "lm_head_768x50265": (768, 50265)}
BLOCK = 32


def _model(nodes, inits, k, n):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def nbits_graph(codes: np.ndarray, scales: np.ndarray, bits: int, block: int, level: int = 4):
    """MatMulNBits from signed codes [N, K] (zero point 2**(bits-1)) and scales [N, K/block]."""
    n, k = codes.shape
    per = 8 // bits
    u = (codes.astype(np.int32) + (1 << (bits - 1))).reshape(n, k // per, per)
    packed = (u << (np.arange(per) * bits)).sum(-1).astype(np.uint8).reshape(n, k // block, block * bits // 8)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)
    return _model([node], [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")], k, n)


def integer_graph(codes: np.ndarray, scale: np.ndarray):
    n, k = codes.shape
    nodes = [helper.make_node("DynamicQuantizeLinear", ["A"], ["q", "s", "zp"]),
             helper.make_node("MatMulInteger", ["q", "W", "zp"], ["i"]),
             helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["s", "Ws"], ["ss"]),
             helper.make_node("Mul", ["f", "ss"], ["Y"])]
    return _model(nodes, [numpy_helper.from_array(codes.T.copy().astype(np.int8), "W"),
                          numpy_helper.from_array(scale.astype(np.float32), "Ws")], k, n)


def float_graph(w: np.ndarray):
    n, k = w.shape
    return _model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [numpy_helper.from_array(w.T.copy(), "W")], k, n)


def session(model, threads: int, lut: bool = False):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if lut:
        so.add_session_config_entry(LUT_GEMM_CONFIG, "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_us(sess, x: np.ndarray, iters: int, warmup: int = 10) -> float:
    feed = {"A": x}
    for _ in range(warmup):
        sess.run(None, feed)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t0)
    return round(statistics.median(ts) * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of " + ", ".join(SHAPES))
    ap.add_argument("--rows", default="1,8", help="comma-separated M (input rows): 1 and 8 are decode steps at "
                    "batch 1 and 8; 128 is an encoder pass over a 128-token source")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "nbits_kernels"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    aspec = QuantSpec.activation(8, granularity="block", block_size=BLOCK)
    rows = []
    for name in a.shapes.split(","):
        k, n = SHAPES[name]
        for m in (int(v) for v in a.rows.split(",")):
            x = rng.standard_normal((m, k)).astype(np.float32)
            xq = fake_quant(torch.from_numpy(x), aspec).numpy()          # training's block semantics
            row = {"shape": name, "K": k, "N": n, "M": m}
            wf = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
            kernels = {"matmul_fp32": (float_graph(wf), False, None)}
            c8 = np.clip(np.round(wf / (np.abs(wf).max(1, keepdims=True) / 127)), -127, 127).astype(np.int8)
            s8 = (np.abs(wf).max(1) / 127).astype(np.float32)
            # MatMulInteger: weights 8-bit per row; its own semantics (per-tensor uint8 x) not checked here.
            kernels["matmulinteger_u8"] = (integer_graph(c8, s8), False, None)
            for bits in (2, 4, 8):
                q = (1 << (bits - 1)) - 1
                codes = rng.integers(-q, q + 1, (n, k)).astype(np.int8)
                scales = (rng.uniform(0.5, 1.5, (n, k // BLOCK)) * 0.02).astype(np.float32)
                wdeq = (codes.reshape(n, k // BLOCK, BLOCK) * scales[..., None]).reshape(n, k)
                ref = xq @ wdeq.T
                kernels[f"nbits{bits}_acc4"] = (nbits_graph(codes, scales, bits, BLOCK), False, ref)
                if bits == 2:
                    lut_ok = k % 32 == 0 and n % 128 == 0
                    if lut_ok:
                        kernels["nbits2_lut"] = (nbits_graph(codes, scales, bits, BLOCK), True, ref)
            for kname, (model, lut, ref) in kernels.items():
                sess = session(model, a.threads, lut)
                y = sess.run(None, {"A": x})[0]
                row[kname] = {"us": time_us(sess, x, a.iters)}
                if ref is not None:
                    row[kname]["rel_err_vs_block"] = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12))
                del sess
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"machine": machine(), "cpu_features": cpu_features(), "onnxruntime": ort.__version__,
              "threads": a.threads, "iters": a.iters, "block": BLOCK, "rows": rows,
              "caveat": "one run: say beside the result what else ran on the machine; read ratios"}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    names = ["matmul_fp32", "matmulinteger_u8", "nbits2_acc4", "nbits2_lut", "nbits4_acc4", "nbits8_acc4"]
    lines = ["# onnxruntime quantized matmul kernels at BART-base decoder shapes", "",
             f"onnxruntime {ort.__version__}; {report['machine']['description']}; CPU features "
             f"{', '.join(report['cpu_features'])}; {a.threads} thread(s); median of {a.iters} calls after warm-up, "
             f"microseconds per call (one session.run, so ~5-10 us of call overhead are included). MatMulNBits "
             f"block {BLOCK}. {report['caveat']}.", "",
             "In brackets: max|y - ref| / max|ref| against dqtool's block semantics (x through "
             "quantize_activation_block, times the dequantized weight).", "",
             "| shape | M | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for r in rows:
        cells = []
        for nme in names:
            v = r.get(nme)
            if v is None:
                cells.append("n/a")
            else:
                e = v.get("rel_err_vs_block")
                cells.append(f"{v['us']:.0f}" + (f" ({e:.1e})" if e is not None else ""))
        lines.append(f"| {r['shape']} | {r['M']} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
