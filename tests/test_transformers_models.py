"""Models quantized by transformers itself (``quantization_config``), then adapted by quantplug.

A tiny LLaMA is saved with ``save_pretrained`` and reloaded on the CPU
(``device_map="cpu"``) with ``BitsAndBytesConfig``: NF4 with float32 and
with bfloat16 compute, and LLM.int8. On each: detection, one training step
(only the adapters move, the base bytes stay), both merge modes against the
unmerged model, exact unmerge, and a save/load round trip.

bitsandbytes traps this file steps around on purpose (see DESIGN.md):
- the first CPU inference forward of a ``Linear4bit`` repacks it in place, so
  base snapshots are taken after one forward;
- ``Linear4bit._save_to_state_dict`` undoes that repack in place (bitsandbytes
  0.50.2), which changes the next forward's output, so base bytes are read
  from the parameters and the quant state directly, never via ``state_dict()``;
- 8-bit moves ``SCB`` from ``weight`` to ``layer.state`` on the first forward:
  the snapshot reads it wherever it is.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import quantplug as qp
import torch
from torch import nn

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj"]
R = 4

KINDS = {
    # name: (BitsAndBytesConfig kwargs, model dtype, bitsandbytes class)
    "nf4-fp32": (
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        torch.float32,
        "Linear4bit",
    ),
    "nf4-bf16": (
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
        torch.bfloat16,
        "Linear4bit",
    ),
    "int8": (dict(load_in_8bit=True), torch.float32, "Linear8bitLt"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from quantplug.testing.models import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def load(checkpoint, kind: str, *, model_dtype=None, **overrides):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    kwargs, dtype, _ = KINDS[kind]
    quantization_config = BitsAndBytesConfig(**{**kwargs, **overrides})
    model = LlamaForCausalLM.from_pretrained(
        checkpoint,
        quantization_config=quantization_config,
        device_map="cpu",
        dtype=model_dtype or dtype,
    )
    return model.eval()


def attach_random(model, seed: int = 0):
    torch.manual_seed(seed)
    qp.attach(model, qp.LoraConfig(r=R, alpha=8, target_modules=TARGETS, init="random"))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def targeted(model) -> list[str]:
    return [
        p for p, _ in model.named_modules() if p.rsplit(".", 1)[-1] in TARGETS and not p.endswith(".base")
    ]


def base_bytes(model) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor the model holds, read without calling ``state_dict()`` (see module doc)."""
    found: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if any(part.startswith("lora_") for part in path.split(".")):
            continue  # an adapter's ParameterDict
        own = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for name, tensor in own:
            if not name.startswith("lora_") and not name.startswith("_"):
                found[f"{path}.{name}"] = tensor.detach().clone()
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:  # 4-bit
            found[f"{path}.weight.absmax"] = state.absmax.clone()
            found[f"{path}.weight.code"] = state.code.clone()
            if state.state2 is not None:
                found[f"{path}.weight.state2.absmax"] = state.state2.absmax.clone()
                found[f"{path}.weight.offset"] = state.offset.clone()
        if type(module).__name__ == "Linear8bitLt":  # SCB on weight before the first forward, on state after
            scb = getattr(weight, "SCB", None)
            if scb is None:
                scb = module.state.SCB
            found[f"{path}.SCB"] = scb.clone()
    return found


def assert_same_bytes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        other = after[key]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape and torch.equal(tensor, other), key


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_layers_are_detected_as_bnb(kind, checkpoint):
    model = load(checkpoint, kind)
    cls = KINDS[kind][2]
    projections = [m for p, m in model.named_modules() if p.endswith("_proj")]
    assert len(projections) == 14
    for module in projections:
        assert type(module).__name__ == cls and type(module).__module__.startswith("bitsandbytes")
        assert qp.detect(module) == "bnb"
        assert qp.detect(module, model) == "bnb"
    assert qp.detect(model.lm_head, model) != "bnb"  # transformers keeps the head dense
    assert qp.detect(model.model.embed_tokens, model) is None


@pytest.mark.parametrize("kind", KINDS)
def test_attach_wraps_the_quantized_layers(kind, checkpoint):
    model = load(checkpoint, kind)
    originals = {p: model.get_submodule(p) for p in targeted(model)}
    attach_random(model)
    layers = qp.lora_layers(model)
    assert sorted(layers) == sorted(originals)
    for path, layer in layers.items():
        assert layer.base is originals[path]
        assert layer.backend == "bnb" and qp.detect(layer) == "bnb"
    # the adapters live in the compute dtype
    compute = KINDS[kind][0].get("bnb_4bit_compute_dtype", torch.float32)
    assert {layer.lora_A["default"].dtype for layer in layers.values()} == {compute}


TRAIN_CASES = [(kind, evaluated_first) for kind in KINDS for evaluated_first in (False, True)]


