"""transformers' Trainer and TRL's SFTTrainer train quantplug adapters with no extra argument, callback or wrapper.

A QLoRA script written for PEFT runs after swapping ``get_peft_model`` for
``qp.attach``: the trainers accept the quantized model, checkpoints hold the
adapter in PEFT's files (no base weights), resume restores adapter, optimizer
and step, ``save_model`` writes an adapter that PEFT and quantplug both load
with the trained model's outputs, and gradient checkpointing works.

Everything is tiny and on the CPU: a 2-block LLaMA saved with
``save_pretrained`` and reloaded with ``BitsAndBytesConfig`` (NF4, float32
compute), an hqq model from ``qp.quantize``, and a word-level tokenizer built
here (no download).
"""

from __future__ import annotations

import json
import logging

import pytest
import quantplug as qp
import torch
from quantplug import _lean

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song",
    "we read the book at night",
    "the sun rose over the hill",
    "a fish swam in the lake",
    "the child drew a red house",
    "they walked to the old mill",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from quantplug.testing import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(0).save_pretrained(folder)
    return folder


def load_nf4(folder):
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu", dtype=torch.float32
    )


def adapted_nf4(folder):
    model = load_nf4(folder)
    torch.manual_seed(0)  # the same initial adapter every time, so two runs can be compared
    qp.attach(model, qp.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="random"))
    qp.prepare_for_training(model)
    return model


