"""quantplug-inc on layers built by Intel Neural Compressor itself (RTN, CPU)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import quantplug as qp
import torch
from quantplug._info import Status
from quantplug.testing import BackendConformance, random_linear, relative_error
from quantplug_inc import NAME, VARIANTS, layers, probe
from torch import nn

torch.set_num_threads(1)

IN, OUT = 128, 64
DEFAULT = next(iter(VARIANTS))


def dense(seed: int = 0, bias: bool = True) -> nn.Linear:
    return random_linear(IN, OUT, bias=bias, seed=seed)


def inc_layer(variant: str = DEFAULT, seed: int = 0, bias: bool = True) -> nn.Module:
    return qp.quantize(dense(seed, bias), NAME, variant)


def recover(module: nn.Module) -> torch.Tensor:
    """INC's own dequantization, on a copy (recover() stores g_idx on the layer), as forward uses it."""
    weight = copy.deepcopy(module).recover()
    return weight.float() if weight.dtype == torch.float16 else weight


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers, parameters and plain tensor attributes (INC's weight cache is one)."""
    found = {k: v.detach().clone() for k, v in module.state_dict().items()}
    found.update({k: v.detach().clone() for k, v in vars(module).items() if isinstance(v, torch.Tensor)})
    return found


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def wrapped(variant: str = DEFAULT, **config) -> nn.Sequential:
    model = nn.Sequential(inc_layer(variant))
    settings = {"r": 8, "alpha": 16, "target_modules": ["0"], "init": "random", **config}
    qp.attach(model, qp.LoraConfig(**settings))
    return model


def act_order_layer(seed: int = 0) -> nn.Module:
    """A layer with a g_idx channel permutation, packed as INC's GPTQ (act_order=True) packs it."""
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear
    from neural_compressor.torch.algorithms.weight_only.utility import quant_tensor

    linear = dense(seed)
    perm = torch.randperm(IN, generator=torch.Generator().manual_seed(seed))
    W = linear.weight.detach().clone()[:, perm].contiguous()
    codes, scales, zp = quant_tensor(W, bits=4, group_size=32, scheme="asym", return_int=True)
    layer = INCWeightOnlyLinear(IN, OUT, bits=4, group_size=32, zp=True, bias=True, g_idx=True)
    layer.pack(codes[:, torch.argsort(perm)], scales, zp, linear.bias.detach(), g_idx=perm)
    return layer


# --------------------------------------------------------------------------
# The core's conformance suite
# --------------------------------------------------------------------------


class TestIncConformance(BackendConformance):
    backend = NAME
    # the forward is x @ recover(W).T in fp32: only summation order differs
    forward_tol = 1e-5

    def test_compile(self):  # one variant: each compile costs seconds on 2 cores
        super().test_compile(DEFAULT)


# --------------------------------------------------------------------------
# Plugin description, version probe, detection
# --------------------------------------------------------------------------


def test_import_is_light():
    code = (
        "import sys, quantplug_inc; from torch import nn;"
        "assert quantplug_inc.quantplug_detect_layer(nn.Linear(4, 4)) is None;"
        "assert 'neural_compressor' not in sys.modules, 'imported INC';"
        "assert 'quantplug_inc.layers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quantize_before_and_after_transformers_is_imported():
    """INC's RTN binds ``transformers`` only if it was imported first; the plugin imports it first, so a
    layer quantized before transformers is imported, then one after, both work (the demo's order)."""
    code = (
        "import sys, torch, quantplug as qp;"
        "assert 'transformers' not in sys.modules;"
        "qp.quantize(torch.nn.Linear(64, 64), 'inc', 'int4-g32');"
        "import transformers;"
        "layer = qp.quantize(torch.nn.Linear(64, 64), 'inc', 'int4-g32');"
        "assert qp.detect(layer) == 'inc'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_backend_status_ok():
    status = qp.load_plugins().status(NAME)
    assert status.status is Status.OK, status
    assert status.found is not None and status.plugin_dist == "quantplug-inc"
    info = status.info
    assert info.variants[0] == DEFAULT and set(info.merge_modes) == {"requantize", "dense", "zeros"}
    assert "neural-compressor[pt]" in info.requires[0].install_line()


def test_probe_reports_missing_torch_extra(monkeypatch):
    """neural-compressor installed without [pt]: metadata says 3.x, `import neural_compressor.torch` fails."""
    info = qp.load_plugins().status(NAME).info
    real = probe.installed_version
    monkeypatch.setattr(probe, "installed_version", lambda d: None if d == "py-cpuinfo" else real(d))
    status = probe.check(info)
    assert status.status is Status.BROKEN and "py-cpuinfo" in status.reason
    assert status.fix == "pip install 'neural-compressor[pt]>=3.8.1,<4'"


def test_probe_accepts_torch_only_dist(monkeypatch):
    """INC's PyTorch API also ships as `neural-compressor-pt`, with no extras."""
    info = qp.load_plugins().status(NAME).info
    versions = {"neural-compressor": None, "neural-compressor-pt": "3.9"}
    real = probe.installed_version
    monkeypatch.setattr(probe, "installed_version", lambda d: versions[d] if d in versions else real(d))
    monkeypatch.setattr("quantplug._versions.installed_version", probe.installed_version)
    monkeypatch.setattr(probe.metadata, "requires", lambda dist: ["torch", "psutil"])
    status = probe.check(info)
    assert status.status is Status.OK and status.found == "3.9", status
    versions["neural-compressor-pt"] = "2.6"
    assert probe.check(info).status is Status.TOO_OLD


def test_check_backend_ignores_other_backends():
    from quantplug_inc import quantplug_check_backend

    assert quantplug_check_backend(info=qp.BackendInfo(name="bnb")) is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detect(variant):
    layer = inc_layer(variant)
    assert type(layer).__name__ == "INCWeightOnlyLinear"
    assert qp.detect(layer) == NAME
    assert qp.detect(act_order_layer()) == NAME
    assert qp.detect(nn.Linear(IN, OUT)) == "linear"  # the core's, never ours
    from quantplug_inc import quantplug_detect_layer

    assert quantplug_detect_layer(module=nn.Linear(IN, OUT)) is None


def test_unknown_variant():
    with pytest.raises(ValueError, match="int4-g32-asym"):
        qp.quantize(dense(), NAME, "int3-g7")


# --------------------------------------------------------------------------
# quantize: INC's RTN path
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantize_formats(variant):
    settings = VARIANTS[variant]
    layer = inc_layer(variant)
    fmt = layers.layer_format(layer)
    assert (fmt.dtype, fmt.bits, fmt.group_size, fmt.sym) == (
        settings["dtype"],
        settings["bits"],
        settings["group_size"],
        settings["use_sym"],
    )
    error = relative_error(layers.dequantize(layer), dense().weight)
    assert error < {4: 0.12, 8: 0.01}[settings["bits"]], error


def test_quantize_leaves_the_linear_alone():
    """INC's RTN convert writes the integer codes into the source linear's weight: we hand it a copy."""
    from neural_compressor.torch.quantization import RTNConfig, convert, prepare

    linear = dense()
    before = linear.weight.detach().clone()
    qp.quantize(linear, NAME)
    assert torch.equal(linear.weight, before)

    victim = dense()  # the library, called directly
    convert(prepare(nn.Sequential(victim), RTNConfig(bits=4, group_size=32)))
    assert not torch.equal(victim.weight, before)
    assert torch.equal(victim.weight, victim.weight.round())  # integer codes now


# --------------------------------------------------------------------------
# dequantize: vs INC's recover(), vs the forward, and the cache traps
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dequantize_is_recover_bit_for_bit(variant):
    layer = inc_layer(variant)
    weight = layers.dequantize(layer)
    assert weight.dtype == torch.float32 and weight.shape == (OUT, IN)
    assert torch.equal(weight, recover(layer))
    x = torch.randn(5, IN)
    with torch.no_grad():
        got = layer(x)  # builds INC's cache
    assert torch.equal(layer.weight, weight)  # the cache is recover()'s weight
    assert torch.allclose(got, x @ weight.T + layer.bias, atol=1e-6, rtol=1e-5)
    assert torch.equal(layers.dequantize(layer), weight)  # unchanged after the forward


def test_dequantize_act_order_layer():
    layer = act_order_layer()
    weight = layers.dequantize(layer)
    assert torch.equal(weight, recover(layer))
    assert relative_error(weight, dense().weight) < 0.12
    x = torch.randn(3, IN)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ weight.T + layer.bias, atol=1e-6, rtol=1e-5)


def test_dequantize_reads_codes_not_the_stale_cache():
    """pack() into a used layer leaves its cache (and forward) on the old weight."""
    from neural_compressor.torch.algorithms.weight_only.utility import quant_tensor

    layer = inc_layer()
    x = torch.randn(2, IN)
    with torch.no_grad():
        old = layer(x)
        other = dense(seed=1).weight.detach().clone()
        codes, scales, zp = quant_tensor(other, bits=4, group_size=32, scheme="sym", return_int=True)
        layer.pack(codes, scales, zp, None)
        assert torch.equal(layer(x), old)  # INC's forward: stale
    weight = layers.dequantize(layer)
    assert torch.equal(weight, recover(layer))  # the packed codes
    assert not torch.equal(weight, layer.weight)
    assert relative_error(weight, dense(seed=1).weight) < 0.12
    used = inc_layer()
    with torch.no_grad():
        used(x)
        used.pack(codes, scales, zp, dense(seed=1).bias.detach())  # the bias goes back to fp16
        with pytest.raises(RuntimeError, match="dtype"):
            used(x)


def test_load_state_dict_refreshes_the_cache():
    """load_state_dict into a used INC layer: its forward mixes the old weight with the new bias."""
    x = torch.randn(2, IN)
    bare, other = inc_layer(seed=0), inc_layer(seed=1)
    with torch.no_grad():
        bare(x)
        old_weight = bare.weight.clone()
        bare.load_state_dict(other.state_dict())
        assert torch.equal(bare.weight, old_weight)  # stale cache
        assert torch.allclose(bare(x), x @ old_weight.T + other.bias.float(), atol=1e-6)
        assert torch.equal(layers.dequantize(bare), layers.dequantize(other))  # the codes
    model = wrapped()
    with torch.no_grad():
        model(x)
        model.load_state_dict({f"0.base.{k}": v for k, v in other.state_dict().items()}, strict=False)
        model[0].disabled = True
        got = model(x)
    want = x.double() @ layers.dequantize(other).double().T + other.bias.double()
    assert relative_error(got, want) < 1e-5


def test_int8_asym_recover_wraps_and_forward_follows():
    """INC's recover() casts (code - zero) to int8: 8-bit asymmetric codes wrap around.

    The forward uses that weight, so dequantize does too (and no int8-asym variant is offered).
    """
    linear = dense()
    layer = layers.quantize(linear, dtype="int", bits=8, group_size=128, use_sym=False)
    unpacked = layer.unpack()
    codes, zp, scales = unpacked["int_weight"], unpacked["zp"], unpacked["scales"]
    correct = (codes.int() - zp.int()) * scales.float()
    weight = layers.dequantize(layer)
    assert torch.equal(weight, recover(layer))
    assert relative_error(correct, linear.weight) < 0.01
    assert relative_error(weight, linear.weight) > 0.05  # the library's wrapped weight
    x = torch.randn(3, IN)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ weight.T + layer.bias, atol=1e-5, rtol=1e-5)


def test_compute_dtype_and_bf16_input():
    """The bare layer returns fp32 for bf16 input; the wrapped one returns bf16."""
    model = wrapped()
    base = model[0].base
    assert layers.compute_dtype(base) == torch.float32
    assert model[0].lora_A["default"].dtype == torch.float32
    x = torch.randn(4, IN).bfloat16()
    with torch.no_grad():
        assert base(x).dtype == torch.float32  # INC's trap
        got = model(x)
    assert got.dtype == torch.bfloat16
    W = layers.dequantize(base).double() + model[0].delta_weight("default").double()
    want = x.double() @ W.T + base.bias.double()
    assert relative_error(got, want) < 1e-2


def test_wrapped_forward_equals_base_forward_bit_for_bit():
    """IncLoraLayer skips INC's logging call, not its arithmetic."""
    model = wrapped()
    layer = model[0]
    x = torch.randn(4, IN)
    with torch.no_grad():
        assert torch.equal(layer.base_forward(x), layer.base(x))
        layer.disabled = True
        assert torch.equal(model(x), layer.base(x))


def test_to_dtype_rebuilds_the_cache():
    """model.double() after a forward: INC's own forward fails (buffers moved, cache not); wrapped works."""
    bare = inc_layer()
    x = torch.randn(2, IN)
    with torch.no_grad():
        bare(x)
        bare.double()
        with pytest.raises(RuntimeError, match="dtype"):
            bare(x.double())
    model = wrapped()
    with torch.no_grad():
        model(x)
        model.double()
        got = model(x.double())
    base = model[0].base
    W = layers.dequantize(base).double() + model[0].delta_weight("default").double()
    assert got.dtype == torch.float64
    assert relative_error(got, x.double() @ W.T + base.bias.double()) < 1e-5


# --------------------------------------------------------------------------
# requantize and merge
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_requantize_of_dense_weight_is_rtn(variant):
    """requantize(layer, W) builds what INC's RTN convert builds from W: same tensors, same format."""
    layer = inc_layer(variant)
    with torch.no_grad():
        layer(torch.randn(1, IN))  # a used layer: cache built, bias turned fp32
    before = state(layer)
    new = layers.requantize(layer, dense().weight.detach())
    assert same_state(before, state(layer))  # original untouched, cache included
    assert type(new) is type(layer) and new is not layer
    assert layers.layer_format(new) == layers.layer_format(layer)
    fresh = inc_layer(variant)
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(new.state_dict()[key].to(tensor.dtype), tensor), key
    assert torch.equal(new.bias.float(), layer.bias.float())
    assert torch.equal(layers.dequantize(new), layers.dequantize(fresh))


def test_requantize_keeps_act_order():
    layer = act_order_layer()
    weight = layers.dequantize(layer)
    new = layers.requantize(layer, weight)
    assert layers.layer_format(new) == layers.layer_format(layer)
    assert torch.equal(new.g_idx, layer.g_idx)
    assert torch.equal(new.qweight, layer.qweight)  # its own grid holds the weight exactly
    assert relative_error(layers.dequantize(new), weight) < 1e-3


def test_requantize_bias_free_and_full_range():
    layer = layers.quantize(dense(bias=False), dtype="int", bits=4, group_size=32, use_sym=True)
    assert layer.bias is not None and not layer.bias.any()  # optimum format: a zero bias buffer
    new = layers.requantize(layer, layers.dequantize(layer))
    assert torch.equal(new.qweight, layer.qweight)
    nf4 = inc_layer("nf4-g32", bias=False)
    assert nf4.bias is None
    assert layers.requantize(nf4, layers.dequantize(nf4)).bias is None


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["requantize", "dense"])
def test_merge_unmerge(variant, mode):
    model = wrapped(variant)
    layer = model[0]
    original = layer.base
    x = torch.randn(4, IN)
    with torch.no_grad():
        before_out = model(x)
        W = layers.dequantize(original)
        delta = layer.delta_weight("default")
    before = state(original)
    report = qp.merge(model, mode=mode)
    entry = report.layers[0]
    merged = model[0].base
    got = layers.dequantize(merged) if mode == "requantize" else merged.weight
    ideal = W + delta
    assert entry.error == pytest.approx(relative_error(got, ideal), rel=1e-3, abs=1e-7)
    assert entry.adapter_error == pytest.approx(relative_error(got - W, delta), rel=1e-3, abs=1e-7)
    if mode == "dense":
        assert entry.error < 1e-6
    else:
        assert type(merged) is type(original)
        assert layers.layer_format(merged).bits == layers.layer_format(original).bits
        # what survives: an adapter of norm ~ ||W|| / 2 loses at most the grid's rounding error
        assert entry.adapter_error < {4: 0.3, 8: 0.02}[VARIANTS[variant]["bits"]]
    with torch.no_grad():
        merged_out = model(x)
        want = x.double() @ got.double().T + merged.bias.double()
    assert relative_error(merged_out, want) < 1e-5
    assert relative_error(merged_out, before_out) < {"dense": 1e-5, "requantize": 0.2}[mode]
    qp.unmerge(model)
    assert model[0].base is original
    assert same_state(before, state(original))
    with torch.no_grad():
        assert torch.equal(model(x), before_out)  # the original's cache is still its own weight


def test_merge_then_compile_and_unmerge():
    model = wrapped()
    x = torch.randn(2, IN)
    with torch.no_grad():
        model(x)
        qp.merge(model, mode="requantize")
        assert "weight" in vars(model[0].base)  # requantize built the new layer's cache
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        assert relative_error(compiled(x), model(x)) < 1e-5
        qp.unmerge(model)
