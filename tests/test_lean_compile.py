"""Training under ``qp.prepare_for_training(model, compile=True)``: the lean node as custom ops.

A tiny LLaMA on real quantized layers, with gradient checkpointing: the
compiled step has no graph break, runs the lean backward (the plugin's
dequantization inside the op), and gives the loss and adapter gradients
eager training gives. float32, so the tolerance is the compiler's reordering,
not bf16 rounding. Plus the key table the ops find their layer in: a copied
layer gets its own key, and a key whose layer is gone is refused by name.
"""

from __future__ import annotations

import copy

import pytest
import quantplug as qp
import torch
from quantplug._lora import LoraLayer
from quantplug.testing import Holder, random_linear, relative_error

pytest.importorskip("transformers")

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128,
)  # fmt: skip


def trained_llama(backend: str, variant: str | None, compile: bool):
    from quantplug.testing import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(0, **CONFIG)
    qp.quantize(model.model, backend, variant)
    qp.attach(model, qp.LoraConfig(r=4, alpha=8, target_modules=LINEARS, init="random"))
    runner = qp.prepare_for_training(model, gradient_checkpointing=True, compile=compile)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    loss = runner(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


@pytest.mark.parametrize(
    "backend,variant", [("linear", None), ("hqq", None), ("bnb", "nf4"), ("torchao", "int8wo")]
)
def test_compiled_training_matches_eager_without_a_graph_break(backend, variant, monkeypatch):
    if backend != "linear":
        pytest.importorskip({"hqq": "hqq", "bnb": "bitsandbytes", "torchao": "torchao"}[backend])
    eager_loss, eager_grads = trained_llama(backend, variant, compile=False)
    dequantized = []
    real = LoraLayer.dequantized_weight
    monkeypatch.setattr(
        LoraLayer, "dequantized_weight", lambda self, **kw: dequantized.append(1) or real(self, **kw)
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loss, grads = trained_llama(backend, variant, compile=True)
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}, "the compiled step broke its graph"
    assert dequantized, "the compiled backward did not go through the lean op (no plugin dequantization)"
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    assert grads.keys() == eager_grads.keys() and len(grads) == 2 * 7 * CONFIG["num_hidden_layers"]
    for name, grad in grads.items():
        assert relative_error(grad, eager_grads[name]) < 1e-4, name


def test_a_copied_layer_trains_through_its_own_key():
    model = qp.attach(
        Holder(random_linear(32, 16)), qp.LoraConfig(r=2, target_modules=["proj"], init="random")
    )
    qp.prepare_for_training(model)
    twin = copy.deepcopy(model)
    assert twin.proj._lean_key != model.proj._lean_key
    twin(torch.randn(3, 32, requires_grad=True)).sum().backward()
    assert twin.proj.lora_B["default"].grad is not None
    assert model.proj.lora_B["default"].grad is None, "the copy's backward wrote into the original's adapter"


def test_a_key_whose_layer_is_gone_is_refused_by_name():
    model = qp.attach(
        Holder(random_linear(32, 16)), qp.LoraConfig(r=2, target_modules=["proj"], init="random")
    )
    key, A, B = model.proj._lean_key, model.proj.lora_A["default"], model.proj.lora_B["default"]
    del model
    import gc

    gc.collect()
    with pytest.raises(
        RuntimeError, match=rf"layer key {key}, whose layer no longer exists.*compile the model"
    ):
        torch.ops.quantplug.lean_lora_linear(torch.randn(2, 32), None, A, B, 1.0, key)
