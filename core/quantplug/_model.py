"""Whole-model operations: find targets, attach adapters, choose the active ones, route batches, train.

:func:`attach` is all-or-nothing. It plans every targeted layer and checks it
(targets, backend status and capabilities, the adapter dtype), builds every
new adapter layer and every adapter off the model (the wrap hook's result is
checked: a ``LoraLayer`` over that very module, with its features and
backend; a DoRA adapter dequantizes its base here), and only then commits:
wraps go in with ``set_submodule`` and adapters are installed, which calls
no plugin and cannot fail half-way. On any failure the model is as before,
and the same call can be retried. :func:`set_adapter` checks every name first.

:func:`adapter_batch` routes rows per thread and per asyncio task (see
``quantplug._lora.route``): several threads may serve different adapter
batches on one model at once. Calls that change the model (attach,
set_adapter, disable_adapters, prepare_for_training, merge, unmerge,
unload, load_adapter) are not thread-safe: make them while no other thread
runs the model. ``docs/threads.md`` has the details.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from quantplug import _transformers
from quantplug._builtin import NAME as DENSE_BACKEND
from quantplug._builtin import is_plain_linear
from quantplug._checks import (
    BASE,
    GroupSizeError,
    check_adapter_name,
    check_dtype,
    check_qalora_group,
    checked_module,
)
from quantplug._config import LoraConfig
from quantplug._errors import PluginError
from quantplug._lora import LoraLayer, NewAdapter, Wiring
from quantplug._registry import Registry, hook, load_plugins
from quantplug._routing import route


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


def default_wiring() -> Wiring:
    """The process-wide registry's hook relay and kernels, as a layer holds them (an unpickled layer gets these)."""
    registry = load_plugins()
    return Wiring(registry.relay, registry.kernels)


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """A :class:`PluginError` raised inside the block names the layer at ``path``."""
    try:
        yield
    except PluginError as exc:
        exc.with_layer(path)
        raise


def qalora_group_size(base: nn.Module, backend: str, in_features: int, config: LoraConfig) -> int:
    """The pooling group a QALoRA ``config`` gets on a layer: its own, else the layer's quantization group."""
    group = config.qalora_group_size
    if group is None:
        group = hook().quantplug_group_size(module=base, backend=backend)
    return check_qalora_group(group, in_features, backend, base)


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
        with naming(path):
            qalora_group_size(base, backend, int(module.in_features), config)
    except GroupSizeError as exc:
        raise GroupSizeError(f"layer {path!r} ({backend}): {exc}") from None


def attach(model: nn.Module, config: LoraConfig, adapter: str = "default") -> nn.Module:
    """Add adapter ``adapter`` to every layer ``config`` targets, in place; returns ``model``.

    Layers are wrapped in a :class:`LoraLayer` the first time; a layer
    already wrapped gets one more adapter. The new adapter becomes active
    beside the ones already active (use :func:`set_adapter` to choose).
    All or nothing: on any error the model is unchanged.
    """
    return attach_weights(model, config, adapter, None)


def attach_weights(
    model: nn.Module,
    config: LoraConfig,
    adapter: str,
    weights: dict[str, dict[str, torch.Tensor]] | None,
) -> nn.Module:
    """:func:`attach`, with each layer's new adapter taking ``weights[path]`` (``lora_A``, ``lora_B``,
    ``lora_magnitude``) before it goes in: how ``load_adapter`` attaches, all or nothing too."""
    check_adapter_name(adapter)
    if not isinstance(model, nn.Module) or not isinstance(config, LoraConfig):
        raise TypeError(
            f"attach(model, config) wants a torch module and a quantplug.LoraConfig, got a "
            f"{type(model).__name__} and a {type(config).__name__}"
        )
    if config.dtype is not None:
        check_dtype(config.dtype, "LoraConfig.dtype")
    plan = _plan(model, config)
    existing = [
        path for path, module, _ in plan if isinstance(module, LoraLayer) and adapter in module.lora_A
    ]
    if existing:
        raise ValueError(f"adapter {adapter!r} already exists on {existing[0]!r}; pick another name")
    registry = load_plugins()
    staged: list[tuple[str, nn.Module, LoraLayer, NewAdapter]] = []
    for path, module, backend in plan:  # build everything off the model
        with naming(path):
            layer = (
                module if isinstance(module, LoraLayer) else _wrap(path, module, backend, config, registry)
            )
            new = layer.build_adapter(adapter, config, config.dtype or _adapter_dtype(layer, registry))
            if weights is not None and path in weights:
                new.load(weights[path])
        staged.append((path, module, layer, new))
    for path, module, layer, new in staged:  # commit: no plugin calls from here on
        if layer is not module:
            for param in module.parameters():
                param.requires_grad_(False)
            model.set_submodule(path, layer)
        layer.install_adapter(new)
    _transformers.sync(model)  # a transformers model now carries adapters: Trainer, save_pretrained
    return model


