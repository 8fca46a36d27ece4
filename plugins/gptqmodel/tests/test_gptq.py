"""The gptq backend of quantplug-gptqmodel on layers built by gptqmodel itself, on CPU.

Layers: ``TorchLinear`` from ``quantplug_quantize`` (RTN), one ``TorchLinear``
quantized by gptqmodel's own GPTQ algorithm on random calibration batches
(act order), and ``TorchFusedLinear`` / ``TorchAtenLinear`` / ``TorchInt8Linear``
holding the same packed buffers, as gptqmodel's loader fills them.
"""

from __future__ import annotations

import gptqmodel_helpers as testing
import pytest
import quantplug as qp
import quantplug_gptqmodel.gptq
import torch
from gptqmodel.nn_modules.qlinear import PackableQuantLinear
from gptqmodel.nn_modules.qlinear.torch import TorchLinear, TorchQuantEmbeddings
from gptqmodel.nn_modules.qlinear.torch_aten_kernel import TorchAtenLinear
from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
from gptqmodel.nn_modules.qlinear.torch_fused import TorchFusedLinear
from gptqmodel.nn_modules.qlinear.torch_int8 import TorchInt8Linear
from gptqmodel_helpers import IN, OUT, dense, inputs, reference, same_state, state, wrapped
from quantplug._registry import hook, load_plugins
from quantplug.testing import BackendConformance, Holder, relative_error
from quantplug_gptqmodel.gptq import _layers
from torch import nn

# -- building layers -----------------------------------------------------------


def rtn(variant: str = "int4-g32-asym", seed: int = 0, bias: bool = True) -> nn.Module:
    return qp.quantize(dense(seed, bias), "gptq", variant)


def calibrated() -> nn.Module:
    """A TorchLinear quantized by gptqmodel's GPTQ (Hessian, act order, asym, g32) on random batches."""
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    linear = dense(3)
    gptq = GPTQ(linear, QuantizeConfig(bits=4, group_size=32, desc_act=True, sym=False))
    gptq.quantizer.configure(perchannel=True)  # what gptqmodel's GPTQProcessor does
    torch.manual_seed(4)
    for _ in range(4):  # inputs with very uneven channel energy, so act order permutes
        gptq.add_batch(torch.randn(16, IN) * torch.linspace(0.1, 3.0, IN), None)
    Q, scale, zero, g_idx, *_ = gptq.quantize()
    layer = TorchLinear(
        bits=4, group_size=32, sym=False, desc_act=True, in_features=IN, out_features=OUT, bias=True
    )
    carrier = nn.Linear(IN, OUT)
    carrier.weight.data, carrier.bias.data = Q, linear.bias.data.clone()
    layer.pack_original(carrier, scale, zero, g_idx)
    layer.optimized = True  # skip the per-shape torch.compile of dequantize_weight (seconds on CPU)
    layer.post_init()
    return layer.eval()


def as_kernel(source: nn.Module, cls) -> nn.Module:
    """A ``cls`` layer holding ``source``'s packed buffers, the way gptqmodel's loader fills one."""
    layer = cls(
        bits=source.bits,
        group_size=source.requested_group_size,
        sym=source.sym,
        desc_act=source.desc_act,
        in_features=IN,
        out_features=OUT,
        bias=source.bias is not None,
    )
    for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        if getattr(source, name, None) is not None:
            setattr(layer, name, getattr(source, name).clone())
    layer.post_init()
    return layer.eval()


def dequant(layer: nn.Module) -> torch.Tensor:
    return testing.dequant(layer, "gptq")


KERNELS = {
    "TorchLinear": lambda: rtn("int4-g32-asym"),
    "TorchLinear-actorder-gptq": calibrated,
    "TorchAtenLinear": lambda: as_kernel(rtn("int4-g32-asym"), TorchAtenLinear),
    "TorchFusedLinear-sym": lambda: as_kernel(rtn("int4-g32-sym"), TorchFusedLinear),
    "TorchFusedLinear-asym": lambda: as_kernel(rtn("int4-g32-asym"), TorchFusedLinear),
    "TorchInt8Linear": lambda: as_kernel(rtn("int4-g32-asym"), TorchInt8Linear),
}


# -- plugin, version, detection ----------------------------------------------------


