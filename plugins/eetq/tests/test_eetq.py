"""Tests of quantplug-eetq on CPU.

EETQ itself cannot be installed here (CUDA-only kernels built with nvcc; the
index has only a CPython 3.10 CUDA wheel), so every ``test_standin_*`` test runs
the plugin's logic (detect, compute dtype, dequantize through the forward,
requantize through the library's op, wrap, merge through the core) on the
STAND-IN in standin.py, which mimics EETQ's interface, its pre-processed storage
and its kernel's input handling. tests/gpu/test_eetq_gpu.py runs the same
checks against a real EETQ build on a GPU.
"""

import importlib.util
import subprocess
import sys
import types

import pytest
import quantplug as qp
import quantplug_eetq
import quantplug_eetq_standin as standin  # loaded by conftest.py
import torch
from quantplug._info import Status
from quantplug._registry import hook, load_plugins
from quantplug.testing.conformance import Holder, random_linear, relative_error
from quantplug_eetq import layers
from quantplug_eetq.lora import EetqLoraLayer
from torch import nn

IN, OUT, R = 128, 64, 8


def dense(seed=0, bias=True, in_features=IN, out_features=OUT):
    return random_linear(in_features, out_features, bias=bias, seed=seed)


def standin_layer(seed=0, bias=True, **sizes):
    return standin.from_linear(dense(seed, bias, **sizes))


def wrapped(layer, **config):
    model = Holder(layer)
    settings = {"r": R, "alpha": 2 * R, "target_modules": ["proj"], "init": "random"}
    settings.update(config)
    return qp.attach(model, qp.LoraConfig(**settings))


def reference(x, weight, bias):
    out = x.double() @ weight.double().T
    return out + bias.double() if bias is not None else out


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(before, module):
    after = module.state_dict()
    return before.keys() == after.keys() and all(
        before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before
    )


# -- without EETQ: import, doctor ----------------------------------------------


