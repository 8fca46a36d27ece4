"""quantplug-awq on AWQ layers built by gptqmodel itself, on CPU.

Layers: ``AwqTorchLinear`` from ``quantplug_quantize`` (AWQ's quantizer, then
the library's ``pack``), and ``TorchFusedAwqLinear`` / ``TorchAtenAwqLinear`` /
``TorchInt8AwqLinear`` holding the same GEMM buffers, as gptqmodel's loader
fills them. AutoAWQ is not installed (it does not support transformers 5):
its ``WQLinear_GEMM`` is exercised through a stand-in with its class name,
constructor and CPU forward.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import quantplug as qp
import quantplug_awq
import torch
from gptqmodel.nn_modules.qlinear.torch import TorchLinear
from gptqmodel.nn_modules.qlinear.torch_aten_kernel_awq import TorchAtenAwqLinear
from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
from gptqmodel.nn_modules.qlinear.torch_fused_awq import TorchFusedAwqLinear
from gptqmodel.nn_modules.qlinear.torch_int8_awq import TorchInt8AwqLinear
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
from quantplug.registry import hook, load_plugins
from quantplug.testing import BackendConformance, relative_error
from quantplug_awq import _layers
from torch import nn

IN, OUT = 128, 64


# -- building layers -----------------------------------------------------------


def dense(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
        if bias:
            linear.bias.normal_(0, 0.1)
    return linear


def awq(variant: str = "int4-g32-asym", seed: int = 0, bias: bool = True) -> nn.Module:
    return qp.quantize(dense(seed, bias), "awq", variant)


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
    return hook().quantplug_dequantize(module=layer, backend="awq")


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    after = module.state_dict()
    return before.keys() == after.keys() and all(
        before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before
    )


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x, **kwargs):
        return self.proj(x, **kwargs)


def wrapped(layer: nn.Module, **config) -> Holder:
    model = Holder(layer)
    settings = {"r": 8, "alpha": 16, "target_modules": ["proj"], "init": "random"}
    settings.update(config)
    qp.attach(model, qp.LoraConfig(**settings))
    return model


def inputs(rows: int = 4, dtype=torch.float16, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(rows, IN).to(dtype)


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
    code = (
        "import sys, quantplug_awq; quantplug_awq.quantplug_backend_info(); "
        "print(sorted(m for m in ('torch', 'gptqmodel') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_probe():
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    status = load_plugins().status("awq")
    assert status.ok, status.reason
    assert status.found == version("gptqmodel")
    assert status.found in SpecifierSet(quantplug_awq.REQUIREMENT.specifier)
    assert status.plugin_dist == "quantplug-awq"


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
        assert quantplug_awq.quantplug_detect_layer(module) is None, type(module).__name__


# -- dequantize --------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant", ["int4-g32-asym", "int4-g128-sym", "int4-gall-asym", "int8-g32-asym", "int3-g64-sym"]
)
def test_dequantize_is_the_librarys(variant):
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
    layer = KERNELS[kernel]()
    before = dequant(layer)
    x = inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        first = layer(x)
    after = dequant(layer)
    assert relative_error(after, before) < 1e-2  # bf16 rounding of the int4pack kernel
    assert relative_error(first, reference(x, after, layer.bias)) < 1e-2
    assert torch.equal(dequant(layer), after)


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
    model = wrapped(KERNELS[kernel]())
    layer = model.proj
    qp.attach(
        model, qp.LoraConfig(r=4, alpha=8, target_modules=["proj"], init="random", use_dora=True), "dora"
    )
    with torch.no_grad():
        layer.lora_magnitude["dora"].mul_(1.3)
    x = inputs(dtype=torch.bfloat16)
    W = dequant(layer.base).double()
    with torch.no_grad():
        qp.set_adapter(model, "default")
        plain = model(x)
        qp.set_adapter(model, "dora")
        dora = model(x)
        mixed = model(x, adapter_names=["default", "dora", "__base__", "dora"])
        with qp.disable_adapters(model):
            base = model(x)
    assert relative_error(plain, reference(x, W + layer.delta_weight("default").double(), layer.bias)) < 2e-2
    direction = W + layer.delta_weight("dora", magnitude=False).double()
    dora_weight = (
        layer.lora_magnitude["dora"].double().unsqueeze(1) * direction / direction.norm(dim=1, keepdim=True)
    )
    assert relative_error(dora, reference(x, dora_weight, layer.bias)) < 2e-2
    for row, want in enumerate((plain, dora, base, dora)):
        assert relative_error(mixed[row], want[row]) < 1e-2


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_training_reaches_the_input(kernel):
    """A backward to the input on every kernel, also after an inference forward repacked it."""
    layer = KERNELS[kernel]()
    with torch.no_grad():
        layer(inputs(dtype=layer.scales.dtype if hasattr(layer, "scales") else torch.float16))
    model = wrapped(layer)
    qp.prepare_for_training(model)  # TorchInt8AwqLinear.train() would raise NotImplementedError
    assert model.proj.training and not model.proj.base.training
    x = inputs(dtype=torch.float32).requires_grad_(True)
    grad_out = torch.randn(x.shape[0], OUT)
    model(x).backward(grad_out)
    W = dequant(model.proj.base).float() + model.proj.delta_weight("default")
    assert x.grad is not None and relative_error(x.grad, grad_out @ W) < 1e-2
    assert (
        model.proj.lora_A["default"].grad.abs().sum() > 0
        and model.proj.lora_B["default"].grad.abs().sum() > 0
    )
    model.eval()
    assert model.proj._dense_cache is None


# -- merge -----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_merge_requantize_dense_and_unmerge(kernel):
    layer = KERNELS[kernel]()
    model = wrapped(layer, alpha=4)  # an adapter about a third of W's size, as after some training
    before = state(layer)
    W = dequant(layer).float()
    delta = model.proj.delta_weight("default")
    ideal = W + delta
    x = inputs(dtype=torch.bfloat16)

    report = qp.merge(model, mode="dense")
    merged = model.proj.base.weight.float()
    assert report.layers[0].error == pytest.approx(relative_error(merged, ideal), rel=1e-3, abs=1e-6)
    assert report.layers[0].adapter_error < 0.01
    qp.unmerge(model)
    assert model.proj.base is layer and same_state(before, layer)

    report = qp.merge(model, mode="requantize")
    new = model.proj.base
    assert type(new) is type(layer)
    assert _layers.bits_of(new) == _layers.bits_of(layer) and new.group_size == layer.group_size
    assert getattr(new, "sym", None) == getattr(layer, "sym", None)
    if hasattr(layer, "scales"):
        assert new.scales.dtype == layer.scales.dtype
    assert torch.equal(new.bias, layer.bias)
    got = dequant(new).float()
    assert report.layers[0].error == pytest.approx(relative_error(got, ideal), rel=1e-3, abs=1e-6)
    assert report.layers[0].adapter_error == pytest.approx(
        (got - ideal).norm().item() / delta.norm().item(), rel=1e-3
    )
    assert report.layers[0].error < 0.12  # 4-bit AWQ rounding of these weights is ~10%
    with torch.no_grad():
        assert relative_error(model(x), reference(x, got, new.bias)) < 2e-2
    qp.unmerge(model)
    assert model.proj.base is layer and same_state(before, layer)


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
    layer = qp.quantize(dense(), "awq", "int8-g64-sym")
    assert isinstance(layer, AwqTorchLinear) and not layer.training
    assert (layer.bits, layer.group_size, layer.sym) == (8, 64, True)
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
