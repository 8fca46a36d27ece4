"""Reading, rebuilding and building compressed-tensors layers (imports torch and compressed_tensors).

A compressed-tensors layer is a plain ``nn.Linear`` carrying a
``quantization_scheme``, a ``quantization_status`` and its qparams as
parameters. Its state decides where the weight is (see the package
docstring): ``"qdq"`` (float weight, fake-quantized in every forward),
``"compressed"`` (codes only: ``weight_packed`` or an int8/float8 ``weight``)
or ``"decompressed"`` (the dequantized codes). Every read and every rebuild
goes through the library's own functions, so dequantize is its own
decompression and a requantized layer is compressed by its own compressor.

Facts about compressed-tensors 0.20.0 this module works around, each tested
in ``tests/test_compressed_tensors.py``:

- a compressed layer has no forward of its own: ``weight`` is gone
  (pack-quantized) or holds int8/float8 codes. transformers' ``from_pretrained``
  registers a pre-hook on the whole model that decompresses every quantized
  layer, in place, on the model's first forward. The adapter layer runs a
  compressed base by decompressing it on the fly (what ``CompressedLinear``
  did before 0.15).
- that pre-hook decompresses every quantized module it finds, whatever its
  state, and fails on a module that is already decompressed
  (``KeyError: 'weight_packed'``): a merge keeps each layer's state, so a
  model that has not run its first forward yet stays all compressed.
- the QDQ of activations (``FP8_DYNAMIC``, ``W8A8``) runs under
  ``torch.no_grad``: no gradient reaches the layer's input. The adapter layer
  and ``prepare_for_training`` use a straight-through estimator instead.
- the library's own decompress -> compress moves some bf16 int8 codes by one step (bf16 cannot
  hold ``(q - z) * s`` for ``|q - z| >= 128``): a decompressed bf16 int8 layer, merged or not,
  drifts when it is saved. A frozen layer's forward rounds in bf16 too, so a requantized frozen
  layer stores a weight nudged to round back to its codes (:func:`_rounds_to`).
- symmetric int4 min-max requantization is not idempotent: the scale is
  ``absmax / 7.5`` and codes reach -8, so the scale of a dequantized weight is
  not the scale it was built with. Requantize keeps, per scale entry,
  whichever of the layer's own qparams and fresh min-max qparams is closer.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from quantplug.plugin import LoraLayer
from torch import nn

from quantplug_compressed_tensors import NAME, VARIANTS, is_ct_layer

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# the names a compressor reads or writes for the weight; everything else (bias, input_scale, ...)
# is carried over unchanged
WEIGHT_KEYS = ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point")
REQUANT_STRATEGIES = ("tensor", "channel", "group")


# -- reading a layer ---------------------------------------------------------------


def state(module: nn.Module) -> str:
    """``"compressed"``, ``"decompressed"`` or ``"qdq"`` (initialized, calibration or frozen)."""
    from compressed_tensors.quantization import QuantizationStatus

    status = getattr(module, "quantization_status", None)
    if status == QuantizationStatus.COMPRESSED:
        return "compressed"
    if status == QuantizationStatus.DECOMPRESSED:
        return "decompressed"
    return "qdq"


def _weight_args(module: nn.Module):
    return module.quantization_scheme.weights


def _enabled(module: nn.Module) -> bool:
    """Whether the library's forward quantizes anything (as ``set_forward_quantized`` decides)."""
    return bool(getattr(module, "quantization_enabled", True)) and (
        getattr(module, "quantization_status", None) is not None
    )


def _direct_state(module: nn.Module) -> dict[str, torch.Tensor]:
    from compressed_tensors.utils import get_direct_state_dict

    # a linear without bias lists "bias": None
    return {name: tensor for name, tensor in get_direct_state_dict(module).items() if tensor is not None}


