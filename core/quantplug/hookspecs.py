"""The hooks a quantplug backend plugin implements: the plugin author's contract.

Every hook is prefixed ``quantplug_`` and implemented with
``@quantplug.hookimpl`` in the module named by the plugin's entry point in
the group ``quantplug.backends``.  A hookimpl may accept fewer arguments than
its spec; new arguments are only ever added, so old plugins keep working.

Dispatch hooks are ``firstresult``: the first answer that is not ``None``
wins. ``quantplug_detect_layer`` asks every plugin, so it must return
``None`` for layers that are not its own. The hooks that take ``backend``
are called for one backend's layers at a time, on the plugin that declared
that backend (then the core's defaults in :mod:`quantplug._builtin`), never
on another plugin: an implementation needs no ``backend`` check (the
argument is always the plugin's own backend, and may be left out).

What the core checks at the boundary: an exception raised by a hookimpl
reaches the user as :class:`quantplug.PluginError` (a ``ValueError``,
``TypeError`` or ``NotImplementedError`` stays one too) naming the plugin,
its distribution, the hook, the backend and the layer, chained to the
original; a detect hook that raises is reported once as a
:class:`quantplug.PluginWarning` and skipped, so other backends keep
working. Results are checked before anything changes (shapes, dtypes,
finiteness, features; see each hook). Hook wrappers
(``hookimpl(wrapper=True)``) are refused: the core owns the call order. The
entry point's name is the backend's name (``hqq = "quantplug_hqq"``
declares ``"hqq"``); one that differs is not loaded and doctor says why.

Lifecycle (which hook fires when)::

    load_plugins()          quantplug_backend_info, quantplug_check_backend,
                            quantplug_register_kernels
    qp.attach(model, cfg)   quantplug_detect_layer (every targeted module),
                            quantplug_compute_dtype, quantplug_wrap_layer,
                            quantplug_group_size (QALoRA adapters)
    qp.prepare_for_training quantplug_prepare_for_training
    layer(x)                the kernels registered above
    qp.merge(model)         quantplug_dequantize, quantplug_requantize
                            (mode "requantize"), quantplug_fold_into_zeros
                            (mode "zeros", after quantplug_group_size),
                            quantplug_dequantize again to measure the error
    qp.unmerge / qp.unload  no hook: the core restores the original module
    quantplug demo / bench  quantplug_quantize to build quantized layers
    qp.distributed.shard    quantplug_layer_variant (variants a limit names)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from quantplug._config import LoraConfig
    from quantplug._info import BackendInfo, BackendStatus
    from quantplug._kernels import KernelRegister
    from quantplug._lora import LoraLayer

hookspec = pluggy.HookspecMarker("quantplug")


# --------------------------------------------------------------------------
# Describing a backend
# --------------------------------------------------------------------------


@hookspec
def quantplug_backend_info() -> BackendInfo:
    """Describe the backend this plugin provides.

    :returns: a :class:`quantplug.BackendInfo`: the backend's name, the
        distributions and version ranges it needs, the devices it runs on,
        its merge modes, the formats it can build, and its capabilities
        (DoRA, mixed batches, ``torch.compile``, FSDP2 sharding) as data,
        with a reason in ``limits`` for each capability it lacks.

    Must be cheap and must not import the backend's library: the core calls
    it for ``quantplug doctor`` even when the library is missing or broken.
    The core turns ``requires`` into a status with
    :func:`quantplug._versions.probe`, so most plugins need no
    ``quantplug_check_backend``.

    .. versionadded:: 0.1

    Implementing in a backend plugin: required. Called once when plugins
    load, before any other hook of this plugin.
    """


@hookspec
def quantplug_check_backend(info: BackendInfo) -> BackendStatus | None:
    """Refine the availability status the core derived from ``info.requires``.

    :param info: this plugin's own :class:`quantplug.BackendInfo`.
    :returns: a :class:`quantplug.BackendStatus` for ``info.name``, or
        ``None`` to keep the status the core computed.

    Never raise: catch everything and report ``Status.BROKEN`` with the
    reason and the fix. Read metadata before importing anything; import the
    library only to check something metadata cannot tell (a compiled
    extension that fails to load, a missing GPU).

    .. versionadded:: 0.1

    Implementing in a backend plugin: optional. Called when plugins load,
    after ``quantplug_backend_info``, with the backend's own info; the core
    ignores a status whose ``name`` is not ``info.name``.
    """


# --------------------------------------------------------------------------
# Finding and wrapping layers
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def quantplug_detect_layer(module: nn.Module, model: nn.Module | None) -> str | None:
    """Claim ``module`` if it is a quantized layer of this backend.

    Stops at the first non-None result.

    :param module: a candidate layer of the user's model.
    :param model: the whole model, when known, for model-level hints such as
        ``model.quantization_method`` or ``model.config.quantization_config``.
    :returns: this backend's name, or ``None`` if the layer is not its own.
        A name this plugin's ``quantplug_backend_info`` did not declare is a
        :class:`quantplug.PluginError`.

    Must be cheap and import nothing that is absent: compare class names
    from ``type(module).__mro__``, or check ``sys.modules`` before importing.
    Never claim a plain ``torch.nn.Linear``: the core wraps those itself.

    .. versionadded:: 0.1

    Implementing in a backend plugin: required. Called by ``qp.attach`` and
    ``qp.detect`` for every module a ``LoraConfig`` targets.
    """


@hookspec(firstresult=True)
def quantplug_compute_dtype(module: nn.Module, backend: str) -> torch.dtype | None:
    """The dtype the layer computes in, which adapters will be kept in.

    Stops at the first non-None result.

    :param module: a layer this plugin claimed.
    :param backend: the backend that claimed it, always one of this plugin's.
    :returns: a floating dtype (``torch.bfloat16`` for a bnb layer built with
        ``compute_dtype=torch.bfloat16``), or ``None`` to let the core use
        the dtype of the layer's first floating parameter or buffer.

    .. versionadded:: 0.1

    Implementing in a backend plugin: optional. Called by ``qp.attach``
    once per wrapped layer when ``LoraConfig.dtype`` is not set.
    """


@hookspec(firstresult=True)
def quantplug_wrap_layer(module: nn.Module, config: LoraConfig, backend: str) -> LoraLayer | None:
    """Build the adapter layer around a quantized layer.

    Stops at the first non-None result.

    :param module: a layer this plugin claimed.
    :param config: the :class:`quantplug.LoraConfig` being attached.
    :param backend: the backend that claimed it, always one of this plugin's.
    :returns: a :class:`quantplug.LoraLayer` (or a subclass) whose ``base``
        is ``module``, with no adapter yet: the core adds them. The core checks
        that it is a ``LoraLayer`` over that very module, with its
        ``in_features``/``out_features`` and this backend's name, and then
        hands it the hook relay and kernels (``layer.connect``); anything else
        is a :class:`quantplug.PluginError` and the model is left unchanged.

    The core's built-in implementation (``trylast``) returns
    ``LoraLayer(module, backend)``, which fits any layer with
    ``in_features``/``out_features``. Implement this only to return a
    subclass, for example one whose ``base_forward`` picks a kernel with a
    backward pass while training.

    .. versionadded:: 0.1

    Implementing in a backend plugin: optional. Called by ``qp.attach``
    once per claimed layer that is not wrapped yet.
    """


@hookspec
def quantplug_prepare_for_training(model: nn.Module) -> None:
    """Make this backend's layers in ``model`` able to pass gradients back.

    :param model: the whole model, adapters attached, about to be trained.

    Adjust every layer of this backend, wrapped or not: a layer that no
    adapter targets still has to carry the gradient to the adapters before
    it. Undo an inference-only repacking (bitsandbytes' CPU layout), or
    switch an inference kernel without a backward pass to one with it.
    Leave layers of other backends alone, and change no weight values.

    .. versionadded:: 0.1

    Implementing in a backend plugin: optional. Called by
    ``qp.prepare_for_training(model)`` after the base is frozen.
    """


@hookspec(firstresult=True)
def quantplug_layer_variant(module: nn.Module, backend: str) -> str | None:
    """Which of this backend's variants ``module`` is.

    Stops at the first non-None result.

    :param module: a layer this plugin claimed (the ``base`` of a wrapped layer).
    :param backend: the backend that claimed it, always one of this plugin's.
    :returns: the entry of ``BackendInfo.variants`` that names the layer's
        format (bitsandbytes: ``"nf4"``, ``"fp4"`` or ``"int8"``), the one
        ``quantplug_quantize`` would have built it from; ``None`` when the
        layer is in a format none of the variants names.

    Read the layer's class and attributes; never dequantize. A layer built by
    ``quantplug_quantize(linear, backend, variant)`` must come back as
    ``variant`` (the conformance suite checks it).

    .. versionadded:: 0.1

    Implementing in a backend plugin: required when ``BackendInfo.limits``
    has a ``"<capability>:<variant>"`` key (``"shardable:int8"``), optional
    otherwise. Called by ``qp.distributed.shard`` to find the layers of
    variants that cannot shard.
    """


@hookspec(firstresult=True)
def quantplug_group_size(module: nn.Module, backend: str) -> int | None:
    """How many consecutive input columns share one set of quantization parameters.

    Stops at the first non-None result.

    :param module: a layer this plugin claimed (the ``base`` of a wrapped layer).
    :param backend: the backend that claimed it, always one of this plugin's.
    :returns: the group size ``g`` along the input dimension, such that in
        every output row the input columns ``k*g`` to ``k*g + g - 1`` share
        one scale (and one zero point, where the format stores them), for
        every ``k``; ``g`` divides ``in_features`` and is smaller than it.
        ``None`` where the layer has no such grouping: per-channel or
        per-tensor scales, groups along the output dimension (HQQ
        ``axis=0``), groups over permuted columns (GPTQ act-order ``g_idx``),
        codebooks, or a layout that no longer has groups (a per-channel int8
        conversion).

    QALoRA adapters (``LoraConfig(use_qalora=True)``) pool their input over
    groups of this size unless ``qalora_group_size`` is given, so that the
    adapter's update is constant within each quantization group; merge mode
    ``"zeros"`` folds such an update into the layer's zero points. Must be
    cheap: read the layer's attributes, never dequantize.

    .. versionadded:: 0.1

    Implementing in a backend plugin: optional; implement it for group-wise
    formats. Called by ``qp.attach`` and ``qp.load_adapter`` for QALoRA
    adapters without a ``qalora_group_size``, and by
    ``qp.merge(..., mode="zeros")`` to check that the adapter's groups fit
    the layer's. Without it, QALoRA needs an explicit ``qalora_group_size``
    on this backend's layers and the zeros merge is refused.
    """


# --------------------------------------------------------------------------
# Primitives the core's merge is built from
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def quantplug_dequantize(module: nn.Module, backend: str) -> torch.Tensor | None:
    """The dense weight of a quantized layer, exactly as the library computes it.

    Stops at the first non-None result.

    :param module: a layer this plugin claimed (the ``base`` of a wrapped layer).
    :param backend: the backend that claimed it, always one of this plugin's.
    :returns: a new ``(out_features, in_features)`` tensor in the layer's
        compute dtype on the layer's device, such that the layer's forward is
        ``x @ W.T + bias`` up to the library's own rounding. The layer itself
        must be left unchanged.

    Use the library's own dequantization. Where it has none, run the layer's
    own forward on an identity matrix (without bias), which is exact by
    construction. Test it against the library on a layer that already ran a
    forward: several libraries repack weights in place on the first call.

    .. versionadded:: 0.1

    Implementing in a backend plugin: required. Called by ``qp.merge`` (both
    modes), to measure merge errors, by DoRA's weight norm, and by the
    conformance suite as the reference for the adapter layer's forward.
    """


@hookspec(firstresult=True)
def quantplug_requantize(module: nn.Module, weight: torch.Tensor, backend: str) -> nn.Module | None:
    """A new quantized layer in the same format as ``module``, holding ``weight``.

    Stops at the first non-None result.

    :param module: the layer whose format to keep (bits, group size,
        symmetry, grid, codebooks, layout, ``g_idx``, compute dtype, bias).
    :param weight: the merged dense weight, ``(out_features, in_features)``,
        finite, in the compute dtype.
    :param backend: the backend that claimed ``module``, always one of this plugin's.
    :returns: a new module, on ``module``'s device, whose dequantized weight
        approximates ``weight`` and whose bias is ``module``'s bias.
        ``module`` must be left unchanged: ``qp.unmerge`` puts it back.

    The core does everything else: dequantize, add the adapter, check the
    result is finite, call this hook, dequantize the result again to measure
    the error, and report. A backend that cannot requantize leaves
    ``"requantize"`` out of ``BackendInfo.merge_modes`` with a reason in
    ``limits``; its users still get the lossless ``"dense"`` merge.

    .. versionadded:: 0.1

    Implementing in a backend plugin: required when ``merge_modes``
    includes ``"requantize"``. Called by ``qp.merge(..., mode="requantize")``.
    """


@hookspec(firstresult=True)
def quantplug_fold_into_zeros(module: nn.Module, offsets: torch.Tensor, backend: str) -> nn.Module | None:
    """A new layer with ``module``'s codes whose zero points absorb a constant per group.

    Stops at the first non-None result.

    :param module: a layer this plugin claimed, whose ``quantplug_group_size``
        is ``g``.
    :param offsets: ``(out_features, in_features // g)`` float32 tensor on the
        layer's device: the amount to add to every weight of input group
        ``k`` in output row ``o``.
    :param backend: the backend that claimed ``module``, always one of this plugin's.
    :returns: a new module of ``module``'s class and format, on its device,
        with ``module``'s quantized codes bit for bit and its bias, whose zero
        points (or per-group offsets) are moved so that its dequantized weight
        is ``dequantize(module) + offsets`` expanded over each group, as
        closely as the format stores zero points: exactly where they are
        floating point (HQQ), to the nearest step of the group's scale and
        clamped to the code range where they are integers (GPTQ, AWQ).
        ``module`` must be left unchanged: ``qp.unmerge`` puts it back.

    With a dequantization ``W = s * (q - z)`` per group, ``z - offset / s``
    is the new zero point. Raise ``ValueError`` naming the reason for a layer
    of yours that cannot take it (a symmetric layer whose kernels ignore zero
    points, a layout without them); the core turns it into a ``MergeError``
    naming the layer, and leaves the model unchanged.

    The core does everything else: it checks that the adapter is a QALoRA
    adapter whose pooling groups are a multiple of the layer's quantization
    groups (so its update is constant within each), computes ``offsets``
    from the adapter, calls this hook, dequantizes the result to measure the
    error against the ideal merged weight, and reports it. A backend whose
    format stores no zero points leaves ``"zeros"`` out of
    ``BackendInfo.merge_modes``, with a reason in ``limits``.

    .. versionadded:: 0.1

    Implementing in a backend plugin: required when ``merge_modes`` includes
    ``"zeros"``. Called by ``qp.merge(..., mode="zeros")``, once per layer.
    """


@hookspec(firstresult=True)
def quantplug_quantize(linear: nn.Module, backend: str, variant: str | None) -> nn.Module | None:
    """Quantize a dense ``nn.Linear`` into a layer of this backend.

    Stops at the first non-None result.

    :param linear: a plain ``torch.nn.Linear`` (weight and optional bias).
    :param backend: the backend asked for, always one of this plugin's.
    :param variant: one of ``BackendInfo.variants`` (``"nf4"``), or ``None``
        for the first (the default).
    :returns: a new quantized layer built by the library itself, without
        calibration data (round-to-nearest where the method allows), on the
        linear's device.

    Raise ``ValueError`` naming the valid variants for an unknown variant.

    .. versionadded:: 0.1

    Implementing in a backend plugin: required. Called by ``quantplug demo``
    and ``quantplug bench`` to build quantized models, and by the
    conformance suite to build the layers it tests.
    """


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@hookspec
def quantplug_register_kernels(register: KernelRegister) -> None:
    """Register faster implementations of the core's kernel ops.

    :param register: call ``register.kernel(op, fn, backend=..., device=...,
        dtypes=..., priority=..., name=...)`` for each kernel; it validates
        the op and the callable and raises ``KernelRegistrationError`` on a
        duplicate name.

    Every op has a plain-PyTorch reference registered by the core itself,
    so a kernel only needs to be fast, not complete: register it for the
    devices and dtypes it handles, with a priority above 0. Import GPU-only
    libraries (Triton) inside the function or guard them, so registration
    never fails on a CPU-only machine. ``QUANTPLUG_KERNELS=reference``
    forces the references; the conformance suite compares kernels to them.

    .. versionadded:: 0.1

    Implementing in a backend plugin: optional. Called once when plugins load.
    """
