"""Reading and building optimum-quanto ``QLinear`` layers with quanto's own API.

Imported only inside the hooks: importing optimum.quanto takes seconds (it
pulls in transformers' integrations).
"""

from __future__ import annotations

import copy

import torch
from optimum.quanto import QTensor, freeze, qfloat8, qint2, qint4, qint8
from optimum.quanto import quantize as quanto_quantize
from torch import nn

QTYPES = {"qint8": qint8, "qint4": qint4, "qint2": qint2, "qfloat8": qfloat8}


def dequantize(module: nn.Module) -> torch.Tensor:
    """The weight ``module``'s forward multiplies by, exactly as quanto computes it."""
    with torch.no_grad():
        weight = module.weight
        if isinstance(weight, QTensor):  # frozen: the QTensor's own dequantize()
            return weight.dequantize().detach()
        if module.weight_qtype is None:  # activations-only quantization: the weight is dense
            return weight.detach().clone()
        # not frozen: forward quantizes the float weight on every call (QModuleMixin.qweight)
        return module.qweight.dequantize().detach()


def requantize(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new layer of ``module``'s class with its qtypes, group size, optimizer and scales, holding ``weight``."""
    device = module.weight.device
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight.detach().to(device).clone(), requires_grad=False)
    if module.bias is not None:
        dense.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    new = type(module).from_module(
        dense, weights=module.weight_qtype, activations=module.activation_qtype, optimizer=module.optimizer
    )
    # quanto derives the group size from in_features when the layer is built:
    # keep the layer's own, should it ever have been set otherwise
    new.weight_group_size = module.weight_group_size
    with torch.no_grad():  # calibrated activation scales (Calibration() leaves a grad_fn on them)
        new.input_scale = module.input_scale.detach().clone()
        new.output_scale = module.output_scale.detach().clone()
    # Calibration(streamline=True) removes the output (or input) quantization hook of a
    # layer whose output feeds a float op; a new layer registers both again
    for key, hooks in (("input", "_forward_pre_hooks"), ("output", "_forward_hooks")):
        handle = new._quantize_hooks.get(key)
        if handle is not None and not _hook_active(module, key, hooks):
            handle.remove()
    if module.frozen:
        new.freeze()
    if hasattr(module, "name"):
        new.name = module.name
    new.requires_grad_(False)
    return new


def _hook_active(module: nn.Module, key: str, hooks: str) -> bool:
    """Whether quanto's activation hook ``key`` of ``module`` is still registered."""
    handle = getattr(module, "_quantize_hooks", {}).get(key)
    return handle is not None and handle.id in getattr(module, hooks)


def quantize(linear: nn.Module, variant: str) -> nn.Module:
    """A frozen ``QLinear`` built by quanto's ``quantize`` + ``freeze`` from a copy of ``linear``."""
    # quantize() replaces the linear inside its parent and sets the replaced
    # linear's parameters to None (optimum-quanto 0.2.7 _quantize_submodule):
    # work on a copy so the caller's linear survives
    holder = nn.Sequential(copy.deepcopy(linear))
    quanto_quantize(holder, weights=QTYPES[variant])
    freeze(holder)
    return holder[0]
