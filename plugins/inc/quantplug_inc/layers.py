"""INCWeightOnlyLinear primitives: format, dequantize, requantize, quantize, the adapter layer.

Facts about neural-compressor 3.x these rely on (3.10, read back to the v3.0 tag):

- ``forward`` builds ``self.weight``, a dense copy of the weight, on its first
  call (``recover()``, upcast to fp32 on CPU when the scales are fp16) and
  reuses it forever; on CPU it also turns the ``bias`` buffer into fp32 and
  sets ``g_idx``. The cache is a plain attribute that ``pack()``, ``.to()``
  and ``load_state_dict`` leave alone: after ``pack()`` into a used layer its
  forward keeps the old weight (or fails, bias back in fp16 against an fp32
  cache); after ``.double()`` or ``.to(bf16)`` it fails on mismatched dtypes.
  So weights are always read from the packed codes here, requantize builds a
  new layer, and :class:`IncLoraLayer` rebuilds the cache when moved.
- ``forward`` casts its input to the cache's dtype and returns that dtype:
  fp32 out for bf16 in. :class:`IncLoraLayer` casts the output back.
- ``recover()`` computes ``(code - zero).to(torch.int8) * scale``: for 8-bit
  asymmetric layers (codes and zeros in 0..255) the int8 cast wraps around,
  and the layer's own forward uses that wrong weight. :func:`dequantize`
  reproduces it, because the contract is "as the layer computes".
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from quantplug.plugin import LoraLayer
from torch import nn
from torch.nn import functional as F

from quantplug_inc import is_inc_layer

# neural-compressor 3.10's RTN module (torch/algorithms/weight_only/rtn.py) binds ``transformers`` at its
# own import only if transformers is imported by then, yet asks ``is_transformers_imported()`` again at
# each conversion: with transformers imported in between, convert() raises NameError ('transformers' is
# not defined). Every INC import of this plugin comes after this module's, so import transformers
# first, when it is installed (it is imported for any transformers model anyway).
with contextlib.suppress(ImportError):  # without transformers, INC never refers to it
    import transformers  # noqa: F401


@dataclass(frozen=True)
class Format:
    """The parameters an ``INCWeightOnlyLinear`` was quantized with, read back from the layer."""

    dtype: str  # "int", "nf4", "fp4", ...
    bits: int
    group_size: int
    sym: bool
    full_range: bool
    use_optimum_format: bool
    compression_dtype: torch.dtype
    compression_dim: int
    scale_dtype: torch.dtype
    has_g_idx: bool

    @property
    def scheme(self) -> str:
        return "sym" if self.sym else "asym"


def _device(module: nn.Module) -> torch.device:
    return module.qweight.device  # module.device is the string given at construction, never updated


def _group_index(module: nn.Module) -> torch.Tensor:
    """The quantization group of each input channel, as ``recover()`` indexes the scales."""
    g_idx = module.g_idx  # a buffer (act-order layers), a cache recover() left, or None
    if g_idx is None:
        return torch.arange(module.in_features, device=_device(module)) // module.group_size
    return g_idx.long()


def layer_format(module: nn.Module) -> Format:
    """Bits, group size, symmetry and storage settings of ``module``.

    Symmetry is not stored: optimum-format layers always carry zero points
    (``2**(bits-1)`` for every group when quantized symmetrically), others
    have ``qzeros`` only when asymmetric. ``full_range`` (codes down to
    ``-2**(bits-1)``, signed scales) shows in the codes and scales.
    """
    unpacked = module.unpack()
    codes, scales, zp = unpacked["int_weight"], unpacked["scales"], unpacked["zp"]
    bits = int(module.bits)
    is_int = "int" in module.dtype
    sym = True
    if is_int and zp is not None:
        sym = bool(module.use_optimum_format and (zp == 2 ** (bits - 1)).all())
    full_range = False
    if is_int and sym:
        low = -(2 ** (bits - 1))
        signed = codes - 2 ** (bits - 1) if module.use_optimum_format else codes
        full_range = bool((scales < 0).any() or (signed == low).any())
    return Format(
        dtype=module.dtype,
        bits=bits,
        group_size=int(module.group_size),
        sym=sym,
        full_range=full_range,
        use_optimum_format=bool(module.use_optimum_format),
        compression_dtype=module.compression_dtype,
        compression_dim=int(module.compression_dim),
        # 3.0 to 3.5 keep no scale_dtype attribute; it only matters outside the optimum format
        scale_dtype=getattr(module, "scale_dtype", module.float_type),
        has_g_idx="g_idx" in module._buffers,
    )


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``forward`` computes in: its cache's, else what ``recover()`` gives (fp16 -> fp32 on CPU)."""
    cached = module.__dict__.get("weight")
    if isinstance(cached, torch.Tensor):
        return cached.dtype
    dtype = module.float_type
    if dtype == torch.float16 and _device(module).type == "cpu":
        return torch.float32
    return dtype


