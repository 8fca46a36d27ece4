"""quantplug backend for HQQ (Half-Quadratic Quantization) layers.

Claims ``hqq.core.quantize.HQQLinear`` (and subclasses), the layer that
``hqq``'s own ``AutoHQQHFModel.quantize_model`` and transformers 4.x's
``HqqConfig`` build. Importing this module is cheap: it imports neither
torch nor hqq; the hookimpls import :mod:`quantplug_hqq.layers` (torch, and
hqq where a layer must be built or read) when they run.
"""

from __future__ import annotations

import sys

from quantplug import BackendInfo, Requirement, hookimpl
from quantplug.plugin import register_fused_lora

NAME = "hqq"
# Everything used here (HQQLinear(None, ..., initialize=False), .quantize(),
# .dequantize(), .cuda(device), from_weights, Quantizer.quantize(bitpack=False),
# Quantizer.pack, the meta keys scale/zero/packing/axis/group_size) is unchanged
# in source from 0.2.3 to 0.2.8.post1 (git diff of hqq/core between the tags);
# run here on 0.2.8.post1 only. 0.2.2 made HQQLinear ignore quant_zero/quant_scale
# (older layers quantized their scales by default) and 0.2.3 fixed from_weights'
# shapes. The plugin reads HQQLinear.meta, an internal dict: a 0.3 may change it.
SPECIFIER = ">=0.2.7,<0.3"
REQUIREMENT = Requirement("hqq", SPECIFIER, module="hqq")
LAYER_CLASSES = frozenset({"HQQLinear"})
# name -> BaseQuantizeConfig keywords; the first is the default. axis=1 (groups
# along the input dimension) is HQQ's recommended layout; axis=0 is the one its
# CUDA ATen/torchao kernels want.
VARIANTS = {
    "4bit-g64": {"nbits": 4, "group_size": 64, "axis": 1},
    "4bit-g64-axis0": {"nbits": 4, "group_size": 64, "axis": 0},
    "3bit-g64": {"nbits": 3, "group_size": 64, "axis": 1},
    "2bit-g32": {"nbits": 2, "group_size": 32, "axis": 1},
    "8bit-g128": {"nbits": 8, "group_size": 128, "axis": 1},
}


@hookimpl
def quantplug_backend_info():
    return BackendInfo(
        name=NAME,
        requires=(REQUIREMENT,),
        devices=("cpu", "cuda"),
        # "zeros": HQQ keeps float zero points per group, so a QALoRA adapter folds in exactly
        merge_modes=("requantize", "dense", "zeros"),
        variants=tuple(VARIANTS),
        dora=True,
        mixed_batch=True,
        # HQQLinear's default PyTorch backend (autograd.Function over unpack +
        # matmul) traces with fullgraph=True on CPU, forward and backward (tested).
        compile_safe=True,
        # fully_shard shards W_q (a uint8/int32 Parameter) and runs forward and
        # backward correctly (tested, 2 ranks, gloo, CPU); scale/zero/bias are plain
        # tensors in HQQLinear.meta and stay replicated on every rank.
        shardable=True,
        limits={
            "cuda": "tested on CPU only; HQQ's CUDA backends (ATen, torchao/gemlite/bitblas/marlin layers) "
            "are not exercised, and their converted layers are not claimed",
            "shardable": "partial: FSDP2 shards W_q only; scale, zero and bias stay replicated (plain tensors "
            "in HQQLinear.meta), and HQQLinear.to() is a no-op, so build layers on their final device",
            "zeros": "partial: axis=1 layers (groups along the input, HQQ's default) only; an axis=0 group is a "
            "strided run of the weight that a QALoRA update is not constant over",
        },
    )


def is_hqq_layer(module) -> bool:
    """Whether ``module`` is an ``HQQLinear`` (or a subclass), without importing hqq."""
    if "hqq" not in sys.modules:
        return False  # no HQQ layer can exist before hqq is imported
    return any(
        cls.__name__ in LAYER_CLASSES and cls.__module__.startswith("hqq.") for cls in type(module).__mro__
    )


@hookimpl
def quantplug_detect_layer(module):
    # The layer's class decides; model hints (model.hqq_quantized,
    # config.quantization_config.quant_method == "hqq") add nothing: a model
    # quantized by hqq keeps plain nn.Linear for the layers it skipped.
    return NAME if is_hqq_layer(module) else None


@hookimpl
def quantplug_compute_dtype(module):
    return getattr(module, "compute_dtype", None)


@hookimpl
def quantplug_dequantize(module):
    from quantplug_hqq import layers

    return layers.dequantize(module)


@hookimpl
def quantplug_requantize(module, weight):
    from quantplug_hqq import layers

    return layers.requantize(module, weight)


@hookimpl
def quantplug_group_size(module):
    from quantplug_hqq import layers

    return layers.group_size(module)


@hookimpl
def quantplug_fold_into_zeros(module, offsets):
    from quantplug_hqq import layers

    return layers.fold_into_zeros(module, offsets)


@hookimpl
def quantplug_quantize(linear, variant):
    from quantplug_hqq import layers

    return layers.quantize(linear, variant)


@hookimpl
def quantplug_register_kernels(register):
    # fused 4-bit (axis=1) dequant-GEMV + LoRA for 1-16 tokens on CUDA, reading the layer's own storage
    # (quantplug_hqq._cuda_kernels); nothing registered without Triton and a CUDA device
    register_fused_lora(register, "quantplug_hqq._cuda_kernels", name="triton-hqq4-lora", backend=NAME)