def test_import_is_light():
    code = (
        "import sys, quantplug_eetq; bad = {'torch', 'eetq', 'EETQ'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_doctor_reports_eetq_missing(capsys):
    status = load_plugins().status("eetq")
    if importlib.util.find_spec("eetq") is not None:  # a machine with EETQ built (the GPU runs)
        assert status.status in (Status.OK, Status.TOO_OLD, Status.TOO_NEW), status
        return
    assert status.status is Status.MISSING, status
    assert status.required == quantplug_eetq.SPECIFIER
    assert "git+https://github.com/NetEase-FuXi/EETQ.git" in status.fix and "nvcc" in status.fix
    if sys.version_info[:2] != (3, 10):
        assert f"no EETQ wheel for Python {sys.version_info[0]}.{sys.version_info[1]}" in status.fix
    from quantplug.apps.cli import main

    main(["doctor"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("eetq "))
    assert "missing" in row and "quantplug-eetq" in row
    assert "builds it from source with nvcc" in out


def test_quantize_needs_cuda_and_a_known_variant():
    with pytest.raises(ValueError, match="valid"):
        layers.quantize(dense(), "int4")
    with pytest.raises(ValueError, match="CUDA only"):
        layers.quantize(dense(), None)


# -- detect, compute dtype -------------------------------------------------------


def test_standin_detect():
    """Claims the stand-in EetqLinear (EETQ's class name and tensors); never a plain or other layer."""
    detect = quantplug_eetq.quantplug_detect_layer  # the plugin's own answer (the core claims plain linears)
    layer = standin_layer()
    assert qp.detect(layer) == "eetq"
    assert detect(module=dense(), model=None) is None
    hinted = types.SimpleNamespace(quantization_method="eetq")
    assert detect(module=dense(), model=hinted) is None

    class Other(nn.Module):  # EETQ's tensors under another class name (a fork, the kernels hub)
        def __init__(self, source):
            super().__init__()
            self.register_buffer("weight", source.weight)
            self.register_buffer("weight_scales", source.weight_scales)

    other = Other(layer)
    assert detect(module=other, model=None) is None
    assert detect(module=other, model=hinted) == "eetq"
    config_hint = types.SimpleNamespace(
        config=types.SimpleNamespace(quantization_config={"quant_method": "eetq"})
    )
    assert detect(module=other, model=config_hint) == "eetq"

    class W8A16Linear(nn.Module):  # the name alone is not EETQ's: only eetq.modules.qlinear's class
        pass

    imposter = W8A16Linear()
    imposter.register_buffer("qweight", layer.weight)
    imposter.register_buffer("weight_scales", layer.weight_scales)
    assert detect(module=imposter, model=None) is None


def test_standin_compute_dtype_is_fp16():
    assert hook().quantplug_compute_dtype(module=standin_layer(), backend="eetq") is torch.float16


# -- dequantize ------------------------------------------------------------------


def test_standin_dequantize_goes_through_the_forward_not_the_storage():
    """The storage is pre-processed: reading it as codes * scales is wrong; the identity forward is exact."""
    layer = standin_layer()
    before = state(layer)
    weight = hook().quantplug_dequantize(module=layer, backend="eetq")
    assert weight.shape == (OUT, IN) and weight.dtype == torch.float16
    assert same_state(before, layer)
    assert torch.equal(weight, standin.plain_dequantize(layer))  # bit for bit
    naive = (layer.weight.to(torch.float16) * layer.weight_scales).T  # a guess at the layout
    assert relative_error(naive, weight) > 0.5
    x = torch.randn(5, IN).to(torch.float16)
    assert relative_error(layer(x), reference(x, weight, layer.bias)) < 2e-3
    assert torch.equal(hook().quantplug_dequantize(module=layer, backend="eetq"), weight)  # after a forward


def test_standin_dequantize_without_bias_and_in_chunks(monkeypatch):
    layer = standin_layer(bias=False, in_features=48)
    monkeypatch.setattr(layers, "CHUNK", 32)  # 48 inputs: two identity chunks
    assert torch.equal(layers.dequantize(layer), standin.plain_dequantize(layer))


# -- requantize ------------------------------------------------------------------


def test_standin_requantize_uses_the_layers_own_op():
    layer = standin_layer()
    assert layers.library_ops(layer) is standin  # the module defining the class imported EETQ's ops
    before = state(layer)
    W = layers.dequantize(layer).float()
    delta = 0.02 * torch.randn_like(W)
    new = hook().quantplug_requantize(module=layer, weight=(W + delta).half(), backend="eetq")
    assert type(new) is type(layer) and new is not layer
    assert same_state(before, layer), "the original layer must be left unchanged"
    assert torch.equal(new.bias, layer.bias) and new.bias.data_ptr() != layer.bias.data_ptr()
    got = layers.dequantize(new).float()
    ideal = W + delta
    # int8 per output channel: rounding error ~ (max|w| / 127) / sqrt(12), 0.6% of a Gaussian row of 128
    assert relative_error(got, ideal) < 1e-2
    assert relative_error(got - W, delta) < 0.1
    # requantizing the layer's own weight gives it back
    again = layers.dequantize(layers.requantize(layer, W.half())).float()
    assert relative_error(again, W) < 1e-3


@pytest.fixture
def transformers_layer(monkeypatch):
    """transformers' own EetqLinear, its kernels hub replaced by the stand-in's ops."""
    eetq_integration = pytest.importorskip("transformers.integrations.eetq")
    hub = types.SimpleNamespace(quant_weights=standin.quant_weights, w8_a16_gemm=standin.w8_a16_gemm)
    monkeypatch.setattr(eetq_integration, "eetq_kernels_hub", hub, raising=False)
    source = standin_layer()
    layer = eetq_integration.EetqLinear(IN, OUT, bias=True)
    with torch.no_grad():
        layer.weight.copy_(source.weight)
        layer.weight_scales.copy_(source.weight_scales)
        layer.bias.copy_(source.bias)
    return layer, source, hub


def test_standin_transformers_layer_is_claimed_and_requantized_with_its_hub_ops(transformers_layer):
    """transformers' EetqLinear: Parameters, no in/out_features, ops in ``eetq_kernels_hub``."""
    layer, source, hub = transformers_layer
    assert qp.detect(layer) == "eetq" and not hasattr(layer, "in_features")
    assert layers.library_ops(layer) is hub
    W = layers.dequantize(layer)
    assert torch.equal(W, layers.dequantize(source))
    new = layers.requantize(layer, W)
    assert isinstance(new.weight, nn.Parameter) and isinstance(new.weight_scales, nn.Parameter)
    assert (
        torch.equal(new.weight, layer.weight)
        and new.weight_scales.requires_grad == layer.weight_scales.requires_grad
    )
    wrapper = EetqLoraLayer.around(layer, "eetq")
    assert (wrapper.in_features, wrapper.out_features) == (IN, OUT)


@pytest.mark.usefixtures("standin_backend")
def test_standin_transformers_layer_backward_trap(transformers_layer):
    """EETQ's backward (in transformers, and EETQ 1.0.1) fails when only the trainable-by-default bias
    needs a gradient; the wrapped layer never builds a graph through the frozen base."""
    layer, _, _ = transformers_layer
    assert layer.bias.requires_grad  # transformers' default
    x = torch.randn(3, IN).to(torch.float16)
    with pytest.raises(UnboundLocalError):
        layer(x).float().sum().backward()
    model = wrapped(layer)  # no prepare_for_training: the bias is still trainable
    model(x).float().sum().backward()
    assert model.proj.lora_A["default"].grad is not None and layer.bias.grad is None


# -- the wrapped layer -----------------------------------------------------------


@pytest.mark.usefixtures("standin_backend")
def test_standin_wrapped_forward_any_dtype_and_strides():
    """EETQ's kernel reads any input as contiguous fp16: the wrapped layer hands it exactly that."""
    layer = standin_layer()
    model = wrapped(layer)
    proj = model.proj
    assert isinstance(proj, EetqLoraLayer)
    W = layers.dequantize(layer).double() + proj.delta_weight("default").double()
    torch.manual_seed(1)
    x = torch.randn(2, 3, IN)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        xd = x.to(dtype)
        with torch.no_grad():
            got = model(xd)
        assert got.dtype == dtype and got.shape == (2, 3, OUT)
        assert relative_error(got, reference(xd, W, layer.bias)) < 1e-2, dtype
    # the bare layer (the stand-in, like EETQ's kernel) gets bf16 wrong and strided views wrong
    bf16 = x[0].to(torch.bfloat16)
    assert relative_error(layer(bf16), reference(bf16, layers.dequantize(layer), layer.bias)) > 0.5
    wide = torch.randn(4, 2 * IN).to(torch.float16)
    strided = wide[:, ::2]
    with torch.no_grad():
        got = model(strided)
    assert relative_error(got, reference(strided, W, layer.bias)) < 1e-2
    assert relative_error(layer(strided), reference(strided, layers.dequantize(layer), layer.bias)) > 0.5


@pytest.mark.usefixtures("standin_backend")
def test_standin_gradient_reaches_input_through_a_no_grad_kernel():
    layer = standin_layer()
    model = wrapped(layer)
    qp.prepare_for_training(model)
    x = torch.randn(6, IN).to(torch.float16).requires_grad_(True)
    model(x).float().sum().backward()
    W = layers.dequantize(layer).float() + model.proj.delta_weight("default")
    want = torch.ones(6, OUT) @ W
    assert relative_error(x.grad, want) < 5e-3
    assert all(p.grad is not None for p in qp.trainable_parameters(model))


@pytest.mark.usefixtures("standin_backend")
def test_standin_prepare_for_training_unwrapped_layers_pass_gradients():
    """An EETQ layer no adapter targets still carries the gradient back to the adapters before it."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = standin_layer(seed=1, in_features=IN, out_features=IN)
            self.second = standin_layer(seed=2)

        def forward(self, x):
            return self.second(self.first(x))

    model = qp.attach(Two(), qp.LoraConfig(r=R, alpha=2 * R, target_modules=["first"], init="random"))
    x = torch.randn(4, IN).to(torch.float16)
    A = model.first.lora_A["default"]
    assert not model(x).requires_grad, (
        "a bare no-grad EETQ layer (1.0.0's EetqLinear, W8A16Linear) stops the gradient"
    )
    qp.prepare_for_training(model)
    qp.prepare_for_training(model)  # idempotent: one hook per layer
    assert len(model.second._forward_hooks) == 1
    model(x).float().sum().backward()
    assert A.grad is not None and A.grad.abs().sum() > 0
    # the same gradient as the dense model with the same weights
    first_dense = nn.Linear(IN, IN)
    second_dense = nn.Linear(IN, OUT)
    with torch.no_grad():
        first_dense.weight.copy_(layers.dequantize(model.first.base).float())
        first_dense.bias.copy_(model.first.base.bias.float())
        second_dense.weight.copy_(layers.dequantize(model.second).float())
        second_dense.bias.copy_(model.second.bias.float())
    A_ref = model.first.lora_A["default"].detach().float().clone().requires_grad_(True)
    B_ref = model.first.lora_B["default"].detach().float()
    xf = x.float()
    hidden = first_dense(xf) + (xf @ A_ref.T) @ B_ref.T * model.first.scaling["default"]
    second_dense(hidden).sum().backward()
    assert relative_error(A.grad, A_ref.grad) < 2e-2
    with torch.no_grad():  # inference: the hook does nothing
        assert not model(x).requires_grad


# -- merge through the core --------------------------------------------------------


@pytest.mark.usefixtures("standin_backend")
@pytest.mark.parametrize("mode", ["requantize", "dense"])
@pytest.mark.parametrize("adapter", ["large", "small"])
def test_standin_merge_and_exact_unmerge(mode, adapter):
    layer = standin_layer()
    model = wrapped(layer)
    if adapter == "small":  # |dW| about 3% of |W|, as after fine-tuning
        with torch.no_grad():
            model.proj.lora_B["default"].mul_(0.025)
    before = state(layer)
    x = torch.randn(5, IN).to(torch.float16)
    with torch.no_grad():
        W = layers.dequantize(layer).float()
        delta = model.proj.delta_weight("default", base=W)
        unmerged = model(x)
        report = qp.merge(model, mode=mode)
        merged = model(x)
    entry = report.layers[0]
    print(
        f"\nstand-in merge {mode}, {adapter} adapter: error vs W+dW {entry.error:.2e}, error/|dW| {entry.adapter_error:.4f}, "
        f"|dW|/|W| {delta.norm().item() / W.norm().item():.3f}"
    )
    if mode == "requantize":
        assert type(model.proj.base) is type(layer)
        # int8 per channel re-rounds W + dW: about 0.6% of |W| whatever the adapter's size
        assert entry.error < 1e-2 and not report.dropped
    else:
        assert type(model.proj.base) is nn.Linear and model.proj.base.weight.dtype == torch.float16
        assert entry.error < 1e-3
    assert relative_error(merged, unmerged) < 1e-2
    qp.unmerge(model)
    assert model.proj.base is layer and same_state(before, layer)
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)
