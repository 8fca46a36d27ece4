"""Adapters move between quantplug and Hugging Face PEFT in both directions, with the same outputs.

(a) attached and randomized here, saved with ``qp.save_adapter``, loaded by
    ``peft.PeftModel.from_pretrained``: LoRA, rsLoRA, DoRA (and a regex
    ``target_modules``);
(b) made by PEFT (``get_peft_model(init_lora_weights=False)``,
    ``save_pretrained``), loaded with ``qp.load_adapter``;
(c) a PEFT adapter made on the dense model, loaded onto the same model
    quantized to bitsandbytes NF4 with ``qp.quantize``, against PEFT's own
    bnb LoRA layer on an identical 4-bit model (PEFT dispatches those only
    when the model carries ``is_loaded_in_4bit``, set here by hand). PEFT's
    DoRA on a layer that bitsandbytes repacked for its CPU kernel
    dequantizes the repacked storage (DESIGN's trap) and is wrong, so that
    case is checked against a dense reference built from the dequantized
    weights instead.

The model is a tiny dense transformers LLaMA (hidden 64, 2 layers, vocab
128, GQA so ``v_proj`` is 64 -> 32), built from a config: no download.
"""

from __future__ import annotations

import copy

import pytest
import quantplug as qp
import torch
from quantplug.testing.models import tiny_llama

peft = pytest.importorskip("peft")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

TARGETS = ["q_proj", "v_proj"]
R = 4
ATOL = 1e-5  # fp32: the same math in another order


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def peft_lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


# -- (a) quantplug -> PEFT ---------------------------------------------------------


QP_VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "dora-rslora": {"use_dora": True, "use_rslora": True},
    "regex-targets": {"target_modules": r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"},
}


@pytest.mark.parametrize("variant", QP_VARIANTS)
def test_quantplug_adapter_loads_in_peft(variant, base_model, ids, tmp_path):
    kwargs = {"target_modules": TARGETS, **QP_VARIANTS[variant]}
    model = copy.deepcopy(base_model)
    torch.manual_seed(11)
    config = qp.LoraConfig(r=R, alpha=8, init="random", **kwargs)
    qp.attach(model, config)
    if config.use_dora:  # DoRA starts as LoRA (magnitude = row norms): move the magnitudes
        gen = torch.Generator().manual_seed(12)
        with torch.no_grad():
            for layer in qp.lora_layers(model).values():
                layer.lora_magnitude["default"].mul_(torch.rand(layer.out_features, generator=gen) + 0.5)
    ours = logits(model, ids)
    assert max_diff(ours, logits(base_model, ids)) > 100 * ATOL, "the adapter must change the output"
    qp.save_adapter(model, tmp_path / "a")

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "a").eval()
    layers = peft_lora_layers(peft_model)
    assert len(layers) == len(qp.lora_layers(model)) == 4
    for layer in layers.values():
        assert layer.scaling["default"] == pytest.approx(config.scale)
        assert bool(layer.use_dora["default"]) is config.use_dora
    theirs = logits(peft_model, ids)
    assert torch.allclose(theirs, ours, atol=ATOL, rtol=ATOL), max_diff(theirs, ours)


# -- (b) PEFT -> quantplug ---------------------------------------------------------


def make_peft_adapter(base_model, folder, *, use_dora=False, use_rslora=False, seed=21):
    """A non-zero PEFT adapter saved with ``save_pretrained``; returns PEFT's model (for its logits)."""
    torch.manual_seed(seed)
    peft_config = peft.LoraConfig(
        r=R,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights=False,
        use_dora=use_dora,
        use_rslora=use_rslora,
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base_model), peft_config).eval()
    if use_dora:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in peft_lora_layers(peft_model).values():
                mag = layer.lora_magnitude_vector["default"].weight
                mag.mul_(torch.rand(mag.shape, generator=gen) + 0.5)
    peft_model.save_pretrained(folder)
    return peft_model


PEFT_VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}


@pytest.mark.parametrize("variant", PEFT_VARIANTS)
def test_peft_adapter_loads_in_quantplug(variant, base_model, ids, tmp_path):
    kwargs = PEFT_VARIANTS[variant]
    peft_model = make_peft_adapter(base_model, tmp_path / "a", **kwargs)
    theirs = logits(peft_model, ids)
    assert max_diff(theirs, logits(base_model, ids)) > 100 * ATOL, "the adapter must change the output"

    model = copy.deepcopy(base_model)
    qp.load_adapter(model, tmp_path / "a")
    ours = logits(model, ids)
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=ATOL), max_diff(ours, theirs)
    # the tensors themselves, not just their effect
    peft_layers = {k.removeprefix("base_model.model."): v for k, v in peft_lora_layers(peft_model).items()}
    ours_layers = qp.lora_layers(model)
    assert ours_layers.keys() == peft_layers.keys()
    for path, layer in ours_layers.items():
        theirs_layer = peft_layers[path]
        assert torch.equal(layer.lora_A["default"], theirs_layer.lora_A["default"].weight)
        assert torch.equal(layer.lora_B["default"], theirs_layer.lora_B["default"].weight)
        assert layer.scaling["default"] == pytest.approx(theirs_layer.scaling["default"])
        if kwargs.get("use_dora"):
            assert torch.equal(
                layer.lora_magnitude["default"], theirs_layer.lora_magnitude_vector["default"].weight
            )


