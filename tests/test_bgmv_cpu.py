"""The core's BGMV kernels (``lora_mixed_add`` for ``adapter_names=`` batches) on the CPU.

They compile for Hopper (sm_90) with Triton's bundled ptxas, with adapters in
the compute dtype and in float32 (gptq's and awq's layers keep theirs so),
and in Triton's interpreter (a subprocess: ``TRITON_INTERPRET`` must be set
before Triton is imported) they match the reference. ``tests/gpu`` runs
them on a device.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="requirements-dev.txt installs Triton (the CI run has it)")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
sass_fused = pytest.importorskip("sass_fused")
torch = pytest.importorskip("torch")

INTERPRETED = """
import torch
from quantplug import _triton
from quantplug._kernels import lora_mixed_add_reference

torch.manual_seed(0)
k, n, r, count = 256, 96, 16, 3
for adapter_dtype in (torch.float32, torch.float16):
    As = [(torch.randn(r, k) / k**0.5).to(adapter_dtype) for _ in range(count)]
    Bs = [(torch.randn(n, r) / r**0.5).to(adapter_dtype) for _ in range(count)]
    scales = [0.5 + i for i in range(count)]
    x = torch.randn(6, k, dtype=torch.float16)
    y = (0.3 * torch.randn(6, n)).to(torch.float16)
    rows = torch.tensor([i % (count + 1) - 1 for i in range(6)])
    wide = [[t.double() for t in ts] for ts in (As, Bs)]
    truth = lora_mixed_add_reference(y.double(), x.double(), *wide, scales, rows)
    ref = lora_mixed_add_reference(y, x, As, Bs, scales, rows)
    fast = _triton.lora_mixed_add_bgmv(
        y, x, torch.stack(As), torch.stack(Bs), torch.tensor(scales), rows,
        config={"SHRINK_BLOCK_K": 128, "EXPAND_BLOCK_N": 32},
    )
    err = lambda got: ((got.double() - truth).norm() / truth.norm()).item()
    assert torch.equal(fast[rows == -1], y[rows == -1]), "rows with no adapter must come back unchanged"
    assert err(fast) <= 1.5 * err(ref) + 1e-4, (adapter_dtype, err(fast), err(ref))
    print(adapter_dtype, "ok", err(fast), err(ref))
"""


def launches(adapter_dtype, dtype):
    """The shrink and expand launches ``(fn, args, kwargs)`` of one BGMV call, recorded, not run."""
    from quantplug import _triton

    calls = []
    saved = _triton._bgmv_shrink_kernel, _triton._bgmv_expand_kernel
    _triton._bgmv_shrink_kernel = sass_fused._Launch(saved[0], calls)
    _triton._bgmv_expand_kernel = sass_fused._Launch(saved[1], calls)
    try:
        A = torch.randn(4, 16, 2048, dtype=adapter_dtype)
        B = torch.randn(4, 1024, 16, dtype=adapter_dtype)
        x, y = torch.randn(16, 2048, dtype=dtype), torch.randn(16, 1024, dtype=dtype)
        _triton.lora_mixed_add_bgmv(y, x, A, B, torch.ones(4), torch.arange(16) % 5 - 1)
    finally:
        _triton._bgmv_shrink_kernel, _triton._bgmv_expand_kernel = saved
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("adapter_dtype", ["compute", torch.float32], ids=["compute", "fp32"])
def test_bgmv_compiles_for_hopper(dtype, adapter_dtype):
    calls = launches(dtype if adapter_dtype == "compute" else adapter_dtype, dtype)
    assert len(calls) == 2  # shrink, then expand
    for fn, args, kwargs in calls:
        compiled, _, _ = sass_fused.compile_launch(fn, args, kwargs, 90)
        assert compiled.asm["cubin"]


def test_bgmv_matches_the_reference_in_the_interpreter():
    run = subprocess.run(
        [sys.executable, "-c", INTERPRETED],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.count(" ok ") == 2, run.stdout
