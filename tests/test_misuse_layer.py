"""The adapter layer on its own: explicit collaborators, boundary checks, its merge stack, copies.

A LoraLayer gets its hook relay and kernels through ``connect``; it never reaches for the
process-wide registry, so these tests build layers with hand-made collaborators and fail if
anything asks the registry.
"""

import copy
import io
import pickle
import subprocess
import sys
import types

import pytest
import quantplug as qp
import torch
from quantplug._errors import PluginError
from quantplug._info import BackendInfo
from quantplug._kernels import KernelRegister, KernelRegistry
from quantplug.plugin import LoraLayer, lora_add_reference, lora_linear_reference, lora_mixed_add_reference
from quantplug.testing import relative_error
from torch import nn


def references() -> KernelRegistry:
    kernels = KernelRegistry()
    register = KernelRegister(kernels)
    register.kernel("lora_add", lora_add_reference, name="reference", priority=0)
    register.kernel("lora_linear", lora_linear_reference, name="reference", priority=0)
    register.kernel("lora_mixed_add", lora_mixed_add_reference, name="reference", priority=0)
    return kernels


class Relay:
    """The two hooks a layer calls, answered by hand; ``weight`` overrides what dequantize returns."""

    def __init__(self, weight=None, group=None):
        self.weight, self.group, self.calls = weight, group, []

    def quantplug_dequantize(self, module, backend):
        self.calls.append(("dequantize", backend))
        return module.weight.detach().clone() if self.weight is None else self.weight

    def quantplug_group_size(self, module, backend):
        self.calls.append(("group_size", backend))
        return self.group


@pytest.fixture
def no_registry(monkeypatch):
    """Any use of the process-wide registry fails the test."""
    from quantplug import _registry

    def refuse(*args, **kwargs):
        raise AssertionError("the layer reached for the process-wide registry")

    monkeypatch.setattr(_registry, "load_plugins", refuse)
    monkeypatch.setattr(_registry, "hook", refuse)


def layer_over(base=None, relay=None, info=None) -> LoraLayer:
    torch.manual_seed(0)
    base = base or nn.Linear(16, 8)
    return LoraLayer(base, "mine").connect(relay=relay or Relay(), kernels=references(), info=info)


def test_a_layer_built_with_explicit_collaborators_needs_no_registry(no_registry):
    relay = Relay()
    layer = layer_over(relay=relay)
    layer.add_adapter("a", qp.LoraConfig(r=2, init="random"), torch.float32)
    layer.add_adapter("d", qp.LoraConfig(r=2, init="random", use_dora=True), torch.float32)
    assert relay.calls == [("dequantize", "mine")]  # DoRA's set-up, once
    x = torch.randn(3, 16)
    W = layer.base.weight + layer.delta_weight("a") + layer.delta_weight("d")
    assert relative_error(layer(x), x @ W.T + layer.base.bias) < 1e-5
    rows = layer(x, adapter_names=["a", "__base__", "d"])
    assert relative_error(rows[1], layer.base(x[1])) < 1e-6


def test_an_unconnected_layer_says_how_to_connect_it():
    layer = LoraLayer(nn.Linear(4, 4), "linear")
    with pytest.raises(RuntimeError, match=r"layer.connect\(relay=..., kernels=...\)"):
        layer(torch.randn(1, 4))
    with pytest.raises(RuntimeError, match="connect"):
        layer.add_adapter("a", qp.LoraConfig(r=2, use_dora=True), torch.float32)
    assert layer.adapters == []


@pytest.mark.parametrize(
    ("weight", "match"),
    [
        (torch.zeros(1, 16), r"shape \(1, 16\); the layer's \(out_features, in_features\) is \(8, 16\)"),
        (torch.zeros(16, 8), r"shape \(16, 8\)"),
        (torch.zeros(8, 16, dtype=torch.int8), "torch.int8 tensor"),
        (torch.full((8, 16), float("inf")), "NaN or inf"),
        (torch.zeros(8, 16).numpy(), "returned a ndarray, not a tensor"),
    ],
)
def test_dequantize_results_are_checked_where_the_layer_receives_them(no_registry, weight, match):
    """A (1, in) weight used to broadcast into DoRA's norms (and a merge) without any error."""
    layer = layer_over(relay=Relay(weight=weight))
    with pytest.raises(PluginError, match=match) as caught:
        layer.add_adapter("d", qp.LoraConfig(r=2, use_dora=True), torch.float32)
    assert caught.value.backend == "mine" and caught.value.hook == "quantplug_dequantize"
    assert layer.adapters == [] and layer._weight_sq is None


@pytest.mark.parametrize("group", [0, -4, 2.5, "8", True])
def test_a_bad_group_size_from_the_backend_is_a_plugin_error(no_registry, group):
    layer = layer_over(relay=Relay(group=group))
    with pytest.raises(PluginError, match="quantplug_group_size returned"):
        layer.add_adapter("q", qp.LoraConfig(r=2, use_qalora=True), torch.float32)
    assert layer.adapters == []


@pytest.mark.parametrize("dtype", ["float16", torch.int32, None])
def test_build_adapter_refuses_a_dtype_that_is_not_floating(no_registry, dtype):
    layer = layer_over()
    with pytest.raises(TypeError, match=r"floating-point torch\.dtype"):
        layer.add_adapter("a", qp.LoraConfig(r=2), dtype)
    assert layer.adapters == []


