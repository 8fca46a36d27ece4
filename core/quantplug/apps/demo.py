"""``quantplug demo``: the whole life of an adapter on a tiny quantized LLaMA, on CPU.

Build (from a config, no download) -> quantize with a backend -> attach LoRA
-> train on a corpus shipped with quantplug -> merge both ways and measure
-> save in PEFT's format -> reload and check. With ``--qalora`` the
projections get a QALoRA adapter pooled over the backend's quantization
groups, and the zeros merge (codes kept, zero points moved) is measured
beside requantize and dense.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from importlib import resources
from pathlib import Path

import torch

import quantplug as qp

SEQ_LEN = 64
BATCH = 8
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def corpus_bytes() -> torch.Tensor:
    text = resources.files("quantplug").joinpath("data/corpus.txt").read_bytes()
    return torch.tensor(list(text), dtype=torch.long)


def tiny_llama(seed: int):
    """A 2-layer LLaMA over bytes (vocabulary 256), random weights, float32."""
    from quantplug.testing.models import tiny_llama as build

    return build(
        seed,
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
    )


def quantized_model(backend: str, variant: str | None, seed: int):
    return qp.quantize(tiny_llama(seed), backend, variant)


def batches(data: torch.Tensor, steps: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,), generator=generator)
        yield torch.stack([data[s : s + SEQ_LEN] for s in starts])


def sparkline(values: list[float], width: int = 60) -> str:
    bars = "▁▂▃▄▅▆▇█"
    if len(values) > width:
        step = len(values) / width
        values = [
            sum(values[int(i * step) : int((i + 1) * step)]) / max(1, int((i + 1) * step) - int(i * step))
            for i in range(width)
        ]
    low, high = min(values), max(values)
    span = high - low or 1.0
    return "".join(bars[min(len(bars) - 1, int((v - low) / span * (len(bars) - 1)))] for v in values)


def save_plot(losses: list[float], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot(losses, color="#3b6ea5", linewidth=1, alpha=0.5, label="loss per step")
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    ax.plot(smooth, color="#c0392b", linewidth=2, label=f"moving mean ({window})")
    ax.axhline(math.log(256), color="gray", linestyle=":", linewidth=1, label="uniform guess ln 256")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def qalora_variant(backend: str, asked: str | None, info) -> tuple[str | None, int | None, str | None]:
    """The variant a QALoRA demo runs: ``asked``, else the first declared one with input groups whose zero
    points take the zeros merge (else the first with groups). Returns (variant, group size, why not)."""
    import transformers  # noqa: F401  before any backend: INC 3.10's RTN refers to it only if imported first
    from torch import nn

    from quantplug._registry import hook

    pm = hook()
    candidates = [asked] if asked else list(info.variants or [None])
    grouped = None
    for variant in candidates:
        try:
            probe = qp.quantize(nn.Linear(128, 128), backend, variant)
        except (ValueError, NotImplementedError, RuntimeError):
            continue
        group = pm.quantplug_group_size(module=probe, backend=backend)
        if group is None:
            continue
        grouped = grouped or (variant, group)
        if "zeros" not in info.merge_modes:
            break
        try:
            offsets = torch.zeros(128, 128 // group)
            if pm.quantplug_fold_into_zeros(module=probe, offsets=offsets, backend=backend) is not None:
                return variant, group, None
        except (ValueError, NotImplementedError):
            continue
    if grouped is not None:
        return grouped[0], grouped[1], None
    where = f"variant {asked!r}" if asked else f"any of its variants ({', '.join(map(str, candidates))})"
    return (
        None,
        None,
        (
            f"backend {backend!r} reports no quantization groups along the input for {where} at hidden size 128 "
            "(quantplug_group_size): QALoRA pools over them. Try --backend hqq, gptq, awq, torchao or inc"
        ),
    )


def logits_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    rel = (other - reference).norm().item() / reference.norm().item()
    top1 = (other.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return {"relative_error": rel, "top1_agreement": top1}


def run_demo(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    status = qp.load_plugins().status(args.backend)
    if not status.ok:
        print(f"backend {args.backend!r} is {status.status}: {status.reason}\n  fix: {status.fix}")
        return 2
    qalora = getattr(args, "qalora", False)
    if qalora and args.dora:
        print("--qalora and --dora cannot be combined (as in PEFT); pick one")
        return 2
    group = None
    if qalora:
        variant, group, problem = qalora_variant(args.backend, args.variant, status.info)
        if problem:
            print(problem)
            return 2
    else:
        variant = args.variant or (status.info.variants[0] if status.info and status.info.variants else None)
    kind = f"QALoRA (groups of {group})" if qalora else ("DoRA" if args.dora else "LoRA")
    print(
        f"quantplug demo: tiny LLaMA (2 layers, hidden 128, byte vocabulary), backend {args.backend} ({variant}), "
        f"{kind}"
    )

    model = quantized_model(args.backend, variant, args.seed)
    # every quantized projection, plus the (unquantized) output head: the base is random, so the
    # adapters have to learn the byte statistics from scratch and the head is where that is cheapest
    if qalora:
        # QALoRA on the quantized projections; the plain head has no groups, so it gets a LoRA
        # adapter of its own ("head"), trained at the same time and left unmerged below
        qp.attach(
            model,
            qp.LoraConfig(
                r=args.rank, alpha=2.0 * args.rank, target_modules=list(PROJECTIONS), use_qalora=True
            ),
        )
        qp.attach(
            model, qp.LoraConfig(r=args.rank, alpha=2.0 * args.rank, target_modules=["lm_head"]), "head"
        )
    else:
        config = qp.LoraConfig(
            r=args.rank, alpha=2.0 * args.rank, target_modules=[*PROJECTIONS, "lm_head"], use_dora=args.dora
        )
        qp.attach(model, config)
    qp.prepare_for_training(model)
    params = qp.trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in params)
    layers = qp.lora_layers(model).values()
    kinds = {
        backend: sum(layer.backend == backend for layer in layers)
        for backend in {layer.backend for layer in layers}
    }
    print(
        f"  adapter layers: {', '.join(f'{n} {b}' for b, n in sorted(kinds.items()))}; "
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%)"
    )

    data = corpus_bytes()
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    losses: list[float] = []
    bar = tqdm(batches(data, args.steps, args.seed), total=args.steps, desc="training", unit="step")
    for tokens in bar:
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    loss_before, loss_after = losses[0], sum(tail) / len(tail)
    print(
        f"  loss {loss_before:.3f} (first step) -> {loss_after:.3f} (mean of the last {len(tail)})  {sparkline(losses)}"
    )
    plot = save_plot(losses, out / "loss.png", f"{kind} r={args.rank} on {args.backend} ({variant})")

    probe = next(batches(data, 1, args.seed + 1))
    with torch.no_grad():
        unmerged = model(input_ids=probe).logits
    merges = {}
    for mode in ("requantize", "zeros", "dense") if qalora else ("requantize", "dense"):
        if mode not in status.info.merge_modes:
            merges[mode] = {"skipped": status.info.limits.get(mode, "not supported")}
            continue
        try:
            report = qp.merge(model, mode=mode)
        except qp.MergeError as exc:  # a format of the backend without zero points (symmetric, say)
            merges[mode] = {"skipped": str(exc)}
            continue
        with torch.no_grad():
            merged = model(input_ids=probe).logits
        qp.unmerge(model)
        with torch.no_grad():
            restored = model(input_ids=probe).logits
        merges[mode] = {
            "mean_error": report.mean_error,
            "mean_adapter_error": report.mean_adapter_error,
            "worst_layer": report.worst.name,
            "worst_adapter_error": report.worst.adapter_error,
            **logits_agreement(unmerged, merged),
            "unmerge_exact": bool(torch.equal(restored, unmerged)),
        }

    adapter_dir = qp.save_adapter(model, out / "adapter")
    fresh = quantized_model(args.backend, variant, args.seed)
    qp.load_adapter(fresh, adapter_dir)
    if qalora:
        qp.load_adapter(fresh, qp.save_adapter(model, out / "adapter-head", adapter="head"), adapter="head")
    fresh.eval()
    with torch.no_grad():
        reloaded = fresh(input_ids=probe).logits
    # a fresh model's quantized kernels may run another path than the trained one (bitsandbytes
    # repacks for bf16 CPU inference on first eval use), so agreement, not bit equality
    reload = logits_agreement(unmerged, reloaded)
    reload_ok = reload["relative_error"] < 2e-2 and reload["top1_agreement"] > 0.98

    summary = {
        "backend": args.backend,
        "variant": variant,
        "steps": args.steps,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "adapter_kind": "qalora" if qalora else ("dora" if args.dora else "lora"),
        "qalora_group_size": group,
        "trainable_parameters": trainable,
        "merge": merges,
        "adapter": str(adapter_dir),
        "reload": reload,
        "reload_ok": reload_ok,
        "loss_plot": str(plot) if plot else None,
        "seconds": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0 if reload_ok else 1
    print("\n  merge         error vs W+ΔW   error / ‖ΔW‖   logits rel. err   top-1 agree   unmerge exact")
    for mode, row in merges.items():
        if "skipped" in row:
            print(f"  {mode:<12}  skipped: {row['skipped']}")
            continue
        print(
            f"  {mode:<12}  {row['mean_error']:>13.2e}   {row['mean_adapter_error']:>12.3f}   "
            f"{row['relative_error']:>15.2e}   {100 * row['top1_agreement']:>10.1f}%   {'yes' if row['unmerge_exact'] else 'NO'}"
        )
    print(f"\n  adapter saved (PEFT format): {adapter_dir}")
    print(
        f"  reloaded into a fresh quantized model: logits rel. err {reload['relative_error']:.1e}, "
        f"top-1 agree {100 * reload['top1_agreement']:.1f}% -> {'ok' if reload_ok else 'MISMATCH'}"
    )
    if plot:
        print(f"  loss curve: {plot}")
    print(f"  done in {summary['seconds']:.0f} s")
    return 0 if reload_ok and loss_after < loss_before else 1
