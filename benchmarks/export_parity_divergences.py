"""Where the ONNX export and the packed PyTorch runtime still part (after export_parity_demo.py).

For each per-token student folder pair of ``export_parity_demo.py``, every test row is
generated at batch 1 by both runtimes (greedy, 32 tokens); for each row that differs:
the first differing token, the packed runtime's top-1 minus top-2 logit there (absolute
and relative to its logit range) and the rank of ONNX's token in the packed runtime's
logits (2 = its runner-up, i.e. a near-tie flipped by float rounding). Writes
``benchmarks/results/export_parity_divergences.{json,md}``.

Usage::

    .venv/bin/python benchmarks/export_parity_divergences.py --work runs/export_parity
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dqtool.formats.packed import load_packed
from dqtool.stages.evaluate import EvalConfig
from dqtool.runtimes.ort import load_onnx

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dqtool" / "assets" / "data" / "debian_synopsis"


@torch.no_grad()
def divergences(packed: Path, onnx_dir: Path, sources: list[str], cfg: EvalConfig, threads: int) -> list[dict]:
    model, tok = load_packed(packed)
    rt, _ = load_onnx(onnx_dir, threads=threads)
    out = []
    for i, src in enumerate(sources):
        ids = torch.tensor([tok(src, max_length=128, truncation=True)["input_ids"]])          # [1, S]
        g = model.generate(input_ids=ids, **cfg.generate_kwargs(), output_scores=True, return_dict_in_generate=True)
        a = g.sequences[0].tolist()
        b = [int(t) for t in rt.generate(input_ids=ids, **cfg.generate_kwargs())[0]]
        if a == b:
            continue
        t = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        d = {"row": i, "first_diff": t, "lengths": [len(a), len(b)]}
        if t is not None:
            sc = g.scores[t - 1][0]                                 # the logits that chose token t
            top = torch.topk(sc, 2).values
            span = float(sc.max() - sc[sc > -1e30].min())
            d.update(margin=round(float(top[0] - top[1]), 5), margin_rel=round(float(top[0] - top[1]) / span, 6),
                     onnx_token_rank=int((sc > sc[b[t]]).sum()) + 1)
        out.append(d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/export_parity"))
    ap.add_argument("--schemes", default="8-8-8,4-4-8,2-2-8")
    ap.add_argument("--granularity", default="token")
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export_parity_divergences")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = (DATA / "test.jsonl").read_text().splitlines()[:args.eval_samples]
    sources = [json.loads(line)["source"] for line in lines]
    cfg = EvalConfig(data=str(DATA), split="test", max_length=32)
    res = {}
    for wea in args.schemes.split(","):
        tag = f"{wea}-{args.granularity}"
        div = divergences(args.work / f"packed-{tag}", args.work / f"onnx-{tag}", sources, cfg, args.threads)
        res[wea] = {"rows": len(sources), "identical": len(sources) - len(div), "divergences": div}
        print(wea, json.dumps(res[wea]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["# Where ONNX and the packed runtime part (per-token students, batch 1)", "",
          f"First {args.eval_samples} test rows, greedy, 32 tokens. margin = the packed runtime's top-1 minus "
          f"top-2 logit at the first differing token (share of its logit range); rank = rank of ONNX's token "
          f"in the packed runtime's logits.", "",
          "| W-E-A | identical rows | row | first differing token | margin | margin / range | ONNX token rank |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for wea, r in res.items():
        for d in r["divergences"] or [{}]:
            md.append(f"| {wea} | {r['identical']}/{r['rows']} | {d.get('row', '')} | {d.get('first_diff', '')} | "
                      f"{d.get('margin', '')} | {d.get('margin_rel', 0):.3%} | {d.get('onnx_token_rank', '')} |")
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
