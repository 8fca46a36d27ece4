"""Every state-changing call is all or nothing: a failure injected at each step leaves the model as it was.

Failures come from an in-process test backend ("flaky", over a plain toy layer) whose hooks raise or
return something wrong on demand, and from real HQQ layers whose plugin is made to fail. Each test
compares the whole model before and after (modules at each path, every tensor, every adapter
layer's adapters, active set, merge stack and base), then retries the same call.
"""

import types

import pytest
import quantplug as qp
import torch
from quantplug._info import BackendInfo
from quantplug.testing import relative_error
from quantplug.testing.conformance import _assert_same_state, _state
from torch import nn

# -- the model's whole state -------------------------------------------------------------


def snapshot(model: nn.Module) -> dict:
    return {
        "modules": {path: (id(m), type(m)) for path, m in model.named_modules()},
        "tensors": _state(model),
        "grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "layers": {
            path: (
                layer.backend,
                id(layer.base),
                tuple(layer.adapters),
                tuple(layer.active_adapters),
                tuple(name if isinstance(name, str) else name[0] for name in layer.merges),
                layer.disabled,
                getattr(layer, "_weight_sq", None) is None,
            )
            for path, layer in qp.lora_layers(model).items()
        },
    }


def assert_unchanged(before: dict, model: nn.Module, what: str) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"], f"{what}: modules were replaced"
    assert after["layers"] == before["layers"], f"{what}: an adapter layer changed"
    assert after["grad"] == before["grad"], f"{what}: requires_grad changed"
    assert set(after["tensors"]) == set(before["tensors"]), f"{what}: tensors appeared or disappeared"
    _assert_same_state(before["tensors"], model, what)


# -- an in-process backend that fails on demand -----------------------------------------


