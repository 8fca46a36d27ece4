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

# Proved by the nox matrix (docs/compatibility.md). The plugin relies on QModuleMixin's
# weight_qtype / weight_group_size / optimizer attributes and QTensor.dequantize(); 0.3 may reshape them.
REQUIREMENT = Requirement("optimum-quanto", ">=0.2.5,<0.3", module="optimum.quanto")

# the file holding quanto's TinyGemm packer (bf16 qint4 weights), inside the optimum-quanto dist
_TINYGEMM_PACKER = "optimum/quanto/tensor/weights/tinygemm/packed.py"


def bf16_qint4_on_cpu_unavailable() -> str | None:
    """Why the installed optimum-quanto cannot build bf16 qint4 layers on CPU, or ``None`` if it can.

    quanto stores bf16 qint4 weights in its TinyGemm layout. optimum-quanto 0.2.5 and 0.2.6
    pack it with ``torch._convert_weight_to_int4pack``, which has no CPU kernel
    (torch 2.13: "Could not run 'aten::_convert_weight_to_int4pack' ... 'CPU'
    backend"), so its own ``freeze()`` fails; 0.2.7 calls the CPU op,
    ``_convert_weight_to_int4pack_for_cpu``. A feature probe on the packer's
    source, read through the dist's metadata: quanto is not imported (seconds).
    """
    from importlib import metadata

    try:
        path = metadata.distribution("optimum-quanto").locate_file(_TINYGEMM_PACKER)
        source = path.read_text()
    except Exception:  # not installed, or laid out otherwise: nothing known to be missing
        return None
    if "_convert_weight_to_int4pack" not in source or "_convert_weight_to_int4pack_for_cpu" in source:
        return None
    return (
        "partial: bfloat16 layers cannot be built on CPU by this optimum-quanto (its TinyGemm packer calls "
        "torch._convert_weight_to_int4pack, which has no CPU kernel; optimum-quanto 0.2.7 calls "
        "_convert_weight_to_int4pack_for_cpu). float32/float16 qint4 work; "
        "fix: pip install 'optimum-quanto>=0.2.7,<0.3'"
    )


# --------------------------------------------------------------------------
# Describing the backend (called when plugins load)
# --------------------------------------------------------------------------


@hookimpl
def quantplug_backend_info():
    limits = {}
    why = bf16_qint4_on_cpu_unavailable()
    if why is not None:
        limits["cpu:qint4"] = why
    return BackendInfo(
        name=NAME,
        requires=(REQUIREMENT,),
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
            **limits,
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
def quantplug_layer_variant(module):
    from quantplug_quanto import layers  # quanto is imported already: the layer is a QLinear

    qtype = getattr(module, "weight_qtype", None)
    return next((variant for variant, known in layers.QTYPES.items() if known == qtype), None)


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
    if variant == "qint4" and linear.weight.dtype.is_floating_point and linear.weight.device.type == "cpu":
        import torch

        why = bf16_qint4_on_cpu_unavailable() if linear.weight.dtype == torch.bfloat16 else None
        if why is not None:
            raise NotImplementedError(f"{NAME} variant 'qint4' on a bfloat16 CPU layer: {why}")
    from quantplug_quanto import layers

    return layers.quantize(linear, variant)
