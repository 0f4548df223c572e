"""ROUGE of a trained teacher vs. trivial baselines on the Debian synopsis data.

Systems scored (ROUGE-1/2/L F-measure x 100, ``rouge_score`` with ``use_stemmer=True``,
mean over rows of the chosen split):

* teacher, greedy decoding (num_beams=1)
* teacher, beam search (num_beams=4, the saved generation_config otherwise)
* copy-source: prediction = the full source text
* lead-N: the first N words of the source, N = round(mean target words in train)
* most-frequent-target: the single most common target string of the train split

Writes ``<out-json>`` and a Markdown table ``<out-md>``.

Usage::

    .venv/bin/python benchmarks/teacher/eval_baselines.py --model runs/teacher_demo \
        --out-json benchmarks/teacher/results_demo_teacher.json \
        --out-md benchmarks/teacher/RESULTS_demo_teacher.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import torch
from rouge_score import rouge_scorer
from transformers import AutoTokenizer, BartForConditionalGeneration

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO / "dqtool" / "assets" / "data" / "debian_synopsis"
KEYS = ("rouge1", "rouge2", "rougeL")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rouge(preds: list[str], refs: list[str]) -> dict:
    scorer = rouge_scorer.RougeScorer(list(KEYS), use_stemmer=True)
    tot = Counter()
    for p, r in zip(preds, refs):
        s = scorer.score(r, p)  # score(target, prediction)
        for k in KEYS:
            tot[k] += s[k].fmeasure
    return {k: round(100 * tot[k] / max(1, len(refs)), 2) for k in KEYS}


@torch.no_grad()
def generate(model, tok, sources: list[str], max_source: int, batch_size: int, **gen_kwargs):
    """Decode in batches sorted by length (less padding); returns predictions in input order."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    preds: list[str] = [""] * len(sources)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([sources[i] for i in idx], max_length=max_source, truncation=True,
                  padding=True, return_tensors="pt")  # input_ids: [batch, src_len]
        out = model.generate(**enc, **gen_kwargs)  # [batch, tgt_len]
        for i, text in zip(idx, tok.batch_decode(out, skip_special_tokens=True)):
            preds[i] = text.strip()
    return preds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Score a teacher and trivial baselines with ROUGE.")
    ap.add_argument("--model", type=Path, required=True, help="folder written by train_teacher.py")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--split", default="test", choices=["test", "validation"])
    ap.add_argument("--limit", type=int, default=0, help="score only the first N rows (0 = all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-json", type=Path)
    ap.add_argument("--out-md", type=Path)
    ap.add_argument("--examples", type=int, default=5, help="sample predictions to include in the md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    train = read_jsonl(args.data / "train.jsonl")
    rows = read_jsonl(args.data / f"{args.split}.jsonl")
    if args.limit:
        rows = rows[: args.limit]
    sources = [r["source"] for r in rows]
    refs = [r["target"] for r in rows]

    results: dict = {}
    # ---- trivial baselines
    mean_target_words = sum(len(r["target"].split()) for r in train) / len(train)
    n_lead = max(1, round(mean_target_words))
    most_frequent, mf_count = Counter(r["target"] for r in train).most_common(1)[0]
    results["copy-source"] = rouge(sources, refs)
    results[f"lead-{n_lead} words"] = rouge([" ".join(s.split()[:n_lead]) for s in sources], refs)
    results["most-frequent-target"] = rouge([most_frequent] * len(rows), refs)

    # ---- teacher
    tok = AutoTokenizer.from_pretrained(args.model)
    model = BartForConditionalGeneration.from_pretrained(args.model).eval()
    info_path = args.model / "train_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    max_source = info.get("recipe", {}).get("max_source", 128)
    timings = {}
    samples = {}
    for name, kw in (("teacher greedy", {"num_beams": 1}), ("teacher beam 4", {"num_beams": 4})):
        t0 = time.time()
        preds = generate(model, tok, sources, max_source, args.batch_size, **kw)
        timings[name] = round(time.time() - t0, 1)
        results[name] = rouge(preds, refs)
        samples[name] = preds
        print(f"{name}: {results[name]} ({timings[name]}s)", flush=True)

    report = {
        "split": args.split,
        "rows": len(rows),
        "model": str(args.model),
        "rouge": results,
        "generation_seconds": timings,
        "lead_n": n_lead,
        "most_frequent_target": most_frequent,
        "most_frequent_target_count_in_train": mf_count,
        "teacher_train_info": {k: info.get(k) for k in (
            "size", "params", "config", "recipe", "steps", "epochs", "final_logged_loss",
            "setup_seconds", "train_seconds", "total_seconds", "stopped_early_by_wall_clock")},
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {args.threads}",
        "torch": torch.__version__,
    }
    for k, v in results.items():
        print(f"{k:24s} R1 {v['rouge1']:6.2f}  R2 {v['rouge2']:6.2f}  RL {v['rougeL']:6.2f}")
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.out_md:
        args.out_md.write_text(markdown(report, rows, samples, args.examples), encoding="utf-8")
    return 0


def markdown(report: dict, rows, samples, n_examples: int) -> str:
    ti = report["teacher_train_info"]
    lines = [
        "# Demo teacher vs. trivial baselines (debian_synopsis)",
        "",
        f"Split: **{report['split']}** ({report['rows']} rows).  ROUGE F-measure x 100,",
        "`rouge_score` with `use_stemmer=True`, averaged over rows.",
        "",
        "| system | ROUGE-1 | ROUGE-2 | ROUGE-L | decode time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in report["rouge"].items():
        t = report["generation_seconds"].get(name, "")
        lines.append(f"| {name} | {v['rouge1']:.2f} | {v['rouge2']:.2f} | {v['rougeL']:.2f} | {t} |")
    lines += [
        "",
        f"* lead-N uses N = {report['lead_n']} (mean target words in train).",
        f"* most-frequent-target is \"{report['most_frequent_target']}\" "
        f"({report['most_frequent_target_count_in_train']} train rows).",
        "",
        "## Teacher",
        "",
        f"* machine: {report['machine']} (no GPU), torch {report['torch']}",
        f"* shape: {ti.get('config')}, {ti.get('params')} parameters",
        f"* recipe: {ti.get('recipe')}",
        f"* steps: {ti.get('steps')} ({ti.get('epochs')} epochs), final logged loss "
        f"{ti.get('final_logged_loss')}, stopped early by wall clock: "
        f"{ti.get('stopped_early_by_wall_clock')}",
        f"* wall time: setup (imports + tokenization) {ti.get('setup_seconds')} s, training "
        f"{ti.get('train_seconds')} s, whole script until save {ti.get('total_seconds')} s",
        "",
        "How this recipe was found (and why 3+3 layers, init_std and the copy warm-up):",
        "`benchmarks/teacher/NOTES_demo_teacher.md`.",
        "",
        "## Sample predictions (beam 4)",
        "",
    ]
    for r, p in list(zip(rows, samples.get("teacher beam 4", [])))[:n_examples]:
        lines += [f"* `{r['id']}`: reference \"{r['target']}\" / teacher \"{p}\""]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
