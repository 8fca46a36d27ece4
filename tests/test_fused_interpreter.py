"""The plugins' fused quantized-GEMV + LoRA Triton kernels run through Triton's interpreter on the CPU.

``scripts/check_fused_cpu.py`` (in a subprocess: ``TRITON_INTERPRET`` must
be set before Triton is imported) runs bnb's, hqq's (both one-token kernels),
torchao's, gptq's and awq's kernels over one and several tokens, ranks 1-16, unsplit and
split-K, with and without the adapter and with a last step past the row,
against each layer's dequantized weight in float64, and hqq's word GEMV
leaving a W_q it cannot read as words to the float32 GEMV. It checks what a kernel
computes and where it reads and writes; their inline PTX, which the
interpreter cannot run, is checked bit for bit by ``tests/test_ptx.py``, and
both together on a GPU by ``tests/gpu``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_fused_cpu.py"


def test_fused_kernels_match_the_dequantized_weight_in_the_interpreter():
    pytest.importorskip("triton", reason="requirements-dev.txt installs Triton (the CI run has it)")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "bnb", "hqq", "torchao", "gptq", "awq"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    rows = [line for line in run.stdout.splitlines() if line.endswith((" ok", " FAIL"))]
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert len(rows) == 26 and all(row.endswith(" ok") for row in rows), run.stdout
    assert sum("(gemv)" in row for row in rows) == 2, run.stdout  # the served word GEMV runs in the others
