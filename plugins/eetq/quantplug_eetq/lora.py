"""The adapter layer over an EETQ layer, and the gradient EETQ's kernels do not give.

EETQ's ``w8_a16_gemm`` reads its input's memory as contiguous fp16 rows whatever
the tensor's dtype and strides (``reinterpret_cast<half*>(input.data_ptr())``), so a
bf16 or fp32 activation, or a transposed view, gives wrong numbers without an
error. :class:`EetqLoraLayer` hands the base contiguous fp16 rows and returns the
caller's dtype. ``W8A16Linear`` and EETQ 1.0.0's ``EetqLinear`` compute under
``torch.no_grad()``, so no gradient reaches the layers before them; this module's
autograd functions give the input its gradient, ``grad @ W``, with ``W`` dequantized
through the layer's own forward (as EETQ 1.0.1's own backward does).
"""

from __future__ import annotations

import torch
from quantplug import LoraLayer
from torch import nn

from quantplug_eetq import packed_weight_name


def _input_grad(layer: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    from quantplug_eetq.layers import dequantize

    weight = dequantize(layer)  # (out, in) fp16, recomputed per backward: no dense copy is kept
    return grad.to(weight.dtype) @ weight


class _BaseWithInputGrad(torch.autograd.Function):
    """``layer(x)`` through EETQ's kernel, with ``dL/dx = dL/dy @ W``."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer(x)

    @staticmethod
    def backward(ctx, grad):
        return _input_grad(ctx.layer, grad), None


class _AttachInputGrad(torch.autograd.Function):
    """Pass ``y`` (already computed without a graph) through, giving ``x`` its gradient."""

    @staticmethod
    def forward(ctx, x, y, layer):
        ctx.layer, ctx.x_shape, ctx.x_dtype = layer, x.shape, x.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        flat = _input_grad(ctx.layer, grad.reshape(-1, grad.shape[-1]))
        return flat.reshape(ctx.x_shape).to(ctx.x_dtype), None, None


def _gradient_hook(module, args, output):
    if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or output.requires_grad:
        return None  # inference, or the layer has its own backward (EETQ 1.0.1's EetqLinear in training)
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.requires_grad:
        return None
    return _AttachInputGrad.apply(x, output, module)


def pass_input_gradient(module: nn.Module) -> None:
    """Make an EETQ layer that computes without a graph pass its input's gradient (idempotent)."""
    if getattr(module, "_quantplug_eetq_gradient", None) is None:
        module._quantplug_eetq_gradient = module.register_forward_hook(_gradient_hook)


class EetqLoraLayer(LoraLayer):
    """:class:`quantplug.LoraLayer` whose base gets contiguous fp16 rows and a backward pass."""

    @classmethod
    def around(cls, base: nn.Module, backend: str) -> EetqLoraLayer:
        # transformers' EetqLinear has no in_features/out_features: read them off the (in, out) weight
        packed = getattr(base, packed_weight_name(base) or "weight")
        return cls(base, backend, in_features=packed.shape[0], out_features=packed.shape[1])

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.float16).contiguous()
        if torch.is_grad_enabled() and rows.requires_grad:
            y = _BaseWithInputGrad.apply(rows, self.base)
        else:
            # the base is frozen: no graph through it, so EETQ's own backward (which fails when only
            # transformers' trainable-by-default bias needs a gradient) is never called
            with torch.no_grad():
                y = self.base(rows)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
