"""One test per hook, named after it, and the generated reference kept in step (meta-tests)."""

import importlib.util
import inspect
import types
from pathlib import Path

import pytest
import quantplug as qp
import torch
from quantplug import hookspecs
from quantplug._info import BackendInfo, Status
from quantplug._registry import hook
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name in vars(hookspecs) if name.startswith("quantplug_"))


class Box(nn.Module):
    """A toy quantized layer: int8 codes, one scale."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.scale = float(weight.abs().max()) / 127
        self.register_buffer("codes", torch.round(weight / self.scale).to(torch.int8))

    def forward(self, x):
        return x @ (self.codes.float() * self.scale).T


def box_plugin(calls: list):
    def record(name, value):
        calls.append(name)
        return value

    mine = "box"
    p = types.ModuleType("toy_plugin")
    p.quantplug_backend_info = qp.hookimpl(
        lambda: record("backend_info", BackendInfo(name=mine, variants=("int8",)))
    )
    p.quantplug_check_backend = qp.hookimpl(
        lambda info: (
            record("check_backend", qp.BackendStatus(mine, Status.OK, reason="checked"))
            if info.name == mine
            else None
        )
    )
    p.quantplug_detect_layer = qp.hookimpl(
        lambda module: record("detect_layer", mine) if isinstance(module, Box) else None
    )
    p.quantplug_compute_dtype = qp.hookimpl(
        lambda module, backend: record("compute_dtype", torch.float64) if backend == mine else None
    )
    p.quantplug_wrap_layer = qp.hookimpl(
        lambda module, backend: (
            record("wrap_layer", qp.LoraLayer(module, backend)) if backend == mine else None
        )
    )
    p.quantplug_dequantize = qp.hookimpl(
        lambda module, backend: (
            record("dequantize", module.codes.float() * module.scale) if backend == mine else None
        )
    )
    p.quantplug_requantize = qp.hookimpl(
        lambda module, weight, backend: record("requantize", Box(weight.float())) if backend == mine else None
    )
    p.quantplug_quantize = qp.hookimpl(
        lambda linear, backend, variant: (
            record("quantize", Box(linear.weight.detach())) if backend == mine else None
        )
    )

    p.quantplug_prepare_for_training = qp.hookimpl(lambda model: calls.append("prepare_for_training"))

    def register_kernels(register):
        calls.append("register_kernels")
        register.kernel(
            "lora_add",
            lambda y, x, A, B, s: y + (x.to(A.dtype) @ A.T) @ B.T * s,
            name="box-add",
            backend=mine,
        )

    p.quantplug_register_kernels = qp.hookimpl(register_kernels)
    return p


@pytest.fixture
def box():
    calls: list = []
    name = qp.register(box_plugin(calls), name="box-plugin")
    try:
        yield calls
    finally:
        qp.unregister(name)


def test_hook_backend_info(box):
    assert "backend_info" in box
    assert qp.load_plugins().status("box").info.variants == ("int8",)


def test_hook_check_backend(box):
    assert "check_backend" in box and qp.load_plugins().status("box").reason == "checked"


def test_hook_detect_layer(box):
    assert qp.detect(Box(torch.randn(4, 4))) == "box" and qp.detect(nn.Linear(4, 4)) == "linear"


def test_hook_compute_dtype(box):
    model = nn.Sequential(Box(torch.randn(4, 4)))
    qp.attach(model, qp.LoraConfig(r=2, target_modules=["0"]))
    assert model[0].lora_A["default"].dtype == torch.float64


def test_hook_wrap_layer(box):
    model = qp.attach(nn.Sequential(Box(torch.randn(4, 4))), qp.LoraConfig(r=2, target_modules=["0"]))
    assert "wrap_layer" in box and isinstance(model[0], qp.LoraLayer) and model[0].backend == "box"


def test_hook_dequantize(box):
    model = qp.attach(
        nn.Sequential(Box(torch.randn(4, 4))), qp.LoraConfig(r=2, target_modules=["0"], init="random")
    )
    qp.merge(model, mode="dense")
    assert box.count("dequantize") == 1  # the dense merge dequantizes the base once


def test_hook_requantize(box):
    model = qp.attach(
        nn.Sequential(Box(torch.randn(4, 4))), qp.LoraConfig(r=2, target_modules=["0"], init="random")
    )
    qp.merge(model, mode="requantize")
    assert "requantize" in box and type(model[0].base) is Box
    assert box.count("dequantize") == 2  # the base, then the result, to measure the error


def test_hook_quantize(box):
    layer = qp.quantize(nn.Linear(4, 4), "box")
    assert "quantize" in box and type(layer) is Box
    model = qp.quantize(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "box")
    assert [type(m) for m in model] == [Box, nn.ReLU, Box]


def test_hook_prepare_for_training(box):
    model = qp.attach(nn.Sequential(Box(torch.randn(4, 4))), qp.LoraConfig(r=2, target_modules=["0"]))
    assert "prepare_for_training" not in box
    qp.prepare_for_training(model)
    assert box.count("prepare_for_training") == 1


def test_hook_register_kernels(box):
    assert "register_kernels" in box
    kernel = qp.load_plugins().kernels.resolve("lora_add", "box", "cpu", torch.float32)
    assert kernel.name == "box-add"
    assert qp.load_plugins().kernels.resolve("lora_add", "linear", "cpu", torch.float32).name == "reference"


class ZBox(nn.Module):
    """A toy group-wise layer: 4-bit codes, a float scale and zero point per 4 input columns."""

    group = 4

    def __init__(self, codes, scale, zero):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    @classmethod
    def from_weight(cls, weight):
        w = weight.detach().float().unflatten(1, (-1, cls.group))
        low, high = w.amin(-1), w.amax(-1)
        scale = ((high - low) / 15).clamp_min(1e-8)
        zero = -low / scale
        codes = torch.round(w / scale[..., None] + zero[..., None]).clamp(0, 15).to(torch.uint8).flatten(1)
        return cls(codes, scale, zero)

    def dequantize(self):
        expand = lambda t: t.repeat_interleave(self.group, dim=1)  # noqa: E731
        return (self.codes.float() - expand(self.zero)) * expand(self.scale)

    def forward(self, x):
        return x @ self.dequantize().T


@pytest.fixture
def zbox():
    mine = "zbox"
    p = types.ModuleType("toy_plugin")
    p.quantplug_backend_info = qp.hookimpl(
        lambda: BackendInfo(name=mine, merge_modes=("requantize", "dense", "zeros"))
    )
    p.quantplug_detect_layer = qp.hookimpl(lambda module: mine if isinstance(module, ZBox) else None)
    p.quantplug_dequantize = qp.hookimpl(
        lambda module, backend: module.dequantize() if backend == mine else None
    )
    p.quantplug_group_size = qp.hookimpl(lambda module, backend: module.group if backend == mine else None)
    p.quantplug_fold_into_zeros = qp.hookimpl(
        lambda module, offsets, backend: (
            ZBox(module.codes.clone(), module.scale.clone(), module.zero - offsets / module.scale)
            if backend == mine
            else None
        )
    )
    name = qp.register(p, name="zbox-plugin")
    try:
        yield
    finally:
        qp.unregister(name)


def test_hook_group_size(zbox, box):
    model = nn.Sequential(ZBox.from_weight(torch.randn(6, 16)))
    qp.attach(model, qp.LoraConfig(r=2, target_modules=["0"], use_qalora=True))
    assert model[0].qalora_group_size["default"] == 4 and model[0].lora_A["default"].shape == (2, 4)
    with pytest.raises(ValueError, match=r"layer '0' \(box\).*reports none"):  # a backend without the hook
        qp.attach(
            nn.Sequential(Box(torch.randn(4, 8))), qp.LoraConfig(r=2, target_modules=["0"], use_qalora=True)
        )


def test_hook_fold_into_zeros(zbox):
    model = nn.Sequential(ZBox.from_weight(torch.randn(6, 16)))
    original = model[0]
    qp.attach(model, qp.LoraConfig(r=2, target_modules=["0"], use_qalora=True, init="random"))
    report = qp.merge(model, mode="zeros")
    assert torch.equal(model[0].base.codes, original.codes) and report.layers[0].error < 1e-5
    qp.unmerge(model)
    assert model[0].base is original


class VBox(Box):
    """A Box that knows which of two formats it is."""

    def __init__(self, weight: torch.Tensor, variant: str):
        super().__init__(weight)
        self.variant = variant


@pytest.mark.parametrize("names_variant", [True, False])
def test_hook_layer_variant(names_variant):
    from quantplug.distributed import ShardingError, check_shardable

    p = types.ModuleType("vbox_plugin")
    p.quantplug_backend_info = qp.hookimpl(
        lambda: BackendInfo(
            name="vbox",
            variants=("int8", "int4"),
            shardable=True,
            limits={"shardable:int4": "int4 is packed"},
        )
    )
    p.quantplug_detect_layer = qp.hookimpl(lambda module: "vbox" if isinstance(module, VBox) else None)
    if names_variant:
        p.quantplug_layer_variant = qp.hookimpl(lambda module: module.variant)
    name = qp.register(p, name="vbox-plugin")
    try:
        int8 = nn.Sequential(VBox(torch.randn(4, 4), "int8"))
        int4 = nn.Sequential(VBox(torch.randn(4, 4), "int4"))
        if names_variant:
            check_shardable(int8)  # int8 is not limited
            with pytest.raises(
                ShardingError, match=r"backend 'vbox', VBox \(1 layer: 0\): variant 'int4': int4 is packed"
            ):
                check_shardable(int4)
        else:
            for model in (int8, int4):
                with pytest.raises(ShardingError, match=r"does not say which variant this layer is"):
                    check_shardable(model)
        assert qp.detect(int8[0]) == "vbox"
    finally:
        qp.unregister(name)
    assert hook().quantplug_layer_variant(module=nn.Linear(2, 2), backend="linear") == "dense"


def test_every_hook_has_a_test_named_after_it():
    names = {n for n in globals() if n.startswith("test_hook_")}
    missing = [h for h in HOOKS if f"test_hook_{h.removeprefix('quantplug_')}" not in names]
    assert not missing, f"hooks without a test_hook_<name>: {missing}"


def test_every_hook_has_a_docstring_for_plugin_authors():
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert ("Implementing in a backend plugin" in doc and ":returns:" in doc) or ":param" in doc, name
        assert ".. versionadded::" in doc, name


def test_hook_reference_is_generated_and_current():
    spec = importlib.util.spec_from_file_location("gen_hook_docs", ROOT / "tools" / "gen_hook_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (ROOT / "docs" / "hooks.md").read_text()
    assert current == module.render(), "docs/hooks.md is stale: run python tools/gen_hook_docs.py"


def test_every_hook_appears_in_the_author_guide():
    guide = (ROOT / "docs" / "plugins.md").read_text()
    missing = [h for h in HOOKS if h not in guide]
    assert not missing, f"docs/plugins.md does not mention {missing}"
