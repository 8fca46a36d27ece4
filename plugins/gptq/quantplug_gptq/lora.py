"""The adapter layer for gptqmodel GPTQ bases: a kernel with a backward whenever one is needed.

Which kernel serves what (gptqmodel 7.6.0):

- inference (no gradient to the input needed): the layer's own forward, the
  fast path it was loaded with (TorchLinear, TorchAtenLinear's int4pack, Marlin,
  ...), except a ``TorchFusedLinear`` with ``sym=False`` on CPU: its CPU repack
  drops the zero points (relative error 0.14 instead of 0.003), so that layer
  runs dequantize + matmul. ``TorchFusedLinear`` repacks for the dtype of its
  first input and then raises on any other ("expected scalar type Half but
  found BFloat16"), so it is always called in its own compute dtype.
- training (the input needs a gradient): dequantize + ``F.linear``. Several
  kernels have no backward: ``TorchFusedLinear``/``TorchAtenLinear`` after
  their first inference forward run ``_fused_op_forward`` under ``no_grad``
  (the input's gradient is silently dropped), ``TorchInt8Linear`` raises in
  training mode, and CUDA kernels such as ExLlamaV2 and Marlin refuse
  ``.train()`` (``SUPPORTS_TRAINING = False``: ``BaseQuantLinear.train``
  raises ``NotImplementedError``), which is why PEFT users switch ExLlama off
  by hand. So the wrapped base never leaves the mode it was loaded in, and the
  backward goes through the dense weight.

Dequantizing a packed layer per step costs what ``TorchLinear``'s own forward
does. A layer whose layout can only be read through its forward on an
identity matrix (int4pack after repacking, CUDA kernels) keeps that dense
weight cached while the wrapper is in training mode; ``eval()`` drops it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from quantplug.lora import LoraLayer

from quantplug_gptq import _layers


class GptqLoraLayer(LoraLayer):
    """``LoraLayer`` whose base call has a backward to the input, and whose base never switches to train mode."""

    _dense_cache: tuple[object, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> GptqLoraLayer:
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
        if (torch.is_grad_enabled() and x.requires_grad) or _layers.zero_point_trap(self.base, x):
            return self._dense_forward(x)
        if torch.compiler.is_compiling() and _layers.layout(self.base) == _layers.PACKED:
            # TorchLinear's eval dequantize keys a cache on qzeros.data_ptr(), which dynamo cannot
            # trace (fullgraph: "Data pointer comparison"); the library's uncached dequantize can
            return self._dense_forward(x)
        if _layers.locks_input_dtype(self.base):
            dtype = _layers.compute_dtype(self.base)
            if x.dtype != dtype:
                return self.base(x.to(dtype)).to(x.dtype)
        return self.base(x)

    def _dense_weight(self) -> torch.Tensor:
        if _layers.layout(self.base) in (_layers.PACKED, _layers.INT8):
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
