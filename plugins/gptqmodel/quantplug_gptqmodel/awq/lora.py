"""The adapter layer for AWQ bases: a kernel with a backward whenever one is needed, and no dtype drift.

Which kernel serves what (gptqmodel 7.6.0):

- inference (no gradient to the input needed): the layer's own forward,
  called in the layer's compute dtype (the input is cast to it and the output
  back): ``AwqTorchLinear.forward`` otherwise recasts the layer's scales and
  bias in place to whatever dtype the input has (fp16 scales fed bf16 become
  bf16 for good; fp32 input turns bf16 scales into fp16), and
  ``TorchFusedAwqLinear`` refuses any dtype other than its first input's.
- training (the input needs a gradient): dequantize + ``F.linear``.
  ``TorchFusedAwqLinear``/``TorchAtenAwqLinear`` run ``_fused_op_forward``
  under ``no_grad`` after their first inference forward (the input's gradient
  is silently dropped), ``TorchInt8AwqLinear`` raises in training mode and CUDA
  kernels such as ``AwqMarlinLinear`` refuse ``.train()``; AutoAWQ's
  ``WQLinear_GEMM.forward`` runs under ``no_grad`` in its older releases. So
  the wrapped base never leaves the mode it was loaded in.

A layer whose layout can only be read through its forward on an identity
matrix (int4pack after repacking, CUDA kernels) keeps that dense weight cached
while the wrapper is in training mode; ``eval()`` drops it.
"""

from __future__ import annotations

import torch

from quantplug_gptqmodel._torch import GptqmodelLoraLayer
from quantplug_gptqmodel.awq import _layers


class AwqLoraLayer(GptqmodelLoraLayer):
    """``LoraLayer`` whose base call has a backward to the input and leaves the base's dtype alone."""

    layers = _layers
    cheap_layouts = (_layers.GEMM, _layers.INT8)  # dequantize is as cheap as the library's own forward

    def needs_dense(self, x: torch.Tensor) -> bool:
        # the same math, without the forward's in-place dtype casts
        return torch.compiler.is_compiling() and _layers.layout(self.base) == _layers.GEMM

    def needs_own_dtype(self) -> bool:
        return _layers.follows_input_dtype(self.base)
