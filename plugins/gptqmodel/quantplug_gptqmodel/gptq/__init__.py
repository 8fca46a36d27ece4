"""quantplug backend for GPTQ layers built by gptqmodel (``TorchLinear``, ``TorchAtenLinear``, Marlin, ...).

Importing this module imports neither torch nor gptqmodel (gptqmodel takes
about 8 s to import); the hooks import them when the core calls them on a
layer this plugin claimed. Layers are recognised by class names along their
MRO, so detection never imports gptqmodel either.
"""

from __future__ import annotations

from quantplug import BackendInfo, Requirement, hookimpl
from quantplug.plugin import register_fused_lora

from quantplug_gptqmodel._classes import GPTQMODEL_RANGE

NAME = "gptq"

# 7.0.0 renamed the kernels this plugin builds (TorchQuantLinear -> TorchLinear); the calls it makes
# (PackableQuantLinear.dequantize_weight, pack_original, quantizer.Quantizer) read the same in the
# v7.0.0 and v7.3.4 tags. The range is the one the nox matrix proves (docs/compatibility.md), shared
# with the awq backend: quantplug_gptqmodel/_classes.py.
REQUIREMENT = Requirement("gptqmodel", GPTQMODEL_RANGE, module="gptqmodel")


@hookimpl
def quantplug_backend_info():
    from quantplug_gptqmodel.gptq._detect import VARIANTS

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
            "shardable": "GPTQ weights are packed int32 buffers (qweight/qzeros/scales), which FSDP2 does not shard",
            "requantize": (
                "requantize builds the torch kernels (TorchLinear, TorchFusedLinear, TorchAtenLinear, "
                "TorchInt8Linear); a CUDA kernel without a CPU packer (Marlin, ExLlamaV2, Machete, BitBLAS) "
                "raises NotImplementedError: merge it with mode='dense'"
            ),
            "cuda": (
                "packed 4-bit layers (TorchLinear, TritonV2Linear) at 1-16 tokens run this plugin's fused Triton "
                "kernel (tested on an H100); kernels that repack the weight (Marlin, ExLlama, ...) are read "
                "through their own forward on an identity matrix and were not run on a GPU"
            ),
            "zeros": (
                "partial: sym=False layers in the packed torch layout (2/4/8 bits, no act-order) only; the zero "
                "points are integers, so each group keeps the multiple of its scale nearest to the adapter's "
                "update. sym=True layers have no zero points to move (Marlin/ExLlama ignore qzeros for them)"
            ),
            "training": (
                "the input's gradient goes through dequantize + F.linear (TorchFusedLinear/TorchAtenLinear drop it "
                "after their first inference forward, TorchInt8Linear/ExLlama/Marlin have no training mode); "
                "inference uses the layer's own kernel"
            ),
        },
    )


@hookimpl
def quantplug_detect_layer(module):
    from quantplug_gptqmodel.gptq._detect import is_gptq_layer

    return NAME if is_gptq_layer(module) else None


@hookimpl
def quantplug_compute_dtype(module):
    from quantplug_gptqmodel.gptq import _layers

    return _layers.compute_dtype(module)


@hookimpl
def quantplug_wrap_layer(module):
    from quantplug_gptqmodel.gptq import _layers
    from quantplug_gptqmodel.gptq.lora import GptqLoraLayer

    # the group order checked now, eagerly: the fused kernel may first meet the layer under CUDA-graph capture
    _layers.group_size(module)
    return GptqLoraLayer(module, NAME)


@hookimpl
def quantplug_dequantize(module):
    from quantplug_gptqmodel.gptq import _layers

    return _layers.dequantize(module)


@hookimpl
def quantplug_requantize(module, weight):
    from quantplug_gptqmodel.gptq import _layers

    return _layers.requantize(module, weight)


@hookimpl
def quantplug_group_size(module):
    from quantplug_gptqmodel.gptq import _layers

    return _layers.group_size(module)


@hookimpl
def quantplug_fold_into_zeros(module, offsets):
    from quantplug_gptqmodel.gptq import _layers

    return _layers.fold_into_zeros(module, offsets)


@hookimpl
def quantplug_quantize(linear, variant):
    from quantplug_gptqmodel.gptq import _layers

    return _layers.quantize(linear, variant)


@hookimpl
def quantplug_register_kernels(register):
    # fused 4-bit GEMV + LoRA for 1-16 tokens on CUDA, reading the packed layers' own storage
    # (quantplug_gptqmodel/gptq/_cuda_kernels.py); nothing registered without Triton and a CUDA device
    register_fused_lora(
        register, "quantplug_gptqmodel.gptq._cuda_kernels", name="triton-gptq4-lora", backend=NAME
    )
