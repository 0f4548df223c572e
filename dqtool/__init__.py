"""dqtool: joint distillation and quantization (DQ-BART) for seq2seq transformers."""

__version__ = "0.1.0"

from dqtool.errors import DQToolError  # noqa: E402

__all__ = ["__version__", "DQToolError"]
