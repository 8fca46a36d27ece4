"""Merge, unmerge and unload: one algorithm for every backend, all or nothing.

:func:`merge` plans and validates every layer first (mode, backend, not
merged yet), then stages each layer: dequantize the base (plugin), add the
adapter's update, check the result is finite, run the mode's step (one
function each: requantize through the plugin, fold a QALoRA adapter into
the zero points through the plugin, or build a dense ``nn.Linear``),
dequantize the result again and measure what survived. Every plugin result
is checked at the boundary (a finite floating weight of the layer's shape,
a module with the layer's features). Only when every layer is staged does
it commit, through each layer's merge stack (``LoraLayer.push_merge``),
which calls no plugin. :func:`unmerge` checks what it was asked first, then
pops (``LoraLayer.pop_merge``): the replaced modules, kept untouched, come
back bit for bit. On any failure the model is as before.

Not thread-safe: merge, unmerge and unload change the model's layers; run
them while no other thread uses the model (``docs/threads.md``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from quantplug import _transformers
from quantplug._builtin import NAME as DENSE_BACKEND
from quantplug._builtin import dense_linear
from quantplug._checks import check_dtype, checked_module, checked_weight
from quantplug._errors import PluginError
from quantplug._lora import LoraLayer, squared_row_norms
from quantplug._model import lora_layers, naming
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


@dataclass
class _Staged:
    """One layer's merge, computed and measured, not yet in the model."""

    layer: LoraLayer
    base: nn.Module
    backend: str
    norms: tuple[torch.Tensor, torch.Tensor]  # squared row norms of the replaced and the merged weight
    measured: LayerMerge


@dataclass
class _Step:
    """What a mode's step gets: the layer, its dense weight and the ideal merged weight."""

    path: str
    layer: LoraLayer
    adapter: str
    weight: torch.Tensor  # dequantized base, in its own dtype
    ideal: torch.Tensor  # weight + delta, float32
    relay: object
    dense_dtype: torch.dtype | None


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
    :raises PluginError: naming the backend and layer, when a plugin fails or
        returns something unusable. The model is unchanged.
    """
    layers = _plan(model, adapter, mode, dense_dtype)
    if mode == "dense" and unload and dense_dtype is None:
        dense_dtype = _activation_dtype(model)
    relay = hook()
    # progress=True shows the bar anywhere; by default more than 8 layers show it on a terminal (tqdm's None)
    disable = not progress if progress is not None else (None if len(layers) > 8 else True)
    staged = [
        _stage(path, layer, adapter, mode, relay, dense_dtype)
        for path, layer in tqdm(
            layers.items(), desc=f"merge {adapter} ({mode})", disable=disable, unit="layer"
        )
    ]
    for step in staged:  # commit: nothing below calls a plugin
        step.layer.push_merge(adapter, step.base, step.backend, norms=step.norms)
    report = MergeReport(adapter, mode, [step.measured for step in staged])
    if report.dropped:
        _warn_dropped(report)
    if unload:
        _replace_layers(model, lambda layer: layer.base)
    return report


def _plan(model: nn.Module, adapter: str, mode: str, dense_dtype: object) -> dict[str, LoraLayer]:
    """The layers holding ``adapter``, each checked for ``mode``; raises before anything changes."""
    if not isinstance(adapter, str):
        raise TypeError(f"merge merges one adapter, by name (a str); got {adapter!r}")
    if mode not in MODES:
        raise ValueError(f"unknown merge mode {mode!r}; choose one of {MODES}")
    if dense_dtype is not None:
        check_dtype(dense_dtype, "merge's dense_dtype")
    layers = lora_layers(model, adapter)
    if not layers:
        known = sorted({n for layer in lora_layers(model).values() for n in layer.adapters})
        raise ValueError(f"no layer has adapter {adapter!r}; the model has {known}")
    for path, layer in layers.items():
        _check_mode(path, layer, mode)
        if adapter in layer.merged_adapters:
            raise MergeError(f"adapter {adapter!r} is already merged into {path!r}")
    return layers


def _stage(
    path: str, layer: LoraLayer, adapter: str, mode: str, relay, dense_dtype: torch.dtype | None
) -> _Staged:
    """One layer: dequantize, add the update, check it is finite, run the mode's step, measure."""
    with torch.no_grad(), naming(path):
        weight = layer.dequantized_weight()
        delta = layer.delta_weight(adapter, base=weight)
        ideal = weight.float() + delta
        if not torch.isfinite(ideal).all():
            raise MergeError(
                f"merging {adapter!r} into {path!r} gives non-finite weights; the adapter has NaN/inf"
            )
        step = _Step(path, layer, adapter, weight, ideal, relay, dense_dtype)
        new, backend, got = STEPS[mode](step)
        diff = got.float() - ideal
        measured = LayerMerge(
            path,
            layer.backend,
            _relative(diff, ideal),
            _relative(diff, delta),
            torch.linalg.vector_norm(delta).item(),
        )
        return _Staged(layer, new, backend, (squared_row_norms(weight), squared_row_norms(got)), measured)