class Toy(nn.Module):
    """A stand-in quantized layer: a dense weight behind a class no other backend claims."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.clone(), requires_grad=True)
        self.bias = None if bias is None else nn.Parameter(bias.clone())

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class Faults:
    """What the flaky backend does wrong: ``hook -> (nth call, what)``; calls are counted per hook."""

    def __init__(self):
        self.plan: dict[str, tuple[int, str]] = {}
        self.calls: dict[str, int] = {}

    def at(self, hook: str, nth: int, what: str = "raise") -> None:
        self.plan[hook], self.calls[hook] = (nth, what), 0

    def clear(self) -> None:
        self.plan.clear()
        self.calls.clear()

    def pick(self, hook: str) -> str | None:
        self.calls[hook] = self.calls.get(hook, 0) + 1
        nth, what = self.plan.get(hook, (0, None))
        if self.calls[hook] != nth:
            return None
        if what == "raise":
            raise RuntimeError(f"injected failure in {hook}")
        return what


def flaky_plugin(faults: Faults):
    plugin = types.ModuleType("flaky_plugin")
    plugin.quantplug_backend_info = qp.hookimpl(
        lambda: BackendInfo(name="flaky", merge_modes=("requantize", "dense"))
    )
    plugin.quantplug_detect_layer = qp.hookimpl(lambda module: "flaky" if type(module) is Toy else None)

    def wrap(module):
        what = faults.pick("wrap")
        if what == "not-a-layer":
            return nn.Identity()
        if what == "other-base":
            return qp.LoraLayer(Toy(module.weight.detach()), "flaky")
        if what == "wrong-features":
            return qp.LoraLayer(module, "flaky", in_features=module.in_features + 1)
        if what == "wrong-backend":
            return qp.LoraLayer(module, "linear")
        return qp.LoraLayer(module, "flaky")

    def dequantize(module):
        what = faults.pick("dequantize")
        weight = module.weight.detach().clone()
        if what == "wrong-shape":
            return weight[:1]  # (1, in): broadcasts against (out, in) without an error
        if what == "transposed":
            return weight.T.contiguous()
        if what == "nan":
            weight[0, 0] = float("nan")
            return weight
        if what == "int":
            return weight.to(torch.int32)
        if what == "none":
            return None
        return weight

    def requantize(module, weight):
        what = faults.pick("requantize")
        if what == "wrong-features":
            return Toy(torch.zeros(module.out_features, module.in_features + 2))
        if what == "not-a-module":
            return weight
        if what == "none":
            return None
        return Toy(weight.float(), None if module.bias is None else module.bias.detach())

    def compute_dtype(module):
        return "float16" if faults.pick("compute_dtype") == "junk" else None

    def quantize(linear):
        if faults.pick("quantize") == "wrong-features":
            return Toy(torch.zeros(linear.out_features + 1, linear.in_features))
        return Toy(linear.weight.detach(), linear.bias.detach())

    plugin.quantplug_wrap_layer = qp.hookimpl(wrap)
    plugin.quantplug_dequantize = qp.hookimpl(dequantize)
    plugin.quantplug_requantize = qp.hookimpl(requantize)
    plugin.quantplug_compute_dtype = qp.hookimpl(compute_dtype)
    plugin.quantplug_quantize = qp.hookimpl(quantize)
    return plugin


@pytest.fixture
def faults():
    faults = Faults()
    name = qp.register(flaky_plugin(faults), name="flaky-plugin")
    try:
        yield faults
    finally:
        qp.unregister(name)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        Toy(torch.randn(16, 32), torch.randn(16)), nn.ReLU(), Toy(torch.randn(8, 16), torch.randn(8))
    )


CONFIG = qp.LoraConfig(r=4, target_modules=["0", "2"], init="random")
DORA = qp.LoraConfig(r=4, target_modules=["0", "2"], init="random", use_dora=True)
PLUGIN_FAILURE = qp.PluginError  # the relay re-raises a plugin's exception as one, naming the plugin


def fails_then_retries(model, call, faults, error, match=None, layer=None):
    """``call(model)`` fails as expected (naming ``layer``), leaves the model unchanged, and succeeds
    once the fault is gone."""
    before = snapshot(model)
    with pytest.raises(error, match=match) as caught:
        call(model)
    assert_unchanged(before, model, "a failed call")
    if layer is not None:
        assert caught.value.layer == layer and caught.value.backend == "flaky", caught.value
        assert caught.value.plugin == "flaky-plugin" and isinstance(caught.value.__cause__, RuntimeError)
    faults.clear()
    return call(model)


# -- attach --------------------------------------------------------------------------------


@pytest.mark.parametrize("nth", [1, 2])
def test_attach_wrap_raising_on_a_layer(faults, nth):
    model = toy_model()
    faults.at("wrap", nth)
    attach = lambda m: qp.attach(m, CONFIG)  # noqa: E731
    fails_then_retries(model, attach, faults, PLUGIN_FAILURE, "injected failure", layer=["0", "2"][nth - 1])
    assert set(qp.lora_layers(model)) == {"0", "2"}


@pytest.mark.parametrize(
    ("what", "match"),
    [
        ("not-a-layer", "returned Identity, not a quantplug.plugin.LoraLayer"),
        ("other-base", "over another module"),
        ("wrong-features", "in_features=17; the layer has 16"),
        ("wrong-backend", "for backend 'linear'; it must say 'flaky'"),
    ],
)
def test_attach_refuses_a_bad_wrap_result(faults, what, match):
    model = toy_model()
    faults.at("wrap", 2, what)
    before = snapshot(model)
    with pytest.raises(qp.PluginError, match=match) as caught:
        qp.attach(model, CONFIG)
    assert caught.value.backend == "flaky" and caught.value.layer == "2"
    assert caught.value.hook == "quantplug_wrap_layer"
    assert_unchanged(before, model, f"wrap returned {what}")


@pytest.mark.parametrize("nth", [1, 2])
def test_attach_dora_dequantize_raising(faults, nth):
    model = toy_model()
    faults.at("dequantize", nth)
    attach = lambda m: qp.attach(m, DORA)  # noqa: E731
    fails_then_retries(model, attach, faults, PLUGIN_FAILURE, "injected failure", layer=["0", "2"][nth - 1])
    x = torch.randn(3, 32)
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize(
    ("what", "match"),
    [
        ("wrong-shape", r"shape \(1, 16\); the layer's \(out_features, in_features\) is \(8, 16\)"),
        ("transposed", r"shape \(16, 8\)"),
        ("nan", "NaN or inf"),
        ("int", "torch.int32 tensor"),
        ("none", "returned no weight"),
    ],
)
def test_attach_dora_refuses_a_bad_dense_weight(faults, what, match):
    model = toy_model()
    faults.at("dequantize", 2, what)  # the second layer's, "2": (8, 16)
    before = snapshot(model)
    with pytest.raises(qp.PluginError, match=match) as caught:
        qp.attach(model, DORA)
    assert (caught.value.backend, caught.value.layer, caught.value.hook) == (
        "flaky",
        "2",
        "quantplug_dequantize",
    )
    assert_unchanged(before, model, f"dequantize returned {what}")


def test_attach_second_adapter_fails_on_the_second_layer(faults):
    model = qp.attach(toy_model(), CONFIG, "a")
    faults.at("dequantize", 2)
    fails_then_retries(model, lambda m: qp.attach(m, DORA, "b"), faults, PLUGIN_FAILURE, layer="2")
    assert all(layer.adapters == ["a", "b"] for layer in qp.lora_layers(model).values())


@pytest.mark.parametrize("dtype", ["float16", torch.int8, 16, "bf16"])
def test_attach_refuses_a_bad_dtype_before_anything_changes(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    before = snapshot(model)
    # LoraConfig may refuse it itself; attach refuses whatever reaches it
    with pytest.raises((TypeError, ValueError), match="dtype"):
        config = qp.LoraConfig(r=2, target_modules=["0", "1"], dtype=dtype)
        qp.attach(model, config)
    assert_unchanged(before, model, f"dtype={dtype!r}")
    qp.attach(model, qp.LoraConfig(r=2, target_modules=["0", "1"], dtype=torch.float64))
    assert model[1].lora_A["default"].dtype == torch.float64


def test_attach_refuses_a_bad_compute_dtype(faults):
    model = toy_model()
    faults.at("compute_dtype", 2, "junk")
    before = snapshot(model)
    with pytest.raises(qp.PluginError, match="quantplug_compute_dtype returned 'float16'") as caught:
        qp.attach(model, CONFIG)
    assert caught.value.layer == "2"
    assert_unchanged(before, model, "compute_dtype returned a string")


def test_load_adapter_attach_path_is_all_or_nothing(faults, tmp_path):
    source = qp.attach(toy_model(), DORA)
    qp.save_adapter(source, tmp_path / "adapter")
    model = toy_model()
    faults.at("wrap", 2)
    load = lambda m: qp.load_adapter(m, tmp_path / "adapter")  # noqa: E731
    fails_then_retries(model, load, faults, PLUGIN_FAILURE, layer="2")
    x = torch.randn(3, 32)
    assert relative_error(model(x), source(x)) < 1e-5


# -- merge, unmerge, unload --------------------------------------------------------------


@pytest.mark.parametrize("nth", [1, 2])
@pytest.mark.parametrize("hook", ["dequantize", "requantize"])
def test_merge_failing_at_each_step(faults, hook, nth):
    model = qp.attach(toy_model(), DORA)
    x = torch.randn(3, 32)
    want = model(x)
    faults.at(hook, nth)
    # dequantize runs twice per layer (its base, then the requantized module): both calls are layer "0"'s
    layer = "0" if hook == "dequantize" else ["0", "2"][nth - 1]
    fails_then_retries(model, qp.merge, faults, PLUGIN_FAILURE, "injected failure", layer=layer)
    assert model[0].merged_adapters == ("default",)
    assert relative_error(model(x), want) < 1e-5


@pytest.mark.parametrize(
    ("hook", "what", "match"),
    [
        ("dequantize", "wrong-shape", r"shape \(1, 32\)"),
        ("dequantize", "nan", "NaN or inf"),
        ("requantize", "wrong-features", "in_features=34; the layer has 32"),
        ("requantize", "not-a-module", "returned a Tensor, not a torch module"),
    ],
)
def test_merge_refuses_bad_plugin_results(faults, hook, what, match):
    """Before the boundary checks, a (1, in) weight broadcast into the merge and only warned that
    'the format's rounding is coarser than the update'."""
    model = qp.attach(toy_model(), CONFIG)
    faults.at(hook, 1, what)
    before = snapshot(model)
    with pytest.raises(qp.PluginError, match=match) as caught:
        qp.merge(model)
    assert (caught.value.backend, caught.value.layer) == ("flaky", "0")
    assert_unchanged(before, model, f"{hook} returned {what}")