def _wrap(path: str, module: nn.Module, backend: str, config: LoraConfig, registry: Registry) -> LoraLayer:
    """The backend's adapter layer over ``module``, checked and connected; the model is not touched."""
    layer = registry.relay.quantplug_wrap_layer(module=module, config=config, backend=backend)

    def refuse(problem: str) -> PluginError:
        return PluginError(
            f"quantplug_wrap_layer {problem}", hook="quantplug_wrap_layer", backend=backend, layer=path
        )

    if not isinstance(layer, LoraLayer):
        raise refuse(f"returned {type(layer).__name__}, not a quantplug.plugin.LoraLayer (or a subclass)")
    if layer.base is not module:
        raise refuse("returned a LoraLayer over another module; its base must be the module it was given")
    if layer.backend != backend:
        raise refuse(f"returned a LoraLayer for backend {layer.backend!r}; it must say {backend!r}")
    for attr in ("in_features", "out_features"):
        want = getattr(module, attr, None)
        if isinstance(want, int) and getattr(layer, attr) != want:
            raise refuse(f"returned a LoraLayer with {attr}={getattr(layer, attr)}; the layer has {want}")
    return layer.connect(relay=registry.relay, kernels=registry.kernels, info=registry.status(backend).info)


def _adapter_dtype(layer: LoraLayer, registry: Registry) -> torch.dtype:
    """Adapters live in the compute dtype, except fp16: fp16 weights with AdamW and no
    loss scaling overflow (NaN within 5 steps on a GPTQ fp16 tiny LLaMA), so fp32 there."""
    compute = registry.relay.quantplug_compute_dtype(module=layer.base, backend=layer.backend)
    if compute is not None and not (isinstance(compute, torch.dtype) and compute.is_floating_point):
        raise PluginError(
            f"quantplug_compute_dtype returned {compute!r}, not a floating-point torch.dtype or None",
            hook="quantplug_compute_dtype",
            backend=layer.backend,
        )
    if compute is None or compute == torch.float16:
        return torch.float32
    return compute


def _names(value: object, what: str) -> list[str]:
    """``value`` as a list of adapter names, refusing anything else with a clear error."""
    if isinstance(value, str):
        return [value]
    try:
        names = list(value)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"{what} must be an adapter name or a list of them, got {value!r}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{what} must hold adapter names (str), got {bad[0]!r}")
    return names


