"""quantplug backend for compressed-tensors, the format llm-compressor writes and vLLM serves.

compressed-tensors (0.15 and later) has no layer class of its own: it turns a
plain ``torch.nn.Linear`` into a quantized one by attaching a
``quantization_scheme`` (``QuantizationScheme``: weight, input and output
``QuantizationArgs``), a ``quantization_status``, the qparams
(``weight_scale``, ``weight_zero_point``, ...) as parameters, and an
instance-level ``forward`` (``set_forward_quantized``). Its old
``CompressedLinear`` raises "no longer supported" since 0.15. This plugin
claims such a linear in every state of the library's lifecycle:

- initialized / calibration / frozen: the float weight is kept and the
  forward fake-quantizes it (QDQ) on every call;
- compressed: the weight is replaced by its codes (``weight_packed`` int32 for
  ``pack-quantized``, an int8 or float8 ``weight`` for the naive, int- and
  float-quantized formats); transformers' ``from_pretrained`` loads a
  checkpoint in this state, with a model-level pre-hook that decompresses
  the whole model on its first forward;
- decompressed: the weight is the dequantized codes, the qparams stay.

Importing this module is cheap: it imports neither torch nor
compressed-tensors; the hookimpls import :mod:`quantplug_compressed_tensors.layers`
when they run.
"""

from __future__ import annotations

import sys

from quantplug import BackendInfo, Requirement, hookimpl

NAME = "compressed_tensors"
# Everything used here (compress/decompress classmethods of the registered
# compressors, get_direct_state_dict/replace_direct_state_dict,
# quantize/dequantize/forward_quantize/set_forward_quantized,
# calculate_qparams, initialize_module_for_quantization, ModelCompressor's
# compress_model(skip_compressed=)) has the same signature from 0.18.0 to
# 0.20.1 (read in each release's source); the plugin's tests pass on 0.18.0,
# 0.19.0, 0.20.0 and 0.20.1 with torch 2.13 and transformers 5.25 (CPU).
# 0.18 removed nothing the plugin needs, but was the first with
# compress_model(skip_compressed=...); older releases are untested.
SPECIFIER = ">=0.18,<0.21"
REQUIREMENT = Requirement("compressed-tensors", SPECIFIER, module="compressed_tensors")

# name -> (weights, input activations) as QuantizationArgs keywords; the first is the default.
# Group 32 rather than the presets' 128, so that the tiny test models (64 and 128 inputs) have
# several groups per row; real checkpoints use whatever their scheme says.
VARIANTS = {
    "int4-g32": (
        {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True},
        None,
    ),
    "int4-asym-g32": (
        {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": False},
        None,
    ),
    "int4-channel": ({"num_bits": 4, "type": "int", "strategy": "channel", "symmetric": True}, None),
    "int4-asym-channel": ({"num_bits": 4, "type": "int", "strategy": "channel", "symmetric": False}, None),
    "int8-channel": ({"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}, None),
    "fp8-channel": ({"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}, None),
    "fp8-tensor": ({"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True}, None),
    # the presets FP8_DYNAMIC and W8A8 (INT8): the forward also quantizes each token's activations
    "fp8-dynamic": (
        {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
        {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True},
    ),
    "w8a8": (
        {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
        {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True},
    ),
}


@hookimpl
def quantplug_backend_info():
    return BackendInfo(
        name=NAME,
        requires=(REQUIREMENT,),
        devices=("cpu",),
        # "zeros": asymmetric int layers store an integer zero point per group
        merge_modes=("requantize", "dense", "zeros"),
        variants=tuple(VARIANTS),
        dora=True,
        mixed_batch=True,
        compile_safe=False,
        shardable=False,
        limits={
            "cuda": "tested on CPU only; the layers are plain nn.Linear, so CUDA should work but is not exercised",
            "compile_safe": "compressed-tensors' forward does not trace with fullgraph=True (Dynamo: 'Failed "
            "to trace builtin operator object', from patch_attr on weight.data and the lru_cache'd "
            "calculate_range), in every state",
            "shardable": "not tested under FSDP2",
            "zeros": "partial: asymmetric int layers with group strategy only (symmetric and FP8 layers store "
            "no zero point; a channel layer has one group per row)",
            "requantize": "partial: int (1-8 bits) and FP8 weights with tensor, channel or group strategy; "
            "NVFP4/MXFP4 (global scales), block strategy and activation-ordered groups (g_idx) merge "
            "with mode='dense' only",
        },
    )


def is_ct_layer(module) -> bool:
    """Whether ``module`` is a linear that compressed-tensors quantized (weights), without importing it."""
    if "compressed_tensors" not in sys.modules:
        return False  # no scheme can be attached before compressed_tensors is imported
    scheme = module.__dict__.get("quantization_scheme")
    if scheme is None or not type(scheme).__module__.startswith("compressed_tensors."):
        return False
    if getattr(scheme, "weights", None) is None:
        return False  # activation-only quantization: the weight is a plain dense weight
    return any(
        cls.__name__ == "Linear" and cls.__module__ == "torch.nn.modules.linear"
        for cls in type(module).__mro__
    )


@hookimpl
def quantplug_detect_layer(module):
    # The attached scheme decides; the model-level config (quant_method "compressed-tensors")
    # adds nothing: layers in its `ignore` list stay plain nn.Linear.
    return NAME if is_ct_layer(module) else None


@hookimpl
def quantplug_layer_variant(module):
    from quantplug_compressed_tensors import layers

    return layers.variant(module)


@hookimpl
def quantplug_compute_dtype(module):
    from quantplug_compressed_tensors import layers

    return layers.compute_dtype(module)


@hookimpl
def quantplug_wrap_layer(module):
    from quantplug_compressed_tensors import layers

    return layers.CompressedTensorsLoraLayer(module, NAME)


@hookimpl
def quantplug_prepare_for_training(model):
    from quantplug_compressed_tensors import layers

    layers.prepare_for_training(model)


@hookimpl
def quantplug_dequantize(module):
    from quantplug_compressed_tensors import layers

    return layers.dequantize(module)


@hookimpl
def quantplug_requantize(module, weight):
    from quantplug_compressed_tensors import layers

    return layers.requantize(module, weight)


@hookimpl
def quantplug_group_size(module):
    from quantplug_compressed_tensors import layers

    return layers.group_size(module)


@hookimpl
def quantplug_fold_into_zeros(module, offsets):
    from quantplug_compressed_tensors import layers

    return layers.fold_into_zeros(module, offsets)


@hookimpl
def quantplug_quantize(linear, variant):
    from quantplug_compressed_tensors import layers

    return layers.quantize(linear, variant)
