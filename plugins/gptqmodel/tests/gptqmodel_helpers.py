"""Test helpers shared by the gptq and awq backends' tests: layers, models, and checks both run.

Each ``check_*`` function is the body of a test both plugins have, run on a
layer the calling test builds, for the backend it names.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import quantplug as qp
import torch
from quantplug._registry import hook, load_plugins
from quantplug.testing import random_linear, relative_error
from quantplug.testing.conformance import Holder
from torch import nn

IN, OUT = 128, 64


# -- layers, inputs, models -------------------------------------------------------


def dense(seed: int = 0, bias: bool = True) -> nn.Linear:
    return random_linear(IN, OUT, bias=bias, seed=seed)


def inputs(rows: int = 4, dtype=torch.float16, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(rows, IN).to(dtype)


def dequant(layer: nn.Module, backend: str) -> torch.Tensor:
    return hook().quantplug_dequantize(module=layer, backend=backend)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    after = module.state_dict()
    return before.keys() == after.keys() and all(
        before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before
    )


def wrapped(layer: nn.Module, **config) -> Holder:
    model = Holder(layer)
    settings = {"r": 8, "alpha": 16, "target_modules": ["proj"], "init": "random"}
    settings.update(config)
    qp.attach(model, qp.LoraConfig(**settings))
    return model


# -- checks both plugins run ----------------------------------------------------------


def check_import_and_backend_info_are_light(package: str) -> None:
    code = (
        f"import sys, {package}; {package}.quantplug_backend_info(); "
        "print(sorted(m for m in ('torch', 'gptqmodel') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def check_version_probe(backend: str, requirement, dist: str) -> None:
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    status = load_plugins().status(backend)
    assert status.ok, status.reason
    assert status.found == version("gptqmodel")
    assert status.found in SpecifierSet(requirement.specifier)
    assert status.plugin_dist == dist


def check_dequantize_after_the_first_forward(layer: nn.Module, backend: str) -> None:
    """The CPU-fused kernels repack into int4pack on their first inference forward; read them anyway."""
    before = dequant(layer, backend)
    x = inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        first = layer(x)
    after = dequant(layer, backend)
    assert relative_error(after, before) < 1e-2  # bf16 rounding of the int4pack kernel
    assert relative_error(first, reference(x, after, layer.bias)) < 1e-2
    assert torch.equal(dequant(layer, backend), after)  # reading it changes nothing


def check_wrapped_forward_dora_and_mixed_batch(layer: nn.Module, backend: str) -> None:
    model = wrapped(layer)
    layer = model.proj
    qp.attach(
        model, qp.LoraConfig(r=4, alpha=8, target_modules=["proj"], init="random", use_dora=True), "dora"
    )
    with torch.no_grad():
        layer.lora_magnitude["dora"].mul_(1.3)
    x = inputs(dtype=torch.bfloat16)
    W = dequant(layer.base, backend).double()
    with torch.no_grad():
        qp.set_adapter(model, "default")
        plain = model(x)
        qp.set_adapter(model, "dora")
        dora = model(x)
        mixed = model(x, adapter_names=["default", "dora", "__base__", "dora"])
        with qp.disable_adapters(model):
            base = model(x)
    assert relative_error(plain, reference(x, W + layer.delta_weight("default").double(), layer.bias)) < 2e-2
    direction = W + layer.delta_weight("dora", magnitude=False).double()
    dora_weight = (
        layer.lora_magnitude["dora"].double().unsqueeze(1) * direction / direction.norm(dim=1, keepdim=True)
    )
    assert relative_error(dora, reference(x, dora_weight, layer.bias)) < 2e-2
    for row, want in enumerate((plain, dora, base, dora)):
        assert relative_error(mixed[row], want[row]) < 1e-2


def check_training_reaches_the_input(layer: nn.Module, backend: str) -> None:
    """A backward to the input, from a base whose ``train()`` may raise (the int8 and CUDA kernels)."""
    model = wrapped(layer)
    qp.prepare_for_training(model)
    assert model.proj.training and not model.proj.base.training
    x = inputs(dtype=torch.float32).requires_grad_(True)
    grad_out = torch.randn(x.shape[0], OUT)
    model(x).backward(grad_out)
    W = dequant(model.proj.base, backend).float() + model.proj.delta_weight("default")
    assert x.grad is not None and relative_error(x.grad, grad_out @ W) < 1e-2
    assert (
        model.proj.lora_A["default"].grad.abs().sum() > 0
        and model.proj.lora_B["default"].grad.abs().sum() > 0
    )
    model.eval()
    assert model.proj._dense_cache is None


def check_merge_requantize_dense_and_unmerge(
    layer: nn.Module,
    backend: str,
    same_format: Callable[[nn.Module, nn.Module], None],
    max_error: float,
) -> None:
    """Merge dense, unmerge, merge requantize, unmerge; the requantized layer is ``layer``'s class.

    :param same_format: asserts that the requantized layer (first argument) keeps ``layer``'s format.
    :param max_error: the largest relative error of the requantized weight against ``W + dW``.
    """
    import pytest

    model = wrapped(layer, alpha=4)  # an adapter about a third of W's size, as after some training
    before = state(layer)
    W = dequant(layer, backend).float()
    delta = model.proj.delta_weight("default")
    ideal = W + delta
    x = inputs(dtype=torch.bfloat16)

    report = qp.merge(model, mode="dense")
    merged = model.proj.base.weight.float()
    assert report.layers[0].error == pytest.approx(relative_error(merged, ideal), rel=1e-3, abs=1e-6)
    assert report.layers[0].adapter_error < 0.01  # dense keeps the whole adapter (fp16/bf16 rounding)
    qp.unmerge(model)
    assert model.proj.base is layer and same_state(before, layer)

    report = qp.merge(model, mode="requantize")
    new = model.proj.base
    assert type(new) is type(layer)
    same_format(new, layer)
    assert torch.equal(new.bias, layer.bias)
    got = dequant(new, backend).float()
    assert report.layers[0].error == pytest.approx(relative_error(got, ideal), rel=1e-3, abs=1e-6)
    assert report.layers[0].adapter_error == pytest.approx(
        (got - ideal).norm().item() / delta.norm().item(), rel=1e-3
    )
    # 4-bit rounding of W; the merged layer must be no worse a quantization of W+dW than that
    assert report.layers[0].error < max_error
    with torch.no_grad():
        assert relative_error(model(x), reference(x, got, new.bias)) < 2e-2
    qp.unmerge(model)
    assert model.proj.base is layer and same_state(before, layer)
