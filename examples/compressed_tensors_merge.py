"""LoRA on a compressed-tensors checkpoint, merged back into a compressed-tensors checkpoint.

compressed-tensors is the format llm-compressor writes and vLLM serves (int4
"pack-quantized" W4A16, int8 W8A16, FP8, ...). This script loads such a
checkpoint with transformers, attaches LoRA to every quantized linear, trains
a few steps, merges the adapter back into the quantized weights with each
layer's own scheme (group size, symmetry, FP8 scales), saves a
compressed-tensors checkpoint and reloads it to check that it gives the merged
model's outputs.

    python examples/compressed_tensors_merge.py --checkpoint path/to/w4a16-model --out merged-model --text my.txt
    python examples/compressed_tensors_merge.py --out /tmp/ct-demo      # builds a tiny checkpoint first, no download

Needs ``pip install quantplug quantplug-compressed-tensors``. Without
``--checkpoint`` it builds a tiny LLaMA, quantizes it with compressed-tensors
(``--variant``, default int4 groups of 32) and saves it the way llm-compressor
does; without a tokenizer (the tiny model) it trains on random token ids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import quantplug as qp
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

BACKEND = "compressed_tensors"


def save_compressed(model: torch.nn.Module, path: Path) -> None:
    """compressed-tensors' own save: rebuild the config from the layers' schemes, compress every layer
    not compressed yet, save, and write the quantization config into config.json."""
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model, skip_compressed=True)
    model.save_pretrained(path)
    compressor.update_config(path)


def tiny_checkpoint(path: Path, variant: str | None) -> Path:
    """A tiny LLaMA quantized by compressed-tensors (through the plugin, no calibration data), saved."""
    from quantplug.testing import tiny_llama

    save_compressed(qp.quantize(tiny_llama(0), BACKEND, variant), path)
    return path


def load(path: Path) -> torch.nn.Module:
    try:
        return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype="auto").eval()
    except RuntimeError as exc:
        if "mismatch" in str(exc):
            raise SystemExit(
                f"{exc}\n\ntransformers cannot load asymmetric pack-quantized checkpoints with "
                "compressed-tensors 0.18-0.20 (zero points keep their unpacked shape on the meta device); "
                "see docs/backends.md#compressed_tensors"
            ) from exc
        raise


def batches(path: Path, text: Path | None, vocab: int, length: int, count: int) -> list[torch.Tensor]:
    """``count`` batches of 4 x ``length`` token ids: from ``text`` with the checkpoint's tokenizer,
    else random ids (the tiny model has no tokenizer)."""
    generator = torch.Generator().manual_seed(0)
    if text is not None:
        ids = AutoTokenizer.from_pretrained(path)(text.read_text(), return_tensors="pt").input_ids[0]
        rows = ids[: ids.numel() // length * length].reshape(-1, length)
        if len(rows) < 4:
            raise SystemExit(
                f"{text} is too short: it gives {len(rows)} rows of {length} tokens, 4 are needed"
            )
        return [rows[torch.randint(0, len(rows), (4,), generator=generator)] for _ in range(count)]
    return [torch.randint(0, vocab, (4, length), generator=generator) for _ in range(count)]


def quantized_targets(model: torch.nn.Module) -> list[str]:
    """The names (last part) of the linears compressed-tensors quantized: what LoRA targets."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if qp.detect(m) == BACKEND})


def agreement(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    error = ((got.float() - want.float()).norm() / want.float().norm()).item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    return error, top1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, help="a compressed-tensors checkpoint (default: build a tiny one)"
    )
    parser.add_argument(
        "--variant", help="tiny checkpoint's scheme, one of the backend's variants (default: int4-g32)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged checkpoint")
    parser.add_argument("--text", type=Path, help="training text (needs the checkpoint's tokenizer)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--length", type=int, default=64, help="tokens per training row")
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint or tiny_checkpoint(args.out / "base", args.variant)
    model = load(checkpoint)
    targets = quantized_targets(model)
    if not targets:
        raise SystemExit(f"{checkpoint} has no compressed-tensors layer (see `quantplug doctor`)")
    data = batches(checkpoint, args.text, model.config.vocab_size, args.length, args.steps + 1)
    held_out = data.pop()

    qp.attach(model, qp.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=targets))
    qp.prepare_for_training(model)
    optimizer = torch.optim.AdamW(qp.trainable_parameters(model), lr=args.lr)
    model.train()
    for step, ids in enumerate(data):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, len(data) - 1):
            print(f"step {step + 1}/{len(data)}: loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=held_out).logits

    report = qp.merge(model, mode="requantize", unload=True)
    errors = [entry.error for entry in report.layers]
    kept = [entry.adapter_error for entry in report.layers]
    print(
        f"merged adapter 'default' into {len(errors)} {BACKEND} layers ({', '.join(targets)}): "
        f"error vs W+ΔW {sum(errors) / len(errors):.2e} (worst {max(errors):.2e}), "
        f"error / ‖ΔW‖ {sum(kept) / len(kept):.3f} (worst {report.worst.name}: {report.worst.adapter_error:.3f})"
    )
    with torch.no_grad():
        merged = model(input_ids=held_out).logits
    save_compressed(model, args.out / "merged")
    if args.text is not None:
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(args.out / "merged")

    reloaded = load(args.out / "merged")
    with torch.no_grad():
        got = reloaded(input_ids=held_out).logits
    same, _ = agreement(got, merged)
    moved, top1 = agreement(got, unmerged)
    print(
        f"saved {args.out / 'merged'} (compressed-tensors); reloaded: logits vs the merged model {same:.1e}"
    )
    print(f"reloaded vs the unmerged adapter model: logits rel. err {moved:.2e}, top-1 agree {top1:.1%}")
    return 0 if same <= max(errors) else 1


if __name__ == "__main__":
    raise SystemExit(main())
