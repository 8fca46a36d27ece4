"""AWQ layers (gptqmodel's, and AutoAWQ's ``WQLinear_GEMM``): reading and building them.

Everything here imports torch and gptqmodel; ``quantplug_gptqmodel/awq/__init__.py``
imports this module only inside hooks, after it claimed a layer.

How gptqmodel 7.6.0 stores an AWQ layer (CPU, measured):

- the GEMM layout (``AwqTorchLinear``, CUDA's ``AwqGEMMLinear``, AutoAWQ's
  ``WQLinear_GEMM``, and ``TorchFusedAwqLinear``/``TorchAtenAwqLinear`` before
  their first forward): ``qweight`` ``(in, out * bits / 32)`` int32 with the
  4-bit lane order ``[0, 2, 4, 6, 1, 3, 5, 7]``, ``qzeros``, ``scales``
  ``(groups, out)``; ``W.T = (code - zero) * scale``, the library's
  ``dequantize_gemm``.
- ``AwqTorchLinear.forward`` casts ``scales`` and ``bias`` in place to the
  input's dtype (fp32 input: to fp16), so an fp16 layer fed bf16 is a bf16
  layer from then on, its fp16 scales rounded away.
- ``AwqTorchLinear.pack`` rounds ``(W + zero * scale) / scale`` without
  clamping, so a weight off the grid packs codes that wrap around (16 becomes
  0): feed it on-grid weights only.
- ``TorchFusedAwqLinear``/``TorchAtenAwqLinear`` repack into int4pack on their
  first CPU inference forward, after which ``dequantize_gemm`` raises;
  ``TorchFusedAwqLinear`` then also refuses any other input dtype.
- ``TorchInt8AwqLinear`` converts to per-channel int8 in ``post_init``.
"""

from __future__ import annotations

import torch
from torch import nn

from quantplug_gptqmodel import _torch as shared
from quantplug_gptqmodel._classes import mro_names
from quantplug_gptqmodel._torch import INT8, OPAQUE, REPACKED
from quantplug_gptqmodel.awq._detect import parse_variant

# layout kinds: GEMM, and INT8 (TorchInt8AwqLinear), REPACKED and OPAQUE (GEMV, Marlin, ExLlama) shared
# with the gptq backend (quantplug_gptqmodel/_torch.py)
GEMM = "gemm"  # AWQ GEMM buffers, read with the library's dequantize_gemm

# classes that keep the GEMM layout in memory (until a CPU repack)
GEMM_CLASSES = {
    "AwqTorchLinear",
    "TorchFusedAwqLinear",
    "TorchAtenAwqLinear",
    "AwqGEMMLinear",
    "AwqGEMMTritonLinear",
    "WQLinear_GEMM",
}
# forwards that cast the layer's scales in place to the input dtype
DTYPE_FOLLOWERS = {"AwqTorchLinear", "AwqGEMMLinear", "TorchFusedAwqLinear"}


def bits_of(module: nn.Module) -> int:
    return int(getattr(module, "bits", None) or module.w_bit)  # AutoAWQ calls it w_bit


