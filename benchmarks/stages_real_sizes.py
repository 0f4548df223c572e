"""Every stage at real model shapes: wall time and peak RSS per stage, each in its own process.

Users bring facebook/bart-base, t5-base and opus-mt models, not the 2.5M demo. Time and
memory do not depend on the weight values, so each teacher is built from its config with
random weights (BART-base: d 768, 6+6 layers, vocab 50265; T5-base: d 768, 12+12 layers,
vocab 32128; Marian opus-mt-en-de: d 512, 6+6 layers, vocab 58101) and saved with the
bundled 8k BPE tokenizer (its ids fit every vocabulary; the configs use its special ids,
as tests/tiny.py does). Then the real CLI runs, one process per stage, measured with
``os.wait4`` (wall time, peak RSS of that process alone):

    distill (6+3 student) -> qat (a few steps, 2-2-8) -> convert -> export -> eval (packed, ONNX)

plus, at BART-base, ``convert --weight-cache none`` (the code path before the weight
cache: dequantize on every forward) and generation speed of the packed folder against
the float32 PyTorch student of the same shape (``--gen-speed`` child). ``--bench`` adds
``dqtool bench`` with one peer. Writes ``benchmarks/results/stages_real_sizes.{json,md}``.

Usage (heavy: run alone)::

    flock /tmp/dqtool-heavy.lock .venv/bin/python benchmarks/stages_real_sizes.py
    .venv/bin/python benchmarks/stages_real_sizes.py --shapes bart-base --no-before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dqtool" / "assets" / "data" / "debian_synopsis"
TOKENIZER = REPO / "dqtool" / "assets" / "tokenizer" / "debian_bpe8k"

SHAPES = {
    "bart-base": ("bart", dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                               encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                               decoder_ffn_dim=3072, max_position_embeddings=1024, pad_token_id=1, bos_token_id=0,
                               eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)),
    "t5-base": ("t5", dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                           num_heads=12, feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1)),
    "marian": ("marian", dict(vocab_size=58101, decoder_vocab_size=58101, d_model=512, encoder_layers=6,
                              decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
                              encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
                              scale_embedding=True, share_encoder_decoder_embeddings=True, pad_token_id=1,
                              eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=2)),
}

_BUILD = """
import sys, torch
from transformers import AutoModelForSeq2SeqLM, BartConfig, MarianConfig, PreTrainedTokenizerFast, T5Config
import json
kind, cfg, out, tok = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.manual_seed(0)
config = {"bart": BartConfig, "t5": T5Config, "marian": MarianConfig}[kind](**cfg)
AutoModelForSeq2SeqLM.from_config(config).save_pretrained(out)
PreTrainedTokenizerFast.from_pretrained(tok).save_pretrained(out)
"""


def run_stage(name: str, cmd: list[str], log_dir: Path, timeout: float, env: dict) -> dict:
    """Run ``cmd`` as its own process; wall seconds, its own peak RSS (MiB), exit code, log file."""
    log = log_dir / (re.sub(r"[^\w.() -]", "_", name) + ".log")   # "convert A/B 0 after": no "/" in a file name
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    row = {"stage": name, "seconds": round(wall, 1), "peak_rss_mib": round(ru.ru_maxrss / 1024),
           "rc": rc, "timed_out": wall > timeout, "log": str(log)}
    print(f"  {name:<16} {row['seconds']:>7.1f} s  {row['peak_rss_mib']:>6} MiB  rc {rc}"
          + ("  (killed at the time limit)" if row["timed_out"] else ""), flush=True)
    return row


def gen_speed(packed: str, student: str, new_tokens: int, source_tokens: int, runs: int, threads: int) -> dict:
    """ms per generated token (batch 1, greedy) of the fp32 student and the packed folder
    (weight cache "model" with the float matmul and with matmul="integer", and "none" = the
    runtime before the cache, fewer runs).

    Two measures: ``ms_per_token`` = (generate of N tokens - generate of 1) / (N - 1),
    medians of ``runs``; ``step_ms`` = the median wall time of one decoder forward
    (every step after the first, timed by hooks, over all runs). The fp32 and packed runs
    alternate so that load from other processes hits both alike.
    """
    import statistics

    import torch

    from dqtool.formats.packed import load_packed
    from dqtool.formats.hf import load_seq2seq

    torch.set_num_threads(threads)
    ids = torch.randint(4, 8000, (1, source_tokens), generator=torch.Generator().manual_seed(0))

    def hooked(model) -> list:
        steps, t = [], []
        model.register_forward_pre_hook(lambda *a: t.append(time.perf_counter()))
        model.register_forward_hook(lambda *a: steps.append(time.perf_counter() - t[-1]))
        return steps

    def timed(model, n_new: int) -> float:
        gen = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, num_beams=1)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, **gen)
        return time.perf_counter() - t

    fp32, _ = load_seq2seq(student)
    fp32.eval()
    model, _ = load_packed(packed, cache="model")
    out = {}
    t = time.perf_counter()
    timed(model, 1)
    first = round(time.perf_counter() - t, 2)
    imodel, _ = load_packed(packed, cache="model", matmul="integer")
    timed(imodel, 1)
    models = {"fp32 student (PyTorch)": fp32, "packed, cache=model": model, "packed, matmul=integer": imodel}
    steps = {k: hooked(m) for k, m in models.items()}
    ones, fulls, step_ms = {k: [] for k in models}, {k: [] for k in models}, {k: [] for k in models}
    for m in models.values():
        timed(m, 2)  # warm-up
    for r in range(runs):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for k in order:
            ones[k].append(timed(models[k], 1))
            steps[k].clear()
            fulls[k].append(timed(models[k], new_tokens))
            step_ms[k] += steps[k][1:]
    for k in models:
        one, full = statistics.median(ones[k]), statistics.median(fulls[k])
        out[k] = {"ms_per_token": round(1000 * (full - one) / (new_tokens - 1), 2),
                  "step_ms": round(1000 * statistics.median(step_ms[k]), 2), "generate_ms": round(1000 * full, 1),
                  "new_tokens": new_tokens, "runs": runs}
    out["packed, cache=model"]["kept_mib"] = round(model.dqtool_weight_cache.nbytes() / 2**20)
    out["packed, matmul=integer"]["kept_mib"] = round(imodel.dqtool_weight_cache.nbytes() / 2**20)
    out["integer / fp32 per token"] = round(out["packed, matmul=integer"]["ms_per_token"]
                                            / out["fp32 student (PyTorch)"]["ms_per_token"], 3)
    out["integer / fp32 per step"] = round(out["packed, matmul=integer"]["step_ms"]
                                           / out["fp32 student (PyTorch)"]["step_ms"], 3)
    out["first call (dequantizes once), s"] = first
    out["packed / fp32 per token"] = round(out["packed, cache=model"]["ms_per_token"]
                                           / out["fp32 student (PyTorch)"]["ms_per_token"], 3)
    out["packed / fp32 per step"] = round(out["packed, cache=model"]["step_ms"]
                                          / out["fp32 student (PyTorch)"]["step_ms"], 3)
    del model, imodel, models, fp32
    model, _ = load_packed(packed, cache="none")
    s = hooked(model)
    timed(model, 4)
    out["packed, cache=none"] = {"step_ms": round(1000 * statistics.median(s[1:]), 2), "new_tokens": 4, "runs": 1}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="bart-base,t5-base,marian")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "stages_real_sizes")
    ap.add_argument("--student", default="6-3", help="student layers E-D (copied from the teacher)")
    ap.add_argument("--wea", default="2-2-8")
    ap.add_argument("--qat-steps", type=int, default=2)
    ap.add_argument("--qat-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-before", action="store_true", help="skip convert --weight-cache none at BART-base")
    ap.add_argument("--before-timeout", type=float, default=900)
    ap.add_argument("--before-code", type=Path, default=None,
                    help="folder holding the dqtool package before the weight cache, for the 'before' convert "
                         "(default: this code with --weight-cache none)")
    ap.add_argument("--no-export", default="", help="shapes to stop after convert (comma-separated)")
    ap.add_argument("--stages-only", default="", help="shapes to run only distill, qat and convert for")
    ap.add_argument("--export-only", default="", help="shapes whose packed folder exists: run only export and eval "
                                                     "onnx, adding the rows to the earlier report's (to split a run "
                                                     "into shorter pieces)")
    ap.add_argument("--keep-other-shapes", action="store_true", help="keep other shapes' rows of an earlier report")
    ap.add_argument("--bench", action="store_true", help="also dqtool bench at BART-base with one peer")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "stages_real_sizes")
    ap.add_argument("--gen-speed", nargs=2, metavar=("PACKED", "STUDENT"), help=argparse.SUPPRESS)
    ap.add_argument("--convert-ab", type=int, default=0, metavar="N",
                    help="only: convert the existing BART-base QAT folder N times with this code and with "
                         "--before-code, alternating (contention hits both alike); adds the rows to the report")
    ap.add_argument("--regen-speed", action="store_true",
                    help="only: measure the BART-base generation speed again (existing folders) and replace its row")
    args = ap.parse_args()
    if args.regen_speed:
        return regen_speed(args)
    if args.convert_ab:
        return convert_ab(args)
    if args.gen_speed:
        print(json.dumps(gen_speed(*args.gen_speed, new_tokens=32, source_tokens=64, runs=5, threads=args.threads)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "dqtool.cli"]
    enc, dec = args.student.split("-")
    skip_export = {s for s in args.no_export.split(",") if s}
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads": args.threads, "python": platform.python_version()},
              "student": args.student, "wea": args.wea, "qat_steps": args.qat_steps, "qat_batch": args.qat_batch,
              "shapes": {}}
    t_all = time.perf_counter()
    previous = args.out.with_suffix(".json")
    if args.keep_other_shapes and previous.is_file():   # runs of other shapes stay in the report
        report["shapes"] = json.loads(previous.read_text()).get("shapes", {})
    for shape in [s for s in args.shapes.split(",") if s]:
        kind, cfg = SHAPES[shape]
        w = args.work / shape
        logs = w / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        print(f"{shape}:", flush=True)
        teacher, student, qat_dir = w / "teacher", w / "student", w / "qat"
        packed, packed0, onnx = w / "packed", w / "packed-before", w / "onnx"
        rows = []
        if shape in {s for s in args.export_only.split(",") if s}:
            rows = [r for r in report["shapes"].get(shape, {}).get("stages", []) if r["stage"] not in
                    ("export", "eval onnx")]
            rows.append(run_stage("export", cli + ["export", str(packed), str(onnx), "--force"], logs, 900, env))
            rows.append(run_stage("eval onnx", cli + ["eval", str(onnx), "--data", str(DATA), "--max-samples", "8",
                                                      "--max-length", "16", "--batch-size", "8"], logs, 600, env))
            report["shapes"][shape] = {**report["shapes"].get(shape, {}), "config": cfg, "stages": rows}
            continue
        if not teacher.exists():
            rows.append(run_stage("build teacher", [sys.executable, "-c", _BUILD, kind, json.dumps(cfg), str(teacher),
                                                    str(TOKENIZER)], logs, 600, env))
        rows.append(run_stage("distill", cli + ["distill", str(teacher), str(student), "--encoder-layers", enc,
                                                "--decoder-layers", dec, "--force"], logs, 600, env))
        rows.append(run_stage("qat", cli + ["qat", str(student), str(qat_dir), "--data", str(DATA), "--wea", args.wea,
                                            "--max-steps", str(args.qat_steps), "--batch-size", str(args.qat_batch),
                                            "--max-train-samples", str(args.qat_batch * args.qat_steps),
                                            "--source-max-length", "256", "--target-max-length", "32",
                                            "--save-steps", "1000", "--force"],
                              logs, 1200, env))
        est = re.search(r"total \(peak, \+-25%\)\s+([\d.]+) GiB", Path(rows[-1]["log"]).read_text())
        rows[-1]["estimated_peak_gib"] = float(est.group(1)) if est else None
        rows.append(run_stage("convert", cli + ["convert", str(qat_dir), str(packed), "--force"], logs, 900, env))
        if shape in ("bart-base", "t5-base") and not args.no_before:
            if args.before_code:   # the code before this change (e.g. `git archive main dqtool`)
                before = run_stage("convert (before)", cli + ["convert", str(qat_dir), str(packed0), "--force"],
                                   logs, args.before_timeout, {**env, "PYTHONPATH": str(args.before_code)})
                before["code"] = str(args.before_code)
            else:          # this code with the weight cache off
                before = run_stage("convert (before)", cli + ["convert", str(qat_dir), str(packed0), "--force",
                                                              "--weight-cache", "none"], logs, args.before_timeout,
                                   env)
            rows.append(before)
        if shape in {s for s in args.stages_only.split(",") if s}:
            report["shapes"][shape] = {"config": cfg, "stages": rows, "note": "distill, qat and convert only"}
            continue
        rows.append(run_stage("eval packed", cli + ["eval", str(packed), "--data", str(DATA), "--max-samples", "8",
                                                    "--max-length", "16", "--batch-size", "8"], logs, 600, env))
        rows.append(run_stage("eval packed (integer)", cli + ["eval", str(packed), "--data", str(DATA), "--max-samples",
                                                              "8", "--max-length", "16", "--batch-size", "8",
                                                              "--matmul", "integer"], logs, 600, env))
        if shape == "bart-base":
            r = run_stage("generate speed", [sys.executable, __file__, "--gen-speed", str(packed), str(student),
                                             "--threads", str(args.threads)], logs, 900, env)
            lines = [ln for ln in Path(r["log"]).read_text().splitlines() if ln.startswith("{")]
            r["result"] = json.loads(lines[-1]) if lines else None
            rows.append(r)
        if shape not in skip_export:
            rows.append(run_stage("export", cli + ["export", str(packed), str(onnx), "--force"], logs, 900, env))
            rows.append(run_stage("eval onnx", cli + ["eval", str(onnx), "--data", str(DATA), "--max-samples", "8",
                                                      "--max-length", "16", "--batch-size", "8"], logs, 600, env))
            if args.bench and shape == "bart-base":
                rows.append(run_stage("bench (1 peer)", cli + [
                    "bench", str(onnx), "--out", str(w / "bench"), "--teacher", str(teacher), "--student",
                    str(student), "--peers", "ort-int8-dynamic", "--runs", "3", "--new-tokens", "16", "--no-plots",
                    "--force"], logs, 900, env))
        report["shapes"][shape] = {"config": cfg, "stages": rows}
    report["total_seconds"] = round(time.perf_counter() - t_all, 1) + (
        json.loads(previous.read_text()).get("total_seconds", 0) if args.keep_other_shapes and previous.is_file() else 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(report) + "\n")
    print(render(report))


def regen_speed(args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    w = args.work / "bart-base"
    r = run_stage("generate speed", [sys.executable, __file__, "--gen-speed", str(w / "packed"), str(w / "student"),
                                     "--threads", str(args.threads)], w / "logs", 900, env)
    lines = [ln for ln in Path(r["log"]).read_text().splitlines() if ln.startswith("{")]
    r["result"] = json.loads(lines[-1]) if lines else None
    path = args.out.with_suffix(".json")
    report = json.loads(path.read_text())
    stages = report["shapes"]["bart-base"]["stages"]
    report["shapes"]["bart-base"]["stages"] = [r if x["stage"] == "generate speed" else x for x in stages]
    path.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(report) + "\n")
    print(render(report))


def convert_ab(args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    w = args.work / "bart-base"
    logs = w / "logs"
    cli = [sys.executable, "-m", "dqtool.cli", "convert", str(w / "qat"), str(w / "packed-ab"), "--force"]
    rows = []
    for i in range(args.convert_ab):
        rows.append({**run_stage(f"convert A/B {i} after", cli, logs, 900, env), "code": None})
        rows.append({**run_stage(f"convert A/B {i} before", cli, logs, 900, {**env, "PYTHONPATH": str(args.before_code)}),
                     "code": str(args.before_code)})
    path = args.out.with_suffix(".json")
    report = json.loads(path.read_text())
    report["shapes"]["bart-base"]["convert_ab"] = rows
    path.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(report) + "\n")
    print(render(report))


def render(report: dict) -> str:
    m = report["machine"]
    lines = ["# Every stage at real model shapes (random weights)", "",
             f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads; one run, each stage alone in its process "
             f"(compare ratios within this run; the notes say what else ran). Student {report['student']} layers at "
             f"{report['wea']}; qat: {report['qat_steps']} steps at batch {report['qat_batch']} (sources <= 256 "
             f"tokens); eval: 8 rows, 16 tokens. Each stage is its own process: peak RSS is that process's.", "",
             "| shape | stage | wall s | peak RSS MiB | note |", "|---|---|---:|---:|---|"]
    for shape, d in report["shapes"].items():
        for r in d["stages"]:
            note = []
            if r.get("estimated_peak_gib") is not None:
                note.append(f"qat's printed estimate {r['estimated_peak_gib']:.2f} GiB")
            if r.get("code"):
                note.append("the code before the weight cache (main)")
            if r["rc"] != 0:
                note.append("killed at the time limit" if r["timed_out"] else f"FAILED rc {r['rc']}")
            if r.get("result"):
                res = r["result"]
                note.append("; ".join(
                    (f"{k}: " + ", ".join(f"{v[m]} {u}" for m, u in (("ms_per_token", "ms/token"), ("step_ms", "ms/step"))
                                          if m in v)) if isinstance(v, dict) else f"{k} {v}" for k, v in res.items()))
            lines.append(f"| {shape} | {r['stage']} | {r['seconds']:.1f} | {r['peak_rss_mib']} | {'; '.join(note)} |")
    for shape, d in report["shapes"].items():
        ab = d.get("convert_ab")
        if ab:
            after = [r["seconds"] for r in ab if not r.get("code")]
            before = [r["seconds"] for r in ab if r.get("code")]
            lines += ["", f"convert at {shape}, alternating this code and main's (same QAT folder, back to back, so "
                      f"contention hits both alike): after {', '.join(f'{x:.1f}' for x in after)} s, before "
                      f"{', '.join(f'{x:.1f}' for x in before)} s; best {min(after):.1f} s vs {min(before):.1f} s "
                      f"({min(before) / min(after):.1f}x)."]
    lines += ["", f"Total wall time {report['total_seconds']:.0f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
