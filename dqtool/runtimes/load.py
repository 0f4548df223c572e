"""Any model folder dqtool reads, as a model with Hugging Face's ``generate`` and a ``config``.

The kind of folder is detected by :func:`dqtool.formats.detect` (most specific first) and
every loader checks the folder against its manifest first (the one integrity policy of
:mod:`dqtool.formats`), so ``eval``, ``bench`` and every other caller refuse the same
folders with the same one-line error.
"""

from __future__ import annotations

import os

import torch

from dqtool import formats
from dqtool.base.errors import DQToolError
from dqtool.formats import hf, packed, qat
from dqtool.model.weight_cache import set_weight_cache
from dqtool.runtimes.beamgraph import KIND as GRAPH_KIND, is_generation_graph, load_generation_graph
from dqtool.runtimes.ort import load_onnx


def _load_qat(source: str):
    model, tok = qat.load_qat(source)
    set_weight_cache(model, "model")  # fake-quantize each weight once, not on every forward
    return model, tok


# kind name -> (source, threads) -> (model, tokenizer_or_None); each loader verifies first.
LOADERS = {
    "onnx": lambda source, threads: load_onnx(source, threads=threads),
    "packed": lambda source, threads: packed.load_packed(source),
    "qat": lambda source, threads: _load_qat(source),
    "hf": lambda source, threads: hf.load_seq2seq(source),
}


def load_model(source: str | os.PathLike, device: str = "cpu", threads: int | None = None,
               need_tokenizer: bool = True, matmul: str = "float"):
    """``(model, tokenizer, kind)`` of any model folder (or an exported ``onnx/generation_model.onnx``,
    kind ``onnx-beam``), ready for ``generate`` on ``device``.

    ``threads``: ONNX Runtime's intra-op threads (default: torch's current thread count).
    ``matmul``: a packed folder's arithmetic (:func:`dqtool.model.packed.set_matmul`); any
    other kind of folder takes only ``"float"``.

    Example (needs a real folder, so not run as a doctest)::
        model, tok, kind = load_model("runs/qat-2-2-8")   # kind == "qat"
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise DQToolError(f"--device {device} but no CUDA GPU is visible here: pass --device cpu")
    graph = is_generation_graph(source)
    name = GRAPH_KIND if graph else formats.detect(source)
    if matmul != "float" and name != "packed":   # only a packed folder has integers to compute from
        raise DQToolError(f"--matmul {matmul} computes from packed integers: {source} is a {name} model, pass a "
                          f"'dqtool convert' output or --matmul float")
    if graph:  # onnx/generation_model.onnx: the whole generation in one ORT graph
        model, tok = load_generation_graph(source, threads if threads is not None else torch.get_num_threads())
        if tok is None and need_tokenizer:
            raise DQToolError(f"{source} has no tokenizer files next to it: re-export the folder")
        return model.to(device).eval(), tok, name
    loader = LOADERS[name] if matmul == "float" else lambda src, threads: packed.load_packed(src, matmul=matmul)
    model, tok = loader(str(source), threads if threads is not None else torch.get_num_threads())
    if tok is None and need_tokenizer:
        raise DQToolError(f"{source} has no tokenizer files: save the tokenizer into the model folder "
                          f"(tokenizer.save_pretrained)")
    return model.to(device).eval(), tok, name
