"""The adapter layer: a quantized base plus named LoRA adapters, its merge stack and its routing.

One class serves every backend: the base is whatever module the backend's
library built, called as is; the adapters are plain tensors in the
compute dtype, added through the kernel registry. A backend plugin returns
a subclass only when it must change how the base is called (a kernel with
a backward pass while training, say) by overriding :meth:`base_forward`.

Collaborators, not globals. A plugin builds the layer (``LoraLayer(base,
backend)`` in ``quantplug_wrap_layer``); the core then hands it what it
calls out to with :meth:`LoraLayer.connect`: the hook relay (dequantize,
group size) and the kernel registry. The layer never looks up the
process-wide registry, so a test can build one with explicit collaborators.

The merge stack is the layer's own: :meth:`LoraLayer.push_merge` puts a
merged base in place and keeps the replaced one, untouched;
:meth:`LoraLayer.pop_merge` puts it back, bit for bit. Neither calls a
plugin, so neither can fail half-way (``quantplug._merging`` plans and
measures first, then pushes or pops on every layer).

Routing (``qp.adapter_batch``) is per thread and per asyncio task:
:meth:`LoraLayer.forward` reads it from ``quantplug._routing``; nothing is
installed on the shared layers.

Thread safety: ``forward`` may run in several threads at once, each with its
own ``adapter_batch``; it reads the layer and never writes it. Everything
that changes the layer (adding or deleting adapters, ``set_adapter``,
``disabled``, merges, ``.to()``, an optimizer step) is not safe while
another thread runs the model: do it while no forward is in flight.
``docs/threads.md`` has the whole list.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from quantplug._builtin import NAME as DENSE_BACKEND
from quantplug._checks import (  # noqa: F401  (GroupSizeError, check_adapter_name: imported from here)
    BASE,
    GroupSizeError,
    check_adapter_name,
    check_dtype,
    check_qalora_group,
    checked_weight,
)
from quantplug._config import LoraConfig
from quantplug._lean import lean_applies, lean_key, lean_lora
from quantplug._routing import routed_rows

NOT_CONNECTED = (
    "this LoraLayer has no hook relay or kernels: qp.attach connects the layers it wraps; a layer "
    "built by hand needs layer.connect(relay=..., kernels=...) first"
)


def qalora_pool(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` averaged over each group of ``group`` columns, times the number of groups (PEFT's QALoRA input)."""
    pooled = x.unflatten(-1, (-1, group)).mean(dim=-1)
    return pooled * pooled.shape[-1]


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float, group: int | None) -> torch.Tensor:
    """``scale * B @ A`` in float32, with a QALoRA ``A`` expanded back to ``(r, in_features)``."""
    A, B = A.float(), B.float()
    if group is not None:  # each pooled column repeated over its group (see qalora_pool)
        A = A.repeat_interleave(group, dim=1) * (A.shape[1] / group)
    return (B @ A) * scale


def squared_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """``‖W‖²`` per output row, float32: what DoRA's forward needs of a base (see ``_dora_norm``)."""
    return weight.float().square().sum(dim=1)


# --------------------------------------------------------------------------
# The layer's collaborators and what it builds off-model
# --------------------------------------------------------------------------


class Wiring:
    """What a layer calls out to: the hook relay and the kernel registry.

    Shared, never copied: a deep copy of a model keeps its layers connected to
    the same registry, and an unpickled one is connected to this process's.
    """

    __slots__ = ("kernels", "relay")

    def __init__(self, relay: Any, kernels: Any) -> None:
        self.relay, self.kernels = relay, kernels

    def __deepcopy__(self, memo: dict) -> Wiring:
        return self

    def __reduce__(self):
        return importlib.import_module("quantplug._model").default_wiring, ()


@dataclass
class NewAdapter:
    """An adapter built by :meth:`LoraLayer.build_adapter`, not yet part of the layer."""

    name: str
    config: LoraConfig
    A: torch.Tensor
    B: torch.Tensor
    magnitude: torch.Tensor | None = None
    group: int | None = None
    weight_sq: torch.Tensor | None = None  # DoRA: ‖W‖² per row of the base it was built on

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take saved values (``lora_A``, ``lora_B``, ``lora_magnitude``), each in this adapter's dtype."""
        for attr, key in (("A", "lora_A"), ("B", "lora_B"), ("magnitude", "lora_magnitude")):
            current = getattr(self, attr)
            if key in tensors and current is not None:
                value = tensors[key].to(current.device, current.dtype)
                if value.shape != current.shape:
                    raise ValueError(
                        f"{key} has shape {tuple(value.shape)}, the layer needs {tuple(current.shape)}"
                    )
                setattr(self, attr, value.clone())


