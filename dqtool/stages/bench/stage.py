"""Stage 5, ``bench``: footprint, latency and quality of dqtool's outputs and of the peers,
measured in one run on one machine, with dqtool's ratio to each.

    model folders (+ teacher, student, peers) --> bench.json, bench.md, size_quality.png, latency.png

Every target is any folder ``dqtool eval`` accepts (HF teacher/student, QAT, packed, ONNX)
or a peer built here from the teacher / layer-copied student (:mod:`dqtool.stages.bench.peers`).

* Footprint: bytes of the files the runtime loads (weights, graphs), per file and total,
  and the ratio of the fp32 teacher's bytes to each.
* Latency (batch sizes x runs after warm-up, median and 10th/90th percentiles): encoder
  time, end-to-end greedy ``generate`` of exactly ``new_tokens`` tokens, and per-token
  decode time = (generate - encoder) / new_tokens. Threads are fixed and recorded.
* Quality: ``dqtool eval``'s greedy generation and ROUGE on the first ``max_samples`` rows.

The JSON has a versioned schema (``schema_version``); gates (:func:`check_gates`) read it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dqtool.base.config_error import ConfigError
from dqtool.base.errors import DQToolError
from dqtool.stages.bench.target import Target, encoder_of, folder_target
from dqtool.base.fsutil import locked

SCHEMA_VERSION = 1
JSON_FILE, MD_FILE = "bench.json", "bench.md"


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Validated on construction.

    Example:
        >>> BenchConfig(runs=5).batch_sizes
        (1, 8)
        >>> BenchConfig(runs=0)
        Traceback (most recent call last):
        ...
        dqtool.base.config_error.ConfigError: --runs must be at least 1, got 0
    """

    data: str | None = None            # quality data (dqtool eval's --data); None: no quality
    split: str = "test"
    max_samples: int = 200             # quality rows
    max_length: int = 32               # quality: generated tokens (greedy)
    source_max_length: int = 128       # quality: source tokens kept
    source_tokens: int = 64            # latency: source length
    new_tokens: int = 32               # latency: generated tokens
    batch_sizes: tuple[int, ...] = (1, 8)
    runs: int = 10
    warmup: int = 2
    threads: int = 2
    device: str = "cpu"
    teacher: str | None = None         # fp32 teacher: ratios, and the source of teacher peers
    student: str | None = None         # layer-copied student (before QAT): source of student peers
    peers: tuple[str, ...] = ()
    plots: bool = True

    def __post_init__(self):
        object.__setattr__(self, "batch_sizes", tuple(int(b) for b in self.batch_sizes))
        object.__setattr__(self, "peers", tuple(self.peers))
        for name in ("max_samples", "max_length", "source_tokens", "new_tokens", "runs", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{{{name}}} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"{{warmup}} must be 0 or more, got {self.warmup}")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{{device}} {self.device} but no CUDA GPU is visible here: pass {{device}} cpu")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"{{batch_sizes}} must be positive integers, got {self.batch_sizes}")
        if self.peers:
            from dqtool.stages.bench.peers import PEERS

            bad = [p for p in self.peers if p not in PEERS]
            if bad:
                raise DQToolError(f"peer '{bad[0]}' is unknown: choose from {', '.join(PEERS)}")
            if self.teacher is None:
                raise ConfigError("{peers} needs {teacher} (peers are built from the fp32 teacher)")


# --------------------------------------------------------------------------- measuring

