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

from quantplug_gptqmodel._torch import GptqmodelLoraLayer
from quantplug_gptqmodel.gptq import _layers


class GptqLoraLayer(GptqmodelLoraLayer):
    """``LoraLayer`` whose base call has a backward to the input, and whose base never switches to train mode."""

    layers = _layers
    cheap_layouts = (_layers.PACKED, _layers.INT8)  # dequantize is as cheap as the library's own forward

    def needs_dense(self, x: torch.Tensor) -> bool:
        if _layers.zero_point_trap(self.base, x):
            return True
        # TorchLinear's eval dequantize keys a cache on qzeros.data_ptr(), which dynamo cannot
        # trace (fullgraph: "Data pointer comparison"); the library's uncached dequantize can
        return torch.compiler.is_compiling() and _layers.layout(self.base) == _layers.PACKED

    def needs_own_dtype(self) -> bool:
        return _layers.locks_input_dtype(self.base)
