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
import torch.nn.functional as F
from quantplug.lora import LoraLayer

from quantplug_awq import _layers


class AwqLoraLayer(LoraLayer):
    """``LoraLayer`` whose base call has a backward to the input and leaves the base's dtype alone."""

    _dense_cache: tuple[object, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> AwqLoraLayer:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for child in self.children():
            if child is not self.base:  # gptqmodel kernels without training support raise in train()
                child.train(mode)
        if not mode:
            self._dense_cache = None
        return self

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self._dense_forward(x)
        if torch.compiler.is_compiling() and _layers.layout(self.base) == _layers.GEMM:
            return self._dense_forward(x)  # the same math, without the forward's in-place dtype casts
        if _layers.follows_input_dtype(self.base):
            dtype = _layers.compute_dtype(self.base)
            if x.dtype != dtype:
                return self.base(x.to(dtype)).to(x.dtype)
        return self.base(x)

    def _dense_weight(self) -> torch.Tensor:
        if _layers.layout(self.base) in (_layers.GEMM, _layers.INT8):
            return _layers.dequantize(self.base)  # as cheap as the library's own forward
        cached = self._dense_cache
        if cached is not None and cached[0] is self.base:
            return cached[1]
        weight = _layers.dequantize(self.base)
        if self.training:
            self._dense_cache = (self.base, weight)
        return weight

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._dense_weight().to(device=x.device, dtype=x.dtype)
        bias = self.bias
        return F.linear(x, weight, None if bias is None else bias.to(device=x.device, dtype=x.dtype))
