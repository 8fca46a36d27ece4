"""Where a QLoRA training step's time goes: quantplug and PEFT on the bench's 1.1B LLaMA, under torch.profiler.

    python scripts/profile_training.py OUT.txt [--backend bnb] [--steps 2] [--batch 4] [--seq 1024]

The same models as ``quantplug bench --model`` builds for its training rows
(every linear quantized, r=16 on all of them, gradient checkpointing, AdamW).
After three warm-up steps, ``--steps`` steps of each library run under the
profiler. For each: wall time per step, GPU kernel time per step (their
difference is time the GPU waited for the host), kernel time by kind, and the
25 costliest kernels. Needs a CUDA device; writes text, no timing claims
(those are the bench's).
"""

import argparse
import collections
import sys
import time

import torch

KINDS = (  # (kind, substrings of kernel names), first match wins
    ("matmul (cuBLAS/cutlass)", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("dequantize", ("dequant", "kdequantize", "quantize")),
    ("triton", ("triton",)),
    ("loss / softmax", ("softmax", "cross_entropy", "nll_loss", "log_softmax")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "copy", "fill")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def profile(run, steps: int, out) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for i in range(3):
        run.step(run.batches[i % len(run.batches)])
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for i in range(steps):
            run.step(run.batches[i % len(run.batches)])
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    for e in kernels:  # microseconds (``device_time``; ``cuda_time`` in older torch)
        e.us = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
    busy = sum(e.us for e in kernels) / 1e6 / steps
    if not kernels:
        out.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30) + "\n")
        return
    by_kind = collections.Counter()
    by_name = collections.Counter()
    count = collections.Counter()
    for e in kernels:
        by_kind[kind_of(e.name)] += e.us / 1e3 / steps
        by_name[e.name] += e.us / 1e3 / steps
        count[e.name] += 1
    out.write(f"wall {wall * 1e3:.1f} ms/step, GPU kernels {busy * 1e3:.1f} ms/step "
              f"({100 * busy / wall:.0f}% busy), {len(kernels) // steps} kernels/step\n")  # fmt: skip
    out.write("by kind (ms/step):\n")
    for kind, ms in by_kind.most_common():
        out.write(f"  {kind:26s} {ms:8.2f}  {100 * ms / (busy * 1e3):5.1f}%\n")
    out.write("costliest kernels (ms/step, calls/step):\n")
    for name, ms in by_name.most_common(25):
        out.write(f"  {ms:8.2f} {count[name] // steps:5d}  {name[:150]}\n")
    out.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--backend", default="bnb")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    import quantplug as qp
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from quantplug.apps.bench.backends import peft_markers, variant_of
    from quantplug.apps.bench.model import LINEARS, TINYLLAMA, _llama
    from quantplug.apps.bench.training import _Run

    status = {row.name: row for row in qp.backends()}[args.backend]
    variant, dtype = variant_of(status), torch.bfloat16
    batches = [
        torch.randint(0, TINYLLAMA["vocab_size"], (args.batch, args.seq), device="cuda") for _ in range(2)
    ]
    with open(args.out, "a") as out:
        out.write(f"== {args.backend} ({variant}), batch {args.batch}x{args.seq}, r=16, checkpointing\n")
        ours = _llama(args.backend, variant, "cuda", dtype, TINYLLAMA)
        qp.attach(ours, qp.LoraConfig(r=16, alpha=32, target_modules=LINEARS, init="random"))
        qp.prepare_for_training(ours, gradient_checkpointing=True)
        out.write("-- quantplug\n")
        profile(_Run(ours, qp.trainable_parameters(ours), "cuda", batches), args.steps, out)
        del ours
        torch.cuda.empty_cache()
        theirs = _llama(args.backend, variant, "cuda", dtype, TINYLLAMA)
        peft_markers(theirs, theirs)
        theirs = get_peft_model(
            theirs, PeftConfig(r=16, lora_alpha=32, target_modules=LINEARS, init_lora_weights=False)
        )
        theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        theirs.enable_input_require_grads()
        out.write("-- peft\n")
        profile(
            _Run(theirs, [p for p in theirs.parameters() if p.requires_grad], "cuda", batches),
            args.steps,
            out,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