def test_import_and_backend_info_are_light():
    testing.check_import_and_backend_info_are_light("quantplug_gptqmodel.gptq")


def test_version_probe():
    testing.check_version_probe("gptq", quantplug_gptqmodel.gptq.REQUIREMENT, "quantplug-gptqmodel")


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_detect_claims_gptq_kernels(kernel):
    assert qp.detect(KERNELS[kernel]()) == "gptq"


def test_detect_ignores_other_layers():
    awq = AwqTorchLinear(bits=4, group_size=32, sym=False, desc_act=False, in_features=IN, out_features=OUT)
    embeddings = TorchQuantEmbeddings(
        bits=4, group_size=32, sym=True, desc_act=False, in_features=IN, out_features=OUT
    )
    BaseQuantLinear = type("BaseQuantLinear", (nn.Module,), {"SUPPORTS_METHODS": ["gptq"]})  # not gptqmodel's
    for module in (nn.Linear(IN, OUT), awq, embeddings, BaseQuantLinear(), nn.Embedding(4, 4)):
        assert quantplug_gptqmodel.gptq.quantplug_detect_layer(module) is None, type(module).__name__


# -- dequantize --------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant", ["int4-g32-asym", "int4-gall-sym", "int4-g64-asym-actorder", "int8-g32-sym", "int3-g32-asym"]
)
def test_dequantize_is_the_librarys(variant):
    layer = rtn(variant)
    before = state(layer)
    weight = dequant(layer)
    assert weight.dtype == torch.float16 and weight.shape == (OUT, IN)
    assert torch.equal(weight, PackableQuantLinear.dequantize_weight(layer).T)
    assert torch.equal(weight, layer.dequantize_weight().T)  # TorchLinear's own (cached) eval path
    assert same_state(before, layer)
    x = inputs()
    with torch.no_grad():
        assert relative_error(layer(x), reference(x, weight, layer.bias)) < 2e-3


def test_bf16_layer_keeps_bf16():
    layer = rtn("int4-g32-asym").to(torch.bfloat16)
    assert hook().quantplug_compute_dtype(module=layer, backend="gptq") is torch.bfloat16
    weight = dequant(layer)
    assert weight.dtype == torch.bfloat16
    x = inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        assert relative_error(layer(x), reference(x, weight, layer.bias)) < 1e-2
    new = hook().quantplug_requantize(module=layer, weight=weight, backend="gptq")
    assert new.scales.dtype == torch.bfloat16 and torch.equal(new.bias, layer.bias)


@pytest.mark.parametrize("kernel", ["TorchAtenLinear", "TorchFusedLinear-sym", "TorchInt8Linear"])
def test_dequantize_after_the_first_forward(kernel):
    """TorchAten/TorchFused repack into int4pack on their first CPU inference forward; read it anyway."""
    testing.check_dequantize_after_the_first_forward(KERNELS[kernel](), "gptq")


def test_torch_fused_sym_false_zero_point_trap():
    """gptqmodel 7.6 TorchFusedLinear's CPU repack ignores zero points; wrapped layers never repack."""
    layer = KERNELS["TorchFusedLinear-asym"]()
    weight = dequant(layer)
    x = inputs(dtype=torch.bfloat16)
    model = wrapped(layer)
    qp.set_adapter(model, [])
    with torch.no_grad():
        got = model(x)
    assert relative_error(got, reference(x, weight, layer.bias)) < 1e-2
    assert not _layers.is_repacked(layer)

    with torch.no_grad():
        bare = layer(x)  # the library's own path, repacking in place
    bare_error = relative_error(bare, reference(x, weight, layer.bias))
    if bare_error > 0.05:  # the trap bit (0.14 with 7.6.0): the zero points are gone for good
        with pytest.raises(ValueError, match="zero points"):
            dequant(layer)
    else:  # a gptqmodel that keeps them: the repacked layer must read back right
        assert relative_error(dequant(layer), weight) < 1e-2


def test_torch_fused_dtype_lock_trap():
    """TorchFusedLinear repacks for its first input's dtype and rejects others; wrapped, any dtype works."""
    model = wrapped(KERNELS["TorchFusedLinear-sym"]())
    weight = dequant(model.proj.base)
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = inputs(dtype=dtype)
            with qp.disable_adapters(model):
                got = model(x)
            assert got.dtype == dtype
            assert relative_error(got, reference(x, weight, model.proj.bias)) < 1e-2
    assert _layers.is_repacked(model.proj.base)


