"""The adapter layer's math against plain PyTorch: scaling, several adapters, dtypes, autocast, compile."""

import contextlib
import math
import types

import pytest
import quantplug as qp
import torch
from quantplug.testing import relative_error
from torch import nn


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(32, 24, dtype=dtype)
        self.v_proj = nn.Linear(32, 24, dtype=dtype)
        self.out = nn.Linear(24, 8, dtype=dtype)

    def forward(self, x):
        return self.out(torch.relu(self.q_proj(x) + self.v_proj(x)))


def lora_ref(layer, name, x):
    """Plain-PyTorch LoRA in float64: base(x) + scale * x A^T B^T."""
    A, B = layer.lora_A[name].double(), layer.lora_B[name].double()
    base = x.double() @ layer.base.weight.double().T + layer.base.bias.double()
    return base + layer.scaling[name] * (x.double() @ A.T) @ B.T


@pytest.mark.parametrize(("rslora", "expected"), [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling(rslora, expected):
    model = qp.attach(
        Tiny(), qp.LoraConfig(r=4, alpha=16, target_modules=["q_proj"], use_rslora=rslora, init="random")
    )
    layer = model.q_proj
    assert layer.scaling["default"] == pytest.approx(expected)
    x = torch.randn(5, 32)
    assert relative_error(layer(x), lora_ref(layer, "default", x)) < 1e-6


def test_default_init_is_a_no_op():
    model = Tiny()
    x = torch.randn(3, 32)
    want = model(x)
    qp.attach(model, qp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(model(x), want)
    assert all(layer.lora_B["default"].abs().sum() == 0 for layer in qp.lora_layers(model).values())


def test_several_active_adapters_sum():
    model = qp.attach(Tiny(), qp.LoraConfig(r=4, target_modules=["q_proj"], init="random"), "a")
    qp.attach(model, qp.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], init="random"), "b")
    layer, x = model.q_proj, torch.randn(4, 32)
    qp.set_adapter(model, ["a", "b"])
    base = lora_ref(layer, "a", x) - (
        lora_ref(layer, "a", x) - x.double() @ layer.base.weight.double().T - layer.base.bias.double()
    )
    want = lora_ref(layer, "a", x) + lora_ref(layer, "b", x) - base
    assert relative_error(layer(x), want) < 1e-6
    qp.set_adapter(model, "b")
    assert relative_error(layer(x), lora_ref(layer, "b", x)) < 1e-6


def test_unknown_adapter_is_a_clear_error():
    model = qp.attach(Tiny(), qp.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(KeyError, match="nope"):
        qp.set_adapter(model, "nope")
    with pytest.raises(KeyError, match="nope"):
        model.q_proj(torch.randn(2, 32), adapter_names=["default", "nope"])


def test_mixed_batch_rows_match_single_adapter_runs():
    model = qp.attach(Tiny(), qp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random"), "a")
    qp.attach(model, qp.LoraConfig(r=8, target_modules=["q_proj"], init="random", use_dora=True), "b")
    x = torch.randn(5, 32)
    names = ["a", "b", "__base__", "b", "a"]
    with torch.no_grad(), qp.adapter_batch(model, names):
        mixed = model(x)
    singles = {}
    with torch.no_grad():
        for name in ("a", "b"):
            qp.set_adapter(model, name)
            singles[name] = model(x)
        with qp.disable_adapters(model):
            singles["__base__"] = model(x)
    for row, name in enumerate(names):
        assert relative_error(mixed[row], singles[name][row]) < 1e-5, (row, name)
    with pytest.raises(ValueError, match="entries for a batch"):
        model.q_proj(x, adapter_names=["a"])


def test_dropout_only_while_training():
    model = qp.attach(Tiny(), qp.LoraConfig(r=4, dropout=0.5, target_modules=["q_proj"], init="random"))
    x = torch.randn(64, 32)
    model.eval()
    assert torch.equal(model.q_proj(x), model.q_proj(x))
    model.train()
    assert not torch.equal(model.q_proj(x), model.q_proj(x))


def test_adapters_kept_in_compute_dtype():
    model = qp.attach(Tiny(torch.bfloat16), qp.LoraConfig(r=4, target_modules=["q_proj"], init="random"))
    layer = model.q_proj
    assert layer.lora_A["default"].dtype == torch.bfloat16
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert relative_error(y, lora_ref(layer, "default", x)) < 2e-2


def test_explicit_adapter_dtype():
    model = qp.attach(
        Tiny(torch.bfloat16), qp.LoraConfig(r=4, target_modules=["q_proj"], dtype=torch.float32)
    )
    assert model.q_proj.lora_A["default"].dtype == torch.float32
    assert model.q_proj(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_autocast():
    model = qp.attach(Tiny(), qp.LoraConfig(r=4, target_modules=["q_proj"], init="random"))
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model.q_proj(x)
    assert y.dtype == torch.bfloat16
    assert relative_error(y, lora_ref(model.q_proj, "default", x)) < 2e-2


def test_gradients_reach_adapters_only():
    model = qp.attach(
        Tiny(), qp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random", use_dora=True)
    )
    qp.prepare_for_training(model)
    model(torch.randn(4, 32)).square().mean().backward()
    trainable = {id(p) for p in qp.trainable_parameters(model)}
    assert len(trainable) == 6  # A, B, magnitude on two layers
    for name, param in model.named_parameters():
        if id(param) in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name


def test_dora_forward_matches_definition():
    model = qp.attach(Tiny(), qp.LoraConfig(r=4, target_modules=["q_proj"], init="random", use_dora=True))
    layer = model.q_proj
    with torch.no_grad():
        layer.lora_magnitude["default"].mul_(torch.linspace(0.5, 1.5, 24))
    x = torch.randn(6, 32)
    W = layer.base.weight.double()
    direction = W + layer.delta_weight("default", magnitude=False).double()
    merged = (
        layer.lora_magnitude["default"].double().unsqueeze(1)
        * direction
        / direction.norm(dim=1, keepdim=True)
    )
    want = x.double() @ merged.T + layer.base.bias.double()
    assert relative_error(layer(x), want) < 1e-5


@pytest.mark.parametrize("dora", [False, True])
def test_compile_fullgraph(dora):
    model = qp.attach(
        Tiny(), qp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random", use_dora=dora)
    )
    x = torch.randn(4, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 1e-5


def test_reference_kernels_can_be_forced():
    calls = []

    @qp.hookimpl
    def quantplug_register_kernels(register):
        def spy(y, x, A, B, scale):
            calls.append(1)
            return y + (x @ A.T) @ B.T * scale

        register.kernel("lora_add", spy, name="spy", priority=50)

    import types

    plugin = types.ModuleType("kernel_plugin")
    plugin.quantplug_register_kernels = quantplug_register_kernels
    name = qp.register(plugin, name="spy-kernels")
    try:
        model = qp.attach(Tiny(), qp.LoraConfig(r=4, target_modules=["q_proj"], init="random"))
        x = torch.randn(2, 32)
        fast = model(x)
        assert calls, "the higher-priority kernel was not used"
        calls.clear()
        qp.use_reference_kernels(True)
        try:
            assert relative_error(model(x), fast) < 1e-6 and not calls
        finally:
            qp.use_reference_kernels(False)
    finally:
        qp.unregister(name)


def test_compile_on_the_very_first_call():
    """Kernel resolution is traced on a layer's first call: it must compile with fullgraph."""
    qp.load_plugins().kernels.clear_cache()
    model = qp.attach(Tiny(), qp.LoraConfig(r=4, target_modules=["q_proj"], init="random"))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 32)
    with torch.no_grad():
        got = compiled(x)
    assert relative_error(got, model(x)) < 1e-5


def test_to_moves_the_bases_kept_for_unmerge():
    model = qp.attach(Tiny(), qp.LoraConfig(r=4, target_modules=["q_proj"], init="random"))
    original = model.q_proj.base
    qp.merge(model, mode="dense")
    model.to(torch.float64)
    qp.unmerge(model)
    assert model.q_proj.base is original and original.weight.dtype == torch.float64


@contextlib.contextmanager
def kernel_plugin(op, fn, **where):
    """A plugin registering ``fn`` for ``op`` at priority 50, registered for the ``with`` block."""

    @qp.hookimpl
    def quantplug_register_kernels(register):
        register.kernel(op, fn, name=f"spy-{op}", priority=50, **where)

    plugin = types.ModuleType(f"spy_{op}_plugin")
    plugin.quantplug_register_kernels = quantplug_register_kernels
    name = qp.register(plugin, name=f"spy-{op}-kernels")
    try:
        yield
    finally:
        qp.unregister(name)


def test_a_lora_linear_kernel_gets_the_base_call_and_the_first_adapter():
    calls = []

    def overlap(base, x, xa, A, B, scale):
        calls.append((A.shape[0], xa is x))
        return base(x) + (xa @ A.T) @ B.T * scale

    with kernel_plugin("lora_linear", overlap):
        model = qp.attach(Tiny(), qp.LoraConfig(r=4, target_modules=["q_proj"], init="random"))
        qp.attach(model, qp.LoraConfig(r=2, target_modules=["q_proj"], init="random"), "second")
        qp.set_adapter(model, ["default", "second"])
        x = torch.randn(2, 32)
        layer = model.q_proj
        with torch.no_grad():
            got = layer(x)
        assert calls == [(4, True)], "lora_linear serves the first active adapter only, with the base"
        weight = layer.base.weight + layer.delta_weight("default") + layer.delta_weight("second")
        assert relative_error(got, x @ weight.T + layer.base.bias) < 1e-5


def test_a_fused_kernel_serves_the_base_alone_where_no_adapter_runs():
    """Disabled adapters, ``adapter_names=`` batches and DoRA ask the fused kernel for the base alone
    (``A=None``); a kernel that declines (returns None) leaves the call to the base's own forward."""
    calls = []
    declining = {"on": False}

    def fused(module, x, xa, A, B, scale):
        calls.append("base" if A is None else "adapter")
        if declining["on"]:
            return None
        y = torch.nn.functional.linear(x, module.weight, module.bias)
        return y if A is None else y + (xa @ A.T) @ B.T * scale

    with kernel_plugin("fused_lora_linear", fused, backend="linear"):
        model = qp.attach(Tiny(), qp.LoraConfig(r=4, target_modules=["q_proj"], init="random"))
        qp.attach(model, qp.LoraConfig(r=2, target_modules=["q_proj"], init="random"), "second")
        qp.set_adapter(model, "default")
        layer = model.q_proj
        x = torch.randn(3, 32)
        base = layer.base(x)
        with torch.no_grad():
            assert relative_error(layer(x), base + x @ layer.delta_weight("default").T) < 1e-5
            assert calls == ["adapter"]
            calls.clear()
            with qp.disable_adapters(model):
                assert relative_error(layer(x), base) < 1e-6
            assert calls == ["base"]
            calls.clear()
            mixed = layer(x, adapter_names=["second", "__base__", "default"])
            assert calls == ["base"]
            second, default = layer.delta_weight("second"), layer.delta_weight("default")
            want = torch.stack([base[0] + x[0] @ second.T, base[1], base[2] + x[2] @ default.T])
            assert relative_error(mixed, want) < 1e-5
            calls.clear()
            declining["on"] = True
            with qp.disable_adapters(model):
                assert torch.equal(layer(x), base)  # the base's own forward, bit for bit
            assert calls == ["base"]
            calls.clear()
            qp.use_reference_kernels(True)
            try:
                with qp.disable_adapters(model):
                    layer(x)
            finally:
                qp.use_reference_kernels(False)
            assert calls == [], "forced references: no plugin kernel runs"