def _requantize(step: _Step) -> tuple[nn.Module, str, torch.Tensor]:
    """The backend's own format, with the layer's own quantization parameters."""
    layer = step.layer
    target = step.ideal.to(step.weight.dtype)
    new = step.relay.quantplug_requantize(module=layer.base, weight=target, backend=layer.backend)
    if new is None:
        raise MergeError(
            f"backend {layer.backend!r} returned nothing from quantplug_requantize for {step.path!r}"
        )
    return new, layer.backend, _dequantize_new(step, new, "quantplug_requantize")


def _dense(step: _Step) -> tuple[nn.Module, str, torch.Tensor]:
    """A plain ``nn.Linear`` holding the ideal weight: lossless up to ``dense_dtype``."""
    new = dense_linear(step.ideal.to(step.dense_dtype or step.weight.dtype), step.layer.bias)
    return new, DENSE_BACKEND, new.weight


def _zeros(step: _Step) -> tuple[nn.Module, str, torch.Tensor]:
    """A QALoRA adapter folded into the zero points; the quantized codes stay as they are."""
    new = _fold_into_zeros(step.path, step.layer, step.adapter, step.relay)
    return new, step.layer.backend, _dequantize_new(step, new, "quantplug_fold_into_zeros")


STEPS = {"requantize": _requantize, "dense": _dense, "zeros": _zeros}


def _dequantize_new(step: _Step, new: object, made_by: str) -> torch.Tensor:
    """The dense weight of a module a plugin built, after checking it is a module with the layer's features."""
    layer = step.layer
    checked_module(new, layer, layer.backend, made_by)
    weight = step.relay.quantplug_dequantize(module=new, backend=layer.backend)
    return checked_weight(weight, (layer.out_features, layer.in_features), layer.backend)


def _warn_dropped(report: MergeReport) -> None:
    worst = report.worst
    warnings.warn(
        f"merge of adapter {report.adapter!r} (mode {report.mode!r}) lost most of the adapter in "
        f"{len(report.dropped)} of {len(report.layers)} layers (worst {worst.name}: error / ‖ΔW‖ = "
        f"{worst.adapter_error:.2f}); "
        + (
            "integer zero points round each group's update to a multiple of its scale and clip it to their "
            "range. "
            if report.mode == "zeros"
            else "the format's rounding is coarser than the update. "
        )
        + "Use mode='dense' to keep it whole.",
        stacklevel=3,
    )


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


def _fold_into_zeros(path: str, layer: LoraLayer, adapter: str, relay) -> nn.Module:
    quant_group = relay.quantplug_group_size(module=layer.base, backend=layer.backend)
    if quant_group is not None and (
        isinstance(quant_group, bool) or not isinstance(quant_group, int) or quant_group <= 0
    ):
        raise PluginError(
            f"quantplug_group_size returned {quant_group!r}, not a positive int or None",
            hook="quantplug_group_size",
            backend=layer.backend,
        )
    offsets = zero_offsets(path, layer, adapter, quant_group)
    if not torch.isfinite(offsets).all():
        raise MergeError(
            f"merging {adapter!r} into {path!r} gives non-finite zero points; the adapter has NaN/inf"
        )
    refusals = (ValueError, NotImplementedError, TypeError)  # the backend cannot fold these offsets
    try:
        new = relay.quantplug_fold_into_zeros(module=layer.base, offsets=offsets, backend=layer.backend)
    except (*refusals, PluginError) as exc:
        reason = exc.__cause__ if isinstance(exc, PluginError) else exc
        if not isinstance(reason, refusals):
            raise
        raise MergeError(
            f"layer {path!r} ({layer.backend}) cannot merge with mode='zeros': {reason}"
        ) from exc
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
    :raises ValueError: ``adapter`` is merged into no layer (the model is unchanged).
    """
    layers = lora_layers(model)
    if adapter is not None:
        if not isinstance(adapter, str):
            raise TypeError(f"unmerge's adapter must be an adapter name or None, got {adapter!r}")
        merged = sorted({name for layer in layers.values() for name in layer.merged_adapters})
        if adapter not in merged:
            raise ValueError(
                f"adapter {adapter!r} is not merged into any layer; merged adapters: {merged or 'none'}"
            )
    for layer in layers.values():  # pop_merge calls no plugin: nothing below can fail half-way
        if adapter is not None and adapter not in layer.merged_adapters:
            continue
        while layer.merged_adapters:
            if layer.pop_merge() == adapter:
                break


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter: unmerge, then put each original base back in place of its adapter layer."""
    unmerge(model)
    return _replace_layers(model, lambda layer: layer.base)


def _replace_layers(model: nn.Module, replacement) -> nn.Module:
    for path, layer in list(lora_layers(model).items()):
        model.set_submodule(path, replacement(layer))
    _transformers.sync(model)  # no adapter layers left: a transformers model is a plain one again
    return model