def test_calibrated_act_order_layer():
    layer = calibrated()
    g_idx = layer.g_idx.clone()
    assert not torch.equal(g_idx, torch.sort(g_idx).values), "act order should permute g_idx"
    weight = dequant(layer)
    assert torch.equal(weight, PackableQuantLinear.dequantize_weight(layer).T)
    x = inputs()
    with torch.no_grad():
        assert relative_error(layer(x), reference(x, weight, layer.bias)) < 2e-3
    new = hook().quantplug_requantize(module=layer, weight=weight, backend="gptq")
    assert torch.equal(new.g_idx, g_idx) and new.desc_act and not new.sym and new.group_size == 32
    # requantizing the layer's own weight gives back its own codes (GPTQ's codes need not span a
    # group's range, so fresh RTN scales alone would move them: 2.8% relative on this layer)
    for name in ("qweight", "qzeros", "scales", "bias"):
        assert torch.equal(getattr(new, name), getattr(layer, name)), name


# -- the adapter layer -----------------------------------------------------------------


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_wrapped_forward_dora_and_mixed_batch(kernel):
    testing.check_wrapped_forward_dora_and_mixed_batch(KERNELS[kernel](), "gptq")


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_training_reaches_the_input(kernel):
    """A backward to the input on every kernel, also after an inference forward repacked it."""
    layer = KERNELS[kernel]()
    if kernel != "TorchFusedLinear-asym":  # that one would lose its zero points (see the trap test)
        with torch.no_grad():
            layer(inputs(dtype=torch.bfloat16))  # TorchAten/TorchFused switch to their no_grad int4pack path
    testing.check_training_reaches_the_input(layer, "gptq")  # TorchInt8Linear.train() would raise


# -- merge -----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_merge_requantize_dense_and_unmerge(kernel):
    def same_format(new, layer):
        for attr in ("bits", "group_size", "sym", "desc_act", "pack_dtype"):
            assert getattr(new, attr) == getattr(layer, attr), attr
        if isinstance(layer, PackableQuantLinear):
            assert torch.equal(new.g_idx, layer.g_idx) and new.scales.dtype == layer.scales.dtype

    # 4-bit rounding is ~7% of W
    testing.check_merge_requantize_dense_and_unmerge(KERNELS[kernel](), "gptq", same_format, max_error=0.1)


def test_requantize_leaves_the_original_alone():
    layer = rtn("int4-g32-asym")
    before = state(layer)
    weight = dequant(layer)
    new = hook().quantplug_requantize(module=layer, weight=weight + 0.01, backend="gptq")
    assert new is not layer and same_state(before, layer)
    assert new.qzero_format() == layer.qzero_format()
    assert not new.training and new.qweight.data_ptr() != layer.qweight.data_ptr()


def test_requantize_unsupported_kernel_says_so():
    # a CUDA-only kernel (Marlin repacks at post_init and has no CPU packer): named, not built
    marlin = type("MarlinLinear", (nn.Module,), {"__module__": "gptqmodel.nn_modules.qlinear.marlin"})()
    with pytest.raises(NotImplementedError, match="mode='dense'"):
        _layers.requantize(marlin, torch.zeros(OUT, IN))


# -- quantize --------------------------------------------------------------------------


def test_quantize_variants():
    info = load_plugins().status("gptq").info
    assert info.variants[0] == "int4-g128-sym"
    layer = qp.quantize(dense(), "gptq", "int8-g64-asym-actorder")
    assert isinstance(layer, TorchLinear)
    assert (layer.bits, layer.group_size, layer.sym, layer.desc_act) == (8, 64, False, True)
    assert not layer.training
    default = qp.quantize(dense(), "gptq", None)
    assert (default.bits, default.group_size, default.sym, default.desc_act) == (4, IN, True, False)
    with pytest.raises(ValueError, match="int4-g128-sym"):
        qp.quantize(dense(), "gptq", "nf4")


