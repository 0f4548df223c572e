"""Floor 1, pure math: quantizers (:mod:`~dqtool.qmath.quant`), bit packing
(:mod:`~dqtool.qmath.pack`), W-E-A schemes (:mod:`~dqtool.qmath.scheme`) and the torch
reference of the ONNX quantized ops (:mod:`~dqtool.qmath.onnx_ops`).

torch tensors and functions only: no ``nn.Module``, no model, no file. Imports only
:mod:`dqtool.base`.
"""
