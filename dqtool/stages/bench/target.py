"""What bench measures: a :class:`Target` (a name, its role, the files it loads, how to load it).

Shared by the bench stage and its peers (:mod:`dqtool.stages.bench.peers`), which both
make targets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_data", ".data", ".pt")


@dataclass
class Target:
    """One thing measured: a name, who it is (teacher / dqtool / peer), and how to load it."""

    name: str
    role: str                          # teacher | student | dqtool | peer
    kind: str                          # hf | qat | packed | onnx | a peer kind
    files: list[Path]
    load: Callable[[], tuple]          # -> (model with HF-style generate, tokenizer)
    encode: Callable | None = None     # (model, ids, mask) -> None; None: not separable
    path: str | None = None
    notes: str = ""

    def describe(self) -> dict:
        """What a fresh process needs to measure this target again (:func:`encoder_of`, the
        loaders of its kind): JSON, no callables.

        Example:
            >>> Target("m", "dqtool", "packed", [Path("/m/packed.safetensors")], load=None, path="/m").describe()
            {'name': 'm', 'role': 'dqtool', 'kind': 'packed', 'files': ['/m/packed.safetensors'], 'path': '/m', 'notes': ''}
        """
        return {"name": self.name, "role": self.role, "kind": self.kind, "files": [str(f) for f in self.files],
                "path": self.path, "notes": self.notes}


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The files a runtime loads from ``folder``: weights and graphs (not tokenizer/config).

    Example:
        >>> model_files("/nonexistent")
        []
    """
    p = Path(folder)
    if not p.is_dir():
        return []
    dirs = [p] + ([p / "onnx"] if (p / "onnx").is_dir() else [])  # dqtool export keeps the graphs in onnx/
    # generation_model.onnx (export --generation-graph beam) is a target of its own, not loaded with the folder.
    return sorted(f for d in dirs for f in d.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)
                  and not f.name.startswith("training_args") and f.name != "generation_model.onnx")


def _torch_encode(model, ids, mask):
    model.get_encoder()(input_ids=ids, attention_mask=mask)


def _onnx_encode(model, ids, mask):
    model.encode(ids, mask)


def encoder_of(kind: str) -> Callable | None:
    """How to time the encoder alone for a target of ``kind`` (None: not separable)."""
    if kind == "ctranslate2":
        return None
    return _onnx_encode if kind in ("onnx", "onnx-beam") else _torch_encode


def folder_target(path: str | os.PathLike, role: str, threads: int, name: str | None = None) -> Target:
    """A :class:`Target` for any folder ``dqtool eval`` accepts."""
    from dqtool import formats
    from dqtool.runtimes.load import load_model

    from dqtool.runtimes.beamgraph import KIND, is_generation_graph, model_root

    if is_generation_graph(path):  # onnx/generation_model.onnx: runs alone on the shared weights
        kind_name = KIND
        formats.verify(model_root(path), "onnx")
        files = [Path(path)] + [f for f in model_files(Path(path).parent) if f.suffix != ".onnx"]
    else:
        kind_name = formats.detect(path)
        formats.verify(path, kind_name)  # here, in bench's own process: a bad folder is a one-line error
        files = model_files(path)

    def load():
        model, tok, _ = load_model(path, threads=threads, need_tokenizer=False)
        return model, tok

    default = f"{model_root(path).name}-beam-graph" if kind_name == KIND else Path(path).name
    return Target(name=name or default, role=role, kind=kind_name, files=files, load=load,
                  encode=encoder_of(kind_name), path=str(path))
