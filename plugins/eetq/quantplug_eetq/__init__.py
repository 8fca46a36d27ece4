"""quantplug backend for EETQ: int8 per-channel weight-only layers with CUTLASS kernels.

Claims ``eetq.EetqLinear`` and ``eetq.W8A16Linear`` (NetEase-FuXi/EETQ) and
transformers' ``transformers.integrations.eetq.EetqLinear``; on a model that
transformers marked ``quantization_method == "eetq"`` also any layer with
EETQ's tensors (an int8 ``(in, out)`` weight and fp16 ``weight_scales``).

Importing this module imports neither torch nor EETQ. EETQ keeps its weight
pre-processed for its GEMM (rows permuted, values offset and interleaved, in
a layout that depends on the GPU's architecture), so this plugin never reads
that storage: it dequantizes through the layer's own forward on an identity
matrix and requantizes through EETQ's own quantize-and-preprocess op.
"""

from __future__ import annotations

import sys

from quantplug import BackendInfo, Requirement, hookimpl

NAME = "eetq"
# 1.0.0 (tag 2024-04-19) and 1.0.1 (git main, 2024-12 to 2025-02) have the same ops
# (quant_weights, preprocess_weights, w8_a16_gemm) and layer buffers (weight or qweight,
# weight_scales, bias); 1.0.1 only gave EetqLinear a backward pass, which this plugin does
# not rely on. Run on 1.0.1 (git 465e972) only; a 1.1 may change the layout or the ops.
SPECIFIER = ">=1.0,<1.1"
REPO = "https://github.com/NetEase-FuXi/EETQ"


def install_line() -> str:
    """The fix ``quantplug doctor`` prints when EETQ is missing: honest about wheels."""
    build = f"pip install --no-build-isolation 'eetq @ git+{REPO}.git'"
    if sys.version_info[:2] == (3, 10):
        return f"pip install 'eetq{SPECIFIER}' (EETQ 1.0.0, a CPython 3.10 CUDA wheel), or {build}"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return (
        f"{build} (no EETQ wheel for Python {version}: this builds it from source with nvcc on a CUDA "
        "machine; for CUDA 13 or sm_90 see docs/backends.md#eetq)"
    )


REQUIREMENT = Requirement("eetq", SPECIFIER, module="eetq", pip=install_line())
# class name -> name of its int8 weight buffer
LAYER_CLASSES = {"EetqLinear": "weight", "W8A16Linear": "qweight"}
VARIANTS = ("int8", "int8-w8a16")


@hookimpl
def quantplug_backend_info():
    return BackendInfo(
        name=NAME,
        requires=(REQUIREMENT,),
        devices=("cuda",),
        merge_modes=("requantize", "dense"),
        variants=VARIANTS,
        dora=True,
        mixed_batch=True,
        compile_safe=False,
        shardable=False,
        limits={
            "zeros": "EETQ is symmetric per-channel int8: it has no zero points to fold a QALoRA adapter into",
            "cpu": "EETQ's kernels are CUDA-only (fp16 activations); CI covers this plugin on a stand-in layer",
            "compile_safe": "EETQ's w8_a16_gemm is a pybind11 function, not a torch op: dynamo cannot trace "
            "it, so torch.compile(fullgraph=True) fails on the base layer",
            "shardable": "EETQ's int8 weight is stored permuted and interleaved for its GEMM tiles (per GPU "
            "architecture); a row shard of it is not a valid EETQ weight",
            "sm_90": "EETQ 1.0.1 refuses sm_90 and newer ('Unsupported Arch'); it runs on Hopper only from a "
            "build changed as docs/backends.md#eetq says (tested on an H100)",
        },
    )


def _packed_name(module) -> str | None:
    """The name of EETQ's int8 weight on ``module`` if it is an EETQ layer class, else None."""
    for cls in type(module).__mro__:
        name = LAYER_CLASSES.get(cls.__name__)
        if name == "qweight" and not cls.__module__.startswith("eetq"):
            continue  # W8A16Linear is a common name: only EETQ's own
        if name is not None:
            return name
    return None


def _has_eetq_tensors(module, name: str) -> bool:
    import torch

    weight = getattr(module, name, None)
    scales = getattr(module, "weight_scales", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dtype == torch.int8
        and weight.dim() == 2
        and isinstance(scales, torch.Tensor)
    )


def _model_says_eetq(model) -> bool:
    if model is None:
        return False
    if str(getattr(model, "quantization_method", "") or "").lower().endswith("eetq"):
        return True
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(method or "").lower().endswith("eetq")


def packed_weight_name(module, model=None) -> str | None:
    """``"weight"`` or ``"qweight"`` if ``module`` is an EETQ layer, else None; imports nothing new."""
    if "torch" not in sys.modules:
        return None  # no layer can exist before torch is imported
    import torch

    if type(module) is torch.nn.Linear:
        return None
    name = _packed_name(module)
    if name is not None:
        return name if _has_eetq_tensors(module, name) else None
    # transformers marks the model; a layer class of another build of EETQ (a fork, the kernels hub)
    # still holds EETQ's tensors under EETQ's names
    if (
        _model_says_eetq(model)
        and not isinstance(module, torch.nn.Linear)
        and _has_eetq_tensors(module, "weight")
    ):
        return "weight"
    return None


@hookimpl
def quantplug_detect_layer(module, model):
    return NAME if packed_weight_name(module, model) is not None else None


@hookimpl
def quantplug_compute_dtype(module):
    import torch

    return torch.float16  # w8_a16_gemm reads activations and scales as fp16, whatever their dtype


@hookimpl
def quantplug_wrap_layer(module):
    from quantplug_eetq.lora import EetqLoraLayer

    return EetqLoraLayer.around(module, NAME)


@hookimpl
def quantplug_dequantize(module):
    from quantplug_eetq import layers

    return layers.dequantize(module)


@hookimpl
def quantplug_requantize(module, weight):
    from quantplug_eetq import layers

    return layers.requantize(module, weight)


@hookimpl
def quantplug_quantize(linear, variant):
    from quantplug_eetq import layers

    return layers.quantize(linear, variant)


@hookimpl
def quantplug_prepare_for_training(model):
    from quantplug_eetq import lora

    for module in model.modules():
        if packed_weight_name(module, model) is not None:
            lora.pass_input_gradient(module)
