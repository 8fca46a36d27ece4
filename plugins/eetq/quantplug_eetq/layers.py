"""Dequantize, requantize and build EETQ layers, always through EETQ's own code.

EETQ stores ``weight`` (``qweight`` on ``W8A16Linear``) as an int8 ``(in, out)``
tensor already pre-processed for its CUTLASS GEMM: rows permuted within tiles,
values offset by 128 and interleaved, in a layout chosen from the GPU's
architecture when the weight was quantized. Nothing here reads that storage:

- dequantize runs the layer's own forward on rows of the identity matrix, without
  the bias, which gives the fp16 weight the kernel multiplies by, exactly;
- requantize calls EETQ's own ``quant_weights`` (symmetric per-channel int8 and the
  pre-processing, in one op) on ``(W + ΔW)ᵀ``, as ``eetq.modules.qlinear`` and
  transformers' EETQ integration do.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from quantplug_eetq import NAME, REQUIREMENT, VARIANTS, packed_weight_name

# identity rows per forward call in dequantize: bounds the temporary to CHUNK x in fp16
CHUNK = 4096


def _packed(module: nn.Module) -> torch.Tensor:
    name = packed_weight_name(module) or "weight"
    return getattr(module, name)


def _without_bias(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` sharing its tensors, whose bias is None; ``module`` is untouched."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    clone.training = False
    if getattr(clone, "bias", None) is not None:
        clone.bias = None
    return clone


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` fp16 weight the layer's kernel uses: its forward on the identity, without bias.

    Each output element is one product ``1 * fp16(q * s)`` (the rest are zeros),
    so this is exact whatever the storage layout, and works for every layer class
    this plugin claims, including one that has already run (EETQ never repacks).
    """
    packed = _packed(module)
    in_features = packed.shape[0]
    runner = _without_bias(module)
    rows = []
    for start in range(0, in_features, CHUNK):
        stop = min(in_features, start + CHUNK)
        eye = torch.zeros(stop - start, in_features, dtype=torch.float16, device=packed.device)
        eye[:, start:stop] = torch.eye(stop - start, dtype=torch.float16, device=packed.device)
        rows.append(runner(eye).to(torch.float16))
    return torch.cat(rows).T.contiguous()


def library_ops(module: nn.Module):
    """EETQ's ops (``quant_weights``, ``w8_a16_gemm``) as the module that defines the layer class uses them.

    ``eetq.modules.qlinear`` imports them from the compiled ``EETQ`` extension;
    transformers' integration holds them in ``eetq_kernels_hub`` (the kernels hub build).
    Taking them from there keeps a layer and its requantized copy on one build of EETQ.
    """
    for cls in type(module).__mro__:
        defining = sys.modules.get(cls.__module__)
        if defining is None:
            continue
        if callable(getattr(defining, "quant_weights", None)):
            return defining
        hub = getattr(defining, "eetq_kernels_hub", None)
        if hub is not None and callable(getattr(hub, "quant_weights", None)):
            return hub
    try:
        import EETQ  # the compiled extension of NetEase-FuXi/EETQ
    except ImportError as exc:
        raise ImportError(
            f"cannot requantize a {type(module).__qualname__}: EETQ's quant_weights op is not importable ({exc}). "
            f"Fix: {REQUIREMENT.install_line()}"
        ) from exc
    return EETQ


def _same_kind(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    new = new.to(device=old.device, dtype=old.dtype)
    return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new


@torch.no_grad()
def requantize(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A copy of ``module`` (same class, bias, attributes) holding EETQ's own quantization of ``weight``.

    EETQ's format has no parameters beyond per-output-channel symmetric int8, so
    quantizing ``weight`` afresh is the format's own requantization. ``quant_weights``
    runs on the CPU and pre-processes for the architecture of the current CUDA device.
    """
    name = packed_weight_name(module) or "weight"
    packed, scales = getattr(module, name), module.weight_scales
    in_features, out_features = packed.shape
    if tuple(weight.shape) != (out_features, in_features):
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}, the layer holds ({out_features}, {in_features})"
        )
    ops = library_ops(module)
    dense = (
        weight.detach().to(device="cpu", dtype=torch.float16).T.contiguous()
    )  # (in, out), as EETQ takes it
    new_packed, new_scales = ops.quant_weights(dense, torch.int8, False)
    if tuple(new_packed.shape) != tuple(packed.shape) or tuple(new_scales.shape) != tuple(scales.shape):
        raise RuntimeError(
            f"EETQ's quant_weights returned shapes {tuple(new_packed.shape)}, {tuple(new_scales.shape)} "
            f"for a layer holding {tuple(packed.shape)}, {tuple(scales.shape)}"
        )
    # deepcopy keeps the class, the bias (copied) and every attribute; the memo swaps in the new tensors
    memo = {id(packed): _same_kind(packed, new_packed), id(scales): _same_kind(scales, new_scales)}
    return copy.deepcopy(module, memo)


def quantize(linear: nn.Linear, variant: str | None) -> nn.Module:
    """Build an EETQ layer from a plain ``nn.Linear`` with EETQ's own API (round-to-nearest int8).

    ``"int8"`` (default): ``eetq.EetqLinear``, the class transformers and EETQ's
    PEFT path use; ``"int8-w8a16"``: ``eetq.W8A16Linear.from_torch``.
    """
    variant = variant or VARIANTS[0]
    if variant not in VARIANTS:
        raise ValueError(f"unknown EETQ variant {variant!r}; valid: {list(VARIANTS)}")
    device = linear.weight.device
    if device.type != "cuda":
        raise ValueError(f"EETQ layers run on CUDA only; move the linear to a GPU first (it is on {device})")
    try:
        from eetq.modules.qlinear import EetqLinear, W8A16Linear, quantize_and_preprocess_weights
    except ImportError as exc:
        raise ImportError(f"EETQ is not importable ({exc}). Fix: {REQUIREMENT.install_line()}") from exc
    with torch.no_grad():
        weight = linear.weight.detach().to(torch.float16)
        bias = linear.bias.detach().to(torch.float16) if linear.bias is not None else None
        if variant == "int8-w8a16":
            half = nn.Linear(
                linear.in_features,
                linear.out_features,
                bias=bias is not None,
                device=device,
                dtype=torch.float16,
            )
            half.weight.copy_(weight)
            if bias is not None:
                half.bias.copy_(bias)
            return W8A16Linear.from_torch(half)
        layer = EetqLinear(linear.in_features, linear.out_features, bias=bias is not None, device=device)
        packed, scales = quantize_and_preprocess_weights(
            weight
        )  # (out, in) fp16 -> (in, out) int8, (out,) fp16
        layer.weight = packed.to(device)
        layer.register_scale(device)
        layer.weight_scales.copy_(scales.to(device=device, dtype=torch.float16))
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


__all__ = ["NAME", "dequantize", "library_ops", "quantize", "requantize"]
