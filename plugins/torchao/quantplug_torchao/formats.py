"""Dequantize, requantize and quantize torchao layers (torch and torchao imported here).

A torchao layer is a plain ``nn.Linear`` whose ``weight`` is a tensor
subclass. Requantizing means: a new ``nn.Linear`` holding the merged dense
weight, then torchao's own ``quantize_`` with the config the original weight
was built with. That config is recovered from the weight itself
(:func:`recover_config`), not remembered from when quantplug built the layer,
so layers built by transformers' ``TorchAoConfig`` or by users' own
``quantize_`` calls requantize the same way.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from quantplug_torchao import VARIANTS, _compat, torchao_weight

# rows of the identity fed per call when dequantizing through the forward,
# so a 14336-wide layer never materialises a 14336x14336 input at once
_EYE_CHUNK = 1024


# --------------------------------------------------------------------------
# Dequantize
# --------------------------------------------------------------------------


def _weight(module: nn.Module):
    weight = torchao_weight(module)
    if weight is None:
        raise TypeError(f"{type(module).__name__} holds no torchao quantized weight")
    return weight


def has_own_dequantize(weight: torch.Tensor) -> bool:
    """Whether the tensor class defines ``dequantize()`` itself.

    ``hasattr(w, "dequantize")`` is always true: ``torch.Tensor.dequantize``
    (for the old ``qint8`` tensors) is inherited by every subclass, and on the
    opaque int4 layouts it dispatches ``aten.dequantize`` to a subclass that
    does not implement it.
    """
    return type(weight).dequantize is not torch.Tensor.dequantize


def dequantize(module: nn.Module) -> torch.Tensor:
    """The dense ``(out, in)`` weight, in the weight's dtype, as torchao computes it.

    - ``NF4Tensor``: ``get_original_weight()``, which its ``F.linear`` uses
      (its ``dequantize`` is a static lookup helper, not this).
    - classes with their own ``dequantize()`` (``Int8Tensor``,
      ``IntxUnpackedToInt8Tensor``, ``Float8Tensor``): that, times the
      activation pre-scale where AWQ/SmoothQuant put one (the forward
      multiplies the input by it, so it belongs to the effective weight).
    - opaque layouts (the int4 kernels' packed formats, ``IntxOpaqueTensor``):
      the layer's own linear on the identity, exact by construction.
    """
    weight = _weight(module)
    with torch.no_grad():
        if type(weight).__name__ == "NF4Tensor":
            dense = weight.get_original_weight()
        elif has_own_dequantize(weight):
            dense = weight.dequantize()
            pre_scale = getattr(weight, "act_pre_scale", None)
            if pre_scale is not None:
                dense = dense.float() * pre_scale.float().reshape(1, -1)
        else:
            return dequantize_by_forward(module)
    return dense.to(weight.dtype).contiguous()


def dequantize_by_forward(module: nn.Module) -> torch.Tensor:
    """``F.linear(I, W)``: the weight exactly as the layer's own kernel applies it.

    Bias is left out; a bias packed into the weight (``IntxOpaqueTensor``
    with ``packed_weights_has_bias``) is measured on a zero input and
    subtracted. Works for every torchao format, including the ones with no
    ``dequantize()``. With dynamic activation quantization the identity rows
    are quantized too: exact for asymmetric per-token int8 (0 and 1 are both
    on the grid), not for symmetric (1 -> 127/127.5), so those formats use
    their own ``dequantize()`` instead.
    """
    weight = _weight(module)
    in_features = weight.shape[1]
    chunks = []
    with torch.no_grad():
        packed_bias = _packed_bias(weight)
        for start in range(0, in_features, _EYE_CHUNK):
            stop = min(start + _EYE_CHUNK, in_features)
            eye = torch.zeros(stop - start, in_features, dtype=weight.dtype, device=weight.device)
            eye[:, start:stop] = torch.eye(stop - start, dtype=weight.dtype, device=weight.device)
            cols = F.linear(eye, weight)
            if packed_bias is not None:
                cols = cols - packed_bias
            chunks.append(cols)
    return torch.cat(chunks).T.contiguous().to(weight.dtype)


def _packed_bias(weight: torch.Tensor) -> torch.Tensor | None:
    if not getattr(weight, "packed_weights_has_bias", False):
        return None
    zero = torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    return F.linear(zero, weight)[0]


# --------------------------------------------------------------------------
# Recovering the config a weight was quantized with
# --------------------------------------------------------------------------


def _granularity(block_size, shape):
    """PerTensor / PerRow / PerGroup from a block size, as torchao's get_block_size maps them."""
    from torchao.quantization import PerGroup, PerRow, PerTensor

    block, shape = [int(b) for b in block_size], [int(s) for s in shape]
    if block == shape:
        return PerTensor()
    if any(b != 1 for b in block[:-1]):
        raise NotImplementedError(
            f"block size {block} for shape {shape} is not a per-row or per-group layout"
        )
    return PerRow() if block[-1] == shape[-1] else PerGroup(block[-1])


def _intx_granularity(block_size, shape):
    from torchao.quantization import PerAxis, PerGroup

    block = [int(b) for b in block_size]
    if len(block) != 2 or block[0] != 1:
        raise NotImplementedError(f"block size {block} is not per-channel or per-group")
    return PerAxis(0) if block[1] == int(shape[-1]) else PerGroup(block[1])


def _attr(weight, name: str):
    """A tensor attribute that older torchao releases do not have yet (``None`` there)."""
    return getattr(weight, name, None)


def _any_nonzero(zero_point) -> bool:
    return zero_point is not None and bool(torch.any(zero_point != 0))


def recover_config(weight: torch.Tensor):
    """The torchao ``AOBaseConfig`` that turns a dense weight into one like ``weight``.

    Read from the tensor's own attributes: block size (granularity), target
    dtype, scale dtype, symmetric or not (non-zero zero points), activation
    quantization and packing format. What a tensor does not record is taken
    at torchao's default: the qparams algorithm (``AFFINE``, not
    ``HQQ_SCALE_ONLY``), ``SYMMETRIC`` rather than ``SYMMETRIC_NO_CLIPPING_ERR``
    (both leave zero points at 0), and ``set_inductor_config=False`` so that a
    merge does not change ``torch._inductor.config`` for the whole process.

    :returns: the config, or ``None`` for formats no config expresses
        (``NF4Tensor``; an ``Int8Tensor`` with an activation pre-scale or
        asymmetric weights), which :func:`requantize` rebuilds directly.
    :raises NotImplementedError: for a torchao tensor class it does not know.
    """
    from torchao import quantization as q
    from torchao.quantization.quant_primitives import MappingType

    kind = type(weight).__name__
    config = _compat.config
    if kind == "NF4Tensor":
        return None
    if kind == "Int8Tensor":
        # act_pre_scale, zero_point, act_quant_zero_point and reduce_range arrived in 0.16-0.18
        if _attr(weight, "act_pre_scale") is not None or _any_nonzero(_attr(weight, "zero_point")):
            return None
        granularity = _granularity(weight.block_size, weight.shape)
        act = weight.act_quant_kwargs
        if act is None:
            return config("Int8WeightOnlyConfig", granularity=granularity, set_inductor_config=False)
        if _attr(weight, "act_quant_scale") is not None:
            return config(
                "Int8StaticActivationInt8WeightConfig",
                act_quant_scale=weight.act_quant_scale,
                act_quant_zero_point=_attr(weight, "act_quant_zero_point"),
                granularity=[act.granularity, granularity],
                act_mapping_type=act.mapping_type,
                reduce_range=bool(_attr(weight, "reduce_range")),
                set_inductor_config=False,
            )
        return config(
            "Int8DynamicActivationInt8WeightConfig",
            granularity=[act.granularity, granularity],
            act_mapping_type=act.mapping_type,
            reduce_range=bool(_attr(weight, "reduce_range")),
            set_inductor_config=False,
        )
    if kind == "IntxUnpackedToInt8Tensor":
        if weight.zero_point.dtype != torch.int8:
            raise NotImplementedError(
                "IntxUnpackedToInt8Tensor with float zero points comes from custom qparams"
            )
        granularity = _intx_granularity(weight.block_size, weight.shape)
        mapping = MappingType.ASYMMETRIC if _any_nonzero(weight.zero_point) else MappingType.SYMMETRIC
        scale_dtype = weight.scale.dtype if weight.scale.dtype != weight.dtype else None
        if weight.activation_quantization is None:
            return q.IntxWeightOnlyConfig(
                weight_dtype=weight.target_dtype,
                granularity=granularity,
                mapping_type=mapping,
                scale_dtype=scale_dtype,
            )
        return q.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=weight.target_dtype,
            weight_granularity=granularity,
            weight_mapping_type=mapping,
            weight_scale_dtype=scale_dtype,
        )
    if kind == "IntxOpaqueTensor":
        return q.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=getattr(torch, f"int{weight.bit_width}"),
            weight_granularity=_intx_granularity(weight.block_size, weight.shape),
            weight_mapping_type=MappingType.ASYMMETRIC
            if weight.packed_weights_has_zeros
            else MappingType.SYMMETRIC,
            intx_packing_format=weight.intx_packing_format,
        )
    if kind == "Float8Tensor":
        granularity = _granularity(weight.block_size, weight.shape)
        act = weight.act_quant_kwargs
        if act is None:
            return config(
                "Float8WeightOnlyConfig",
                weight_dtype=weight.qdata.dtype,
                granularity=granularity,
                set_inductor_config=False,
            )
        return q.Float8DynamicActivationFloat8WeightConfig(
            activation_dtype=act.float8_dtype,
            weight_dtype=weight.qdata.dtype,
            granularity=[act.granularity, granularity],
            mm_config=weight.mm_config,
            activation_value_lb=act.hp_value_lb,
            activation_value_ub=act.hp_value_ub,
            kernel_preference=weight.kernel_preference,
            set_inductor_config=False,
        )
    int4_formats = {
        "Int4Tensor": "plain",
        "Int4PlainInt32Tensor": "plain_int32",
        "Int4TilePackedTo4dTensor": "tile_packed_to_4d",
        "Int4PreshuffledTensor": "preshuffled",
    }
    if kind in int4_formats:
        if kind == "Int4PreshuffledTensor" and weight.row_scale is not None:
            return q.Float8DynamicActivationInt4WeightConfig()
        if getattr(weight, "act_pre_scale", None) is not None:
            raise NotImplementedError(
                f"{kind} with an activation pre-scale (AWQ) has no config to rebuild it"
            )
        from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

        return q.Int4WeightOnlyConfig(
            group_size=int(weight.block_size[-1]),
            int4_packing_format=Int4PackingFormat(int4_formats[kind]),
            set_inductor_config=False,
        )
    raise NotImplementedError(
        f"torchao tensor class {type(weight).__module__}.{kind} is not one quantplug-torchao can rebuild; "
        "merge with mode='dense' instead"
    )


