# ruff: noqa: B023  (each lambda is timed before the loop moves on)
"""Sweep and time the plugins' fused quantized-GEMV + LoRA kernels on one GPU, in one call.

    python scripts/tune_fused.py OUT.json [--formats bnb,hqq,torchao,gptq,awq] [--shapes 4096x4096,4096x14336,11008x4096]
        [--tokens 1,16] [--sweep] [--workers 12] [--shrink-slices 16,32,64]

For each format, shape (out x in) and token count, r=16, bf16, it reports
GPU time from CUDA-graph replay (a graph of calls cycling over enough
copies of the layer to overflow L2, so the weights come from HBM; median of
trials), for:

- ``library``: the library's own bare layer (``base(x)``; ``None``, with
  ``library_error`` saying why, where a CUDA graph cannot capture it, as
  gptqmodel's ``AwqTorchLinear``);
- ``fused_base``: the plugin's fused kernel without an adapter (``A=None``);
- ``fused_lora`` / ``fused_lora_nopdl``: with the adapter (the shrink as
  its own launch), with and without programmatic dependent launch;
- ``fused_expand_only``: with the adapter but the shrink launch left out
  (the kernel's epilogue reads whatever its scratch holds): ``fused_lora``
  less this is the shrink's cost, this less ``fused_base`` the expand
  epilogue's (at one token it is most of the adapter's cost: performance.md);
- ``wrapped``: quantplug's adapter layer as users call it (fast kernels);
- ``wrapped_ref``: the same layer with ``QUANTPLUG_KERNELS=reference``
  (the library's forward plus the plain adapter).

Bytes are what the wrapped layer must read at least: packed weight, scales
(and zeros, nested absmax tables), bias, adapter ``A`` and ``B``; GB/s are
bytes over graph time, and ``% copy`` compares with the measured
device-to-device copy rate (read + write). ``--sweep`` first times the
one-token kernel with the adapter over a grid of block sizes per token block (compiling the grid in
parallel worker processes first, so the GPU times only run after) and
uses the fastest for the rest. ``--shrink-slices`` times the wrapped layer
at one token under each count of the adapter's shrink slices (the plugin's
``ONE_TOKEN_SHRINK_SLICES``; docs/performance.md says why it differs by
format).
"""

import argparse
import itertools
import json
import math
import statistics
import sys
import time

import torch

DTYPE = torch.bfloat16
R = 16
L2_BYTES = 60 << 20
PLUGINS = {
    "bnb": ("quantplug_bnb", "nf4"),
    "hqq": ("quantplug_hqq", "4bit-g64"),
    "torchao": ("quantplug_torchao", "int8wo"),
    "gptq": ("quantplug_gptqmodel.gptq", "int4-g128-sym"),
    "awq": ("quantplug_gptqmodel.awq", "int4-g128-asym"),
}
# formats whose layer copies are deep copies of the first: quantizing is slow there (gptqmodel packs on the CPU,
# 7 s a 4096x4096 layer)
COPY_BASE = {"gptq", "awq"}


def kernels(fmt):
    import importlib

    return importlib.import_module(f"{PLUGINS[fmt][0]}._cuda_kernels")


