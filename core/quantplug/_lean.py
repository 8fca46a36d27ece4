"""The lean training step of an adapter layer: one autograd node for base + LoRA, no dense weight kept.

Autograd through ``base(x) + scale * (x @ A.T) @ B.T`` keeps, until the
backward, whatever the base's own forward saved (for a library that
dequantizes and calls ``matmul``, a dense copy of the weight per layer) and
one tensor per small LoRA op. This node keeps only the adapter's input ``xa``
(``x`` itself when there is no dropout) and ``A``, ``B``. Its forward is the
inference forward (the registered kernels, fused ones included) run without a
graph. The backward:

- ``dB = scale * dyᵀ · (xa Aᵀ)`` (the shrink recomputed: ``r`` columns) and ``dA = (scale * dy · B)ᵀ · xa``, from one
  shared product ``dy · B``;
- ``dxa = scale * (dy · B) · A`` (autograd carries it back through dropout
  or QALoRA pooling, which run outside this node);
- ``dx = dy · W`` with ``W`` dequantized through the backend's plugin at
  that moment and dropped right after, so at most one layer's dense weight
  exists at a time; skipped when ``x`` needs no gradient (the first layer).

The base's weights get no gradient: the node is used only when none of them
requires one. Gradient checkpointing re-runs this node's forward as it
re-runs any other. Under ``torch.compile`` the layer keeps autograd's path, which
AOTAutograd plans itself (this node's backward calls the plugin, which Dynamo
cannot trace).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from quantplug._lora import LoraLayer


class LeanLoraLinear(torch.autograd.Function):
    """``base(x) + scale * (xa @ A.T) @ B.T`` with the backward described in the module docstring."""

    @staticmethod
    def forward(ctx, x, xa, A, B, scale: float, layer: LoraLayer):  # type: ignore[override]
        with torch.no_grad():  # the inference forward, registered kernels included
            y = layer.base_with_adapter(x, xa, A, B, scale)
        ctx.save_for_backward(xa, A, B)
        ctx.scale, ctx.layer, ctx.x_dtype, ctx.xa_is_x = scale, layer, x.dtype, xa is x
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        # Every product is one cuBLAS call with the scale as its alpha, and nothing here waits for the
        # GPU: the plugin's weight is checked for shape and dtype, not for finiteness (that check would
        # stop the host once per layer and step; a NaN weight shows in the loss anyway).
        xa, A, B = ctx.saved_tensors
        scale = ctx.scale
        xa_flat = xa.reshape(-1, xa.shape[-1]).to(A.dtype)
        dy_flat = dy.reshape(-1, dy.shape[-1])
        dy_a = dy_flat.to(B.dtype)
        unused = dy_a.new_empty(())  # addmm's input under beta=0: ignored, only alpha scales the product
        dy_b = torch.addmm(unused, dy_a, B, beta=0, alpha=scale)  # (tokens, r): both gradients share it
        dA = dB = dxa = dx = None
        if ctx.needs_input_grad[3]:  # the shrink again: r columns, not kept
            dB = torch.addmm(unused, dy_a.T, xa_flat @ A.T, beta=0, alpha=scale)
        if ctx.needs_input_grad[2]:
            dA = dy_b.T @ xa_flat
        want_x, want_xa = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if want_xa:
            dxa = dy_b @ A
        if want_x:
            weight = ctx.layer.dequantized_weight(finite=False)  # this layer's, for this backward only
            compute = torch.promote_types(weight.dtype, dy.dtype)  # fp16 weights, fp32 activations: in fp32
            dy_c, weight = dy_flat.to(compute), weight.to(compute)
            if want_xa and ctx.xa_is_x and dxa.dtype == compute:  # x's two gradients in one product
                dx, dxa = torch.addmm(dxa, dy_c, weight), None
            else:
                dx = dy_c @ weight
            dx = dx.reshape(*dy.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
            del weight
        if dxa is not None:
            dxa = dxa.reshape(*dy.shape[:-1], A.shape[1]).to(xa.dtype)
        return dx, dxa, dA, dB, None, None


def lean_applies(layer: LoraLayer, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether a training forward can take the lean node: adapters train, the base does not, and
    nothing but the base holds the weight (a dense merge puts a trainable-looking ``nn.Linear`` there)."""
    if not torch.is_grad_enabled() or not (A.requires_grad or B.requires_grad or x.requires_grad):
        return False
    if torch.compiler.is_compiling():
        return False
    return not layer._dense_merged and not any(p.requires_grad for p in layer.base.parameters())