def test_merged_weight_of_the_requantized_layer_is_checked(faults):
    model = qp.attach(toy_model(), CONFIG)
    faults.at("dequantize", 2, "wrong-shape")  # 1: the base of layer "0"; 2: its requantized module
    before = snapshot(model)
    with pytest.raises(qp.PluginError, match=r"shape \(1, 32\)"):
        qp.merge(model)
    assert_unchanged(before, model, "the requantized module dequantized to a wrong shape")


def test_unmerge_and_unload_call_no_plugin(faults):
    """Popping the merge stack restores bases and DoRA's norms without asking the plugin: it cannot fail."""
    model = qp.attach(toy_model(), DORA)
    x = torch.randn(3, 32)
    want = model(x)
    bases = [model[0].base, model[2].base]
    before = snapshot(model)
    qp.merge(model)
    faults.at("dequantize", 1)  # any plugin call from here would raise
    qp.unmerge(model)
    assert_unchanged(before, model, "merge + unmerge")
    assert torch.equal(model(x), want)
    faults.clear()
    qp.merge(model, mode="dense")
    faults.at("dequantize", 1)
    qp.unload(model)
    assert [model[0], model[2]] == bases and not qp.lora_layers(model)


def test_unmerge_of_an_adapter_never_merged_is_a_clear_error(faults):
    model = qp.attach(toy_model(), CONFIG, "a")
    qp.attach(model, CONFIG, "b")
    qp.merge(model, "a")
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"adapter 'b' is not merged into any layer; merged adapters: \['a'\]"
    ):
        qp.unmerge(model, adapter="b")
    with pytest.raises(ValueError, match="'never-merged' is not merged"):
        qp.unmerge(model, adapter="never-merged")
    with pytest.raises(TypeError, match="adapter name or None"):
        qp.unmerge(model, adapter=["a"])
    assert_unchanged(before, model, "a refused unmerge")
    qp.unmerge(model, adapter="a")
    assert model[0].merged_adapters == ()


