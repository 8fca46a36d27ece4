"""What the core checks at its boundaries: names, dtypes, and what plugins return.

A plugin's result is checked where the core receives it, so a wrong one is a
:class:`~quantplug.PluginError` naming the hook and backend (the caller adds
the layer path) before it can reach a merge or a forward: a dense weight of
the wrong shape would otherwise broadcast into a merge or into DoRA's norms
without any error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantplug._errors import PluginError

BASE = "__base__"  # adapter_names entry for rows that get no adapter (PEFT's name too)


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ValueError(
            f"adapter name {name!r} is not allowed: use a non-empty name without '.', not {BASE!r}"
        )


def check_dtype(dtype: Any, what: str) -> torch.dtype:
    """``dtype`` if it is a floating-point ``torch.dtype``; a clear ``TypeError`` otherwise."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{what} must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}"
            + (f" (a string: pass torch.{dtype})" if isinstance(dtype, str) else "")
        )
    return dtype


class GroupSizeError(ValueError):
    """A QALoRA adapter's pooling group does not fit a layer."""


def check_qalora_group(group: object, in_features: int, backend: str, base: nn.Module) -> int:
    """The pooling group, checked: a positive int dividing ``in_features``.

    ``group`` is the config's ``qalora_group_size``, or what the backend's
    ``quantplug_group_size`` returned for ``base`` when the config left it ``None``.
    """
    if group is None:
        raise GroupSizeError(
            f"use_qalora=True with qalora_group_size=None pools over the layer's quantization groups, and "
            f"backend {backend!r} reports none for this {type(base).__name__} (per-channel, not group-wise, "
            "or groups over permuted columns); pass qalora_group_size=<g>, or leave the layer out of "
            "target_modules"
        )
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        raise PluginError(
            f"quantplug_group_size returned {group!r}, not a positive int or None",
            hook="quantplug_group_size",
            backend=backend,
        )
    if in_features % group:
        raise GroupSizeError(f"in_features={in_features} is not a multiple of qalora_group_size={group}")
    return group


def checked_weight(
    weight: object,
    shape: tuple[int, int],
    backend: str,
    hook: str = "quantplug_dequantize",
    *,
    finite: bool = True,
) -> torch.Tensor:
    """A plugin's dense weight, refused unless it is a floating tensor of ``shape`` (out, in), and finite
    unless ``finite=False`` (that check waits for the device).

    A wrong shape would broadcast into a merge or into DoRA's norms without an error.
    """

    def refuse(problem: str) -> PluginError:
        return PluginError(f"{hook} {problem}", hook=hook, backend=backend)

    if weight is None:
        raise refuse("returned no weight (None)")
    if not isinstance(weight, torch.Tensor):
        raise refuse(f"returned a {type(weight).__name__}, not a tensor")
    if not weight.is_floating_point():
        raise refuse(f"returned a {weight.dtype} tensor; the dense weight must be floating point")
    if tuple(weight.shape) != tuple(shape):
        raise refuse(
            f"returned a weight of shape {tuple(weight.shape)}; the layer's (out_features, in_features) "
            f"is {tuple(shape)}"
        )
    if finite and not torch.isfinite(weight).all():
        raise refuse("returned a weight with NaN or inf")
    return weight


def checked_module(module: object, like: nn.Module, backend: str, hook: str) -> nn.Module:
    """A module a plugin built to stand for ``like`` (a requantized or quantized layer), refused unless it
    is a torch module with ``like``'s ``in_features``/``out_features`` (where it declares them)."""
    if not isinstance(module, nn.Module):
        raise PluginError(
            f"{hook} returned a {type(module).__name__}, not a torch module", hook=hook, backend=backend
        )
    for attr in ("in_features", "out_features"):
        got = getattr(module, attr, None)
        if isinstance(got, int) and got != getattr(like, attr):
            raise PluginError(
                f"{hook} returned a module with {attr}={got}; the layer has {getattr(like, attr)}",
                hook=hook,
                backend=backend,
            )
    return module
