"""dqtool: joint distillation and quantization (DQ-BART) for seq2seq transformers.

Each stage is a function (and a ``dqtool`` CLI command): :func:`dqtool.stages.distill.distill`,
:func:`dqtool.stages.qat.qat`, :func:`dqtool.stages.convert.convert`, :func:`dqtool.stages.export.export`,
:func:`dqtool.stages.bench.stage.bench`; :func:`dqtool.compress.compress` runs them from a recipe.
Layers (each imports only its own floor or below; README "Layout"): base -> qmath, data ->
model -> formats -> runtimes -> stages -> compress -> cli.
Runtimes: ``dqtool.load_packed(folder, device=...)`` (PyTorch on the packed integers) and
``dqtool.load_onnx(folder)`` (ONNX Runtime).
"""

from dqtool.base.errors import DQToolError
from dqtool.base.version import __version__

__all__ = ["__version__", "DQToolError", "load_packed", "load_onnx"]


def __getattr__(name):
    # Lazy: importing dqtool (e.g. for the CLI's --help) must not import torch.
    if name == "load_packed":
        from dqtool.formats.packed import load_packed

        return load_packed
    if name == "load_onnx":
        from dqtool.runtimes.ort import load_onnx

        return load_onnx
    raise AttributeError(f"module 'dqtool' has no attribute {name!r}")
