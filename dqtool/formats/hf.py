"""The Hugging Face folder (teacher, ``dqtool distill``'s student): load it from a hub id or a
local folder, with clear errors.

A folder with a ``dqtool-manifest.json`` (a distilled student) is checked against its hashes
before loading; a plain Hugging Face folder has none and is accepted, its weights hashed
into the manifest of whatever is made from it (:func:`describe_source`).

This is the real loading path (``from_pretrained``) that a user runs on
``facebook/bart-base``; here, with no hub access, it is exercised on local folders,
and a hub id that cannot be fetched becomes a one-line error instead of a stack trace.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from dqtool.base.errors import DQToolError
from dqtool.formats.manifest import read_manifest, sha256_file, verify_folder

NAME = "hf"
ACCEPTS = "a Hugging Face model folder (config.json + weights)"


def describe_source(source: str | os.PathLike) -> dict:
    """Identify a model source for manifests: local folder (with file hashes) or hub id.

    A folder is recorded with the sha256 of each top-level file (weights, config,
    tokenizer; hidden files and ``*.md`` left out, subfolders are never read by loading),
    the weights alone under ``weights_sha256``, and, for a dqtool folder, the sha256 of
    its manifest, which a later stage's plan compares to see whether it was made again.
    Hashes come from :mod:`dqtool.formats.hashcache`, so an unchanged large teacher is not re-read.

    Example:
        >>> describe_source("facebook/bart-base")["kind"]
        'hub'
    """
    from dqtool.formats.hashcache import sha256_bytes_of, sha256_files
    from dqtool.formats.manifest import MANIFEST_NAME

    p = Path(source)
    if p.is_dir():
        files = {f.name: f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")
                 and f.suffix != ".md" and f.name != MANIFEST_NAME}
        hashes = sha256_files(files)
        out = {
            "kind": "folder",
            "path": str(p.resolve()),
            "weights_sha256": {n: h for n, h in hashes.items() if Path(n).suffix in (".safetensors", ".bin")},
            "files_sha256": hashes,
        }
        if (p / MANIFEST_NAME).is_file():
            out["manifest_sha256"] = sha256_bytes_of(p / MANIFEST_NAME)
        return out
    return {"kind": "hub", "id": str(source)}


def detect(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a Hugging Face ``config.json`` (check the more specific kinds first)."""
    return (Path(folder) / "config.json").is_file()


def verify(source: str | os.PathLike) -> dict | None:
    """The manifest of a folder dqtool wrote, after every file matched its hash (else a one-line
    DQToolError); ``None`` for a plain Hugging Face folder or a hub id (nothing to check)."""
    p = Path(source)
    if not p.is_dir() or read_manifest(p) is None:
        return None
    return verify_folder(p)


def _check_local(p: Path) -> None:
    if not (p / "config.json").is_file():
        raise DQToolError(f"model folder {p} has no config.json: pass a folder written by save_pretrained or a hub id")
    has_weights = any((p / n).is_file() for n in (
        "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json"))
    if not has_weights:
        raise DQToolError(f"model folder {p} has no weights (model.safetensors or pytorch_model.bin): re-save the model")


def load_config(source: str | os.PathLike):
    """``AutoConfig`` of a hub id or folder; a missing or unreachable source is a DQToolError.

    Example:
        >>> load_config("/no/such/folder")
        Traceback (most recent call last):
        ...
        dqtool.base.errors.DQToolError: model '/no/such/folder' not found: it is neither a local folder nor a hub id that can be downloaded here (offline?); pass a folder written by save_pretrained
    """
    from transformers import AutoConfig

    p = Path(source)
    if p.exists() and not p.is_dir():
        raise DQToolError(f"model path {p} is a file: pass the folder that holds config.json")
    if p.is_dir():
        _check_local(p)
    try:
        return AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        if p.is_dir():
            raise DQToolError(f"model folder {p} has an unreadable config.json ({_first_line(e)}): re-save the model") from e
        raise DQToolError(
            f"model '{source}' not found: it is neither a local folder nor a hub id that can be downloaded here "
            f"(offline?); pass a folder written by save_pretrained") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_seq2seq(source: str | os.PathLike, torch_dtype=None):
    """Load ``(model, tokenizer_or_None)`` for a seq2seq model from a hub id or folder.

    A folder dqtool wrote is checked against its manifest first (:func:`verify`). The
    architecture is validated against the registry, so an unsupported model fails before
    its weights are read. A corrupt weights file is a DQToolError.

    Example (needs real folders, so not run as a doctest)::
        model, tok = load_seq2seq("runs/teacher")
    """
    verify(source)
    return load_verified(source, torch_dtype)


load = load_seq2seq


def load_verified(source: str | os.PathLike, torch_dtype=None):
    """:func:`load_seq2seq` for a folder whose format module has just verified it."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from dqtool.model.registry import spec_for

    config = load_config(source)
    spec_for(config)  # raises for unsupported architectures
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(str(source), config=config, torch_dtype=torch_dtype)
    except Exception as e:  # safetensors/torch raise many types for a corrupt file
        raise DQToolError(f"could not load weights of '{source}' ({_first_line(e)}): the checkpoint is corrupt or incomplete; re-save it") from e
    model.eval()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except Exception:
        tokenizer = None  # a weights-only folder is allowed; stages that need text say so
    return model, tokenizer


def fp32_bytes(source: str | os.PathLike) -> int | None:
    """Bytes of a checkpoint's tensors at float32 (its fp32 footprint), from the safetensors
    headers only; ``None`` when ``source`` is not a local folder with safetensors weights."""
    from safetensors import safe_open

    p = Path(source)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                total += math.prod(sf.get_slice(k).get_shape()) * 4
    return total