def test_unmerge_back_to_an_adapter_pops_the_newer_ones_too(faults):
    model = qp.attach(toy_model(), CONFIG, "a")
    qp.attach(model, CONFIG, "b")
    qp.attach(model, CONFIG, "c")
    original = model[0].base
    qp.merge(model, "a")
    after_a = model[0].base
    qp.merge(model, "b", mode="dense")
    qp.merge(model, "c")
    assert model[0].merged_adapters == ("a", "b", "c")
    qp.unmerge(model, adapter="b")
    assert model[0].merged_adapters == ("a",) and model[0].base is after_a
    qp.unmerge(model)
    assert model[0].base is original and model[0].backend == "flaky"


@pytest.mark.parametrize(
    ("adapter", "mode"), [(None, "requantize"), (["default"], "dense"), ("default", None)]
)
def test_merge_refuses_bad_arguments_before_anything_changes(faults, adapter, mode):
    model = qp.attach(toy_model(), CONFIG)
    before = snapshot(model)
    with pytest.raises((TypeError, ValueError), match=r"by name|unknown merge mode"):
        qp.merge(model, adapter, mode=mode)
    assert_unchanged(before, model, f"merge({adapter!r}, mode={mode!r})")


def test_attach_refuses_what_is_not_a_model_or_a_config():
    model = nn.Sequential(nn.Linear(4, 4))
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"a quantplug\.LoraConfig, got a Sequential and a dict"):
        qp.attach(model, {"r": 2, "target_modules": ["0"]})
    assert_unchanged(before, model, "attach with a dict config")


def test_merge_refuses_a_bad_dense_dtype(faults):
    model = qp.attach(toy_model(), CONFIG)
    before = snapshot(model)
    with pytest.raises(TypeError, match="dense_dtype"):
        qp.merge(model, mode="dense", dense_dtype="float32")
    assert_unchanged(before, model, "dense_dtype as a string")


# -- quantize --------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["raise", "wrong-features"])
def test_quantize_replaces_every_linear_or_none(faults, what):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    faults.at("quantize", 2, what)
    before = snapshot(model)
    with pytest.raises(
        qp.PluginError, match="injected failure" if what == "raise" else "out_features=5"
    ) as caught:
        qp.quantize(model, "flaky", skip=())
    assert caught.value.layer == "2" and caught.value.backend == "flaky"
    assert_unchanged(before, model, f"quantize: {what}")
    faults.clear()
    qp.quantize(model, "flaky", skip=())
    assert type(model[0]) is Toy and type(model[2]) is Toy


