"""Whole-model operations: find targets, attach adapters, choose the active ones, train."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from quantplug._builtin import is_plain_linear
from quantplug._config import LoraConfig
from quantplug._lora import BASE, GroupSizeError, LoraLayer, check_adapter_name, qalora_group_size
from quantplug._registry import hook, load_plugins


def detect(module: nn.Module, model: nn.Module | None = None) -> str | None:
    """The name of the backend whose quantized layer ``module`` is, or ``None``.

    A plain ``torch.nn.Linear`` is reported as ``"linear"`` (the core's own
    backend); anything no plugin claims is ``None``.
    """
    if isinstance(module, LoraLayer):
        return module.backend
    return hook().quantplug_detect_layer(module=module, model=model)


def lora_layers(model: nn.Module, adapter: str | None = None) -> dict[str, LoraLayer]:
    """Every adapter layer in ``model`` by its path (only those holding ``adapter``, if given)."""
    return {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, LoraLayer) and (adapter is None or adapter in module.lora_A)
    }


def _installed() -> str:
    return ", ".join(f"{s.name} ({s.status})" for s in load_plugins().statuses())


def _plan(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module, str]]:
    """(path, module, backend) for every targeted layer; raises before anything changes."""
    plan: list[tuple[str, nn.Module, str]] = []
    wrapped: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in wrapped):
            continue  # inside an adapter layer: its base is targeted through the wrapper
        if isinstance(module, LoraLayer):
            wrapped.append(path)
        if not path or not config.targets(path):
            continue
        backend = detect(module, model)
        if backend is None:
            if config.target_modules == "all-linear":
                continue
            if any(True for _ in module.children()) and not any(
                True for _ in module.parameters(recurse=False)
            ):
                continue  # a container whose name matches, as PEFT ignores them
            raise TypeError(
                f"target module {path!r} is a {type(module).__module__}.{type(module).__qualname__} that no "
                f"installed backend claims; installed backends: {_installed()}. Install the plugin for its "
                "library (quantplug doctor lists them) or leave it out of target_modules."
            )
        _check_capabilities(path, backend, config)
        if config.use_qalora:
            _check_qalora(path, module, backend, config)
        plan.append((path, module, backend))
    if not plan:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if p and detect(m, model)})
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no layer of the model; "
            f"its wrappable layers are named: {names[:20]}"
        )
    return plan


def _check_capabilities(path: str, backend: str, config: LoraConfig) -> None:
    status = load_plugins().status(backend)
    if not status.ok:
        raise RuntimeError(
            f"layer {path!r} belongs to backend {backend!r}, which is {status.status}: {status.reason}. Fix: {status.fix}"
        )
    info = status.info
    if config.use_dora and info is not None and not info.dora:
        reason = info.limits.get("dora", "the backend does not declare it")
        raise ValueError(f"layer {path!r} ({backend}) does not support DoRA: {reason}. Use use_dora=False.")


def _check_qalora(path: str, module: nn.Module, backend: str, config: LoraConfig) -> None:
    base = module.base if isinstance(module, LoraLayer) else module
    try:
        qalora_group_size(base, backend, int(module.in_features), config)
    except GroupSizeError as exc:
        raise GroupSizeError(f"layer {path!r} ({backend}): {exc}") from None


def attach(model: nn.Module, config: LoraConfig, adapter: str = "default") -> nn.Module:
    """Add adapter ``adapter`` to every layer ``config`` targets, in place; returns ``model``.

    Layers are wrapped in a :class:`LoraLayer` the first time; a layer
    already wrapped gets one more adapter. The new adapter becomes active
    beside the ones already active (use :func:`set_adapter` to choose).
    """
    check_adapter_name(adapter)
    plan = _plan(model, config)
    existing = [
        path for path, module, _ in plan if isinstance(module, LoraLayer) and adapter in module.lora_A
    ]
    if existing:
        raise ValueError(f"adapter {adapter!r} already exists on {existing[0]!r}; pick another name")
    pm = hook()
    for path, module, backend in plan:
        layer = module
        if not isinstance(layer, LoraLayer):
            for param in module.parameters():
                param.requires_grad_(False)
            layer = pm.quantplug_wrap_layer(module=module, config=config, backend=backend)
            model.set_submodule(path, layer)
        dtype = config.dtype or _adapter_dtype(pm.quantplug_compute_dtype(module=layer.base, backend=backend))
        layer.add_adapter(adapter, config, dtype)
    return model


def _adapter_dtype(compute: torch.dtype | None) -> torch.dtype:
    """Adapters live in the compute dtype, except fp16: fp16 weights with AdamW and no
    loss scaling overflow (NaN within 5 steps on a GPTQ fp16 tiny LLaMA), so fp32 there."""
    if compute is None or compute == torch.float16:
        return torch.float32
    return compute


def set_adapter(model: nn.Module, adapter: str | Sequence[str]) -> None:
    """Make ``adapter`` (or several, summed) the active adapter(s) of every layer that has them."""
    names = [adapter] if isinstance(adapter, str) else list(adapter)
    layers = lora_layers(model)
    known = {name for layer in layers.values() for name in layer.adapters}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; the model has {sorted(known)}")
    for layer in layers.values():
        layer.set_adapter([n for n in names if n in layer.lora_A])


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, row ``i`` of every batch goes through adapter ``adapter_names[i]``.

    ``"__base__"`` rows get no adapter. Equivalent to passing
    ``adapter_names=`` to each adapter layer.
    """
    names = list(adapter_names)
    layers = lora_layers(model).values()
    known = {name for layer in layers for name in layer.adapters}
    unknown = sorted(set(names) - known - {BASE})
    if unknown:
        raise KeyError(f"adapter_names has unknown adapter(s) {unknown}; the model has {sorted(known)}")

    def pre_hook(layer, args, kwargs, rows):
        return args, {**kwargs, "adapter_names": rows}

    handles = [
        # a layer without one of the adapters runs those rows through its base alone
        layer.register_forward_pre_hook(
            functools.partial(pre_hook, rows=[n if n in layer.lora_A else BASE for n in names]),
            with_kwargs=True,
        )
        for layer in layers
    ]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model runs its bases only (merged adapters stay in)."""
    layers = list(lora_layers(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.disabled = state


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters, which are the only ones :func:`prepare_for_training` leaves trainable."""
    params = []
    for layer in lora_layers(model).values():
        for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
            params.extend(store.values())
    return params


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """Freeze everything but the adapters, make inputs carry gradients, switch to train mode.

    :param gradient_checkpointing: also turn on the model's own activation
        checkpointing (transformers models), non-reentrant.
    """
    adapters = {id(p) for p in trainable_parameters(model)}
    if not adapters:
        raise ValueError("the model has no adapters: call qp.attach(model, config) first")
    for param in model.parameters():
        param.requires_grad_(id(param) in adapters)
    hook().quantplug_prepare_for_training(model=model)
    if gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError(
                f"{type(model).__name__} has no gradient_checkpointing_enable(); wrap its blocks yourself"
            )
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    return model


def quantize(
    module: nn.Module, backend: str, variant: str | None = None, skip: Sequence[str] = ("lm_head",)
) -> nn.Module:
    """Quantize plain linears with ``backend``'s own library (no calibration data).

    A plain ``nn.Linear`` comes back as a new quantized layer; any other
    module has every plain linear inside it replaced in place (except those
    whose name is in ``skip``) and is returned.
    """
    status = load_plugins().status(backend)
    if not status.ok:
        raise RuntimeError(f"backend {backend!r} is {status.status}: {status.reason}. Fix: {status.fix}")
    pm = hook()
    if is_plain_linear(module):
        layer = pm.quantplug_quantize(linear=module, backend=backend, variant=variant)
        if layer is None:
            raise NotImplementedError(f"backend {backend!r} does not implement quantplug_quantize")
        return layer
    targets = [
        path
        for path, child in module.named_modules()
        if is_plain_linear(child) and path.rsplit(".", 1)[-1] not in skip
    ]
    for path in targets:
        module.set_submodule(path, quantize(module.get_submodule(path), backend, variant))
    return module
