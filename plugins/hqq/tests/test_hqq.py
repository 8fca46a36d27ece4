"""Tests of quantplug-hqq on layers built by hqq itself, on CPU.

Sizes are tiny (64x128, ranks 4-8) so the file runs in seconds on one core.
"""

from __future__ import annotations

import copy
import importlib.metadata
import subprocess
import sys
import warnings

import pytest
import quantplug as qp
import torch
from packaging.specifiers import SpecifierSet
from quantplug._registry import hook, load_plugins
from quantplug.testing import BackendConformance, random_linear, relative_error
from torch import nn

hqq_quantize = pytest.importorskip("hqq.core.quantize")
HQQLinear, BaseQuantizeConfig = hqq_quantize.HQQLinear, hqq_quantize.BaseQuantizeConfig

from quantplug_hqq import NAME, SPECIFIER, VARIANTS, layers  # noqa: E402

torch.set_num_threads(1)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CONFIGS = {  # (nbits, group_size, axis): the layouts HQQ packs differently
    "4bit-g64": (4, 64, 1),
    "4bit-g64-axis0": (4, 64, 0),
    "3bit-g64": (3, 64, 1),  # int32 packing, rows padded to a multiple of 10
    "2bit-g32": (2, 32, 1),
    "8bit-g128": (8, 128, 1),
    "1bit-g32": (1, 32, 1),
}


def library_layer(
    config="4bit-g64", dtype=torch.float32, bias=True, trainable=False, seed=0, out=64, inp=128
):
    """An HQQLinear built the way users build them: HQQLinear(nn.Linear, BaseQuantizeConfig(...))."""
    nbits, group_size, axis = CONFIGS[config]
    linear = random_linear(inp, out, bias=bias, seed=seed)
    linear.requires_grad_(trainable)
    cfg = BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=axis)
    return HQQLinear(linear, cfg, compute_dtype=dtype, device="cpu")


def state(layer):
    """Every tensor an HQQLinear holds (W_q, the meta tensors, bias), cloned."""
    found = {"W_q": layer.W_q.detach().clone()}
    found.update({f"meta.{k}": v.clone() for k, v in layer.meta.items() if isinstance(v, torch.Tensor)})
    if layer.bias is not None:
        found["bias"] = layer.bias.detach().clone()
    return found


def assert_same_state(before, layer):
    after = state(layer)
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert tensor.dtype == after[key].dtype and torch.equal(tensor, after[key]), f"{key} changed"


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x, **kwargs):
        return self.proj(x, **kwargs)


def attach(layer, r=8, alpha=16.0, **config):
    model = Holder(layer)
    qp.attach(model, qp.LoraConfig(r=r, alpha=alpha, target_modules=["proj"], init="random", **config))
    return model


# -- quantplug_backend_info / versions ----------------------------------------------


def test_quantplug_backend_info():
    info = load_plugins().backends[NAME].info
    assert info.name == NAME
    assert info.variants == tuple(VARIANTS) and info.variants[0] == "4bit-g64"
    assert set(info.merge_modes) == {"requantize", "dense", "zeros"}
    assert info.dora and info.mixed_batch and info.compile_safe and info.shardable
    assert [r.dist for r in info.requires] == ["hqq"]


def test_quantplug_check_backend_version_probe():
    status = load_plugins().status(NAME)
    found = importlib.metadata.version("hqq")
    assert status.ok, (status.status, status.reason)
    assert status.found == found
    assert SpecifierSet(SPECIFIER).contains(found, prereleases=True)


def test_import_is_light():
    code = "import sys, quantplug_hqq; quantplug_hqq.quantplug_backend_info(); print('hqq' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"]


# -- quantplug_detect_layer -------------------------------------------------------------


@pytest.mark.parametrize("config", ["4bit-g64", "3bit-g64", "8bit-g128"])
def test_quantplug_detect_layer(config):
    assert qp.detect(library_layer(config)) == NAME
    assert qp.detect(qp.quantize(nn.Linear(128, 64), NAME)) == NAME

    class MyHQQ(HQQLinear):  # users' subclasses are still HQQ layers
        pass

    sub = MyHQQ(
        nn.Linear(128, 64),
        BaseQuantizeConfig(nbits=4, group_size=64),
        compute_dtype=torch.float32,
        device="cpu",
    )
    assert qp.detect(sub) == NAME


