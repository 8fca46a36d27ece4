"""Every Triton kernel against the plain-PyTorch reference, on fresh random inputs.

Each check draws new inputs, poisons the allocator with NaN so an unwritten
output element shows, and compares the fast kernel and the reference with
the exact result computed in float64: the fast kernel's error must be of
the reference's own size (both round to the compute dtype).
"""

import pytest
import torch
from quantplug._kernels import lora_add_reference, lora_mixed_add_reference

DTYPES = [torch.bfloat16, torch.float16]
# (tokens, in, out, r): decode, small batches on both sides of the split-K/cuBLAS switch, odd sizes
ADD_SHAPES = [
    (1, 4096, 4096, 16),
    (1, 4096, 11008, 16),
    (16, 4096, 4096, 16),
    (3, 1000, 777, 8),
    (17, 257, 129, 1),
    (64, 64, 11008, 20),
    (65, 512, 300, 16),
    (300, 1024, 2048, 64),
]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def poison(shape, dtype):
    block = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    del block


def adapter(tokens, k, n, r, dtype, lead=()):
    x = torch.randn(*lead, tokens, k, device="cuda", dtype=dtype)
    A = (torch.randn(r, k, device="cuda") / k**0.5).to(dtype)
    B = (torch.randn(n, r, device="cuda") / r**0.5).to(dtype)
    y = (0.3 * torch.randn(*lead, tokens, n, device="cuda")).to(dtype)
    return y, x, A, B


def check_close(fast, ref, truth, dtype):
    assert fast.shape == truth.shape and fast.dtype == ref.dtype
    assert torch.isfinite(fast).all(), "NaN or inf: an output element was not written"
    ref_err = rel_err(ref, truth)
    fast_err = rel_err(fast, truth)
    floor = 4e-3 if dtype == torch.bfloat16 else 5e-4
    assert fast_err <= max(2 * ref_err, floor), (fast_err, ref_err)