def sweep_grid(fmt, key):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, SPLITK) to try for CONFIGS[key] ("gemv": the one-token
    GEMV; 16: the tensor-core kernel at 2-16 tokens; 1: the same kernel at one token, for a plugin with
    ``ONE_TOKEN``).

    One token: the first H200 sweep (BLOCK_K 128-512, stages 1-3) found wider K steps always faster and
    stages without effect, so this one spans BLOCK_K 512-4096 at one stage, keeping 8-64 weight
    elements per thread (registers). Tensor cores: hqq's kernel at BLOCK_K 64 steps one group at a time,
    which Triton pipelines (cp.async) over ``num_stages``; wider steps decode group by group with no loads
    in flight (2026-12-05, H100: 2x slower).
    """
    if fmt == "gptq":
        # the words run down the inputs: a program takes a block of columns and steps down the rows, and split-K
        # gives the GPU its programs (H100, 2026-12-06: 64 columns of one warp, split 16, was fastest)
        if key == "gemv":
            ns, ks, warps, stages, splits = (
                (32, 64, 128, 256),
                (128, 256, 512),
                (1, 2, 4),
                (1,),
                (2, 4, 8, 16),
            )
        else:
            ns, ks, warps, stages, splits = (32, 64, 128), (128, 256), (4,), (2, 3, 4), (1, 2, 4)
    elif fmt == "awq":
        # the words run along the outputs (eight columns each): BLOCK_N in columns, a multiple of 8; a step is one
        # group or part of one (BLOCK_K divides the group). One token, H100 (2026-12-06): 128 columns of one warp
        # at BLOCK_K 128, split 16 was fastest
        if key == "gemv":
            ns, ks, warps, stages, splits = (64, 128, 256), (64, 128), (1, 2), (1,), (8, 16, 32)
        else:
            ns, ks, warps, stages, splits = (32, 64, 128), (64, 128), (4,), (2, 3, 4), (1, 2, 4, 8)
    elif key in ("gemv", "word"):
        ns, ks, warps, stages, splits = (1, 2, 4, 8, 16), (512, 1024, 2048, 4096), (2, 4, 8), (1,), (1, 2)
    elif fmt == "hqq":
        # one group a step (BLOCK_K 64), so that Triton pipelines its loads (cp.async) over stages. On the H100
        # (2026-12-05) 4 stages beat 3 and 2 (27, 31, 52 us), 6 and 8 were within 3% of 4, and 32 rows of 4 warps
        # beat 64 and 128 rows, and 16 rows of one or two warps (1.2-1.3x slower)
        ns, ks, warps, stages, splits = (32, 64), (64,), (2, 4, 8), (4, 6), (1, 2, 4, 8)
    elif fmt == "bnb":
        # with the NF4 table in registers: one absmax block a step (BLOCK_K 64) too, as hqq's; on the H100
        # (2026-12-06) (32, 128, 4 warps, 4 stages, split 2) was fastest, splits 1 and 4 within 1%
        ns, ks, warps, stages, splits = (16, 32, 64), (64, 128, 256), (4,), (1, 3, 4), (1, 2, 4)
    else:
        ns, ks, warps, stages, splits = (16, 32), (128, 256), (4,), (1, 3), (1, 2, 4, 8)
    for n, k, w, st, sk in itertools.product(ns, ks, warps, stages, splits):
        if fmt == "awq":
            if key != "gemv" and n * k > 16384:
                continue  # a tile: registers
        elif fmt == "gptq":
            if (key == "gemv" and not 4096 * w <= n * k <= 32768 * w) or (key != "gemv" and n * k > 16384):
                continue  # a GEMV thread: 128 to 1024 codes a step; a tile: registers
        elif key in ("gemv", "word"):  # weight elements a step decodes (hqq: BLOCK_N rows of each half)
            elements = n * k * (2 if fmt == "hqq" else 1)
            # the word GEMVs (bnb's, hqq's "word": products summed in the asm, 2026-12-06) have registers for 128
            # a thread
            words = (fmt, key) in (("bnb", "gemv"), ("hqq", "word"))
            if not 256 * w <= elements <= (4096 if words else 2048) * w:
                continue
        # hqq: fewer than 8 rows a warp and warps decode the same rows; else the per-block product would not fit
        # in registers
        elif n < 8 * w if fmt == "hqq" else n * k * 16 > 65536:
            continue
        yield (n, k, w, st, sk)


def sweep_keys(fmt, tokens):
    """The CONFIGS keys (kernels) that serve ``tokens`` for ``fmt``: 16, or at one token "gemv" and, for a
    plugin with ``ONE_TOKEN``, its other one-token kernels (1: the tensor-core kernel; "word": hqq's)."""
    if tokens > 1:
        return [16]
    return ["gemv"] + ([k for k in kernels(fmt).CONFIGS if k not in ("gemv", 16)] if _has_choice(fmt) else [])


def _has_choice(fmt):
    return hasattr(kernels(fmt), "ONE_TOKEN")


def one_token_kernel(key):
    """The ``kernel=`` (and ``ONE_TOKEN``) name of CONFIGS[key]: 1 is the tensor-core kernel, "mma"."""
    return "mma" if key == 1 else key


def kernel_args(fmt, key):
    """``fused_lora_linear``'s kernel choice for CONFIGS[key] (only plugins with ``ONE_TOKEN`` take one)."""
    if not _has_choice(fmt) or key == 16:
        return {}
    return {"kernel": one_token_kernel(key)}


def copy_rate():
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    rate = 2 * src.numel() * 10 / start.elapsed_time(end) / 1e6
    del src, dst
    return rate


def build(fmt, out_features, in_features, seed, like=None):
    """The wrapped layer (r=16, random adapter); ``like``: a layer whose base to copy (formats in COPY_BASE)."""
    import copy

    import quantplug as qp
    from quantplug.testing import Holder

    torch.manual_seed(seed)
    if like is not None and fmt in COPY_BASE:
        base = copy.deepcopy(like.base)
    else:
        linear = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=DTYPE)
        with torch.no_grad():
            linear.weight.normal_(0, 0.02)
        base = qp.quantize(linear, fmt, PLUGINS[fmt][1])
    model = qp.attach(Holder(base), qp.LoraConfig(r=R, alpha=2 * R, target_modules=["proj"], init="random"))
    model.eval()
    return model.proj


