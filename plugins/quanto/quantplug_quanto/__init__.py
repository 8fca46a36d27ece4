"""quantplug backend for optimum-quanto: LoRA on ``optimum.quanto.QLinear`` layers.

Made from quantplug's plugin template, as a third party would: the
required hooks filled, the optional ones (check, wrap, kernels) deleted.

``QLinear`` subclasses ``torch.nn.Linear``, so this backend claims a layer
by quanto's class along its MRO, never by ``nn.Linear``. It handles frozen
layers (``quantize(model, weights=...)`` then ``freeze(model)``: the weight
is a ``QTensor``) and unfrozen ones (the weight is float and ``QLinear``
quantizes it on every forward), with or without activation quantization.
Importing this module imports neither torch nor optimum-quanto: the work is
in :mod:`quantplug_quanto.layers`, imported inside the hooks.
"""

from __future__ import annotations

import sys

from quantplug import BackendInfo, Requirement, hookimpl

# The backend's name: what qp.detect() returns for your layers, what users
# pass to qp.quantize(..., backend), and the entry point's name in pyproject.toml.
NAME = "quanto"

# variant -> the optimum.quanto weight qtype quantplug_quantize builds (layers.QTYPES)
VARIANTS = ("qint8", "qint4", "qint2", "qfloat8")


# --------------------------------------------------------------------------
# Describing the backend (called when plugins load)
# --------------------------------------------------------------------------


@hookimpl
def quantplug_backend_info():
    return BackendInfo(
        name=NAME,
        # Only 0.2.7 is tested (the latest release). The plugin relies on
        # QModuleMixin's weight_qtype / weight_group_size / optimizer attributes
        # and QTensor.dequantize(); 0.3 may reshape them.
        requires=(Requirement("optimum-quanto", ">=0.2.7,<0.3", module="optimum.quanto"),),
        devices=("cpu",),
        merge_modes=("requantize", "dense"),
        variants=VARIANTS,
        dora=True,
        mixed_batch=True,
        compile_safe=True,
        shardable=False,
        limits={
            "shardable": (
                "quanto's QTensor weights implement no FSDP2 all-gather extension "
                "(fsdp_pre_all_gather), optimum-quanto 0.2.7"
            ),
            "zeros": (
                "not implemented: qint8/qfloat8 are scale-only; qint4/qint2 keep a per-group shift that "
                "could hold a QALoRA update, but this plugin does not fold into it yet"
            ),
        },
    )


# --------------------------------------------------------------------------
# Finding and wrapping layers (called by qp.attach and qp.detect)
# --------------------------------------------------------------------------


def is_quanto_linear(module) -> bool:
    """Whether ``module`` is an ``optimum.quanto`` ``QLinear`` (or a subclass), without importing quanto."""
    if "optimum.quanto" not in sys.modules:
        return False  # no quanto layer can exist before quanto is imported
    return any(
        cls.__name__ == "QLinear" and cls.__module__.startswith("optimum.quanto.")
        for cls in type(module).__mro__
    )


@hookimpl
def quantplug_detect_layer(module, model):
    return NAME if is_quanto_linear(module) else None


@hookimpl
def quantplug_compute_dtype(module):
    # a frozen QTensor reports the float dtype it was quantized from, which
    # QLinear's forward returns; an unfrozen weight is that float tensor itself
    return module.weight.dtype


# --------------------------------------------------------------------------
# The primitives the core's merge is built from (called by qp.merge)
# --------------------------------------------------------------------------


@hookimpl
def quantplug_dequantize(module):
    from quantplug_quanto import layers

    return layers.dequantize(module)


@hookimpl
def quantplug_requantize(module, weight):
    from quantplug_quanto import layers

    return layers.requantize(module, weight)


@hookimpl
def quantplug_quantize(linear, variant):
    variant = variant or VARIANTS[0]
    if variant not in VARIANTS:
        raise ValueError(f"unknown {NAME} variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    from quantplug_quanto import layers

    return layers.quantize(linear, variant)
