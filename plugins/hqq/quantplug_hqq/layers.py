"""Reading, rebuilding and building ``HQQLinear`` layers (imports torch and hqq).

Facts about hqq 0.2.8.post1 this module works around, each tested in
``tests/test_hqq.py``:

- ``HQQLinear`` cannot be deep-copied when built from a trainable
  ``nn.Linear``: its ``bias`` is ``linear.bias.clone()``, a non-leaf tensor
  with a grad_fn; and quantizing again into an existing layer fails
  (``W_q`` is already a Parameter). So requantize always builds a new layer.
- ``HQQLinear(linear, ...)`` (and ``from_weights``) sets the source linear's
  ``weight`` and ``bias`` to ``None`` (``del_orig=True``); ``quantize`` here
  hands hqq a private copy, so the caller's linear stays whole.
- Quantizing an HQQ-dequantized weight afresh is not idempotent: HQQ's
  optimiser picks a new scale/zero for the already-rounded values (at 4-bit
  g64 the base moves by ~1.9% of ‖W‖, five times a typical adapter). PEFT's
  HQQ merge (and its unmerge) does exactly that, and also drops the bias.
- The scale, zero and bias are plain tensors (``meta`` dict, attribute), not
  parameters or buffers: ``.to()``/``.cpu()`` are no-ops and FSDP2 shards
  only ``W_q``; outside the forward a sharded ``W_q`` is a DTensor, which
  ``HQQLinear.dequantize`` cannot unpack.
"""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import torch
from torch import nn

from quantplug_hqq import NAME, VARIANTS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# meta keys of the layouts hqq <0.2.2 built by default (quantized scale/zero)
# and of offload_meta (CUDA only): kept as they are by the library's own requantize
LEGACY_META = ("zero_q", "scale_q", "zero_scale", "meta_zero", "meta_scale")


def _hqq_linear():
    from hqq.core.quantize import HQQLinear

    return HQQLinear


def _check_ready(module: nn.Module) -> None:
    if getattr(module, "W_q", None) is None or getattr(module, "meta", None) is None:
        raise ValueError(
            f"{type(module).__name__} holds no quantized weight yet (W_q/meta is None): load or quantize it first"
        )


# -- dequantize -----------------------------------------------------------------


def dequantize(module: nn.Module) -> torch.Tensor:
    """The layer's dense ``(out, in)`` weight in its compute dtype, by ``HQQLinear.dequantize``.

    HQQLinear's forward is ``x @ dequantize().T + bias`` (every PyTorch
    backend), and nothing is repacked after a forward, so this is exact. On
    CUDA a 4-bit ``axis=1`` layer is dequantized by this plugin's Triton
    kernel in one launch, bit for bit the library's (hqq's PyTorch backend
    takes several elementwise launches; the lean training backward calls
    this once per layer and step). A
    ``W_q`` sharded by FSDP2 (a DTensor, outside the forward) is gathered
    first and the library's own method runs on the full tensor.
    """
    _check_ready(module)
    with torch.no_grad():
        W_q = module.W_q
        gather = getattr(W_q, "full_tensor", None)
        if gather is None:
            fast = _kernel_dequantize(module) if W_q.is_cuda else None
            return module.dequantize() if fast is None else fast
        # HQQLinear.dequantize reads only ready, W_q and meta (0.2.3 to 0.2.8.post1)
        view = SimpleNamespace(ready=module.ready, W_q=gather(), meta=module.meta)
        return type(module).dequantize(view)


def _kernel_dequantize(module: nn.Module) -> torch.Tensor | None:
    """The same weight from this plugin's one-launch Triton kernel (4-bit, ``axis=1``; bit for bit
    hqq's, tested on the GPU), or None where it does not apply or Triton cannot load."""
    kernels = _cuda_kernels()
    return None if kernels is None else kernels.dequantize(module)


@functools.cache
def _cuda_kernels():
    try:
        from quantplug_hqq import _cuda_kernels
    except Exception:  # no Triton, or one that cannot build for this torch: the library's dequantize serves
        return None
    return _cuda_kernels


# -- requantize -----------------------------------------------------------------


def _is_legacy(module: nn.Module) -> bool:
    meta = module.meta
    return bool(meta.get("quant_zero") or meta.get("quant_scale")) or any(k in meta for k in LEGACY_META)


def _copy_bias(module: nn.Module):
    bias = getattr(module, "bias", None)
    if bias is None:
        return None
    if isinstance(bias, nn.Parameter):
        return nn.Parameter(bias.detach().clone(), requires_grad=False)
    return bias.detach().clone()


