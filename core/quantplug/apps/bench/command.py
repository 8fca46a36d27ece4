"""``quantplug bench``'s arguments and its run: layer rows, then model rows, then the table and chart."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = (
    "Times each backend's bare quantized layer, the same layer with an unmerged adapter (reference and fast "
    "kernels) and merged, at 1, 16 and 2048 tokens, and PEFT's LoRA layer on the same base in the same run "
    "where PEFT supports the backend. Ratios (wrapped/bare, quantplug/PEFT) are the numbers to read; absolute "
    "times on shared machines are noise."
)


def add_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument(
        "--backends",
        default=None,
        help="comma-separated backends (default: every backend that is ok here and runs on the device, "
        "each in its first variant; see quantplug doctor)",
    )
    bench.add_argument(
        "--shapes", default=None, help="comma-separated OUTxIN shapes (default: 4096x4096,11008x4096)"
    )
    bench.add_argument("--tokens", default=None, help="comma-separated token counts (default: 1,16,2048)")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--dtype", default="bfloat16", help="compute dtype (default: bfloat16)")
    bench.add_argument("--rank", type=int, default=16)
    bench.add_argument("--no-peft", action="store_true", help="skip PEFT's columns")
    bench.add_argument(
        "--model",
        action="store_true",
        help="also run the whole-model decode/training comparison (on the first of --backends, else the "
        "first quantizing backend usable here)",
    )
    bench.add_argument(
        "--model-shape", default="1.1b", choices=["1.1b", "8b"],
        help="the whole-model rows' LLaMA: TinyLlama's 1.1B shape or Llama-3's 8B (random weights; default 1.1b)",
    )  # fmt: skip
    bench.add_argument(
        "--no-decode", action="store_true", help="with --model: only the training rows, no decode rows"
    )
    bench.add_argument(
        "--no-train", action="store_true", help="with --model: only the decode rows, no training rows"
    )
    bench.add_argument(
        "--trials", type=int, default=5,
        help="with --model: timed training trials per library, alternating (default 5; each is 3 warm-up and "
        "20 timed steps)",
    )  # fmt: skip
    bench.add_argument(
        "--check-steps", type=int, default=50,
        help="with --model: steps of the training loss-curve check against plain PyTorch and PEFT (default 50)",
    )  # fmt: skip
    bench.add_argument(
        "--no-compile", action="store_true",
        help="with --model: time quantplug's training eagerly only, not also under torch.compile "
        "(qp.prepare_for_training(..., compile=True); the first step compiles, about a minute on a GPU)",
    )  # fmt: skip
    bench.add_argument(
        "--out", default="bench.json", help="JSON output path (a PNG chart is written beside it)"
    )
    bench.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    bench.add_argument("--no-layers", action="store_true", help="skip the per-layer timings (with --model)")
    bench.add_argument(
        "--render", metavar="JSON", default=None,
        help="write the Markdown report beside JSON (docs/performance.json -> docs/performance.md) and exit",
    )  # fmt: skip


def run_bench(args: argparse.Namespace) -> int:
    from quantplug.apps.bench.chart import chart
    from quantplug.apps.bench.report import fmt, render, table

    if getattr(args, "render", None):
        md = Path(args.render).with_suffix(".md")
        render(Path(args.render), md)
        print(f"wrote {md}")
        return 0
    import torch

    from quantplug.apps.bench.backends import importable
    from quantplug.apps.bench.environment import environment
    from quantplug.apps.bench.layers import layer_rows
    from quantplug.apps.bench.model import model_rows
    from quantplug.apps.bench.training import training_rows

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if device == "cuda" and not torch.cuda.is_available():
        print("quantplug bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    argv = getattr(args, "argv", None) or sys.argv[2:]
    env = environment(device, argv)
    log(f"device {env['gpu']}, copy bandwidth {fmt(env.get('copy_gbs'), '.0f')} GB/s")
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(rows, indent=1, default=str) + "\n")

    if not getattr(args, "no_layers", False):
        torch.manual_seed(0)
        layer_rows(args, device, dtype, env, log, rows, save)
        save()
    if args.model:
        if not importable("transformers"):
            log("--model needs transformers; skipped")
        else:
            if not args.no_decode:
                torch.manual_seed(0)
                rows += model_rows(args, device, dtype, env, log)
                save()  # the decode rows outlive a training run cut short
            if not getattr(args, "no_train", False):
                torch.manual_seed(0)
                rows += training_rows(args, device, dtype, env, log)
    save()
    png = chart(rows, out.with_suffix(".png"))
    print(table(rows))
    print(f"\nwrote {out}" + (f" and {png}" if png else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m quantplug.apps.bench [args]``: the same as ``quantplug bench [args]``."""
    parser = argparse.ArgumentParser(prog="python -m quantplug.apps.bench", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_bench(args)