def _compressor(module: nn.Module):
    """The library's compressor class for ``module``'s format, found as its own ``compress_module`` does."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.config import CompressionFormat

    scheme = module.quantization_scheme
    fmt = getattr(scheme, "format", None) or infer_module_format(type(module), scheme)
    return BaseCompressor.get_value_from_registry(CompressionFormat(fmt).value)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The dense ``(out, in)`` weight the layer's forward multiplies by, by the library's own code.

    Compressed: the format's ``decompress`` (what the model's decompression
    hook runs). Decompressed: the stored weight. Otherwise: the forward's own
    fake quantization (``forward_quantize``) of the stored weight.
    """
    with torch.no_grad():
        kind = state(module)
        if kind == "compressed":
            weight = _compressor(module).decompress(_direct_state(module), module.quantization_scheme)[
                "weight"
            ]
        elif kind == "decompressed" or not _enabled(module):
            weight = module.weight
        else:
            from compressed_tensors.quantization.lifecycle.forward import forward_quantize

            weight = forward_quantize(module, module.weight, "weight", _weight_args(module))
        return weight.detach().clone()


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The stored float weight's dtype, or for codes the scale's (what decompression returns)."""
    weight = module._parameters.get("weight")
    if weight is not None and weight.is_floating_point() and weight.dtype not in FP8_DTYPES:
        return weight.dtype
    scale = module._parameters.get("weight_scale")
    return scale.dtype if scale is not None else None


def _qparams(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight scale and zero point (unpacked), or ``None`` for a layer without zero points."""
    sd = _direct_state(module)
    if state(module) == "compressed" and "weight_zero_point" in sd:
        # pack-quantized asymmetric layers pack their zero points too
        sd = _compressor(module).decompress(sd, module.quantization_scheme)
    return sd["weight_scale"], sd.get("weight_zero_point")


def _codes(module: nn.Module, scale, zero) -> torch.Tensor:
    """The layer's integer (or float8) codes, as float32."""
    from compressed_tensors.quantization.lifecycle.forward import quantize

    args = _weight_args(module)
    if state(module) == "qdq":  # the codes the forward rounds to, in the weight's dtype as it does
        return quantize(module.weight.detach(), scale, zero, args).float()
    # In float32 the codes come back exactly from the dequantized weight: a bf16 (q - z) * s is within
    # |q - z| * 2^-9 < 0.5 of its code for any 8-bit code.
    return quantize(dequantize(module).float(), scale, zero, args).float()


def variant(module: nn.Module) -> str | None:
    scheme = module.quantization_scheme
    found = (_args_key(scheme.weights), _args_key(scheme.input_activations))
    for name, (weights, inputs) in VARIANTS.items():
        if found == (_args_key(_make_args(weights)), _args_key(_make_args(inputs))):
            return name
    return None


def _args_key(args) -> tuple | None:
    if args is None:
        return None
    return (args.num_bits, str(args.type), str(args.strategy), args.group_size, args.symmetric, args.dynamic)


def _make_args(settings: dict | None):
    from compressed_tensors.quantization import QuantizationArgs

    return None if settings is None else QuantizationArgs(**settings)


def group_size(module: nn.Module) -> int | None:
    """The group of a ``group``-strategy layer; ``None`` for tensor/channel/block strategies and for
    activation-ordered groups (a ``weight_g_idx``, compressed-tensors < 0.19), whose columns are permuted."""
    args = _weight_args(module)
    if str(args.strategy) != "group" or not args.group_size or "weight_g_idx" in module._parameters:
        return None
    group, in_features = int(args.group_size), int(module.in_features)
    return group if group < in_features and in_features % group == 0 else None


# -- building a layer ----------------------------------------------------------------


def _minmax_qparams(weight: torch.Tensor, args, like_scale: torch.Tensor, like_zero: torch.Tensor | None):
    """Scale and zero point of ``weight`` by the library's ``calculate_qparams`` over the min and max of
    each scale entry's elements: what its default min-max observer computes, without an observer."""
    from compressed_tensors.quantization.utils import calculate_qparams

    strategy = str(args.strategy)
    w = weight.float()
    if strategy == "tensor":
        low, high = w.amin().reshape(1), w.amax().reshape(1)
    elif strategy == "channel":
        low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        grouped = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scale, zero = calculate_qparams(low, high, args)
    scale = scale.to(like_scale.dtype).reshape(like_scale.shape)
    zero = None if like_zero is None else zero.to(like_zero.dtype).reshape(like_zero.shape)
    return scale, zero