# -- set_adapter -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "error", "match"),
    [
        (["a", "nope"], KeyError, "nope"),
        (["a", 3], TypeError, "got 3"),
        (["a", "a"], ValueError, "active once"),
        (None, TypeError, "adapter name or a list"),
    ],
)
def test_set_adapter_checks_every_name_first(names, error, match):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    qp.attach(model, qp.LoraConfig(r=2, target_modules=["0", "1"]), "a")
    qp.attach(model, qp.LoraConfig(r=2, target_modules=["1"]), "b")
    qp.set_adapter(model, "b")
    before = snapshot(model)
    with pytest.raises(error, match=match):
        qp.set_adapter(model, names)
    assert_unchanged(before, model, f"set_adapter({names!r})")


# -- real HQQ layers ---------------------------------------------------------------------


@pytest.fixture
def hqq_model():
    if not qp.load_plugins().backends.get("hqq") or not qp.load_plugins().status("hqq").ok:
        pytest.skip("the hqq backend is not installed here")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    return qp.quantize(model, "hqq", skip=())


def test_hqq_attach_dora_with_dequantize_failing_on_the_second_layer(hqq_model, monkeypatch):
    from quantplug_hqq import layers

    real, calls = layers.dequantize, []

    def second_fails(module):
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("injected: HQQ could not dequantize")
        return real(module)

    monkeypatch.setattr(layers, "dequantize", second_fails)
    before = snapshot(hqq_model)
    with pytest.raises(PLUGIN_FAILURE, match="injected"):
        qp.attach(hqq_model, DORA)
    assert_unchanged(before, hqq_model, "hqq DoRA attach")
    monkeypatch.setattr(layers, "dequantize", real)
    qp.attach(hqq_model, DORA)
    assert set(qp.lora_layers(hqq_model)) == {"0", "2"}


def test_hqq_merge_with_requantize_failing_on_the_second_layer(hqq_model, monkeypatch):
    from quantplug_hqq import layers

    qp.attach(hqq_model, CONFIG)
    x = torch.randn(2, 128)
    want = hqq_model(x)
    real = layers.requantize
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected: requantize failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "requantize", second_fails)
    before = snapshot(hqq_model)
    with pytest.raises(PLUGIN_FAILURE, match="injected"):
        qp.merge(hqq_model)
    assert_unchanged(before, hqq_model, "hqq merge")
    monkeypatch.setattr(layers, "requantize", real)
    qp.merge(hqq_model, mode="dense")
    assert relative_error(hqq_model(x), want) < 1e-2
    qp.unmerge(hqq_model)
    assert_unchanged(before, hqq_model, "hqq merge + unmerge")


def test_prepare_for_training_refused_leaves_every_requires_grad_as_it_was():
    model = nn.Sequential(nn.Linear(8, 8))
    qp.attach(model, qp.LoraConfig(r=2, target_modules=["0"]))
    model[0].base.weight.requires_grad_(True)  # the user's own choice, before
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        qp.prepare_for_training(model, gradient_checkpointing=True)  # a Sequential has no checkpointing
    assert before == {name: p.requires_grad for name, p in model.named_parameters()}


def test_prepare_for_training_with_a_failing_plugin_hook_restores_requires_grad():
    import types

    @qp.hookimpl
    def quantplug_prepare_for_training(model):
        raise RuntimeError("this plugin cannot prepare")

    plugin = types.ModuleType("failing_prepare")
    plugin.quantplug_prepare_for_training = quantplug_prepare_for_training
    model = nn.Sequential(nn.Linear(8, 8))
    qp.attach(model, qp.LoraConfig(r=2, target_modules=["0"]))
    model[0].base.bias.requires_grad_(True)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    name = qp.register(plugin, name="failing-prepare")
    try:
        with pytest.raises(RuntimeError, match="cannot prepare"):
            qp.prepare_for_training(model)
    finally:
        qp.unregister(name)
    assert before == {name: p.requires_grad for name, p in model.named_parameters()}
