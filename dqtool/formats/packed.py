"""The packed folder (written by ``dqtool convert``): true packed integer weights.

    packed.safetensors      qweight/scale per quantized module + floats (see dqtool.model.packed);
                            2-bit tables in base 3 when the layout entry says "storage": "base3"
    packing.json            format version, scheme, per-module layout, float dtype
    quantizers.safetensors  learned activation clips (PACT), when the scheme has them
    config.json, generation_config.json, tokenizer files, dqtool-manifest.json

:func:`load_packed` returns a model that computes from the packed tensors (on CPU or
CUDA) with ``generate`` working; a truncated or edited file fails its hash check first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dqtool.base.errors import DQToolError
from dqtool.formats.manifest import verify_folder

NAME = "packed"
STAGE = "convert"  # the manifest's stage
ACCEPTS = "a 'dqtool convert' output (packing.json)"
PACKED_FILE = "packed.safetensors"
LAYOUT_FILE = "packing.json"
FORMAT = "dqtool-packed"
FORMAT_VERSION = 2
# Format 1 = no base-3 tables and no quantized positions; convert still writes such folders as
# format 1 (readable by older dqtool), and every version listed here is read.
READ_VERSIONS = (1, 2)
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def detect(folder: str | os.PathLike) -> bool:
    """True when ``folder`` was written by ``dqtool convert`` (holds packing.json).

    Example:
        >>> detect(tmp)  # tmp: an empty folder (conftest.py)
        False
    """
    return (Path(folder) / LAYOUT_FILE).is_file()


is_packed_folder = detect


def verify(folder: str | os.PathLike) -> dict:
    """The manifest of a packed folder after every file matched its hash (else a one-line DQToolError)."""
    return verify_folder(folder, STAGE)


def sort_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header with its keys in sorted order, in place.

    safetensors writes ``__metadata__`` from a Rust HashMap, whose order changes from one
    call to the next, so identical conversions gave different bytes (and hashes).
    Sorting keeps the header's length (same keys and values), so the data offsets stay.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        doc = ({"__metadata__": dict(sorted(meta.items()))} if meta else {})
        doc.update(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:
            raise AssertionError(f"sorted header of {path} grew from {n} to {len(text)} bytes")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def save(folder: Path, tensors: dict, doc: dict, version: int = FORMAT_VERSION) -> None:
    """Write ``packed.safetensors`` (``tensors``) and ``packing.json`` (``doc`` + format fields)
    into ``folder``; the caller adds the other files and writes the manifest last."""
    from safetensors.torch import save_file

    if version not in READ_VERSIONS:
        raise ValueError(f"packed format {version} is not one of {READ_VERSIONS}")
    save_file(tensors, str(folder / PACKED_FILE), metadata={"format": FORMAT, "format_version": str(version)})
    sort_safetensors_header(folder / PACKED_FILE)
    (folder / LAYOUT_FILE).write_text(json.dumps({"format": FORMAT, "format_version": version, **doc},
                                                 indent=1) + "\n")


def load_packed(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                cache: str = "model", matmul: str = "float"):
    """``(model, tokenizer_or_None)`` of a packed folder, computing from the packed integers.

    Every file is checked against the manifest's hash first, so a truncated or edited
    folder is a one-line error, not garbage output. ``dtype`` is the compute dtype of
    floats and scales (float32 reproduces the QAT model bit for bit).

    ``cache`` says how long dequantized weights are kept (:mod:`dqtool.model.weight_cache`);
    the logits are bit for bit the same in every mode:

    * ``"model"`` (default): dequantized once, on first use, and kept: generation as
      fast as the float model, memory of the float model (4 bytes per quantized weight
      in float32) on top of the packed codes;
    * ``"generate"``: kept during each ``generate`` call, freed after it: the float
      copy exists only while generating, each call pays one dequantization (about one
      uncached forward);
    * ``"none"``: dequantized on every forward (least memory, slowest: at BART-base
      shape seconds per token on a CPU).

    ``matmul="integer"`` computes the Linears in integers (int8 input codes times the
    weight codes, an exact int32 sum, then the scales: ONNX ``MatMulInteger``'s arithmetic)
    and keeps int8 codes instead of float weights (1 byte per weight): faster than the
    float model on a CPU, equal to the QAT logits up to float32 rounding instead of bit
    for bit (:func:`dqtool.model.packed.set_matmul`).

    Example (needs a real folder, so not run as a doctest)::
        model, tok = load_packed("runs/packed-2-2-8", device="cuda")
        model.generate(**tok(["some text"], return_tensors="pt").to("cuda"))
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from dqtool.model.packed import MATMULS, build_packed_model, decode_storage, set_matmul
    from dqtool.model.weight_cache import WeightCache, set_weight_cache
    from dqtool.qmath.scheme import QuantScheme

    WeightCache(cache)  # an unknown mode is an error before any work
    if matmul not in MATMULS:
        raise DQToolError(f"matmul '{matmul}' is not supported: choose {' or '.join(MATMULS)}")
    p = Path(folder)
    if not is_packed_folder(p):
        raise DQToolError(f"{p} has no {LAYOUT_FILE}: pass a folder written by 'dqtool convert'")
    verify(p)
    try:
        doc = json.loads((p / LAYOUT_FILE).read_text())
        if doc.get("format_version") not in READ_VERSIONS:
            raise DQToolError(f"{p} is packed format {doc.get('format_version')}, this dqtool reads "
                              f"{' and '.join(map(str, READ_VERSIONS))}: re-run dqtool convert")
        tensors = load_file(str(p / PACKED_FILE))
        qfile = doc.get("quantizers")
        qstate = load_file(str(p / qfile)) if qfile else {}
        config = AutoConfig.from_pretrained(str(p))
        scheme = QuantScheme.from_dict(doc["scheme"])
        layout = doc["layout"]
        packed = {k: v for k, v in tensors.items()
                  if k.rsplit(".", 1)[-1] in ("qweight", "scale") and k.rsplit(".", 1)[0] in layout}
        floats = {k: v for k, v in tensors.items() if k not in packed}
        packed, layout = decode_storage(packed, layout)   # base-3 tables -> the 2-bit layout, exactly
        model = build_packed_model(config, scheme, packed, layout, floats, qstate, dtype=dtype)
        if (p / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(p))
    except (ValueError, KeyError, OSError, SafetensorError) as e:
        raise DQToolError(f"{p} is not a valid packed folder ({e}); re-run dqtool convert") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception:
        tok = None
    model = model.to(device)
    set_weight_cache(model, cache)
    if set_matmul(model, matmul) == 0 and matmul == "integer":
        raise DQToolError(f"{p}: no Linear of scheme {scheme.wea} can compute in integers (that needs weights per "
                          f"row or tensor and symmetric activations of <= 8 bits per token or tensor): use matmul "
                          f"'float'")
    return model, tok


load = load_packed