# --------------------------------------------------------------------------
# Requantize and quantize
# --------------------------------------------------------------------------


def _new_linear(module: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A linear like ``module`` holding dense ``weight`` and ``bias``, sharing nothing with it.

    A plain ``nn.Linear`` gets a fresh one; a subclass (torchtune's
    ``FrozenNF4Linear``, say) is shallow-copied with its own parameter dict,
    so its class and extra attributes survive and ``module`` is untouched.
    """
    out_features, in_features = weight.shape
    if type(module) is nn.Linear:
        new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    else:
        new = copy.copy(module)
        for key, value in module.__dict__.items():
            if isinstance(value, dict):  # _parameters, _buffers, _modules, hook dicts
                new.__dict__[key] = copy.copy(value)
        new.__dict__.pop("extra_repr", None)  # torchao patches it per instance, bound to the original
    new.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    new.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
    return new


def requantize(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new layer in ``module``'s torchao format holding ``weight``; ``module`` is left untouched."""
    from torchao.quantization import quantize_

    old = _weight(module)
    dense = weight.detach().to(device=old.device, dtype=old.dtype).contiguous()
    bias = module.bias
    packed_bias = _packed_bias(old)
    if packed_bias is not None:  # IntxOpaqueTensor kept the bias inside the weight; quantize_ packs it again
        bias = packed_bias if bias is None else bias + packed_bias
    config = recover_config(old)
    kind = type(old).__name__
    if config is not None:
        new = _new_linear(module, dense, bias)
        quantize_(new, config, filter_fn=lambda m, _fqn: m is new)
        return _closer(new, _on_old_grid(module, old, dense, bias), dense)
    if kind == "NF4Tensor":
        new = _new_linear(module, dense, bias)
        weight = _compat.to_nf4(dense, old.block_size, old.scaler_block_size)
        new.weight = nn.Parameter(weight, requires_grad=False)
        return new
    if kind == "Int8Tensor":
        return _requantize_int8_directly(module, old, dense, bias)
    raise NotImplementedError(f"no way to rebuild {kind}")


def _on_old_grid(module, old, dense, bias):
    """The same format quantized with the layer's own scales and zero points, where torchao allows it.

    Symmetric intx/int8 quantization is not idempotent: the scale is
    ``absmax / ((qmax - qmin) / 2)`` (7.5 for int4) while the codes reach -8,
    so quantizing a dequantized weight again picks a new scale and re-rounds
    every element. For int4 that adds a full rounding error (6.7% of ``W``)
    even for a zero adapter; on the old grid a small adapter rounds back to
    the old codes instead. :func:`requantize` keeps whichever is closer.
    """
    kind = type(old).__name__
    if kind == "IntxUnpackedToInt8Tensor":
        from torchao.quantization import IntxUnpackedToInt8Tensor

        weight = IntxUnpackedToInt8Tensor.from_hp(
            dense,
            old.block_size,
            old.target_dtype,
            activation_quantization=old.activation_quantization,
            intx_choose_qparams_algorithm=None,
            custom_scale=old.scale,
            custom_zero_point=old.zero_point,
        )
    elif kind == "Int8Tensor" and _compat.int8_from_hp_takes("scale"):  # 0.16 on
        weight = _int8_from_hp(old, dense, scale=old.scale, zero_point=_attr(old, "zero_point"))
    else:
        return None
    new = _new_linear(module, dense, bias)
    new.weight = nn.Parameter(weight, requires_grad=False)
    return new


def _closer(fresh, kept, target):
    """``fresh`` (the config's own qparams) unless ``kept`` (the old grid) is strictly closer to ``target``."""
    if kept is None:
        return fresh
    target = target.float()
    errors = [torch.linalg.vector_norm(dequantize(layer).float() - target).item() for layer in (fresh, kept)]
    return kept if errors[1] < errors[0] else fresh


def _int8_from_hp(old, dense, scale=None, zero_point=None):
    """``Int8Tensor.from_hp`` with every setting of ``old``; the pre-scale is divided out of ``dense``."""
    from torchao.quantization.quant_primitives import MappingType

    pre_scale = _attr(old, "act_pre_scale")
    stored = dense if pre_scale is None else (dense.float() / pre_scale.float().reshape(1, -1)).to(old.dtype)
    return _compat.int8_from_hp(
        stored,
        granularity=_granularity(old.block_size, old.shape),
        mapping_type=MappingType.ASYMMETRIC
        if _any_nonzero(_attr(old, "zero_point"))
        else MappingType.SYMMETRIC,
        scale=scale,
        zero_point=zero_point,
        act_quant_kwargs=old.act_quant_kwargs,
        act_quant_scale=_attr(old, "act_quant_scale"),
        act_quant_zero_point=_attr(old, "act_quant_zero_point"),
        act_pre_scale=pre_scale,
        reduce_range=_attr(old, "reduce_range"),
    )


def _requantize_int8_directly(module, old, dense, bias):
    """Int8 formats no config expresses: an AWQ/SmoothQuant pre-scale, asymmetric weights.

    The forward computes ``(x * pre_scale) @ Wq.T``, so the stored weight is
    the effective weight divided by the pre-scale, column by column.
    """
    new = _new_linear(module, dense, bias)
    new.weight = nn.Parameter(_int8_from_hp(old, dense), requires_grad=False)
    return _closer(new, _on_old_grid(module, old, dense, bias), dense)


def variant_config(variant: str):
    """The torchao config a quantplug variant name stands for (``None`` for ``nf4``)."""
    from torchao import quantization as q

    config = _compat.config
    configs = {
        "int8wo": lambda: config("Int8WeightOnlyConfig", set_inductor_config=False),
        "int4-g32": lambda: q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=q.PerGroup(32)),
        "int4-g64": lambda: q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=q.PerGroup(64)),
        "int8dq": lambda: config("Int8DynamicActivationInt8WeightConfig", set_inductor_config=False),
        "int8dq-int4-g32": lambda: q.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=q.PerGroup(32)
        ),
        "float8wo": lambda: config("Float8WeightOnlyConfig", set_inductor_config=False),
        "nf4": lambda: None,
    }
    if variant not in configs:
        raise ValueError(f"unknown torchao variant {variant!r}; choose one of {list(VARIANTS)}")
    return configs[variant]()