def _stats(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1000.0
    return {"median_ms": round(float(np.median(a)), 3), "p10_ms": round(float(np.percentile(a, 10)), 3),
            "p90_ms": round(float(np.percentile(a, 90)), 3), "n": len(xs)}


def latency_inputs(tok, cfg: BenchConfig, batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, source_tokens]`` ids of real text from the data when available, else random ids."""
    ids = None
    if cfg.data is not None and tok is not None:
        from dqtool.data.pairs import DataConfig, load_pairs

        try:
            pairs = load_pairs(cfg.data, cfg.split, DataConfig(max_rows=max(64, batch)))
            text = " ".join(pairs.sources)
            row = tok(text, truncation=True, max_length=cfg.source_tokens)["input_ids"]
            if len(row) == cfg.source_tokens:
                ids = torch.tensor([row] * batch)
        except DQToolError:
            ids = None
    if ids is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(min(4, vocab - 1), vocab, (batch, cfg.source_tokens), generator=g)
    return ids, torch.ones_like(ids)


def _greedy_exact(n: int) -> dict:
    # Exactly n new tokens, plain greedy (no n-gram blocking): the same work for every model.
    return dict(num_beams=1, do_sample=False, min_new_tokens=n, max_new_tokens=n, no_repeat_ngram_size=0)


def _fixed(model, kwargs: dict) -> dict:
    """``kwargs`` with the n-gram blocking a generation graph fixed at export (an op attribute,
    ``dqtool export --generation-graph beam``); other models unchanged."""
    fixed = getattr(model, "attributes", None)
    if isinstance(fixed, dict) and "no_repeat_ngram_size" in fixed:
        return dict(kwargs, no_repeat_ngram_size=int(fixed["no_repeat_ngram_size"]))
    return kwargs


def _device(model, cfg: BenchConfig) -> torch.device:
    # PyTorch models (HF, QAT, packed, torch int8 peer) run on cfg.device; ONNX Runtime and
    # CTranslate2 targets run on CPU here.
    if isinstance(model, torch.nn.Module) and torch.device(cfg.device).type == "cuda":
        return torch.device(cfg.device)
    return torch.device("cpu")


def measure_latency(target: Target, model, tok, cfg: BenchConfig) -> dict:
    """Per batch size: encoder, generate and per-token decode times (see module docstring)."""
    out = {}
    vocab = int(model.config.vocab_size)
    on_cuda = _device(model, cfg).type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)  # GPU work is asynchronous
    from dqtool.base.progress import Progress

    bar = Progress(len(cfg.batch_sizes) * (cfg.warmup + cfg.runs), f"  {target.name}: latency", unit="runs")
    for batch in cfg.batch_sizes:
        ids, mask = latency_inputs(tok, cfg, batch, vocab)
        if on_cuda:
            ids, mask = ids.to(cfg.device), mask.to(cfg.device)
        enc_t, gen_t = [], []
        new = None
        with torch.inference_mode():
            for i in range(cfg.warmup + cfg.runs):
                sync()
                t0 = time.perf_counter()
                if target.encode is not None:
                    target.encode(model, ids, mask)
                sync()
                t1 = time.perf_counter()
                seq = model.generate(input_ids=ids, attention_mask=mask, **_fixed(model, _greedy_exact(cfg.new_tokens)))
                sync()
                t2 = time.perf_counter()
                if i >= cfg.warmup:
                    enc_t.append(t1 - t0)
                    gen_t.append(t2 - t1)
                new = int(seq.shape[1]) - 1
                bar.update(1)
        row = {"batch": batch, "source_tokens": cfg.source_tokens, "new_tokens": new, "generate": _stats(gen_t)}
        if target.encode is not None:
            row["encoder"] = _stats(enc_t)
            steps = max(new, 1)
            if getattr(model, "encode_steps", None) is not None and getattr(model, "last_steps", None):
                # a generation graph: its "encoder" is the op's first call plus encode_steps cached steps
                # (dqtool.runtimes.beamgraph.GenerationGraph.encode); per token = the steps beyond those
                steps = max(model.last_steps - model.encode_steps, 1)
                row["encoder_includes_decoder_steps"] = 1 + model.encode_steps
            per_tok = [(g - e) / steps for g, e in zip(gen_t, enc_t)]
            row["decode_per_token"] = _stats(per_tok)
        else:
            row["decode_per_token"] = _stats([g / max(new, 1) for g in gen_t])
            row["decode_includes_encoder"] = True
        # Throughput: generated tokens (all rows) per second, end to end and in the decode loop.
        gen_med = row["generate"]["median_ms"] / 1000
        row["tokens_per_s"] = round(batch * max(new or 0, 1) / gen_med, 1) if gen_med > 0 else None
        dec_med = row["decode_per_token"]["median_ms"] / 1000
        row["decode_tokens_per_s"] = round(batch / dec_med, 1) if dec_med > 0 else None
        out[str(batch)] = row
    bar.close()
    return out


def measure_quality(model, tok, cfg: BenchConfig, name: str = "") -> dict | None:
    """dqtool eval's greedy ROUGE on the first ``max_samples`` rows (None without data)."""
    if cfg.data is None:
        return None
    from dqtool.data.metrics import score
    from dqtool.data.pairs import DataConfig, load_pairs
    from dqtool.model.registry import position_limit
    from dqtool.runtimes.textgen import generate_texts

    dcfg = DataConfig(source_max_length=cfg.source_max_length, max_rows=cfg.max_samples)
    pairs = load_pairs(cfg.data, cfg.split, dcfg)
    # dqtool eval's greedy settings (its EvalConfig(max_length=...).generate_kwargs()).
    greedy = dict(num_beams=1, max_length=cfg.max_length, min_length=0, length_penalty=1.0, no_repeat_ngram_size=0,
                  do_sample=False, early_stopping=False)
    limit = position_limit(model)
    src_len = cfg.source_max_length if limit is None else min(cfg.source_max_length, limit)
    t0 = time.perf_counter()
    preds = generate_texts(model, tok, list(pairs.sources), _fixed(model, greedy), 32, str(_device(model, cfg)), src_len,
                           desc=f"  {name}: quality, generation")
    return {**{k: round(v, 2) for k, v in score(preds, pairs.targets, ("rouge",)).items()},
            "rows": len(preds), "seconds": round(time.perf_counter() - t0, 1)}


def _bytes(files: list[Path]) -> dict:
    per = {f.name: f.stat().st_size for f in files}
    return {"files": per, "total": sum(per.values())}


def _param_count(model) -> int | None:
    if isinstance(model, torch.nn.Module):
        return sum(p.numel() for p in model.parameters()) + sum(
            b.numel() for n, b in model.named_buffers() if n.endswith(("qweight", "scale")))
    return None


def bit_bound_of(path: str | None) -> dict | None:
    """The bit-count bound per tensor group (codes, scales, floats, positions) a packed or
    ONNX folder's manifest records, or None (other models, folders from older dqtool)."""
    if not path:
        return None
    try:
        m = json.loads((Path(path) / "dqtool-manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return (m.get("footprint") or {}).get("bound") or (m.get("sizes") or {}).get("bound")


def measure(target: Target, cfg: BenchConfig, log=print) -> dict:
    """Footprint, latency and quality of one target."""
    t0 = time.perf_counter()
    model, tok = target.load()
    if isinstance(model, torch.nn.Module):
        model.eval()
        if _device(model, cfg).type == "cuda" and target.kind != "pytorch-dynamic":  # torch int8 is CPU-only
            model.to(cfg.device)
    row: dict[str, Any] = {"name": target.name, "role": target.role, "kind": target.kind, "path": target.path,
                           "notes": target.notes, "bytes": _bytes(target.files), "params": _param_count(model),
                           "bit_bound": bit_bound_of(target.path),
                           "load_seconds": round(time.perf_counter() - t0, 2)}
    kernels = onnx_kernels(target.files)
    if kernels:
        row["kernels"] = kernels
    if _fixed(model, {}):
        row["notes"] = (row["notes"] + "; " if row["notes"] else "") + \
            f"one ORT BeamSearch graph (1 beam), n-gram blocking {_fixed(model, {})['no_repeat_ngram_size']} fixed in it"
    log(f"  {target.name}: {row['bytes']['total']:,} bytes; measuring latency")
    row["latency"] = measure_latency(target, model, tok, cfg)
    log(f"  {target.name}: quality")
    row["quality"] = measure_quality(model, tok, cfg, target.name)
    del model
    return row


def onnx_kernels(files: list[Path]) -> dict | None:
    """Which quantized matmul kernels the ONNX graphs among ``files`` run (None: no ONNX graph).

    Per graph file: node counts of the matmul ops (MatMulNBits, MatMulInteger,
    DynamicQuantizeMatMul, MatMulIntegerToFloat, MatMul), the MatMulNBits variants as
    ``"<bits>b/block<B>/acc<level>": count``, and whether the session turns on the
    lookup-table (T-MAC) kernel (``mlas.use_lut_gemm``, recorded by ``dqtool export --lut-gemm``).
    """
    graphs = [f for f in files if f.suffix == ".onnx"]
    if not graphs:
        return None
    import onnx

    out: dict[str, Any] = {}
    for f in graphs:
        m = onnx.load(str(f), load_external_data=False)
        ops: dict[str, int] = {}
        nbits: dict[str, int] = {}
        stack = [m.graph]
        while stack:
            g = stack.pop()
            for n in g.node:
                stack.extend(a.g for a in n.attribute if a.HasField("g"))
                stack.extend(sub for a in n.attribute for sub in a.graphs)
                if n.op_type in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                                 "MatMul", "Gemm"):
                    ops[n.op_type] = ops.get(n.op_type, 0) + 1
                if n.op_type == "MatMulNBits":
                    a = {x.name: x.i for x in n.attribute}
                    key = f"{a.get('bits', 4)}b/block{a.get('block_size')}/acc{a.get('accuracy_level', 0)}"
                    nbits[key] = nbits.get(key, 0) + 1
        out[f.name] = {"ops": dict(sorted(ops.items())), "matmulnbits": dict(sorted(nbits.items()))}
    from dqtool.runtimes.ort import lut_gemm_of

    lut = lut_gemm_of(graphs[0].parent)
    out["lut_gemm"] = lut
    return out


def cpu_features() -> list[str]:
    """The CPU's SIMD features that decide ONNX Runtime's int8/low-bit kernels (from /proc/cpuinfo)."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
              "amx_int8", "amx_bf16", "asimddp", "i8mm", "sve")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


# --------------------------------------------------------------------------- report

def _get(row: dict, *path, default=None):
    x: Any = row
    for p in path:
        if not isinstance(x, dict) or p not in x:
            return default
        x = x[p]
    return x


def add_ratios(report: dict) -> None:
    """For every dqtool row: size, speed and quality against the teacher and every peer."""
    rows = report["rows"]
    b = str(report["config"]["batch_sizes"][0])
    teacher = next((r for r in rows if r["role"] == "teacher"), None)
    t_fp32 = report.get("teacher_fp32_bytes")
    for r in rows:
        if t_fp32:
            r["ratio_to_teacher_fp32"] = round(t_fp32 / r["bytes"]["total"], 2) if r["bytes"]["total"] else None
        if teacher is not None and r["quality"] and teacher["quality"]:
            tq = teacher["quality"]["rougeL"]
            r["quality_drop_vs_teacher"] = round((tq - r["quality"]["rougeL"]) / tq, 4) if tq else None
    for d in (r for r in rows if r["role"] == "dqtool"):
        vs = {}
        for p in rows:
            if p is d or p["role"] == "dqtool":
                continue
            dd, pd = _get(d, "latency", b, "decode_per_token", "median_ms"), _get(p, "latency", b,
                                                                                  "decode_per_token", "median_ms")
            dg, pg = _get(d, "latency", b, "generate", "median_ms"), _get(p, "latency", b, "generate", "median_ms")
            vs[p["name"]] = {
                "size_ratio": round(p["bytes"]["total"] / d["bytes"]["total"], 2) if d["bytes"]["total"] else None,
                "decode_speedup": round(pd / dd, 2) if dd and pd else None,
                "generate_speedup": round(pg / dg, 2) if dg and pg else None,
                "rougeL_delta": round(d["quality"]["rougeL"] - p["quality"]["rougeL"], 2)
                if d["quality"] and p["quality"] else None}
        d["vs"] = vs


def markdown(report: dict) -> str:
    """The report as a Markdown table (batch = the first batch size)."""
    c, m = report["config"], report["machine"]
    b = str(c["batch_sizes"][0])
    lines = ["# dqtool bench", "",
             f"Machine: {m['description']}; {c['threads']} threads; torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
             f"each model measured in its own process. "
             f"Latency: batch {b}, {c['source_tokens']} source tokens, {c['new_tokens']} greedy tokens, median of "
             f"{c['runs']} runs after {c['warmup']} warm-up (p10-p90 in brackets). "
             + (f"Quality: greedy, first {c['max_samples']} rows of {c['data']} ({c['split']})." if c.get("data")
                else "Quality: not measured (no --data)."), "",
             "| model | role | MB | x smaller than fp32 teacher | ROUGE-1 | ROUGE-2 | ROUGE-L | encoder ms | "
             "decode ms/token | generate ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(r, key):
        s = _get(r, "latency", b, key)
        return "" if not s else f"{s['median_ms']:.2f} [{s['p10_ms']:.2f}-{s['p90_ms']:.2f}]"

    for r in report["rows"]:
        q = r["quality"] or {}
        lines.append(f"| {r['name']} | {r['role']} | {r['bytes']['total'] / 1e6:.3f} | "
                     f"{r.get('ratio_to_teacher_fp32') or ''} | {q.get('rouge1', '')} | {q.get('rouge2', '')} | "
                     f"{q.get('rougeL', '')} | {ms(r, 'encoder')} | {ms(r, 'decode_per_token')} | "
                     f"{ms(r, 'generate')} |")
    lines += ["", f"CPU features: {', '.join(m.get('cpu_features') or []) or 'unknown'}.", "",
              "## Throughput (generated tokens per second, all rows of the batch)", "",
              "| model | " + " | ".join(f"batch {x} end to end | batch {x} decode" for x in c["batch_sizes"]) + " |",
              "|---|" + "---:|---:|" * len(c["batch_sizes"])]
    for r in report["rows"]:
        cells = []
        for x in c["batch_sizes"]:
            cells += [str(_get(r, "latency", str(x), "tokens_per_s", default="")),
                      str(_get(r, "latency", str(x), "decode_tokens_per_s", default=""))]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    kern = [r for r in report["rows"] if r.get("kernels")]
    if kern:
        lines += ["", "## ONNX Runtime kernels", "", "| model | graph | matmul ops | MatMulNBits (bits/block/accuracy) "
                  "| LUT kernel |", "|---|---|---|---|---|"]
        for r in kern:
            for g, k in r["kernels"].items():
                if g == "lut_gemm":
                    continue
                ops = ", ".join(f"{o} x{n}" for o, n in k["ops"].items())
                nb = ", ".join(f"{o} x{n}" for o, n in k["matmulnbits"].items())
                lines.append(f"| {r['name']} | {g} | {ops} | {nb} | {'on' if r['kernels']['lut_gemm'] else 'off'} |")
    bound_rows = [r for r in report["rows"] if r.get("bit_bound")]
    if bound_rows:
        lines += ["", "## Where the bytes go (bit-count bound per tensor group, bytes)", "",
                  "| model | on disk | bound | codes | scales | floats | positions |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in bound_rows:
            bb = r["bit_bound"]
            lines.append(f"| {r['name']} | {r['bytes']['total']:,} | {bb['total']:,} | {bb.get('codes', 0):,} | "
                         f"{bb.get('scales', 0):,} | {bb.get('floats', 0):,} | {bb.get('positions', 0):,} |")
    for d in (r for r in report["rows"] if r["role"] == "dqtool" and r.get("vs")):
        lines += ["", f"## {d['name']} against each other model", "",
                  "| other | its size / dqtool's | decode speed-up | generate speed-up | ROUGE-L delta |",
                  "|---|---:|---:|---:|---:|"]
        for name, v in d["vs"].items():
            lines.append(f"| {name} | {v['size_ratio']} | {v['decode_speedup']} | {v['generate_speedup']} | "
                         f"{v['rougeL_delta'] if v['rougeL_delta'] is not None else ''} |")
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path) -> list[str]:
    """size_quality.png (the paper's trade-off) and latency.png; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    b = str(report["config"]["batch_sizes"][0])
    rows = report["rows"]
    colors = {"teacher": "black", "student": "gray", "dqtool": "tab:red", "peer": "tab:blue"}
    written = []
    if any(r["quality"] for r in rows):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            if r["quality"]:
                ax.scatter(r["bytes"]["total"] / 1e6, r["quality"]["rougeL"], color=colors.get(r["role"], "tab:green"))
                ax.annotate(r["name"], (r["bytes"]["total"] / 1e6, r["quality"]["rougeL"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("model bytes on disk (MB, log)")
        ax.set_ylabel("ROUGE-L")
        ax.set_title("Size vs quality")
        fig.tight_layout()
        fig.savefig(out / "size_quality.png", dpi=120)
        plt.close(fig)
        written.append("size_quality.png")
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.5))
    names = [r["name"] for r in rows]
    vals = [_get(r, "latency", b, "decode_per_token", "median_ms", default=0) for r in rows]
    ax.barh(names, vals, color=[colors.get(r["role"], "tab:green") for r in rows])
    ax.set_xlabel(f"decode ms per token (batch {b}, median)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)
    written.append("latency.png")
    return written


def machine() -> dict:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"description": f"{cpu}, {os.cpu_count()} CPUs", "cpu": cpu, "cpus": os.cpu_count(),
            "cpu_features": cpu_features(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------- stage

@dataclass
class BenchResult:
    out_dir: Path
    report: dict = field(default_factory=dict)


@locked("out_dir")
def bench(models: list[str], out_dir: str | os.PathLike, cfg: BenchConfig, force: bool = False,
          log=print) -> BenchResult:
    """Measure ``models`` (dqtool outputs), the teacher, the student and the peers; write the report.

    Example (needs real folders, so not run as a doctest)::
        bench(["runs/onnx-2-2-8"], "runs/bench", BenchConfig(data="data/", teacher="runs/teacher",
                                                             peers=("ort-int8-dynamic",)))
    """
    from dqtool.formats.manifest import check_output

    out = check_output(out_dir, force)
    from dqtool.runtimes.beamgraph import is_generation_graph, model_root

    for m in models:
        if not Path(m).is_dir() and not is_generation_graph(m):
            raise DQToolError(f"model folder {m} not found: pass folders written by dqtool or save_pretrained "
                              f"(or an exported onnx/generation_model.onnx)")
    _check_positions([*(model_root(m) if is_generation_graph(m) else m for m in models), cfg.teacher, cfg.student],
                     cfg)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _bench(models, out, cfg, force, log)
    finally:
        torch.set_num_threads(threads_before)  # a library call leaves the process as it found it


def _check_positions(folders: list, cfg: BenchConfig) -> None:
    """Latency inputs longer than a model's position table would fail mid-measurement (an
    IndexError in a worker): refused before anything is measured."""
    for f in folders:
        cfg_file = Path(f) / "config.json" if f else None
        if cfg_file is None or not cfg_file.is_file():
            continue
        try:
            conf = json.loads(cfg_file.read_text())
        except ValueError:
            continue  # loading it says what is wrong
        if conf.get("model_type") in ("t5", "mt5", "umt5", "longt5"):
            continue  # relative positions: no table
        limit = conf.get("max_position_embeddings")
        if isinstance(limit, int):
            for opt, n in (("--source-tokens", cfg.source_tokens), ("--new-tokens", cfg.new_tokens + 1)):
                if n > limit:
                    raise DQToolError(f"{opt} {n if opt == '--source-tokens' else n - 1} is more than the {limit} "
                                      f"positions of {f}: pass {opt} {limit if opt == '--source-tokens' else limit - 1}"
                                      f" or less")


def _targets(models: list[str], cfg: BenchConfig, peers_dir: Path, log=print) -> list[Target]:
    targets: list[Target] = []
    if cfg.teacher:
        targets.append(folder_target(cfg.teacher, "teacher", cfg.threads, "teacher fp32 (PyTorch)"))
    if cfg.student:
        targets.append(folder_target(cfg.student, "student", cfg.threads, "student fp32 (PyTorch, layer copy)"))
    for m in models:
        targets.append(folder_target(m, "dqtool", cfg.threads))
    if cfg.peers:
        from dqtool.stages.bench.peers import build_peers

        targets += build_peers(cfg.peers, cfg.teacher, cfg.student, peers_dir, cfg.threads, log=log)
    return targets


def _measure_isolated(target: Target, cfg: BenchConfig, log) -> dict:
    """Measure ``target`` in a fresh Python process; return its report row.

    Runtimes keep thread pools that spin after their last op (torch's OpenMP, ONNX
    Runtime, CTranslate2's own OpenMP); measured one after another in one process they
    steal each other's cores, which made a 2-thread CTranslate2 10x slower here. A fresh
    process per target gives every runtime the machine to itself.

    Protocol: the child reads ``{"target": Target.describe(), "cfg": ..., "messages": path}``
    on stdin and appends JSON lines to ``messages``: ``{"log": text}`` while it works, then
    ``{"row": {...}}`` or ``{"error": one line}`` (a DQToolError). Its stdout/stderr are only
    diagnostics (the last stderr line names a crash).
    """
    import sys
    import tempfile

    import subprocess

    from dqtool.base import fsutil

    with tempfile.TemporaryDirectory(prefix="dqtool-bench-") as d:
        messages = Path(d) / "messages.jsonl"
        payload = json.dumps({"target": target.describe(), "cfg": asdict(cfg), "messages": str(messages)})
        code = "import sys; from dqtool.stages.bench.stage import _worker; _worker(sys.stdin.read())"
        # The worker dies with this process: a kill -9 of bench/compress leaves none running.
        proc = fsutil.popen_child([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        proc.stdin.write(payload)
        proc.stdin.close()
        tail = "(no output)"
        for line in proc.stderr:  # progress lines (indented two spaces) are relayed as they come
            line = line.rstrip("\n")
            if line.strip():
                tail = line
            if line.startswith("  "):
                log(line)
        proc.wait()
        lines = messages.read_text().splitlines() if messages.is_file() else []
    row = error = None
    for msg in map(json.loads, lines):
        if "log" in msg:
            log(msg["log"])
        row, error = msg.get("row", row), msg.get("error", error)
    if error is not None:
        raise DQToolError(f"measuring {target.name} failed: {error}")
    if proc.returncode != 0 or row is None:
        raise DQToolError(f"measuring {target.name} failed: {tail}")
    return row


def target_from(desc: dict, threads: int) -> Target:
    """The :class:`Target` that :meth:`Target.describe` described, loading by its kind: a
    folder dqtool reads (checked against its manifest on load), or a peer's own loader."""
    kind, path = desc["kind"], desc["path"]
    if kind == "pytorch-dynamic":
        from dqtool.stages.bench.peers import load_pytorch_int8

        load = lambda: load_pytorch_int8(path)  # noqa: E731
    elif kind == "ctranslate2":
        from dqtool.runtimes.ctranslate2 import load_ct2

        load = lambda: load_ct2(path, threads)  # noqa: E731
    else:
        from dqtool.runtimes.load import load_model

        load = lambda: load_model(path, threads=threads, need_tokenizer=False)[:2]  # noqa: E731
    return Target(name=desc["name"], role=desc["role"], kind=kind, files=[Path(f) for f in desc["files"]], load=load,
                  encode=encoder_of(kind), path=path, notes=desc["notes"])


def _worker(payload: str) -> None:
    d = json.loads(payload)
    out = Path(d["messages"])

    def send(**msg):
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(msg) + "\n")

    cfg = BenchConfig(**{**d["cfg"], "batch_sizes": tuple(d["cfg"]["batch_sizes"]), "peers": tuple(d["cfg"]["peers"])})
    torch.set_num_threads(cfg.threads)
    try:
        row = measure(target_from(d["target"], cfg.threads), cfg, log=lambda m: send(log=m))
    except DQToolError as e:
        send(error=str(e))
        return
    send(row=row)


def _bench(models: list[str], out: Path, cfg: BenchConfig, force: bool, log) -> BenchResult:
    from dqtool.formats.hf import fp32_bytes
    from dqtool.formats.manifest import atomic_output, write_manifest

    with atomic_output(out, force=force) as tmp:
        targets = _targets(models, cfg, tmp / "peers", log=log)  # builds the peers once
        report = {"schema_version": SCHEMA_VERSION, "machine": machine(), "config": asdict(cfg),
                  "teacher_fp32_bytes": fp32_bytes(cfg.teacher) if cfg.teacher else None, "rows": [],
                  "isolation": "one process per target"}
        from dqtool.base.version import __version__

        report["dqtool_version"] = __version__
        for t in targets:
            log(f"bench: {t.name} ({t.kind})")
            report["rows"].append(_measure_isolated(t, cfg, log))
        add_ratios(report)
        (tmp / JSON_FILE).write_text(json.dumps(report, indent=1) + "\n")
        (tmp / MD_FILE).write_text(markdown(report))
        report["plots"] = plots(report, tmp) if cfg.plots else []
        write_manifest(tmp, "bench", inputs={"models": models, "teacher": cfg.teacher, "student": cfg.student,
                                             **_describe_inputs(models, cfg)}, config=cfg)
    return BenchResult(out, report)


def _describe_inputs(models: list[str], cfg: BenchConfig) -> dict:
    """Hashes of what the report was measured on (for ``compress``'s plan): every model
    folder (with its manifest's sha256), the teacher, the student and the data."""
    from dqtool.data.pairs import split_files
    from dqtool.formats.hashcache import describe_data
    from dqtool.formats.hf import describe_source

    named = [*models, *(m for m in (cfg.student, cfg.teacher) if m)]
    return {"sources": {m: describe_source(m) for m in named},
            "data": describe_data(cfg.data, split_files(cfg.data, cfg.split)) if cfg.data else None}


# --------------------------------------------------------------------------- gates

@dataclass(frozen=True)
class Gates:
    """CI gates on a bench report; ``None`` turns a gate off."""

    min_ratio: float | None = None          # fp32 teacher bytes / model bytes, at least
    max_quality_drop: float | None = None   # (teacher ROUGE-L - model ROUGE-L) / teacher ROUGE-L, at most
    max_latency_ms: float | None = None     # decode ms per token (first batch size), at most


def check_gates(report: dict, gates: Gates) -> list[dict]:
    """One row per (dqtool model, gate): value, limit, ok. Missing values fail their gate.

    Example:
        >>> rep = {"config": {"batch_sizes": [1]}, "rows": [{"name": "m", "role": "dqtool",
        ...        "ratio_to_teacher_fp32": 12.0, "quality_drop_vs_teacher": 0.1, "latency": {}}]}
        >>> [(g["gate"], g["ok"]) for g in check_gates(rep, Gates(min_ratio=10, max_quality_drop=0.05))]
        [('min-ratio', True), ('max-quality-drop', False)]
    """
    b = str(report["config"]["batch_sizes"][0])
    out = []
    for r in (r for r in report["rows"] if r["role"] == "dqtool"):
        checks = (("min-ratio", gates.min_ratio, r.get("ratio_to_teacher_fp32"), lambda v, lim: v >= lim),
                  ("max-quality-drop", gates.max_quality_drop, r.get("quality_drop_vs_teacher"),
                   lambda v, lim: v <= lim),
                  ("max-latency", gates.max_latency_ms, _get(r, "latency", b, "decode_per_token", "median_ms"),
                   lambda v, lim: v <= lim))
        for gate, limit, value, ok in checks:
            if limit is None:
                continue
            out.append({"model": r["name"], "gate": gate, "value": value, "limit": limit,
                        "ok": value is not None and ok(value, limit)})
    return out
