"""The bitsandbytes primitives behind the hooks: dequantize, requantize, quantize.

Imported only when a hook needs it (it imports torch; bitsandbytes itself is
imported inside the functions), so ``import quantplug_bnb`` stays light.

Two states of a ``Linear4bit`` matter on CPU, and this module handles both
without changing the layer:

- as quantized: ``weight`` is the packed 4-bit stream, ``quant_state.absmax``
  float32 (or 8-bit "nested" with ``state2`` when ``compress_statistics``),
  and ``bitsandbytes.functional.dequantize_4bit`` is the library's own dequant
  (its training forward is exactly ``linear(x, dequantize_4bit(...))``);
- repacked: bitsandbytes >= 0.49 rewrites the layer in place on its first
  CPU inference forward when the CPU has AVX512-BF16
  (``_convert_weight_packed_for_cpu``, flagged by
  ``quant_state.packing_format_for_cpu``): weight becomes an ``(N, K/2)``
  nibble-interleaved uint8 tensor, absmax is un-nested, cast to bf16 and
  transposed to ``(K/blocksize, N)``, and the fused kernel computes
  ``bf16(code) * bf16(absmax)`` in bf16. The original fp32 absmax is gone
  for good; ``dequantize_4bit`` on that storage returns garbage (max abs
  error 0.18 on a 64x128 layer, measured with bitsandbytes 0.50.2), so
  :func:`dequantize_4bit` undoes the layout itself and reproduces the
  kernel's arithmetic bit for bit (checked against the layer's own forward
  on an identity matrix in the tests).
"""

from __future__ import annotations

import torch
from torch import nn

LINEAR_4BIT = "Linear4bit"
LINEAR_8BIT = "Linear8bitLt"
KINDS = (LINEAR_4BIT, LINEAR_8BIT)

# bitsandbytes' `_convert_weight_packed_for_cpu` default (0.49.0 - 0.50.2)
_CPU_BLOCK_N = 32


def bnb_kind(module: nn.Module) -> str | None:
    """``"Linear4bit"`` / ``"Linear8bitLt"`` if ``module`` is (a subclass of) that bitsandbytes class.

    By class name and module path along the MRO, so nothing is imported and
    PEFT's own ``peft.tuners.lora.bnb.Linear4bit`` wrapper is not mistaken for one.
    """
    for cls in type(module).__mro__:
        if cls.__name__ in KINDS and cls.__module__.split(".", 1)[0] == "bitsandbytes":
            return cls.__name__
    return None


# --------------------------------------------------------------------------
# 4-bit
# --------------------------------------------------------------------------


def _state_or_none(module: nn.Module):
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)  # FSDP2: only the module's


def quant_state(module: nn.Module):
    state = _state_or_none(module)
    if state is None:
        raise ValueError(
            f"{type(module).__name__}({module.in_features}, {module.out_features}) is not quantized yet: "
            "bitsandbytes quantizes a Linear4bit when it is moved to a device (layer.to('cpu') or .cuda())"
        )
    return state


def owns_weight(module: nn.Module) -> bool:
    """Whether the layer's weight is still bitsandbytes' own ``Params4bit`` carrying its quant_state.

    Not so while FSDP2 runs the layer: it swaps in a plain all-gathered
    parameter, and bitsandbytes re-wraps it from ``module.quant_state``
    (``fix_4bit_weight_quant_state_from_module``).
    """
    return getattr(module.weight, "quant_state", None) is not None


def _check_not_sharded(module: nn.Module) -> None:
    if type(module.weight.data).__name__ == "DTensor":
        raise ValueError(
            f"the weight of this {type(module).__name__} is sharded (FSDP2 DTensor); dequantize and merge need "
            "the whole weight: merge before fully_shard, or gather the full model first"
        )


