"""gptqmodel's GPTQ layers: which classes they are, how to read them, how to build them.

Everything here imports torch and gptqmodel; ``quantplug_gptqmodel/gptq/__init__.py``
imports this module only inside hooks, after it claimed a layer.

How gptqmodel 7.6.0 stores a GPTQ layer (CPU, measured):

- ``PackableQuantLinear`` subclasses (``TorchLinear``, ``TorchFusedLinear``,
  ``TorchAtenLinear``, CUDA's ``TritonV2Linear``) keep ``qweight``
  ``(in * bits / 32, out)`` int32, ``qzeros``, ``scales`` ``(groups, out)`` and
  ``g_idx``; with ``REQUIRES_FORMAT_V2`` the stored zero points are the true
  ones, and ``W = scales[g_idx] * (code - zero[g_idx])`` (the library's
  ``PackableQuantLinear.dequantize_weight``).
- ``TorchFusedLinear`` and ``TorchAtenLinear`` repack in place on their first
  CPU inference forward (``linear_mode`` becomes ``"inference"``): ``qweight``
  turns into an opaque ``_convert_weight_to_int4pack_for_cpu`` uint8 tensor and
  ``dequantize_weight()`` raises ``"rshift_cpu" not implemented for
  'BFloat16'``. ``TorchFusedLinear``'s CPU repack also replaces the zero points
  by zeros (``transform_cpu``), so with ``sym=False`` its output is off by
  ~0.14 relative (``TorchAtenLinear`` converts them correctly: 0.003).
- ``TorchInt8Linear`` converts to per-channel int8 in ``post_init`` and drops
  the GPTQ buffers; its own ``dequantize_weight()`` reads the int8 copy.
- CUDA kernels (Marlin, ExLlamaV2, Machete, BitBLAS, ...) repack into their own
  layouts; they are read through their own forward on an identity matrix.
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import torch
from torch import nn

from quantplug_gptqmodel import _torch as shared
from quantplug_gptqmodel._torch import INT8, OPAQUE, REPACKED, is_repacked
from quantplug_gptqmodel.gptq._detect import mro_names, parse_variant

# layout kinds: PACKED, and INT8 (TorchInt8Linear), REPACKED and OPAQUE shared with the awq backend
PACKED = "packed"  # gptqmodel GPTQ buffers, read with the library's own dequantize_weight


# -- layouts --------------------------------------------------------------------


def layout(module: nn.Module) -> str:
    kind = shared.common_layout(module, "TorchInt8Linear")
    if kind is not None:
        return kind
    names = mro_names(module)
    qweight = getattr(module, "qweight", None)
    if (
        "PackableQuantLinear" in names
        and getattr(type(module), "REQUIRES_FORMAT_V2", False)
        and isinstance(qweight, torch.Tensor)
        and qweight.dtype == getattr(module, "pack_dtype", torch.int32)
        and qweight.dim() == 2
        and qweight.shape[1] == module.out_features
        and isinstance(getattr(module, "g_idx", None), torch.Tensor)
    ):
        return PACKED
    return OPAQUE


def lost_zero_points(module: nn.Module) -> bool:
    """A ``TorchFusedLinear`` with ``sym=False`` whose CPU repack replaced its zero points by zeros."""
    if "TorchFusedLinear" not in mro_names(module) or getattr(module, "sym", True) or not is_repacked(module):
        return False
    qzeros = getattr(module, "qzeros", None)
    return isinstance(qzeros, torch.Tensor) and qzeros.is_floating_point() and not bool(qzeros.any())


def zero_point_trap(module: nn.Module, x: torch.Tensor) -> bool:
    """Calling ``module`` now would make its CPU repack drop the zero points (gptqmodel 7.6 ``TorchFusedLinear``)."""
    return (
        x.device.type == "cpu"
        and "TorchFusedLinear" in mro_names(module)
        and not getattr(module, "sym", True)
        and not is_repacked(module)
    )


def locks_input_dtype(module: nn.Module) -> bool:
    """``TorchFusedLinear`` repacks for its first input's dtype, then rejects every other one."""
    return "TorchFusedLinear" in mro_names(module)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the layer's scales (fp16 as gptqmodel packs them), else its bias, else fp16."""
    return shared.compute_dtype(module, int8=layout(module) == INT8)


# -- reading the dense weight ---------------------------------------------------


