"""The adapter layer for AQLM bases: aqlm's own pure-PyTorch kernel away from CUDA.

``aqlm.QuantizedLinear.forward`` on CPU with 2^8-entry codebooks (1x8, 2x8)
goes to a numba kernel, and in aqlm 1.1.7 that path is unusable for LoRA
(all measured on this machine, aqlm 1.1.7, numba 0.68.1, torch 2.13):

- it needs numba and scipy (the ``aqlm[cpu]`` extra): without them the
  first call permutes ``codes`` in place and then raises ``ImportError``;
- its backward transposes the already-permuted codes: ``RuntimeError``
  (size mismatch), or, where the two group counts are equal, silently wrong
  input gradients (relative error 1.2 on a 128 -> 16 layer);
- the kernel's ``prange`` loop adds into a shared output row from several
  threads: with numba's default thread count (2 here) it returned wrong
  outputs in some runs (max error 9 to 27), right ones with
  ``NUMBA_NUM_THREADS=1``;
- with ``out_group_size > 1`` it permutes the codes and then decodes them
  with the unpermuted ``dequantize_gemm``: ``RuntimeError``.

So away from CUDA the wrapped layer calls ``dequantize_gemm`` (what aqlm
itself runs on CPU for every other codebook size) on the stored code
layout: exact, differentiable, and traceable by ``torch.compile``. On CUDA
it calls the layer itself, with aqlm's CUDA/Triton kernels.
"""

from __future__ import annotations

import torch
from quantplug.plugin import LoraLayer

from quantplug_aqlm import layout


class AqlmLoraLayer(LoraLayer):
    """``LoraLayer`` over an ``aqlm.QuantizedLinear``; see the module docstring for why it exists."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if layout.is_aqlm_layer(base) and base.codebooks.device.type != "cuda":
            return layout.forward(base, x)
        return base(x)  # CUDA kernels, or a dense base after qp.merge(mode="dense")
