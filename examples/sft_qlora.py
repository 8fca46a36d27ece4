"""QLoRA with TRL's SFTTrainer on any quantplug backend, then merge and save.

The same script PEFT users write, with ``get_peft_model`` swapped for
``qp.attach``: load (or build) a model, quantize it, attach LoRA, train with
``SFTTrainer``, save the adapter in PEFT's files, merge it back into the
quantized weights (and report what the merge kept), and save a dense merged
model that any serving engine loads.

    python examples/sft_qlora.py                                  # a tiny LLaMA, bnb (or the first backend ok here)
    python examples/sft_qlora.py --model path/to/llama --backend hqq --dataset my.txt --max-steps 200
    python examples/sft_qlora.py --model path/to/llama --load-in-4bit   # transformers' BitsAndBytesConfig

Without ``--model`` it builds a tiny LLaMA and a byte-level tokenizer trained
on the text (no download), which is what CI runs.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import quantplug as qp
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer


def default_backend() -> str:
    """bitsandbytes (QLoRA's own) when it works here, else the first quantization backend that does."""
    names = [
        row.name for row in qp.backends() if row.ok and row.name != "linear"
    ]  # "linear": dense, built in
    if not names:
        raise SystemExit("no quantization backend is ok here: run `quantplug doctor` for the install lines")
    return "bnb" if "bnb" in names else names[0]


def byte_tokenizer(lines: list[str]) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained on ``lines`` (for the tiny model; real models bring their own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def load(args: argparse.Namespace, lines: list[str]):
    if args.model is None:
        from quantplug.testing import tiny_llama

        tokenizer = byte_tokenizer(lines)
        model = tiny_llama(args.seed, vocab_size=len(tokenizer), max_position_embeddings=args.max_length)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if args.load_in_4bit:  # transformers quantizes while loading; quantplug detects its layers
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
            return AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config), tokenizer
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    return qp.quantize(model, args.backend, args.variant), tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a transformers checkpoint folder (default: a tiny LLaMA built here)")
    parser.add_argument(
        "--backend", help="quantplug backend to quantize with (default: bnb if ok here, else the first ok)"
    )
    parser.add_argument("--variant", help="the backend's format (default: its first; see quantplug doctor)")
    parser.add_argument(
        "--load-in-4bit", action="store_true", help="load with transformers' BitsAndBytesConfig"
    )
    parser.add_argument("--dataset", help="a text file, one example per line (default: quantplug's corpus)")
    parser.add_argument("--out", default="sft-qlora-out", help="output folder (default: sft-qlora-out)")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.backend = args.backend or ("bnb" if args.load_in_4bit else default_backend())

    text = (
        Path(args.dataset).read_text()
        if args.dataset
        else resources.files("quantplug").joinpath("data/corpus.txt").read_text()
    )
    lines = [line for line in text.splitlines() if line.strip()]
    model, tokenizer = load(args, lines)
    print(
        f"backend {args.backend}: {sum(qp.detect(m) not in (None, 'linear') for m in model.modules())} quantized layers"
    )

    # the one line that differs from a PEFT script: qp.attach instead of get_peft_model
    qp.attach(model, qp.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    out = Path(args.out)
    config = SFTConfig(
        output_dir=str(out / "checkpoints"), max_steps=args.max_steps, per_device_train_batch_size=8,
        learning_rate=5e-3 if args.model is None else 2e-4, max_length=args.max_length, logging_steps=max(1, min(10, args.max_steps // 4)),
        save_steps=max(args.max_steps // 2, 1), report_to=[], seed=args.seed,
        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict({"text": lines}), processing_class=tokenizer
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {trainer.state.global_step} steps")
    trainer.save_model(str(out / "adapter"))  # adapter_config.json + adapter_model.safetensors, PEFT's files
    print(f"adapter (PEFT format): {out / 'adapter'}")

    report = qp.merge(model, mode="requantize")  # back into the backend's own format
    print(report)
    qp.unmerge(model)  # the original quantized storage, bit for bit
    qp.merge(model, mode="dense", unload=True)  # lossless: a plain transformers model
    model.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    print(f"merged dense model: {out / 'merged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
