"""attach / target_modules / errors that name the layer and the fix."""

import pytest
import quantplug as qp
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.k_proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.layers:
            x = block.norm(block.q_proj(x) + block.k_proj(x))
        return self.lm_head(x)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["q_proj"], {"layers.0.q_proj", "layers.1.q_proj"}),
        (["layers.1.k_proj"], {"layers.1.k_proj"}),
        (r"layers\.0\..*_proj", {"layers.0.q_proj", "layers.0.k_proj"}),
        ("all-linear", {"layers.0.q_proj", "layers.0.k_proj", "layers.1.q_proj", "layers.1.k_proj"}),
    ],
)
def test_target_modules_as_peft_users_know_them(targets, expected):
    model = qp.attach(Net(), qp.LoraConfig(r=2, target_modules=targets))
    assert set(qp.lora_layers(model)) == expected


def test_exclude_modules():
    model = qp.attach(
        Net(), qp.LoraConfig(r=2, target_modules=["q_proj"], exclude_modules=["layers.0.q_proj"])
    )
    assert set(qp.lora_layers(model)) == {"layers.1.q_proj"}


def test_unclaimed_target_names_class_and_backends():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"layers\.0\.norm.*LayerNorm.*installed backends: .*linear"):
        qp.attach(model, qp.LoraConfig(r=2, target_modules=["q_proj", "norm"]))
    assert not qp.lora_layers(model), "a failed attach must leave the model unchanged"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_match_lists_the_layer_names():
    with pytest.raises(ValueError, match=r"matched no layer.*'k_proj'"):
        qp.attach(Net(), qp.LoraConfig(r=2, target_modules=["query"]))


def test_same_adapter_twice_is_an_error():
    model = qp.attach(Net(), qp.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        qp.attach(model, qp.LoraConfig(r=2, target_modules=["q_proj"]))


def test_second_adapter_on_wrapped_layers_and_trainable_count():
    model = qp.attach(Net(), qp.LoraConfig(r=2, target_modules=["q_proj"]))
    qp.attach(model, qp.LoraConfig(r=4, target_modules=["q_proj", "k_proj"]), "b")
    layers = qp.lora_layers(model)
    assert set(layers["layers.0.q_proj"].adapters) == {"default", "b"}
    assert set(layers["layers.0.k_proj"].adapters) == {"b"}
    expected = 2 * (2 * 16 + 16 * 2) + 4 * (4 * 16 + 16 * 4)
    assert sum(p.numel() for p in qp.trainable_parameters(model)) == expected


def test_detect():
    assert qp.detect(nn.Linear(2, 2)) == "linear"
    assert qp.detect(nn.LayerNorm(2)) is None
    model = qp.attach(Net(), qp.LoraConfig(r=2, target_modules=["q_proj"]))
    assert qp.detect(model.layers[0].q_proj) == "linear"


def test_prepare_for_training_freezes_everything_else():
    model = qp.attach(Net(), qp.LoraConfig(r=2, target_modules=["q_proj"]))
    qp.prepare_for_training(model)
    trainable = {id(p) for p in qp.trainable_parameters(model)}
    assert model.training
    assert all(p.requires_grad == (id(p) in trainable) for p in model.parameters())
    with pytest.raises(ValueError, match="no adapters"):
        qp.prepare_for_training(Net())


def test_quantize_rejects_unknown_backend():
    with pytest.raises(KeyError, match="no backend named 'nope'"):
        qp.quantize(nn.Linear(4, 4), "nope")
