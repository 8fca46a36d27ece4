"""The plugin author's API: everything a backend plugin may import from quantplug's core.

A plugin imports from three places only: ``quantplug`` (the user API),
this module, and ``quantplug.testing`` (its tests). Every other core module
starts with an underscore and may change in any release; this one is
stable, so a change here is a breaking change (``tests/test_plugin_api.py``
fails when a plugin under ``plugins/`` imports anything else).

What is here:

- :data:`hookimpl`, the marker for hook implementations (specs and their
  contracts: :mod:`quantplug.hookspecs`, ``docs/hooks.md``);
- :class:`BackendInfo`, :class:`Requirement`, :class:`BackendStatus`,
  :class:`Status`, the data a plugin declares and reports;
- :class:`LoraLayer`, the adapter layer a plugin subclasses when its base
  must be called differently (override ``base_forward``);
- :class:`KernelRegister` and :data:`KERNEL_OPS`, what
  ``quantplug_register_kernels`` receives and the ops it may register,
  with the plain-PyTorch references :func:`lora_add_reference`,
  :func:`lora_linear_reference`, :func:`lora_mixed_add_reference`;
- :func:`installed_version`, :func:`probe`, :func:`probe_backend`, the
  version probes that never raise, for a ``quantplug_check_backend``
  that refines the default status;
- :data:`fused_lora`, the shared part of a fused quantized-GEMV + LoRA
  Triton kernel (op ``fused_lora_linear``: the adapter's jit helpers,
  split-K, the launcher; importing it imports Triton, so only a plugin's
  CUDA kernel module takes it), and :func:`register_fused_lora`, which
  registers such a kernel behind the standard guards (Triton, a CUDA
  device, the module's ``SERVE``).

Importing this module is as cheap as importing ``quantplug``: the names
that need torch are loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from quantplug import hookimpl
from quantplug._info import MERGE_MODES, BackendInfo, BackendStatus, Requirement, Status
from quantplug._versions import installed_version, probe, probe_backend

_LAZY = {
    "LoraLayer": "quantplug._lora",
    "KernelRegister": "quantplug._kernels",
    "KernelRegistrationError": "quantplug._kernels",
    "KERNEL_OPS": "quantplug._kernels",
    "lora_add_reference": "quantplug._kernels",
    "lora_linear_reference": "quantplug._kernels",
    "lora_mixed_add_reference": "quantplug._kernels",
    "fused_lora": "quantplug._fused",  # the module itself (imports Triton)
    "register_fused_lora": "quantplug._fused_register",
}

__all__ = [
    "KERNEL_OPS",
    "MERGE_MODES",
    "BackendInfo",
    "BackendStatus",
    "KernelRegister",
    "KernelRegistrationError",
    "LoraLayer",
    "Requirement",
    "Status",
    "fused_lora",
    "hookimpl",
    "installed_version",
    "lora_add_reference",
    "lora_linear_reference",
    "lora_mixed_add_reference",
    "probe",
    "probe_backend",
    "register_fused_lora",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quantplug.plugin' has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if name == "fused_lora" else getattr(imported, "OPS" if name == "KERNEL_OPS" else name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from quantplug import _fused as fused_lora
    from quantplug._fused_register import register_fused_lora
    from quantplug._kernels import OPS as KERNEL_OPS
    from quantplug._kernels import (
        KernelRegister,
        KernelRegistrationError,
        lora_add_reference,
        lora_linear_reference,
        lora_mixed_add_reference,
    )
    from quantplug._lora import LoraLayer
