"""Where a decoder step's time goes besides the quantized matmuls: the merged decoder's If node
and the rest (shape ops, activation-quantization ops), on an export written with
``--generation-graph beam`` (whose decoder subgraph is the merged decoder's cached branch with no If).

Usage::

    python benchmarks/decoder_step_overhead.py runs/speed_generation_demo/onnx-3-2-2-2-8 --out benchmarks/results/decoder_step_overhead_demo

Times, interleaved in one process (so machine load hits both alike), one batch-1 decode step
(past length 9, 64 source tokens, 1 thread) of (a) dqtool's runtime step on the merged decoder
(If node, use_cache_branch True) and (b) the same cached branch as a graph of its own (no If);
counts the nodes of (b) after ONNX Runtime's optimizations by kind.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Slice", "Range", "Where", "Equal", "Expand",
         "ConstantOfShape", "Squeeze", "Transpose", "Cast", "Constant", "Identity"}
ACT_QUANT = {"ReduceMax", "ReduceMin", "Max", "Min", "Div", "Round", "Clip", "Sub", "Neg", "Abs",
             "DynamicQuantizeLinear"}


def main() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from dqtool.formats.onnx import DATA_FILE, GENERATION_FILE, graph_folder
    from dqtool.runtimes.ort import OnnxSeq2Seq, session_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    gdir = graph_folder(a.folder)
    m = onnx.load(str(gdir / GENERATION_FILE), load_external_data=False)
    bs = m.graph.node[-1]
    dec = {x.name: x.g for x in bs.attribute if x.type == onnx.AttributeProto.GRAPH}["decoder"]
    g = helper.make_graph(list(m.graph.node[:-1]) + list(dec.node), "with past", list(dec.input), list(dec.output),
                          list(m.graph.initializer))
    mm = helper.make_model(g, opset_imports=m.opset_import)
    mm.ir_version = m.ir_version
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(gdir / DATA_FILE, Path(tmp) / DATA_FILE)  # ORT refuses data outside the model folder
        onnx.save(mm, str(Path(tmp) / "with_past.onnx"))
        so = session_options(1)
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        alone = ort.InferenceSession(str(Path(tmp) / "with_past.onnx"), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False)
    kinds = collections.Counter("shape/cast" if n.op_type in SHAPE else "activation quantization"
                                if n.op_type in ACT_QUANT else n.op_type for n in opt.graph.node)
    ref = OnnxSeq2Seq.from_folder(a.folder, threads=1)
    ids = np.random.RandomState(0).randint(4, int(ref.config.vocab_size), (1, 64))
    mask = np.ones_like(ids)
    enc = ref.encode(ids, mask)
    _, cache = ref.decoder_step(np.full((1, 1), 2), enc, mask)
    for _ in range(8):
        _, cache = ref.decoder_step(np.full((1, 1), 5), enc, mask, cache)
    tok = np.full((1, 1), 5)
    feed = {"input_ids": tok.astype(np.int32), "encoder_attention_mask": mask.astype(np.int32)}
    feed.update(zip([i.name for i in alone.get_inputs()][2:], cache.self_kv + cache.cross_kv))
    static = ref._static_feeds(enc, mask)
    merged, plain = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        ref._step(tok, static, cache)
        merged.append(time.perf_counter() - t)
        t = time.perf_counter()
        alone.run(["logits"], feed)
        plain.append(time.perf_counter() - t)
    res = {"folder": str(a.folder), "steps": a.steps, "loadavg_1min": round(os.getloadavg()[0], 2),
           "merged_step_ms": round(float(np.median(merged)) * 1e3, 4),
           "with_past_alone_ms": round(float(np.median(plain)) * 1e3, 4),
           "optimized_nodes": sum(kinds.values()), "nodes_by_kind": dict(kinds.most_common())}
    res["if_and_feed_overhead"] = round(res["merged_step_ms"] / res["with_past_alone_ms"] - 1, 4)
    md = [f"# Decoder step overhead: {a.folder.name}", "",
          f"Command: `python benchmarks/decoder_step_overhead.py {a.folder} --steps {a.steps}`", "",
          f"One batch-1 decode step (1 thread, past 9, 64 source tokens), median of {a.steps} interleaved runs "
          f"(load average {res['loadavg_1min']}): dqtool's runtime on the merged decoder (If node) "
          f"{res['merged_step_ms']:.3f} ms, the cached branch alone (no If) {res['with_past_alone_ms']:.3f} ms: "
          f"the If node and the feeds cost {100 * res['if_and_feed_overhead']:.0f}% of a step.", "",
          f"The cached branch after ONNX Runtime's optimizations has {res['optimized_nodes']} nodes:", "",
          "| kind | nodes |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in kinds.most_common()]
    print("\n".join(md))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        a.out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
