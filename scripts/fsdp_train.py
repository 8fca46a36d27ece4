"""QLoRA training of a LLaMA-shaped model on N GPUs with FSDP2 (NCCL): tokens/s and peak memory per GPU.

Run it once per GPU count, with the same arguments, and compare::

    torchrun --nproc-per-node 1 scripts/fsdp_train.py --size 1b --out fsdp-out
    torchrun --nproc-per-node 2 scripts/fsdp_train.py --size 1b --out fsdp-out

The model is built from a config (random weights, no download) directly on
each GPU, quantized there with ``--backend`` (default bnb nf4), given LoRA
adapters on every linear, sharded with ``quantplug.distributed.shard`` and
trained with AdamW. The global batch is fixed: each of the N ranks takes
1/N of it, so every run trains the same steps on the same tokens, and the
adapters it saves can be compared across GPU counts (``--reference``).
With one GPU the model is trained unsharded (the baseline users have);
``--fsdp-on-one`` shards it over the single rank instead.

Rank 0 prints one JSON summary and writes it to ``<out>/summary-<N>gpu.json``:
tokens/s over the timed steps, step time, per-GPU peak memory (allocated and
reserved, during training and during setup), the losses, and with
``--reference`` the largest difference from another run's adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

SIZES = {
    # hidden, intermediate, layers, heads, kv heads
    "tiny": (256, 688, 4, 8, 4),  # a smoke run: seconds
    "1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B's shape
    "7b": (4096, 11008, 32, 32, 32),  # Llama-2-7B's shape
    "8b": (4096, 14336, 32, 32, 8),  # Llama-3-8B's shape
}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--backend", default="bnb")
    parser.add_argument("--variant", default="nf4")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per step over all GPUs")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of the model and the adapters")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--no-reshard-after-forward", action="store_true", help="keep blocks gathered until backward"
    )
    parser.add_argument("--fsdp-on-one", action="store_true", help="shard even with one GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fsdp-out")
    parser.add_argument(
        "--reference", default=None, help="an adapter folder from another run to compare with"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="gloo on CPU processes: checks the script, times nothing useful"
    )
    return parser.parse_args()


def build(args, device: torch.device, dtype: torch.dtype):
    import quantplug as qp
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SIZES[args.size]
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(args.seed)  # the same weights on every rank and in every run
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the compute dtype on the GPU: no fp32 copy of a 7B model
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    qp.quantize(model, args.backend, args.variant)
    torch.manual_seed(args.seed + 1)
    qp.attach(model, qp.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    qp.prepare_for_training(model, gradient_checkpointing=args.gradient_checkpointing)
    return model


def batches(args, steps: int):
    generator = torch.Generator().manual_seed(args.seed + 2)
    for _ in range(steps):
        yield torch.randint(0, args.vocab, (args.global_batch, args.seq), generator=generator)


def memory(device: torch.device) -> dict:
    gib = 2**30
    if device.type == "cpu":
        import resource

        return {"max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    return {
        "allocated_gib": round(torch.cuda.max_memory_allocated(device) / gib, 3),
        "reserved_gib": round(torch.cuda.max_memory_reserved(device) / gib, 3),
    }


def main() -> int:
    args = parse()
    import quantplug as qp

    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if args.cpu:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    reset = torch.cuda.reset_peak_memory_stats if device.type == "cuda" else (lambda device: None)
    dtype = getattr(torch, args.dtype)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {world} GPUs")

    reset(device)
    started = time.perf_counter()
    model = build(args, device, dtype)
    sharded = world > 1 or args.fsdp_on_one
    if sharded:
        qp.distributed.shard(model, reshard_after_forward=not args.no_reshard_after_forward)
    setup_s = time.perf_counter() - started
    setup_memory = memory(device)
    params = qp.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    reset(device)
    losses, timed = [], 0.0
    for step, batch in enumerate(batches(args, args.warmup + args.steps)):
        rows = batch.chunk(world)[rank].to(device)
        sync(device)
        tic = time.perf_counter()
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        dist.all_reduce(loss)
        sync(device)
        if step >= args.warmup:
            timed += time.perf_counter() - tic
        losses.append(loss.item() / world)
    train_memory = memory(device)

    out = Path(args.out)
    adapter = qp.save_adapter(model, out / f"adapter-{world}gpu")  # every rank gathers, rank 0 writes
    per_gpu = [None] * world
    dist.all_gather_object(per_gpu, {"rank": rank, "train": train_memory, "setup": setup_memory})
    if rank == 0:
        tokens = args.steps * args.global_batch * args.seq
        summary = {
            "gpus": world,
            "sharded": sharded,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "size": args.size,
            "backend": args.backend,
            "variant": args.variant,
            "lora_rank": args.rank,
            "global_batch": args.global_batch,
            "seq": args.seq,
            "gradient_checkpointing": args.gradient_checkpointing,
            "trainable_params": sum(p.numel() for p in params),
            "tokens_per_s": round(tokens / timed, 1),
            "step_s": round(timed / args.steps, 4),
            "setup_s": round(setup_s, 1),
            "peak_memory_per_gpu": per_gpu,
            "losses": [round(x, 5) for x in losses],
            "adapter": str(adapter),
            "versions": {"torch": torch.__version__, "quantplug": qp.__version__},
        }
        if args.reference:
            from safetensors.torch import load_file

            mine = load_file(str(adapter / "adapter_model.safetensors"))
            theirs = load_file(str(Path(args.reference) / "adapter_model.safetensors"))
            summary["reference"] = {
                "path": args.reference,
                "same_keys": mine.keys() == theirs.keys(),
                "max_abs_diff": max((mine[k].float() - theirs[k].float()).abs().max().item() for k in mine)
                if mine.keys() == theirs.keys()
                else None,
            }
        out.mkdir(parents=True, exist_ok=True)
        (out / f"summary-{world}gpu.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