def is_cpu_packed(module: nn.Module) -> bool:
    """Whether bitsandbytes repacked this Linear4bit for its AVX512-BF16 CPU kernel (see module doc)."""
    state = getattr(module.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_trainable_on_cpu(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repack and keep the layer off it from now on.

    The repacked layout runs ``gemv_4bit``, which has no backward, so a layer
    that no adapter wraps would silently stop gradients from reaching the
    adapters below it. bitsandbytes' own inverse (what its ``.cuda()`` and
    ``state_dict()`` call) restores the trainable layout; clearing
    ``support_avx512bf16_for_cpu`` stops the next eval forward from repacking.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    if is_cpu_packed(module):
        weight = module.weight
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )
        module.quant_state = weight.quant_state
    module.support_avx512bf16_for_cpu = False


def original_format(module: nn.Module) -> dict:
    """The format the layer was quantized in, read through a CPU repack if there was one."""
    state = quant_state(module)
    packed = bool(getattr(state, "packing_format_for_cpu", False))
    weight = module.weight
    return {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "compress_statistics": bool(state.original_nested if packed else state.nested),
        # the repack views bf16 storage as uint8; the module keeps what it was built with
        "quant_storage": getattr(module, "quant_storage", None)
        or getattr(weight, "quant_storage", torch.uint8),
        # the dtype the weight had when it was quantized (dequantize_4bit's output dtype)
        "dtype": state.original_dtype if packed else state.dtype,
    }


def compute_dtype_4bit(module: nn.Module) -> torch.dtype:
    """``Linear4bit.compute_dtype``; before bitsandbytes has set one, the dtype the weight was quantized from.

    A layer built without ``compute_dtype`` takes the dtype of its first
    float32/bf16 input (``Linear4bit.set_compute_type``); the weight's
    original dtype is the model's dtype, which is what that input will be.
    """
    dtype = getattr(module, "compute_dtype", None)
    if dtype is not None:
        return dtype
    state = _state_or_none(module)
    if state is not None:
        return state.original_dtype if getattr(state, "packing_format_for_cpu", False) else state.dtype
    return module.weight.dtype if module.weight.is_floating_point() else torch.float32


