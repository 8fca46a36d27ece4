"""``quantplug``: doctor, demo and bench from the command line."""

from __future__ import annotations

import argparse
import json
import sys

from quantplug.apps.bench.command import DESCRIPTION as BENCH_DESCRIPTION
from quantplug.apps.bench.command import add_arguments as add_bench_arguments

DESCRIPTION = """\
quantplug attaches LoRA adapters to already-quantized layers (bitsandbytes,
GPTQ, AWQ, HQQ, TorchAO, AQLM, INC, quanto, EETQ and third-party backends),
trains them, and merges them back.

  quantplug doctor                 which backends work here, and the fix for those that don't
  quantplug demo                   train LoRA on a tiny quantized LLaMA, merge it, save it (CPU, ~10 s)
  quantplug demo --backend hqq     the same on another backend
  quantplug demo --backend hqq --qalora   QALoRA, merged into the zero points beside requantize and dense
  quantplug bench --out b.json     time bare vs adapter vs merged layers, beside PEFT
"""


def _doctor(args: argparse.Namespace) -> int:
    import quantplug as qp
    from quantplug.apps.backends import missing_first_party

    rows = qp.backends()
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
        return 0
    absent = missing_first_party(rows)
    header = (
        "backend", "status", "plugin", "library", "found", "required", "devices", "merge", "fsdp2",
        "kernel (cpu / cuda)", "layer on cuda",
    )  # fmt: skip
    table = []
    for row in rows:
        info = row.info
        kernel = f"{row.kernels.get('lora_add@cpu', '-')} / {row.kernels.get('lora_add@cuda', '-')}"
        # the plugin's fused quantized-GEMV + adapter kernel, when one serves the layer here; else the
        # library's own forward with the adapter kernel beside it
        fused = row.kernels.get("fused_lora_linear@cuda", "-")
        layer = "library" if fused == "reference" else fused
        table.append(
            (
                row.name,
                str(row.status),
                f"{row.plugin_dist or '?'} {row.plugin_version or ''}".strip(),
                row.library or "-",
                row.found or "-",
                row.required or "-",
                ",".join(info.devices) if info else "-",
                ",".join(info.merge_modes) if info else "-",
                _fsdp2(info),
                kernel,
                layer,
            )
        )
    for name, plugin in absent:
        state = "not loaded" if plugin.installed() else "not installed"
        table.append((name, state, plugin.dist, *("-",) * 8))
    widths = [max(len(str(r[i])) for r in (header, *table)) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    problems = [row for row in rows if not row.ok]
    for row in problems:
        print(f"\n{row.name}: {row.status}: {row.reason}\n  fix: {row.fix}")
    if absent:
        print("\nnot installed (first-party plugins of this clone):")
        width = max(len(name) for name, _ in absent)
        for name, plugin in absent:
            how = (
                "installed, left out by QUANTPLUG_LOAD_PLUGINS / QUANTPLUG_BLOCK_PLUGINS"
                if plugin.installed()
                else plugin.install_line()
            )
            print(f"  {name:<{width}}  {how}")
    for row in rows:
        if row.info and row.info.limits and args.verbose:
            print(f"\n{row.name} limits:")
            for what, why in row.info.limits.items():
                print(f"  {what}: {why}")
    print(
        "\ntraining path (every backend): the lean node, one autograd node per adapter layer whose backward "
        "takes dx through the plugin's dequantization and keeps no dense weight; under "
        "qp.prepare_for_training(model, compile=True) it runs as the custom ops quantplug::lean_lora_linear "
        "and quantplug::lean_lora_grads inside torch.compile (docs/performance.md)"
    )
    ok = sum(row.ok for row in rows)
    if not problems and not absent:
        print(f"\nall {ok} backends ok")
    else:
        missing = len(absent)
        plural = "s" if missing != 1 else ""
        print(
            f"\n{ok} of {len(rows)} loaded backends ok"
            + (f"; {missing} first-party backend{plural} not loaded" if absent else "")
        )
    return 0


def _fsdp2(info) -> str:
    """``yes``/``no`` for BackendInfo.shardable, naming the variants its limits exclude (``-v`` says why)."""
    if info is None:
        return "-"
    if not info.shardable:
        return "no"
    excluded = [key.split(":", 1)[1] for key in info.limits if key.startswith("shardable:")]
    if excluded:
        return "yes, not " + ",".join(excluded)
    return "partial" if "shardable" in info.limits else "yes"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from quantplug.apps.backends import BackendChoiceError, default_backend, resolve

    try:
        status = resolve(args.backend) if args.backend else default_backend("cpu")
    except BackendChoiceError as exc:
        print(f"quantplug demo: {exc}", file=sys.stderr)
        return 2
    if status is None:
        print("quantplug demo: no backend is ok here; see quantplug doctor", file=sys.stderr)
        return 2
    args.backend = status.name
    from quantplug.apps.demo import run_demo

    return run_demo(args)


def _bench(args: argparse.Namespace) -> int:
    from quantplug.apps.bench.command import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantplug", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{doctor,demo,bench}")

    doctor = sub.add_parser(
        "doctor",
        help="list backends: status, versions, merge modes, FSDP2 sharding, kernels, and the fix",
        description="One row per installed backend plugin. A plugin that failed to import, or whose library is "
        "missing, too old, too new or broken, is listed with the exact command that fixes it; "
        "every other backend keeps working.",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON instead of a table")
    doctor.add_argument("-v", "--verbose", action="store_true", help="also list each backend's known limits")
    doctor.set_defaults(func=_doctor)

    demo = sub.add_parser(
        "demo",
        help="train LoRA on a tiny quantized LLaMA, merge it both ways, save and reload it",
        description="Builds a tiny LLaMA from a config (no download), quantizes its linear layers with "
        "--backend, attaches LoRA to all of them, trains on a small corpus shipped with quantplug until the "
        "loss has clearly fallen, merges the adapter in 'requantize' and 'dense' modes and reports how much of "
        "it each merge kept and how well merged logits agree with unmerged ones, then saves the adapter in "
        "PEFT's format and reloads it. On CPU: about 15 s of CPU time (bnb, hqq, aqlm measured 2026-12), "
        "under 10 s on 2 idle cores; more on a busy machine.",
    )
    demo.add_argument(
        "--backend",
        default=None,
        help="backend to quantize with, any case (default: the first backend quantplug doctor lists as ok that "
        "runs on CPU, the dense 'linear' only when no other is)",
    )
    demo.add_argument(
        "--variant", default=None, help="the backend's format, e.g. nf4, fp4, int8 (default: its first)"
    )
    demo.add_argument("--steps", type=_positive, default=120, help="training steps (default: 120)")
    demo.add_argument("--rank", type=_positive, default=16, help="LoRA rank (default: 16)")
    demo.add_argument("--dora", action="store_true", help="train DoRA instead of LoRA")
    demo.add_argument(
        "--qalora",
        action="store_true",
        help="train QALoRA on the projections (input pooled over the backend's quantization groups; "
        "needs a backend with groups along the input; quantplug doctor's merge column shows 'zeros' for those "
        "with zero points) and compare the 'zeros' merge, which "
        "keeps the quantized codes and moves the zero points, with 'requantize' and 'dense'; without "
        "--variant, the first variant with groups and zero points",
    )
    demo.add_argument(
        "--out", default="quantplug-demo-out", help="folder for the adapter, loss curve and summary"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the quantization libraries' own output live (by default it goes to OUT/third-party.log "
        "and one line sums it up)",
    )
    demo.set_defaults(func=_demo)

    bench = sub.add_parser(
        "bench",
        help="time bare, adapter and merged layers per backend, beside PEFT (JSON out)",
        description=BENCH_DESCRIPTION,
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
