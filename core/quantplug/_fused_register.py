"""Registering a plugin's fused GEMV + LoRA kernel (op ``fused_lora_linear``) with the standard guards.

``quantplug.plugin.register_fused_lora``; imports nothing until called, so a
plugin's ``quantplug_register_kernels`` may call it on any machine.
"""

from __future__ import annotations

import importlib


def register_fused_lora(register, module: str, *, name: str, backend: str, priority: int = 10) -> bool:
    """Register ``<module>.fused_lora_linear`` for ``(backend, "cuda")`` when it can and should serve.

    ``module`` is the dotted name of the plugin's kernel module (imported
    here, not before): it must define ``fused_lora_linear``, ``DTYPES`` and
    ``SERVE``. Nothing is registered without Triton or a CUDA device, on a
    GPU older than the kernels need (``fused_lora.MIN_CAPABILITY``, of the
    current device), when the module fails to import (a Triton that cannot
    build for this torch: the library's forward serves), or when its
    ``SERVE`` is false (so ``quantplug doctor`` shows what runs). Returns
    whether it registered; the kernel still declines a call on an older GPU
    of a mixed machine.
    """
    from quantplug._builtin import triton_usable

    if not triton_usable():
        return False
    try:
        kernels = importlib.import_module(module)
    except Exception:  # a Triton that cannot build for this torch: the library's forward serves
        return False
    if not kernels.SERVE:
        return False
    import torch

    from quantplug import _fused  # imported with the kernel module

    if _fused.capability(torch.device("cuda")) < _fused.MIN_CAPABILITY:
        return False
    register.kernel(
        "fused_lora_linear",
        kernels.fused_lora_linear,
        name=name,
        backend=backend,
        device="cuda",
        dtypes=kernels.DTYPES,
        priority=priority,
    )
    return True
