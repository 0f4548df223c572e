"""Footprint at facebook/bart-base's shape from the real path: QAT folder -> ``dqtool convert``
-> ``dqtool export``, with the folders' bytes on disk against the bit-count bound.

Builds BART-base from its config (d 768, 6+6 layers, FFN 3072, vocab 50265, 1024 positions;
no weights needed: sizes do not depend on values), takes students of 6-6, 6-3 and 6-1
layers, prepares them for W-E-A 8-8-8, 4-4-8 and 2-2-8 with the learned positions quantized
at the E bits (``--pos-bits e``), saves each as a QAT folder (0 training steps: a footprint
needs none), then runs dqtool's ``convert`` (default settings: base-3 storage of 2-bit codes,
float16 per float group where the check passes; 1 check input of 8 tokens to keep it fast)
and ``export``. Sizes are whole folders (weights, layout/graphs, config, manifest; no
tokenizer, as none is built here). The fp32 teacher is its tensors at 4 bytes.

For the 6-1 2-2-8 student it also converts and exports with ``--ternary-storage 2bit`` and
times ONNX Runtime session creation (encoder + decoder, 2 threads, median of 3) for both
storages, and checks in ORT's optimized graphs that the base-3 decoding was folded
(no BitwiseOr node of the decoding and no base-3 initializer left in use).

Writes ``benchmarks/results/footprint_bart_base.{json,md}``. Usage (heavy: ~20 min on 2 cores)::

    flock /tmp/dqtool-heavy.lock .venv/bin/python benchmarks/footprint_bart_base.py [--cells 6-1:2-2-8,...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import BartConfig, BartForConditionalGeneration

from dqtool.formats.manifest import write_manifest
from dqtool.formats.qat import save_qat
from dqtool.model.qmodules import prepare
from dqtool.qmath.scheme import QuantScheme
from dqtool.stages.convert import ConvertConfig, convert
from dqtool.formats.onnx import ONNX_SUBDIR
from dqtool.stages.export import DECODER_FILE, ENCODER_FILE, ExportConfig, _all_graphs, export

REPO = Path(__file__).resolve().parents[1]
BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
            decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024)
STUDENTS = ("6-6", "6-3", "6-1")
SCHEMES = ("8-8-8", "4-4-8", "2-2-8")
PAPER_MAX_RATIO = 27.7
MB = 1e6


class _NoTokenizer:  # the footprint needs no text; the folders are weights-only (allowed by every stage)
    def save_pretrained(self, folder) -> None:
        pass


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def session_start(folder: Path, runs: int = 3) -> dict:
    import onnxruntime as ort

    from dqtool.runtimes.ort import session_options

    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for f in (ENCODER_FILE, DECODER_FILE):
            ort.InferenceSession(str(folder / ONNX_SUBDIR / f), session_options(2), providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 2), "runs_s": [round(t, 2) for t in times]}


def folded(folder: Path, base3: list[str], tmp: Path) -> dict:
    """ORT's optimized graphs: op counts of what could run per step from the base-3 decoding."""
    import onnx
    import onnxruntime as ort

    from dqtool.runtimes.ort import session_options

    out = {}
    for f in (ENCODER_FILE, DECODER_FILE):
        so = session_options(2)
        so.optimized_model_filepath = str(tmp / f"opt-{f}")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"opt-{f}.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(folder / ONNX_SUBDIR / f), so, providers=["CPUExecutionProvider"])
        m = onnx.load(str(tmp / f"opt-{f}"), load_external_data=False)
        ops = [n.op_type for g in _all_graphs(m.graph) for n in g.node]
        used = {x for g in _all_graphs(m.graph) for n in g.node for x in n.input}
        out[f] = {"decode_nodes_left": ops.count("BitwiseOr"), "base3_inputs_in_use": sorted(set(base3) & used)}
    return out