def nbytes(layer):
    """Packed weight, scales, zeros, tables, bias and the adapter: what one call must read."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.device.type == "cuda":
            inner = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else None
            if inner:
                for name in inner:
                    add(getattr(t, name))
                return
            key = (t.data_ptr(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()

    base = layer.base
    for t in (*base.parameters(), *base.buffers()):
        add(t)
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    if state is not None:
        for t in (state.absmax, state.code, getattr(state, "offset", None)):
            add(t)
        if getattr(state, "state2", None) is not None:
            add(state.state2.absmax)
            add(state.state2.code)
    for value in getattr(base, "meta", {}).values() if isinstance(getattr(base, "meta", None), dict) else ():
        add(value)
    add(getattr(base, "W_q", None))
    add(getattr(base, "bias", None))
    add(layer.lora_A["default"])
    add(layer.lora_B["default"])
    return total


def graph_time(calls, trials=7, per_graph=None):
    """Median GPU time per call (us) of ``calls`` (a list of thunks), replayed from one CUDA graph."""
    per_graph = per_graph or len(calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # every call once eagerly: a layer first called under capture gets no
        for fn in calls:  # split-K counters (fused_lora.launch) and would run unsplit in the graph
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(per_graph):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per_graph)
    del graph
    return statistics.median(times)


def optional_time(row, name, t, fn):
    """``t(fn)``, or ``None`` where the calls cannot be captured in a CUDA graph (``row["<name>_error"]`` says why)."""
    try:
        return t(fn)
    except Exception as exc:
        torch.cuda.synchronize()
        row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return None


def _us(value):
    return "      -" if value is None else f"{value:7.2f}"


class _NoLaunch:
    """Stands in for the core's shrink kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def expand_only(t, fn):
    """``t(fn)`` with the core's shrink launch left out (the adapter's epilogue alone)."""
    from quantplug.plugin import fused_lora as fl

    shrink = fl.shrink_kernel
    fl.shrink_kernel = _NoLaunch()
    try:
        return t(fn)
    finally:
        fl.shrink_kernel = shrink


