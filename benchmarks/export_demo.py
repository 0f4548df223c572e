"""ONNX export of the demo teacher's packed students: ops, sizes, and greedy parity with the
packed PyTorch runtime on real test rows (issue: dqtool export).

For each packed folder: ``dqtool export`` (default ``--matmul auto``), the op types in the
graphs, the initializer scan (part of every export), folder sizes, then ``dqtool eval`` of
the packed and the ONNX student on the same rows; the greedy predictions are compared.
Writes ``benchmarks/results/export_demo.{json,md}``.

Usage::

    .venv/bin/python benchmarks/export_demo.py runs/convert_demo/qat_demo-8-8-8_distill-float32 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx
import torch

from dqtool.data.pairs import DataConfig
from dqtool.stages.evaluate import EvalConfig, evaluate_model
from dqtool.stages.export import DECODER_FILE, ENCODER_FILE, ExportConfig, _all_graphs, export

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dqtool" / "assets" / "data" / "debian_synopsis"
QUANT_OPS = {"MatMulInteger", "MatMulNBits", "DynamicQuantizeLinear"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed", nargs="+", type=Path)
    ap.add_argument("--work", type=Path, default=Path("runs/export_demo"))
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export_demo")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ecfg = EvalConfig(data=str(DATA), split="test", data_cfg=DataConfig(source_max_length=128),
                      max_samples=args.eval_samples, max_length=32, batch_size=64)
    rows = []
    for p in args.packed:
        out = args.work / p.name.replace("packed", "onnx")
        r = export(p, out, ExportConfig(), force=True)
        ops = set()
        for f in (ENCODER_FILE, DECODER_FILE):
            m = onnx.load(str(out / f), load_external_data=False)
            ops |= {n.op_type for g in _all_graphs(m.graph) for n in g.node}
        a = evaluate_model(p, None, ecfg)
        b = evaluate_model(out, None, ecfg)
        same = sum(x == y for x, y in zip(a.predictions, b.predictions))
        rows.append({"packed": str(p), "wea": r.wea, "paths": r.paths, "quantized_ops": sorted(ops & QUANT_OPS),
                     "check": r.check, "sizes": r.sizes, "packed_rougeL": round(a.metrics["rougeL"], 2),
                     "onnx_rougeL": round(b.metrics["rougeL"], 2), "identical_predictions": same,
                     "rows": len(a.predictions)})
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1) + "\n")
    lines = ["# dqtool export on the demo teacher's packed students", "",
             f"Greedy predictions of the packed PyTorch runtime and of the ONNX export (dqtool's ORT runtime) on the "
             f"first {args.eval_samples} test rows; logits check from the export's own validation.", "",
             "| packed folder | W-E-A | MatMulInteger / MatMulNBits Linears | quantized ops | weights.onnx_data | "
             "graphs | logits max rel | packed RL | ONNX RL | identical predictions |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["sizes"]
        lines.append(f"| {r['packed']} | {r['wea']} | {r['paths']['integer']} / {r['paths']['nbits']} | "
                     f"{', '.join(r['quantized_ops'])} | {s['weights.onnx_data']:,} | "
                     f"{s['encoder_model.onnx'] + s['decoder_model_merged.onnx']:,} | "
                     f"{r['check']['decoder_logits_rel']:.2%} | {r['packed_rougeL']} | {r['onnx_rougeL']} | "
                     f"{r['identical_predictions']}/{r['rows']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
