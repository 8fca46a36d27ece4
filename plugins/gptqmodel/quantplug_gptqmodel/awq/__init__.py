"""quantplug backend for AWQ layers: gptqmodel's (``AwqTorchLinear``, ``TorchAtenAwqLinear``, ...) and AutoAWQ's.

Importing this module imports neither torch nor gptqmodel (gptqmodel takes
about 8 s to import); the hooks import them when the core calls them on a
layer this plugin claimed. Layers are recognised by class names along their
MRO, so detection imports nothing.
"""

from __future__ import annotations

from quantplug import BackendInfo, Requirement, hookimpl
from quantplug.plugin import register_fused_lora

from quantplug_gptqmodel._classes import GPTQMODEL_RANGE

NAME = "awq"

# 7.0.0 renamed the kernel this plugin builds (AwqTorchQuantLinear -> AwqTorchLinear); its pack() and
# dequantize_gemm read the same from v7.0.0 (4-bit only) to 7.6.0 (2-8 bits). The range is the one
# the nox matrix proves (docs/compatibility.md), shared with the gptq backend.
REQUIREMENT = Requirement("gptqmodel", GPTQMODEL_RANGE, module="gptqmodel")


@hookimpl
def quantplug_backend_info():
    from quantplug_gptqmodel.awq._detect import VARIANTS

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
            "shardable": "AWQ weights are packed int32 buffers (qweight/qzeros/scales), which FSDP2 does not shard",
            "requantize": (
                "requantize builds the GEMM-layout kernels (AwqTorchLinear, TorchFusedAwqLinear, TorchAtenAwqLinear, "
                "AwqGEMMLinear, AutoAWQ's WQLinear_GEMM) and TorchInt8AwqLinear; GEMV/Marlin/ExLlama AWQ kernels "
                "raise NotImplementedError: merge them with mode='dense'"
            ),
            "calibration": "quantplug_quantize is AWQ's quantizer without activation scales (no calibration data)",
            "quantize": (
                "partial: bits other than 4 need a gptqmodel whose AwqTorchLinear packs them (SUPPORTS_BITS: "
                "2-8 from 7.6 on, 4 only before); on an older one qp.quantize raises for them"
            ),
            "cuda": (
                "4-bit GEMM-layout layers (AwqTorchLinear, WQLinear_GEMM) at 1-16 tokens run this plugin's fused "
                "Triton kernel (tested on an H100); other CUDA kernels are read through their own forward on an identity "
                "matrix"
            ),
            "zeros": (
                "partial: sym=False layers in the GEMM layout only; the zero points are integers, so each group "
                "keeps the multiple of its scale nearest to the adapter's update. sym=True layers have no zero "
                "points to move"
            ),
            "training": (
                "the input's gradient goes through dequantize + F.linear; inference uses the layer's own kernel in "
                "its own dtype"
            ),
        },
    )


@hookimpl
def quantplug_detect_layer(module):
    from quantplug_gptqmodel.awq._detect import is_awq_layer

    return NAME if is_awq_layer(module) else None


@hookimpl
def quantplug_compute_dtype(module):
    from quantplug_gptqmodel.awq import _layers

    return _layers.compute_dtype(module)


@hookimpl
def quantplug_wrap_layer(module):
    from quantplug_gptqmodel.awq.lora import AwqLoraLayer

    return AwqLoraLayer(module, NAME)


@hookimpl
def quantplug_dequantize(module):
    from quantplug_gptqmodel.awq import _layers

    return _layers.dequantize(module)


@hookimpl
def quantplug_requantize(module, weight):
    from quantplug_gptqmodel.awq import _layers

    return _layers.requantize(module, weight)


@hookimpl
def quantplug_group_size(module):
    from quantplug_gptqmodel.awq import _layers

    return _layers.group_size(module)


@hookimpl
def quantplug_fold_into_zeros(module, offsets):
    from quantplug_gptqmodel.awq import _layers

    return _layers.fold_into_zeros(module, offsets)


@hookimpl
def quantplug_quantize(linear, variant):
    from quantplug_gptqmodel.awq import _layers

    return _layers.quantize(linear, variant)


@hookimpl
def quantplug_register_kernels(register):
    # fused 4-bit GEMV + LoRA for 1-16 tokens on CUDA, reading the GEMM layout's own storage
    # (quantplug_gptqmodel/awq/_cuda_kernels.py); nothing registered without Triton and a CUDA device
    register_fused_lora(
        register, "quantplug_gptqmodel.awq._cuda_kernels", name="triton-awq4-lora", backend=NAME
    )
