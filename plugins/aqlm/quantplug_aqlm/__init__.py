"""quantplug backend for AQLM: LoRA on ``aqlm.QuantizedLinear`` layers.

AQLM (additive quantization of language models) stores each group of
weights as a sum of codebook vectors, indexed by integer codes, times a
scale per output group. Layers come from transformers' AQLM loader
(``quantization_config.quant_method == "aqlm"``) or are built here.

Importing this module imports neither torch nor aqlm: the work is in
:mod:`quantplug_aqlm.layout` (reading a layer in either code layout),
:mod:`quantplug_aqlm.codec` (encoding without calibration data) and
:mod:`quantplug_aqlm.lora` (the adapter layer), imported inside the hooks.
"""

from __future__ import annotations

from quantplug import BackendInfo, Requirement, hookimpl

NAME = "aqlm"

# the formats quantplug_quantize builds (codec.VARIANTS): "CxB-gG" is C codebooks of
# 2^B entries over groups of G inputs; the first is the default
VARIANTS = ("2x8-g8", "1x8-g8", "1x16-g8")


@hookimpl
def quantplug_backend_info():
    return BackendInfo(
        name=NAME,
        # Read against the aqlm git history: QuantizedLinear's constructor and
        # attributes date from 1.0.0, utils._dequantize_weight / unpack_int_data
        # and inference_kernels.dequantization.dequantize_gemm are unchanged from
        # 1.0.2 to 1.1.7, and the kernel state that tells a permuted square code
        # grid apart (gemv_op) exists from 1.1.0. Tested: 1.1.7 only (2026-11).
        # Upper bound: the in-place code permutation is marked "TODO: fix this
        # thing" upstream; a 1.2 may change the layout this plugin reads.
        requires=(Requirement("aqlm", ">=1.1.7,<1.2", module="aqlm"),),
        devices=("cpu", "cuda"),
        merge_modes=("requantize", "dense"),
        variants=VARIANTS,
        dora=True,
        mixed_batch=True,
        compile_safe=True,
        shardable=False,
        limits={
            "shardable": (
                "an AQLM layer is integer codes indexing whole codebooks; aqlm has no FSDP2 "
                "all-gather extension for them, so a sharded layer cannot run its kernels"
            ),
            "zeros": "AQLM is additive vector quantization over codebooks: it stores no per-group zero points",
        },
    )


def _hinted(model) -> bool:
    """Whether the model says it was quantized with AQLM (transformers' ``quantization_config``)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return False
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == NAME


def _aqlm_like(module) -> bool:
    """An AQLM layer by its tensors, for a vendored copy of the class in a model that says it is AQLM."""
    names = (
        "codebooks",
        "codes",
        "scales",
        "in_group_size",
        "out_group_size",
        "num_codebooks",
        "nbits_per_codebook",
    )
    return all(hasattr(module, name) for name in names)


def _claims(module) -> bool:
    from quantplug_aqlm.layout import is_aqlm_layer

    return is_aqlm_layer(module)


@hookimpl
def quantplug_detect_layer(module, model):
    if _claims(module):
        return NAME
    if model is not None and _aqlm_like(module) and _hinted(model):
        return NAME
    return None


@hookimpl
def quantplug_compute_dtype(module):
    # aqlm decodes into the codebooks' dtype and its kernels return it
    return module.codebooks.dtype


@hookimpl
def quantplug_wrap_layer(module, backend):
    from quantplug_aqlm.lora import AqlmLoraLayer

    return AqlmLoraLayer(module, backend)


@hookimpl
def quantplug_dequantize(module):
    from quantplug_aqlm import layout

    return layout.dequantize(module)


@hookimpl
def quantplug_requantize(module, weight):
    from quantplug_aqlm import codec

    return codec.requantize(module, weight)


@hookimpl
def quantplug_quantize(linear, variant):
    from quantplug_aqlm import codec

    name = variant or VARIANTS[0]
    if name not in codec.VARIANTS:
        raise ValueError(f"unknown aqlm variant {name!r}; choose one of {list(codec.VARIANTS)}")
    return codec.quantize(linear, codec.VARIANTS[name])