def test_packing_never_builds_the_jit_extension():
    """pack()/pack_block() JIT-compile gptqmodel's pack_block_cpu C++ op on first use (about a minute)."""
    from gptqmodel.utils import cpp

    layer = rtn("int4-g32-asym")
    hook().quantplug_requantize(module=layer, weight=dequant(layer), backend="gptq")
    assert not cpp._PACK_BLOCK_EXTENSION_INITIALISED, "something called pack()/pack_block()"


def test_rtn_matches_gptqmodels_rtn():
    """quantplug_quantize's codes are gptqmodel's own RTN (quantization/rtn.py) for contiguous groups."""
    from gptqmodel.quantization.config import RTNConfig
    from gptqmodel.quantization.rtn import RTN

    linear = dense()
    for sym in (True, False):
        Q, scale, zero, g_idx, *_ = RTN(linear, RTNConfig(bits=4, group_size=32, sym=sym)).quantize()
        scales, zeros, on_grid = _layers.rtn_params(
            linear.weight.detach(), 4, sym, g_idx.long(), torch.float32
        )
        assert torch.allclose(scales, scale.float()) and torch.equal(zeros, zero.float())
        assert torch.allclose(on_grid, Q.float(), atol=1e-6)


# -- the conformance suite -----------------------------------------------------------------


class TestGptqConformance(BackendConformance):
    backend = "gptq"
    variants = ("int4-g32-asym",)
    forward_tol = 1e-2


# -- the fused CUDA kernel's admission, on CPU (tests/gpu runs the kernel; scripts/check_fused_cpu.py interprets it)


def _fused_storage(layer, x=None):
    pytest.importorskip("triton", reason="the fused kernel is a Triton kernel")
    from quantplug_gptqmodel.gptq import _cuda_kernels

    return _cuda_kernels._storage(layer, inputs() if x is None else x)


@pytest.mark.parametrize("variant", ["int4-g32-asym", "int4-g128-sym", "int4-gall-sym"])
def test_fused_kernel_reads_packed_4bit_layers(variant):
    layer = rtn(variant)
    found = _fused_storage(layer)
    assert found is not None, variant
    qweight, qzeros, scales, N, K, group = found
    assert (
        (N, K) == (OUT, IN) and qweight is layer.qweight and qzeros is layer.qzeros and scales is layer.scales
    )
    assert group == (IN if variant.endswith("gall-sym") else int(variant.split("-g")[1].split("-")[0]))


@pytest.mark.parametrize(
    ("variant", "why"),
    [
        ("int4-g64-asym-actorder", "act-order g_idx"),
        ("int8-g32-sym", "8 bits"),
        ("int3-g32-asym", "3 bits"),
    ],
)
def test_fused_kernel_declines_what_it_cannot_reproduce(variant, why):
    assert _fused_storage(rtn(variant)) is None, why


def test_fused_kernel_declines_other_layouts_and_inputs():
    layer = rtn("int4-g32-asym")
    assert _fused_storage(layer, inputs()[:, : IN // 2]) is None  # the input's width is not the layer's
    assert _fused_storage(calibrated()) is None  # gptqmodel's GPTQ with act order
    int8 = as_kernel(layer, TorchInt8Linear)  # re-quantized per channel: no packed 4-bit buffers left
    assert _fused_storage(int8) is None
    layer.adapter = object()  # gptqmodel's own (EoRA) adapter: its forward adds it, the kernel would not
    assert _fused_storage(layer) is None


def test_group_order_is_checked_once_and_again_after_a_change():
    """``groups_in_order`` remembers its answer per g_idx and version: a g_idx permuted in place is seen."""
    layer = rtn("int4-g32-asym")
    assert _layers.groups_in_order(layer, 32)
    assert _layers._IN_ORDER[layer][1] is True
    with torch.no_grad():
        layer.g_idx.copy_(layer.g_idx.flip(0))  # in place: same address, new version
    assert not _layers.groups_in_order(layer, 32)
    assert _fused_storage(layer) is None


def test_wrapping_checks_the_group_order():
    """The wrap hook checks the order, so that a fused kernel first called under CUDA-graph capture (where the
    check cannot read the device) finds it known."""
    layer = rtn("int4-g32-asym")
    assert layer not in _layers._IN_ORDER
    qp.attach(Holder(layer), qp.LoraConfig(r=4, target_modules=["proj"]))
    assert _layers._IN_ORDER[layer][1] is True
