"""The paper's grid and the 2-bit levers on the demo teacher, one resumable cell at a time.

A *cell* is one QAT run of a layer-copied student of the demo teacher, scored on the test
split with its fake quantization (bit for bit the packed model's logits). Its settings are
the recipe's (``recipes/paper-demo/e3d<N>.yaml``, the main job's qat section at depth 3+N)
with only the fields the cell names changed; the weight method and learning rate always come
from the cell (defaults: the W-E-A default quantizer, 5e-4), so a cell's name fixes them. Cells are named by a spec of ``key=value``
pairs joined by commas; every key not given keeps its default:

    d=3+2        student depth (encoder+decoder), picks recipes/paper-demo/e3d<decoder>.yaml
    wea=2-2-8    W-E-A bits
    m=default    weight method at W bits: default (TWN ternary at 2 bits, min-max otherwise -- the
                 W-E-A default, not the recipe's weight_method), or ternary, seq, lsq, tbt, minmax
    lr=5e-4      learning rate (the main job's before issue 15)
    steps=recipe QAT steps (the recipe's: 300)   seed=42
    tgt=teacher  training targets: teacher (sequence-level KD) or data (the references)
    kd=kl        logits distillation: kl (the recipe's KL at T=2) or none (task loss only)
    init=copy    student initialisation: copy (teacher layers) or random (from config)
    dmap=default decoder layer map, e.g. 0-1 (teacher layers the student decoder copies); default is
                 the recipe's, except 3+1 where it stays layer 0 (dqtool's 1-layer default before it
                 became the last layer), so recorded cells keep their meaning

Each cell runs through the stage functions ``dqtool compress`` runs (``distill``, ``qat``,
``evaluate_model``, ``convert`` for the footprint). Everything is cached under ``--work``:
a cell whose QAT folder exists is not retrained (an interrupted one resumes from its last
checkpoint), and its scores live in ``benchmarks/results/demo_grid_cells.json`` (committed),
so the grid runs in pieces, one cell per call:

    flock /tmp/dqtool-heavy.lock .venv/bin/python benchmarks/demo_grid.py run d=3+2,wea=2-2-8,m=seq
    .venv/bin/python benchmarks/demo_grid.py list          # the cells scored so far

A cells file belongs to one teacher: the first run records the teacher's weights hash, and a run
with another teacher is refused (a retrained teacher differs: float rounding differs between
CPUs). Score another teacher into its own file with ``--cells`` (before the subcommand).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CELLS = REPO / "benchmarks" / "results" / "demo_grid_cells.json"
DEFAULTS = {"d": "3+2", "wea": "2-2-8", "m": "default", "lr": "5e-4", "steps": "recipe", "seed": "42",
            "tgt": "teacher", "kd": "kl", "init": "copy", "dmap": "default"}
ORDER = tuple(DEFAULTS)


def parse_spec(spec: str) -> dict:
    """``"wea=2-4-8,m=seq"`` -> every key with its value (defaults filled in)."""
    out = dict(DEFAULTS)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        k, _, v = part.partition("=")
        if k not in DEFAULTS or not v:
            raise SystemExit(f"bad cell spec part {part!r}: keys are {', '.join(DEFAULTS)}")
        out[k] = v
    return out


def cell_name(c: dict) -> str:
    """Canonical name: only the keys that differ from the defaults, in a fixed order."""
    parts = [f"{k}={c[k]}" for k in ORDER if c[k] != DEFAULTS[k] and k not in ("d", "wea", "seed")]
    return f"d={c['d']},wea={c['wea']}" + "".join("," + p for p in parts) + f",seed={c['seed']}"


def folder_name(name: str) -> str:
    return name.replace("=", "").replace(",", "_").replace("+", "p")


def teacher_sha256(teacher: Path) -> str:
    from dqtool.formats.manifest import sha256_file

    return sha256_file(teacher / "model.safetensors")


def load_cells() -> dict:
    doc = json.loads(CELLS.read_text()) if CELLS.is_file() else {"meta": {}, "cells": {}}
    for name, e in doc["cells"].items():   # the spec fields are the name's
        e.update(parse_spec(",".join(p for p in name.split(",") if not p.startswith("eval="))))
    return doc


def save_cells(doc: dict) -> None:
    """Merge ``doc`` into the file (cells run in parallel processes each add their own)."""
    import fcntl

    CELLS.parent.mkdir(parents=True, exist_ok=True)
    with open(CELLS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = load_cells()
        disk["meta"].update(doc["meta"])
        disk["cells"].update(doc["cells"])
        tmp = CELLS.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(disk, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, CELLS)


def recipe_for(depth: str, recipes: Path):
    from dqtool.compress import load_recipe

    enc, dec = depth.split("+")
    path = recipes / f"e{enc}d{dec}.yaml"
    return path, load_recipe(path, check_paths=False)


def student_for(c: dict, recipe, work: Path, teacher: Path) -> Path:
    """The distilled student of the cell's depth, map and initialisation (built once)."""
    from dqtool.stages.distill import distill

    dcfg = recipe.distill
    if c["dmap"] != "default":
        dcfg = dataclasses.replace(dcfg, decoder_map=tuple(int(x) for x in c["dmap"].split("-")))
    elif dcfg.decoder_layers == 1 and dcfg.decoder_map is None:
        # The grid's cells named dmap=default at 3+1 were trained from decoder layer 0 (SFT's
        # 1-layer map, dqtool's default then); dqtool now copies the last layer (dmap=2 here).
        # Pinned so that a cell's name keeps meaning what its recorded score measured.
        dcfg = dataclasses.replace(dcfg, decoder_map=(0,))
    tag = f"student_d{c['d'].replace('+', 'p')}" + (f"_dmap{c['dmap']}" if c["dmap"] != "default" else "")
    copy_dir = work / tag
    if not copy_dir.exists():
        distill(teacher, copy_dir, dcfg)
    if c["init"] == "copy":
        return copy_dir
    rand = work / (tag + "_random")
    if not rand.exists():
        import torch
        from transformers import AutoModelForSeq2SeqLM

        from dqtool.formats.hf import load_seq2seq

        model, tok = load_seq2seq(copy_dir)
        torch.manual_seed(0)
        fresh = AutoModelForSeq2SeqLM.from_config(model.config)
        tmp = work / (tag + "_random.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(copy_dir, tmp)   # tokenizer, generation config, distill manifest (layer map)
        fresh.generation_config = model.generation_config
        fresh.save_pretrained(tmp)
        # Re-seal the folder: the copied distill manifest hashes the copied weights.
        from dqtool.formats.manifest import read_manifest, write_manifest

        m = read_manifest(tmp)
        std = ("dqtool_version", "stage", "created_utc", "inputs", "config", "files")
        write_manifest(tmp, m["stage"], m["inputs"], m["config"],
                       extra={**{k: v for k, v in m.items() if k not in std}, "init": "random (from config, seed 0)"})
        os.replace(tmp, rand)
    return rand


def qat_config(c: dict, recipe):
    from dqtool.stages.qat import QATConfig  # noqa: F401

    base = recipe.qats.get(c["wea"])
    if base is None:
        from dqtool.qmath.scheme import QuantScheme

        any_cfg = next(iter(recipe.qats.values()))
        scheme = QuantScheme.from_wea(c["wea"], **{k: getattr(any_cfg.scheme, k) for k in (
            "weight_granularity", "weight_group_size", "act_symmetric", "act_clip", "act_granularity",
            "act_block_size", "quantize_attention")})
        base = dataclasses.replace(any_cfg, scheme=scheme)
    scheme = base.scheme.with_(weight_method=None if c["m"] == "default" else c["m"])
    losses = base.losses
    if c["kd"] == "none":
        losses = dataclasses.replace(losses, logits=0.0)
    steps = base.max_steps if c["steps"] == "recipe" else int(c["steps"])
    lr = float(c["lr"])
    return dataclasses.replace(base, scheme=scheme, losses=losses, max_steps=steps, learning_rate=lr,
                               save_steps=min(base.save_steps, steps), seed=int(c["seed"]), targets=c["tgt"],
                               eval_steps=None)


def footprint(qat_dir: Path, work: Path, key: str, recipe) -> dict:
    """Packed footprint of a QAT folder (``convert`` with the recipe's settings), cached by key."""
    from dqtool.stages.convert import convert

    out = work / "packed" / key
    if out.exists():
        shutil.rmtree(out)
    r = convert(qat_dir, out, recipe.convert)
    fp = {k: r.footprint.get(k) for k in ("packed_file_bytes", "teacher_fp32_bytes", "ratio_to_teacher")}
    fp["bit_bound_bytes"] = r.footprint["bound"]["total"]
    fp["float_dtype"] = r.float_dtype
    fp["parity"] = r.check
    shutil.rmtree(out, ignore_errors=True)
    return fp


def run(args) -> None:
    import torch

    from dqtool.data.pairs import DataConfig
    from dqtool.stages.evaluate import EvalConfig, evaluate_model
    from dqtool.stages.qat import qat

    torch.set_num_threads(args.threads)
    doc = load_cells()
    sha = teacher_sha256(args.teacher)
    known = doc["meta"].get("teacher_sha256")
    if doc["meta"].get("teacher") and known != sha:
        raise SystemExit(f"{CELLS} was scored with another teacher ({known or 'hash not recorded'}; "
                         f"{args.teacher} is {sha[:16]}): pass --cells NEW.json to score this teacher apart")
    doc["meta"]["teacher_sha256"] = sha
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    for spec in args.cells:
        c = parse_spec(spec)
        name = cell_name(c) + (f",eval={args.eval_samples}" if args.eval_samples is not None else "")
        entry = doc["cells"].get(name)
        if entry and "rougeL" in entry and (not args.footprint or "footprint" in entry):
            print(f"{name}: done (RL {entry['rougeL']})")
            continue
        rpath, recipe = recipe_for(c["d"], args.recipes)
        cfg = qat_config(c, recipe)
        ecfg = EvalConfig(data=cfg.data, split="test",
                          data_cfg=DataConfig(source_max_length=cfg.source_max_length, prefix=cfg.prefix),
                          max_length=cfg.target_max_length, batch_size=64, max_samples=args.eval_samples)
        if "teacher" not in doc["meta"] and args.eval_samples is None:
            t0 = time.time()
            r = evaluate_model(args.teacher, None, ecfg)
            doc["meta"]["teacher"] = {"rouge1": r.metrics["rouge1"], "rouge2": r.metrics["rouge2"],
                                      "rougeL": r.metrics["rougeL"], "rows": len(r.predictions),
                                      "eval_seconds": round(time.time() - t0, 1)}
            doc["meta"].update({"machine": f"{platform.machine()}, {args.threads} threads",
                                "torch": torch.__version__, "eval": f"test split, greedy, max_length "
                                f"{cfg.target_max_length}, fake quant (= packed logits)"})
            save_cells(doc)
            print("teacher", doc["meta"]["teacher"], flush=True)
        student = student_for(c, recipe, work, args.teacher)
        out = work / folder_name(cell_name(c))
        seconds = None
        if not out.exists():
            partial = out.with_name(out.name + ".partial")
            from dqtool.stages.qat import _last_checkpoint

            resume = _last_checkpoint(partial) is not None
            t0 = time.time()
            qat(student, out, cfg, teacher=str(args.teacher), progress=False, cache_dir=work / "cache",
                resume=resume, force=partial.exists() and not resume)
            seconds = round(time.time() - t0, 1)
        entry = doc["cells"].get(name, {})
        if "rougeL" not in entry:
            t0 = time.time()
            r = evaluate_model(out, None, ecfg)
            log = json.loads((out / "training_log.json").read_text())
            train_loss = next((e["train_loss"] for e in reversed(log) if "train_loss" in e), None)
            entry = {**c, "recipe": str(rpath.relative_to(REPO)), "rouge1": round(r.metrics["rouge1"], 3),
                     "rouge2": round(r.metrics["rouge2"], 3), "rougeL": round(r.metrics["rougeL"], 3),
                     "rows": len(r.predictions), "eval_samples": args.eval_samples,
                     "train_seconds": seconds if seconds is not None else entry.get("train_seconds"),
                     "eval_seconds": round(time.time() - t0, 1), "train_loss": train_loss,
                     "max_steps": cfg.max_steps, "learning_rate": cfg.learning_rate, "weight_method": cfg.scheme.weight_spec().method
                     if cfg.scheme.w_bits else None, "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
            doc["cells"][name] = entry
            save_cells(doc)
        if args.footprint and "footprint" not in doc["cells"][name]:
            doc["cells"][name]["footprint"] = footprint(out, work, folder_name(name), recipe)
            save_cells(doc)
        e = doc["cells"][name]
        print(f"{name}: RL {e['rougeL']} R1 {e['rouge1']} R2 {e['rouge2']} train {e['train_seconds']} s "
              f"eval {e['eval_seconds']} s", flush=True)


def list_cells(args) -> None:
    doc = load_cells()
    t = doc["meta"].get("teacher", {})
    print("teacher", t)
    for name, e in sorted(doc["cells"].items()):
        drop = 100 * (1 - e["rougeL"] / t["rougeL"]) if t else float("nan")
        print(f"{name:70s} RL {e['rougeL']:6.2f} ({drop:+.1f}% drop) train {e['train_seconds']} s")


# Published relative points (BART-base on XSUM, 6+6 teacher), for the size-vs-quality plot.
PAPER_POINTS = [
    {"label": "DQ-BART 2-2-8 (6-6, BART-base/XSUM)", "ratio": 13.4, "drop_pct": 9.1, "kind": "paper"},
    {"label": "TBT 2-2-8 (BART-base/XSUM; ratio taken as DQ-BART's, same bits)", "ratio": 13.4, "drop_pct": 3.4,
     "kind": "tbt"},
]


LEVERS = [  # (label, cell fields) -- seed 42, 3+2, 300 steps
    ("ternary (TWN, DQ-BART), lr 5e-4 [the main job before]", {}),
    ("seq four-level (ParetoQ), lr 5e-4", {"m": "seq"}),
    ("lsq learned ternary (TBT's 4/3 mean abs(w) start), lr 5e-4", {"m": "lsq"}),
    ("lsq, lr 1e-3", {"m": "lsq", "lr": "1e-3"}),
    ("lsq, lr 2e-3 [the main job now]", {"m": "lsq", "lr": "2e-3"}),
    ("ternary, lr 2e-3", {"lr": "2e-3"}),
    ("seq, lr 2e-3", {"m": "seq", "lr": "2e-3"}),
    ("lsq, lr 5e-4, E=4 (2-4-8)", {"m": "lsq", "wea": "2-4-8"}),
    ("lsq, lr 5e-4, E=8 (2-8-8)", {"m": "lsq", "wea": "2-8-8"}),
]
SEEDED = [  # (label, cell fields) -- every seed scored
    ("ternary (TWN), lr 5e-4 [before]", {}),
    ("seq four-level, lr 5e-4", {"m": "seq"}),
    ("lsq learned ternary, lr 5e-4", {"m": "lsq"}),
    ("lsq learned ternary, lr 2e-3 [now]", {"m": "lsq", "lr": "2e-3"}),
    ("ternary (TWN), lr 2e-3", {"lr": "2e-3"}),
    ("seq four-level, lr 2e-3", {"m": "seq", "lr": "2e-3"}),
]
DEPTHS = ("3+3", "3+2", "3+1")
GRID = [("8-8-8", {"wea": "8-8-8", "lr": "2e-3"}), ("4-4-8", {"wea": "4-4-8", "lr": "2e-3"}),
        ("2-2-8 ternary", {"wea": "2-2-8", "lr": "2e-3"}),
        ("2-2-8 four-level (seq)", {"wea": "2-2-8", "m": "seq", "lr": "2e-3"}),
        ("2-2-8 learned ternary (lsq)", {"wea": "2-2-8", "m": "lsq", "lr": "2e-3"})]
ABLATIONS = [
    ("2-2-8 lsq lr 2e-3 (the reference: the main job's 2-bit setting)", {"m": "lsq", "lr": "2e-3"}),
    ("no distillation (task loss only, data targets)", {"m": "lsq", "lr": "2e-3", "kd": "none", "tgt": "data"}),
    ("no sequence-level distillation (data targets, logits KL kept)", {"m": "lsq", "lr": "2e-3", "tgt": "data"}),
    ("no layer copy (random init)", {"m": "lsq", "lr": "2e-3", "init": "random"}),
    ("lever alone: lsq (lr 5e-4)", {"m": "lsq"}),
    ("lever alone: lr 2e-3 (ternary)", {"lr": "2e-3"}),
    ("E=4 on top of lsq at lr 5e-4 (2-4-8; vs the lsq lr 5e-4 row)", {"m": "lsq", "wea": "2-4-8"}),
]

LAYER_MAPS = [  # which teacher layers the student decoder copies (teacher decoder layers 0, 1, 2)
    ("3+2 lsq, decoder copies 0,2 (default: first and last)", {"d": "3+2", "m": "lsq", "lr": "2e-3"}),
    ("3+2 lsq, decoder copies 0,1", {"d": "3+2", "m": "lsq", "lr": "2e-3", "dmap": "0-1"}),
    ("3+2 lsq, decoder copies 1,2", {"d": "3+2", "m": "lsq", "lr": "2e-3", "dmap": "1-2"}),
    ("3+1 lsq, decoder copies 0 (SFT's first: the grid's and dqtool's default before)", {"d": "3+1", "m": "lsq", "lr": "2e-3"}),
    ("3+1 lsq, decoder copies 1", {"d": "3+1", "m": "lsq", "lr": "2e-3", "dmap": "1"}),
    ("3+1 lsq, decoder copies 2 (DQ-BART's last: dqtool's default now)", {"d": "3+1", "m": "lsq", "lr": "2e-3", "dmap": "2"}),
]
STEPS_31 = [(f"3+1 lsq, lr 2e-3, {n} steps", {"d": "3+1", "m": "lsq", "lr": "2e-3",
                                              "steps": "recipe" if n == 300 else str(n)}) for n in (300, 600, 1200)]


def table(args) -> None:
    import statistics

    doc = load_cells()
    t = doc["meta"]["teacher"]
    cells = {n: e for n, e in doc["cells"].items() if e.get("eval_samples") is None}

    def rows_for(want: dict, seeds=None):
        full = {**DEFAULTS, **want}
        return [e for e in cells.values() if all(e[k] == v for k, v in full.items() if k != "seed")
                and (seeds is None or e["seed"] in seeds)]

    def fp_for(want: dict):
        full = {**DEFAULTS, **want}
        for e in cells.values():
            if e.get("footprint") and all(e[k] == full[k] for k in ("d", "wea", "m")):
                return e["footprint"]
        return None

    teacher_bytes = next((e["footprint"]["teacher_fp32_bytes"] for e in cells.values() if e.get("footprint")), None)

    def stats(rows):
        rls = [e["rougeL"] for e in rows]
        mean = statistics.fmean(rls)
        return {"n": len(rows), "seeds": sorted(int(e["seed"]) for e in rows), "per_seed":
                {e["seed"]: e["rougeL"] for e in rows}, "rouge1": statistics.fmean(e["rouge1"] for e in rows),
                "rouge2": statistics.fmean(e["rouge2"] for e in rows), "rougeL": mean,
                "rougeL_std": statistics.stdev(rls) if len(rls) > 1 else None, "min": min(rls), "max": max(rls),
                "drop_pct": 100 * (mean / t["rougeL"] - 1)}

    def size(want):
        fp = fp_for(want)
        if not fp:
            return "?", "?", None
        return f"{fp['packed_file_bytes'] / 1e6:.2f}", f"{fp['ratio_to_teacher']:.1f}", fp

    def line(label, st, want, with_size=True):
        mb, ratio, _ = size(want) if with_size else ("", "", None)
        if st is None:
            return f"| {label} | {mb} | {ratio} | missing (not run) | | | | |"
        sp = f" ± {st['rougeL_std']:.2f}" if st["rougeL_std"] is not None else ""
        rng = f"{st['min']:.2f}..{st['max']:.2f}" if st["n"] > 1 else ""
        return (f"| {label} | {mb} | {ratio} | {st['rouge1']:.2f} | {st['rouge2']:.2f} | {st['rougeL']:.2f}{sp} | "
                f"{rng} | {st['drop_pct']:+.1f}% | {','.join(map(str, st['seeds']))} |").replace(
                    "| missing", "| missing")

    head = ["| cell | packed MB | x smaller | ROUGE-1 | ROUGE-2 | ROUGE-L (mean ± std) | min..max | RL vs teacher | seeds |",
            "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    out = {"teacher": t, "teacher_fp32_bytes": teacher_bytes, "paper_points": PAPER_POINTS, "sections": {}}
    md = []

    def section(key, title, note, items, seeds=None):
        nonlocal md
        if key not in args.sections.split(","):
            return
        md += [f"## {title}", "", note, ""] + head
        out["sections"][key] = {}
        for label, want in items:
            rows = rows_for(want, seeds)
            st = stats(rows) if rows else None
            out["sections"][key][label] = {"cell": want, "stats": st, "footprint": fp_for(want)}
            md.append(line(label, st, want))
        md.append("")

    section("levers", "2-bit levers (3+2, 2-2-8 unless named, 300 steps, seed 42)",
            "One seed each: a screen. The seed spread of one setting reaches 1.2 ROUGE-L (next table), so "
            "only the seeded rows decide.",
            LEVERS, seeds={"42"})
    section("seeds", "Seeds (3+2, 2-2-8, 300 steps, the main job's budget)",
            "Same seeds, same budget: four-level (seq) and learned ternary (lsq) against TWN ternary.", SEEDED)
    steps = sorted({300 if e["steps"] == "recipe" else int(e["steps"]) for e in cells.values() if e["m"] == args.best_m and e["lr"] == args.best_lr
                    and e["d"] == "3+2" and e["wea"] == "2-2-8"})
    budget = [(f"{args.best_m}, lr {args.best_lr}, {n} steps", {"m": args.best_m, "lr": args.best_lr,
                                                               "steps": "recipe" if n == 300 else str(n)})
              for n in steps]
    section("steps", f"Step budget (3+2, 2-2-8 {args.best_m}, lr {args.best_lr})",
            "QAT steps x batch 16 rows; the linear schedule decays to 0 at each run's own last step.", budget)
    grid = [(f"{d} {label}", {"d": d, **want}) for d in DEPTHS for label, want in GRID]
    section("grid", f"The paper's table on {args.teacher_label} (W-E-A x student depth, 300 steps)",
            "Student depth encoder+decoder (the teacher is 3+3). 2-bit cells: every seed run is averaged.", grid)
    section("ablations", "Ablations (3+2, 2-2-8 lsq, 300 steps)",
            "Each row removes one ingredient of the reference (or changes the layer copy).", ABLATIONS)
    section("layermap", "Decoder layer map (2-2-8 lsq, lr 2e-3, 300 steps)",
            "Which teacher decoder layers the student decoder starts from (the encoder copies all 3).", LAYER_MAPS)
    section("steps31", "Step budget at 3+1 (2-2-8 lsq, lr 2e-3)",
            "QAT steps x batch 16 rows; the linear schedule decays to 0 at each run's own last step.", STEPS_31)
    return md, out


def write_results(args) -> None:
    md, out = table(args)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    (args.out.parent / (args.out.name + "_tables.md")).write_text("\n".join(md) + "\n")
    plot(out, args.out.with_suffix(".png"), args.teacher_label)
    print("\n".join(md))


def plot(out: dict, path: Path, teacher_label: str = "the demo teacher") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6.4))
    colors = {"3+3": "tab:blue", "3+2": "tab:orange", "3+1": "tab:green"}
    marks = {"8-8-8": "o", "4-4-8": "s", "2-2-8 ternary": "v", "2-2-8 four-level (seq)": "D",
             "2-2-8 learned ternary (lsq)": "*"}
    for label, g in out["sections"]["grid"].items():
        st, fp = g["stats"], g["footprint"]
        if not st or not fp:
            continue
        d, scheme = label.split(" ", 1)
        ax.errorbar(fp["ratio_to_teacher"], st["drop_pct"], yerr=(st["rougeL_std"] or 0) / out["teacher"]["rougeL"] * 100,
                    fmt=marks.get(scheme, "o"), color=colors.get(d, "k"), ms=8, capsize=3,
                    label=f"demo {d} {scheme}, lr 2e-3")
    for label in ("ternary (TWN), lr 5e-4 [before]", "seq four-level, lr 5e-4", "lsq learned ternary, lr 5e-4"):
        g = out["sections"].get("seeds", {}).get(label)
        if g and g["stats"] and g["footprint"]:
            st = g["stats"]
            ax.errorbar(g["footprint"]["ratio_to_teacher"], st["drop_pct"],
                        yerr=(st["rougeL_std"] or 0) / out["teacher"]["rougeL"] * 100, capsize=3, ms=7,
                        fmt={"t": "v", "s": "D", "l": "*"}[label[0]], color="gray", mfc="none",
                        label=f"demo 3+2 2-2-8 {label.split(',')[0]}, lr 5e-4")
    for p in out["paper_points"]:
        paper = p["kind"] == "paper"
        ax.plot(p["ratio"], -p["drop_pct"], "X" if paper else "P", color="k" if paper else "tab:red", ms=10,
                label=p["label"])
    ax.axhline(-5, color="gray", ls="--", lw=1)
    ax.text(3.6, -4.8, "-5% of the teacher's ROUGE-L", color="gray", fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("x smaller than the fp32 teacher (packed weights)")
    ax.set_ylabel("ROUGE-L relative to the teacher (%)")
    ax.set_title(f"Size vs quality on {teacher_label} (3+3, d=128), beside published points", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", dest="cells_file", type=Path, default=CELLS, help="the cells file (one per teacher)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train (or resume) and score the given cells")
    r.add_argument("cells", nargs="+", help="cell specs, e.g. d=3+2,wea=2-2-8,m=seq,seed=1")
    r.add_argument("--teacher", type=Path, default=REPO / "runs" / "demo" / "teacher")
    r.add_argument("--recipes", type=Path, default=REPO / "recipes" / "paper-demo")
    r.add_argument("--work", type=Path, default=REPO / "runs" / "demo_grid")
    r.add_argument("--eval-samples", type=int, default=None, help="test rows scored (default: all)")
    r.add_argument("--footprint", action="store_true", help="also convert the cell and record its packed size")
    r.add_argument("--threads", type=int, default=2)
    sub.add_parser("list", help="print the scored cells")
    t = sub.add_parser("table", help="write the tables (JSON, Markdown) and the size-vs-quality PNG")
    t.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "demo_grid")
    t.add_argument("--best-m", default="lsq")
    t.add_argument("--teacher-label", default="the demo teacher", help="names the teacher in titles, e.g. 'teacher B'")
    t.add_argument("--best-lr", default="2e-3")
    t.add_argument("--sections", default="levers,seeds,steps,grid,ablations",
                   help="tables written, comma-separated (also: layermap, steps31)")
    args = ap.parse_args()
    globals()["CELLS"] = args.cells_file.resolve()   # load_cells/save_cells read the module's CELLS
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    {"run": run, "list": list_cells, "table": write_results}[args.cmd](args)


if __name__ == "__main__":
    main()
