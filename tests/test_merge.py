"""The core's merge: report, warnings, capability errors, atomicity, exact unmerge."""

import types
import warnings

import pytest
import quantplug as qp
import torch
from quantplug._info import BackendInfo
from quantplug.testing import relative_error
from torch import nn


class Rounded(nn.Module):
    """A toy quantized layer: weights rounded to a grid of `step` (coarse enough to eat small adapters)."""

    def __init__(self, weight, step):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.step = step
        self.register_buffer("codes", torch.round(weight / step).to(torch.int16))

    def forward(self, x):
        return x @ (self.codes.float() * self.step).T


def toy_plugin(name, modes=("requantize", "dense")):
    plugin = types.ModuleType("toy_plugin")
    plugin.quantplug_backend_info = qp.hookimpl(
        lambda: BackendInfo(
            name=name,
            merge_modes=modes,
            limits={m: "toy says no" for m in ("requantize", "dense") if m not in modes},
        )
    )
    plugin.quantplug_detect_layer = qp.hookimpl(lambda module: name if isinstance(module, Rounded) else None)
    plugin.quantplug_dequantize = qp.hookimpl(
        lambda module, backend: module.codes.float() * module.step if backend == name else None
    )
    plugin.quantplug_requantize = qp.hookimpl(
        lambda module, weight, backend: Rounded(weight.float(), module.step) if backend == name else None
    )
    return plugin


@pytest.fixture
def toy():
    name = qp.register(toy_plugin("toy"), name="toy-plugin")
    try:
        yield "toy"
    finally:
        qp.unregister(name)


def model_with(step, scale=1.0):
    torch.manual_seed(0)
    model = nn.Sequential(Rounded(torch.randn(16, 32), step), nn.ReLU(), Rounded(torch.randn(8, 16), step))
    qp.attach(model, qp.LoraConfig(r=4, alpha=4 * scale, target_modules=["0", "2"], init="random"))
    return model


def test_fine_grid_keeps_the_adapter(toy):
    model = model_with(step=1e-4)
    x = torch.randn(4, 32)
    want = model(x)
    report = qp.merge(model)
    assert report.mode == "requantize" and len(report.layers) == 2
    assert report.mean_adapter_error < 0.01 and not report.dropped
    assert relative_error(model(x), want) < 1e-3


def test_coarse_grid_warns_that_the_adapter_was_lost(toy):
    model = model_with(step=10.0, scale=0.01)
    with pytest.warns(UserWarning, match="lost most of the adapter"):
        report = qp.merge(model)
    assert report.dropped and report.worst.adapter_error > 0.5
    assert "WARNING" in str(report)


def test_dense_merge_is_lossless_and_unmerge_is_exact(toy):
    model = model_with(step=10.0, scale=0.01)
    originals = [model[0].base, model[2].base]
    codes = [m.codes.clone() for m in originals]
    x = torch.randn(4, 32)
    want = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = qp.merge(model, mode="dense")
    assert report.mean_error < 1e-6
    assert type(model[0].base) is nn.Linear and model[0].backend == "linear"
    assert relative_error(model(x), want) < 1e-5
    qp.unmerge(model)
    assert [model[0].base, model[2].base] == originals and model[0].backend == "toy"
    assert all(torch.equal(m.codes, c) for m, c in zip(originals, codes))
    assert torch.equal(model(x), want)


class DenseOnly(Rounded):
    """A layer of a backend that declares only the dense merge."""


def test_unsupported_mode_names_the_layer_and_leaves_the_model(toy):
    plugin = toy_plugin("denseonly", modes=("dense",))
    plugin.quantplug_detect_layer = qp.hookimpl(tryfirst=True)(
        lambda module: "denseonly" if isinstance(module, DenseOnly) else None
    )
    name = qp.register(plugin, name="denseonly-plugin")
    try:
        layer = DenseOnly(torch.randn(8, 8), 0.1)
        model = nn.Sequential()
        model.add_module("proj", layer)
        qp.attach(model, qp.LoraConfig(r=2, target_modules=["proj"]))
        assert model.proj.backend == "denseonly"
        with pytest.raises(qp.MergeError, match=r"'proj'.*denseonly.*toy says no"):
            qp.merge(model, mode="requantize")
        assert model.proj.base is layer and not model.proj.merges
        qp.merge(model, mode="dense")
        assert type(model.proj.base) is nn.Linear
    finally:
        qp.unregister(name)


def test_non_finite_merge_is_refused_before_any_change(toy):
    model = model_with(step=0.01)
    originals = [model[0].base, model[2].base]
    with torch.no_grad():
        model[2].lora_B["default"][0, 0] = float("inf")
    with pytest.raises(qp.MergeError, match=r"'2'.*non-finite"):
        qp.merge(model)
    assert [model[0].base, model[2].base] == originals and not model[0].merges


def test_merge_twice_and_unknown_adapter(toy):
    model = model_with(step=0.01)
    qp.merge(model)
    with pytest.raises(qp.MergeError, match="already merged"):
        qp.merge(model)
    with pytest.raises(ValueError, match="no layer has adapter 'other'"):
        qp.merge(model, adapter="other")
    with pytest.raises(ValueError, match="unknown merge mode"):
        qp.unmerge(model) or qp.merge(model, mode="fancy")


def test_merge_and_unload(toy):
    model = model_with(step=1e-4)
    x = torch.randn(3, 32)
    want = model(x)
    qp.merge(model, unload=True)
    assert isinstance(model[0], Rounded) and not qp.lora_layers(model)
    assert relative_error(model(x), want) < 1e-3


def test_report_as_dict(toy):
    report = qp.merge(model_with(step=1e-3))
    data = report.as_dict()
    assert data["worst_layer"] in ("0", "2") and len(data["layers"]) == 2
    assert {"name", "backend", "error", "adapter_error", "delta_norm"} <= set(data["layers"][0])


def test_merge_after_the_plugin_is_gone_names_the_layer():
    name = qp.register(toy_plugin("gone"), name="gone-plugin")
    try:
        model = model_with(step=0.01)
        originals = [model[0].base, model[2].base]
    finally:
        qp.unregister(name)
    for mode in ("requantize", "dense"):
        with pytest.raises(
            qp.MergeError, match=r"layer '0' is a 'gone' layer, but no installed plugin declares"
        ):
            qp.merge(model, mode=mode)
        assert [model[0].base, model[2].base] == originals and not model[0].merges
