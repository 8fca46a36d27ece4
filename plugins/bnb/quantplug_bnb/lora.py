"""The adapter layer for bitsandbytes 4-bit bases: a backward pass where bitsandbytes has none.

After bitsandbytes (>= 0.49) repacks a Linear4bit for its AVX512-BF16 CPU
kernel (its first CPU inference forward does that in place), every later
CPU forward goes through ``gemv_4bit``, which has no autograd kernel. A
training step after any evaluation then breaks (bitsandbytes 0.50.2,
measured): with a bias, ``RuntimeError: a view of a leaf Variable that
requires grad is being used in an in-place operation`` from
``matmul_4bit``'s ``result += bias``; without one, the input's gradient is
silently dropped (torch only warns "an autograd kernel was not
registered"), so every adapter below that layer stops learning.
"""

from __future__ import annotations

import torch
from quantplug.plugin import LoraLayer

from quantplug_bnb import _layers


class Bnb4bitLoraLayer(LoraLayer):
    """``LoraLayer`` whose base call has a backward, compiles and shards, whatever bitsandbytes did to the layer.

    Three CPU paths of ``Linear4bit.forward`` are replaced by bitsandbytes'
    own training arithmetic (dequantize, then ``linear`` in the compute
    dtype) on the weight the layer holds, without the in-place repack:

    - a grad-requiring input on a repacked layer (no backward there, see above);
    - any call under ``torch.compile`` on a layer not repacked yet: the repack
      would change the weight's shape in the middle of the trace (torch 2.13:
      "AssertionError: expected size 4096==64" from the fake kernel);
    - a weight that is not bitsandbytes' own ``Params4bit`` (FSDP2 hands the
      layer a plain all-gathered parameter for each call): the repack would
      rewrite that temporary tensor and the shared ``quant_state``, and every
      later call returns garbage (measured: off by 2.5 on the second eval call
      under ``fully_shard`` on CPU, bitsandbytes 0.50.2).

    Every other call is the layer's own forward, fused kernel included.
    """

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        # after a dense merge the base is a plain nn.Linear (backend "linear")
        if x.device.type == "cpu" and self.backend == "bnb":
            if _layers.is_cpu_packed(base):
                if x.requires_grad and torch.is_grad_enabled():
                    return _layers.forward_4bit_dequantized(base, x)
            elif torch.compiler.is_compiling() or not _layers.owns_weight(base):
                return _layers.forward_4bit_dequantized(base, x)
        return base(x)
