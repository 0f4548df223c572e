"""What a ``dqtool compress`` plan pays to see whether a large teacher changed.

Saves a teacher of facebook/bart-base's shape (random weights from its config, fp32,
about 560 MB of safetensors, plus the tiny test tokenizer) and times
``describe_source(teacher)`` (what the plan hashes once per plan when stages are done):

* ``cold``: an empty hash cache (the first plan, or a teacher just retrained), which reads
  every byte (the file is in the page cache, so this is sha256 speed, not disk speed);
* ``warm``: the same teacher again with the cache file on disk, in a fresh ``HashCache``
  as a new ``dqtool`` process would load it (stat calls only);
* ``rewritten``: the weights rewritten with other values at the same path and size,
  then hashed again (the cache must miss and read it all).

Writes ``benchmarks/results/plan_teacher_hash.{json,md}``.

Usage::

    flock /tmp/dqtool-heavy.lock .venv/bin/python benchmarks/plan_teacher_hash.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    import dqtool.formats.hashcache as hc
    from dqtool.formats.hf import describe_source
    from tiny import tiny_tokenizer

    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="dqtool-bench-hash-"))
    teacher = root / "teacher"
    cfg = BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                     max_position_embeddings=1024)
    torch.manual_seed(0)
    BartForConditionalGeneration(cfg).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    size = sum(f.stat().st_size for f in teacher.iterdir() if f.is_file())
    cache = root / "cache.json"
    os.environ["DQTOOL_HASH_CACHE"] = str(cache)
    time.sleep(hc.RACY_NS / 1e9 + 0.5)  # files younger than RACY_NS are never cached

    def timed(label: str) -> dict:
        hc._shared = None  # a new process: the cache is loaded from its file
        t0 = time.perf_counter()
        describe_source(teacher)
        s = time.perf_counter() - t0
        c = hc.shared()
        return {"case": label, "seconds": round(s, 4), "files_read": c.hashed, "cache_hits": c.hits}

    rows = [timed("cold"), timed("warm"), timed("warm")]
    w = teacher / "model.safetensors"
    torch.manual_seed(1)
    BartForConditionalGeneration(cfg).save_pretrained(teacher)  # same shapes: same size, other bytes
    rows.append(timed("rewritten"))
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
              "teacher_bytes": size, "weights_bytes": w.stat().st_size, "rows": rows,
              "note": "One run on a machine shared with other jobs: ratios, not absolute speeds"}
    out = REPO / "benchmarks" / "results"
    (out / "plan_teacher_hash.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# Plan cost of hashing a BART-base-shaped teacher", "",
          f"Teacher folder {size / 1e6:.0f} MB ({w.stat().st_size / 1e6:.0f} MB weights). {result['note']}.", "",
          "| case | seconds | files read | cache hits |", "|---|---:|---:|---:|"]
    md += [f"| {r['case']} | {r['seconds']} | {r['files_read']} | {r['cache_hits']} |" for r in rows]
    (out / "plan_teacher_hash.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    import shutil

    shutil.rmtree(root)


if __name__ == "__main__":
    main()