def cell(root: Path, enc: int, dec: int, wea: str, storage: str = "base3") -> dict:
    model = BartForConditionalGeneration(BartConfig(**{**BASE, "encoder_layers": enc, "decoder_layers": dec})).eval()
    scheme = QuantScheme.from_wea_pos(wea, "e")
    prepare(model, scheme)
    q = root / f"qat-{enc}-{dec}-{wea}"
    q.mkdir()
    save_qat(model, _NoTokenizer(), q, scheme)
    write_manifest(q, "qat", inputs={}, config={"steps": 0})
    del model
    t0 = time.perf_counter()
    p = root / f"packed-{enc}-{dec}-{wea}-{storage}"
    r = convert(q, p, ConvertConfig(check_samples=1, check_length=8, ternary_storage=storage))
    t_convert = time.perf_counter() - t0
    shutil.rmtree(q)
    t0 = time.perf_counter()
    o = root / f"onnx-{enc}-{dec}-{wea}-{storage}"
    e = export(p, o, ExportConfig(check_samples=1, check_length=8))
    t_export = time.perf_counter() - t0
    bound = r.footprint["bound"]
    row = {"student": f"{enc}-{dec}", "wea": wea, "pos_bits": scheme.pos_bits, "ternary_storage": storage,
           "float_dtype": r.float_dtype, "float_dtypes": r.float_dtypes, "bound": bound,
           "packed_file_bytes": r.footprint["packed_file_bytes"], "packed_folder_bytes": folder_bytes(p),
           "onnx_folder_bytes": folder_bytes(o), "onnx_files": {k: v for k, v in e.sizes.items()
                                                                 if isinstance(v, int) and k != "total"},
           "onnx_check": {k: e.check[k] for k in ("encoder_rel", "decoder_logits_rel", "argmax_agreement")},
           "paths": e.paths, "convert_s": round(t_convert, 1), "export_s": round(t_export, 1)}
    row["packed_over_bound"] = round(row["packed_folder_bytes"] / bound["total"] - 1, 4)
    row["onnx_over_bound"] = round(row["onnx_folder_bytes"] / bound["total"] - 1, 4)
    return row, p, o


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default=None, help="comma list of STUDENT:WEA (default: the 9-cell grid)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "footprint_bart_base"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    teacher = BartForConditionalGeneration(BartConfig(**BASE))
    seen, teacher_bytes = set(), 0  # each storage once: the tied embedding / lm_head one time
    for t in teacher.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            teacher_bytes += t.numel() * 4
    del teacher
    cells = [tuple(c.split(":")) for c in args.cells.split(",")] if args.cells else \
        [(s, w) for s in STUDENTS for w in SCHEMES]
    # The headline cell first (with the storage comparison), then the table in order.
    cells.sort(key=lambda c: c != ("6-1", "2-2-8"))
    rows, storage = [], {}
    with tempfile.TemporaryDirectory(dir=str(REPO / "runs") if (REPO / "runs").is_dir() else None) as d:
        root = Path(d)
        for student, wea in cells:
            enc, dec = (int(x) for x in student.split("-"))
            row, p, o = cell(root, enc, dec, wea)
            row["ratio_packed"] = round(teacher_bytes / row["packed_folder_bytes"], 2)
            row["ratio_onnx"] = round(teacher_bytes / row["onnx_folder_bytes"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if (student, wea) == ("6-1", "2-2-8"):
                base3 = json.loads((o / "dqtool-manifest.json").read_text())["base3_tables"]
                storage["base3"] = {"packed_folder_bytes": row["packed_folder_bytes"],
                                    "onnx_folder_bytes": row["onnx_folder_bytes"],
                                    "session_start": session_start(o), "folded": folded(o, base3, root)}
                row2, p2, o2 = cell(root, enc, dec, wea, "2bit")
                storage["2bit"] = {"packed_folder_bytes": row2["packed_folder_bytes"],
                                   "onnx_folder_bytes": row2["onnx_folder_bytes"], "session_start": session_start(o2)}
                print(json.dumps(storage), flush=True)
                shutil.rmtree(p2)
                shutil.rmtree(o2)
            shutil.rmtree(p)
            shutil.rmtree(o)
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps({"rows": rows, "storage": storage}))
    order = {c: i for i, c in enumerate((s, w) for s in STUDENTS for w in SCHEMES)}
    rows.sort(key=lambda r: order.get((r["student"], r["wea"]), 99))
    import onnxruntime
    import transformers

    out = Path(args.out)
    doc = {"teacher_fp32_bytes": teacher_bytes, "config": BASE, "qat_steps": 0,
           "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                        "transformers": transformers.__version__},
           "machine": "2 CPU cores shared with other jobs (timings noisy)", "rows": rows,
           "ternary_storage_6_1_2_2_8": storage}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Footprint at BART-base shape (real folders: QAT -> convert -> export)", "",
             f"fp32 teacher (6+6, every tensor once): {teacher_bytes:,} bytes ({teacher_bytes / MB:.1f} MB). "
             f"Students built from the config (0 QAT steps), learned positions quantized at the E bits, "
             f"`dqtool convert` defaults (2-bit codes in base 3, float16 per float group where the check "
             f"passes), `dqtool export` defaults. Folder bytes = every file (weights, layout or graphs, "
             f"config, manifest; no tokenizer). Bound = codes at their bits (base 3: log2 3 per code), scales "
             f"and floats at their stored dtype. Command: `.venv/bin/python benchmarks/footprint_bart_base.py` "
             f"(x86_64, 2 cores; sizes do not depend on the machine).", "",
             "| student | W-E-A | packed folder MB | ONNX folder MB | bound MB | codes | scales | floats | "
             "positions | packed over bound | ONNX over bound | x smaller (packed) | x smaller (ONNX) | floats as |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        b = r["bound"]
        fl = r["float_dtype"] if r["float_dtype"] != "mixed" else \
            ", ".join(f"{g} {t.replace('float', 'fp')}" for g, t in r["float_dtypes"].items())
        lines.append(f"| {r['student']} | {r['wea']} | {r['packed_folder_bytes'] / MB:.2f} | "
                     f"{r['onnx_folder_bytes'] / MB:.2f} | {b['total'] / MB:.2f} | {b['codes']:,} | {b['scales']:,} | "
                     f"{b['floats']:,} | {b['positions']:,} | {100 * r['packed_over_bound']:.1f}% | "
                     f"{100 * r['onnx_over_bound']:.1f}% | {r['ratio_packed']} | {r['ratio_onnx']} | {fl} |")
    if storage:
        lines += ["", "## Ternary storage, 6-1 2-2-8", "",
                  "| storage | packed folder MB | ONNX folder MB | ORT session start s (enc+dec, median of 3) |",
                  "|---|---:|---:|---:|"]
        for k, v in storage.items():
            lines.append(f"| {k} | {v['packed_folder_bytes'] / MB:.2f} | {v['onnx_folder_bytes'] / MB:.2f} | "
                         f"{v['session_start']['median_s']} |")
        if "folded" in storage.get("base3", {}):
            lines += ["", "ORT's optimized graphs (base 3): " + "; ".join(
                f"{f}: {v['decode_nodes_left']} BitwiseOr nodes, base-3 initializers in use: "
                f"{v['base3_inputs_in_use'] or 'none'}"
                for f, v in storage["base3"]["folded"].items()) + " (the decoding is constant-folded at session "
                "start; nothing of it runs per step)."]
    best = next((r for r in rows if (r["student"], r["wea"]) == ("6-1", "2-2-8")), None)
    if best:
        lines += ["", f"6-1 2-2-8: packed folder {best['packed_folder_bytes'] / MB:.2f} MB "
                      f"({best['ratio_packed']}x), ONNX folder {best['onnx_folder_bytes'] / MB:.2f} MB "
                      f"({best['ratio_onnx']}x) against DQ-BART's {PAPER_MAX_RATIO}x "
                      f"(<= {teacher_bytes / PAPER_MAX_RATIO / MB:.1f} MB)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
