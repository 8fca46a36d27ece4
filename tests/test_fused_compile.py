"""Every fused kernel a plugin launches compiles for Hopper (sm_90) on the CPU, with and without the adapter.

Triton's interpreter (``tests/test_fused_interpreter.py``) runs the kernels'
Python, not Triton's compiler, which is stricter: a ``@triton.jit``
function that returns ``None`` on one branch, for one, compiles only where
that branch is not taken. Here each launch the plugin makes (at one token
and at 16, base alone and with an r=16 adapter, bf16 and fp16) is compiled
with Triton's bundled ptxas, as ``scripts/sass_fused.py`` does, so such a
kernel fails on the CPU rather than on the device. It says nothing of speed
or results: ``tests/gpu`` and the interpreter check those.
"""

import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="requirements-dev.txt installs Triton (the CI run has it)")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
sass_fused = pytest.importorskip("sass_fused")
torch = pytest.importorskip("torch")

CASES = [
    (fmt, tokens, adapter, kernel)
    for fmt in ("bnb", "hqq", "torchao", "gptq", "awq")
    for tokens in (1, 16)
    for adapter in (True, False)
    for kernel in ((None, "gemv") if fmt == "hqq" and tokens == 1 else (None,))
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("fmt", "tokens", "adapter", "kernel"), CASES)
def test_kernel_compiles_for_hopper(fmt, tokens, adapter, kernel, dtype):
    pytest.importorskip(sass_fused.PLUGINS[fmt][0])
    fn, args, kwargs = sass_fused.capture(fmt, tokens, dtype, None, 90, kernel, adapter=adapter)
    assert kwargs["LORA"] == (1 if adapter else 0)  # the launch compiled is the one asked for
    compiled, _, _ = sass_fused.compile_launch(fn, args, kwargs, 90)
    assert compiled.asm["cubin"]  # ptxas produced a binary
