"""Run the plugins' fused quantized-GEMV + LoRA Triton kernels on the CPU through Triton's interpreter.

    TRITON_INTERPRET=1 PYTHONPATH=<a Triton install> python scripts/check_fused_cpu.py [bnb hqq torchao gptq awq]

A correctness check that needs no GPU (slow: a few small shapes): each
kernel against the layer's dense weight from the plugin's own
``quantplug_dequantize``, in float64. The GPU tests (tests/gpu) are the real check.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"

import quantplug as qp  # noqa: E402
import torch  # noqa: E402
from quantplug._registry import hook  # noqa: E402

torch.manual_seed(0)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(backend, variant, fused, N, K, M, R, dtype, bias=True, KA=None, kernel=None):
    linear = torch.nn.Linear(K, N, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    base = qp.quantize(linear, backend, variant)
    W = hook().quantplug_dequantize(module=base, backend=backend).double()
    KA = KA or K
    x = torch.randn(M, K, dtype=dtype)
    xa = x if KA == K else torch.randn(M, KA, dtype=dtype)
    A = (torch.randn(R, KA) / KA**0.5).to(dtype)
    B = (torch.randn(N, R) / R**0.5).to(dtype)
    truth = x.double() @ W.T + 2.0 * (xa.double() @ A.double().T) @ B.double().T
    if bias:
        truth += base.bias.double() if torch.is_tensor(base.bias) else 0
    results = []
    split = (16, 64, 4, 1, 3)  # split-K over (up to) three slices of 64-wide blocks
    configs = ((0, None), (1, None), (2, None), (0, split), (1, split), (2, split))
    choice = {"kernel": kernel} if kernel else {}  # a plugin's one-token kernel (hqq: "gemv", "word", "mma")
    for mode, config in configs:
        if mode:
            out = fused(base, x, xa, A, B, 2.0, lora_mode=mode, config=config, force=True, **choice)
        else:
            out = fused(base, x, None, None, None, 0.0, config=config, force=True, **choice)
        assert out is not None, f"{backend} did not serve N={N} K={K} M={M}"
        want = truth if mode else truth - 2.0 * (xa.double() @ A.double().T) @ B.double().T
        results.append(rel(out, want))
    ok = all(e < (2e-2 if dtype == torch.bfloat16 else 3e-3) for e in results)
    print(
        f"{backend} {variant}{f' ({kernel})' if kernel else ''} {dtype} N={N} K={K} M={M} R={R}: errors {' '.join(f'{e:.1e}' for e in results)} {'ok' if ok else 'FAIL'}"
    )
    return ok


def check_hqq_word_fallback():
    """hqq's default one-token kernel (the word GEMV) on a W_q it cannot read as words (not 4-byte aligned):
    asked for by name it declines; by default the float32 GEMV serves, bit for bit as when asked for."""
    from quantplug_hqq._cuda_kernels import fused_lora_linear as fused

    linear = torch.nn.Linear(256, 48, bias=True, dtype=torch.float16)
    base = qp.quantize(linear, "hqq", "4bit-g64")
    shifted = torch.empty(base.W_q.numel() + 1, dtype=torch.uint8)[1:].view(base.W_q.shape)
    shifted.copy_(base.W_q)
    base.W_q = torch.nn.Parameter(shifted, requires_grad=False)
    x = torch.randn(1, 256, dtype=torch.float16)
    A, B = torch.randn(4, 256, dtype=torch.float16) / 16, torch.randn(48, 4, dtype=torch.float16) / 2
    declined = fused(base, x, x, A, B, 2.0, force=True, kernel="word") is None
    default = fused(base, x, x, A, B, 2.0, force=True)
    gemv = fused(base, x, x, A, B, 2.0, force=True, kernel="gemv")
    ok = declined and default is not None and torch.equal(default, gemv)
    print(
        f"hqq word GEMV on a misaligned W_q: declined {declined}, default is the float32 GEMV {'ok' if ok else 'FAIL'}"
    )
    return ok


def check_bnb_eager_one_token_base():
    """bnb leaves one token's base alone to bitsandbytes outside a CUDA-graph capture (never one here):
    served on the layer's first such call (the warm-up loads the kernel for a later capture), then
    declined unasked; served when forced, with the adapter, or at two tokens."""
    from quantplug_bnb._cuda_kernels import fused_lora_linear as fused

    base = qp.quantize(torch.nn.Linear(256, 48, dtype=torch.float16), "bnb", "nf4")
    A, B = torch.randn(4, 256, dtype=torch.float16) / 16, torch.randn(48, 4, dtype=torch.float16) / 2
    one, two = torch.randn(1, 256, dtype=torch.float16), torch.randn(2, 256, dtype=torch.float16)
    first = fused(base, one, None, None, None, 0.0)
    declined = fused(base, one, None, None, None, 0.0) is None
    served = [
        first,
        fused(base, one, None, None, None, 0.0, force=True),
        fused(base, one, one, A, B, 2.0),
        fused(base, two, None, None, None, 0.0),
    ]
    ok = declined and all(y is not None for y in served)
    print(
        f"bnb one token's base alone left to the library eagerly: declined {declined} {'ok' if ok else 'FAIL'}"
    )
    return ok


def main(backends):
    ok = True
    for backend in backends:
        if backend == "bnb":
            from quantplug_bnb._cuda_kernels import fused_lora_linear as fused

            for variant, (N, K, M, R), dtype in [
                ("nf4", (48, 256, 1, 4), torch.float16),
                ("nf4", (40, 192, 1, 4), torch.float16),  # one token, K not a multiple of BLOCK_K
                ("nf4", (40, 512, 3, 16), torch.float16),
                ("fp4", (64, 256, 9, 8), torch.float16),
                ("nf4", (33, 128, 2, 1), torch.float16),  # bf16: the interpreter's bf16 dot is wrong
            ]:
                ok &= check(backend, variant, fused, N, K, M, R, dtype)
            ok &= check_bnb_eager_one_token_base()
        elif backend == "hqq":
            from quantplug_hqq._cuda_kernels import fused_lora_linear as fused

            for N, K, M, R in [(48, 256, 1, 4), (38, 192, 1, 4), (64, 512, 5, 16), (34, 128, 2, 2)]:
                ok &= check(backend, "4bit-g64", fused, N, K, M, R, torch.float16)
            for N, K in [(48, 256), (38, 192)]:  # one token: the float32 GEMV (the word GEMV serves above)
                ok &= check(backend, "4bit-g64", fused, N, K, 1, 4, torch.float16, kernel="gemv")
            ok &= check_hqq_word_fallback()
        elif backend == "torchao":
            from quantplug_torchao._cuda_kernels import fused_lora_linear as fused

            for N, K, M, R in [(48, 256, 1, 4), (33, 96, 1, 2), (64, 512, 5, 16), (33, 96, 2, 2)]:
                ok &= check(backend, "int8wo", fused, N, K, M, R, torch.float16)
        elif backend == "gptq":
            from quantplug_gptqmodel.gptq._cuda_kernels import fused_lora_linear as fused

            for variant, (N, K, M, R) in [
                ("int4-g128-sym", (48, 512, 1, 4)),
                ("int4-g32-asym", (40, 256, 1, 4)),  # several groups a step; out not a multiple of 8
                ("int4-g128-asym", (64, 384, 5, 16)),  # the last step runs past the row
                ("int4-g32-sym", (33, 256, 2, 2)),
            ]:
                ok &= check(backend, variant, fused, N, K, M, R, torch.float16)
        elif backend == "awq":
            from quantplug_gptqmodel.awq._cuda_kernels import fused_lora_linear as fused

            for variant, (N, K, M, R) in [
                ("int4-g128-asym", (48, 512, 1, 4)),
                ("int4-g32-asym", (40, 256, 1, 4)),  # several groups a step
                ("int4-g128-sym", (56, 384, 1, 2)),  # the last step runs past the row
                ("int4-g64-asym", (64, 384, 5, 16)),
                ("int4-gall-asym", (32, 256, 2, 2)),  # one group: the whole row
            ]:
                ok &= check(backend, variant, fused, N, K, M, R, torch.float16)
    return ok


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:] or ["bnb", "hqq", "torchao", "gptq", "awq"]) else 1)
