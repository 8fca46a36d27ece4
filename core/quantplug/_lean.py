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
re-runs any other.

Under ``torch.compile`` the node is a pair of custom ops,
``quantplug::lean_lora_linear`` and its backward ``quantplug::lean_lora_grads``:
the compiler sees one opaque call per layer and fuses everything around it
(norms, rotary, residuals, the loss) without a graph break, while the plugin's
dequantization, which Dynamo cannot trace, runs inside the op. An op cannot
take the layer itself, so it takes the layer's key in a process-wide table of
weak references (:func:`lean_key`); the fake (meta) versions read only the
layer's shape from it. Eagerly the same two functions run as an
``autograd.Function``: a custom op's dispatch costs the host about 45 µs more
per call and direction, which an eager step (bound by its host) would pay
three times per linear.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from quantplug._lora import LoraLayer

_LAYERS: weakref.WeakValueDictionary[int, LoraLayer] = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def lean_key(layer: LoraLayer) -> int:
    """A fresh key for ``layer`` in the lean ops' table (its ``_lean_key``; a copy of a layer gets its own)."""
    key = next(_KEYS)
    _LAYERS[key] = layer
    return key


def _layer(key: int) -> LoraLayer:
    layer = _LAYERS.get(key)
    if layer is None:
        raise RuntimeError(
            f"quantplug's lean training op was called for layer key {key}, whose layer no longer exists: "
            "a compiled graph outlived its model; compile the model you train (torch._dynamo.reset() drops "
            "old graphs)"
        )
    return layer


def _forward(
    x: torch.Tensor, xa: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scale: float, layer_key: int
) -> torch.Tensor:
    """``base(x) + scale * (xa @ A.T) @ B.T`` for layer ``layer_key`` (``xa=None``: ``x``), in the dtype the
    layer gives (under autocast, autocast's)."""
    layer = _layer(layer_key)
    with torch.no_grad():  # the inference forward, registered kernels included
        return layer.base_with_adapter(x, x if xa is None else xa, A, B, scale)


def _op_forward(
    x: torch.Tensor, xa: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scale: float, layer_key: int
) -> torch.Tensor:
    """:func:`_forward` in ``x``'s dtype: what the op's fake version can promise without running the layer."""
    return _forward(x, xa, A, B, scale, layer_key).to(x.dtype)


lean_lora_linear = torch.library.custom_op("quantplug::lean_lora_linear", _op_forward, mutates_args=())


@lean_lora_linear.register_fake
def _(x, xa, A, B, scale, layer_key):
    return x.new_empty((*x.shape[:-1], _layer(layer_key).out_features))


