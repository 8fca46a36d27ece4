"""The awq backend of quantplug-gptqmodel on AWQ layers built by gptqmodel itself, on CPU.

Layers: ``AwqTorchLinear`` from ``quantplug_quantize`` (AWQ's quantizer, then
the library's ``pack``), and ``TorchFusedAwqLinear`` / ``TorchAtenAwqLinear`` /
``TorchInt8AwqLinear`` holding the same GEMM buffers, as gptqmodel's loader
fills them. AutoAWQ is not installed (it does not support transformers 5):
its ``WQLinear_GEMM`` is exercised through a stand-in with its class name,
constructor and CPU forward.
"""

from __future__ import annotations

import gptqmodel_helpers as testing
import pytest
import quantplug as qp
import quantplug_gptqmodel.awq
import torch
from gptqmodel.nn_modules.qlinear.torch import TorchLinear
from gptqmodel.nn_modules.qlinear.torch_aten_kernel_awq import TorchAtenAwqLinear
from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
from gptqmodel.nn_modules.qlinear.torch_fused_awq import TorchFusedAwqLinear
from gptqmodel.nn_modules.qlinear.torch_int8_awq import TorchInt8AwqLinear
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
from gptqmodel_helpers import IN, OUT, dense, inputs, reference, same_state, state, wrapped
from quantplug._registry import hook, load_plugins
from quantplug.testing import BackendConformance, relative_error
from quantplug_gptqmodel.awq import _layers
from torch import nn

# -- building layers -----------------------------------------------------------


def awq(variant: str = "int4-g32-asym", seed: int = 0, bias: bool = True) -> nn.Module:
    return qp.quantize(dense(seed, bias), "awq", variant)


def packs(variant: str) -> bool:
    """Whether the installed gptqmodel's AwqTorchLinear packs ``variant``'s bit width (2-8 from 7.6, else 4)."""
    return _layers.parse_variant(variant)["bits"] in _layers.packable_bits()


def as_kernel(source: nn.Module, cls) -> nn.Module:
    """A ``cls`` layer holding ``source``'s GEMM buffers, the way gptqmodel's loader fills one."""
    layer = cls(
        bits=source.bits,
        group_size=source.requested_group_size,
        sym=source.sym,
        desc_act=False,
        in_features=IN,
        out_features=OUT,
        bias=source.bias is not None,
        register_buffers=True,
    )
    for name in ("qweight", "qzeros", "scales", "bias"):
        setattr(layer, name, getattr(source, name).clone())
    layer.post_init()
    return layer.eval()


