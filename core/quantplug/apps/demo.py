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
import sys
import time
from importlib import resources
from pathlib import Path

import torch
from torch import nn

import quantplug as qp
from quantplug.apps.backends import relative
from quantplug.apps.quiet import captured

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


class _One(nn.Module):
    """A one-layer model to attach an adapter to."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj


def qalora_variant(backend: str, asked: str | None, info) -> tuple[str | None, int | None, str | None]:
    """The variant a QALoRA demo runs: ``asked``, else the first declared one with input groups whose zero
    points take the zeros merge (else the first with groups). Returns (variant, group size, why not).

    Each candidate is tried on one 128x128 layer as a user would: quantize, attach a QALoRA adapter
    (which fails without groups along the input), merge it into the zero points."""
    candidates = [asked] if asked else list(info.variants or [None])
    grouped = None
    for variant in candidates:
        try:
            probe = _One(qp.quantize(nn.Linear(128, 128), backend, variant))
            qp.attach(probe, qp.LoraConfig(r=4, target_modules=["proj"], use_qalora=True))
        except (ValueError, NotImplementedError, RuntimeError, qp.PluginError):
            continue
        group = qp.lora_layers(probe)["proj"].qalora_group_size["default"]
        grouped = grouped or (variant, group)
        if "zeros" not in info.merge_modes:
            break
        try:
            qp.merge(probe, mode="zeros", progress=False)
        except (qp.MergeError, ValueError, NotImplementedError):
            continue
        return variant, group, None
    if grouped is not None:
        return grouped[0], grouped[1], None
    where = f"variant {asked!r}" if asked else f"any of its variants ({', '.join(map(str, candidates))})"
    grouped_backends = [
        row.name for row in qp.backends() if row.ok and row.info and "zeros" in row.info.merge_modes
    ]
    return (
        None,
        None,
        (
            f"backend {backend!r} reports no quantization groups along the input for {where} at hidden size 128 "
            f"(quantplug_group_size): QALoRA pools over them. Backends here with groups and zero points: "
            f"{', '.join(grouped_backends) or 'none'}"
        ),
    )


def logical_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` as if unquantized: each adapted layer's base counts ``out * in`` plus its bias,
    whatever its packed storage, so one adapter gives one share on every backend. A bias counts where it is
    not all zeros: some libraries add a zero bias buffer to layers built without one (neural-compressor
    3.10's RTN does)."""
    layers = qp.lora_layers(model).values()
    stored = {id(p) for layer in layers for p in layer.base.parameters()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in stored)
    bases = 0
    for layer in layers:
        bias = layer.bias
        has_bias = bias is not None and bool(torch.count_nonzero(bias.detach()))
        bases += layer.in_features * layer.out_features + (layer.out_features if has_bias else 0)
    return other + bases


