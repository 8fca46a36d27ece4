"""Merge, unmerge and unload: one algorithm for every backend.

Merge is always: dequantize the base (plugin), add the adapter's update,
check the result is finite, requantize (plugin; mode ``"requantize"``),
fold a QALoRA adapter's per-group constant into the zero points (plugin;
mode ``"zeros"``) or build a dense ``nn.Linear`` (mode ``"dense"``),
dequantize the result again and measure what survived. The replaced module
is kept, untouched, so ``unmerge`` puts the original storage back bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from quantplug._builtin import NAME as DENSE_BACKEND
from quantplug._builtin import dense_linear
from quantplug._lora import LoraLayer
from quantplug._model import lora_layers
from quantplug._registry import hook, load_plugins

MODES = ("requantize", "dense", "zeros")
DROPPED_MOST = 0.5  # warn when the merge error exceeds half of the adapter's own size


class MergeError(RuntimeError):
    """A merge that cannot be done; the model is left unchanged."""


@dataclass
class LayerMerge:
    """What one layer's merge kept.

    ``error``: ``‖W_merged - (W + ΔW)‖ / ‖W + ΔW‖``, the error against the ideal merged weight.
    ``adapter_error``: the same difference over ``‖ΔW‖``: 0 means the whole adapter
    survived, 1 means as much error as the adapter itself (most of it lost).
    """

    name: str
    backend: str
    error: float
    adapter_error: float
    delta_norm: float


@dataclass
class MergeReport:
    adapter: str
    mode: str
    layers: list[LayerMerge] = field(default_factory=list)

    @property
    def worst(self) -> LayerMerge | None:
        return max(self.layers, key=lambda layer: layer.adapter_error, default=None)

    @property
    def mean_error(self) -> float:
        return sum(layer.error for layer in self.layers) / max(len(self.layers), 1)

    @property
    def mean_adapter_error(self) -> float:
        return sum(layer.adapter_error for layer in self.layers) / max(len(self.layers), 1)

    @property
    def dropped(self) -> list[LayerMerge]:
        """Layers whose merge lost most of the adapter."""
        return [layer for layer in self.layers if layer.adapter_error > DROPPED_MOST]

    def as_dict(self) -> dict:
        worst = self.worst
        return {
            "adapter": self.adapter,
            "mode": self.mode,
            "mean_error": self.mean_error,
            "mean_adapter_error": self.mean_adapter_error,
            "worst_layer": worst.name if worst else None,
            "worst_adapter_error": worst.adapter_error if worst else None,
            "layers": [vars(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        worst = self.worst
        lines = [
            f"merged adapter {self.adapter!r} into {len(self.layers)} layers (mode {self.mode!r})",
            f"  error vs ideal W+ΔW: mean {self.mean_error:.2e}; error / ‖ΔW‖: mean {self.mean_adapter_error:.3f}",
        ]
        if worst is not None:
            lines.append(
                f"  worst layer: {worst.name} ({worst.backend}): error / ‖ΔW‖ = {worst.adapter_error:.3f}"
            )
        if self.dropped:
            lines.append(
                f"  WARNING: {len(self.dropped)} layer(s) lost most of the adapter; mode='dense' keeps all of it"
            )
        return "\n".join(lines)


def _check_mode(layer_path: str, layer: LoraLayer, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown merge mode {mode!r}; choose one of {MODES}")
    try:  # every mode dequantizes through the layer's plugin
        info = load_plugins().status(layer.backend).info
    except KeyError as exc:
        raise MergeError(
            f"layer {layer_path!r} is a {layer.backend!r} layer, but no installed plugin declares that "
            f"backend ({exc.args[0]}); install or re-register its plugin"
        ) from None
    if mode == "dense":
        return
    if info is not None and mode not in info.merge_modes:
        reason = info.limits.get(mode, "the backend does not declare it")
        raise MergeError(
            f"layer {layer_path!r} ({layer.backend}) cannot merge with mode={mode!r}: {reason}. "
            "mode='dense' works for every backend."
        )


def _relative(diff: torch.Tensor, ref: torch.Tensor) -> float:
    ref_norm = torch.linalg.vector_norm(ref).item()
    return torch.linalg.vector_norm(diff).item() / ref_norm if ref_norm > 0 else 0.0


def merge(
    model: nn.Module,
    adapter: str = "default",
    mode: str = "requantize",
    *,
    progress: bool | None = None,
    unload: bool = False,
    dense_dtype: torch.dtype | None = None,
) -> MergeReport:
    """Fold ``adapter`` into the base weights of every layer that has it.

    :param mode: ``"requantize"`` keeps each backend's format with the
        layer's own parameters (lossy by the format's rounding);
        ``"zeros"`` (QALoRA adapters, on backends that declare it) keeps the
        quantized codes bit for bit and moves each group's zero point by the
        adapter's update, which is constant within the group (exact where
        zero points are floating point, rounded to the group's scale where
        they are integers); ``"dense"`` replaces the base by a dense
        ``nn.Linear`` in the compute dtype (lossless).
    :param progress: show a progress bar (default: when more than 8 layers).
    :param unload: also replace each adapter layer by its merged base,
        leaving no adapter layers (not reversible).
    :param dense_dtype: dtype of the dense weight for ``mode="dense"``
        (default: the compute dtype; with ``unload``, the dtype of the model's
        other floating parameters, which its activations are in). Rounding ``W + ΔW`` to bf16 can itself
        lose a small adapter; ``torch.float32`` keeps all of it (feed the
        model float32 inputs then).
    :returns: a :class:`MergeReport` with per-layer errors; warns when a
        merge lost most of an adapter.
    :raises MergeError: naming the layer, when a backend cannot merge in
        this mode or the merged weight is not finite. The model is unchanged.
    """
    layers = lora_layers(model, adapter)
    if not layers:
        known = sorted({n for layer in lora_layers(model).values() for n in layer.adapters})
        raise ValueError(f"no layer has adapter {adapter!r}; the model has {known}")
    for path, layer in layers.items():
        _check_mode(path, layer, mode)
        if any(name == adapter for name, *_ in layer.merges):
            raise MergeError(f"adapter {adapter!r} is already merged into {path!r}")
    if mode == "dense" and unload and dense_dtype is None:
        dense_dtype = _activation_dtype(model)
    pm = hook()
    report = MergeReport(adapter, mode)
    staged: list[tuple[LoraLayer, nn.Module, str]] = []
    show = progress if progress is not None else len(layers) > 8
    for path, layer in tqdm(layers.items(), desc=f"merge {adapter} ({mode})", disable=not show, unit="layer"):
        with torch.no_grad():
            weight = layer.dequantized_weight()
            delta = layer.delta_weight(adapter, base=weight)
            ideal = weight.float() + delta
            if not torch.isfinite(ideal).all():
                raise MergeError(
                    f"merging {adapter!r} into {path!r} gives non-finite weights; the adapter has NaN/inf"
                )
            target = ideal.to(weight.dtype)
            if mode == "dense":
                new, backend = dense_linear(ideal.to(dense_dtype or weight.dtype), layer.bias), DENSE_BACKEND
                got = new.weight
            elif mode == "zeros":
                new, backend = _fold_into_zeros(path, layer, adapter, pm), layer.backend
                got = pm.quantplug_dequantize(module=new, backend=backend)
            else:
                new = pm.quantplug_requantize(module=layer.base, weight=target, backend=layer.backend)
                if new is None:
                    raise MergeError(
                        f"backend {layer.backend!r} returned nothing from quantplug_requantize for {path!r}"
                    )
                backend = layer.backend
                got = pm.quantplug_dequantize(module=new, backend=backend)
            diff = got.float() - ideal
            report.layers.append(
                LayerMerge(
                    path,
                    layer.backend,
                    _relative(diff, ideal),
                    _relative(diff, delta),
                    torch.linalg.vector_norm(delta).item(),
                )
            )
        staged.append((layer, new, backend))
    for layer, new, backend in staged:
        layer.merges.append((adapter, layer.base, layer.backend))
        layer.base, layer.backend = new, backend
        layer._refresh()
        layer._refresh_weight_norm()
    if report.dropped:
        worst = report.worst
        warnings.warn(
            f"merge of adapter {adapter!r} (mode {mode!r}) lost most of the adapter in {len(report.dropped)} "
            f"of {len(report.layers)} layers (worst {worst.name}: error / ‖ΔW‖ = {worst.adapter_error:.2f}); "
            + (
                "integer zero points round each group's update to a multiple of its scale and clip it to their "
                "range. "
                if mode == "zeros"
                else "the format's rounding is coarser than the update. "
            )
            + "Use mode='dense' to keep it whole.",
            stacklevel=2,
        )
    if unload:
        _replace_layers(model, lambda layer: layer.base)
    return report


def zero_offsets(path: str, layer: LoraLayer, adapter: str, quant_group: int | None) -> torch.Tensor:
    """The QALoRA adapter's update per (output row, quantization group): ``(out, in / quant_group)``, float32.

    A QALoRA adapter adds ``scale * B @ A`` with ``A`` pooled over groups of
    ``g`` columns, so its dense update is constant over each such group;
    where ``g`` is a multiple of the layer's quantization group, it is
    constant within every quantization group too, and each group's constant
    can move that group's zero point. Raises :class:`MergeError` otherwise.
    """
    group = layer.qalora_group_size.get(adapter)
    if group is None:
        raise MergeError(
            f"mode='zeros' folds QALoRA adapters only; adapter {adapter!r} on {path!r} is a plain LoRA adapter, whose "
            "update varies within each quantization group. Train it with LoraConfig(use_qalora=True), or merge "
            "with mode='requantize' or 'dense'"
        )
    if quant_group is None:
        raise MergeError(
            f"layer {path!r} ({layer.backend}) reports no quantization group along its input "
            "(quantplug_group_size): mode='zeros' needs group-wise zero points. Use mode='requantize' or 'dense'"
        )
    if group % quant_group:
        raise MergeError(
            f"adapter {adapter!r} on {path!r} pools groups of {group} input columns and the layer quantizes groups "
            f"of {quant_group}: its update is constant within each quantization group only when {group} is a "
            f"multiple of {quant_group}. Train it with qalora_group_size=None (the layer's own), or merge with "
            "mode='requantize' or 'dense'"
        )
    A, B = layer.lora_A[adapter].float(), layer.lora_B[adapter].float()
    per_group = (B @ A) * (layer.scaling[adapter] * A.shape[1] / group)  # see LoraLayer.delta_weight
    return per_group.repeat_interleave(group // quant_group, dim=1)


def _fold_into_zeros(path: str, layer: LoraLayer, adapter: str, pm) -> nn.Module:
    quant_group = pm.quantplug_group_size(module=layer.base, backend=layer.backend)
    offsets = zero_offsets(path, layer, adapter, quant_group)
    if not torch.isfinite(offsets).all():
        raise MergeError(
            f"merging {adapter!r} into {path!r} gives non-finite zero points; the adapter has NaN/inf"
        )
    try:
        new = pm.quantplug_fold_into_zeros(module=layer.base, offsets=offsets, backend=layer.backend)
    except (ValueError, NotImplementedError, TypeError) as exc:
        raise MergeError(f"layer {path!r} ({layer.backend}) cannot merge with mode='zeros': {exc}") from exc
    if new is None:
        raise MergeError(
            f"backend {layer.backend!r} returned nothing from quantplug_fold_into_zeros for {path!r}"
        )
    return new


def _activation_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter outside adapter layers."""
    inside = {id(p) for layer in lora_layers(model).values() for p in layer.parameters()}
    for param in model.parameters():
        if id(param) not in inside and param.is_floating_point():
            return param.dtype
    return None


def unmerge(model: nn.Module, adapter: str | None = None) -> None:
    """Undo merges, newest first, restoring the original base modules bit for bit.

    :param adapter: undo merges back to and including this adapter's; all when ``None``.
    """
    for layer in lora_layers(model).values():
        names = [name for name, *_ in layer.merges]
        if adapter is not None and adapter not in names:
            continue
        while layer.merges:
            name, base, backend = layer.merges.pop()
            layer.base, layer.backend = base, backend
            if name == adapter:
                break
        layer._refresh()
        layer._refresh_weight_norm()


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter: unmerge, then put each original base back in place of its adapter layer."""
    unmerge(model)
    return _replace_layers(model, lambda layer: layer.base)


def _replace_layers(model: nn.Module, replacement) -> nn.Module:
    for path, layer in list(lora_layers(model).items()):
        model.set_submodule(path, replacement(layer))
    return model