@pytest.mark.parametrize(("kind", "evaluated_first"), TRAIN_CASES)
def test_training_step_changes_only_adapters(kind, evaluated_first, checkpoint, ids):
    """One SGD step moves every adapter tensor and no base byte.

    ``evaluated_first``: the model ran one inference forward before training
    (the usual "evaluate, then fine-tune" order), which repacks bitsandbytes
    4-bit layers on CPUs with AVX512-BF16 and moves 8-bit ``SCB``.
    """
    model = attach_random(load(checkpoint, kind))
    if evaluated_first:
        logits(model, ids)
    adapters_before = {id(p): p.detach().clone() for p in qp.trainable_parameters(model)}
    assert len(adapters_before) == 2 * len(targeted(model))

    # prepare_for_training may change a base's storage layout (bitsandbytes' CPU repack is undone
    # so its layers have a backward); from then on, training must not touch a base byte
    qp.prepare_for_training(model)
    before = base_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == set(adapters_before)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
        loss.backward()
    for param in trainable:
        assert param.grad is not None and param.grad.abs().sum() > 0, "an adapter got no gradient"
    optimizer.step()

    for param in qp.trainable_parameters(model):
        assert not torch.equal(param.detach(), adapters_before[id(param)]), "an adapter did not move"
    assert_same_bytes(before, base_bytes(model))


@pytest.mark.parametrize("mode", ["requantize", "dense"])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_then_unmerge(kind, mode, checkpoint, ids):
    """Merged logits are close to unmerged ones; unmerge puts the very same bases back.

    Tolerance, in units of the adapter's own effect on the logits
    (``effect = max |unmerged - adapters disabled|``):
    ``3 * report.worst.adapter_error + 0.05``. The first term is what the
    report says the merge lost of the adapter (error / ||dW||, which
    propagates through two layers); the 0.05 covers the quantized kernel's
    own compute (bf16 after bitsandbytes' CPU repack, int8 activations),
    which a dense merged layer does not share.
    """
    model = attach_random(load(checkpoint, kind))
    unmerged = logits(model, ids)
    with qp.disable_adapters(model):
        plain = logits(model, ids)
    effect = max_diff(unmerged, plain)
    assert effect > 0.05
    layers = qp.lora_layers(model)
    bases = {path: layer.base for path, layer in layers.items()}
    before = base_bytes(model)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a random adapter is large: no "lost most of the adapter" warning
        report = qp.merge(model, mode=mode)
    assert isinstance(report, qp.MergeReport)
    assert report.mode == mode and report.adapter == "default"
    assert sorted(entry.name for entry in report.layers) == sorted(layers)
    assert all(entry.backend == "bnb" and entry.delta_norm > 0 for entry in report.layers)
    assert not report.dropped
    worst = report.worst
    assert worst is not None and worst.adapter_error == max(e.adapter_error for e in report.layers)
    for path, layer in layers.items():
        assert layer.base is not bases[path]
        if mode == "dense":
            assert type(layer.base) is nn.Linear
            compute = KINDS[kind][0].get("bnb_4bit_compute_dtype", KINDS[kind][1])
            assert layer.base.weight.dtype == compute
        else:
            assert type(layer.base) is type(bases[path])
    if mode == "dense":  # lossless up to rounding to the compute dtype
        eps = torch.finfo(qp.lora_layers(model)[targeted(model)[0]].base.weight.dtype).eps
        assert all(entry.error <= eps for entry in report.layers), report.as_dict()
    else:  # rounding to the format: visible, but far below the adapter itself
        assert all(entry.error > 0 for entry in report.layers)
        assert worst.adapter_error < 0.5

    merged = logits(model, ids)
    tolerance = (3 * worst.adapter_error + 0.05) * effect
    assert max_diff(merged, unmerged) <= tolerance, (max_diff(merged, unmerged), tolerance, report.as_dict())
    assert max_diff(merged, unmerged) < max_diff(merged, plain), "the merge lost the adapter"

    qp.unmerge(model)
    for path, layer in qp.lora_layers(model).items():
        assert layer.base is bases[path] and not layer.merges
    assert_same_bytes(before, base_bytes(model))
    assert torch.equal(logits(model, ids), unmerged)


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_adapter_round_trip(kind, checkpoint, ids, tmp_path):
    model = attach_random(load(checkpoint, kind), seed=3)
    want = logits(model, ids)
    qp.save_adapter(model, tmp_path / "a")

    fresh = load(checkpoint, kind)
    qp.load_adapter(fresh, tmp_path / "a")
    assert sorted(qp.lora_layers(fresh)) == sorted(qp.lora_layers(model))
    assert torch.equal(logits(fresh, ids), want)


@pytest.mark.parametrize("unload", [False, True])
def test_dense_merge_when_compute_dtype_differs_from_model_dtype(unload, checkpoint, ids):
    """NF4 with bf16 compute in a float32 model: the merged model must still run, close to unmerged."""
    model = attach_random(load(checkpoint, "nf4-bf16", model_dtype=torch.float32))
    unmerged = logits(model, ids)
    with qp.disable_adapters(model):
        effect = max_diff(unmerged, logits(model, ids))
    report = qp.merge(model, mode="dense", unload=unload)
    merged = logits(model, ids)
    assert max_diff(merged, unmerged) <= (3 * report.worst.adapter_error + 0.05) * effect
