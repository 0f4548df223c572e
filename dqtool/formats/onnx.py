"""The ONNX folder: ``dqtool export``'s output, or any folder in optimum's seq2seq layout.

    onnx/encoder_model.onnx       the encoder (``dqtool export`` puts the graphs under onnx/,
                                  where transformers.js looks; optimum's flat layout and older
                                  exports have them at the top)
    onnx/decoder_model_merged.onnx  one decoder with a ``use_cache_branch`` switch, or the pair
    decoder_model.onnx + decoder_with_past_model.onnx
    onnx/<graph>.onnx_data        (dqtool export) each graph's initializers, or one shared
                                  weights.onnx_data (--external-data shared, older exports)
    onnx/generation_model.onnx    (--generation-graph beam) the whole generation in one graph:
                                  ONNX Runtime's BeamSearch op around the two graphs above,
                                  reading the same external data (:mod:`dqtool.runtimes.beamgraph`)
    export.json                   (dqtool export) per-Linear plans, opset, session options
    config.json, generation_config.json, tokenizer files, dqtool-manifest.json

A folder dqtool exported (it holds ``export.json`` or ``weights.onnx_data``) must carry its
manifest and match every hash; a plain optimum export (no dqtool files) is accepted as
input, hashed like a plain Hugging Face folder. The runtime is :mod:`dqtool.runtimes.ort`.
"""

from __future__ import annotations

import os
from pathlib import Path

from dqtool.formats.manifest import read_manifest, verify_folder

NAME = "onnx"
STAGE = "export"  # the manifest's stage
ACCEPTS = "a 'dqtool export' / optimum ONNX folder (encoder_model.onnx)"
ENCODER_FILE = "encoder_model.onnx"
MERGED_FILE = "decoder_model_merged.onnx"
DECODER_FILE = "decoder_model.onnx"
WITH_PAST_FILE = "decoder_with_past_model.onnx"
DATA_FILE = "weights.onnx_data"
GENERATION_FILE = "generation_model.onnx"  # --generation-graph beam: the whole generation, one BeamSearch graph
EXPORT_FILE = "export.json"
ONNX_SUBDIR = "onnx"  # transformers.js (and the Hub's ONNX repos) keep the graphs here


def graph_folder(folder: str | os.PathLike) -> Path:
    """Where the graphs of a model folder are: ``folder/onnx`` when it holds the encoder graph
    (the layout ``dqtool export`` writes), else ``folder`` (optimum's flat layout, older exports).

    Example:
        >>> graph_folder(tmp) == tmp  # tmp: an empty folder (conftest.py)
        True
    """
    p = Path(folder)
    return p / ONNX_SUBDIR if (p / ONNX_SUBDIR / ENCODER_FILE).is_file() else p


def detect(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds an exported seq2seq model (encoder + a decoder with cache),
    at its top or under ``onnx/``.

    Example:
        >>> detect(tmp)  # tmp: an empty folder (conftest.py)
        False
    """
    p = graph_folder(folder)
    return (p / ENCODER_FILE).is_file() and ((p / MERGED_FILE).is_file() or (p / DECODER_FILE).is_file())


is_onnx_folder = detect


def written_by_dqtool(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a ``dqtool export`` output (not a plain optimum export)."""
    p = Path(folder)
    return read_manifest(p) is not None or (p / EXPORT_FILE).is_file() or (p / DATA_FILE).is_file()


def verify(folder: str | os.PathLike) -> dict | None:
    """The manifest of a ``dqtool export`` folder after every file matched its hash (else a
    one-line DQToolError, also when the manifest is missing); ``None`` for a plain optimum
    export, which has no manifest to check."""
    if not written_by_dqtool(folder):
        return None
    return verify_folder(folder, STAGE)
