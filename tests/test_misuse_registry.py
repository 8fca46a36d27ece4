"""The registry under misuse: bad plugin settings, bad plugins, bad calls (issues 14 and 15).

Each case names what a careless user or a broken plugin does, and checks that
the answer is a clear error or warning (naming the plugin, its distribution,
the hook, the backend, the fix) and that the registry is as it was.
"""

from __future__ import annotations

import re
import types
import warnings

import pluggy
import pytest
import quantplug as qp
import torch
from quantplug import _registry as registry
from quantplug._errors import PluginWarning
from quantplug._info import BackendInfo, Status
from quantplug.testing import BackendConformance
from torch import nn


class FakeDist:
    def __init__(self, name, version="1.0"):
        self.name, self.version = name, version


class FakeEntryPoint:
    def __init__(self, name, module, dist):
        self.name, self.value, self.dist, self._module = name, f"{name}_plugin", FakeDist(dist), module

    def load(self):
        return self._module


class Kind(nn.Module):
    """A 'quantized' layer of backend ``kind``: which plugin claims it is all these tests look at."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.in_features = self.out_features = 4
        self.weight = nn.Parameter(torch.eye(4), requires_grad=False)

    def forward(self, x):
        return x @ self.weight.T


def plugin(name, **hooks):
    """A plugin module declaring backend ``name``, claiming ``Kind(name)``, with extra hookimpls."""
    module = types.ModuleType(f"fake_{name}")
    module.quantplug_backend_info = qp.hookimpl(lambda: BackendInfo(name=name))
    module.quantplug_detect_layer = qp.hookimpl(
        lambda module: name if getattr(module, "kind", None) == name else None
    )
    for hook_name, impl in hooks.items():
        setattr(
            module, f"quantplug_{hook_name}", impl if hasattr(impl, "quantplug_impl") else qp.hookimpl(impl)
        )
    return module


def raises(exc):
    def impl(*args, **kwargs):
        raise exc

    return impl


@pytest.fixture
def entry_points(monkeypatch):
    points = []
    monkeypatch.setattr(
        registry.metadata,
        "entry_points",
        lambda group: [p for p in points if group == registry.ENTRY_POINT_GROUP],
    )
    registry.reset()
    yield points
    registry.reset()


def state(reg):
    return (
        sorted(reg.plugins),
        sorted(reg.backends),
        [impl.plugin_name for impl in reg.pm.hook.quantplug_detect_layer.get_hookimpls()],
    )


# -- allow / block lists ---------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "value", "unknown"),
    [
        ("QUANTPLUG_LOAD_PLUGINS", "alpah", "alpah"),  # a typo: nothing loads, and now it says so
        ("QUANTPLUG_LOAD_PLUGINS", "alpha, nope", "nope"),
        ("QUANTPLUG_BLOCK_PLUGINS", "bnb", "bnb"),  # not installed here
        ("QUANTPLUG_BLOCK_PLUGINS", "quantplug-alpha", "quantplug-alpha"),  # the dist, not the entry point
    ],
)
def test_unknown_names_in_plugin_lists_warn_naming_the_known_ones(
    entry_points, monkeypatch, env, value, unknown
):
    monkeypatch.setenv(env, value)
    entry_points += [
        FakeEntryPoint("alpha", plugin("alpha"), "quantplug-alpha"),
        FakeEntryPoint("beta", plugin("beta"), "b"),
    ]
    with pytest.warns(
        PluginWarning, match=rf"{env} names '{unknown}'.*installed entry points .*: alpha, beta"
    ):
        registry.load_plugins()


def test_blocking_the_core_backend_says_it_cannot(entry_points, monkeypatch):
    monkeypatch.setenv("QUANTPLUG_BLOCK_PLUGINS", "linear")
    with pytest.warns(PluginWarning, match="'linear', the core's own backend, which cannot be blocked"):
        rows = {row.name for row in qp.backends()}
    assert "linear" in rows


def test_known_names_give_no_warning(entry_points, monkeypatch):
    monkeypatch.setenv("QUANTPLUG_LOAD_PLUGINS", "alpha,linear")
    monkeypatch.setenv("QUANTPLUG_BLOCK_PLUGINS", "beta")
    entry_points += [
        FakeEntryPoint("alpha", plugin("alpha"), "a"),
        FakeEntryPoint("beta", plugin("beta"), "b"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {row.name for row in qp.backends()} == {"alpha", "linear"}


# -- entry-point name and backend name (issue 14) -------------------------------------


def test_entry_point_named_other_than_its_backend_is_not_loaded_and_says_why(entry_points):
    entry_points += [
        FakeEntryPoint("other", plugin("toy"), "quantplug-toy"),
        FakeEntryPoint("alpha", plugin("alpha"), "a"),
    ]
    reg = registry.load_plugins()
    assert "toy" not in reg.backends and "other" not in reg.plugins
    assert not reg.pm.has_plugin("other")
    row = next(row for row in reg.failures if row.name == "other")
    assert row.status is Status.BROKEN and row.plugin_dist == "quantplug-toy"
    assert "entry point is named 'other'" in row.reason and "declares backend 'toy'" in row.reason
    assert "toy = " in row.fix and "pyproject.toml" in row.fix
    assert reg.status("alpha").ok  # the others keep working
    assert qp.detect(Kind("alpha")) == "alpha" and qp.detect(Kind("toy")) is None


def test_blocking_by_backend_name_always_works(entry_points, monkeypatch):
    monkeypatch.setenv("QUANTPLUG_BLOCK_PLUGINS", "toy")
    entry_points += [FakeEntryPoint("toy", plugin("toy"), "quantplug-toy")]
    assert "toy" not in {row.name for row in qp.backends()}
    assert qp.detect(Kind("toy")) is None


class ToySuite(BackendConformance):
    backend = "toy"


def test_conformance_checks_the_entry_point_name(entry_points):
    entry_points.append(FakeEntryPoint("other", plugin("toy"), "quantplug-toy"))
    with pytest.raises(AssertionError, match=r"contract entry point: .*'other'.*'toy'.*Fix: .*toy = "):
        ToySuite().test_entry_point_name()
    registry.reset()
    entry_points[:] = [FakeEntryPoint("toy", plugin("toy"), "quantplug-toy")]
    ToySuite().test_entry_point_name()
    registry.load_plugins().plugins[
        "toy"
    ].entry_point = "other"  # as a loader without the check would leave it
    with pytest.raises(AssertionError, match=r"entry point 'other' declares backend 'toy'"):
        ToySuite().test_entry_point_name()


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (raises(OSError("no driver")), r"quantplug_backend_info raised OSError: no driver"),
        (lambda: {"name": "bad"}, r"must return quantplug.BackendInfo, got dict"),
    ],
    ids=["raises", "returns-a-dict"],
)
def test_a_bad_backend_info_is_a_broken_row_and_others_load(entry_points, info, expected):
    bad = plugin("bad")
    bad.quantplug_backend_info = qp.hookimpl(info)
    entry_points += [
        FakeEntryPoint("bad", bad, "quantplug-bad"),
        FakeEntryPoint("alpha", plugin("alpha"), "a"),
    ]
    rows = {row.name: row for row in qp.backends()}
    assert rows["bad"].status is Status.BROKEN and rows["bad"].plugin_dist == "quantplug-bad"
    assert re.search(expected, rows["bad"].reason), rows["bad"].reason
    assert rows["alpha"].ok and not registry.load_plugins().pm.has_plugin("bad")


def test_an_in_process_plugin_whose_backend_info_raises_is_refused_naming_it(entry_points):
    bad = plugin("bad")
    cause = OSError("no driver")
    bad.quantplug_backend_info = qp.hookimpl(raises(cause))
    before = state(registry.load_plugins())
    with pytest.raises(
        qp.PluginError, match=r"quantplug_backend_info raised OSError: no driver \(plugin 'bad'"
    ) as caught:
        qp.register(bad, name="bad")
    assert caught.value.__cause__ is cause
    assert state(registry.load_plugins()) == before


def test_a_hook_wrapper_is_refused(entry_points):
    wrapper = plugin("wrapped")

    @qp.hookimpl(wrapper=True)
    def quantplug_detect_layer(module):
        return (yield)

    wrapper.quantplug_detect_layer = quantplug_detect_layer
    before = state(registry.load_plugins())
    with pytest.raises(TypeError, match="quantplug_detect_layer is a hook wrapper"):
        qp.register(wrapper, name="wrapped")
    assert state(registry.load_plugins()) == before


# -- register / unregister ---------------------------------------------------------


def test_unregister_takes_the_name_or_the_object(entry_points):
    module = plugin("nb")
    name = qp.register(module, name="notebook")
    assert "nb" in {row.name for row in qp.backends()}
    qp.unregister(module)  # the object itself: before, this did nothing at all
    assert "nb" not in {row.name for row in qp.backends()}
    assert not registry.load_plugins().pm.is_registered(module)
    name = qp.register(module, name="notebook")
    qp.unregister(name)
    assert "nb" not in {row.name for row in qp.backends()}


class Instance:
    """A plugin that is an object, not a module."""

    @qp.hookimpl
    def quantplug_backend_info(self):
        return BackendInfo(name="inst")


def test_unregister_an_instance_plugin(entry_points):
    obj = Instance()
    qp.register(obj)
    qp.unregister(obj)
    assert "inst" not in registry.load_plugins().backends


@pytest.mark.parametrize(
    "target",
    ["never-registered", plugin("ghost"), "quantplug._builtin", 42],
    ids=["unknown-name", "unknown-object", "builtin", "an-int"],
)
def test_unregister_of_an_unknown_plugin_raises_and_changes_nothing(entry_points, target):
    name = qp.register(plugin("kept"), name="kept")
    before = state(registry.load_plugins())
    with pytest.raises(
        ValueError, match=r"cannot be unregistered|no plugin .* is registered.*registered plugins: kept"
    ):
        qp.unregister(target)
    assert state(registry.load_plugins()) == before
    qp.unregister(name)
    with pytest.raises(ValueError, match="no plugin 'kept' is registered"):
        qp.unregister(name)  # twice


def test_register_with_a_name_that_is_not_a_string(entry_points):
    before = state(registry.load_plugins())
    with pytest.raises(TypeError, match="name must be a str"):
        qp.register(plugin("nm"), name=("a", "b"))
    assert state(registry.load_plugins()) == before


# -- detect --------------------------------------------------------------------------


def test_a_raising_detect_is_reported_once_and_skipped(entry_points):
    flaky = plugin("flaky", detect_layer=raises(RuntimeError("detect exploded")))
    entry_points += [
        FakeEntryPoint("alpha", plugin("alpha"), "quantplug-alpha"),
        FakeEntryPoint("flaky", flaky, "quantplug-flaky"),
    ]
    with pytest.warns(
        PluginWarning,
        match=r"plugin 'flaky' \(distribution 'quantplug-flaky'\): quantplug_detect_layer raised RuntimeError: detect exploded",
    ) as caught:
        assert qp.detect(Kind("alpha")) == "alpha"
    assert len([w for w in caught if issubclass(w.category, PluginWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per plugin
        assert qp.detect(Kind("alpha")) == "alpha"
        assert qp.detect(nn.Linear(4, 4)) == "linear"
        # attach works for every other backend: a plain model here
        model = nn.Sequential(nn.Linear(4, 4))
        qp.attach(model, qp.LoraConfig(r=2, target_modules=["0"]))
        assert list(qp.lora_layers(model)) == ["0"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            "gamma",
            r"returned 'gamma', which no quantplug_backend_info declared; the plugin declares \['liar'\] \(declared backends: alpha, liar, linear\)",
        ),
        ("alpha", r"returned 'alpha', which plugin 'alpha' declared, not this one"),
        (True, r"returned True, a bool, not a backend name or None"),
    ],
)
def test_detect_must_name_its_own_declared_backend(entry_points, answer, expected):
    liar = plugin(
        "liar", detect_layer=lambda module: answer if getattr(module, "kind", None) == "x" else None
    )
    entry_points += [
        FakeEntryPoint("alpha", plugin("alpha"), "quantplug-alpha"),
        FakeEntryPoint("liar", liar, "quantplug-liar"),
    ]
    with pytest.raises(qp.PluginError, match=expected) as caught:
        qp.detect(Kind("x"))
    assert caught.value.plugin == "liar" and caught.value.dist == "quantplug-liar"
    assert caught.value.hook == "quantplug_detect_layer"


def test_detect_keeps_pluggy_order(entry_points):
    """tryfirst beats registration order, trylast loses to it: the same answer pluggy gives."""
    first = plugin("first", detect_layer=qp.hookimpl(tryfirst=True)(lambda module: "first"))
    newest = plugin("newest", detect_layer=lambda module: "newest")
    last = plugin("last", detect_layer=qp.hookimpl(trylast=True)(lambda module: "last"))
    entry_points += [FakeEntryPoint(p.__name__[5:], p, "d") for p in (first, newest, last)]
    reg = registry.load_plugins()
    layer = Kind("none")
    assert qp.detect(layer) == reg.pm.hook.quantplug_detect_layer(module=layer, model=None) == "first"
    qp.unregister("first")
    assert qp.detect(layer) == reg.pm.hook.quantplug_detect_layer(module=layer, model=None) == "newest"
    qp.unregister("newest")
    assert qp.detect(layer) == "last"


# -- every other hook: a plugin's exception names the plugin -------------------------------


def test_a_raising_dispatch_hook_is_a_plugin_error_naming_everything(entry_points):
    cause = RuntimeError("CUDA said no")
    entry_points.append(FakeEntryPoint("alpha", plugin("alpha", dequantize=raises(cause)), "quantplug-alpha"))
    with pytest.raises(qp.PluginError) as caught:
        registry.hook().quantplug_dequantize(module=Kind("alpha"), backend="alpha")
    error = caught.value
    assert (error.plugin, error.dist, error.hook, error.backend) == (
        "alpha",
        "quantplug-alpha",
        "quantplug_dequantize",
        "alpha",
    )
    assert error.__cause__ is cause
    assert str(error) == (
        "quantplug_dequantize raised RuntimeError: CUDA said no (plugin 'alpha', distribution 'quantplug-alpha', "
        "hook 'quantplug_dequantize', backend 'alpha')"
    )
    assert "layer 'model.proj'" in str(error.with_layer("model.proj"))


@pytest.mark.parametrize("kind", [ValueError, TypeError, NotImplementedError])
def test_documented_refusals_stay_catchable_by_their_type(entry_points, kind):
    entry_points.append(
        FakeEntryPoint(
            "alpha", plugin("alpha", quantize=raises(kind("no variant 'x'; valid variants: a"))), "d"
        )
    )
    with pytest.raises(kind, match="valid variants: a") as caught:
        registry.hook().quantplug_quantize(linear=nn.Linear(4, 4), backend="alpha", variant="x")
    assert isinstance(caught.value, qp.PluginError) and caught.value.plugin == "alpha"


def test_a_raising_hook_without_backend_names_the_plugins_backend(entry_points):
    entry_points.append(
        FakeEntryPoint("alpha", plugin("alpha", prepare_for_training=raises(OSError("disk"))), "d-alpha")
    )
    with pytest.raises(
        qp.PluginError, match=r"quantplug_prepare_for_training raised OSError: disk .*backend 'alpha'"
    ):
        registry.hook().quantplug_prepare_for_training(model=nn.Sequential(nn.Linear(2, 2)))


def test_a_raising_kernel_registration_is_reported_and_the_references_serve(entry_points):
    def bad_kernels(register):
        register.kernel("lora_add", lambda *a: None, name="half-done", priority=50)
        raise ImportError("triton too old")

    entry_points.append(
        FakeEntryPoint("alpha", plugin("alpha", register_kernels=bad_kernels), "quantplug-alpha")
    )
    with pytest.warns(
        PluginWarning,
        match=r"plugin 'alpha'.*quantplug_register_kernels raised ImportError: triton too old; its kernels are not used",
    ):
        reg = registry.load_plugins()
    assert [k.name for k in reg.kernels.kernels if k.op == "lora_add"] == ["reference"]
    assert reg.kernels.resolve("lora_add", "alpha", "cpu", torch.float32).name == "reference"


def test_misspelled_hooks_still_fail_loudly(entry_points):
    module = plugin("alpha")
    module.quantplug_detect_layerz = qp.hookimpl(lambda module: None)
    entry_points.append(FakeEntryPoint("alpha", module, "d"))
    with pytest.raises(pluggy.PluginValidationError, match="quantplug_detect_layerz"):
        registry.load_plugins()


def test_use_reference_kernels_still_switches(entry_points):
    def fast(register):
        register.kernel("lora_add", lambda *a: None, name="fast", backend="alpha", priority=20)

    entry_points.append(FakeEntryPoint("alpha", plugin("alpha", register_kernels=fast), "d"))
    reg = registry.load_plugins()
    assert reg.kernels.resolve("lora_add", "alpha", "cpu", torch.float32).name == "fast"
    try:
        qp.use_reference_kernels(True)
        assert reg.kernels.resolve("lora_add", "alpha", "cpu", torch.float32).name == "reference"
    finally:
        qp.use_reference_kernels(False)
    assert reg.kernels.resolve("lora_add", "alpha", "cpu", torch.float32).name == "fast"