def dequantize(module: nn.Module) -> torch.Tensor:
    """The dense weight from the packed codes, as ``recover()`` and ``forward`` compute it.

    ``recover()`` itself loops over input channels in Python (seconds for a
    4096-wide layer, and DoRA calls this every step) and stores ``g_idx`` on
    the layer, so this runs the same arithmetic vectorised on INC's own
    ``unpack()``; the tests check it bit for bit against ``recover()``.
    """
    with torch.no_grad():
        unpacked = module.unpack()
        codes, scales, zp = unpacked["int_weight"], unpacked["scales"], unpacked["zp"]
        group = _group_index(module)
        if zp is not None:
            # the int8 cast is INC's: it wraps 8-bit asymmetric codes, and forward uses it
            weight = torch.subtract(codes, zp[:, group]).to(torch.int8) * scales[:, group]
        else:
            weight = codes * scales[:, group]
        weight = weight.to(module.float_type)
        return weight.to(compute_dtype(module)).contiguous()


def requantize(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new layer of ``module``'s class and format holding ``weight``, built as INC's RTN builds one.

    ``quant_tensor`` and ``pack`` are what ``RTNQuantizer.convert`` calls;
    ``module`` is not touched (its cache, if any, stays valid).
    """
    from neural_compressor.torch.algorithms.weight_only.utility import quant_tensor

    fmt = layer_format(module)
    device = _device(module)
    with torch.no_grad():
        dense = weight.detach().to(device=device, dtype=torch.float32).clone()  # quant_tensor works in place
        perm = None
        if fmt.has_g_idx:
            # act-order layers: quantize each group's channels together, keep the channel -> group map
            perm = torch.argsort(module.g_idx.long(), stable=True)
            dense = dense[:, perm].contiguous()
        codes, scales, zp = quant_tensor(
            dense,
            dtype=fmt.dtype,
            bits=fmt.bits,
            group_size=fmt.group_size,
            scheme=fmt.scheme,
            return_int=True,
            full_range=fmt.full_range,
        )
        if perm is not None:
            codes = codes[:, torch.argsort(perm)]
    return _build_like(module, fmt, codes, scales, zp, perm)


def _build_like(module: nn.Module, fmt: Format, codes, scales, zp, perm) -> nn.Module:
    """A new layer of ``module``'s class and format, packing ``codes``, ``scales`` and ``zp`` with its bias."""
    device = _device(module)
    with torch.no_grad():
        bias = module.bias
        new = type(module)(
            module.in_features,
            module.out_features,
            dtype=fmt.dtype,
            bits=fmt.bits,
            group_size=fmt.group_size,
            zp=zp is not None,
            bias=bias is not None,
            scale_dtype=fmt.scale_dtype,
            compression_dtype=fmt.compression_dtype,
            compression_dim=fmt.compression_dim,
            g_idx=perm is not None,
            device=str(device),
            use_optimum_format=fmt.use_optimum_format,
            **getattr(module, "kwargs", {}),
        )
        # g_idx as the permutation: that is what INC's GPTQ hands to pack()
        new.pack(codes, scales, zp, None if bias is None else bias.detach().clone(), g_idx=perm)
    new.train(module.training)
    new.requires_grad_(False)
    warm(new)  # as IncLoraLayer does at wrap time: a traced forward cannot build the cache
    return new


# -- QALoRA: group size and the zeros merge ----------------------------------------


def group_size(module: nn.Module) -> int | None:
    """The layer's input group; ``None`` per channel (``group_size=-1``) and for act-order layers (``g_idx``)."""
    group, in_features = int(module.group_size), int(module.in_features)
    if group <= 0 or group >= in_features or in_features % group or "g_idx" in module._buffers:
        return None
    return group


def fold_into_zeros(module: nn.Module, offsets: torch.Tensor) -> nn.Module:
    """A new layer with ``module``'s codes bit for bit and each group's zero point moved by ``offsets``.

    INC dequantizes ``(code - zp) * scale`` with integer zero points in
    ``[0, 2^bits - 1]`` (asymmetric ``int`` layers only; symmetric ones store
    none, or ``2^(bits-1)`` in the optimum format): the new zero point is
    ``zp - round(offset / scale)``, clamped to that range.
    """
    if group_size(module) is None:
        raise ValueError(
            f"this INCWeightOnlyLinear has no groups of consecutive input columns (group_size={module.group_size}, "
            f"act-order g_idx: {'g_idx' in module._buffers})"
        )
    fmt = layer_format(module)
    if "int" not in fmt.dtype or fmt.sym:
        raise ValueError(
            f"this {fmt.dtype} layer ({fmt.scheme}) has no zero points to move: quantize with dtype='int' and "
            "use_sym=False (variant int4-g32-asym) to merge QALoRA adapters into the zero points"
        )
    unpacked = module.unpack()
    codes, scales, zp = unpacked["int_weight"], unpacked["scales"], unpacked["zp"]
    step = torch.round(offsets.detach().to(scales.device).float() / scales.float())
    new_zp = (zp.float() - step).clamp_(0, 2**fmt.bits - 1).to(zp.dtype)
    new = _build_like(module, fmt, codes.clone(), scales.clone(), new_zp, None)
    if not torch.equal(new.unpack()["int_weight"], codes):
        raise RuntimeError("packing the moved zero points changed the INC codes; please report this")
    return new


@contextmanager
def _quiet_inc():
    """INC logs a table at INFO for every conversion; keep it to warnings while we build layers."""
    inc_logger = logging.getLogger("neural_compressor")
    level = inc_logger.level
    inc_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        inc_logger.setLevel(level)


def quantize(linear: nn.Module, *, dtype: str, bits: int, group_size: int, use_sym: bool) -> nn.Module:
    """An ``INCWeightOnlyLinear`` from a plain linear, through INC's RTN ``prepare``/``convert``.

    RTN's convert overwrites the source linear's weight with the integer
    codes (``quant_tensor`` is in place on ``m.weight.detach()``), so it gets
    a copy; ``linear`` is left as it was.
    """
    from neural_compressor.torch.quantization import RTNConfig, convert, prepare

    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    copy.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=False)
    if linear.bias is not None:
        copy.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    config = RTNConfig(dtype=dtype, bits=bits, group_size=group_size, use_sym=use_sym)
    with _quiet_inc():
        model = convert(prepare(nn.Sequential(copy), config))
    layer = model[0]
    layer.requires_grad_(False)
    return layer