def _empty_like(module: nn.Module) -> nn.Module:
    """A new, uninitialised layer of ``module``'s class with its quant config, dtype and device."""
    config = {**copy.deepcopy(module.quant_config), "offload_meta": module.offload_meta}
    return type(module)(
        None,
        config,
        compute_dtype=module.compute_dtype,
        device=module.device,
        initialize=False,
    )


def _grouped(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``weight`` in float32, reshaped into HQQ's groups (as ``Quantizer.quantize`` does)."""
    meta, params = module.meta, module.quant_config["weight_quant_params"]
    W = weight.detach().float()
    group_size = meta["group_size"]
    if group_size is None or not params.get("channel_wise", True):
        return W
    return W.reshape([-1, group_size]) if meta["axis"] == 1 else W.reshape([group_size, -1])


def _nearest_codes(grouped, scale, zero, dtype, high):
    """Codes whose HQQ dequantization (in ``dtype``) is nearest to ``grouped``, per element.

    ``round(W / scale + zero)`` (HQQ's rounding, in float32) is one code off
    where the library's low-precision arithmetic rounds ``codes - zero``
    (bf16 at 8 bits: spacing 1 near 128); checking the neighbours makes
    requantizing the layer's own weight exact.
    """
    start = torch.round(grouped / scale.float() + zero.float())
    best = best_err = None
    for shift in (0.0, -1.0, 1.0):
        codes = (start + shift).clamp_(0, high)
        err = ((codes.to(dtype) - zero) * scale).float().sub_(grouped).abs_()
        if best is None:
            best, best_err = codes, err
        else:
            closer = err < best_err
            best, best_err = torch.where(closer, codes, best), torch.where(closer, err, best_err)
    return best


def _group_error(codes, scale, zero, grouped, dtype, axis, per_group):
    """Squared error per group of HQQ's own dequantization ``(codes - zero) * scale`` in ``dtype``."""
    err = ((codes.to(dtype) - zero) * scale).float().sub_(grouped).square_()
    return err.sum(dim=axis, keepdim=True) if per_group else err.sum()


def requantize(module: nn.Module, weight: torch.Tensor, strategy: str = "best") -> nn.Module:
    """A new ``HQQLinear`` in ``module``'s format (bits, group size, axis, packing,
    quant config, compute dtype, device) holding ``weight``, with ``module``'s bias.

    :param strategy: how each group's scale/zero is chosen:

        - ``"keep"``: the group keeps its scale and zero; only the codes change
          (the nearest code to each element under HQQ's dequantization). Exact when
          ``weight`` is the layer's own dequantized weight, and never further
          from ``weight`` than the layer was, element by element.
        - ``"fresh"``: HQQ quantizes ``weight`` anew (``Quantizer.quantize``
          with the layer's settings, as PEFT's merge does): new scale/zero.
        - ``"best"`` (default): per group, whichever of the two is closer to
          ``weight``. At least as good as both; the format is unchanged.

    Layers in the legacy layouts (quantized scale/zero from hqq <0.2.2, or
    offload_meta) always go through the library's own ``HQQLinear.quantize``
    with their config, which keeps that layout.
    ``module`` is left untouched.
    """
    from hqq.core.quantize import Quantizer

    if strategy not in ("best", "keep", "fresh"):
        raise ValueError(f"unknown strategy {strategy!r}; choose 'best', 'keep' or 'fresh'")
    _check_ready(module)
    meta = module.meta
    if tuple(weight.shape) != tuple(meta["shape"]):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, the layer holds {tuple(meta['shape'])}")
    device = module.W_q.device
    target = weight.detach().to(device)
    new = _empty_like(module)
    if _is_legacy(module):
        config = copy.deepcopy(module.quant_config)
        new.quantize(target.clone(), **config)
        new.bias = _copy_bias(module)
        return new

    dtype = module.compute_dtype
    axis, nbits = meta["axis"], meta["nbits"]
    params = module.quant_config["weight_quant_params"]
    per_group = meta["group_size"] is not None and params.get("channel_wise", True)
    grouped = _grouped(target, module)
    high = round(2**nbits - 1)  # as Quantizer.quantize
    scale, zero = meta["scale"], meta["zero"]
    codes = _nearest_codes(grouped, scale, zero, dtype, high)
    if strategy != "keep":
        fresh_codes, fresh = Quantizer.quantize(
            target.clone(), device=device, compute_dtype=dtype, bitpack=False, **params
        )
        fresh_codes = fresh_codes.float().reshape(codes.shape)
        fresh_scale, fresh_zero = fresh["scale"].to(dtype), fresh["zero"].to(dtype)
        if strategy == "fresh":
            codes, scale, zero = fresh_codes, fresh_scale, fresh_zero
        else:
            kept = _group_error(codes, scale, zero, grouped, dtype, axis, per_group)
            renewed = _group_error(fresh_codes, fresh_scale, fresh_zero, grouped, dtype, axis, per_group)
            pick = renewed < kept
            codes = torch.where(pick, fresh_codes, codes)
            scale = torch.where(pick, fresh_scale, scale)
            zero = torch.where(pick, fresh_zero, zero)

    if meta["packing"]:
        W_q = Quantizer.pack[meta["packing"]](codes)
        if meta["view_as_float"]:
            W_q = W_q.view(dtype)
    else:
        W_q = codes.to(module.W_q.dtype)
    return _assemble(module, new, W_q, scale, zero)


def _assemble(module: nn.Module, new: nn.Module, W_q: torch.Tensor, scale, zero) -> nn.Module:
    """Fill the empty layer ``new`` with ``W_q``, ``scale``, ``zero`` and the rest of ``module``'s meta and bias."""
    new.meta = {
        key: value.detach().clone() if isinstance(value, torch.Tensor) else copy.copy(value)
        for key, value in module.meta.items()
    }
    new.meta["scale"], new.meta["zero"] = scale.contiguous(), zero.contiguous()
    new.W_q = W_q
    new.in_features, new.out_features = module.in_features, module.out_features
    new.bias = _copy_bias(module)
    new.cuda(module.device)  # what HQQLinear.quantize ends with: dtypes, device, W_q as a Parameter
    new.ready = True
    return new


# -- QALoRA: group size and the zeros merge ----------------------------------------


def group_size(module: nn.Module) -> int | None:
    """The input-dimension group of an ``axis=1`` layer (HQQ's default); ``None`` for ``axis=0``,
    where a group is a strided run of the flattened weight, and for one group per row."""
    meta = getattr(module, "meta", None)
    if meta is None or _is_legacy(module):
        return None
    group, in_features = meta.get("group_size"), int(module.in_features)
    params = module.quant_config["weight_quant_params"]
    if meta.get("axis") != 1 or not group or not params.get("channel_wise", True):
        return None
    return int(group) if group < in_features and in_features % group == 0 else None


def fold_into_zeros(module: nn.Module, offsets: torch.Tensor) -> nn.Module:
    """A new ``HQQLinear`` with ``module``'s ``W_q`` bit for bit and ``zero - offsets / scale`` as zero points.

    HQQ dequantizes ``(W_q - zero) * scale`` per group with ``zero`` a float
    tensor in the compute dtype, so the move is exact up to that dtype's
    rounding of the new zero point. ``axis=1`` groups are rows of the
    weight reshaped to ``(-1, group_size)``: row ``o * in / g + k`` is group
    ``k`` of output row ``o``. A group whose scale is 0 cannot move.
    """
    _check_ready(module)
    if group_size(module) is None:
        raise ValueError(
            f"this HQQLinear has no zero points per input group (axis={module.meta.get('axis')}, "
            f"group_size={module.meta.get('group_size')}, legacy quantized zero: {_is_legacy(module)})"
        )
    meta = module.meta
    scale, zero = meta["scale"], meta["zero"]
    shift = offsets.detach().to(device=zero.device, dtype=torch.float32).reshape(zero.shape)
    moved = zero.float() - shift / torch.where(scale == 0, 1.0, scale.float())
    new_zero = torch.where(scale == 0, zero.float(), moved).to(zero.dtype)
    return _assemble(
        module, _empty_like(module), module.W_q.detach().clone(), scale.detach().clone(), new_zero
    )


# -- quantize -------------------------------------------------------------------


def quantize(linear: nn.Module, variant: str | None = None) -> nn.Module:
    """An ``HQQLinear`` for ``linear`` in ``variant`` (round-to-nearest plus HQQ's
    zero-point optimisation, no calibration data), computing in the linear's
    dtype (float32 unless it is bf16/fp16), on its device. ``linear`` is left whole.
    """
    from hqq.core.quantize import BaseQuantizeConfig

    variant = variant or next(iter(VARIANTS))
    if variant not in VARIANTS:
        raise ValueError(f"unknown {NAME} variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    settings = VARIANTS[variant]
    weight = linear.weight.detach()
    if weight.numel() % settings["group_size"]:
        raise ValueError(
            f"{NAME} variant {variant!r} needs the weight's size {tuple(weight.shape)} to be a multiple of "
            f"its group size {settings['group_size']}"
        )
    dtype = weight.dtype if weight.dtype in FLOAT_DTYPES else torch.float32
    bias = None
    if linear.bias is not None:
        # a frozen leaf: HQQLinear stores bias.clone(), which would otherwise carry
        # a grad_fn back to the caller's bias (and make the layer un-deep-copyable)
        bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return _hqq_linear().from_weights(
        weight.clone(),
        bias,
        BaseQuantizeConfig(**settings),
        compute_dtype=dtype,
        device=str(weight.device),
    )