def quantize(linear: nn.Module, variant: str) -> nn.Module:
    """A new torchao layer from a plain ``nn.Linear`` (round to nearest, no calibration data)."""
    from torchao.quantization import quantize_

    config = variant_config(variant)
    if not isinstance(linear, nn.Linear) or torchao_weight(linear) is not None:
        raise TypeError(f"expected a plain nn.Linear with a dense weight, got {type(linear).__name__}")
    in_features = linear.in_features
    group = {"int4-g32": 32, "int4-g64": 64, "int8dq-int4-g32": 32, "nf4": 64}.get(variant)
    if group is not None and in_features % group:
        raise ValueError(f"variant {variant!r} needs in_features divisible by {group}, got {in_features}")
    dense = linear.weight.detach()
    if variant == "nf4":
        new = _new_linear(linear, dense, linear.bias)
        # torchao's defaults (64, 256) need the block count divisible by 256:
        # 128x128 and smaller layers get the largest scaler block that divides it
        scaler_block = math.gcd(dense.numel() // 64, 256)
        new.weight = nn.Parameter(_compat.to_nf4(dense.contiguous(), 64, scaler_block), requires_grad=False)
        return new
    new = _new_linear(linear, dense, linear.bias)
    quantize_(new, config, filter_fn=lambda m, _fqn: m is new)
    return new


# --------------------------------------------------------------------------
# QALoRA: group size and the zeros merge
# --------------------------------------------------------------------------

# classes whose block_size (1, g) groups consecutive input columns under one scale (and zero point)
_GROUPED = frozenset(
    {
        "IntxUnpackedToInt8Tensor",
        "IntxOpaqueTensor",
        "Int4Tensor",
        "Int4PlainInt32Tensor",
        "Int4TilePackedTo4dTensor",
        "Int4PreshuffledTensor",
    }
)


def group_size(module: nn.Module) -> int | None:
    """The input group of a per-group weight (``PerGroup(g)``); ``None`` per row, per tensor, NF4, float8."""
    weight = torchao_weight(module)
    if weight is None or type(weight).__name__ not in _GROUPED:
        return None
    block = [int(b) for b in weight.block_size]
    in_features = int(weight.shape[-1])
    if len(block) != 2 or block[0] != 1 or block[1] >= in_features or in_features % block[1]:
        return None
    return block[1]


def fold_into_zeros(module: nn.Module, offsets: torch.Tensor) -> nn.Module:
    """A new layer with ``module``'s ``qdata`` bit for bit and ``zero_point - offsets / scale``.

    ``IntxUnpackedToInt8Tensor`` dequantizes ``(qdata - zero_point) * scale``
    per group and accepts floating-point zero points (``custom_zero_point``,
    ``_has_float_zero_point``): the new ones are kept in the scale's dtype,
    so the move is exact up to that dtype. Symmetric layers store their
    zero points too (all 0), so they take the merge as well. A group whose
    scale is 0 cannot move.
    """
    from torchao.quantization import IntxUnpackedToInt8Tensor

    old = _weight(module)
    if type(old).__name__ != "IntxUnpackedToInt8Tensor" or group_size(module) is None:
        raise ValueError(
            f"the zeros merge rewrites the zero points of a per-group IntxUnpackedToInt8Tensor; this layer holds "
            f"a {type(old).__name__} (block size {tuple(getattr(old, 'block_size', ()))}). Merge with "
            "mode='requantize' or 'dense'"
        )
    scale = old.scale
    shift = offsets.detach().to(device=scale.device, dtype=torch.float32).reshape(scale.shape)
    safe = torch.where(scale == 0, 1.0, scale.float())
    zero = torch.where(scale == 0, old.zero_point.float(), old.zero_point.float() - shift / safe)
    weight = IntxUnpackedToInt8Tensor(
        old.qdata.detach().clone(),
        scale.detach().clone(),
        zero.to(scale.dtype),
        old.target_dtype,
        old.block_size,
        old.dtype,
        old.activation_quantization,
    )
    new = _new_linear(module, torch.empty(old.shape, dtype=old.dtype, device=old.device), module.bias)
    new.weight = nn.Parameter(weight, requires_grad=False)
    return new