class _Merged(NamedTuple):
    adapter: str
    base: nn.Module  # the module the merge replaced, untouched
    backend: str
    weight_sq: torch.Tensor | None  # ‖W‖² per row of that module, restored with it


class LoraLayer(nn.Module):
    """A quantized layer with LoRA adapters.

    :param base: the backend's quantized layer, left as it is.
    :param backend: the backend name that claimed ``base``.
    :param in_features, out_features: defaults to the base's attributes.
    """

    def __init__(
        self, base: nn.Module, backend: str, in_features: int | None = None, out_features: int | None = None
    ):
        super().__init__()
        self.base = base
        self.backend = backend
        self.in_features = int(in_features if in_features is not None else base.in_features)
        self.out_features = int(out_features if out_features is not None else base.out_features)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.configs: dict[str, LoraConfig] = {}
        self.scaling: dict[str, float] = {}
        self.qalora_group_size: dict[str, int] = {}  # QALoRA adapters: name -> pooling group (PEFT's name)
        self.active_adapters: list[str] = []
        self.disabled = False
        self._merges: list[_Merged] = []  # newest last
        self._compute: tuple[str, ...] = ()
        self._dense_merged = False
        self._wiring: Wiring | None = None
        self._mixed_refusal: str | None = None
        self.register_buffer("_weight_sq", None, persistent=False)  # ‖W‖² per row, for DoRA
        self._lean_key = lean_key(self)  # this layer in the lean training op's table (quantplug._lean)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lean_key = lean_key(self)  # a copy (copy.deepcopy) must not train through the original's key

    # -- collaborators ----------------------------------------------------------

    def connect(self, *, relay: Any, kernels: Any, info: Any = None) -> LoraLayer:
        """Hand the layer its collaborators; returns the layer. The core calls it right after wrapping.

        :param relay: the hooks, called as ``relay.quantplug_dequantize(module=..., backend=...)``
            (and ``quantplug_group_size``), e.g. ``quantplug._registry.hook()``.
        :param kernels: a kernel registry with ``resolve(op, backend, device, dtype)``.
        :param info: the backend's ``BackendInfo``, for the capabilities the layer checks
            (``mixed_batch``); ``None`` allows everything.
        """
        self._wiring = Wiring(relay, kernels)
        if info is not None and not info.mixed_batch:
            self._mixed_refusal = info.limits.get("mixed_batch", "the backend does not declare it")
        return self

    @property
    def relay(self) -> Any:
        if self._wiring is None:
            raise RuntimeError(NOT_CONNECTED)
        return self._wiring.relay

    @property
    def kernels(self) -> Any:
        if self._wiring is None:
            raise RuntimeError(NOT_CONNECTED)
        return self._wiring.kernels

    _kernels = kernels  # the name before connect() existed (tests and the bench read it)

    # -- adapters -------------------------------------------------------------

    def build_adapter(self, name: str, config: LoraConfig, dtype: torch.dtype) -> NewAdapter:
        """Adapter ``name`` built off the layer (initialised as ``config.init`` says); the layer is unchanged.

        A DoRA adapter dequantizes the base here, once: its magnitudes start at the
        direction's row norms.
        """
        check_adapter_name(name)
        check_dtype(dtype, "the adapter dtype (LoraConfig.dtype)")
        if name in self.lora_A:
            raise ValueError(f"layer already has an adapter named {name!r}; pick another name or unload it")
        device = self.device
        group = self._qalora_group(config) if config.use_qalora else None
        A = torch.empty(config.r, self.in_features // (group or 1), device=device, dtype=torch.float32)
        B = torch.zeros(self.out_features, config.r, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if config.init == "random":
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        new = NewAdapter(name, config, A.to(dtype), B.to(dtype), group=group)
        if config.use_dora:
            with torch.no_grad():
                weight = self.dequantized_weight().float()
                direction = weight + lora_delta(new.A, new.B, config.scale, group)
                new.magnitude = torch.linalg.vector_norm(direction, dim=1).to(dtype)
                new.weight_sq = squared_row_norms(weight)
        return new

    def install_adapter(self, new: NewAdapter) -> None:
        """Make a built adapter part of the layer and active beside the active ones; calls no plugin."""
        if new.name in self.lora_A:
            raise ValueError(f"layer already has an adapter named {new.name!r}")
        self.lora_A[new.name] = nn.Parameter(new.A)
        self.lora_B[new.name] = nn.Parameter(new.B)
        config = new.config
        self.lora_dropout[new.name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.configs[new.name] = config
        self.scaling[new.name] = config.scale
        if new.group is not None:
            self.qalora_group_size[new.name] = new.group
        if new.magnitude is not None:
            self.lora_magnitude[new.name] = nn.Parameter(new.magnitude)
            self._set_weight_sq(new.weight_sq)
        self.set_adapter([*self.active_adapters, new.name])

    def add_adapter(self, name: str, config: LoraConfig, dtype: torch.dtype) -> None:
        """Create adapter ``name`` and make it active (:meth:`build_adapter`, then :meth:`install_adapter`)."""
        self.install_adapter(self.build_adapter(name, config, dtype))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; call qp.unmerge first")
        for store in (self.lora_A, self.lora_B, self.lora_magnitude, self.lora_dropout):
            if name in store:
                del store[name]
        self.configs.pop(name, None)
        self.qalora_group_size.pop(name, None)
        self.scaling.pop(name, None)
        self.set_adapter([a for a in self.active_adapters if a != name])

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def set_adapter(self, names: str | Sequence[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; this layer has {self.adapters}")
        self.active_adapters = names
        self._refresh()

    def _qalora_group(self, config: LoraConfig) -> int:
        group = config.qalora_group_size
        if group is None:
            group = self.relay.quantplug_group_size(module=self.base, backend=self.backend)
        return check_qalora_group(group, self.in_features, self.backend, self.base)

    # -- the merge stack --------------------------------------------------------

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        """The adapters merged into the base, oldest first."""
        return tuple(entry.adapter for entry in self._merges)

    merges = merged_adapters  # read-only; the name older code and tests use

    def push_merge(
        self, adapter: str, base: nn.Module, backend: str, *, norms: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Put ``base`` (``adapter`` merged into the current base, a ``backend`` layer) in place.

        The current base is kept untouched for :meth:`pop_merge`. ``norms`` is
        ``(squared_row_norms(current weight), squared_row_norms(new weight))``:
        DoRA's forward needs them, and passing them keeps push and pop free of
        plugin calls (they cannot fail half-way through a model).
        """
        if adapter not in self.lora_A:
            raise KeyError(f"unknown adapter {adapter!r}; this layer has {self.adapters}")
        if adapter in self.merged_adapters:
            raise ValueError(f"adapter {adapter!r} is already merged into this layer")
        replaced_sq, merged_sq = norms
        self._merges.append(_Merged(adapter, self.base, self.backend, replaced_sq))
        self.base, self.backend = base, backend
        self._set_weight_sq(merged_sq)
        self._refresh()

    def pop_merge(self) -> str:
        """Undo the newest merge, putting the base it replaced back bit for bit; returns that adapter's name."""
        if not self._merges:
            raise ValueError("no adapter is merged into this layer")
        entry = self._merges.pop()
        self.base, self.backend = entry.base, entry.backend
        self._set_weight_sq(entry.weight_sq)
        self._refresh()
        return entry.adapter

    def _refresh(self) -> None:
        """Recompute what forward reads; called whenever adapters, activity or the base change."""
        merged = set(self.merged_adapters)
        self._compute = tuple(n for n in self.active_adapters if n not in merged)
        # a plain nn.Linear is not enough: compressed-tensors layers are nn.Linear too
        self._dense_merged = bool(self._merges) and self.backend == DENSE_BACKEND

    def _set_weight_sq(self, weight_sq: torch.Tensor | None) -> None:
        # a buffer (moves with .to()), kept only while a DoRA adapter reads it
        self._weight_sq = weight_sq if len(self.lora_magnitude) else None

    @property
    def device(self) -> torch.device:
        for tensor in (*self.base.parameters(), *self.base.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def weight(self):
        """The base's weight, for code that reads ``layer.weight`` (its dtype, device); ``None`` if it has none."""
        return getattr(self.base, "weight", None)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() also move the bases kept for unmerge, which are not submodules
        super()._apply(fn, recurse)
        for index, entry in enumerate(self._merges):
            entry.base._apply(fn, recurse)
            if entry.weight_sq is not None:
                self._merges[index] = entry._replace(weight_sq=fn(entry.weight_sq))
        return self

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    # -- forward -------------------------------------------------------------

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Call the quantized base; subclasses pick another kernel here (for training, say)."""
        return self.base(x)

    def base_call(self, x: torch.Tensor) -> torch.Tensor:
        """The base's output without any adapter: a plugin's ``fused_lora_linear`` kernel with ``A=None``
        where one serves the call, else :meth:`base_forward`; after a dense merge, the dense layer."""
        if self._dense_merged:
            # a dense merge left a plain nn.Linear in the compute dtype; the model's activations
            # may be in another (fp32 around a bf16-compute bnb layer), as the quantized base accepted
            weight = self.base.weight
            return self.base(x.to(weight.dtype)).to(x.dtype)
        fused = self._fused_kernel(x)
        if fused is not None:
            y = fused.fn(self.base, x, None, None, None, 0.0)
            if y is not None:  # None: not this call's shape
                return y
        return self.base_forward(x)

    def _fused_kernel(self, x: torch.Tensor):
        """The plugin's ``fused_lora_linear`` kernel for ``x``, or ``None`` where only the reference serves."""
        if self._dense_merged:
            return None
        fused = self.kernels.find("fused_lora_linear", self.backend, x.device.type, x.dtype)
        return fused if fused is not None and fused.priority > 0 else None

    def forward(self, x: torch.Tensor, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        if adapter_names is None:
            adapter_names = routed_rows(self)
        if self.disabled or adapter_names is not None:
            y = self.base_call(x)
            return y if self.disabled else self._mixed_forward(y, x, adapter_names)
        kernels = self.kernels
        y = None
        for name in self._compute:
            if name in self.lora_magnitude:
                y = self.base_call(x) if y is None else y
                y = y + self._dora_delta(y, x, name)
                continue
            args = (
                self._adapter_input(name, self.lora_dropout[name](x)),
                self.lora_A[name],
                self.lora_B[name],
                self.scaling[name],
            )
            if y is None:  # the first adapter goes with the base call: a kernel may run them side by side
                xa, A, B, scale = args
                if lean_applies(self, x, A, B):  # training: one autograd node, no dense weight kept
                    y = lean_lora(x, xa, A, B, scale, self)
                else:
                    y = self.base_with_adapter(x, *args)
                continue
            y = kernels.resolve("lora_add", self.backend, x.device.type, x.dtype).fn(y, *args)
        return self.base_call(x) if y is None else y

    def base_with_adapter(
        self, x: torch.Tensor, xa: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``base(x) + scale * (xa @ A.T) @ B.T`` through the fastest registered kernel for this layer.

        A ``fused_lora_linear`` kernel reads the base's own storage; else a
        ``lora_linear`` kernel runs the adapter beside the base; else the base,
        then ``lora_add``. The lean training node calls it for its forward too.
        """
        kernels = self.kernels
        fused = self._fused_kernel(x)
        if fused is not None:
            y = fused.fn(self.base, x, xa, A, B, scale)
            if y is not None:  # None: not this call's shape; the next kernel serves it
                return y
        linear = kernels.resolve("lora_linear", self.backend, x.device.type, x.dtype)
        if linear.priority > 0:
            return linear.fn(self.base_call, x, xa, A, B, scale)
        return kernels.resolve("lora_add", self.backend, x.device.type, x.dtype).fn(
            self.base_call(x), xa, A, B, scale
        )

    def _mixed_forward(self, y: torch.Tensor, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names wants one adapter name per row, got the string {adapter_names!r}")
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows"
            )
        if self._merges:
            raise ValueError("adapter_names batches need unmerged adapters: call qp.unmerge first")
        if self._mixed_refusal is not None:
            raise ValueError(
                f"backend {self.backend!r} does not support adapter_names batches: {self._mixed_refusal}"
            )
        names = sorted(set(adapter_names) - {BASE})
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise KeyError(f"adapter_names has unknown adapter(s) {unknown}; this layer has {self.adapters}")
        index = {name: i for i, name in enumerate(names)}
        rows = torch.tensor([index.get(n, -1) for n in adapter_names], device=x.device)
        plain = [n for n in names if n not in self.lora_magnitude]
        y_plain = y
        # one kernel call per input the adapters read: x for LoRA, x pooled over g columns for QALoRA
        for group in sorted({self.qalora_group_size.get(n, 0) for n in plain}):
            same = [n for n in plain if self.qalora_group_size.get(n, 0) == group]
            kernel = self.kernels.resolve("lora_mixed_add", self.backend, x.device.type, x.dtype)
            plain_rows = torch.tensor(
                [same.index(n) if n in same else -1 for n in adapter_names], device=x.device
            )
            y_plain = kernel.fn(
                y_plain,
                qalora_pool(x, group) if group else x,
                [self.lora_A[n] for n in same],
                [self.lora_B[n] for n in same],
                [self.scaling[n] for n in same],
                plain_rows,
            )
        for name in names:
            if name in self.lora_magnitude:
                mask = (rows == index[name]).to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
                y_plain = y_plain + self._dora_delta(y, x, name) * mask
        return y_plain

    def _adapter_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` multiplies by ``A``: ``x``, or for QALoRA ``x`` pooled over its groups."""
        group = self.qalora_group_size.get(name)
        return x if group is None else qalora_pool(x, group)

    # -- DoRA ----------------------------------------------------------------

    def _dora_norm(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``‖W + s B A‖`` per row without materialising ``W``.

        ``‖W + sBA‖² = ‖W‖² + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B AAᵀ) ⊙ B)``, with
        ``W Aᵀ`` read off the base's own forward on the ``r`` rows of ``A``. So
        DoRA costs ``r`` extra rows through the quantized kernel instead of a full
        dequantization on every call (which is what PEFT does).
        """
        A, B, scale = self.lora_A[name].float(), self.lora_B[name].float(), self.scaling[name]
        projected = self.base_call(self.lora_A[name].to(dtype)).float()  # (r, out) = A Wᵀ + bias
        bias = self.bias
        if bias is not None:
            projected = projected - bias.float()
        cross = (B * projected.T).sum(dim=1)
        lora_sq = ((B @ (A @ A.T)) * B).sum(dim=1)
        return (self._weight_sq + 2 * scale * cross + scale * scale * lora_sq).clamp_min(0).sqrt()

    def _dora_delta(self, y: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        with torch.no_grad():  # the norm is a constant for the gradient, as in the DoRA paper (sec. 4.3)
            norm = self._dora_norm(name, x.dtype)
        factor = (self.lora_magnitude[name].float() / norm).to(y.dtype)
        bias = self.bias
        base = y - bias.to(y.dtype) if bias is not None else y
        lora = ((self.lora_dropout[name](x).to(A.dtype) @ A.T) @ B.T).to(y.dtype) * scale
        return (factor - 1) * base + factor * lora

    # -- weights -------------------------------------------------------------

    def dequantized_weight(self, *, finite: bool = True) -> torch.Tensor:
        """The base's dense weight, through the backend's ``quantplug_dequantize``, checked.

        ``finite=False`` leaves out the check for NaN and inf, which waits for
        the device (the training backward, once per layer and step).

        :raises PluginError: the plugin returned no tensor, or one that is not a
            (finite) floating tensor of shape ``(out_features, in_features)``.
        """
        weight = self.relay.quantplug_dequantize(module=self.base, backend=self.backend)
        return checked_weight(weight, (self.out_features, self.in_features), self.backend, finite=finite)

    def delta_weight(
        self, name: str, magnitude: bool = True, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The adapter's update to the dense weight, in float32.

        LoRA: ``scale * B @ A``. DoRA (with ``magnitude``): ``m / ||W + s B A|| * (W + s B A) - W``
        with ``W`` = ``base`` (dequantized if not given). QALoRA: ``A`` expanded back to
        ``(r, in_features)``, each pooled column repeated over its group (see :func:`qalora_pool`).
        """
        delta = lora_delta(
            self.lora_A[name], self.lora_B[name], self.scaling[name], self.qalora_group_size.get(name)
        )
        if magnitude and name in self.lora_magnitude:
            weight = (base if base is not None else self.dequantized_weight()).float()
            direction = weight + delta
            norm = torch.linalg.vector_norm(direction, dim=1, keepdim=True)
            delta = self.lora_magnitude[name].float().unsqueeze(1) / norm * direction - weight
        return delta

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend!r}, in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters={self.adapters}, active={self.active_adapters}, merged={list(self.merged_adapters)}"
        )