def shrink_slices_times(ck, counts, time_wrapped, rounds=3):
    """``{count: median us}``: ``time_wrapped()`` with each count as the plugin's ``ONE_TOKEN_SHRINK_SLICES``,
    the counts interleaved over ``rounds`` rounds (the plugin's own value restored after)."""
    saved = ck.ONE_TOKEN_SHRINK_SLICES
    times = {count: [] for count in counts}
    try:
        for _ in range(rounds):
            for count in counts:
                ck.ONE_TOKEN_SHRINK_SLICES = count
                times[count].append(time_wrapped())
    finally:
        ck.ONE_TOKEN_SHRINK_SLICES = saved
    return {count: statistics.median(us) for count, us in times.items()}


def compile_worker(jobs):
    """Run each (fmt, shape, tokens, CONFIGS key, config, mode) once so Triton's cache holds its binary."""
    torch.cuda.set_device(0)
    done = 0
    for fmt, (n, k), tokens, key, config, mode in jobs:
        try:
            layer = _worker_layer(fmt, n, k)
            x = torch.randn(tokens, k, device="cuda", dtype=DTYPE)
            args = (
                (x, layer.lora_A["default"], layer.lora_B["default"], 2.0)
                if mode
                else (None, None, None, 0.0)
            )
            with torch.no_grad():
                kernels(fmt).fused_lora_linear(
                    layer.base,
                    x,
                    *args,
                    config=config,
                    lora_mode=mode or None,
                    force=True,
                    **kernel_args(fmt, key),
                )
            torch.cuda.synchronize()
            done += 1
        except Exception as exc:  # a config Triton cannot build (registers, shared memory): skipped later
            print(
                f"compile {fmt} {config} tokens={tokens}: {type(exc).__name__} {str(exc)[:120]}", flush=True
            )
    return done


_worker_layers = {}


def _worker_layer(fmt, n, k):
    key = (fmt, n, k)
    if key not in _worker_layers:
        _worker_layers[key] = build(fmt, n, k, 0)
    return _worker_layers[key]


def precompile(jobs, workers):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    chunks = [jobs[i::workers] for i in range(workers)]
    start = time.perf_counter()
    with ctx.Pool(workers) as pool:
        done = sum(pool.map(compile_worker, chunks))
    print(f"precompiled {done}/{len(jobs)} kernels in {time.perf_counter() - start:.0f} s", flush=True)