def logits_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    rel = (other - reference).norm().item() / reference.norm().item()
    top1 = (other.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return {"relative_error": rel, "top1_agreement": top1}


def run_demo(args: argparse.Namespace) -> int:
    """The demo, its third-party output kept in ``<out>/third-party.log`` unless ``args.verbose``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    as_json = getattr(args, "json", False)
    log = out / "third-party.log"
    try:
        with captured(log, getattr(args, "verbose", False)) as capture:
            # with --json, standard output holds the JSON alone: the rest goes to standard error
            console = capture.errors if as_json else capture.console
            code, summary = _run(args, out, console, started)
    except BaseException:
        if log.exists():  # the libraries' output may say what went wrong
            print(f"quantplug demo: the libraries' output of this run is in {relative(log)}", file=sys.stderr)
        raise
    notes = capture.summary()
    if summary is not None:
        notes.append(f"  summary: {relative(out / 'summary.json')}")
        notes.append(f"  done in {summary['seconds']:.0f} s")
    for line in notes:
        print(line, file=console)
    if as_json and summary is not None:
        print(json.dumps(summary, indent=2), file=capture.console)
    console.flush()
    capture.console.flush()
    return code


def _run(args: argparse.Namespace, out: Path, console, started: float) -> tuple[int, dict | None]:
    def say(*parts) -> None:
        print(*parts, file=console, flush=True)

    status = qp.load_plugins().status(args.backend)
    qalora = getattr(args, "qalora", False)
    if qalora and args.dora:
        say("--qalora and --dora cannot be combined (as in PEFT); pick one")
        return 2, None
    group = None
    if qalora:
        variant, group, problem = qalora_variant(args.backend, args.variant, status.info)
        if problem:
            say(problem)
            return 2, None
    else:
        variant = args.variant or (status.info.variants[0] if status.info and status.info.variants else None)
    kind = f"QALoRA (groups of {group})" if qalora else ("DoRA" if args.dora else "LoRA")
    say(
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
    total = logical_parameters(model)
    trainable = sum(p.numel() for p in params)
    layers = qp.lora_layers(model).values()
    kinds = {
        backend: sum(layer.backend == backend for layer in layers)
        for backend in {layer.backend for layer in layers}
    }
    say(
        f"  adapter layers: {', '.join(f'{n} {b}' for b, n in sorted(kinds.items()))}; "
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%; "
        "quantized weights counted as out x in)"
    )

    losses = train(model, params, args, console)
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    loss_before, loss_after = losses[0], sum(tail) / len(tail)
    say(
        f"  loss {loss_before:.3f} (first step) -> {loss_after:.3f} (mean of the last {len(tail)})  {sparkline(losses)}"
    )
    plot = save_plot(losses, out / "loss.png", f"{kind} r={args.rank} on {args.backend} ({variant})")

    data = corpus_bytes()
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
        "parameters": total,
        "merge": merges,
        "adapter": str(adapter_dir),
        "reload": reload,
        "reload_ok": reload_ok,
        "loss_plot": str(plot) if plot else None,
        "seconds": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        return (0 if reload_ok else 1), summary
    say("\n  merge         error vs W+ΔW   error / ‖ΔW‖   logits rel. err   top-1 agree   unmerge exact")
    for mode, row in merges.items():
        if "skipped" in row:
            say(f"  {mode:<12}  skipped: {row['skipped']}")
            continue
        say(
            f"  {mode:<12}  {row['mean_error']:>13.2e}   {row['mean_adapter_error']:>12.3f}   "
            f"{row['relative_error']:>15.2e}   {100 * row['top1_agreement']:>10.1f}%   {'yes' if row['unmerge_exact'] else 'NO'}"
        )
    say(f"\n  adapter saved (PEFT format): {relative(adapter_dir)}")
    say(
        f"  reloaded into a fresh quantized model: logits rel. err {reload['relative_error']:.1e}, "
        f"top-1 agree {100 * reload['top1_agreement']:.1f}% -> {'ok' if reload_ok else 'MISMATCH'}"
    )
    if plot:
        say(f"  loss curve: {relative(plot)}")
    return (0 if reload_ok and loss_after < loss_before else 1), summary


def train(model: nn.Module, params: list, args: argparse.Namespace, console) -> list[float]:
    """``args.steps`` AdamW steps on the corpus; the losses. A bar on a terminal, else a line every tenth
    of the run (a bar's carriage returns make one long line in a file or a CI log)."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(params, lr=5e-3)
    losses: list[float] = []
    interactive = _isatty(console)
    bar = tqdm(total=args.steps, desc="training", unit="step", file=console) if interactive else None
    every = max(1, args.steps // 10)
    start = time.perf_counter()
    for step, tokens in enumerate(batches(corpus_bytes(), args.steps, args.seed), 1):
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        elif step % every == 0 or step == args.steps:
            rate = step / max(time.perf_counter() - start, 1e-9)
            print(f"  training step {step:>4}/{args.steps}  loss {losses[-1]:.3f}  ({rate:.1f} steps/s)",
                  file=console, flush=True)  # fmt: skip
    if bar is not None:
        bar.close()
    return losses


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