class WQLinear_GEMM(nn.Module):
    """Stand-in for AutoAWQ's ``awq.modules.linear.gemm.WQLinear_GEMM``: same constructor, buffers, CPU forward."""

    def __init__(self, w_bit, group_size, in_features, out_features, bias, dev):
        super().__init__()
        self.in_features, self.out_features, self.w_bit = in_features, out_features, w_bit
        self.group_size = group_size if group_size != -1 else in_features
        pack = 32 // w_bit
        self.register_buffer(
            "qweight", torch.zeros(in_features, out_features // pack, dtype=torch.int32, device=dev)
        )
        self.register_buffer(
            "qzeros",
            torch.zeros(in_features // self.group_size, out_features // pack, dtype=torch.int32, device=dev),
        )
        self.register_buffer(
            "scales",
            torch.zeros(in_features // self.group_size, out_features, dtype=torch.float16, device=dev),
        )
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=torch.float16, device=dev)
        ) if bias else setattr(self, "bias", None)

    @torch.no_grad()
    def forward(self, x):  # AutoAWQ's path without its CUDA extension
        out = x.half() @ dequantize_gemm(self.qweight, self.qzeros, self.scales, self.w_bit, self.group_size)
        out = out.to(x.dtype)
        return out + self.bias if self.bias is not None else out


WQLinear_GEMM.__module__ = "awq.modules.linear.gemm"


def autoawq() -> nn.Module:
    source = awq("int4-g32-asym")
    layer = WQLinear_GEMM(4, 32, IN, OUT, True, torch.device("cpu"))
    for name in ("qweight", "qzeros", "scales", "bias"):
        setattr(layer, name, getattr(source, name).clone())
    return layer.eval()


def dequant(layer: nn.Module) -> torch.Tensor:
    return testing.dequant(layer, "awq")


KERNELS = {
    "AwqTorchLinear": lambda: awq("int4-g32-asym"),
    "AwqTorchLinear-sym-bf16": lambda: awq("int4-g64-sym").to(torch.bfloat16),
    "TorchFusedAwqLinear": lambda: as_kernel(awq("int4-g32-asym"), TorchFusedAwqLinear),
    "TorchAtenAwqLinear": lambda: as_kernel(awq("int4-g32-asym"), TorchAtenAwqLinear),
    "TorchInt8AwqLinear": lambda: as_kernel(awq("int4-g32-asym"), TorchInt8AwqLinear),
    "WQLinear_GEMM": autoawq,
}


# -- plugin, version, detection ----------------------------------------------------


def test_import_and_backend_info_are_light():
    testing.check_import_and_backend_info_are_light("quantplug_gptqmodel.awq")


def test_version_probe():
    testing.check_version_probe("awq", quantplug_gptqmodel.awq.REQUIREMENT, "quantplug-gptqmodel")


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_detect_claims_awq_kernels(kernel):
    assert qp.detect(KERNELS[kernel]()) == "awq"


def test_detect_ignores_other_layers():
    gptq = TorchLinear(bits=4, group_size=32, sym=True, desc_act=False, in_features=IN, out_features=OUT)
    from gptqmodel.nn_modules.qlinear.paroquant import ParoLinear  # AWQ-packed, but rotates its input

    paro = ParoLinear.__new__(ParoLinear)
    nn.Module.__init__(paro)
    lookalike = type("WQLinear_GEMM", (nn.Module,), {"__module__": "mylib.layers"})()  # not AutoAWQ's
    for module in (nn.Linear(IN, OUT), gptq, paro, lookalike, nn.Embedding(4, 4)):
        assert quantplug_gptqmodel.awq.quantplug_detect_layer(module) is None, type(module).__name__


# -- dequantize --------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant", ["int4-g32-asym", "int4-g128-sym", "int4-gall-asym", "int8-g32-asym", "int3-g64-sym"]
)
def test_dequantize_is_the_librarys(variant):
    if not packs(variant):
        with pytest.raises(NotImplementedError, match="SUPPORTS_BITS"):
            awq(variant)
        return
    layer = awq(variant)
    before = state(layer)
    weight = dequant(layer)
    assert weight.dtype == torch.float16 and weight.shape == (OUT, IN)
    lib = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, layer.bits, layer.group_size)
    assert torch.equal(weight, lib.T)
    assert same_state(before, layer)
    x = inputs()
    with torch.no_grad():
        assert relative_error(layer(x), reference(x, weight, layer.bias)) < 2e-3


@pytest.mark.parametrize("kernel", ["TorchFusedAwqLinear", "TorchAtenAwqLinear", "TorchInt8AwqLinear"])
def test_dequantize_after_the_first_forward(kernel):
    """TorchFusedAwq/TorchAtenAwq repack into int4pack on their first CPU inference forward; read it anyway."""
    testing.check_dequantize_after_the_first_forward(KERNELS[kernel](), "awq")


def test_forward_recasts_scales_trap():
    """AwqTorchLinear.forward casts its scales in place to the input's dtype; the wrapper calls it in its own."""
    x = inputs(dtype=torch.bfloat16)
    layer = awq()
    model = wrapped(layer)
    before = state(layer)
    weight = dequant(layer)
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float32):
            got = model(x.to(dtype))
            assert got.dtype == dtype
    assert same_state(before, layer), "a wrapped forward changed the base layer"
    with qp.disable_adapters(model), torch.no_grad():
        assert relative_error(model(x), reference(x, weight, layer.bias)) < 2e-3  # computed in fp16

    bare = awq()
    with torch.no_grad():
        bare(x)
    if bare.scales.dtype != torch.float16:  # the trap bit (7.6.0): the layer is bf16 now
        assert hook().quantplug_compute_dtype(module=bare, backend="awq") is bare.scales.dtype
    assert relative_error(dequant(bare), weight) < 1e-2


def test_pack_does_not_clamp_trap():
    """AwqTorchLinear.pack wraps codes past the range (16 -> 0); requantize feeds it on-grid weights only."""
    linear = dense()
    scales, zeros, _ = _layers.awq_params(linear.weight.detach(), 4, 32, False, torch.float16)
    shifted = linear.weight.detach() + 0.5 * scales.repeat_interleave(
        32, 1
    )  # half a step up: 15.5 rounds to 16
    layer = AwqTorchLinear(
        bits=4, group_size=32, sym=False, desc_act=False, in_features=IN, out_features=OUT, bias=True
    )
    carrier = nn.Linear(IN, OUT)
    carrier.weight.data = shifted
    layer.pack(carrier, scales.half(), zeros)
    want = torch.clamp(
        torch.round(shifted / scales.repeat_interleave(32, 1)) + zeros.repeat_interleave(32, 1), 0, 15
    )
    codes, _ = _layers.unpack_codes(layer.qweight, layer.qzeros, 4, OUT)
    wrapped_codes = int((codes.T.float() != want).sum())
    if wrapped_codes:  # the trap bit: those weights jumped across their whole group's range
        assert relative_error(dequant(layer), shifted) > 0.1
    # requantize clamps: the same weight into the same format lands on the grid
    new = hook().quantplug_requantize(module=awq(), weight=shifted.half(), backend="awq")
    assert relative_error(dequant(new), shifted) < 0.08


