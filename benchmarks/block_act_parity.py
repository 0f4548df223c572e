"""How exact is each activation scheme's ONNX export? Tiny BART students, random weights.

For each scheme a tiny BART (d_model 64, 2+2 layers, FFN 128; random weights with non-zero
norms and biases) is prepared for QAT, saved, converted and exported through the real code
(``dqtool convert`` / ``dqtool export``); then

* ``max_dlogit``: max |logit(ORT) - logit(packed PyTorch runtime)| over teacher-forced decoder
  steps (export validation, 4 samples x 16 tokens), and relative to max |logit|;
* ``greedy_rows_equal``: rows of 16 random sources whose 24 greedy tokens from dqtool's ONNX
  runtime equal the packed runtime's.

Schemes: per-token activations on the integer path (MatMulInteger), per-token activations
on MatMulNBits acc-4 (the kernel re-quantizes per block: an approximation), the ``block``
scheme (MatMulNBits' own quantizer, at accuracy 4 and 0), and block with the LUT kernel.
Writes ``benchmarks/results/block_act_parity.{json,md}``.

Usage::

    flock /tmp/dqtool-heavy.lock .venv/bin/python benchmarks/block_act_parity.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from dqtool.formats.packed import load_packed
from dqtool.base.errors import DQToolError
from dqtool.stages.export import ExportConfig, export
from dqtool.runtimes.ort import load_onnx
from dqtool.qmath.scheme import QuantScheme

REPO = Path(__file__).resolve().parents[1]
D_MODEL = 64
SCHEMES = [  # name, W-E-A, scheme overrides, export config
    ("token / integer", "2-2-8", {}, dict(matmul="integer")),
    ("token / MatMulNBits acc4", "2-2-8", {}, dict(matmul="nbits")),
    ("block32 / MatMulNBits acc4", "2-2-8", dict(act_granularity="block"), {}),
    ("block32 / MatMulNBits acc0", "2-2-8", dict(act_granularity="block"), dict(accuracy_level=0)),
    ("block32 / MatMulNBits LUT", "2-2-8", dict(act_granularity="block"), dict(lut_gemm=True)),
    ("4-8-8 block32 / acc4", "4-8-8", dict(act_granularity="block"), {}),
    ("8-8-8 block32 / acc4", "8-8-8", dict(act_granularity="block"), {}),
]


def tiny_packed(root: Path, wea: str, overrides: dict) -> Path:
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from tiny import pack_tiny, tiny_model

    model = tiny_model("bart", 2, 2, d_model=D_MODEL, encoder_attention_heads=4, decoder_attention_heads=4,
                       encoder_ffn_dim=2 * D_MODEL, decoder_ffn_dim=2 * D_MODEL)
    return pack_tiny(root, model, QuantScheme.from_wea(wea, **overrides))


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, wea, over, ecfg in SCHEMES:
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            packed = tiny_packed(root, wea, over)
            row = {"scheme": name, "wea": wea, "overrides": over, "export": ecfg}
            try:
                r = export(packed, root / "onnx", ExportConfig(**ecfg, min_argmax_agreement=0.0, rtol=1.0,
                                                               nbits_rtol=1.0))
            except DQToolError as e:
                row["error"] = str(e)
                rows.append(row)
                continue
            import onnx

            from dqtool.stages.export import DECODER_FILE, _all_graphs

            m = onnx.load(str(root / "onnx" / DECODER_FILE), load_external_data=False)
            nodes = [n for g in _all_graphs(m.graph) for n in g.node]
            row["decoder_nodes"] = len(nodes)
            row["decoder_matmul_nodes"] = sum(n.op_type in ("MatMulNBits", "MatMulInteger") for n in nodes)
            row.update(paths=r.paths, max_dlogit=r.check["decoder_logits_max_abs"],
                       rel_dlogit=r.check["decoder_logits_rel"], argmax_agreement=r.check["argmax_agreement"])
            ref, _ = load_packed(packed)
            onnx_model, _ = load_onnx(root / "onnx", threads=1)
            ids = torch.randint(4, 300, (16, 12), generator=torch.Generator().manual_seed(1))
            mask = torch.ones_like(ids)
            mask[::3, 8:] = 0
            gen = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, num_beams=1)
            a = onnx_model.generate(input_ids=ids, attention_mask=mask, **gen)
            b = ref.generate(input_ids=ids, attention_mask=mask, **gen)
            row["greedy_rows_equal"] = f"{sum(x == y for x, y in zip(a.tolist(), b.tolist()))}/16"
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = REPO / "benchmarks" / "results" / "block_act_parity"
    out.with_suffix(".json").write_text(json.dumps({"d_model": D_MODEL, "rows": rows}, indent=1) + "\n")
    lines = ["# Export exactness per activation scheme (tiny BART, random weights)", "",
             f"d_model {D_MODEL}, 2+2 layers; ORT (CPU) vs dqtool's packed PyTorch runtime. max |dlogit|: "
             "teacher-forced, 4 x 16 positions; greedy: 16 sources x 24 tokens.", "",
             "Decoder nodes: all nodes of decoder_model_merged.onnx (both If branches, so each Linear counts "
             "twice) and how many of them are quantized matmuls.", "",
             "| scheme | W-E-A | Linears (integer / nbits) | decoder nodes (quantized matmuls) | max abs dlogit | rel | "
             "argmax agreement | greedy rows equal |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['scheme']} | {r['wea']} | error: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['scheme']} | {r['wea']} | {r['paths']['integer']} / {r['paths']['nbits']} | "
                     f"{r['decoder_nodes']} ({r['decoder_matmul_nodes']}) | {r['max_dlogit']:.2e} | {r['rel_dlogit']:.1e} | {r['argmax_agreement']:.3f} | "
                     f"{r['greedy_rows_equal']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