def _row(args, ck, qp, fmt, n, k, tokens, layers, probe, size, copies, best, results, rate, shapes, t0):
    xs = [torch.randn(tokens, k, device="cuda", dtype=DTYPE) for _ in layers]
    pairs = list(zip(layers, xs))
    per_graph = max(len(pairs), 64)

    def t(fn):
        with torch.no_grad():
            return graph_time([lambda lay=lay, x=x: fn(lay, x) for lay, x in pairs], per_graph=per_graph)

    keys = sweep_keys(fmt, tokens)
    key = keys[0] if len(keys) == 1 else {"mma": 1}.get(ck.ONE_TOKEN, ck.ONE_TOKEN)
    config = ck.CONFIGS[key]
    for cfg in json.loads(args.configs) if args.configs else ():
        us = t(
            lambda lay, x: ck.fused_lora_linear(lay.base, x, None, None, None, 0.0, config=cfg, force=True)
        )
        results["sweep"].append({"format": fmt, "shape": [n, k], "tokens": tokens, "config": cfg, "us": us})
        print(f"config {fmt} {n}x{k} t={tokens} {cfg}: {us:.2f} us", flush=True)
    sweep = args.sweep and (n, k) == shapes[0]  # other shapes take the first shape's best
    if sweep and time.perf_counter() - t0 < args.budget:
        timed = []
        for sweep_key in keys:
            for cfg in sweep_grid(fmt, sweep_key):
                if time.perf_counter() - t0 > args.budget:
                    break
                try:  # with the adapter: what the layer runs (an epilogue can cost registers a config lacks)
                    us = t(
                        lambda lay, x: ck.fused_lora_linear(
                            lay.base,
                            x,
                            x,
                            lay.lora_A["default"],
                            lay.lora_B["default"],
                            2.0,
                            config=cfg,
                            force=True,
                            **kernel_args(fmt, sweep_key),
                        )
                    )
                except Exception as exc:
                    print(f"skip {fmt} {sweep_key} {cfg}: {type(exc).__name__}", flush=True)
                    continue
                timed.append((us, sweep_key, cfg))
                results["sweep"].append(
                    {"format": fmt, "shape": [n, k], "tokens": tokens, "kernel": str(sweep_key), "config": cfg,
                     "us": us}
                )  # fmt: skip
        timed.sort(key=lambda e: e[0])
        if timed:
            _, key, config = timed[0]
            for sweep_key in keys:
                mine = [e for e in timed if e[1] == sweep_key]
                if mine:
                    print(
                        f"sweep {fmt} {n}x{k} tokens={tokens} kernel {sweep_key}: best {mine[:3]}", flush=True
                    )
    else:
        key, config = best.get((fmt, tokens), (key, config))
    best[(fmt, tokens)] = (key, config)

    def lora(lay, x, pdl):
        A, B = lay.lora_A["default"], lay.lora_B["default"]
        return ck.fused_lora_linear(
            lay.base, x, x, A, B, 2.0, config=config, pdl=pdl, force=True, **kernel_args(fmt, key)
        )

    row = {
        "format": fmt,
        "shape": [n, k],
        "tokens": tokens,
        "bytes": size,
        "kernel": str(key),
        "config": config,
        "copies": copies,
    }
    with torch.no_grad():  # the kernel's answer against the reference path, on the first layer
        lay, x = pairs[0]
        got = lora(lay, x, True).double()
        qp.use_reference_kernels(True)
        try:
            want = lay(x).double()
        finally:
            qp.use_reference_kernels(False)
        row["rel_err_vs_reference"] = ((got - want).norm() / want.norm()).item()
    # the library's own layer (and the reference path, which calls it) may not be capturable in a graph (AWQ's
    # AwqTorchLinear copies from the host in its forward): those rows are then None and the row says why
    row["library"] = optional_time(row, "library", t, lambda lay, x: lay.base(x))
    row["fused_base"] = t(
        lambda lay, x: ck.fused_lora_linear(
            lay.base, x, None, None, None, 0.0, config=config, force=True, **kernel_args(fmt, key)
        )
    )
    row["fused_lora"] = t(lambda lay, x: lora(lay, x, True))
    row["fused_lora_nopdl"] = t(lambda lay, x: lora(lay, x, False))
    row["fused_expand_only"] = expand_only(t, lambda lay, x: lora(lay, x, True))
    saved_configs, saved_one_token = dict(ck.CONFIGS), getattr(ck, "ONE_TOKEN", None)
    ck.CONFIGS[key] = config
    if saved_one_token is not None and tokens == 1:
        ck.ONE_TOKEN = one_token_kernel(key)
    row["wrapped"] = t(lambda lay, x: lay(x))
    ck.CONFIGS.update(saved_configs)
    if saved_one_token is not None:
        ck.ONE_TOKEN = saved_one_token
    qp.use_reference_kernels(True)
    try:
        row["wrapped_ref"] = optional_time(row, "wrapped_ref", t, lambda lay, x: lay(x))
    finally:
        qp.use_reference_kernels(False)
    if args.shrink_slices and tokens == 1:
        row["wrapped_by_shrink_slices"] = shrink_slices_times(
            ck, [int(v) for v in args.shrink_slices.split(",")], lambda: t(lambda lay, x: lay(x))
        )
        print(
            f"{fmt:8s} {n}x{k} t= 1 wrapped by shrink slices: "
            + "  ".join(f"{v}: {us:.2f}" for v, us in row["wrapped_by_shrink_slices"].items()),
            flush=True,
        )
    for name in (
        "library",
        "fused_base",
        "fused_lora",
        "fused_lora_nopdl",
        "fused_expand_only",
        "wrapped",
        "wrapped_ref",
    ):
        if row.get(name):
            row[f"{name}_gbs"] = size / row[name] / 1e3
            row[f"{name}_pct_copy"] = 100 * size / row[name] / 1e3 / rate
    results["rows"].append(row)
    print(
        f"{fmt:8s} {n}x{k} t={tokens:2d} {size / 1e6:6.2f} MB  lib {_us(row['library'])}  "
        f"fbase {row['fused_base']:6.2f}  "
        f"lora {row['fused_lora']:6.2f} (no pdl {row['fused_lora_nopdl']:6.2f}, "
        f"expand only {row['fused_expand_only']:6.2f})  "
        f"wrapped {row['wrapped']:6.2f} ({row['wrapped_pct_copy']:.0f}% copy)  ref {_us(row['wrapped_ref'])}  "
        f"err {row['rel_err_vs_reference']:.1e}  "
        f"cfg {config}",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--formats", default="bnb,hqq,torchao,gptq,awq")
    parser.add_argument("--shapes", default="4096x4096,4096x14336,11008x4096")
    parser.add_argument("--tokens", default="1,16")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--configs", default="", help="JSON list of configs to time for the base kernel")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; stop sweeping after this")
    parser.add_argument(
        "--shrink-slices",
        default="",
        help="comma-separated counts: at one token, also time the wrapped layer with each as the plugin's "
        "ONE_TOKEN_SHRINK_SLICES (interleaved, three rounds)",
    )
    args = parser.parse_args()
    t0 = time.perf_counter()
    import quantplug as qp

    formats = [f for f in args.formats.split(",") if f]
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    tokens_list = [int(t) for t in args.tokens.split(",")]
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": [], "sweep": []}
    import triton

    results["triton"] = triton.__version__
    results["copy_gbs"] = rate = copy_rate()
    print(f"{results['device']}: copy rate {rate:.0f} GB/s (read + write)", flush=True)
    usable = [
        f
        for f in formats
        if {r.name: r for r in qp.backends()}.get(f) and {r.name: r for r in qp.backends()}[f].ok
    ]
    formats = usable
    best = {}
    if args.sweep:
        jobs = []
        for fmt in formats:
            for tokens in tokens_list:
                for key in sweep_keys(fmt, tokens):
                    jobs += [(fmt, shapes[0], tokens, key, config, 1) for config in sweep_grid(fmt, key)]
        precompile(jobs, args.workers)
    out_json = args.out
    for fmt, (n, k) in itertools.product(formats, shapes):
        ck = kernels(fmt)
        probe = build(fmt, n, k, 0)
        size = nbytes(probe)
        copies = max(2, math.ceil(2.5 * L2_BYTES / size))
        layers = [probe] + [build(fmt, n, k, i, like=probe) for i in range(1, copies)]
        for tokens in tokens_list:
            try:
                _row(
                    args,
                    ck,
                    qp,
                    fmt,
                    n,
                    k,
                    tokens,
                    layers,
                    probe,
                    size,
                    copies,
                    best,
                    results,
                    rate,
                    shapes,
                    t0,
                )
            except Exception as exc:  # one failing row (a kernel that does not build) must not end the run
                print(
                    f"row {fmt} {n}x{k} t={tokens} failed: {type(exc).__name__} {str(exc)[:300]}", flush=True
                )
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        del layers, probe
        torch.cuda.empty_cache()
    results["best_configs"] = {
        f"{fmt}:{tokens}": [str(key), cfg] for (fmt, tokens), (key, cfg) in best.items()
    }
    with open(out_json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