def _per_entry(err: torch.Tensor, args) -> torch.Tensor:
    """Sum a per-element quantity over the elements that share each scale entry."""
    strategy = str(args.strategy)
    if strategy == "tensor":
        return err.sum().reshape(1)
    if strategy == "channel":
        return err.sum(dim=1, keepdim=True)
    return err.unflatten(-1, (err.shape[-1] // args.group_size, args.group_size)).sum(dim=-1)


def _roundtrip_error(target: torch.Tensor, scale, zero, args) -> torch.Tensor:
    """Squared error per scale entry of storing ``target`` with these qparams (the library's own
    quantize, then its dequantize in the scale's dtype, as decompression does)."""
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
    from compressed_tensors.quantization.lifecycle.forward import quantize

    codes = quantize(target, scale, zero, args)
    back = ct_dequantize(codes, scale, zero, args).float()
    return _per_entry((back - target).square(), args)


def _check_requantizable(module: nn.Module) -> None:
    args = _weight_args(module)
    sd = module._parameters
    problem = None
    if str(args.strategy) not in REQUANT_STRATEGIES:
        problem = f"strategy {args.strategy!r} (supported: {', '.join(REQUANT_STRATEGIES)})"
    elif not (str(args.type) == "int" or (str(args.type) == "float" and args.num_bits == 8)):
        problem = f"{args.type} weights with {args.num_bits} bits (supported: int, FP8)"
    elif "weight_global_scale" in sd or "weight_g_idx" in sd:
        problem = "a global scale or an activation-ordered g_idx"
    if problem is not None:
        raise ValueError(f"{NAME}: cannot requantize a layer with {problem}; merge with mode='dense'")


def requantize(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new layer with ``module``'s scheme, state and bias holding ``weight``.

    Per scale entry (tensor, row or group) the new layer keeps the layer's own
    scale and zero point, or takes the library's min-max qparams of
    ``weight`` (observer-free), whichever stores ``weight`` more closely; the
    codes are then the library's own rounding. Requantizing the layer's own
    weight gives its codes back. ``module`` is left unchanged.
    """
    from compressed_tensors.quantization.lifecycle.forward import quantize

    _check_requantizable(module)
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}, the layer is {(module.out_features, module.in_features)}"
        )
    args = _weight_args(module)
    scale, zero = _qparams(module)
    with torch.no_grad():
        target = weight.detach().to(device=scale.device, dtype=torch.float32)
        fresh_scale, fresh_zero = _minmax_qparams(target, args, scale, zero)
        pick = _roundtrip_error(target, fresh_scale, fresh_zero, args) < _roundtrip_error(
            target, scale, zero, args
        )
        scale = torch.where(pick.reshape(scale.shape), fresh_scale, scale)
        if zero is not None:
            zero = torch.where(pick.reshape(zero.shape), fresh_zero, zero)
        codes = quantize(target, scale, zero, args)
        return _assemble(module, codes, scale, zero)


def fold_into_zeros(module: nn.Module, offsets: torch.Tensor) -> nn.Module:
    """A new layer with ``module``'s codes and scales and zero points ``round(z - offsets / s)``.

    compressed-tensors stores integer zero points (int8, packed to the
    weight's bits in pack-quantized checkpoints) clamped to the code range, so
    each group moves by the multiple of its scale nearest to its offset.
    """
    from compressed_tensors.quantization.utils import calculate_range

    group = group_size(module)
    args = _weight_args(module)
    if group is None or args.symmetric or str(args.type) != "int":
        raise ValueError(
            f"this {NAME} layer has no zero point per input group (strategy {args.strategy}, "
            f"symmetric={args.symmetric}, type {args.type}); asymmetric int group layers have them"
        )
    scale, zero = _qparams(module)
    if zero is None:
        raise ValueError(f"this {NAME} layer stores no zero points")
    with torch.no_grad():
        codes = _codes(module, scale, zero)
        low, high = calculate_range(args, zero.device)
        shift = offsets.detach().to(device=zero.device, dtype=torch.float32).reshape(zero.shape)
        steps = shift / torch.where(scale == 0, 1.0, scale.float())
        moved = torch.round(zero.float() - steps).clamp_(low.item(), high.item())
        new_zero = torch.where(scale == 0, zero.float(), moved).to(zero.dtype)
        return _assemble(module, codes, scale, new_zero)


def _assemble(module: nn.Module, codes: torch.Tensor, scale, zero) -> nn.Module:
    """A new layer in ``module``'s state holding ``codes`` with these qparams.

    The format's own ``compress`` builds the stored tensors from the float32
    weight ``(codes - zero) * scale`` (which it rounds back to exactly these
    codes), and its ``decompress`` builds a decompressed layer's weight, so the
    layer holds what the library itself would have written.
    """
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    scheme, args = module.quantization_scheme, _weight_args(module)
    original = _direct_state(module)
    kept = {k: v.detach().clone() for k, v in original.items() if k not in WEIGHT_KEYS}
    grid = ct_dequantize(codes, scale.float(), zero, args, dtype=torch.float32)
    plain = {**kept, "weight": grid, "weight_scale": scale.detach().clone()}
    if zero is not None:
        plain["weight_zero_point"] = zero.detach().clone()
    compressor = _compressor(module)
    packed = compressor.compress(plain, scheme)
    kind = state(module)
    if kind == "compressed":
        built = packed
    else:
        built = compressor.decompress(packed, scheme)
        if kind == "qdq":
            weight = _rounds_to(built["weight"].to(original["weight"].dtype), codes, scale, zero, args)
            built = {**built, "weight": weight}
    # the same tensors as the original, by name (a frozen symmetric layer keeps its zero-filled
    # zero point, which the compressor drops)
    tensors = {
        name: built[name] if name in built else value.detach().clone() for name, value in original.items()
    }
    return _new_layer(module, tensors)


def _rounds_to(weight: torch.Tensor, codes: torch.Tensor, scale, zero, args) -> torch.Tensor:
    """``weight`` with each element moved by at most one step of its dtype so that the forward's own
    rounding (``quantize`` in the weight's dtype) gives ``codes``: in bf16, ``(q - z) * s / s`` can
    land on the wrong side of a rounding boundary (2 of 32768 int8 codes of a 128x256 layer)."""
    from compressed_tensors.quantization.lifecycle.forward import quantize

    wrong = quantize(weight, scale, zero, args).float() != codes
    for direction in (float("inf"), float("-inf")):
        if not wrong.any():
            break
        moved = torch.nextafter(weight, torch.full_like(weight, direction))
        fixed = wrong & (quantize(moved, scale, zero, args).float() == codes)
        weight = torch.where(fixed, moved, weight)
        wrong &= ~fixed
    return weight


def _new_layer(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module of ``module``'s class with these parameters and its quantization attributes."""
    from compressed_tensors.quantization.lifecycle.forward import set_forward_quantized

    new = type(module).__new__(type(module))
    nn.Module.__init__(new)
    new.in_features, new.out_features = module.in_features, module.out_features
    for name, tensor in tensors.items():
        old = module._parameters.get(name)
        grad = old is not None and old.requires_grad and name == "bias"
        new.register_parameter(name, nn.Parameter(tensor, requires_grad=grad))
    if "bias" not in tensors:
        new.register_parameter("bias", None)
    for attr in ("quantization_scheme", "quantization_status", "quantization_enabled"):
        if attr in module.__dict__:
            setattr(new, attr, copy.deepcopy(module.__dict__[attr]))
    if "forward" in module.__dict__:  # the library's quantized forward, bound to the new layer
        set_forward_quantized(new)
    new.train(module.training)
    return new


def quantize(linear: nn.Module, variant: str | None = None, state: str = "decompressed") -> nn.Module:
    """A compressed-tensors layer for ``linear`` in ``variant``, by the library's own API.

    ``initialize_module_for_quantization`` attaches the scheme and its
    qparams, ``calculate_qparams`` fills them from the weight's min and max
    (the default min-max observer, without data), then ``compress_module``
    compresses it in the format the library infers. ``state`` picks where to
    stop: ``"frozen"`` (before compressing: float weight, QDQ forward),
    ``"compressed"``, or ``"decompressed"`` (default: after the library's own
    ``decompress_module``, the state a loaded checkpoint reaches on its first
    forward). ``linear`` is left unchanged.
    """
    from compressed_tensors.compressors.base import compress_module, decompress_module
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    variant = variant or next(iter(VARIANTS))
    if variant not in VARIANTS:
        raise ValueError(f"unknown {NAME} variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    if state not in ("frozen", "compressed", "decompressed"):
        raise ValueError(f"unknown state {state!r}; choose 'frozen', 'compressed' or 'decompressed'")
    weights, inputs = VARIANTS[variant]
    args = _make_args(weights)
    weight = linear.weight.detach()
    if args.group_size and weight.shape[1] % args.group_size:
        raise ValueError(
            f"{NAME} variant {variant!r} needs in_features ({weight.shape[1]}) to be a multiple of its "
            f"group size {args.group_size}"
        )
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=_make_args(inputs))
    layer = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=linear.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
    layer.requires_grad_(False)
    initialize_module_for_quantization(layer, scheme)
    with torch.no_grad():
        zero = layer._parameters.get("weight_zero_point")
        scale, fresh_zero = _minmax_qparams(weight, scheme.weights, layer.weight_scale, zero)
        layer.weight_scale.copy_(scale)
        if zero is not None:
            zero.copy_(fresh_zero)
    layer.quantization_status = QuantizationStatus.FROZEN
    if state != "frozen":
        compress_module(layer)
        if state == "decompressed":
            decompress_module(layer)
    return layer


# -- the adapter layer -------------------------------------------------------------------


def _quantizes_activations(module: nn.Module) -> bool:
    scheme = module.quantization_scheme
    return _enabled(module) and bool(scheme.input_activations or scheme.output_activations)


def _straight_through(module: nn.Module, value: torch.Tensor, base_name: str, args) -> torch.Tensor:
    """The library's activation QDQ in the forward, the identity in the backward."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    quantized = forward_quantize(module, value, base_name, args)
    return value + (quantized - value).detach() if value.requires_grad else quantized


def run_layer(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s forward in any state, with a backward pass to ``x``.

    The library's own steps (activation QDQ, weight as :func:`dequantize`
    gives it, ``F.linear``), except that a compressed weight is decompressed
    here, for this call only, and the activation QDQ passes the gradient
    straight through.
    """
    scheme = module.quantization_scheme
    enabled = _enabled(module)
    if enabled and scheme.input_activations:
        x = _straight_through(module, x, "input", scheme.input_activations)
    out = F.linear(x, dequantize(module).to(x.dtype), module.bias)
    if enabled and scheme.output_activations:
        out = _straight_through(module, out, "output", scheme.output_activations)
    return out


class CompressedTensorsLoraLayer(LoraLayer):
    """The core's adapter layer; the base runs through :func:`run_layer` when it is compressed, or when
    its forward would quantize activations under ``no_grad`` while the input needs a gradient."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if state(base) == "compressed" or (
            torch.is_grad_enabled() and x.requires_grad and _quantizes_activations(base)
        ):
            return run_layer(base, x)
        return base(x)


def prepare_for_training(model: nn.Module) -> None:
    """Give unwrapped layers that would stop the gradient (activation QDQ) a straight-through forward.

    Wrapped layers already route through :func:`run_layer`. The replacement
    forward keeps ``__wrapped__`` pointing at ``nn.Linear.forward``, as the
    library's own does, so its ``clear_quantization`` still unwraps it.
    """
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LoraLayer)}
    for module in model.modules():
        if id(module) in wrapped or not is_ct_layer(module) or not _quantizes_activations(module):
            continue
        if getattr(module.forward, "_quantplug_straight_through", False):
            continue

        @functools.wraps(nn.Linear.forward)
        def forward(self, input):
            return run_layer(self, input)

        forward._quantplug_straight_through = True
        module.forward = forward.__get__(module)