def test_detect_ignores_other_layers():
    class HQQLinear(nn.Linear):  # same name, not hqq's
        pass

    class MyLinear(nn.Linear):
        pass

    for module in (nn.Linear(8, 4), HQQLinear(8, 4), MyLinear(8, 4), nn.Embedding(4, 4)):
        assert hook().quantplug_detect_layer(module=module, model=None) != NAME


# -- quantplug_compute_dtype ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantplug_compute_dtype(dtype):
    layer = library_layer(dtype=dtype)
    assert hook().quantplug_compute_dtype(module=layer, backend=NAME) == dtype
    model = attach(layer)
    # adapters live in the compute dtype, except fp16, where the core keeps them in fp32
    assert model.proj.lora_A["default"].dtype == (torch.float32 if dtype == torch.float16 else dtype)


# -- quantplug_dequantize ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_quantplug_dequantize(config, dtype):
    layer = library_layer(config, dtype)
    before = state(layer)
    W = hook().quantplug_dequantize(module=layer, backend=NAME)
    assert W.shape == (64, 128) and W.dtype == dtype
    assert torch.equal(W, layer.dequantize()), "must be the library's own dequantization"
    assert_same_state(before, layer)
    torch.manual_seed(1)
    x = torch.randn(5, 128, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
    # HQQLinear's forward is x @ dequantize().T + bias in the compute dtype: the same ops, so exact
    torch.testing.assert_close(y, x @ W.T + layer.bias, rtol=0, atol=0)
    # nothing is repacked by the forward
    assert torch.equal(hook().quantplug_dequantize(module=layer, backend=NAME), W)
    assert_same_state(before, layer)
    assert W.data_ptr() != layer.W_q.data_ptr()


def test_hqq_hooks_are_asked_for_hqq_layers_only():
    registry = qp.load_plugins()
    for hook_name in ("quantplug_dequantize", "quantplug_requantize", "quantplug_quantize"):
        asked = {impl.plugin_name for impl in registry.backend_caller(hook_name, "hqq").get_hookimpls()}
        assert "hqq" in asked
        # "linear" (the core's own backend) is always installed, whatever else is
        asked = {impl.plugin_name for impl in registry.backend_caller(hook_name, "linear").get_hookimpls()}
        assert "hqq" not in asked, f"{hook_name} for plain linears would ask the hqq plugin"


def test_dequantize_uninitialised_layer_raises():
    empty = HQQLinear(
        None,
        BaseQuantizeConfig(nbits=4, group_size=64),
        compute_dtype=torch.float32,
        device="cpu",
        initialize=False,
    )
    assert qp.detect(empty) == NAME
    with pytest.raises(ValueError, match="no quantized weight"):
        layers.dequantize(empty)


# -- quantplug_quantize ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantplug_quantize(variant, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64).to(dtype)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    layer = qp.quantize(linear, NAME, variant)
    assert type(layer) is HQQLinear and layer.compute_dtype == dtype
    settings = VARIANTS[variant]
    assert {k: layer.meta[k] for k in settings} == settings
    # the caller's linear stays whole (HQQLinear(linear) would set its weight and bias to None)
    assert torch.equal(linear.weight, weight) and torch.equal(linear.bias, bias)
    # the bias is a frozen leaf: no grad_fn back to the caller's bias, and the layer deep-copies
    assert layer.bias.grad_fn is None and not layer.bias.requires_grad
    assert torch.equal(layer.bias, bias)
    clone = copy.deepcopy(layer)
    assert torch.equal(layers.dequantize(clone), layers.dequantize(layer))
    error = relative_error(layers.dequantize(layer), weight)
    assert error < {1: 0.7, 2: 0.45, 3: 0.25, 4: 0.12, 8: 0.02}[settings["nbits"]]


def test_quantize_default_and_unknown_variant():
    default = qp.quantize(nn.Linear(128, 64), NAME)
    assert (default.meta["nbits"], default.meta["group_size"], default.meta["axis"]) == (4, 64, 1)
    with pytest.raises(ValueError, match="valid variants: 4bit-g64"):
        qp.quantize(nn.Linear(128, 64), NAME, "nf4")
    with pytest.raises(ValueError, match="multiple of its group size"):
        qp.quantize(nn.Linear(10, 6), NAME, "8bit-g128")


# -- DESIGN traps ---------------------------------------------------------------------


def test_trap_hqqlinear_cannot_be_copied_or_requantized_in_place():
    """DESIGN: HQQLinear cannot be deep-copied, and quantizing again into it fails.
    Requantize must build a new layer, and work on such a layer."""
    layer = library_layer(trainable=True)  # what HQQLinear(nn.Linear(...)) gives by default
    assert layer.bias.grad_fn is not None  # hqq stores linear.bias.clone(): a non-leaf
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(layer)
    config = copy.deepcopy(layer.quant_config)
    with pytest.raises(TypeError, match="W_q"):
        layer.quantize(torch.randn(64, 128), **config)
    before = state(layer)
    W = layers.dequantize(layer)
    new = hook().quantplug_requantize(module=layer, weight=W + 0.01, backend=NAME)
    assert new is not layer and type(new) is HQQLinear
    assert torch.equal(new.bias, layer.bias.detach()) and new.bias.grad_fn is None
    assert_same_state(before, layer)
    copy.deepcopy(new)  # ours can be copied


def test_trap_hqqlinear_empties_the_source_linear():
    linear = nn.Linear(128, 64)
    HQQLinear(linear, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu")
    assert linear.weight is None and linear.bias is None  # why quantize() hands hqq a copy
    kept = nn.Linear(128, 64)
    qp.quantize(kept, NAME)
    assert kept.weight is not None and kept.bias is not None


# -- quantplug_requantize --------------------------------------------------------------


FORMAT_KEYS = (
    "nbits",
    "group_size",
    "axis",
    "packing",
    "shape",
    "view_as_float",
    "unpack_view_dtype",
    "compute_dtype",
    "quant_zero",
    "quant_scale",
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_quantplug_requantize(config, dtype):
    layer = library_layer(config, dtype)
    before = state(layer)
    W = layers.dequantize(layer)
    torch.manual_seed(2)
    target = (W.float() + 0.02 * torch.randn_like(W.float())).to(dtype)
    new = hook().quantplug_requantize(module=layer, weight=target, backend=NAME)
    assert type(new) is HQQLinear and new is not layer and qp.detect(new) == NAME
    assert {k: new.meta[k] for k in FORMAT_KEYS} == {k: layer.meta[k] for k in FORMAT_KEYS}
    assert new.quant_config == layer.quant_config and new.offload_meta == layer.offload_meta
    assert new.compute_dtype == dtype and new.device == layer.device
    assert (new.in_features, new.out_features) == (layer.in_features, layer.out_features)
    assert new.W_q.dtype == layer.W_q.dtype and new.W_q.shape == layer.W_q.shape
    assert isinstance(new.W_q, nn.Parameter) and not new.W_q.requires_grad
    assert new.meta["scale"].dtype == dtype and new.meta["scale"].shape == layer.meta["scale"].shape
    assert torch.equal(new.bias, layer.bias) and new.bias.data_ptr() != layer.bias.data_ptr()
    assert_same_state(before, layer)
    Wn = layers.dequantize(new)
    assert relative_error(Wn, target) <= relative_error(W, target) + 1e-6  # never further than the old layer
    x = torch.randn(3, 128, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(new(x), x @ Wn.T + new.bias, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_requantize_own_weight_is_exact(config, dtype):
    """Merging a zero adapter changes nothing (HQQ's fresh quantization would: ~2% at 4 bits)."""
    layer = library_layer(config, dtype)
    W = layers.dequantize(layer)
    new = layers.requantize(layer, W)
    assert torch.equal(layers.dequantize(new), W)
    if not (dtype == torch.bfloat16 and CONFIGS[config][0] == 8):
        assert torch.equal(new.W_q, layer.W_q)
    # else: in bf16, (code - zero) is rounded to 8 significant bits, so neighbouring
    # 8-bit codes can dequantize to the same value; the weight is what must match


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", ["4bit-g64", "4bit-g64-axis0", "3bit-g64", "8bit-g128"])
@pytest.mark.parametrize("size", [0.01, 0.1, 0.5])
def test_requantize_best_of_keep_and_fresh(config, dtype, size):
    layer = library_layer(config, dtype, out=64, inp=256)
    W = layers.dequantize(layer).float()
    torch.manual_seed(3)
    delta = torch.randn(64, 4) @ torch.randn(4, 256)
    delta *= size * W.norm() / delta.norm()
    ideal = W + delta
    target = ideal.to(dtype)
    errors = {
        s: relative_error(layers.dequantize(layers.requantize(layer, target, s)), ideal)
        for s in ("best", "keep", "fresh")
    }
    assert errors["best"] <= min(errors["keep"], errors["fresh"]) * (1 + 1e-4) + 1e-7, errors
    # keeping the grid never moves an element further from the target than the old layer was
    kept = layers.dequantize(layers.requantize(layer, target, "keep")).float()
    slack = 0 if dtype == torch.float32 else 1e-2 * W.abs().max().item()
    assert ((kept - target.float()).abs() <= (W - target.float()).abs() + slack).all()
    with pytest.raises(ValueError, match="strategy"):
        layers.requantize(layer, target, "nearest")


def test_requantize_legacy_quantized_scale_zero_layout():
    """hqq <0.2.2 quantized zero (and optionally scale) by default; such layers keep that layout."""
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 128) * 0.05, torch.randn(64) * 0.1
    config = BaseQuantizeConfig(nbits=4, group_size=64, quant_zero=True, quant_scale=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = HQQLinear(None, config, compute_dtype=torch.float32, device="cpu", initialize=False)
        layer.quantize(weight.clone(), **{k: v for k, v in config.items() if k != "offload_meta"})
    layer.bias = bias.clone()
    assert layer.meta["quant_zero"] and "zero_q" in layer.meta
    before = state(layer)
    W = layers.dequantize(layer)
    assert torch.equal(W, layer.dequantize())
    new = layers.requantize(layer, W + 0.001)
    assert (
        new.meta["quant_zero"] and new.meta["quant_scale"] and "zero_q" in new.meta and "scale_q" in new.meta
    )
    assert torch.equal(new.bias, bias)
    assert relative_error(layers.dequantize(new), W) < 0.1
    assert_same_state(before, layer)


def test_requantize_rejects_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        layers.requantize(library_layer(), torch.zeros(128, 64))


# -- the adapter layer on HQQ bases -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrapped_forward_matches_reference(dtype):
    model = attach(library_layer(dtype=dtype))
    layer = model.proj
    x = torch.randn(4, 128, dtype=dtype)
    with torch.no_grad():
        got = model(x)
        W = layers.dequantize(layer.base).double() + layer.delta_weight("default").double()
        want = x.double() @ W.T + layer.base.bias.double()
    assert got.dtype == dtype
    assert relative_error(got, want) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora(dtype):
    model = attach(library_layer(dtype=dtype), use_dora=True)
    layer = model.proj
    with torch.no_grad():
        layer.lora_magnitude["default"].mul_(1.3)
        x = torch.randn(4, 128, dtype=dtype)
        got = model(x)
        W = layers.dequantize(layer.base).double()
        direction = W + layer.delta_weight("default", magnitude=False).double()
        merged = (
            layer.lora_magnitude["default"].double().unsqueeze(1)
            * direction
            / direction.norm(dim=1, keepdim=True)
        )
        want = x.double() @ merged.T + layer.base.bias.double()
    assert relative_error(got, want) < (1e-4 if dtype == torch.float32 else 3e-2)


def test_mixed_batch():
    model = attach(library_layer())
    qp.attach(model, qp.LoraConfig(r=4, alpha=8, target_modules=["proj"], init="random"), "other")
    x = torch.randn(5, 128)
    names = ["default", "other", "__base__", "other", "default"]
    with torch.no_grad():
        got = model(x, adapter_names=names)
        rows = {}
        for name in ("default", "other"):
            qp.set_adapter(model, name)
            rows[name] = model(x)
        with qp.disable_adapters(model):
            rows["__base__"] = model(x)
    for i, name in enumerate(names):
        torch.testing.assert_close(got[i], rows[name][i], rtol=1e-5, atol=1e-6)


def test_training_reaches_adapters_only():
    model = attach(library_layer(trainable=False))
    qp.prepare_for_training(model)
    x = torch.randn(4, 128, requires_grad=True)
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in qp.trainable_parameters(model))
    assert model.proj.base.W_q.grad is None and x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_training_step(dtype):
    """HQQ's autograd.Function (forward_pytorch_backprop) traces whole, with its backward.
    Inductor inference is the conformance suite's test_compile; here aot_eager runs the same
    Dynamo + AOTAutograd trace without Inductor's C++ codegen (~40 s cold on this CPU)."""
    model = attach(library_layer(dtype=dtype))
    qp.prepare_for_training(model)
    x = torch.randn(4, 128, dtype=dtype)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).float().square().sum().backward()
    grads = [p.grad.clone() for p in qp.trainable_parameters(model)]
    for p in qp.trainable_parameters(model):
        p.grad = None
    model(x).float().square().sum().backward()
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2}
    for got, p in zip(grads, qp.trainable_parameters(model)):
        torch.testing.assert_close(got, p.grad, **tol)


# -- merge / unmerge through the core ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["requantize", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_keeps_bias_and_unmerge_is_exact(mode, dtype):
    """PEFT 0.21.2's HQQ merge builds HQQLinear(None, ...) and never sets its bias: ours keeps it."""
    layer = library_layer(dtype=dtype, bias=True)
    model = attach(layer)
    before = state(layer)
    x = torch.randn(4, 128, dtype=dtype)
    with torch.no_grad():
        unmerged = model(x)
        W = layers.dequantize(layer).float()
        delta = model.proj.delta_weight("default", base=W)
        report = qp.merge(model, mode=mode)
        merged_base = model.proj.base
        assert merged_base is not layer
        assert torch.equal(merged_base.bias.to(dtype), layer.bias)
        got_W = layers.dequantize(merged_base) if mode == "requantize" else merged_base.weight
        entry = report.layers[0]
        assert entry.error == pytest.approx(relative_error(got_W, W + delta), rel=1e-4, abs=1e-7)
        assert entry.adapter_error == pytest.approx(
            (got_W.float() - W - delta).norm().item() / delta.norm().item(), rel=1e-4, abs=1e-7
        )
        merged = model(x)
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # nn.Linear fuses the bias add (addmm)
        assert relative_error(merged, x.double() @ got_W.double().T + merged_base.bias.double()) < tol
        if mode == "dense":
            assert relative_error(merged, unmerged) < (1e-5 if dtype == torch.float32 else 2e-2)
    qp.unmerge(model)
    assert model.proj.base is layer
    assert_same_state(before, layer)
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


@pytest.mark.parametrize("size", [0.01, 0.1])
def test_merge_error_for_a_realistic_adapter(size):
    """4-bit g64: the merge never costs more than dropping the adapter (error / ‖ΔW‖ <= 1),
    and does better than HQQ's fresh requantization (what PEFT does)."""
    torch.manual_seed(0)
    layer = library_layer("4bit-g64", out=128, inp=256)
    model = attach(layer, r=8, alpha=8.0)
    W = layers.dequantize(layer).float()
    with torch.no_grad():  # scale B so that ‖ΔW‖ = size * ‖W‖
        delta = model.proj.delta_weight("default")
        model.proj.lora_B["default"].mul_(size * W.norm() / delta.norm())
        delta = model.proj.delta_weight("default")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = qp.merge(model, mode="requantize")
    entry = report.layers[0]
    assert entry.adapter_error <= 1.0 + 1e-6
    fresh = layers.dequantize(layers.requantize(layer, (W + delta), "fresh")).float()
    assert entry.adapter_error <= (fresh - W - delta).norm().item() / delta.norm().item() + 1e-6
    dropped = entry.adapter_error > 0.5
    assert dropped == any("lost most of the adapter" in str(w.message) for w in caught)
    qp.unmerge(model)
    assert model.proj.base is layer


# -- FSDP2 -----------------------------------------------------------------------------------


def _fsdp_worker(rank, world, init_file, results):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = attach(library_layer(), r=4)
        torch.manual_seed(5)
        x = torch.randn(3, 128)
        want = model(x).detach()
        W = layers.dequantize(model.proj.base)
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        got = model(x)
        got.sum().backward()
        sharded = type(model.proj.base.W_q).__name__
        again = layers.dequantize(model.proj.base)  # W_q is a DTensor out here: gathered
        results[rank] = (
            torch.equal(got.detach(), want),
            sharded,
            torch.equal(again, W),
            model.proj.lora_A["default"].grad is not None,
        )
    finally:
        dist.destroy_process_group()


def test_fsdp2_fully_shard(tmp_path):
    import torch.multiprocessing as mp

    # fork: the workers inherit torch and hqq already imported (spawn re-imports them: ~15 s)
    context = mp.get_context("fork")
    results = context.Manager().dict()
    mp.start_processes(_fsdp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, start_method="fork")
    assert dict(results) == {0: (True, "DTensor", True, True), 1: (True, "DTensor", True, True)}


# -- the conformance suite ------------------------------------------------------------------------


class TestHqqConformance(BackendConformance):
    backend = NAME
    forward_tol = 1e-4  # HQQLinear's forward is exactly x @ dequantize().T + bias
