"""quantplug backend for torchao.

torchao quantizes in place: ``quantize_(model, config)`` leaves every
``nn.Linear`` a plain ``nn.Linear`` and swaps its ``weight`` for a tensor
subclass (``Int8Tensor``, ``IntxUnpackedToInt8Tensor``, ``Float8Tensor``,
``NF4Tensor``, the CUDA int4 layouts...). So this backend claims a linear by
its weight's class, never by the module's class, and builds new layers by
running torchao's own ``quantize_`` with the config recovered from the
weight. Importing this module imports neither torch nor torchao: the work is
in :mod:`quantplug_torchao.formats`, imported inside the hooks.
"""

from __future__ import annotations

import sys

from quantplug import BackendInfo, Requirement, hookimpl
from quantplug.plugin import register_fused_lora

NAME = "torchao"

# Proved by the nox matrix (docs/compatibility.md). What moved between these releases is
# handled in quantplug_torchao/_compat.py by feature probes. Upper bound: torchao reshapes its
# tensor classes nearly every release.
REQUIREMENT = Requirement("torchao", ">=0.15,<0.19", module="torchao")

# variant name -> what it builds; the first is the default. The torchao
# config each one runs is in formats.VARIANTS.
VARIANTS = (
    "int8wo",  # Int8WeightOnlyConfig(): Int8Tensor, per-row int8 (what TorchAoConfig users load)
    "int4-g32",  # IntxWeightOnlyConfig(torch.int4, PerGroup(32)): the int4 that runs on CPU
    "int4-g64",  # IntxWeightOnlyConfig(torch.int4, PerGroup(64))
    "int8dq",  # Int8DynamicActivationInt8WeightConfig(): int8 weight, int8 per-token activations
    "int8dq-int4-g32",  # Int8DynamicActivationIntxWeightConfig(torch.int4, PerGroup(32))
    "float8wo",  # Float8WeightOnlyConfig(): float8_e4m3fn weight, per row
    "nf4",  # to_nf4(weight): torchtune's QLoRA format, shards under FSDP2
)


@hookimpl
def quantplug_backend_info():
    return BackendInfo(
        name=NAME,
        requires=(REQUIREMENT,),
        devices=("cpu", "cuda"),
        merge_modes=("requantize", "dense", "zeros"),
        variants=VARIANTS,
        dora=True,
        mixed_batch=True,
        compile_safe=True,
        shardable=False,
        limits={
            "shardable": (
                "only the nf4 variant (NF4Tensor, FSDP2's all-gather extension) shards; fully_shard "
                "fails on Int8Tensor and IntxUnpackedToInt8Tensor (no aten.split) and Float8Tensor "
                "(no aten.new_zeros) in torchao 0.18"
            ),
            "requantize": (
                "rebuilds the tensor subclasses of torchao's version-2 configs (Int8Tensor, IntxUnpackedToInt8Tensor, "
                "Float8Tensor, NF4Tensor, the Int4 layouts); before torchao 0.18 Int8WeightOnlyConfig() and "
                "Int8DynamicActivationInt8WeightConfig() default to version=1 (AffineQuantizedTensor), which is "
                "attached and merged with mode='dense' only: pass version=2 to requantize"
            ),
            "zeros": (
                "partial: per-group IntxUnpackedToInt8Tensor weights (int4-g32, int4-g64, int8dq-int4-g32) only, "
                "which store a zero point per group; the merged layer keeps them in floating point (exact), "
                "which requantize does not rebuild: merge a second adapter into it with mode='dense' or 'zeros'"
            ),
        },
    )


def torchao_weight(module):
    """The torchao tensor subclass held as ``module.weight``, or ``None``.

    Cheap and import-free: a torchao tensor can only exist once ``torchao``
    is in ``sys.modules``, and the class check reads ``__module__`` along the
    MRO (torchao sets ``Int8Tensor.__module__ = "torchao.quantization"``).
    """
    if "torchao" not in sys.modules:
        return None
    from torch import nn

    if not isinstance(module, nn.Linear):
        return None
    weight = module._parameters.get("weight")
    if weight is None:
        return None
    for cls in type(weight).__mro__:
        if cls.__module__.split(".", 1)[0] == "torchao" and cls.__name__ in _QUANTIZED_BASES:
            return weight
    return None


# torchao's quantized-weight classes all derive from TorchAOBaseTensor, except
# NF4Tensor (a plain torch.Tensor subclass). Float8Linear's training wrappers
# (WeightWithDynamicFloat8CastTensor) derive from neither and hold a dense
# weight: those linears are not quantized storage and stay unclaimed.
_QUANTIZED_BASES = frozenset({"TorchAOBaseTensor", "NF4Tensor"})


@hookimpl
def quantplug_detect_layer(module):
    return NAME if torchao_weight(module) is not None else None


@hookimpl
def quantplug_compute_dtype(module):
    weight = torchao_weight(module)
    # every torchao weight reports the dtype it was quantized from (bf16 usually),
    # which is what its linear returns; scales may be float32 (Int8Tensor)
    return weight.dtype if weight is not None and weight.dtype.is_floating_point else None


@hookimpl
def quantplug_dequantize(module):
    from quantplug_torchao import formats

    return formats.dequantize(module)


@hookimpl
def quantplug_requantize(module, weight):
    from quantplug_torchao import formats

    return formats.requantize(module, weight)


@hookimpl
def quantplug_group_size(module):
    from quantplug_torchao import formats

    return formats.group_size(module)


@hookimpl
def quantplug_fold_into_zeros(module, offsets):
    from quantplug_torchao import formats

    return formats.fold_into_zeros(module, offsets)


@hookimpl
def quantplug_quantize(linear, variant):
    from quantplug_torchao import formats

    return formats.quantize(linear, variant or VARIANTS[0])


@hookimpl
def quantplug_register_kernels(register):
    # fused int8 weight-only GEMV + LoRA for 1-16 tokens on CUDA, reading the layer's own storage
    # (quantplug_torchao._cuda_kernels); nothing registered without Triton and a CUDA device
    register_fused_lora(register, "quantplug_torchao._cuda_kernels", name="triton-int8-lora", backend=NAME)