def test_registered_for_cuda_half_types(triton_kernels):
    from quantplug._registry import load_plugins

    kernels = load_plugins().kernels
    for dtype in DTYPES:
        assert kernels.resolve("lora_add", "linear", "cuda", dtype).name == "triton-splitk"
        assert kernels.resolve("lora_mixed_add", "bnb", "cuda", dtype).name == "triton-bgmv"
    assert kernels.resolve("lora_add", "linear", "cuda", torch.float32).name == "reference"
    assert kernels.resolve("lora_add", "linear", "cpu", torch.bfloat16).name == "reference"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lora_add_matches_reference(triton_kernels, dtype, shape):
    tokens, k, n, r = shape
    for trial in range(2):
        y, x, A, B = adapter(tokens, k, n, r, dtype)
        scale = [2.0, 0.37][trial]
        truth = lora_add_reference(y.double(), x.double(), A.double(), B.double(), scale)
        ref = lora_add_reference(y, x, A, B, scale)
        for fn in (triton_kernels.lora_add_splitk, triton_kernels.lora_add):
            poison((tokens, n), dtype)
            check_close(fn(y, x, A, B, scale), ref, truth, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_add_every_path_on_3d_input(triton_kernels, dtype):
    # both implementations on the same inputs, whichever the dispatcher would pick, 3-D input
    y, x, A, B = adapter(7, 768, 1030, 16, dtype, lead=(3,))
    truth = lora_add_reference(y.double(), x.double(), A.double(), B.double(), 0.5)
    ref = lora_add_reference(y, x, A, B, 0.5)
    for fn in (triton_kernels.lora_add_splitk, triton_kernels.lora_add_cublas):
        poison((21, 1030), dtype)
        check_close(fn(y, x, A, B, 0.5), ref, truth, dtype)


def test_lora_add_leaves_inputs_alone_and_falls_back_for_autograd(triton_kernels):
    y, x, A, B = adapter(2, 256, 128, 8, torch.bfloat16)
    y0 = y.clone()
    triton_kernels.lora_add(y, x, A, B, 1.0)
    assert torch.equal(y, y0)
    A.requires_grad_(True)
    out = triton_kernels.lora_add(y, x, A, B, 1.0)
    out.float().sum().backward()
    assert A.grad is not None and torch.isfinite(A.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case",
    [
        # (batch rows, seq, in, out, r, adapters)
        (16, 1, 4096, 4096, 16, 8),
        (5, 3, 1000, 777, 8, 3),
        (4, 1, 257, 11008, 20, 1),
        (33, 2, 512, 300, 64, 5),
    ],
    ids=lambda c: "x".join(map(str, c)),
)
def test_lora_mixed_add_matches_reference(triton_kernels, dtype, case):
    rows_n, seq, k, n, r, count = case
    As = [(torch.randn(r, k, device="cuda") / k**0.5).to(dtype) for _ in range(count)]
    Bs = [(torch.randn(n, r, device="cuda") / r**0.5).to(dtype) for _ in range(count)]
    scales = [0.5 + i for i in range(count)]
    x = torch.randn(rows_n, seq, k, device="cuda", dtype=dtype)
    y = (0.3 * torch.randn(rows_n, seq, n, device="cuda")).to(dtype)
    rows = torch.randint(-1, count, (rows_n,), device="cuda")
    rows[0] = count - 1
    truth = lora_mixed_add_reference(
        y.double(), x.double(), [a.double() for a in As], [b.double() for b in Bs], scales, rows
    )
    ref = lora_mixed_add_reference(y, x, As, Bs, scales, rows)
    poison((rows_n * seq, n), dtype)
    fast = triton_kernels.lora_mixed_add(y, x, As, Bs, scales, rows)
    check_close(fast, ref, truth, dtype)
    base_rows = rows == -1
    assert torch.equal(fast[base_rows], y[base_rows]), "rows with no adapter must come back unchanged"


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_mixed_add_with_float32_adapters(triton_kernels, dtype):
    """gptq's and awq's adapter layers keep their adapters in float32: BGMV serves them, unrounded."""
    k, n, r, count = 1024, 768, 16, 4
    As = [torch.randn(r, k, device="cuda") / k**0.5 for _ in range(count)]
    Bs = [torch.randn(n, r, device="cuda") / r**0.5 for _ in range(count)]
    scales = [0.5 + i for i in range(count)]
    x = torch.randn(12, k, device="cuda", dtype=dtype)
    y = (0.3 * torch.randn(12, n, device="cuda")).to(dtype)
    rows = torch.tensor([i % (count + 1) - 1 for i in range(12)], device="cuda")
    truth = lora_mixed_add_reference(
        y.double(), x.double(), [a.double() for a in As], [b.double() for b in Bs], scales, rows
    )
    ref = lora_mixed_add_reference(y, x, As, Bs, scales, rows)
    poison((12, n), dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fast = triton_kernels.lora_mixed_add(y, x, As, Bs, scales, rows)
        torch.cuda.synchronize()
    assert any("_bgmv_" in e.name for e in prof.events()), "float32 adapters fell back to the reference"
    check_close(fast, ref, truth, dtype)


def test_lora_mixed_add_sees_in_place_updates(triton_kernels):
    dtype = torch.bfloat16
    As = [(torch.randn(8, 256, device="cuda") / 16).to(dtype) for _ in range(2)]
    Bs = [(torch.randn(128, 8, device="cuda") / 3).to(dtype) for _ in range(2)]
    x = torch.randn(4, 256, device="cuda", dtype=dtype)
    y = torch.randn(4, 128, device="cuda", dtype=dtype)
    rows = torch.tensor([0, 1, 1, 0], device="cuda")
    first = triton_kernels.lora_mixed_add(y, x, As, Bs, [1.0, 1.0], rows)
    with torch.no_grad():
        Bs[1].mul_(-3)  # an optimizer step does this: the cached stack must be rebuilt
    second = triton_kernels.lora_mixed_add(y, x, As, Bs, [1.0, 1.0], rows)
    ref = lora_mixed_add_reference(y, x, As, Bs, [1.0, 1.0], rows)
    assert not torch.equal(first, second)
    check_close(second, ref, lora_mixed_add_reference(
        y.double(), x.double(), [a.double() for a in As], [b.double() for b in Bs], [1.0, 1.0], rows
    ), dtype)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_layer_fast_equals_reference(triton_kernels, dtype):
    import quantplug as qp

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(1024, 768, device="cuda", dtype=dtype)

    model = qp.attach(Holder(), qp.LoraConfig(r=16, alpha=32, target_modules=["proj"], init="random"))
    qp.attach(model, qp.LoraConfig(r=8, alpha=8, target_modules=["proj"], init="random"), adapter="other")
    layer = model.proj
    for tokens in (1, 16, 200):
        x = torch.randn(2, tokens, 1024, device="cuda", dtype=dtype)
        names = ["default", "other"]
        with torch.no_grad():
            fast = layer(x)
            fast_mixed = layer(x, adapter_names=names)
            qp.use_reference_kernels(True)
            try:
                ref = layer(x)
                ref_mixed = layer(x, adapter_names=names)
            finally:
                qp.use_reference_kernels(False)
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        assert rel_err(fast, ref) < tol
        assert rel_err(fast_mixed, ref_mixed) < tol