def token_rows(n: int = 8, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 128, (length,), generator=generator)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def arguments(out, **overrides):
    settings = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {f"{path}.{n}": p.detach().clone() for path, layer in qp.lora_layers(model).items() for n, p in (
        ("A", layer.lora_A["default"]), ("B", layer.lora_B["default"]))}  # fmt: skip


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The second forward's logits: bitsandbytes repacks a 4-bit layer on its first CPU forward and computes in
    bf16 after that (DESIGN.md, traps), so models compared must all be past it."""
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
        return model(input_ids=ids).logits.float()


def test_trainer_trains_a_bnb_model_loaded_by_transformers(checkpoint, tmp_path):
    model = adapted_nf4(checkpoint)
    assert model.is_quantized  # transformers' own marker: this is the model Trainer used to refuse
    before = adapter_weights(model)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path), train_dataset=token_rows())
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    after = adapter_weights(model)
    assert all(not torch.equal(before[k], after[k]) for k in before), "every adapter tensor trains"
    assert frozen == {name for name, p in model.named_parameters() if not p.requires_grad}
    saved = sorted(p.name for p in (tmp_path / "checkpoint-2").iterdir())
    assert "adapter_config.json" in saved and "adapter_model.safetensors" in saved
    assert not any(name in saved for name in ("model.safetensors", "pytorch_model.bin")), saved
    assert {"optimizer.pt", "trainer_state.json"} <= set(saved)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    assert len(stored) == 2 * 2 * len(TARGETS)  # A and B, two blocks, every projection: the adapter alone
    assert all(key.startswith("base_model.model.model.layers.") for key in stored)


def test_attach_on_a_transformers_model_freezes_what_the_checkpoint_would_not_hold(checkpoint):
    model = load_nf4(checkpoint)
    qp.attach(model, qp.LoraConfig(r=4, target_modules=["q_proj"]))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in qp.trainable_parameters(model)}
    assert type(model).__name__ == "LlamaForCausalLM" and model._hf_peft_config_loaded
    qp.unload(model)
    assert type(model) is transformers.LlamaForCausalLM and not getattr(
        model, "_hf_peft_config_loaded", False
    )


def test_resume_restores_adapter_optimizer_and_step(checkpoint, tmp_path, caplog):
    full = adapted_nf4(checkpoint)
    transformers.Trainer(model=full, args=arguments(tmp_path / "full"), train_dataset=token_rows()).train()

    interrupted = adapted_nf4(checkpoint)
    transformers.Trainer(
        model=interrupted, args=arguments(tmp_path / "part", max_steps=2), train_dataset=token_rows()
    ).train()
    resumed = adapted_nf4(checkpoint)  # fresh adapter weights: only the checkpoint can bring them back
    trainer = transformers.Trainer(
        model=resumed, args=arguments(tmp_path / "part"), train_dataset=token_rows()
    )
    with caplog.at_level(logging.WARNING, logger="transformers"):
        result = trainer.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    assert result.global_step == 4 and trainer.state.global_step == 4
    assert not [r for r in caplog.records if "keys" in r.getMessage()], "no missing/unexpected-keys warning"
    want, got = adapter_weights(full), adapter_weights(resumed)
    for key in want:  # equal only if adapter, optimizer moments and data order all resumed
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_resume_refuses_a_checkpoint_of_another_model(checkpoint, tmp_path):
    model = adapted_nf4(checkpoint)
    transformers.Trainer(
        model=model, args=arguments(tmp_path / "a", max_steps=2), train_dataset=token_rows()
    ).train()
    other = load_nf4(checkpoint)
    qp.attach(other, qp.LoraConfig(r=8, target_modules=TARGETS))  # another rank: shapes differ
    trainer = transformers.Trainer(model=other, args=arguments(tmp_path / "b"), train_dataset=token_rows())
    before = adapter_weights(other)
    with pytest.raises(RuntimeError, match="size mismatch"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    after = adapter_weights(other)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_partly_mismatched_adapter_checkpoint_changes_nothing(checkpoint, tmp_path):
    from safetensors.torch import load_file

    model = adapted_nf4(checkpoint)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors = {key: value + 1 for key, value in tensors.items()}  # all would change the model...
    last = sorted(tensors)[-1]
    tensors[last] = tensors[last][:, :-1]  # ...but one does not fit
    before = adapter_weights(model)
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(tensors, strict=False)
    after = adapter_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    del tensors[last]
    with pytest.raises(ValueError, match="floating point"):
        model.load_state_dict({**tensors, last: torch.zeros(4, 4, dtype=torch.int32)}, strict=False)


def test_save_model_reloads_in_peft_and_quantplug_with_the_trained_outputs(checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted_nf4(checkpoint)
    trainer = transformers.Trainer(
        model=model, args=arguments(tmp_path / "run", learning_rate=3e-2), train_dataset=token_rows()
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    want = logits(model, ids)
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4

    through_peft = logits(peft.PeftModel.from_pretrained(load_nf4(checkpoint), str(tmp_path / "final")), ids)
    through_quantplug = logits(qp.load_adapter(load_nf4(checkpoint), tmp_path / "final"), ids)
    torch.testing.assert_close(through_peft, through_quantplug, rtol=1e-4, atol=1e-4)
    # bitsandbytes keeps a trained CPU layer in another packed layout than a freshly loaded one (DESIGN.md,
    # traps), so the bases themselves differ a little: the reloads may differ from the trained model by that
    # much, and the adapter's own effect is checked to be far larger
    with qp.disable_adapters(model):
        trained_base = logits(model, ids)
    base_gap = (trained_base - logits(load_nf4(checkpoint), ids)).abs().max().item()
    assert (want - trained_base).abs().max().item() > 20 * (base_gap + 1e-4)
    torch.testing.assert_close(through_quantplug, want, rtol=0, atol=base_gap + 1e-4)


def test_model_save_pretrained_writes_the_adapter_as_peft_lays_it_out(checkpoint, tmp_path):
    model = load_nf4(checkpoint)
    qp.attach(model, qp.LoraConfig(r=4, target_modules=["q_proj"], init="random"))
    qp.attach(model, qp.LoraConfig(r=2, target_modules=["v_proj"], init="random"), adapter="second")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "second",
    ]  # fmt: skip
    assert (tmp_path / "second" / "adapter_config.json").is_file()
    reloaded = qp.load_adapter(load_nf4(checkpoint), tmp_path / "second", adapter="second")
    layer = qp.lora_layers(reloaded)["model.layers.0.self_attn.v_proj"]
    torch.testing.assert_close(
        layer.lora_B["second"], qp.lora_layers(model)["model.layers.0.self_attn.v_proj"].lora_B["second"]
    )
    assert model.active_adapters() == ["default", "second"]
    assert set(model.peft_config) == {"default", "second"}


def test_trainer_with_gradient_checkpointing_on_an_hqq_model_from_quantize(tmp_path, monkeypatch):
    pytest.importorskip("hqq")
    from quantplug.testing import tiny_llama

    model = qp.quantize(tiny_llama(0), "hqq", "4bit-g64")
    qp.attach(model, qp.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="random"))
    qp.prepare_for_training(model)
    before = adapter_weights(model)
    args = arguments(tmp_path, gradient_checkpointing=True, save_strategy="no", max_steps=3)
    backwards = []
    grads = _lean._grads
    monkeypatch.setattr(_lean, "_grads", lambda *a: backwards.append(1) or grads(*a))
    result = transformers.Trainer(model=model, args=args, train_dataset=token_rows()).train()
    assert result.global_step == 3 and model.model.is_gradient_checkpointing
    # every adapter layer trained through the lean node: one backward per layer and step
    assert len(backwards) == 3 * len(qp.lora_layers(model))
    after = adapter_weights(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_trainer_takes_the_compiled_model_from_prepare_for_training(tmp_path):
    """The fast path for Trainer users: ``prepare_for_training(compile=True)`` compiles the model with
    gradient checkpointing; Trainer trains it with no graph break and checkpoints the adapter alone.
    (Trainer's own ``torch_compile=True`` re-registers the input-gradient hook and breaks the graph.)"""
    pytest.importorskip("hqq")
    from quantplug.testing import tiny_llama
    from torch._dynamo.utils import counters

    model = qp.quantize(tiny_llama(0), "hqq", "4bit-g64")
    model.config.use_cache = False
    qp.attach(model, qp.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="random"))
    before = adapter_weights(model)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = qp.prepare_for_training(model, gradient_checkpointing=True, compile=True)
        args = arguments(
            tmp_path, max_steps=3, save_steps=3, gradient_checkpointing=False, remove_unused_columns=False
        )
        result = transformers.Trainer(model=compiled, args=args, train_dataset=token_rows()).train()
        breaks = dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()  # no compiled graphs left for later tests
    assert result.global_step == 3 and model.is_gradient_checkpointing
    assert not breaks, breaks
    after = adapter_weights(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    files = {p.name for p in (tmp_path / "checkpoint-3").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def test_sft_trainer_trains_on_a_text_dataset(checkpoint, tmp_path, caplog):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = adapted_nf4(checkpoint)
    before = adapter_weights(model)
    config = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
        max_length=16, report_to=[], use_cpu=True, save_strategy="steps", save_steps=3, logging_steps=1,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        trainer = trl.SFTTrainer(
            model=model,
            args=config,
            train_dataset=datasets.Dataset.from_dict({"text": SENTENCES}),
            processing_class=word_tokenizer(),
        )
        result = trainer.train()
    assert result.global_step == 3
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = adapter_weights(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "checkpoint-3" / "model.safetensors").exists()
