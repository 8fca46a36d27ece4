"""The core's own plugin: the reference kernels, the default adapter layer, and plain linears.

Registered through the same hooks as any backend ("builtins are plugins"),
so the core's defaults can be read and traced like everyone else's; a
plugin replaces a default for its own backend's layers by implementing the
hook (the defaults are ``trylast``). The ``linear`` backend it declares handles plain
``torch.nn.Linear`` layers, so LoRA works on unquantized models too; it
claims only layers whose class and weight are exactly torch's own.
"""

from __future__ import annotations

from quantplug import hookimpl
from quantplug._info import BackendInfo

NAME = "linear"


@hookimpl
def quantplug_backend_info():
    return BackendInfo(
        name=NAME,
        devices=("cpu", "cuda"),
        variants=("dense",),
        shardable=True,
        limits={
            "zeros": "a plain nn.Linear has no zero points; mode='requantize' or 'dense' merges it exactly"
        },
    )


def is_plain_linear(module) -> bool:
    """A ``torch.nn.Linear`` of torch's own, holding a plain weight (torchao swaps in tensor subclasses)."""
    import torch
    from torch import nn

    weight = getattr(module, "weight", None)  # compressed layers keep codes, not a weight
    return type(module) is nn.Linear and type(weight) in (nn.Parameter, torch.Tensor)


@hookimpl(trylast=True)
def quantplug_detect_layer(module):
    return NAME if is_plain_linear(module) else None


@hookimpl(trylast=True)
def quantplug_compute_dtype(module):
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if tensor.is_floating_point():
            return tensor.dtype
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


@hookimpl(trylast=True)
def quantplug_wrap_layer(module, backend):
    from quantplug._lora import LoraLayer

    return LoraLayer(module, backend)


@hookimpl
def quantplug_layer_variant(module, backend):
    return "dense" if backend == NAME else None


@hookimpl
def quantplug_dequantize(module, backend):
    if backend == NAME:
        return module.weight.detach().clone()
    return None


@hookimpl
def quantplug_requantize(module, weight, backend):
    if backend != NAME:
        return None
    return dense_linear(weight, getattr(module, "bias", None))


@hookimpl
def quantplug_quantize(linear, backend):
    if backend != NAME:
        return None
    return dense_linear(linear.weight.detach(), linear.bias)


def dense_linear(weight, bias):
    """A plain ``nn.Linear`` holding ``weight`` (and a copy of ``bias``), frozen, on weight's device."""
    from torch import nn

    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone().to(weight.device), requires_grad=False)
    return layer


@hookimpl
def quantplug_register_kernels(register):
    from quantplug import _kernels as kernels

    register.kernel("lora_add", kernels.lora_add_reference, name="reference", priority=0)
    register.kernel("lora_linear", kernels.lora_linear_reference, name="reference", priority=0)
    register.kernel("fused_lora_linear", kernels.fused_lora_linear_reference, name="reference", priority=0)
    register.kernel("lora_mixed_add", kernels.lora_mixed_add_reference, name="reference", priority=0)
    if triton_usable():
        try:
            from quantplug import _triton as triton_kernels
        except Exception:  # a Triton that cannot build for this torch: the references serve CUDA too
            return
        triton_kernels.register(register)


def triton_usable() -> bool:
    """Whether the CUDA Triton kernels can serve here: a CUDA device and an importable Triton."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available()
