"""quantplug backend for Intel Neural Compressor (INC) weight-only layers.

Claims ``neural_compressor``'s ``INCWeightOnlyLinear``, the layer INC's
weight-only algorithms (RTN, GPTQ, AWQ, TEQ) build for
PyTorch. Importing this module is cheap: it imports neither torch nor
neural_compressor; the hookimpls import :mod:`quantplug_inc.layers` (torch,
and neural_compressor only where a layer must be built) when they run.
"""

from __future__ import annotations

import sys

from quantplug import BackendInfo, Requirement, hookimpl

NAME = "inc"
# INCWeightOnlyLinear, unpack()/pack()/recover() and RTNConfig(use_sym=...) with
# prepare/convert are unchanged from 3.0 (2024-08) to 3.10 (read at the v3.0..v3.9
# tags, run on 3.10); 2.x had another torch API (adaptor.torch_utils).
SPECIFIER = ">=3.8.1,<4"
REQUIREMENT = Requirement(
    "neural-compressor",
    SPECIFIER,
    module="neural_compressor",
    pip=f"pip install 'neural-compressor[pt]{SPECIFIER}'",
)
LAYER_CLASSES = frozenset({"INCWeightOnlyLinear"})
# name -> RTN settings (RTNConfig keywords); the first is the default
VARIANTS = {
    "int4-g32": {"dtype": "int", "bits": 4, "group_size": 32, "use_sym": True},
    "int4-g32-asym": {"dtype": "int", "bits": 4, "group_size": 32, "use_sym": False},
    "int8-g128": {"dtype": "int", "bits": 8, "group_size": 128, "use_sym": True},
    "nf4-g32": {"dtype": "nf4", "bits": 4, "group_size": 32, "use_sym": True},
}


@hookimpl
def quantplug_backend_info():
    return BackendInfo(
        name=NAME,
        requires=(REQUIREMENT,),
        devices=("cpu",),
        merge_modes=("requantize", "dense", "zeros"),
        variants=tuple(VARIANTS),
        dora=True,
        mixed_batch=True,
        # with IncLoraLayer: the base's cache is built at wrap time and its logging call is
        # skipped (see quantplug_inc.layers.IncLoraLayer); the bare layer is not traceable
        compile_safe=True,
        shardable=False,
        limits={
            "shardable": (
                "INCWeightOnlyLinear holds int32 buffers and a plain-attribute fp32 weight cache, "
                "no parameters: nothing FSDP2 shards (untested)"
            ),
            "cuda": "tested on CPU only; INC's CUDA/XPU paths (ipex, fp16 compute) are not exercised",
            "zeros": (
                "partial: asymmetric int layers (use_sym=False) with input groups only; the zero points are "
                "integers, so each group keeps the multiple of its scale nearest to the adapter's update. "
                "Symmetric and nf4/fp4 layers have no zero points to move"
            ),
        },
    )


@hookimpl
def quantplug_check_backend(info):
    if info.name != NAME:
        return None
    from quantplug_inc.probe import check

    return check(info)


def is_inc_layer(module) -> bool:
    """Whether ``module`` is an ``INCWeightOnlyLinear`` (or a subclass), without importing INC."""
    if "neural_compressor" not in sys.modules:
        return False  # no INC layer can exist before INC is imported
    return any(
        cls.__name__ in LAYER_CLASSES and cls.__module__.startswith("neural_compressor.")
        for cls in type(module).__mro__
    )


@hookimpl
def quantplug_detect_layer(module):
    # INC's own saved configs say quant_method "rtn"/"gptq"/"awq"/"teq", names gptqmodel
    # uses too, so the model-level hint cannot tell INC apart: the layer class does.
    return NAME if is_inc_layer(module) else None


@hookimpl
def quantplug_compute_dtype(module):
    from quantplug_inc.layers import compute_dtype

    return compute_dtype(module)


@hookimpl
def quantplug_wrap_layer(module, backend):
    from quantplug_inc.layers import IncLoraLayer

    return IncLoraLayer(module, backend)


@hookimpl
def quantplug_dequantize(module):
    from quantplug_inc.layers import dequantize

    return dequantize(module)


@hookimpl
def quantplug_requantize(module, weight):
    from quantplug_inc.layers import requantize

    return requantize(module, weight)


@hookimpl
def quantplug_group_size(module):
    from quantplug_inc.layers import group_size

    return group_size(module)


@hookimpl
def quantplug_fold_into_zeros(module, offsets):
    from quantplug_inc.layers import fold_into_zeros

    return fold_into_zeros(module, offsets)


@hookimpl
def quantplug_quantize(linear, variant):
    if variant is None:
        variant = next(iter(VARIANTS))
    if variant not in VARIANTS:
        raise ValueError(f"unknown inc variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    from quantplug_inc.layers import quantize

    return quantize(linear, **VARIANTS[variant])