def set_adapter(model: nn.Module, adapter: str | Sequence[str]) -> None:
    """Make ``adapter`` (or several, summed) the active adapter(s) of every layer that has them.

    Every name is checked before any layer changes.
    """
    names = _names(adapter, "set_adapter's adapter")
    if len(set(names)) != len(names):
        raise ValueError(f"set_adapter got {names}: each adapter can be active once")
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
    ``adapter_names=`` to each adapter layer. Only the calling thread (or
    asyncio task) is affected: other threads using the model see no change.
    """
    if isinstance(adapter_names, str):
        raise TypeError(
            f"adapter_batch wants one adapter name per row of the batch, got the string {adapter_names!r}; "
            f"pass [{adapter_names!r}] * batch_size, or use qp.set_adapter(model, {adapter_names!r})"
        )
    names = _names(adapter_names, "adapter_batch's adapter_names")
    layers = lora_layers(model).values()
    known = {name for layer in layers for name in layer.adapters}
    unknown = sorted(set(names) - known - {BASE})
    if unknown:
        raise KeyError(f"adapter_names has unknown adapter(s) {unknown}; the model has {sorted(known)}")
    # a layer without one of the adapters runs those rows through its base alone
    rows = {layer: [n if n in layer.lora_A else BASE for n in names] for layer in layers}
    with route(rows):
        yield model


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


def prepare_for_training(
    model: nn.Module, gradient_checkpointing: bool = False, compile: bool = False
) -> nn.Module:
    """Freeze everything but the adapters, make inputs carry gradients, switch to train mode.

    :param gradient_checkpointing: also turn on the model's own activation
        checkpointing (transformers models), non-reentrant.
    :param compile: return ``torch.compile(model)``, ready to train: each
        adapter layer is one opaque op to the compiler (``quantplug._lean``),
        so the norms, rotary, residuals and loss around it fuse without a graph
        break. Inputs are left without gradients (a compiled graph cannot call
        ``requires_grad_`` on an intermediate, and non-reentrant checkpointing
        does not need them), and
        ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``
        is set: transformers' hub-kernel layers set a context variable in
        their forward, which Dynamo otherwise refuses inside a checkpoint. The
        first step compiles (about a minute for a 1B model on a GPU).

    Checked first, then done: when it raises (no adapters, no checkpointing
    on this model, a plugin's ``quantplug_prepare_for_training`` failing),
    every parameter's ``requires_grad`` is as it was. What a failing plugin
    hook itself changed is the plugin's to undo.
    """
    adapters = {id(p) for p in trainable_parameters(model)}
    if not adapters:
        raise ValueError("the model has no adapters: call qp.attach(model, config) first")
    enable = getattr(model, "gradient_checkpointing_enable", None) if gradient_checkpointing else None
    if gradient_checkpointing and enable is None:
        raise ValueError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); wrap its blocks yourself"
        )
    before = [(param, param.requires_grad) for param in model.parameters()]
    try:
        for param in model.parameters():
            param.requires_grad_(id(param) in adapters)
        hook().quantplug_prepare_for_training(model=model)
        if enable is not None:
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # transformers registers the input-gradient hooks itself for a model with adapters; a second
            # call would register them again and keep only the new handles (the old could never go)
            registered = getattr(model, "_require_grads_hooks", None) or getattr(
                model, "_require_grads_hook", None
            )
            if compile and hasattr(model, "disable_input_require_grads"):
                model.disable_input_require_grads()
            elif not compile and hasattr(model, "enable_input_require_grads") and not registered:
                model.enable_input_require_grads()
    except BaseException:
        for param, flag in before:
            param.requires_grad_(flag)
        raise
    model.train()
    if not compile:
        return model
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return torch.compile(model)


def quantize(
    module: nn.Module, backend: str, variant: str | None = None, skip: Sequence[str] = ("lm_head",)
) -> nn.Module:
    """Quantize plain linears with ``backend``'s own library (no calibration data).

    A plain ``nn.Linear`` comes back as a new quantized layer; any other
    module has every plain linear inside it replaced in place (except those
    whose name is in ``skip``) and is returned. All or nothing: every layer
    is quantized (and checked: a module with the linear's features) before
    any is put in place.
    """
    status = load_plugins().status(backend)
    if not status.ok:
        raise RuntimeError(f"backend {backend!r} is {status.status}: {status.reason}. Fix: {status.fix}")
    if _is_dense(module):
        return _quantized(module, backend, variant)
    targets = [
        path
        for path, child in module.named_modules()
        if _is_dense(child) and path.rsplit(".", 1)[-1] not in skip
    ]
    built = {}
    for path in targets:
        with naming(path):
            built[path] = _quantized(module.get_submodule(path), backend, variant)
    for path, layer in built.items():
        module.set_submodule(path, layer)
    return module


def _is_dense(module: nn.Module) -> bool:
    """A plain linear that no quantization backend claims (a compressed-tensors layer is an ``nn.Linear``
    too, and its plugin claims it first): what the core's dense backend serves."""
    return is_plain_linear(module) and detect(module) == DENSE_BACKEND


def _quantized(linear: nn.Linear, backend: str, variant: str | None) -> nn.Module:
    layer = hook().quantplug_quantize(linear=linear, backend=backend, variant=variant)
    if layer is None:
        raise NotImplementedError(f"backend {backend!r} does not implement quantplug_quantize")
    return checked_module(layer, linear, backend, "quantplug_quantize")