def warm(module: nn.Module) -> None:
    """Build the layer's dense weight cache now, through its own forward, as its first call would."""
    if "weight" not in module.__dict__:
        with torch.no_grad():
            module(torch.zeros(1, module.in_features, dtype=compute_dtype(module), device=_device(module)))


def _codes_key(module: nn.Module) -> tuple:
    """Identity and in-place version of the tensors the cache was built from."""
    names = ("qweight", "scales", "qzeros", "bias", "g_idx")
    tensors = [getattr(module, name, None) for name in names] if is_inc_layer(module) else []
    return tuple((id(t), t._version) for t in tensors if isinstance(t, torch.Tensor))


def _reload_cache(layer: IncLoraLayer, incompatible_keys=None) -> None:
    # load_state_dict copies into the base's buffers in place, .to() replaces them; both
    # leave INC's cache on the old weight (its forward then mixes the old weight with the
    # new bias, or fails on mismatched dtypes)
    if is_inc_layer(layer.base) and _codes_key(layer.base) != layer._cached_codes:
        layer.rebuild_cache()


class IncLoraLayer(LoraLayer):
    """The core's adapter layer, calling the INC base in a way ``torch.compile`` can trace.

    ``INCWeightOnlyLinear.forward`` casts its input to its fp32 cache and
    returns fp32 even for bf16 or fp16 input (a bf16 model would turn fp32 at
    the first adapter layer), so the output is cast back to the input's
    dtype. Once the cache exists, its forward is ``F.linear(x.to(W.dtype), W,
    bias)`` plus a ``logger.debug`` call that dynamo refuses; the same
    product is computed here without the log, and the cache is built when
    the layer is wrapped rather than inside a traced call (its numpy
    unpacking cannot be traced either). The cache is rebuilt when the layer
    is moved (``.to()``) or its base's codes are loaded (``load_state_dict``).
    """

    def __init__(self, base: nn.Module, backend: str, **kwargs) -> None:
        super().__init__(base, backend, **kwargs)
        warm(base)
        self._cached_codes = _codes_key(base)
        self.register_load_state_dict_post_hook(_reload_cache)

    def rebuild_cache(self) -> None:
        """Drop the INC base's dense cache and build it again from its packed codes."""
        base = self.base
        if is_inc_layer(base):
            base.__dict__.pop("weight", None)
            if _device(base).type != "meta":
                warm(base)
            self._cached_codes = _codes_key(base)

    def _apply(self, fn, recurse=True):
        # .to()/.double()/.cuda() convert the base's buffers but not its cache (a plain
        # attribute), after which INC's own forward fails on mismatched dtypes or devices
        result = super()._apply(fn, recurse)
        _reload_cache(self)
        return result

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        cached = base.__dict__.get("weight")
        # no cache: a base swapped in after wrapping (a dense merge); its own forward runs
        y = base(x) if cached is None else F.linear(x.to(cached.dtype), cached, base.bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)
