"""Floor 4, folder formats: one module per kind of model folder, and the registry of them.

Each kind (:mod:`~dqtool.formats.onnx`, :mod:`~dqtool.formats.packed`,
:mod:`~dqtool.formats.qat`, :mod:`~dqtool.formats.hf`) owns its file names, ``detect``,
``verify`` and its loader/writer; :mod:`~dqtool.formats.manifest` holds what they share
(hashes, manifests, atomic output folders). :func:`detect` and :func:`verify` here are what
every stage and command uses to recognise a folder and to apply the one integrity policy:

* a folder dqtool wrote (QAT, packed, ``dqtool export``, distilled student) must carry its
  ``dqtool-manifest.json`` and match every hash in it, else a one-line error naming the file;
* a plain Hugging Face folder (or a plain optimum ONNX export) has nothing to verify and is
  accepted, its weights hashed into the manifest of what is made from it.

Runnable models come from :func:`dqtool.runtimes.load.load_model`, which detects and verifies here.
"""

from __future__ import annotations

import os
from pathlib import Path

from dqtool.base.errors import DQToolError
from dqtool.formats import hf, onnx, packed, qat

# Most specific first: a QAT folder is also a valid HF folder (its fake quantization
# would silently be dropped if the HF loader saw it first).
KINDS = (onnx, packed, qat, hf)
NAMES = tuple(k.NAME for k in KINDS)


def kind(name: str):
    """The format module called ``name``.

    Example:
        >>> kind("packed").LAYOUT_FILE
        'packing.json'
    """
    for k in KINDS:
        if k.NAME == name:
            return k
    raise DQToolError(f"unknown folder kind '{name}': choose {', '.join(NAMES)}")


def detect(source: str | os.PathLike) -> str:
    """Name of the kind of ``source``; a hub id (not a folder) is ``hf``.

    Example:
        >>> detect(tmp)  # tmp: an empty folder (conftest.py)
        Traceback (most recent call last):
        ...
        dqtool.base.errors.DQToolError: ... is not a model folder: pass a 'dqtool export' / optimum ONNX folder (encoder_model.onnx) or a 'dqtool convert' output (packing.json) or a 'dqtool qat' output (quantization.json) or a Hugging Face model folder (config.json + weights)
    """
    p = Path(source)
    if not p.is_dir():
        return "hf"  # a hub id or a wrong path: the HF loader gives the offline / not-found error
    for k in KINDS:
        if k.detect(p):
            return k.NAME
    raise DQToolError(f"{p} is not a model folder: pass " + " or ".join(k.ACCEPTS for k in KINDS))


def verify(source: str | os.PathLike, name: str | None = None) -> dict | None:
    """Apply the integrity policy to ``source`` (of kind ``name``, detected when ``None``):
    its manifest after every hash matched, ``None`` for a plain Hugging Face / optimum folder
    or a hub id; a missing manifest or changed file is a one-line DQToolError."""
    return kind(name or detect(source)).verify(source)
