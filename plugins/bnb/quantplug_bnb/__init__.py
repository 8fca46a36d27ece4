"""quantplug backend for bitsandbytes: 4-bit ``Linear4bit`` (NF4, FP4) and 8-bit ``Linear8bitLt``.

Importing this module imports neither torch nor bitsandbytes; the hooks do,
when the core calls them on a layer this plugin claimed.
"""

from __future__ import annotations

from quantplug import BackendInfo, Requirement, hookimpl
from quantplug.plugin import register_fused_lora

NAME = "bnb"

# 0.46.0 is the first release with CPU kernels for quantize_4bit/dequantize_4bit and the
# int8_vectorwise_quant API used to requantize 8-bit layers; the CPU repack this plugin
# reads (packing_format_for_cpu) is private and has the same layout from 0.49.0 to 0.50.2.
REQUIREMENT = Requirement("bitsandbytes", ">=0.50,<0.51", module="bitsandbytes")


@hookimpl
def quantplug_backend_info():
    return BackendInfo(
        name=NAME,
        requires=(REQUIREMENT,),
        devices=("cpu", "cuda"),
        merge_modes=("requantize", "dense"),
        variants=("nf4", "fp4", "int8"),
        dora=True,
        mixed_batch=True,
        # through the plugin's Bnb4bitLoraLayer (quantplug_bnb.lora), which keeps bitsandbytes' in-place
        # CPU repack out of traced and FSDP-managed calls; tested on CPU, train and eval
        compile_safe=True,
        shardable=True,
        limits={
            "shardable:int8": (
                "Linear8bitLt does not shard under FSDP2: its forward reads weight.CB, which the all-gathered "
                "plain parameter lacks (AttributeError, bitsandbytes 0.50.2); Linear4bit shards (uint8 or bf16 storage)"
            ),
            "devices:cuda": "declared from bitsandbytes' device-generic API; this plugin's tests ran on CPU only",
            "zeros": (
                "NF4/FP4 blocks and int8 rows have an absmax scale and no zero point, so a QALoRA update has "
                "nowhere to go but the codes: merge with mode='requantize' or 'dense'"
            ),
        },
    )


def _kind(module):
    from quantplug_bnb._layers import bnb_kind

    return bnb_kind(module)


@hookimpl
def quantplug_detect_layer(module):
    # Linear4bit and Linear8bitLt subclass nn.Linear: match by class, never by isinstance(nn.Linear)
    return NAME if _kind(module) is not None else None


@hookimpl
def quantplug_layer_variant(module):
    from quantplug_bnb import _layers

    if _layers.bnb_kind(module) == _layers.LINEAR_8BIT:
        return "int8"
    quant_type = getattr(module.weight, "quant_type", None)  # Params4bit knows it before quantizing
    return quant_type if quant_type in ("nf4", "fp4") else None


@hookimpl
def quantplug_compute_dtype(module):
    from quantplug_bnb import _layers

    kind = _layers.bnb_kind(module)
    if kind == _layers.LINEAR_4BIT:
        return _layers.compute_dtype_4bit(module)
    if kind == _layers.LINEAR_8BIT:
        return _layers.compute_dtype_8bit(module)
    return None


@hookimpl
def quantplug_wrap_layer(module):
    from quantplug_bnb import _layers

    if _layers.bnb_kind(module) != _layers.LINEAR_4BIT:
        return None  # the core's LoraLayer: Linear8bitLt has a backward on every path
    from quantplug_bnb.lora import Bnb4bitLoraLayer

    return Bnb4bitLoraLayer(module, NAME)


@hookimpl
def quantplug_dequantize(module):
    from quantplug_bnb import _layers

    kind = _layers.bnb_kind(module)
    if kind == _layers.LINEAR_4BIT:
        return _layers.dequantize_4bit(module)
    if kind == _layers.LINEAR_8BIT:
        return _layers.dequantize_8bit(module)
    raise TypeError(f"backend {NAME!r} cannot dequantize a {type(module).__qualname__}")


@hookimpl
def quantplug_requantize(module, weight):
    from quantplug_bnb import _layers

    kind = _layers.bnb_kind(module)
    if kind == _layers.LINEAR_4BIT:
        return _layers.requantize_4bit(module, weight)
    if kind == _layers.LINEAR_8BIT:
        return _layers.requantize_8bit(module, weight)
    raise TypeError(f"backend {NAME!r} cannot requantize a {type(module).__qualname__}")


@hookimpl
def quantplug_quantize(linear, variant):
    from quantplug_bnb import _layers

    return _layers.quantize(linear, variant)


@hookimpl
def quantplug_prepare_for_training(model):
    # Every Linear4bit, wrapped or not, must carry gradients: bitsandbytes' CPU inference
    # repack (first eval forward, AVX512-BF16 CPUs) leaves a kernel with no backward.
    from quantplug_bnb import _layers

    for module in model.modules():
        if _kind(module) == "Linear4bit":
            _layers.keep_trainable_on_cpu(module)


@hookimpl
def quantplug_register_kernels(register):
    # fused 4-bit (NF4/FP4) dequant-GEMV + LoRA for 1-16 tokens on CUDA, reading the layer's own storage
    # (quantplug_bnb._cuda_kernels); nothing registered without Triton and a CUDA device, nor while its
    # SERVE is off: doctor then shows the reference
    register_fused_lora(register, "quantplug_bnb._cuda_kernels", name="triton-nf4-lora", backend=NAME)
