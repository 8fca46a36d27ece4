"""Kernel registry: (op, backend, device type, dtype) -> the fastest registered callable.

Every op has a plain-PyTorch reference, registered by the core's built-in
plugin through the same ``quantplug_register_kernels`` hook as any third
party's kernels, at priority 0. ``QUANTPLUG_KERNELS=reference`` (or
:func:`use_reference_kernels`) forces the references, which is how every
fast kernel is tested.

The ops and their signatures (``y`` is the base layer's output, ``x`` its
input, both ``(..., features)``; the result is ``y`` plus the adapters'
contribution, which a kernel may write into ``y`` in place when ``y`` does
not require grad):

``lora_add(y, x, A, B, scale) -> Tensor``
    ``y + scale * (x @ A.T) @ B.T`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)``.
``lora_linear(base, x, xa, A, B, scale) -> Tensor``
    ``lora_add(base(x), xa, A, B, scale)``: the base layer's call (``base``,
    a callable) and one adapter whose input is ``xa`` (``x`` after dropout,
    or pooled for QALoRA), so that a kernel can run the adapter beside the
    base (on another CUDA stream) rather than after it. The core composes it
    from the base and the registered ``lora_add`` unless a kernel other than
    the reference serves it.
``fused_lora_linear(module, x, xa, A, B, scale) -> Tensor | None``
    ``module(x)`` plus one adapter, as ``lora_linear``, but given the base
    *module* itself, so a backend's kernel can read its packed storage
    (codes, scales, zeros) and compute the quantized product and the adapter
    in one launch; with ``xa``, ``A`` and ``B`` all ``None``, the base alone
    (``LoraLayer.base_call``). A kernel returns ``None`` for any call it does not serve
    (shape, token count, dtype, autograd, layout); the layer then uses
    ``lora_linear``. The layer calls it only when a kernel other than the
    reference serves it, and never after a dense merge; the kernel stands in
    for ``LoraLayer.base_forward``, so register one only for layers whose
    base call is the module's own forward on that device.
``lora_mixed_add(y, x, As, Bs, scales, rows) -> Tensor``
    one adapter per row of the leading (batch) dimension: row ``i`` gets
    adapter ``rows[i]`` (an index into the lists ``As``, ``Bs``, ``scales``),
    or nothing where ``rows[i] == -1``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

OPS = ("lora_add", "lora_linear", "fused_lora_linear", "lora_mixed_add")
ANY = "*"


class KernelRegistrationError(ValueError):
    """A kernel registration is malformed or duplicates an existing name."""


@dataclass(frozen=True)
class Kernel:
    op: str
    fn: Callable
    name: str
    backend: str = ANY
    device: str = ANY
    dtypes: frozenset = field(default_factory=frozenset)
    priority: int = 0

    def serves(self, backend: str, device: str, dtype) -> bool:
        return (
            self.backend in (ANY, backend)
            and self.device in (ANY, device)
            and (not self.dtypes or dtype in self.dtypes)
        )


_forced_reference = os.environ.get("QUANTPLUG_KERNELS", "") == "reference"


def use_reference_kernels(enabled: bool = True) -> None:
    """Force (or stop forcing) the plain-PyTorch reference kernels, process-wide.

    Takes effect on the next call: :meth:`KernelRegistry.resolve` keys its cache
    on this flag, so nothing needs clearing (and this module needs no registry).
    """
    global _forced_reference
    _forced_reference = bool(enabled)


def reference_kernels_forced() -> bool:
    return _forced_reference


class KernelRegistry:
    """All registered kernels; :meth:`resolve` picks one per call site."""

    def __init__(self) -> None:
        self.kernels: list[Kernel] = []
        self._cache: dict[tuple, Kernel] = {}

    def add(self, kernel: Kernel) -> None:
        if any(k.name == kernel.name and k.op == kernel.op for k in self.kernels):
            raise KernelRegistrationError(
                f"a kernel named {kernel.name!r} is already registered for {kernel.op!r}"
            )
        self.kernels.append(kernel)
        self._cache.clear()

    def clear(self) -> None:
        self.kernels.clear()
        self._cache.clear()

    def clear_cache(self) -> None:
        self._cache.clear()

    def resolve(self, op: str, backend: str, device: str, dtype) -> Kernel:
        key = (op, backend, device, dtype, _forced_reference)
        kernel = self._cache.get(key)
        if kernel is None:
            kernel = self._cache[key] = self._best(op, backend, device, dtype)
        return kernel

    def find(self, op: str, backend: str, device: str, dtype) -> Kernel | None:
        """:meth:`resolve`, or ``None`` where nothing is registered for ``op`` (a registry built by
        hand may lack an optional op such as ``fused_lora_linear``)."""
        key = (op, backend, device, dtype, _forced_reference)
        kernel = self._cache.get(key)
        if kernel is None:
            kernel = self._best(op, backend, device, dtype, required=False)
            if kernel is not None:
                self._cache[key] = kernel
        return kernel

    def _best(self, op: str, backend: str, device: str, dtype, required: bool = True) -> Kernel | None:
        # a plain loop: torch.compile traces this on a layer's first call
        best = None
        for kernel in self.kernels:
            if kernel.op != op or not kernel.serves(backend, device, dtype):
                continue
            if _forced_reference and kernel.priority != 0:
                continue
            if best is None or kernel.priority > best.priority:
                best = kernel
        if best is None and required:
            raise LookupError(f"no kernel registered for op {op!r} ({backend}, {device}, {dtype})")
        return best

    def describe(self, backend: str) -> dict[str, str]:
        """Which kernel serves each op on CPU and CUDA in bf16, for ``quantplug doctor``."""
        import torch

        out = {}
        for device in ("cpu", "cuda"):
            for op in OPS:
                with contextlib.suppress(LookupError):
                    out[f"{op}@{device}"] = self.resolve(op, backend, device, torch.bfloat16).name
        return out


class KernelRegister:
    """What ``quantplug_register_kernels`` receives: validates and records kernels."""

    def __init__(self, registry: KernelRegistry) -> None:
        self._registry = registry

    def kernel(
        self,
        op: str,
        fn: Callable,
        *,
        name: str,
        backend: str = ANY,
        device: str = ANY,
        dtypes: Iterable | None = None,
        priority: int = 10,
    ) -> None:
        """Register ``fn`` for ``op``.

        :param op: one of :data:`OPS`.
        :param fn: the callable, with the op's signature.
        :param name: unique per op, shown by ``quantplug doctor`` (``"triton-splitk"``).
        :param backend: the backend whose layers it serves, or ``"*"`` for all.
        :param device: ``"cuda"``, ``"cpu"`` or ``"*"``.
        :param dtypes: the input dtypes it handles; ``None`` for all.
        :param priority: higher wins; 0 is reserved for the references.
        """
        if op not in OPS:
            raise KernelRegistrationError(f"unknown kernel op {op!r}; known ops: {', '.join(OPS)}")
        if not callable(fn):
            raise KernelRegistrationError(f"kernel {name!r} for {op!r} is not callable: {fn!r}")
        if not name:
            raise KernelRegistrationError(f"kernel for {op!r} needs a name")
        self._registry.add(Kernel(op, fn, name, backend, device, frozenset(dtypes or ()), priority))


# --------------------------------------------------------------------------
# References: always correct, registered by quantplug._builtin at priority 0
# --------------------------------------------------------------------------


def lora_add_reference(y, x, A, B, scale):
    return y + ((x.to(A.dtype) @ A.T) @ B.T * scale).to(y.dtype)


def lora_linear_reference(base, x, xa, A, B, scale):
    return lora_add_reference(base(x), xa, A, B, scale)


def fused_lora_linear_reference(module, x, xa, A, B, scale):
    return lora_add_reference(module(x), xa, A, B, scale)


def lora_mixed_add_reference(y, x, As, Bs, scales, rows):
    out = y
    for index, (A, B, scale) in enumerate(zip(As, Bs, scales)):
        mask = (rows == index).to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
        out = out + ((x.to(A.dtype) @ A.T) @ B.T * scale).to(y.dtype) * mask
    return out
