"""Packed footprint at facebook/bart-base's shape (no weights needed: sizes do not depend on values).

Builds BART-base from its config (d 768, 6+6 layers, FFN 3072, vocab 50265, 1024 positions),
takes students of 6-6, 6-3 and 6-1 layers, prepares them for W-E-A 8-8-8, 4-4-8 and 2-2-8,
packs them with dqtool's packer (float32 floats and scales, as ``dqtool convert --float-dtype
float32`` writes) and saves ``packed.safetensors``: the bytes are real. The fp32 teacher
size is its tensors at 4 bytes. Writes ``benchmarks/results/footprint_bart_base.{json,md}``.

Usage::

    .venv/bin/python benchmarks/footprint_bart_base.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BartConfig, BartForConditionalGeneration

from dqtool.stages.convert import bit_bound
from dqtool.model.packed import pack_model
from dqtool.model.qmodules import prepare
from dqtool.qmath.scheme import QuantScheme

REPO = Path(__file__).resolve().parents[1]
BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
            decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024)


def main() -> None:
    torch.manual_seed(0)
    teacher = BartForConditionalGeneration(BartConfig(**BASE))
    # Each storage once: the tied embedding / lm_head counted one time, as save_pretrained stores it.
    seen, teacher_bytes = set(), 0
    for t in teacher.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            teacher_bytes += t.numel() * 4
    del teacher
    rows = []
    for enc, dec in ((6, 6), (6, 3), (6, 1)):
        for wea in ("8-8-8", "4-4-8", "2-2-8"):
            model = BartForConditionalGeneration(BartConfig(**{**BASE, "encoder_layers": enc, "decoder_layers": dec}))
            prepare(model, QuantScheme.from_wea(wea))
            packed, layout, floats = pack_model(model)
            with tempfile.TemporaryDirectory() as d:
                f = Path(d) / "packed.safetensors"
                save_file({**packed, **{k: v.contiguous() for k, v in floats.items()}}, str(f))
                size = f.stat().st_size
            bound = bit_bound(layout, packed, floats)
            rows.append({"student": f"{enc}-{dec}", "wea": wea, "packed_bytes": size, "bound": bound,
                         "ratio_to_fp32_teacher": round(teacher_bytes / size, 2)})
            print(rows[-1], flush=True)
            del model
    out = REPO / "benchmarks" / "results" / "footprint_bart_base"
    out.with_suffix(".json").write_text(json.dumps({"teacher_fp32_bytes": teacher_bytes, "config": BASE,
                                                    "rows": rows}, indent=1) + "\n")
    lines = ["# Packed footprint at BART-base shape", "",
             f"fp32 teacher (6+6, every tensor once): {teacher_bytes:,} bytes. Floats (norms, biases, 1026x768 "
             f"learned positions per stack) and per-row scales in float32.", "",
             "| student | W-E-A | packed.safetensors bytes | codes | scales | floats | x smaller than fp32 teacher |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["bound"]
        lines.append(f"| {r['student']} | {r['wea']} | {r['packed_bytes']:,} | {b['codes']:,} | {b['scales']:,} | "
                     f"{b['floats']:,} | {r['ratio_to_fp32_teacher']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