def layout(module: nn.Module) -> str:
    kind = shared.common_layout(module, "TorchInt8AwqLinear")
    if kind is not None:
        return kind
    names = mro_names(module)
    qweight, scales = getattr(module, "qweight", None), getattr(module, "scales", None)
    if (
        names & GEMM_CLASSES
        and isinstance(qweight, torch.Tensor)
        and qweight.dtype == torch.int32
        and tuple(qweight.shape) == (module.in_features, module.out_features * bits_of(module) // 32)
        and isinstance(scales, torch.Tensor)
        and scales.shape[-1] == module.out_features
    ):
        return GEMM
    return OPAQUE


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the layer's scales (what its forward computes in), else its bias, else fp16."""
    # TorchInt8AwqLinear's scales are float32 internals
    return shared.compute_dtype(module, int8=layout(module) == INT8)


def follows_input_dtype(module: nn.Module) -> bool:
    """Whether the layer's forward would recast its own scales to the input's dtype (see module docs)."""
    return bool(mro_names(module) & DTYPE_FOLLOWERS) and layout(module) in (GEMM, REPACKED)


# -- reading the dense weight ---------------------------------------------------


def dequantize(module: nn.Module) -> torch.Tensor:
    """``(out, in)`` weight such that the layer's forward is ``x @ W.T + bias``; the layer is not changed."""
    kind = layout(module)
    if kind == GEMM:
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        with torch.no_grad():
            weight = dequantize_gemm(
                module.qweight, module.qzeros, module.scales, bits_of(module), module.group_size
            )
            return weight.T.contiguous()
    return shared.dequantize_kernel(module, kind, compute_dtype(module))


def own_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's ``(scales, zeros)`` as ``(out, groups)`` float32, where its layout is the GEMM one."""
    if layout(module) != GEMM:
        return None
    bits = bits_of(module)
    _, zeros = unpack_codes(module.qweight, module.qzeros, bits, module.out_features)
    return module.scales.detach().float().T.cpu(), zeros.float().T.cpu()


def unpack_codes(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, out_features: int):
    """Codes ``(in, out)`` and zero points ``(groups, out)`` of the GEMM layout, in natural column order."""
    from gptqmodel.quantization.awq.utils.packing_utils import reverse_awq_order, unpack_awq

    if bits == 4:  # gptqmodel < 7.6 has no count argument, and only 4-bit AWQ
        codes, zeros = unpack_awq(qweight, qzeros, bits)
    else:
        codes, zeros = unpack_awq(qweight, qzeros, bits, out_features)
    codes, zeros = reverse_awq_order(codes, zeros, bits)
    mask = 2**bits - 1
    return torch.bitwise_and(codes, mask)[:, :out_features], torch.bitwise_and(zeros, mask)[:, :out_features]


# -- building layers ------------------------------------------------------------


def awq_params(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype,
    keep: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Scales, zero points (``(out, groups)``) and on-grid weight, as gptqmodel's AWQ rounds a group.

    The range math is ``AWQProcessor.pseudo_quantize_tensor`` (gptqmodel/looper/
    awq_processor.py, a method of the calibration processor): asymmetric
    ``scale = (max - min) / (2^b - 1)``, ``zero = -round(min / scale)``;
    symmetric ``scale = absmax / (2^(b-1) - 1)``, ``zero = 2^(b-1)``. Scales are
    rounded to ``scale_dtype`` before the codes are chosen, and codes are
    clamped here because ``pack`` does not clamp.

    :param keep: the layer's own ``(scales, zeros)``: each (row, group) keeps
        them where they fit the new weight better, so requantizing a layer's own
        weight gives back its codes, and a small merge only moves the groups
        the adapter changed.
    """
    out_features, in_features = weight.shape
    groups = in_features // group_size
    w = weight.float().reshape(out_features, groups, group_size)
    maxint = 2**bits - 1
    if sym:
        scales = w.abs().amax(dim=2).clamp(min=1e-5) / (2 ** (bits - 1) - 1)
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    else:
        high, low = w.amax(dim=2), w.amin(dim=2)
        scales = (high - low).clamp(min=1e-5) / maxint
        zeros = (-torch.round(low / scales)).clamp_(0, maxint)
    tiny = torch.finfo(scale_dtype).tiny
    scales = scales.to(scale_dtype).float().clamp_min(tiny)
    on_grid = _on_grid(w, scales, zeros, maxint)
    if keep is not None:
        own_scales = keep[0].float().to(scale_dtype).float().clamp_min(tiny)
        own_zeros = keep[1].float()
        own_grid = _on_grid(w, own_scales, own_zeros, maxint)
        better = (w - own_grid).square().sum(dim=2) <= (w - on_grid).square().sum(dim=2)
        scales = torch.where(better, own_scales, scales)
        zeros = torch.where(better, own_zeros, zeros)
        on_grid = torch.where(better.unsqueeze(2), own_grid, on_grid)
    return scales, zeros, on_grid.reshape(out_features, in_features)


def _on_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, maxint: int) -> torch.Tensor:
    s, z = scales.unsqueeze(2), zeros.unsqueeze(2)
    return (torch.clamp(torch.round(w / s) + z, 0, maxint) - z) * s


def _pack_torch_awq(
    bits, group_size, sym, in_features, out_features, on_grid, scales, zeros, bias, scale_dtype
):
    """An ``AwqTorchLinear`` packed by the library's own ``pack``, codes checked after."""
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    layer = AwqTorchLinear(
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=False,
        in_features=in_features,
        out_features=out_features,
        bias=bias is not None,
        dtype=scale_dtype,
    )
    carrier = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    carrier.weight = nn.Parameter(on_grid.float().cpu(), requires_grad=False)
    if bias is not None:
        carrier.bias = nn.Parameter(bias.detach().cpu().clone(), requires_grad=False)
    layer.pack(carrier, scales.to(scale_dtype).cpu(), zeros.cpu())
    # pack() does not clamp: prove no code wrapped (an on-grid weight rounds back to its own code)
    codes, _ = unpack_codes(layer.qweight, layer.qzeros, bits, out_features)
    expected = torch.round(
        on_grid.float().cpu().T / scales.float().cpu().repeat_interleave(layer.group_size, 1).T
    )
    expected = expected + zeros.cpu().repeat_interleave(layer.group_size, 1).T
    if not torch.equal(codes.float(), expected):
        raise RuntimeError(
            "AwqTorchLinear.pack wrote codes other than the ones asked for (unclamped rounding)"
        )
    return layer


def packable_bits() -> frozenset[int]:
    """The bit widths the installed gptqmodel's ``AwqTorchLinear`` packs (``SUPPORTS_BITS``: [4] before 7.6)."""
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    return frozenset(int(b) for b in getattr(AwqTorchLinear, "SUPPORTS_BITS", (4,)))


def quantize(linear: nn.Module, variant: str | None) -> nn.Module:
    """An ``AwqTorchLinear`` (pure torch, has a backward) with AWQ's round-to-nearest codes of ``linear``.

    Without calibration data there are no activation scales: this is AWQ's
    quantizer on the unscaled weight.
    """
    spec = parse_variant(variant)
    bits = packable_bits()
    if spec["bits"] not in bits:
        raise NotImplementedError(
            f"awq variant {variant!r}: this gptqmodel's AwqTorchLinear packs {sorted(bits)}-bit layers only "
            "(SUPPORTS_BITS; gptqmodel 7.6 packs 2-8 bits); use a 4-bit variant or upgrade gptqmodel"
        )
    weight = linear.weight.detach().float().cpu()
    out_features, in_features = weight.shape
    group_size = spec["group_size"] if spec["group_size"] != -1 else in_features
    scale_dtype = torch.float16
    scales, zeros, on_grid = awq_params(weight, spec["bits"], group_size, spec["sym"], scale_dtype)
    layer = _pack_torch_awq(
        spec["bits"],
        spec["group_size"],
        spec["sym"],
        in_features,
        out_features,
        on_grid,
        scales,
        zeros,
        linear.bias,
        scale_dtype,
    )
    return shared.as_loaded(layer, linear.weight.device)


def requantize(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new layer of ``module``'s class with its bits, group size, symmetry, scale dtype and bias, holding ``weight``."""
    names = mro_names(module)
    cls = type(module)
    if not (names & GEMM_CLASSES or "TorchInt8AwqLinear" in names):
        raise NotImplementedError(
            f"quantplug-gptqmodel (awq) cannot requantize into {cls.__name__}: only the GEMM-layout kernels "
            f"({', '.join(sorted(GEMM_CLASSES))}) and TorchInt8AwqLinear are built here; merge with mode='dense'"
        )
    sym = bool(getattr(module, "sym", False))  # AutoAWQ layers are zero-point (asymmetric)
    scale_dtype = _scale_dtype(module)
    new_scales, zeros, on_grid = awq_params(
        weight.detach().float().cpu(),
        bits_of(module),
        module.group_size,
        sym,
        scale_dtype,
        keep=own_params(module),
    )
    return _build_like(module, new_scales, zeros, on_grid, scale_dtype)


def _scale_dtype(module: nn.Module) -> torch.dtype:
    scales = getattr(module, "scales", None)
    scale_dtype = scales.dtype if isinstance(scales, torch.Tensor) else torch.float16
    if "TorchInt8AwqLinear" in mro_names(module) or scale_dtype not in (torch.float16, torch.bfloat16):
        scale_dtype = torch.float16  # what AwqTorchLinear stores (and TorchInt8AwqLinear starts from)
    return scale_dtype


def _build_like(module: nn.Module, new_scales, zeros, on_grid, scale_dtype) -> nn.Module:
    """A new layer of ``module``'s class, bits, group size, symmetry and bias packing ``on_grid``."""
    names = mro_names(module)
    cls = type(module)
    bits = bits_of(module)
    requested = getattr(module, "requested_group_size", module.group_size)
    sym = bool(getattr(module, "sym", False))
    bias = getattr(module, "bias", None)
    packed = _pack_torch_awq(
        bits,
        requested,
        sym,
        module.in_features,
        module.out_features,
        on_grid,
        new_scales,
        zeros,
        bias,
        scale_dtype,
    )
    if cls is type(packed):
        new = packed
    else:
        if "WQLinear_GEMM" in names:  # AutoAWQ: WQLinear_GEMM(w_bit, group_size, in, out, bias, dev)
            new = cls(
                bits,
                requested,
                module.in_features,
                module.out_features,
                bias is not None,
                torch.device("cpu"),
            )
        else:
            new = cls(
                bits=bits,
                group_size=requested,
                sym=sym,
                desc_act=getattr(module, "desc_act", False),
                in_features=module.in_features,
                out_features=module.out_features,
                bias=bias is not None,
                register_buffers=True,
            )
        for name in ("qweight", "qzeros", "scales"):
            setattr(new, name, getattr(packed, name))
    return shared.finish_like(module, new, bias)


# -- QALoRA: group size and the zeros merge ----------------------------------------


def group_size(module: nn.Module) -> int | None:
    """The layer's input group (AWQ groups are always runs of consecutive columns)."""
    return shared.whole_groups(module, layout(module))  # None for TorchInt8AwqLinear (per channel)


def fold_into_zeros(module: nn.Module, offsets: torch.Tensor) -> nn.Module:
    """A new layer with ``module``'s codes bit for bit and each group's zero point moved by ``offsets``.

    AWQ dequantizes ``(code - zero) * scale`` with integer zero points in
    ``[0, 2^bits - 1]``: the new zero point is ``zero - round(offset /
    scale)``, clamped to that range.
    """
    if layout(module) != GEMM or group_size(module) is None:
        raise ValueError(
            f"the zeros merge rewrites the GEMM-layout AWQ buffers (qweight/qzeros/scales) with input groups; this "
            f"{type(module).__name__} (layout {layout(module)}) has none. Merge with mode='requantize' or 'dense'"
        )
    if getattr(module, "sym", False):
        raise ValueError(
            "a sym=True AWQ layer promises zero points of 2^(bits-1): quantize with sym=False (AWQ's usual "
            "zero-point format) to merge QALoRA adapters into the zero points"
        )
    bits = bits_of(module)
    codes, zeros = unpack_codes(
        module.qweight, module.qzeros, bits, module.out_features
    )  # (in, out), (groups, out)
    scales = module.scales.detach().float().T.cpu()  # (out, groups)
    step = torch.round(offsets.detach().float().cpu() / scales)
    new_zeros = (zeros.float().T.cpu() - step).clamp_(0, 2**bits - 1)
    group = torch.arange(module.in_features) // module.group_size
    on_grid = scales[:, group] * (codes.T.float().cpu() - new_zeros[:, group])
    new = _build_like(module, scales, new_zeros, on_grid, _scale_dtype(module))
    new_codes, _ = unpack_codes(new.qweight, new.qzeros, bits, module.out_features)
    if not torch.equal(new_codes.cpu(), codes.cpu()):
        raise RuntimeError("packing the moved zero points changed the AWQ codes; please report this")
    return new