def test_roundtrip_peft_quantplug_peft(base_model, ids, tmp_path):
    """PEFT file -> quantplug -> save -> PEFT again: same tensors, same logits."""
    peft_model = make_peft_adapter(base_model, tmp_path / "p", use_dora=True)
    want = logits(peft_model, ids)
    model = copy.deepcopy(base_model)
    qp.load_adapter(model, tmp_path / "p")
    qp.save_adapter(model, tmp_path / "q")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "q").eval()
    assert torch.allclose(logits(again, ids), want, atol=ATOL, rtol=ATOL)


# -- (c) a PEFT adapter on a bitsandbytes NF4 model ---------------------------------


def quantized(base_model):
    return qp.quantize(copy.deepcopy(base_model), "bnb", "nf4")


def bnb_layers(model):
    return {p: m for p, m in model.named_modules() if qp.detect(m) == "bnb"}


def set_mode(model, mode: str):
    # "eval": bitsandbytes repacks each Linear4bit for its AVX512-BF16 CPU kernel on the first call
    # (where the CPU has it); "train" (no dropout in this model) keeps the layers as quantized
    model.train(mode == "train")
    return model


@pytest.fixture(scope="module")
def dense_peft_adapters(base_model, tmp_path_factory):
    folders = {}
    for name, kwargs in {"lora": {}, "dora": {"use_dora": True}}.items():
        folder = tmp_path_factory.mktemp(f"peft-{name}") / "a"
        make_peft_adapter(base_model, folder, seed=31, **kwargs)
        folders[name] = folder
    return folders


def test_quantize_is_deterministic(base_model):
    """Precondition of the comparisons below: two quantizations of one model are bit-identical."""
    a, b = bnb_layers(quantized(base_model)), bnb_layers(quantized(base_model))
    assert a.keys() == b.keys() and len(a) == 14
    for path in a:
        wa, wb = a[path].weight, b[path].weight
        assert torch.equal(wa.data, wb.data)
        assert torch.equal(wa.quant_state.absmax, wb.quant_state.absmax)


def peft_on_4bit(base_model, folder, mode):
    model = quantized(base_model)
    model.is_loaded_in_4bit = True  # what transformers sets; without it PEFT does not dispatch its bnb layers
    peft_model = peft.PeftModel.from_pretrained(model, folder)
    set_mode(peft_model, mode)
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    layers = peft_lora_layers(peft_model)
    assert len(layers) == 4 and all(isinstance(m, PeftLinear4bit) for m in layers.values())
    return peft_model


# DoRA in eval mode is test_peft_dora_on_repacked_bnb_4bit_matches_dense_reference: PEFT is wrong there
@pytest.mark.parametrize(("variant", "mode"), [("lora", "eval"), ("lora", "train"), ("dora", "train")])
def test_peft_adapter_on_bnb_4bit_matches_peft(variant, mode, base_model, dense_peft_adapters, ids):
    folder = dense_peft_adapters[variant]
    ours_model = set_mode(quantized(base_model), mode)
    qp.load_adapter(ours_model, folder)
    assert {qp.detect(layer) for layer in qp.lora_layers(ours_model).values()} == {"bnb"}
    ours = logits(ours_model, ids)
    theirs = logits(peft_on_4bit(base_model, folder, mode), ids)
    plain = logits(set_mode(quantized(base_model), mode), ids)
    assert max_diff(ours, plain) > 100 * ATOL, "the adapter must change the output"
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=ATOL), max_diff(ours, theirs)


def dense_from_dequantized(base_model):
    """The dense model with each NF4 layer's weight as bitsandbytes itself dequantizes it (before any repack)."""
    q = quantized(base_model)
    dense = copy.deepcopy(base_model)
    with torch.no_grad():
        for path, layer in bnb_layers(q).items():
            weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            dense.get_submodule(path).weight.copy_(weight.float())
    return dense


def test_peft_dora_on_repacked_bnb_4bit_matches_dense_reference(base_model, dense_peft_adapters, ids):
    """DoRA in eval mode, where bitsandbytes repacks the layers: checked against the dense twin.

    The tolerance is the quantized kernel's own deviation from its dequantized
    weight (bf16 compute after the CPU repack), measured without adapters.
    """
    folder = dense_peft_adapters["dora"]
    dense = dense_from_dequantized(base_model)
    floor = max_diff(logits(set_mode(quantized(base_model), "eval"), ids), logits(dense, ids))
    reference = logits(peft.PeftModel.from_pretrained(dense, folder).eval(), ids)

    ours_model = set_mode(quantized(base_model), "eval")
    qp.load_adapter(ours_model, folder)
    ours = logits(ours_model, ids)
    effect = max_diff(ours, logits(set_mode(quantized(base_model), "eval"), ids))
    tolerance = 3 * floor + 10 * ATOL
    assert effect > 10 * tolerance, "the adapter's effect must dwarf the tolerance"
    assert max_diff(ours, reference) <= tolerance, (max_diff(ours, reference), floor)
