"""dqtool: joint distillation and quantization (DQ-BART) for seq2seq transformers.

Each stage is a function (and a ``dqtool`` CLI command): :func:`dqtool.distill.distill`,
:func:`dqtool.qat.qat`, :func:`dqtool.convert.convert`, :func:`dqtool.export.export`,
:func:`dqtool.bench.bench`; :func:`dqtool.compress.compress` runs them from a recipe.
Runtimes: ``dqtool.load_packed(folder, device=...)`` (PyTorch on the packed integers) and
``dqtool.load_onnx(folder)`` (ONNX Runtime).
"""

__version__ = "0.1.0"

from dqtool.errors import DQToolError  # noqa: E402

__all__ = ["__version__", "DQToolError", "load_packed", "load_onnx"]


def __getattr__(name):
    # Lazy: importing dqtool (e.g. for the CLI's --help) must not import torch.
    if name == "load_packed":
        from dqtool.convert import load_packed

        return load_packed
    if name == "load_onnx":
        from dqtool.ort_runtime import load_onnx

        return load_onnx
    raise AttributeError(f"module 'dqtool' has no attribute {name!r}")