# -- the adapter layer -----------------------------------------------------------------


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_wrapped_forward_dora_and_mixed_batch(kernel):
    testing.check_wrapped_forward_dora_and_mixed_batch(KERNELS[kernel](), "awq")


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_training_reaches_the_input(kernel):
    """A backward to the input on every kernel, also after an inference forward repacked it."""
    layer = KERNELS[kernel]()
    with torch.no_grad():
        layer(inputs(dtype=layer.scales.dtype if hasattr(layer, "scales") else torch.float16))
    testing.check_training_reaches_the_input(layer, "awq")  # TorchInt8AwqLinear.train() would raise


# -- merge -----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_merge_requantize_dense_and_unmerge(kernel):
    def same_format(new, layer):
        assert _layers.bits_of(new) == _layers.bits_of(layer) and new.group_size == layer.group_size
        assert getattr(new, "sym", None) == getattr(layer, "sym", None)
        if hasattr(layer, "scales"):
            assert new.scales.dtype == layer.scales.dtype

    # 4-bit AWQ rounding of these weights is ~10%
    testing.check_merge_requantize_dense_and_unmerge(KERNELS[kernel](), "awq", same_format, max_error=0.12)


def test_requantize_own_weight_gives_its_codes_back():
    layer = awq("int4-g32-asym")
    before = state(layer)
    new = hook().quantplug_requantize(module=layer, weight=dequant(layer), backend="awq")
    assert new is not layer and same_state(before, layer)
    for name in ("qweight", "qzeros", "scales", "bias"):
        assert torch.equal(getattr(new, name), getattr(layer, name)), name


def test_requantize_unsupported_kernel_says_so():
    marlin = type(
        "AwqMarlinLinear", (nn.Module,), {"__module__": "gptqmodel.nn_modules.qlinear.marlin_awq"}
    )()
    with pytest.raises(NotImplementedError, match="mode='dense'"):
        _layers.requantize(marlin, torch.zeros(OUT, IN))


# -- quantize --------------------------------------------------------------------------


def test_quantize_variants():
    info = load_plugins().status("awq").info
    assert info.variants[0] == "int4-g128-asym"
    if packs("int8-g64-sym"):
        layer = qp.quantize(dense(), "awq", "int8-g64-sym")
        assert isinstance(layer, AwqTorchLinear) and not layer.training
        assert (layer.bits, layer.group_size, layer.sym) == (8, 64, True)
    else:  # gptqmodel < 7.6: AwqTorchLinear.SUPPORTS_BITS == [4]
        with pytest.raises(NotImplementedError, match="SUPPORTS_BITS"):
            qp.quantize(dense(), "awq", "int8-g64-sym")
    layer = qp.quantize(dense(), "awq", "int4-g64-sym")
    assert isinstance(layer, AwqTorchLinear) and not layer.training
    assert (layer.bits, layer.group_size, layer.sym) == (4, 64, True)
    default = qp.quantize(dense(), "awq", None)
    assert (default.bits, default.group_size, default.sym) == (4, IN, False)
    with pytest.raises(ValueError, match="int4-g128-asym"):
        qp.quantize(dense(), "awq", "int4-g128-sym-actorder")


def test_quantizer_matches_gptqmodels_awq():
    """quantplug_quantize's grid is gptqmodel's AWQ pseudo_quantize_tensor (a calibration-processor method)."""
    from types import SimpleNamespace

    from gptqmodel.looper.awq_processor import AWQProcessor

    weight = dense().weight.detach()
    for sym in (True, False):
        processor = SimpleNamespace(qcfg=SimpleNamespace(group_size=32, sym=sym, bits=4))
        want, want_scales, want_zeros = AWQProcessor.pseudo_quantize_tensor(processor, weight.clone())
        scales, zeros, on_grid = _layers.awq_params(weight, 4, 32, sym, torch.float32)
        assert torch.allclose(scales, want_scales) and torch.equal(zeros, want_zeros.float())
        assert torch.allclose(on_grid, want, atol=1e-6)


# -- the conformance suite -----------------------------------------------------------------


class TestAwqConformance(BackendConformance):
    backend = "awq"
    variants = ("int4-g32-asym",)
    forward_tol = 1e-2