def _grads(
    dy: torch.Tensor,
    xa: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    layer_key: int,
    x_dtype: torch.dtype,
    xa_is_x: bool,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients ``(dx, dxa, dA, dB)`` of :func:`_forward`; each one ``needs`` leaves out is empty.

    With ``xa_is_x`` (no dropout, no pooling) ``dx`` holds both of x's gradients, from one product.
    """
    # Every product is one cuBLAS call with the scale as its alpha, and nothing here waits for the
    # GPU: the plugin's weight is checked for shape and dtype, not for finiteness (that check would
    # stop the host once per layer and step; a NaN weight shows in the loss anyway).
    need_x, need_xa, need_A, need_B = needs
    xa_flat = xa.reshape(-1, xa.shape[-1]).to(A.dtype)
    dy_flat = dy.reshape(-1, dy.shape[-1])
    dy_a = dy_flat.to(B.dtype)
    unused = dy_a.new_empty(())  # addmm's input under beta=0: ignored, only alpha scales the product
    dy_b = torch.addmm(unused, dy_a, B, beta=0, alpha=scale)  # (tokens, r): every gradient but dx's shares it
    dA = (dy_b.T @ xa_flat).to(A.dtype) if need_A else _empty(dy)
    dB = torch.addmm(unused, dy_a.T, xa_flat @ A.T, beta=0, alpha=scale).to(B.dtype) if need_B else _empty(dy)
    adapter_dx = dy_b @ A if need_xa or (need_x and xa_is_x) else None
    dx = _empty(dy)
    if need_x:
        weight = _layer(layer_key).dequantized_weight(finite=False)  # this layer's, for this backward only
        compute = torch.promote_types(weight.dtype, dy.dtype)  # fp16 weights, fp32 activations: in fp32
        dy_c, weight = dy_flat.to(compute), weight.to(compute)
        # x's two gradients (through the weight and through the adapter) from one product
        dx = torch.addmm(adapter_dx.to(compute), dy_c, weight) if xa_is_x else dy_c @ weight
        dx = dx.reshape(*dy.shape[:-1], weight.shape[1]).to(x_dtype)
        del weight
    dxa = adapter_dx.reshape(xa.shape).to(xa.dtype) if need_xa else _empty(dy)
    return dx, dxa, dA, dB


def _empty(like: torch.Tensor) -> torch.Tensor:
    """A gradient nobody asked for: a custom op's outputs may not alias, so a new one each time."""
    return like.new_empty(0)


lean_lora_grads = torch.library.custom_op("quantplug::lean_lora_grads", _grads, mutates_args=())


@lean_lora_grads.register_fake
def _(dy, xa, A, B, scale, layer_key, x_dtype, xa_is_x, needs):
    need_x, need_xa, need_A, need_B = needs
    in_features = _layer(layer_key).in_features
    return (
        dy.new_empty((*dy.shape[:-1], in_features), dtype=x_dtype) if need_x else _empty(dy),
        torch.empty_like(xa) if need_xa else _empty(dy),
        torch.empty_like(A) if need_A else _empty(dy),
        torch.empty_like(B) if need_B else _empty(dy),
    )


def _save_inputs(ctx, inputs, output) -> None:
    x, xa, A, B, scale, layer_key = inputs
    ctx.save_for_backward(x if xa is None else xa, A, B)
    ctx.scale, ctx.layer_key, ctx.x_dtype, ctx.xa_is_x = scale, layer_key, x.dtype, xa is None


def _gradients(ctx, dy, grads) -> tuple:
    xa, A, B = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    dx, dxa, dA, dB = grads(dy, xa, A, B, ctx.scale, ctx.layer_key, ctx.x_dtype, ctx.xa_is_x, needs)
    return (*(grad if need else None for grad, need in zip((dx, dxa, dA, dB), needs)), None, None)


lean_lora_linear.register_autograd(
    lambda ctx, dy: _gradients(ctx, dy, torch.ops.quantplug.lean_lora_grads), setup_context=_save_inputs
)


class LeanLoraLinear(torch.autograd.Function):
    """The eager form of ``quantplug::lean_lora_linear``: the same forward and gradients, less host time."""

    @staticmethod
    def forward(ctx, x, xa, A, B, scale: float, layer_key: int):  # type: ignore[override]
        y = _forward(x, xa, A, B, scale, layer_key)
        _save_inputs(ctx, (x, xa, A, B, scale, layer_key), y)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        return _gradients(ctx, dy, _grads)


def lean_lora(
    x: torch.Tensor, xa: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, layer: LoraLayer
) -> torch.Tensor:
    """``base(x) + scale * (xa @ A.T) @ B.T`` through the lean node: the custom op when compiling."""
    xa_or_none = None if xa is x else xa
    if torch.compiler.is_compiling():
        return torch.ops.quantplug.lean_lora_linear(x, xa_or_none, A, B, scale, layer._lean_key)
    return LeanLoraLinear.apply(x, xa_or_none, A, B, scale, layer._lean_key)


def lean_applies(layer: LoraLayer, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether a training forward can take the lean node: adapters train, the base does not, and
    nothing but the base holds the weight (a dense merge puts a trainable-looking ``nn.Linear`` there)."""
    if not torch.is_grad_enabled() or not (A.requires_grad or B.requires_grad or x.requires_grad):
        return False
    return not layer._dense_merged and not any(p.requires_grad for p in layer.base.parameters())
