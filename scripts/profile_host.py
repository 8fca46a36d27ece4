"""Where an eager one-token call's host time goes, per format (CUDA; no graphs: this is the Python).

    python scripts/profile_host.py OUT.json [--formats bnb,hqq,torchao] [--shape 2048x2048] [--calls 2000]

At one token a layer's GPU work takes a few microseconds, so an eager call's
wall time is its host time. Each row times, side by side on one layer with a
random r=16 adapter: the library's bare layer, the wrapped layer (adapter on
and disabled), the plugin's fused op called directly with ``force=True``
(with and without the adapter: its kernel even where the layer leaves the
call to the library, as bnb does one token's base eagerly), its ``admit``
check alone, and the slowest Python functions of the
wrapped call under cProfile (written beside OUT as OUT.prof.txt).
``scripts/gpu_run.sh host`` runs it.
"""

import argparse
import cProfile
import importlib
import io
import json
import pstats
import statistics
import time

import quantplug as qp
import torch
from quantplug.plugin import fused_lora
from tune_fused import PLUGINS, build  # PLUGINS: format -> (kernel module's package, variant)


def per_call_us(fn, calls: int, trials: int = 5) -> tuple[float, float, float]:
    """Median, min and max over ``trials`` of the wall time of ``calls`` calls (µs per call)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times), min(times), max(times)


def profile_layer(backend: str, n_out: int, n_in: int, calls: int) -> tuple[dict, str]:
    """One format's row of per-call times, and its cProfile report."""
    layer = build(backend, n_out, n_in, seed=0)
    kernels = importlib.import_module(f"{PLUGINS[backend][0]}._cuda_kernels")
    x = torch.randn(1, n_in, device="cuda", dtype=torch.bfloat16)
    A, B, scale = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    timed = {
        "library bare layer": lambda: layer.base(x),
        "wrapped, adapter on": lambda: layer(x),
        "wrapped, adapters disabled (base_call)": lambda: layer.base_call(x),
        "fused op, adapter": lambda: kernels.fused_lora_linear(layer.base, x, x, A, B, scale, force=True),
        "fused op, base alone": lambda: kernels.fused_lora_linear(
            layer.base, x, None, None, None, 0.0, force=True
        ),
        "admit alone": lambda: fused_lora.admit(layer.base, x, x, A, B, kernels._storage, serve=True),
        "torch.empty alone": lambda: torch.empty((1, n_out), device="cuda", dtype=torch.bfloat16),
    }
    row = {"backend": backend, "shape": f"{n_out}x{n_in}", "gpu": torch.cuda.get_device_name(0)}
    with torch.no_grad():
        for name, fn in timed.items():
            med, lo, hi = per_call_us(fn, calls)
            row[name] = {"median_us": med, "min_us": lo, "max_us": hi}
            print(f"{backend:8} {name:42} {med:8.1f} µs  ({lo:.1f}-{hi:.1f})", flush=True)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(500):
            layer(x)
        profile.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    return row, f"== {backend} {n_out}x{n_in}: 500 wrapped calls, by own time\n{text.getvalue()}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out")
    parser.add_argument("--formats", default="bnb,hqq,torchao")
    parser.add_argument("--shape", default="2048x2048", help="OUTxIN (default: a 1.1B model's q_proj)")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    n_out, n_in = (int(d) for d in args.shape.split("x"))
    usable = {row.name for row in qp.backends() if row.ok}
    rows, report = [], []
    for backend in args.formats.split(","):
        if backend not in usable:
            print(backend, "not usable here", flush=True)
            continue
        row, text = profile_layer(backend, n_out, n_in, args.calls)
        rows.append(row)
        report.append(text)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    with open(args.out + ".prof.txt", "w") as f:
        f.write("\n".join(report))


if __name__ == "__main__":
    main()
