"""The adapter layer: a quantized base plus named LoRA adapters.

One class serves every backend: the base is whatever module the backend's
library built, called as is; the adapters are plain tensors in the
compute dtype, added through the kernel registry. A backend plugin returns
a subclass only when it must change how the base is called (a kernel with
a backward pass while training, say) by overriding :meth:`base_forward`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from quantplug._config import LoraConfig

BASE = "__base__"  # adapter_names entry for rows that get no adapter (PEFT's name too)


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ValueError(
            f"adapter name {name!r} is not allowed: use a non-empty name without '.', not {BASE!r}"
        )


class GroupSizeError(ValueError):
    """A QALoRA adapter's pooling group does not fit a layer."""


def qalora_group_size(base: nn.Module, backend: str, in_features: int, config: LoraConfig) -> int:
    """The pooling group a QALoRA ``config`` gets on a layer: its own, else the layer's quantization group."""
    group = config.qalora_group_size
    if group is None:
        from quantplug._registry import hook

        group = hook().quantplug_group_size(module=base, backend=backend)
        if group is None:
            raise GroupSizeError(
                f"use_qalora=True with qalora_group_size=None pools over the layer's quantization groups, and "
                f"backend {backend!r} reports none for this {type(base).__name__} (per-channel, not group-wise, "
                "or groups over permuted columns); pass qalora_group_size=<g>, or leave the layer out of "
                "target_modules"
            )
    if in_features % group:
        raise GroupSizeError(f"in_features={in_features} is not a multiple of qalora_group_size={group}")
    return int(group)