def dequantize(module: nn.Module) -> torch.Tensor:
    """``(out, in)`` weight such that the layer's forward is ``x @ W.T + bias``; the layer is not changed."""
    kind = layout(module)
    if kind == PACKED:
        from gptqmodel.nn_modules.qlinear import PackableQuantLinear

        # the base class's method: TorchLinear.post_init replaces the instance's
        # dequantize_weight by a torch.compile'd copy and keeps per-instance caches
        with torch.no_grad():
            return PackableQuantLinear.dequantize_weight(module).T.contiguous()
    if kind == REPACKED and lost_zero_points(module):
        raise ValueError(
            f"this {type(module).__name__} (sym=False) already ran a CPU inference forward, which in "
            "gptqmodel 7.6 replaced its zero points by zeros (TorchFusedLinear.transform_cpu), so its "
            "output is wrong and its true weight cannot be read back. Reload the model with "
            "backend=BACKEND.GPTQ_TORCH (TorchLinear) or BACKEND.GPTQ_TORCH_ATEN, or attach quantplug "
            "before the first forward: wrapped layers never take that path."
        )
    return shared.dequantize_kernel(module, kind, compute_dtype(module))


# -- building layers ------------------------------------------------------------


def rtn_params(
    weight: torch.Tensor,
    bits: int,
    sym: bool,
    g_idx: torch.Tensor,
    scale_dtype: torch.dtype,
    keep: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Scales and zero points per (row, group) for ``weight``, and the weight on that grid.

    Round-to-nearest with gptqmodel's own ``Quantizer`` (what its RTN and GPTQ
    use for a group's range). The group of input column ``i`` is ``g_idx[i]``
    (act-order layers have a permuted ``g_idx``). Scales are rounded to
    ``scale_dtype`` before the codes are chosen, so the codes are the nearest
    ones for the scales actually stored.

    :param keep: the layer's own ``(scales, zeros)``, ``(out, groups)``: each
        (row, group) keeps them where they fit the new weight better than fresh
        RTN ones. GPTQ's error feedback leaves codes that need not span a
        group's range, so RTN alone would move every such group (2.8% relative
        on a calibrated layer, measured); with ``keep``, requantizing a layer's
        own weight gives back its own codes, and a small merge only moves the
        groups the adapter changed.
    :returns: ``scales``, ``zeros`` (float32, ``(out, groups)``) and the on-grid weight.
    """
    from gptqmodel.quantization.quantizer import Quantizer

    weight = weight.float()
    groups = int(g_idx.max().item()) + 1
    quantizer = Quantizer(SimpleNamespace(bits=bits, sym=sym, mse=0.0))
    quantizer.configure(perchannel=True)
    scales = torch.empty(weight.shape[0], groups, dtype=torch.float32, device=weight.device)
    zeros = torch.empty_like(scales)
    for group in range(groups):
        columns = (g_idx == group).nonzero().flatten()
        quantizer.find_params(weight[:, columns], weight=True)
        scales[:, group] = quantizer.scale.flatten()
        zeros[:, group] = quantizer.zero.flatten()
    tiny = torch.finfo(scale_dtype).tiny  # a scale that underflows would divide by zero below
    scales = scales.to(scale_dtype).float().clamp_min(tiny)
    on_grid = _on_grid(weight, scales, zeros, g_idx, bits)
    if keep is not None:
        own_scales = keep[0].float().to(scale_dtype).float().clamp_min(tiny)
        own_zeros = keep[1].float()
        own_grid = _on_grid(weight, own_scales, own_zeros, g_idx, bits)
        better = _group_error(weight - own_grid, g_idx, groups) <= _group_error(
            weight - on_grid, g_idx, groups
        )
        scales = torch.where(better, own_scales, scales)
        zeros = torch.where(better, own_zeros, zeros)
        on_grid = torch.where(better[:, g_idx], own_grid, on_grid)
    return scales, zeros, on_grid


def _on_grid(weight, scales, zeros, g_idx, bits):
    s, z = scales[:, g_idx], zeros[:, g_idx]
    return s * (torch.clamp(torch.round(weight / s) + z, 0, 2**bits - 1) - z)


def _group_error(diff: torch.Tensor, g_idx: torch.Tensor, groups: int) -> torch.Tensor:
    error = torch.zeros(diff.shape[0], groups, dtype=torch.float32, device=diff.device)
    return error.index_add_(1, g_idx, diff.square())


def own_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's ``(scales, zeros)`` as ``(out, groups)`` float32, where its layout is readable (2/4/8 bits)."""
    if layout(module) != PACKED or module.bits not in (2, 4, 8) or getattr(module, "planar", False):
        return None
    bits = module.bits
    word = getattr(module, "pack_dtype_bits", 32)
    shifts = torch.arange(0, word, bits, dtype=torch.int32, device=module.qzeros.device)
    codes = (module.qzeros.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    zeros = codes.reshape(module.qzeros.shape[0], -1)[:, : module.out_features]
    return module.scales.detach().float().T.cpu(), zeros.float().T.cpu()


def act_order_g_idx(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """A desc_act ``g_idx`` without calibration data: columns by decreasing squared norm.

    GPTQ orders columns by the Hessian's diagonal (input energy); with no inputs
    the weight's column energy stands in, which gives a realistic permuted
    ``g_idx`` for the act-order code paths.
    """
    order = torch.argsort(weight.float().square().sum(dim=0), descending=True, stable=True)
    g_idx = torch.empty(weight.shape[1], dtype=torch.int32)
    g_idx[order] = torch.arange(weight.shape[1], dtype=torch.int32) // group_size
    return g_idx


def _pack(layer: nn.Module, weight: torch.Tensor, scales, zeros, g_idx, bias) -> None:
    """Pack with gptqmodel's numpy packer (``pack_original``).

    ``pack()``/``pack_block()`` first try to JIT-compile a C++ extension into
    ~/.cache/gptqmodel (about a minute on first use); ``pack_original`` is the
    same layout without it, and what ``hf_pack`` calls by default in 7.6.
    """
    out_features, in_features = weight.shape
    carrier = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    carrier.weight = nn.Parameter(weight.detach().float().cpu(), requires_grad=False)
    if bias is not None:
        carrier.bias = nn.Parameter(bias.detach().float().cpu(), requires_grad=False)
    layer.pack_original(carrier, scales.cpu(), zeros.cpu(), g_idx.to(torch.int32).cpu())


def quantize(linear: nn.Module, variant: str | None) -> nn.Module:
    """A ``TorchLinear`` (pure torch, correct for sym=False, has a backward) holding RTN codes of ``linear``."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    spec = parse_variant(variant)
    weight = linear.weight.detach().float().cpu()
    out_features, in_features = weight.shape
    group_size = spec["group_size"] if spec["group_size"] != -1 else in_features
    if spec["desc_act"]:
        g_idx = act_order_g_idx(weight, group_size)
    else:
        g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    layer = TorchLinear(
        bits=spec["bits"],
        group_size=spec["group_size"],
        sym=spec["sym"],
        desc_act=spec["desc_act"],
        in_features=in_features,
        out_features=out_features,
        bias=linear.bias is not None,
    )
    scales, zeros, on_grid = rtn_params(weight, spec["bits"], spec["sym"], g_idx.long(), torch.float16)
    _pack(layer, on_grid, scales, zeros, g_idx, linear.bias)
    # TorchLinear.post_init torch.compile's its dequantize_weight, which then compiles on the first
    # forward of every new layer shape (4-6 s each on 2 CPU cores, measured); same numbers eager
    layer.optimized = True
    return shared.as_loaded(layer, linear.weight.device)


def requantize(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new layer of ``module``'s class with its bits, group size, symmetry, g_idx and bias, holding ``weight``."""
    names = mro_names(module)
    cls = type(module)
    if "PackableQuantLinear" not in names and "TorchInt8Linear" not in names:
        raise NotImplementedError(
            f"quantplug-gptqmodel (gptq) cannot requantize into {cls.__name__}: it has no CPU packer and was only tested "
            "on the torch kernels; merge with mode='dense', or load the model with backend=BACKEND.GPTQ_TORCH"
        )
    g_idx = getattr(module, "g_idx", None)
    if not isinstance(g_idx, torch.Tensor):  # TorchInt8Linear drops g_idx in post_init
        g_idx = torch.arange(module.in_features, dtype=torch.int32) // module.group_size
    g_idx = g_idx.detach().to(device="cpu", dtype=torch.int32).clone()
    scales = getattr(module, "scales", None)
    scale_dtype = (
        scales.dtype if isinstance(scales, torch.Tensor) and scales.is_floating_point() else torch.float16
    )
    if "TorchInt8Linear" in names or is_repacked(module):
        scale_dtype = torch.float16  # the dtype the packed (pre-conversion) scales have
    scales, zeros, on_grid = rtn_params(
        weight.detach().float().cpu(),
        module.bits,
        module.sym,
        g_idx.long(),
        scale_dtype,
        keep=own_params(module),
    )
    return _build_like(module, scales, zeros, on_grid, g_idx, scale_dtype)


def _build_like(module: nn.Module, scales, zeros, on_grid, g_idx, scale_dtype) -> nn.Module:
    """A new layer of ``module``'s class, format and bias packing ``on_grid`` with these scales and zeros."""
    names = mro_names(module)
    cls = type(module)
    bits, sym = module.bits, module.sym
    group_size = getattr(module, "requested_group_size", module.group_size)
    bias = getattr(module, "bias", None)
    extra = {"pack_dtype": getattr(module, "pack_dtype", torch.int32)}
    if getattr(module, "format", None) is not None:
        extra["format"] = module.format

    def build(klass):
        return klass(
            bits=bits,
            group_size=group_size,
            sym=sym,
            desc_act=module.desc_act,
            in_features=module.in_features,
            out_features=module.out_features,
            bias=bias is not None,
            **extra,
        )

    if "TorchInt8Linear" in names:
        # not packable (its pack() raises): pack a TorchLinear, hand its buffers over, convert as at load time
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear

        carrier = build(TorchLinear)
        _pack(carrier, on_grid, scales, zeros, g_idx, bias)
        new = build(cls)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(new, name, getattr(carrier, name))
    else:
        new = build(cls)
        _pack(new, on_grid, scales, zeros, g_idx, bias)
        new.scales = new.scales.to(scale_dtype)
        if hasattr(module, "qzero_format") and hasattr(new, "qzero_format"):
            new.qzero_format(format=module.qzero_format())  # what a gptqmodel save does with the zeros
    if "dequantize_weight" not in vars(module):  # the original skipped the torch.compile (see quantize)
        new.optimized = True
    return shared.finish_like(module, new, bias)


# -- QALoRA: group size and the zeros merge ----------------------------------------


def group_size(module: nn.Module) -> int | None:
    """The layer's input group, where groups are runs of consecutive columns (no act-order permutation)."""
    group = shared.whole_groups(module, layout(module))
    if group is None or not groups_in_order(module, group):
        return None  # act-order: a group's columns are scattered
    return group


# layer -> ((g_idx's address, version, group size), whether g_idx[k] == k // group size)
_IN_ORDER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def groups_in_order(module: nn.Module, group: int) -> bool:
    """Whether input ``k`` is in group ``k // group`` (``g_idx``, if any, is not an act-order permutation).

    Checked once per ``g_idx`` (its address and version) and remembered: the
    check reads the device, so under CUDA-graph capture a layer not checked
    before is taken as not in order. The wrap hook checks every layer it wraps.
    """
    in_features = int(module.in_features)
    g_idx = getattr(module, "g_idx", None)
    if not isinstance(g_idx, torch.Tensor) or g_idx.numel() != in_features:
        return True  # no g_idx: the library's own order
    # (inference-mode tensors keep no version: their address stands alone)
    key = (g_idx.data_ptr(), 0 if g_idx.is_inference() else g_idx._version, group)
    known = _IN_ORDER.get(module)
    if known is not None and known[0] == key:
        return known[1]
    if g_idx.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    in_order = torch.equal(g_idx.long(), torch.arange(in_features, device=g_idx.device) // group)
    _IN_ORDER[module] = (key, in_order)
    return in_order


def unpack_codes(module: nn.Module) -> torch.Tensor:
    """The ``(in, out)`` integer codes of a packed 2/4/8-bit layer, as ``dequantize_weight`` reads them."""
    bits = module.bits
    word = getattr(module, "pack_dtype_bits", 32)
    shifts = torch.arange(0, word, bits, dtype=torch.int32, device=module.qweight.device)
    codes = (module.qweight.to(torch.int32).unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)
    return codes.reshape(-1, module.qweight.shape[1])[: module.in_features]


def fold_into_zeros(module: nn.Module, offsets: torch.Tensor) -> nn.Module:
    """A new layer with ``module``'s codes bit for bit and each group's zero point moved by ``offsets``.

    GPTQ dequantizes ``scale * (code - zero)`` with integer zero points in
    ``[0, 2^bits - 1]``, so the new zero point is ``zero - round(offset /
    scale)``, clamped to that range: each group keeps the multiple of its
    scale nearest to the adapter's constant.
    """
    own = own_params(module)
    if own is None or group_size(module) is None:
        raise ValueError(
            f"the zeros merge reads and rewrites the packed 2/4/8-bit GPTQ buffers with groups of consecutive "
            f"columns; this {type(module).__name__} (layout {layout(module)}, bits {module.bits}, "
            f"desc_act {getattr(module, 'desc_act', None)}) has none. Merge with mode='requantize' or 'dense'"
        )
    if module.sym:
        raise ValueError(
            "a sym=True GPTQ layer promises zero points of 2^(bits-1), and kernels such as Marlin and ExLlama "
            "ignore qzeros for it: quantize with sym=False to merge QALoRA adapters into the zero points"
        )
    scales, zeros = own  # (out, groups), float32, on the CPU
    step = torch.round(offsets.detach().float().cpu() / scales)
    new_zeros = (zeros - step).clamp_(0, 2**module.bits - 1)
    g_idx = module.g_idx.detach().to(device="cpu", dtype=torch.int32).clone()
    codes = unpack_codes(module).cpu().T.float()  # (out, in)
    group = g_idx.long()
    on_grid = scales[:, group] * (codes - new_zeros[:, group])
    new = _build_like(module, scales, new_zeros, on_grid, g_idx, module.scales.dtype)
    if not torch.equal(
        new.qweight.cpu(), module.qweight.cpu()
    ):  # pack_original re-derives codes from on_grid
        raise RuntimeError("packing the moved zero points changed the GPTQ codes; please report this")
    return new
