"""Entry-point discovery, broken / duplicate / blocked / in-process plugins, misspelled hooks."""

import types

import pluggy
import pytest
import quantplug as qp
from quantplug import _registry as registry
from quantplug._info import BackendInfo, Requirement, Status


class FakeDist:
    def __init__(self, name, version="1.0"):
        self.name, self.version = name, version


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: name, value, dist, load()."""

    def __init__(self, name, module, dist):
        self.name, self.value, self.dist = name, f"{name}_plugin", FakeDist(dist)
        self._module = module

    def load(self):
        if isinstance(self._module, Exception):
            raise self._module
        return self._module


def backend_module(name, requires=()):
    module = types.ModuleType(f"fake_{name}")

    @qp.hookimpl
    def quantplug_backend_info():
        return BackendInfo(name=name, requires=requires)

    module.quantplug_backend_info = quantplug_backend_info
    return module


@pytest.fixture
def fake_entry_points(monkeypatch):
    """Replace discovery by a list the test controls; a fresh registry before and after."""
    points = []
    monkeypatch.setattr(
        registry.metadata,
        "entry_points",
        lambda group: [p for p in points if group == registry.ENTRY_POINT_GROUP],
    )
    registry.reset()
    yield points
    registry.reset()


def test_discovers_entry_points(fake_entry_points):
    fake_entry_points.append(FakeEntryPoint("alpha", backend_module("alpha"), "quantplug-alpha"))
    rows = {row.name: row for row in qp.backends()}
    assert rows["alpha"].status is Status.OK and rows["alpha"].plugin_dist == "quantplug-alpha"
    assert "linear" in rows  # the core's own backend is a plugin too


def test_loading_is_lazy_and_idempotent(fake_entry_points):
    calls = []

    class Counting(FakeEntryPoint):
        def load(self):
            calls.append(self.name)
            return super().load()

    fake_entry_points.append(Counting("alpha", backend_module("alpha"), "quantplug-alpha"))
    assert calls == []
    first = registry.load_plugins()
    assert registry.load_plugins() is first and calls == ["alpha"]


def test_broken_plugin_is_reported_and_others_keep_working(fake_entry_points):
    fake_entry_points.append(FakeEntryPoint("broken", RuntimeError("boom at import"), "quantplug-broken"))
    fake_entry_points.append(FakeEntryPoint("alpha", backend_module("alpha"), "quantplug-alpha"))
    rows = {row.name: row for row in qp.backends()}
    assert rows["broken"].status is Status.BROKEN
    assert "boom at import" in rows["broken"].reason and "quantplug-broken" in rows["broken"].fix
    assert rows["alpha"].status is Status.OK


def test_missing_library_is_a_status_not_an_error(fake_entry_points):
    fake_entry_points.append(
        FakeEntryPoint("alpha", backend_module("alpha", (Requirement("qp-absent-lib", ">=2"),)), "d")
    )
    row = registry.load_plugins().status("alpha")
    assert row.status is Status.MISSING and row.fix == "pip install 'qp-absent-lib>=2'"


def test_duplicate_entry_point_names_both_distributions(fake_entry_points):
    fake_entry_points.append(FakeEntryPoint("alpha", backend_module("alpha"), "quantplug-alpha"))
    fake_entry_points.append(FakeEntryPoint("alpha", backend_module("alpha"), "alpha-fork"))
    with pytest.raises(qp.PluginConflictError, match=r"quantplug-alpha.*alpha-fork"):
        registry.load_plugins()


def test_duplicate_backend_name_names_both_distributions(fake_entry_points):
    # entry points are named after their backend, so the second claim of "same" comes from elsewhere
    fake_entry_points.append(FakeEntryPoint("same", backend_module("same"), "dist-one"))
    with pytest.raises(qp.PluginConflictError, match=r"'same'.*dist-one.*an in-process plugin"):
        qp.register(backend_module("same"), name="same-again")
    assert registry.load_plugins().status("same").plugin_dist == "dist-one"


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("QUANTPLUG_LOAD_PLUGINS", "beta", {"beta"}),
        ("QUANTPLUG_LOAD_PLUGINS", "", set()),
        ("QUANTPLUG_BLOCK_PLUGINS", "alpha", {"beta"}),
    ],
)
def test_allow_and_block_lists(fake_entry_points, monkeypatch, env, value, expected):
    monkeypatch.setenv(env, value)
    fake_entry_points.append(FakeEntryPoint("alpha", backend_module("alpha"), "a"))
    fake_entry_points.append(FakeEntryPoint("beta", backend_module("beta"), "b"))
    names = {row.name for row in qp.backends()} - {"linear"}
    assert names == expected


def test_misspelled_hookimpl_fails_loudly(fake_entry_points):
    module = backend_module("alpha")

    @qp.hookimpl
    def quantplug_detect_layers(module):  # one letter too many
        return None

    module.quantplug_detect_layers = quantplug_detect_layers
    fake_entry_points.append(FakeEntryPoint("alpha", module, "quantplug-alpha"))
    with pytest.raises(pluggy.PluginValidationError, match="quantplug_detect_layers"):
        registry.load_plugins()


def test_hookimpl_with_unknown_argument_fails_loudly(fake_entry_points):
    module = backend_module("alpha")

    @qp.hookimpl
    def quantplug_dequantize(module, backend, precision):
        return None

    module.quantplug_dequantize = quantplug_dequantize
    fake_entry_points.append(FakeEntryPoint("alpha", module, "quantplug-alpha"))
    with pytest.raises(pluggy.PluginValidationError, match="precision"):
        registry.load_plugins()


def test_in_process_plugin_register_and_unregister(fake_entry_points):
    name = qp.register(backend_module("notebook"), name="notebook-plugin")
    try:
        assert "notebook" in {row.name for row in qp.backends()}
        with pytest.raises(qp.PluginConflictError):
            qp.register(backend_module("notebook"), name="again")
    finally:
        qp.unregister(name)
    assert "notebook" not in {row.name for row in qp.backends()}


def test_check_backend_hook_refines_status(fake_entry_points):
    module = backend_module("gpuonly")

    @qp.hookimpl
    def quantplug_check_backend(info):
        if info.name != "gpuonly":
            return None
        return qp.BackendStatus(info.name, Status.BROKEN, reason="needs CUDA", fix="run on a GPU")

    module.quantplug_check_backend = quantplug_check_backend
    fake_entry_points.append(FakeEntryPoint("gpuonly", module, "quantplug-gpuonly"))
    row = registry.load_plugins().status("gpuonly")
    assert (
        row.status is Status.BROKEN and row.reason == "needs CUDA" and row.plugin_dist == "quantplug-gpuonly"
    )


def test_a_raising_check_is_reported(fake_entry_points):
    module = backend_module("flaky")

    @qp.hookimpl
    def quantplug_check_backend(info):
        raise OSError("driver exploded")

    module.quantplug_check_backend = quantplug_check_backend
    fake_entry_points.append(FakeEntryPoint("flaky", module, "quantplug-flaky"))
    row = registry.load_plugins().status("flaky")
    assert row.status is Status.BROKEN and "driver exploded" in row.reason


def test_trace_env_prints_hook_calls(fake_entry_points, monkeypatch, capsys):
    monkeypatch.setenv("QUANTPLUG_TRACE_PLUGINS", "1")
    fake_entry_points.append(FakeEntryPoint("alpha", backend_module("alpha"), "a"))
    registry.load_plugins()
    assert "quantplug_register_kernels" in capsys.readouterr().err


def test_unknown_backend_lists_installed(fake_entry_points):
    with pytest.raises(KeyError, match="linear"):
        registry.load_plugins().status("nope")


class Stored:
    """A 'quantized' layer holding its weight as is: which plugin answers is all these tests look at."""

    def __init__(self, kind):
        self.kind = kind


def careless_backend(name):
    """A plugin whose dispatch hooks never check ``backend``: right only if it sees its own layers alone."""
    module = backend_module(name)
    module.quantplug_detect_layer = qp.hookimpl(
        lambda module: name if getattr(module, "kind", None) == name else None
    )
    module.quantplug_dequantize = qp.hookimpl(lambda module: f"{name} dequantized {module.kind}")
    module.quantplug_compute_dtype = qp.hookimpl(lambda module: f"{name} dtype")
    return module


def test_a_call_naming_a_backend_asks_only_its_plugin(fake_entry_points):
    # registered last, "beta" is asked first by pluggy: a plain firstresult call would let it answer for alpha
    fake_entry_points.append(FakeEntryPoint("alpha", careless_backend("alpha"), "quantplug-alpha"))
    fake_entry_points.append(FakeEntryPoint("beta", careless_backend("beta"), "quantplug-beta"))
    for name in ("alpha", "beta"):
        layer = Stored(name)
        assert qp.detect(layer) == name
        assert (
            registry.hook().quantplug_dequantize(module=layer, backend=name) == f"{name} dequantized {name}"
        )
        assert registry.hook().quantplug_compute_dtype(module=layer, backend=name) == f"{name} dtype"
    # what the plugin leaves out, the core's defaults answer (quantplug._builtin's wrap_layer)
    wrap = registry.load_plugins().backend_caller("quantplug_wrap_layer", "alpha")
    assert [impl.plugin_name for impl in wrap.get_hookimpls()] == ["quantplug._builtin"]
    # hooks without a backend argument still ask everyone, in pluggy's order
    detect = registry.hook().quantplug_detect_layer
    pm_detect = registry.load_plugins().pm.hook.quantplug_detect_layer
    assert detect.get_hookimpls() == pm_detect.get_hookimpls()


def test_a_backend_call_needs_a_declared_backend(fake_entry_points):
    fake_entry_points.append(FakeEntryPoint("alpha", careless_backend("alpha"), "quantplug-alpha"))
    with pytest.raises(KeyError, match=r"no backend named 'nope'; installed: alpha, linear"):
        registry.hook().quantplug_dequantize(module=Stored("alpha"), backend="nope")
    with pytest.raises(TypeError, match=r"quantplug_dequantize\(\) needs backend=<name>"):
        registry.hook().quantplug_dequantize(module=Stored("alpha"))


def test_backend_calls_follow_register_and_unregister(fake_entry_points):
    fake_entry_points.append(FakeEntryPoint("alpha", careless_backend("alpha"), "quantplug-alpha"))
    layer = Stored("gamma")
    assert registry.hook().quantplug_dequantize(module=layer, backend="alpha") == "alpha dequantized gamma"
    name = qp.register(careless_backend("gamma"), name="gamma-plugin")
    try:
        assert (
            registry.hook().quantplug_dequantize(module=layer, backend="gamma") == "gamma dequantized gamma"
        )
        assert (
            registry.hook().quantplug_dequantize(module=layer, backend="alpha") == "alpha dequantized gamma"
        )
    finally:
        qp.unregister(name)
    with pytest.raises(KeyError, match="no backend named 'gamma'"):
        registry.hook().quantplug_dequantize(module=layer, backend="gamma")


def test_unhashable_plugin_is_refused_and_changes_nothing(fake_entry_points):
    plugin = types.SimpleNamespace(quantplug_backend_info=backend_module("ns").quantplug_backend_info)
    before = {row.name for row in qp.backends()}
    with pytest.raises(
        TypeError, match=r"plugin 'ns-plugin': a SimpleNamespace cannot be a plugin.*register a module"
    ):
        qp.register(plugin, name="ns-plugin")
    assert {row.name for row in qp.backends()} == before
    assert not registry.load_plugins().pm.has_plugin("ns-plugin")