def _dequantize_cpu_packed(module: nn.Module, state) -> torch.Tensor:
    """The bf16 weight the AVX512-BF16 kernel multiplies with: ``bf16(code[q]) * absmax`` in bf16.

    Reads the layout of ``_convert_weight_packed_for_cpu`` (bitsandbytes
    0.49-0.50) without changing it: for each block of 32 rows and each pair
    of columns ``(2j, 2j+1)``, the 64 codes (row-major, the two columns
    interleaved) sit in 32 bytes, the first 32 codes in the low nibbles and
    the last 32 in the high ones. absmax is stored ``(K/blocksize, N)`` in
    bf16. Each byte is decoded through a 256-entry table of value pairs (one
    embedding lookup per byte instead of a gather per nibble: about 2x
    faster on CPU).
    """
    packed = module.weight.data
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    n, k = state.shape
    if tuple(packed.shape) != (n, k // 2) or n % _CPU_BLOCK_N or k % 2 or k % state.blocksize:
        raise ValueError(
            f"unexpected CPU-packed bitsandbytes weight of shape {tuple(packed.shape)} for a {n}x{k} layer; "
            "this bitsandbytes version packs differently from 0.49-0.50"
        )
    table = state.code.to(device=packed.device, dtype=torch.bfloat16)
    byte = torch.arange(256, device=packed.device)
    pairs = torch.stack([table[byte & 0xF], table[byte >> 4]], dim=-1)  # byte -> (low, high) values
    values = nn.functional.embedding(packed.reshape(-1, _CPU_BLOCK_N).int(), pairs)  # (rows, 32, [low, high])
    # [low x32, high x32] per row of 32 bytes -> (N/32, K/2, 32, 2) -> (N, K), as the inverse does
    values = (
        values.transpose(1, 2)
        .reshape(n // _CPU_BLOCK_N, k // 2, _CPU_BLOCK_N, 2)
        .transpose(1, 2)
        .reshape(n, k)
    )
    absmax = state.absmax.to(torch.bfloat16).T  # (N, K/blocksize)
    return (values.reshape(n, k // state.blocksize, state.blocksize) * absmax.unsqueeze(-1)).reshape(n, k)


def dequantize_4bit(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``(out, in)`` weight a Linear4bit computes with now, in ``dtype`` (default: its compute dtype)."""
    import bitsandbytes.functional as F

    _check_not_sharded(module)
    state = quant_state(module)
    dtype = dtype or compute_dtype_4bit(module)
    if getattr(state, "packing_format_for_cpu", False):
        return _dequantize_cpu_packed(module, state).to(dtype)
    return F.dequantize_4bit(module.weight.data, state).to(dtype)


def _copy_bias(module: nn.Module, bias: torch.Tensor | None, device) -> None:
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone().to(device), requires_grad=bias.requires_grad)


def build_4bit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    quant_type: str,
    blocksize: int,
    compress_statistics: bool,
    quant_storage: torch.dtype,
    compute_dtype: torch.dtype | None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A new ``bitsandbytes.nn.Linear4bit`` quantized by bitsandbytes itself from ``weight``."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    device = weight.device
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=quant_storage,
        device="meta",
    )
    data = (
        weight.detach()
        .to(dtype or weight.dtype)
        .to("cpu" if device.type == "meta" else device)
        .contiguous()
        .clone()
    )
    param = bnb.nn.Params4bit(
        data,
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=quant_storage,
        module=layer,
    )
    layer.weight = param.to(data.device)  # Params4bit.to quantizes (bitsandbytes' own quantize_4bit)
    _copy_bias(layer, bias, data.device)
    return layer


def requantize_4bit(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new Linear4bit in ``module``'s original format holding ``weight``; ``module`` is not touched."""
    fmt = original_format(module)
    device = module.weight.device
    layer = build_4bit(
        weight.to(device),
        module.bias,
        quant_type=fmt["quant_type"],
        blocksize=fmt["blocksize"],
        compress_statistics=fmt["compress_statistics"],
        quant_storage=fmt["quant_storage"],
        compute_dtype=module.compute_dtype,
        dtype=fmt["dtype"],
    )
    layer.compute_type_is_set = module.compute_type_is_set
    if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes >= 0.49
        layer.support_avx512bf16_for_cpu = module.support_avx512bf16_for_cpu
    layer.train(module.training)
    return layer


def forward_4bit_dequantized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear4bit forward that changes nothing and has a backward: dequantize, then ``linear``.

    The arithmetic of bitsandbytes' own CPU training path (``matmul_4bit``
    -> ``gemm_4bit`` default: ``dequantize_4bit`` in the compute dtype, then
    ``linear``), on the weight the layer holds now, repacked or not; unlike
    ``Linear4bit.forward`` it neither repacks the weight nor casts the bias
    in place.
    """
    inp_dtype = x.dtype
    dtype = module.compute_dtype or x.dtype
    weight = dequantize_4bit(module, dtype)
    bias = None if module.bias is None else module.bias.to(dtype)
    return nn.functional.linear(x.to(dtype), weight, bias).to(inp_dtype)


# --------------------------------------------------------------------------
# 8-bit
# --------------------------------------------------------------------------


def int8_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CB, SCB)`` of a Linear8bitLt wherever they live now.

    bitsandbytes keeps them on ``weight`` until the first forward, whose
    ``init_8bit_state`` moves them to ``layer.state`` and sets ``weight.SCB``
    to None (``weight.data`` stays the int8 ``CB``).
    """
    weight = module.weight
    scb = getattr(weight, "SCB", None)
    cb = getattr(weight, "CB", None)
    state = getattr(module, "state", None)
    if scb is None and state is not None:
        scb, cb = state.SCB, state.CB
    if cb is None and weight.dtype == torch.int8:
        cb = weight.data
    if scb is None or cb is None:
        raise ValueError(
            f"{type(module).__name__}({module.in_features}, {module.out_features}) holds no int8 weight: "
            "bitsandbytes quantizes it on .to(device) when has_fp16_weights=False"
        )
    return cb, scb


def has_fp16_weights(module: nn.Module) -> bool:
    state = getattr(module, "state", None)
    return bool(getattr(state, "has_fp16_weights", False))


def compute_dtype_8bit(module: nn.Module) -> torch.dtype:
    """The dtype a Linear8bitLt's adapters live in.

    The layer has none of its own: the int8 GEMM quantizes its input through
    fp16 and returns the input's dtype, and bitsandbytes casts the bias to
    the input's dtype in place on every call. So the bias dtype (the model's
    dtype, and the last input's) when there is a bias, else float32, the
    dtype PEFT keeps 8-bit adapters in, since an int8 weight has no float
    dtype to follow; fp16 adapters would also lose small optimizer updates.
    """
    if has_fp16_weights(module) and module.weight.is_floating_point():
        return module.weight.dtype
    bias = module.bias
    if bias is not None and bias.is_floating_point():
        return bias.dtype
    return torch.float32


def dequantize_8bit(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``CB * (SCB / 127)`` exactly as bitsandbytes' own CPU training forward and backward compute it."""
    dtype = dtype or compute_dtype_8bit(module)
    if has_fp16_weights(module):
        return module.weight.detach().to(dtype).clone()
    cb, scb = int8_parts(module)
    # MatMul8bitFp / MatMul8bitLt.backward: CB.to(d).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))
    return (cb.float() * scb.float().unsqueeze(1).mul(1.0 / 127.0)).to(dtype)


def build_8bit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    threshold: float = 0.0,
    has_fp16_weights: bool = False,
    index=None,
) -> nn.Module:
    """A new ``bitsandbytes.nn.Linear8bitLt`` holding ``weight``, quantized by bitsandbytes."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    out_features, in_features = weight.shape
    device = weight.device
    layer = bnb.nn.Linear8bitLt(
        in_features,
        out_features,
        bias=bias is not None,
        has_fp16_weights=has_fp16_weights,
        threshold=threshold,
        index=index,
        device="meta",
    )
    if has_fp16_weights:
        layer.weight = bnb.nn.Int8Params(weight.detach().clone(), requires_grad=True, has_fp16_weights=True)
    else:
        # Int8Params._quantize's body; Int8Params.to() only quantizes when the data is on the CPU
        cb, scb, _ = F.int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
        if not torch.isfinite(scb).all():
            raise ValueError("weight overflows float16, which bitsandbytes quantizes int8 weights from")
        layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    _copy_bias(layer, bias, device)
    return layer


def requantize_8bit(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new Linear8bitLt like ``module`` (threshold, has_fp16_weights) holding ``weight``."""
    state = module.state
    layer = build_8bit(
        weight.to(module.weight.device),
        module.bias,
        threshold=state.threshold,
        has_fp16_weights=bool(state.has_fp16_weights),
        index=getattr(module, "index", None),
    )
    layer.train(module.training)
    return layer


# --------------------------------------------------------------------------
# quantplug_quantize
# --------------------------------------------------------------------------

VARIANTS = ("nf4", "fp4", "int8")


def quantize(linear: nn.Module, variant: str | None) -> nn.Module:
    """A bitsandbytes layer built from a plain ``nn.Linear`` with bitsandbytes' defaults.

    4-bit: blocksize 64, nested absmax (``compress_statistics=True``, as
    QLoRA and transformers' ``bnb_4bit_use_double_quant`` do), uint8
    storage, compute dtype = the linear's dtype. 8-bit: ``has_fp16_weights=False``
    and bitsandbytes' default outlier threshold 0.0 (pure int8; transformers
    defaults ``llm_int8_threshold`` to 6.0).
    """
    variant = variant or VARIANTS[0]
    if variant not in VARIANTS:
        raise ValueError(f"unknown bnb variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    weight = linear.weight.detach()
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    if variant == "int8":
        return build_8bit(weight.to(dtype), linear.bias)
    return build_4bit(
        weight.to(dtype),
        linear.bias,
        quant_type=variant,
        blocksize=64,
        compress_statistics=True,
        quant_storage=torch.uint8,
        compute_dtype=dtype,
    )