def qalora_pool(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` averaged over each group of ``group`` columns, times the number of groups (PEFT's QALoRA input)."""
    pooled = x.unflatten(-1, (-1, group)).mean(dim=-1)
    return pooled * pooled.shape[-1]


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
        from quantplug._registry import load_plugins

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
        # (adapter, module it replaced, that module's backend) per merge, newest last: unmerge pops these
        self.merges: list[tuple[str, nn.Module, str]] = []
        self._compute: tuple[str, ...] = ()
        self._dense_merged = False
        self._kernels = load_plugins().kernels

    # -- adapters -------------------------------------------------------------

    def add_adapter(self, name: str, config: LoraConfig, dtype: torch.dtype) -> None:
        """Create adapter ``name`` (initialised as ``config.init`` says) and make it active."""
        check_adapter_name(name)
        if name in self.lora_A:
            raise ValueError(f"layer already has an adapter named {name!r}; pick another name or unload it")
        device = self.device
        group = (
            qalora_group_size(self.base, self.backend, self.in_features, config)
            if config.use_qalora
            else None
        )
        A = torch.empty(config.r, self.in_features // (group or 1), device=device, dtype=torch.float32)
        B = torch.zeros(self.out_features, config.r, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if config.init == "random":
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A.to(dtype))
        self.lora_B[name] = nn.Parameter(B.to(dtype))
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.configs[name] = config
        self.scaling[name] = config.scale
        if group is not None:
            self.qalora_group_size[name] = group
        if config.use_dora:
            with torch.no_grad():
                norm = self._direction_norm(name, self.dequantized_weight())
            self.lora_magnitude[name] = nn.Parameter(norm.to(dtype))
            self._refresh_weight_norm()
        self.set_adapter([*self.active_adapters, name])

    def delete_adapter(self, name: str) -> None:
        if any(merged == name for merged, *_ in self.merges):
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

    def _refresh(self) -> None:
        """Recompute what forward reads; called whenever adapters, activity or the base change."""
        merged = {name for name, *_ in self.merges}
        self._compute = tuple(n for n in self.active_adapters if n not in merged)
        self._dense_merged = bool(self.merges) and type(self.base) is nn.Linear

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
        for _, base, _ in self.merges:
            base._apply(fn, recurse)
        return self

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    # -- forward -------------------------------------------------------------

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Call the quantized base; subclasses pick another kernel here (for training, say)."""
        return self.base(x)

    def _call_base(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense_merged:
            # a dense merge left a plain nn.Linear in the compute dtype; the model's activations
            # may be in another (fp32 around a bf16-compute bnb layer), as the quantized base accepted
            weight = self.base.weight
            return self.base(x.to(weight.dtype)).to(x.dtype)
        return self.base_forward(x)

    def forward(self, x: torch.Tensor, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        if self.disabled or adapter_names is not None:
            y = self._call_base(x)
            return y if self.disabled else self._mixed_forward(y, x, adapter_names)
        y = None
        for name in self._compute:
            if name in self.lora_magnitude:
                y = self._call_base(x) if y is None else y
                y = y + self._dora_delta(y, x, name)
                continue
            args = (
                self._adapter_input(name, self.lora_dropout[name](x)),
                self.lora_A[name],
                self.lora_B[name],
                self.scaling[name],
            )
            if y is None:  # the first adapter goes with the base call: a kernel may run them side by side
                linear = self._kernels.resolve("lora_linear", self.backend, x.device.type, x.dtype)
                if linear.priority > 0:
                    y = linear.fn(self._call_base, x, *args)
                    continue
                y = self._call_base(x)
            y = self._kernels.resolve("lora_add", self.backend, x.device.type, x.dtype).fn(y, *args)
        return self._call_base(x) if y is None else y

    def _mixed_forward(self, y: torch.Tensor, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows"
            )
        if self.merges:
            raise ValueError("adapter_names batches need unmerged adapters: call qp.unmerge first")
        from quantplug._registry import load_plugins

        info = load_plugins().status(self.backend).info
        if info is not None and not info.mixed_batch:
            reason = info.limits.get("mixed_batch", "the backend does not declare it")
            raise ValueError(f"backend {self.backend!r} does not support adapter_names batches: {reason}")
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
            kernel = self._kernels.resolve("lora_mixed_add", self.backend, x.device.type, x.dtype)
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

    def _direction_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Row norms of ``W + scale * B @ A``, the direction DoRA rescales."""
        direction = weight.float() + self.delta_weight(name, magnitude=False)
        return torch.linalg.vector_norm(direction, dim=1)

    def _refresh_weight_norm(self) -> None:
        """Cache ``‖W‖²`` per row of the current base, which DoRA's forward needs."""
        if len(self.lora_magnitude) == 0:
            return
        with torch.no_grad():
            squared = self.dequantized_weight().float().square().sum(dim=1)
        self.register_buffer("_weight_sq", squared, persistent=False)

    def _dora_norm(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``‖W + s B A‖`` per row without materialising ``W``.

        ``‖W + sBA‖² = ‖W‖² + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B AAᵀ) ⊙ B)``, with
        ``W Aᵀ`` read off the base's own forward on the ``r`` rows of ``A``. So
        DoRA costs ``r`` extra rows through the quantized kernel instead of a full
        dequantization on every call (which is what PEFT does).
        """
        A, B, scale = self.lora_A[name].float(), self.lora_B[name].float(), self.scaling[name]
        projected = self._call_base(self.lora_A[name].to(dtype)).float()  # (r, out) = A Wᵀ + bias
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

    def dequantized_weight(self) -> torch.Tensor:
        """The base's dense weight, through the backend's ``quantplug_dequantize``."""
        from quantplug._registry import hook

        weight = hook().quantplug_dequantize(module=self.base, backend=self.backend)
        if weight is None:
            raise NotImplementedError(
                f"backend {self.backend!r} returned no weight from quantplug_dequantize"
            )
        return weight

    def delta_weight(
        self, name: str, magnitude: bool = True, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The adapter's update to the dense weight, in float32.

        LoRA: ``scale * B @ A``. DoRA (with ``magnitude``): ``m / ||W + s B A|| * (W + s B A) - W``
        with ``W`` = ``base`` (dequantized if not given). QALoRA: ``A`` expanded back to
        ``(r, in_features)``, each pooled column repeated over its group (see :func:`qalora_pool`).
        """
        A, B = self.lora_A[name].float(), self.lora_B[name].float()
        group = self.qalora_group_size.get(name)
        if group is not None:
            A = A.repeat_interleave(group, dim=1) * (A.shape[1] / group)
        delta = (B @ A) * self.scaling[name]
        if magnitude and name in self.lora_magnitude:
            weight = (base if base is not None else self.dequantized_weight()).float()
            direction = weight + delta
            norm = torch.linalg.vector_norm(direction, dim=1, keepdim=True)
            delta = self.lora_magnitude[name].float().unsqueeze(1) / norm * direction - weight
        return delta

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend!r}, in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters={self.adapters}, active={self.active_adapters}, merged={[n for n, *_ in self.merges]}"
        )
