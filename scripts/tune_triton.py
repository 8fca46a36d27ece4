# ruff: noqa: B023  (each lambda is timed before the loop moves on)
"""Time the LoRA kernels' paths on this GPU (the block sizes in triton_kernels came from a sweep).

    python scripts/tune_triton.py [out.json]

Times are CUDA-graph replays (triton.testing.do_bench_cudagraph, median), so
they are the GPU's time without Python's launch overhead; the reference and
cuBLAS paths are timed the same way for comparison, and the eager per-call
cost of each path is printed last.
"""

import itertools
import json
import sys
import time

import torch
from quantplug import _triton as tk
from quantplug._kernels import lora_add_reference, lora_mixed_add_reference
from triton.testing import do_bench_cudagraph

dtype = torch.bfloat16
R = 16
results = {"paths": [], "eager": []}


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3  # us


for (N, K), M in itertools.product([(4096, 4096), (11008, 4096), (4096, 11008)], [1, 16, 64]):
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    y = torch.randn(M, N, device="cuda", dtype=dtype)
    A = torch.randn(R, K, device="cuda", dtype=dtype) / 64
    B = torch.randn(N, R, device="cuda", dtype=dtype) / 4
    ref = lora_add_reference(y, x, A, B, 2.0)
    paths = {
        "reference": bench(lambda: lora_add_reference(y, x, A, B, 2.0)),
        "cublas": bench(lambda: tk.lora_add_cublas(y, x, A, B, 2.0)),
        "y+1 (one elementwise launch)": bench(lambda: y + 1),
    }
    paths["splitk"] = bench(lambda: tk.lora_add_splitk(y, x, A, B, 2.0))
    fastest = min(("cublas", "splitk"), key=paths.get)  # the two paths lora_add chooses between
    out = {"cublas": tk.lora_add_cublas, "splitk": tk.lora_add_splitk}[fastest](y, x, A, B, 2.0)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    best = (paths[fastest], fastest, err)
    results["paths"].append({"M": M, "N": N, "K": K, **paths, "best": best[1]})
    print(
        f"M={M:3d} N={N:5d} K={K:5d}  "
        + "  ".join(f"{k} {v:.2f}" for k, v in paths.items())
        + f"  best {best[1]} err {best[2]:.1e}",
        flush=True,
    )

# BGMV: 16 rows, 8 adapters
for N, K in [(4096, 4096), (11008, 4096)]:
    T, n = 16, 8
    x = torch.randn(T, K, device="cuda", dtype=dtype)
    y = torch.randn(T, N, device="cuda", dtype=dtype)
    As = [torch.randn(R, K, device="cuda", dtype=dtype) / 64 for _ in range(n)]
    Bs = [torch.randn(N, R, device="cuda", dtype=dtype) / 4 for _ in range(n)]
    rows = torch.arange(T, device="cuda") % n
    A_st, B_st, sc = torch.stack(As), torch.stack(Bs), torch.full((n,), 2.0, device="cuda")
    ref_us = bench(lambda: lora_mixed_add_reference(y, x, As, Bs, [2.0] * n, rows))
    single = bench(lambda: tk.lora_add_splitk(y, x, As[0], Bs[0], 2.0))
    best = (bench(lambda: tk.lora_mixed_add_bgmv(y, x, A_st, B_st, sc, rows)), tk.BGMV_CONFIG)
    print(
        f"BGMV T=16 x8 N={N} K={K}: reference {ref_us:.2f}  one-adapter splitk {single:.2f}  best {best[0]:.2f} {best[1]}",
        flush=True,
    )

# eager per-call cost (host-bound at these sizes)
x = torch.randn(1, 4096, device="cuda", dtype=dtype)
y = torch.randn(1, 4096, device="cuda", dtype=dtype)
A = torch.randn(R, 4096, device="cuda", dtype=dtype)
B = torch.randn(4096, R, device="cuda", dtype=dtype)
for name, fn in [
    ("reference", lambda: lora_add_reference(y, x, A, B, 2.0)),
    ("triton lora_add (dispatch)", lambda: tk.lora_add(y, x, A, B, 2.0)),
    ("triton splitk launch", lambda: tk.lora_add_splitk(y, x, A, B, 2.0)),
    ("cublas path", lambda: tk.lora_add_cublas(y, x, A, B, 2.0)),
    ("custom op (compile path)", lambda: tk._lora_add_splitk_op(y, x, A, B, 2.0)),
    ("y + 1", lambda: y + 1),
]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(2000):
        fn()
    torch.cuda.synchronize()
    us = (time.perf_counter() - start) / 2000 * 1e6
    results["eager"].append({"path": name, "us": us})
    print(f"eager {name}: {us:.1f} us/call")

if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)