def test_mixed_batches_follow_the_backend_info_given_at_connect(no_registry):
    info = BackendInfo(name="mine", mixed_batch=False, limits={"mixed_batch": "rows share one kernel"})
    layer = layer_over(info=info)
    layer.add_adapter("a", qp.LoraConfig(r=2), torch.float32)
    with pytest.raises(ValueError, match="rows share one kernel"):
        layer(torch.randn(2, 16), adapter_names=["a", "a"])


def test_adapter_names_as_a_string_is_not_split_into_rows(no_registry):
    layer = layer_over()
    layer.add_adapter("a", qp.LoraConfig(r=2), torch.float32)
    layer.add_adapter("b", qp.LoraConfig(r=2), torch.float32)
    with pytest.raises(TypeError, match="one adapter name per row, got the string 'ab'"):
        layer(torch.randn(2, 16), adapter_names="ab")


def test_the_merge_stack_pushes_and_pops_without_plugins(no_registry):
    relay = Relay()
    layer = layer_over(relay=relay)
    layer.add_adapter("d", qp.LoraConfig(r=2, init="random", use_dora=True), torch.float32)
    original, x = layer.base, torch.randn(3, 16)
    want = layer(x)
    weight = layer.dequantized_weight()
    merged = weight + layer.delta_weight("d", base=weight)
    calls = len(relay.calls)
    new = nn.Linear(16, 8)
    new.weight.data, new.bias.data = merged.clone(), original.bias.detach().clone()
    layer.push_merge("d", new, "linear", norms=((weight**2).sum(1), (merged**2).sum(1)))
    assert layer.merged_adapters == ("d",) and layer.merges == ("d",)
    assert relative_error(layer(x), want) < 1e-5
    with pytest.raises(ValueError, match="already merged"):
        layer.push_merge("d", new, "linear", norms=(weight, weight))
    with pytest.raises(KeyError, match="unknown adapter 'zz'"):
        layer.push_merge("zz", new, "linear", norms=(weight, weight))
    assert layer.pop_merge() == "d"
    assert layer.base is original and layer.backend == "mine"
    assert torch.equal(layer(x), want)
    assert len(relay.calls) == calls, "push_merge / pop_merge called a plugin"
    with pytest.raises(ValueError, match="no adapter is merged"):
        layer.pop_merge()


def test_merging_reads_no_private_state_of_the_layer():
    """quantplug._merging uses the layer's public pair, never its stack or refresh methods."""
    import inspect

    from quantplug import _merging

    source = inspect.getsource(_merging)
    for private in ("._merges", ".merges.", "._refresh", "layer.base =", "layer.backend ="):
        assert private not in source, private


def test_deepcopy_keeps_the_collaborators_and_pickle_reconnects():
    model = nn.Sequential(nn.Linear(16, 8))
    qp.attach(model, qp.LoraConfig(r=2, target_modules=["0"], init="random", use_dora=True))
    x = torch.randn(2, 16)
    want = model(x)
    twin = copy.deepcopy(model)
    assert twin[0].kernels is model[0].kernels and twin[0].relay is model[0].relay
    assert twin[0].base is not model[0].base and torch.equal(twin(x), want)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded[0].kernels is qp.load_plugins().kernels
    assert torch.equal(loaded(x), want)
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), want)


@pytest.mark.parametrize("module", ["quantplug._kernels", "quantplug._lora"])
def test_no_registry_behind_the_layer_and_the_kernels(module):
    """The registry imports the kernels, never the other way round; the layer imports neither."""
    code = f"import sys, {module}; print('quantplug._registry' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plugin_layer_subclasses_keep_their_constructor():
    """Plugins build LoraLayer subclasses themselves in quantplug_wrap_layer, with these signatures."""

    class Mine(LoraLayer):
        def __init__(self, base, backend, **kwargs):
            super().__init__(base, backend, **kwargs)

    base = nn.Linear(6, 4)
    assert Mine(base, "x").in_features == 6
    assert Mine(base, "x", in_features=6, out_features=4).out_features == 4
    plugin = types.ModuleType("subclass_plugin")
    plugin.quantplug_backend_info = qp.hookimpl(lambda: BackendInfo(name="subclassed"))

    class Marked(nn.Linear):
        pass

    plugin.quantplug_detect_layer = qp.hookimpl(tryfirst=True)(
        lambda module: "subclassed" if type(module) is Marked else None
    )
    plugin.quantplug_wrap_layer = qp.hookimpl(lambda module, backend: Mine(module, backend))
    plugin.quantplug_dequantize = qp.hookimpl(lambda module: module.weight.detach().clone())
    name = qp.register(plugin, name="subclass-plugin")
    try:
        model = nn.Sequential(Marked(6, 4))
        qp.attach(model, qp.LoraConfig(r=2, target_modules=["0"], init="random", use_dora=True))
        assert type(model[0]) is Mine and model[0].kernels is qp.load_plugins().kernels
        x = torch.randn(2, 6)
        W = model[0].base.weight + model[0].delta_weight("default")
        assert relative_error(model(x), x @ W.T + model[0].base.bias) < 1e-5
    finally:
        qp.unregister(name)
