"""Microbenchmark: the integer path's per-token activation codes, the nine-op chain dqtool wrote
before 87f24e5 against the five big ops of :func:`dqtool.qmath.onnx_ops._row_scaled_matmul`.

Graphs, each on one random int8 weight ``[K, N]`` with per-column scales (the 2-bit codes' range):

* ``old``   -- Abs, ReduceMax, Div, Max (scale); Div, Round, Add 128, Cast (codes);
               MatMulInteger, Cast, Mul, Mul, Add (rescale, bias)
* ``new``   -- max(ReduceMax, -ReduceMin), Div, Max (scale); QuantizeLinear(x / s, 1, 128) (codes);
               MatMulIntegerToFloat(u8, W, 1, s_w, 128), Mul, Add
* ``dqmm``  -- com.microsoft.DynamicQuantizeMatMul: ORT's per-tensor int8 (the int8 peers' kernel;
               other semantics, the floor for one fused op)

Rows ``M`` are tokens: 1024 = batch 8 x 128 source tokens (the BART-base encoder at batch 8), 128 =
batch 1. Prints and writes median microseconds per call and ``max|new - old| / max|old|``.

Usage::

    flock /tmp/dqtool-heavy.lock .venv/bin/python benchmarks/integer_chain.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dqtool.runtimes.ort import session_options
from dqtool.stages.bench.stage import cpu_features, machine

REPO = Path(__file__).resolve().parents[1]
F = TensorProto.FLOAT
SHAPES = [(1024, 768, 3072), (1024, 3072, 768), (128, 768, 3072), (128, 3072, 768), (8, 768, 768), (1, 768, 768)]


def _c(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def graph(kind: str, k: int, n: int, rng) -> bytes:
    w = rng.integers(-2, 2, (k, n)).astype(np.int8)
    inits = [_c("W", w), _c("sw", (rng.uniform(.5, 1.5, n) * .01).astype(np.float32)), _c("b", np.zeros(n, np.float32)),
             _c("q", np.array(127.0, np.float32)), _c("eps", np.array(1e-8, np.float32)),
             _c("one", np.array(1.0, np.float32)), _c("z128", np.array(128, np.uint8)),
             _c("f128", np.array(128.0, np.float32)), _c("ax", np.array([-1], np.int64))]
    mk = helper.make_node
    nodes = []
    if kind == "old":
        nodes += [mk("Abs", ["x"], ["ab"]), mk("ReduceMax", ["ab", "ax"], ["am"], keepdims=1)]
    elif kind == "new":
        nodes += [mk("ReduceMax", ["x", "ax"], ["mx"], keepdims=1), mk("ReduceMin", ["x", "ax"], ["mn"], keepdims=1),
                  mk("Neg", ["mn"], ["nmn"]), mk("Max", ["mx", "nmn"], ["am"])]
    if kind in ("old", "new"):
        nodes += [mk("Div", ["am", "q"], ["s0"]), mk("Max", ["s0", "eps"], ["s"]), mk("Div", ["x", "s"], ["r0"])]
    if kind == "old":
        nodes += [mk("Round", ["r0"], ["r"]), mk("Add", ["r", "f128"], ["r1"]), mk("Cast", ["r1"], ["u"], to=TensorProto.UINT8),
                  mk("MatMulInteger", ["u", "W", "z128"], ["acc"]), mk("Cast", ["acc"], ["af"], to=F),
                  mk("Mul", ["af", "s"], ["y0"]), mk("Mul", ["y0", "sw"], ["y1"]), mk("Add", ["y1", "b"], ["y"])]
    elif kind == "new":
        nodes += [mk("QuantizeLinear", ["r0", "one", "z128"], ["u"]),
                  mk("MatMulIntegerToFloat", ["u", "W", "one", "sw", "z128"], ["af"], domain="com.microsoft"),
                  mk("Mul", ["af", "s"], ["y0"]), mk("Add", ["y0", "b"], ["y"])]
    else:
        nodes += [mk("DynamicQuantizeMatMul", ["x", "W", "sw", "", "b"], ["y"], domain="com.microsoft")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["M", k])],
                          [helper.make_tensor_value_info("y", F, ["M", n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]) \
        .SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "integer_chain"))
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        row, ys = {"M": m, "K": k, "N": n}, {}
        for kind in ("old", "new", "dqmm"):
            so = session_options(a.threads)
            so.log_severity_level = 3
            s = ort.InferenceSession(graph(kind, k, n, np.random.default_rng(1)), so, providers=["CPUExecutionProvider"])
            ys[kind] = s.run(None, {"x": x})[0]
            for _ in range(3):
                s.run(None, {"x": x})
            ts = []
            for _ in range(max(10, 4000 // max(m, 8))):
                t = time.perf_counter()
                s.run(None, {"x": x})
                ts.append(time.perf_counter() - t)
            row[kind + "_us"] = round(float(np.median(ts)) * 1e6, 1)
        row["new_vs_old_rel"] = float(np.abs(ys["new"] - ys["old"]).max() / np.abs(ys["old"]).max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    rep = {"machine": machine(), "cpu_features": cpu_features(), "onnxruntime": ort.__version__,
           "threads": a.threads, "rows": rows, "caveat": "one run; read ratios"}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(rep, indent=1) + "\n")
    lines = ["# Integer path, per-token activation codes: nine ops (old) vs five big ops (new)", "",
             f"onnxruntime {ort.__version__}; {rep['machine']['description']}; CPU features "
             f"{', '.join(rep['cpu_features'])}; {a.threads} threads; median microseconds per call "
             f"(`benchmarks/integer_chain.py`). dqmm = ORT's per-tensor DynamicQuantizeMatMul (other "
             f"semantics: the one-op floor).", "",
             "| M x K -> N | old | new | old / new | dqmm | max rel diff new vs old |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['M']} x {r['K']} -> {r['N']} | {r['old_us']:.0f} | {r['new_us']:.0f} | "
                     f"{r['old_us'] / r['new_us']:.2f}x | {r['dqmm_us']:.0f} | {r['new_vs_old_rel']:.1e} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("wrote", out.with_suffix(".md"))


if __name__ == "__main__":
    main()
