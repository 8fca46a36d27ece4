"""The lean training node (quantplug._lean): the gradients autograd would give, without a dense weight kept.

On real layers of every installed backend that can quantize here: the wrapped
layer's training forward goes through ``LeanLoraLinear``, and the gradients
of the input and of both adapter matrices match plain autograd on
``x @ W.T + scale * (x @ A.T) @ B.T`` with ``W`` the backend's own
dequantized weight. The loss is linear in the output (a fixed random
cotangent), so the gradients do not depend on how exactly the library's
kernel rounds its forward. Then what the node keeps for the backward is
checked: no tensor the size of the weight.
"""

from __future__ import annotations

import pytest
import quantplug as qp
import torch
from quantplug.testing import Holder, random_linear, relative_error

IN, OUT, R = 128, 64, 4


def quantizable() -> list[tuple[str, str | None]]:
    cases = []
    for row in qp.backends():
        if row.ok and row.info is not None and "cpu" in row.info.devices:
            cases.extend((row.name, variant) for variant in (row.info.variants or (None,)))
    return cases


def train_model(backend: str, variant: str | None, dropout: float = 0.0) -> Holder:
    try:
        layer = qp.quantize(random_linear(IN, OUT, seed=3), backend, variant)
    except (NotImplementedError, RuntimeError, ValueError) as exc:  # a variant this CPU cannot build
        pytest.skip(f"{backend}/{variant} cannot quantize here: {exc}")
    model = Holder(layer)
    torch.manual_seed(5)
    qp.attach(model, qp.LoraConfig(r=R, alpha=2 * R, target_modules=["proj"], init="random", dropout=dropout))
    qp.prepare_for_training(model)
    return model


@pytest.mark.parametrize("backend,variant", quantizable(), ids=lambda v: str(v))
def test_lean_gradients_match_autograd_on_the_dequantized_weight(backend, variant):
    model = train_model(backend, variant)
    layer = model.proj
    weight = layer.dequantized_weight().detach()
    dtype = layer.lora_A["default"].dtype if weight.dtype == torch.float16 else weight.dtype
    torch.manual_seed(7)
    x = torch.randn(3, 5, IN, dtype=dtype, requires_grad=True)
    cotangent = torch.randn(3, 5, OUT)
    y = model(x)
    assert type(y.grad_fn).__name__ == "LeanLoraLinearBackward", f"{backend}: the lean node did not run"
    (y.float() * cotangent).sum().backward()

    A = layer.lora_A["default"].detach().float().requires_grad_()
    B = layer.lora_B["default"].detach().float().requires_grad_()
    x_ref = x.detach().float().requires_grad_()
    y_ref = x_ref @ weight.float().T + (x_ref @ A.T) @ B.T * layer.scaling["default"]
    (y_ref * cotangent).sum().backward()

    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16/fp16 round dy and the products
    assert relative_error(x.grad, x_ref.grad) < tol, backend
    assert relative_error(layer.lora_A["default"].grad, A.grad) < tol, backend
    assert relative_error(layer.lora_B["default"].grad, B.grad) < tol, backend


@pytest.mark.parametrize(
    "backend,variant", [c for c in quantizable() if c[0] in ("hqq", "bnb", "linear")][:4]
)
def test_the_lean_node_keeps_no_dense_weight_for_the_backward(backend, variant):
    model = train_model(backend, variant)
    saved: list[torch.Size] = []

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    x = torch.randn(4, IN, dtype=model.proj.lora_A["default"].dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    assert saved, "the node saves its inputs through autograd"
    assert all(shape.numel() < OUT * IN for shape in saved), f"{backend}: saved {saved}"
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_dropout_and_the_first_layer_input_are_handled_outside_the_node():
    model = train_model("linear", None, dropout=0.5)
    x = torch.randn(6, IN)  # no requires_grad: the first layer of a model; dx is never computed
    torch.manual_seed(11)
    y = model(x)
    y.sum().backward()
    grad_a = model.proj.lora_A["default"].grad.clone()
    model.zero_grad()
    torch.manual_seed(11)  # the same dropout mask through plain autograd
    layer = model.proj
    dropped = layer.lora_dropout["default"](x)
    reference = (
        layer.base(x)
        + (dropped @ layer.lora_A["default"].T) @ layer.lora_B["default"].T * layer.scaling["default"]
    )
    reference.sum().backward()
    assert relative_error(grad_a, layer.lora_A["default"].grad) < 1e-5


def test_a_trainable_base_keeps_autograd_so_its_weight_gets_gradients():
    model = Holder(random_linear(IN, OUT))
    qp.attach(model, qp.LoraConfig(r=R, target_modules=["proj"], init="random"))
    model.proj.base.weight.requires_grad_(True)  # the user trains the dense base too
    model(torch.randn(2, IN)).sum().backward()
    assert model.proj.base.weight.grad is not None


def test_the_backward_never_waits_for_the_device(monkeypatch):
    """No ``bool(tensor)`` in the training step: the plugin's weight is checked for shape and dtype there,
    not for finiteness (that check stops the host once per layer and step); merges still check it."""
    model = train_model("linear", None)
    x = torch.randn(4, IN, requires_grad=True)
    y = model(x)
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(t.shape) or real(t))
    y.sum().backward()
    assert calls == [], "the lean backward checked a tensor's finiteness (a device sync on CUDA)"
    assert x.grad is not None and model.proj.lora_A["default"].grad is not None
    model.proj.dequantized_weight()
    assert calls == [(OUT, IN)], "dequantized_weight() outside training keeps its finiteness check"


def test_one_product_gives_both_input_gradients():
    """Without dropout the adapter's input is x itself: x's gradient through the weight and through the
    adapter come from one addmm, and still add up to autograd's."""
    model = train_model("linear", None)
    layer = model.proj
    weight = layer.dequantized_weight().detach()
    torch.manual_seed(3)
    x = torch.randn(6, IN, requires_grad=True)
    model(x).pow(2).sum().backward()
    A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    x_ref = x.detach().clone().requires_grad_()
    bias = 0 if layer.bias is None else layer.bias.detach()
    (x_ref @ weight.T + bias + (x_ref @ A.T) @ B.T * layer.scaling["default"]).pow(2).sum().backward()
    assert relative_error(x.grad, x_ref.grad) < 1e-5
