"""quantplug-eetq against a real EETQ build on a CUDA GPU.

Skipped without a CUDA device or without EETQ installed (CI has neither: EETQ
is built from source with nvcc; docs/backends.md#eetq says how).
``scripts/eetq_gpu.sh`` runs this file on a GPU machine with EETQ installed.

Layers are built from ``nn.Linear`` by EETQ's own API (``eetq.EetqLinear`` filled by
``quantize_and_preprocess_weights``, and ``eetq.W8A16Linear.from_torch``), wrapped,
and checked against a dense float64 reference; merges in both modes report their
measured errors, and unmerge must restore the original layer bit for bit. The
numbers measured are printed (``pytest -s``) and, with ``EETQ_GPU_RESULTS=path``,
written there as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from torch import nn

if importlib.util.find_spec("eetq") is None:
    pytest.skip(
        "EETQ is not installed (build it from source: docs/backends.md#eetq)", allow_module_level=True
    )
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import quantplug as qp
from quantplug._registry import hook, load_plugins
from quantplug.testing import BackendConformance, random_linear
from quantplug.testing.conformance import Holder, relative_error

RESULTS: dict[str, object] = {}
VARIANTS = ("int8", "int8-w8a16")


@pytest.fixture(scope="module", autouse=True)
def record():
    from quantplug_eetq import layers  # noqa: F401  (the plugin must import with EETQ present)

    RESULTS["gpu"] = torch.cuda.get_device_name(0)
    RESULTS["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(0))
    RESULTS["torch"] = torch.__version__
    RESULTS["eetq"] = load_plugins().status("eetq").found
    yield
    print("\nEETQ GPU results:\n" + json.dumps(RESULTS, indent=1, default=str))
    path = os.environ.get("EETQ_GPU_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


def dense(in_features, out_features, seed=0, bias=True):
    return random_linear(in_features, out_features, bias=bias, seed=seed, device="cuda")


def reference(x, weight, bias):
    out = x.double() @ weight.double().T
    return out + bias.double() if bias is not None else out


def dequantize(module):
    return hook().quantplug_dequantize(module=module, backend="eetq")


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(before, module):
    after = module.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_status_ok():
    status = load_plugins().status("eetq")
    assert status.ok, f"{status.status}: {status.reason} ({status.fix})"


def test_eetq_runs_on_this_gpu():
    """EETQ 1.0.1 refuses sm_90+ ('Unsupported Arch') unless built with sm_90 mapped to its sm_80 kernels."""
    from EETQ import quant_weights

    try:
        quant_weights(torch.randn(128, 128, dtype=torch.float16), torch.int8, False)
    except RuntimeError as exc:
        pytest.fail(f"EETQ's quant_weights fails on {RESULTS['capability']}: {exc} (docs/backends.md#eetq)")


@pytest.mark.parametrize("variant", VARIANTS)
def test_detect_and_dequantize_is_exact(variant):
    """Dequantize (identity through the layer's forward) equals fp16(codes * scales) from EETQ's own quantizer."""
    from EETQ import quant_weights

    linear = dense(1024, 768)
    layer = qp.quantize(linear, "eetq", variant)
    assert qp.detect(layer) == "eetq"
    before = state(layer)
    weight = dequantize(layer)
    assert weight.shape == (768, 1024) and weight.dtype == torch.float16
    assert same_state(before, layer)
    codes, processed, scales = quant_weights(
        linear.weight.detach().half().T.contiguous().cpu(), torch.int8, True
    )
    packed = layer.weight if variant == "int8" else layer.qweight
    assert torch.equal(processed.cuda(), packed), "quant_weights is deterministic"
    truth = (codes.cuda().half() * scales.cuda().half()).T
    assert torch.equal(weight, truth), (
        f"identity dequantize differs from codes*scales by {relative_error(weight, truth):.2e}"
    )
    naive = (packed.half() * layer.weight_scales).T  # reading the pre-processed storage as codes
    RESULTS[f"{variant}: storage read as codes, error"] = relative_error(naive, truth)
    RESULTS[f"{variant}: int8 quantization error vs fp32 weight"] = relative_error(weight, linear.weight)
    assert relative_error(naive, truth) > 0.1, "EETQ's storage is pre-processed, not plain codes"


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_dequantized_weight(variant):
    layer = qp.quantize(dense(1024, 768), "eetq", variant)
    weight = dequantize(layer)
    errors = {}
    for rows in (1, 3, 4, 5, 16, 64, 300):  # <= 4 rows: EETQ's gemv kernel; more: CUTLASS
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            errors[rows] = relative_error(layer(x), reference(x, weight, layer.bias))
    RESULTS[f"{variant}: forward vs x @ dequant(W).T + b, by rows"] = errors
    assert max(errors.values()) < 2e-3, errors
    assert torch.equal(dequantize(layer), weight), "dequantize after forwards"


def test_bare_layer_reads_bf16_as_fp16():
    """The trap the wrapped layer removes: EETQ's kernel takes any input's bytes as fp16."""
    layer = qp.quantize(dense(1024, 768), "eetq")
    weight = dequantize(layer)
    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        try:
            error = relative_error(layer(x), reference(x, weight, layer.bias))
        except RuntimeError as exc:  # a later EETQ that checks the dtype
            error = f"raises: {exc}"
    RESULTS["bare EetqLinear, bf16 input, error"] = error
    assert isinstance(error, str) or error > 0.5 or error != error  # wrong, NaN, or refused


@pytest.mark.parametrize("variant", VARIANTS)
def test_wrapped_forward_dora_mixed_and_gradients(variant):
    layer = qp.quantize(dense(1024, 768), "eetq", variant)
    model = qp.attach(Holder(layer), qp.LoraConfig(r=16, alpha=32, target_modules=["proj"], init="random"))
    proj = model.proj
    W = dequantize(layer).double() + proj.delta_weight("default").double()
    errors = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(2, 9, 1024, device="cuda").to(dtype)
        with torch.no_grad():
            got = model(x)
        assert got.dtype == dtype
        errors[str(dtype)] = relative_error(got, reference(x, W, layer.bias))
    RESULTS[f"{variant}: wrapped forward vs reference, by input dtype"] = errors
    assert max(errors.values()) < 1e-2, errors
    # mixed batch
    qp.attach(model, qp.LoraConfig(r=8, alpha=16, target_modules=["proj"], init="random"), "other")
    x = torch.randn(3, 1024, device="cuda", dtype=torch.float16)
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        alone = {}
        for name in ("default", "other"):
            qp.set_adapter(model, name)
            alone[name] = model(x)
        with qp.disable_adapters(model):
            alone["__base__"] = model(x)
    for row, name in enumerate(names):
        assert relative_error(mixed[row], alone[name][row]) < 1e-2
    # gradients reach the input and the adapters
    qp.set_adapter(model, "default")
    qp.prepare_for_training(model)
    x = torch.randn(5, 1024, device="cuda", dtype=torch.float16, requires_grad=True)
    model(x).float().sum().backward()
    want = torch.ones(5, 768, device="cuda", dtype=torch.float64) @ W
    RESULTS[f"{variant}: input gradient vs reference"] = relative_error(x.grad, want)
    assert relative_error(x.grad, want) < 1e-2
    assert proj.lora_A["default"].grad is not None and proj.lora_B["default"].grad is not None


def test_dora():
    layer = qp.quantize(dense(1024, 768), "eetq")
    model = qp.attach(
        Holder(layer), qp.LoraConfig(r=16, alpha=32, target_modules=["proj"], init="random", use_dora=True)
    )
    proj = model.proj
    with torch.no_grad():
        proj.lora_magnitude["default"].mul_(1.5)
        x = torch.randn(7, 1024, device="cuda", dtype=torch.float16)
        W = dequantize(layer).double()
        direction = W + proj.delta_weight("default", magnitude=False).double()
        merged = (
            proj.lora_magnitude["default"].double().unsqueeze(1)
            * direction
            / direction.norm(dim=1, keepdim=True)
        )
        error = relative_error(model(x), reference(x, merged, layer.bias))
    RESULTS["DoRA forward vs definition"] = error
    assert error < 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["requantize", "dense"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_merge_and_exact_unmerge(variant, mode, size):
    layer = qp.quantize(dense(4096, 4096), "eetq", variant)
    model = qp.attach(Holder(layer), qp.LoraConfig(r=16, alpha=32, target_modules=["proj"], init="random"))
    if size == "small":  # |dW| about 3% of |W|, as after fine-tuning
        with torch.no_grad():
            W0 = dequantize(layer).float()
            ratio = model.proj.delta_weight("default").norm() / W0.norm()
            model.proj.lora_B["default"].mul_(0.03 / ratio.item())
    before = state(layer)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        W = dequantize(layer).float()
        delta = model.proj.delta_weight("default", base=W)
        unmerged = model(x)
        report = qp.merge(model, mode=mode)
        merged = model(x)
        base = model.proj.base
        merged_weight = base.weight.float() if mode == "dense" else dequantize(base).float()
        true_error = relative_error(merged_weight, W + delta)
    entry = report.layers[0]
    key = f"{variant}: merge {mode}, |dW|/|W| = {delta.norm().item() / W.norm().item():.3f}"
    RESULTS[key] = {
        "error vs W+dW": entry.error,
        "error / |dW|": entry.adapter_error,
        "measured error vs W+dW": true_error,
        "merged forward vs unmerged forward": relative_error(merged, unmerged),
    }
    assert abs(entry.error - true_error) <= 1e-3 + 0.05 * true_error, "the report must tell the truth"
    if mode == "requantize":
        assert type(base) is type(layer) and qp.detect(base) == "eetq"
        assert entry.error < 1e-2 and not report.dropped
    else:
        assert type(base) is nn.Linear and entry.error < 1e-3
    assert relative_error(merged, unmerged) < 2e-2
    qp.unmerge(model)
    assert model.proj.base is layer and same_state(before, layer), (
        "unmerge must restore the original bit for bit"
    )
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


def test_requantize_own_weight_is_stable():
    layer = qp.quantize(dense(4096, 4096), "eetq")
    W = dequantize(layer)
    again = hook().quantplug_requantize(module=layer, weight=W, backend="eetq")
    error = relative_error(dequantize(again), W)
    RESULTS["requantize(dequantize(W)) vs W"] = error
    RESULTS["requantize(dequantize(W)) storage identical"] = torch.equal(again.weight, layer.weight)
    # not idempotent: quant_weights takes scale = max / 128 but clips codes at 127, so the column max
    # comes back as 127 s and the next scale is 127/128 of it: every code re-rounds (one rounding step)
    assert error < 1e-2


class TestEetqConformanceGPU(BackendConformance):
    """The whole conformance suite on real EETQ layers (CUDA)."""

    backend = "eetq"
    in_features = 256
    out_features = 128
    forward_tol = 3e-3  # fp16 output of an int8 x fp16 GEMM

    def make_layer(self, linear, variant):
        return qp.quantize(linear.cuda(), self.backend, variant)
