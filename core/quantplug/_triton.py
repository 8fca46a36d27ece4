"""Triton kernels for the LoRA ops on CUDA, in bf16 and fp16.

Registered by :mod:`quantplug._builtin` for device ``"cuda"`` only when a
CUDA device and Triton are both importable; nothing here is imported
otherwise. Each function has exactly the signature of its op in
:mod:`quantplug._kernels`, and falls back to the reference for any call it
was not written for (autograd, mixed dtypes, CPU tensors), so registering
it never changes a result beyond rounding.

``lora_add``
    Up to :data:`SPLITK_MAX_TOKENS` tokens (decode, small batches), when the
    call is being captured in a CUDA graph or compiled: two short launches
    (:func:`lora_add_splitk`). The shrink ``x @ A.T`` is split over about 32
    slices of the input dimension, so every SM reads its slice of ``A`` at
    once, into a float32 scratch of ``32 x r`` per row; the expand kernel sums
    the slices, rounds them to the compute dtype as the reference does,
    multiplies by its block of ``B`` and adds into its block of ``y``, which
    makes one round trip. On an H100 at r=16 this takes about 4 us of GPU
    time against 9 us for cuBLAS' two products and 10.5 us for the
    reference's five kernels (``scripts/tune_triton.py``). A single-launch
    variant that recomputed the whole shrink in every program took 7-15 us
    (each program's serial read of all of ``A`` is latency-bound) and was
    dropped. Run eagerly, or above that many tokens, the
    op takes cuBLAS' ``x @ A.T`` then ``addmm(y, ., B.T, alpha=scale)``: at
    decode an eager step waits on the host, and two ATen calls cost the host
    less than two Triton launches from Python.

``lora_linear``
    The base layer's call and the first adapter together: captured in a CUDA
    graph with few tokens, the split-K shrink runs on a side stream beside
    the base layer (the base GEMV of a decode step leaves most SMs idle), and
    only the expand-and-add waits for both. Otherwise the base, then
    ``lora_add``.

``lora_mixed_add``
    BGMV-style (Punica's batched gather matrix-vector product): all rows,
    all adapters, two launches (shrink into a float32 workspace of
    ``tokens x r``, then expand-and-add), whatever the number of adapters.
    The adapters are stacked into ``(n, r, in)`` / ``(n, out, r)`` tensors;
    the stacks are cached per adapter set and rebuilt when any adapter
    tensor is modified in place (its ``_version`` moves, as an optimizer
    step does) or replaced.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from quantplug._grid import cdiv, next_power_of_2
from quantplug._kernels import lora_add_reference, lora_mixed_add_reference

DTYPES = (torch.bfloat16, torch.float16)
# At and below this many tokens (decode, small batches) the split-K kernels beat
# cuBLAS' two products on the GPU; above it the shrink is a real matrix product.
SPLITK_MAX_TOKENS = 64


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _fast_ok(y, x, tensors) -> bool:
    dtype = y.dtype
    return (
        y.is_cuda
        and dtype in DTYPES
        and x.dtype == dtype
        and all(t.dtype == dtype and t.is_cuda for t in tensors)
        and not _needs_grad(y, x, *tensors)
    )


# --------------------------------------------------------------------------
# lora_add: split-K shrink, then expand + add
# --------------------------------------------------------------------------


@triton.jit
def _shrink_splitk_kernel(
    x_ptr, a_ptr, part_ptr,
    M, K, R,
    stride_xm, stride_ar,
    K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    # partial shrink of one slice of the input dimension: part[m, split, :] = x[m, slice] @ A[:, slice].T
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    r_mask = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        kk = pid_s * K_PER_SPLIT + k0 + rk
        k_mask = kk < K
        xt = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        at = tl.load(
            a_ptr + rr[:, None] * stride_ar + kk[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0
        )
        acc = tl.dot(xt, tl.trans(at), acc)
    offs = rm[:, None] * (BLOCK_S * BLOCK_R) + pid_s * BLOCK_R + rr[None, :]
    tl.store(part_ptr + offs, acc, mask=m_mask[:, None])


@triton.jit
def _expand_splitk_kernel(
    y_ptr, part_ptr, b_ptr, out_ptr,
    M, N, R, SPLITS, scale,
    stride_ym, stride_bn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # sum the partial shrinks, round as the reference does, expand against this block of B, add to y
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rs = tl.arange(0, BLOCK_S)
    rr = tl.arange(0, BLOCK_R)
    m_mask = rm < M
    r_mask = rr < R
    offs = rm[:, None, None] * (BLOCK_S * BLOCK_R) + rs[None, :, None] * BLOCK_R + rr[None, None, :]
    parts = tl.load(part_ptr + offs, mask=m_mask[:, None, None] & (rs < SPLITS)[None, :, None], other=0.0)
    t = tl.sum(parts, axis=1).to(out_ptr.dtype.element_ty)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    bt = tl.load(
        b_ptr + rn[None, :] * stride_bn + rr[:, None], mask=r_mask[:, None] & n_mask[None, :], other=0.0
    )
    delta = tl.dot(t, bt) * scale
    mn_mask = m_mask[:, None] & n_mask[None, :]
    yt = tl.load(y_ptr + rm[:, None] * stride_ym + rn[None, :], mask=mn_mask, other=0.0)
    out = yt.to(tl.float32) + delta.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mn_mask)


def _splitk_shrink(shrink, x, A):
    """Launch the partial shrinks of ``x @ A.T``: float32 partials ``(rows, slices, r)`` and their layout."""
    K = x.shape[-1]
    R = A.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    A = A.contiguous()
    M = x2.shape[0]
    # about 32 slices of the input dimension, each at least 128 wide
    k_per_split = max(128, next_power_of_2(cdiv(K, 32)))
    splits = cdiv(K, k_per_split)
    block_s = next_power_of_2(splits)
    block_r = _pow2_at_least(R, 16)
    m_blocks = cdiv(M, 16)
    part = torch.empty((m_blocks * 16, block_s, block_r), device=x.device, dtype=torch.float32)
    shrink[(splits, m_blocks)](
        x2, A, part, M, K, R, x2.stride(0), A.stride(0),
        K_PER_SPLIT=k_per_split, BLOCK_M=16, BLOCK_K=min(k_per_split, 256), BLOCK_R=block_r, BLOCK_S=block_s,
        num_warps=4,
    )  # fmt: skip
    return part, (M, R, splits, m_blocks, block_r, block_s)


def _splitk_expand(expand, y, part, layout, B, scale):
    """Sum the partials, expand against ``B`` and add to ``y``: a new tensor shaped like ``y``."""
    M, R, splits, m_blocks, block_r, block_s = layout
    N = y.shape[-1]
    y2 = y.reshape(-1, N).contiguous()
    B = B.contiguous()
    out = torch.empty((M, N), device=y.device, dtype=y.dtype)
    block_n = 64 if N <= 4096 else 128
    expand[(m_blocks, cdiv(N, block_n))](
        y2, part, B, out, M, N, R, splits, scale, y2.stride(0), B.stride(0), out.stride(0),
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_S=block_s, num_warps=4,
    )  # fmt: skip
    return out.view(y.shape)


def _launch_splitk(shrink, expand, y, x, A, B, scale):
    part, layout = _splitk_shrink(shrink, x, A)
    return _splitk_expand(expand, y, part, layout, B, scale)


def lora_add_splitk(y, x, A, B, scale):
    """Two short launches: the shrink split over ~32 slices of the input dimension (all SMs read A
    at once), then expand-and-add summing the slices. The GPU's fastest path for few tokens."""
    return _launch_splitk(_shrink_splitk_kernel, _expand_splitk_kernel, y, x, A, B, float(scale))


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, next_power_of_2(n))


def lora_add_cublas(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float
) -> torch.Tensor:
    """Two cuBLAS products, the second accumulating into ``y`` (many tokens)."""
    K = x.shape[-1]
    N = y.shape[-1]
    shrunk = x.reshape(-1, K) @ A.T
    return torch.addmm(y.reshape(-1, N), shrunk, B.T, alpha=scale).view(y.shape)


def lora_add(y, x, A, B, scale):
    """The registered ``lora_add`` for CUDA: split-K Triton kernels when few tokens are captured in a
    CUDA graph or compiled, cuBLAS otherwise (cheapest on the host; see the module doc)."""
    dtype = y.dtype
    if x.dtype != dtype or A.dtype != dtype or B.dtype != dtype or not y.is_cuda:
        return lora_add_reference(y, x, A, B, scale)
    width = x.shape[-1]
    if (
        width
        and x.numel() // width <= SPLITK_MAX_TOKENS
        and (_compiling() or torch.cuda.is_current_stream_capturing())
        and not _needs_grad(y, x, A, B)
    ):
        if _compiling():  # the custom op, which inductor sees into
            return _lora_add_splitk_op(y, x, A, B, float(scale))
        return lora_add_splitk(y, x, A, B, scale)
    # Eager: two ATen calls cost the host less than two Triton launches (measured on an H100
    # host, 2026-11-25: ~60 us for this path vs ~100 us for the two launches from Python), and
    # at decode an eager step waits on the host, not the GPU. Autograd works through it.
    return lora_add_cublas(y, x, A, B, scale)


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _side_streams.get(device)
    if stream is None:
        stream = _side_streams[device] = torch.cuda.Stream(device=device)
    return stream


def lora_linear(base, x, xa, A, B, scale):
    """The registered ``lora_linear`` for CUDA. Captured in a CUDA graph with few tokens, the adapter's
    split-K shrink runs on a side stream while the base layer runs, and only the expand-and-add waits
    for both: on replay the two branches run at once. Otherwise the base, then :func:`lora_add`."""
    width = xa.shape[-1]
    if not (
        not _compiling()  # first: dynamo cannot trace is_current_stream_capturing()
        and torch.cuda.is_current_stream_capturing()
        and xa.is_cuda
        and xa.dtype in DTYPES
        and A.dtype == xa.dtype
        and B.dtype == xa.dtype
        and width
        and xa.numel() // width <= SPLITK_MAX_TOKENS
        and not _needs_grad(xa, A, B)
    ):
        return lora_add(base(x), xa, A, B, scale)
    main = torch.cuda.current_stream(xa.device)
    side = _side_stream(xa.device)
    side.wait_stream(main)  # xa is ready; the next layer's side work also waits for this layer's expand
    with torch.cuda.stream(side):
        part, layout = _splitk_shrink(_shrink_splitk_kernel, xa, A)
    y = base(x)
    main.wait_stream(side)
    if y.dtype != xa.dtype or not y.is_cuda or _needs_grad(y):
        return lora_add(y, xa, A, B, scale)
    return _splitk_expand(_expand_splitk_kernel, y, part, layout, B, float(scale))


# --------------------------------------------------------------------------
# lora_mixed_add: BGMV shrink / expand over stacked adapters
# --------------------------------------------------------------------------


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, idx_ptr, ws_ptr,
    K, R, SEQ,
    stride_xm, stride_an, stride_ar,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    adapter = tl.load(idx_ptr + t // SEQ)
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if adapter >= 0:
        rk = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_mask = kk < K
            xv = tl.load(x_ptr + t * stride_xm + kk, mask=k_mask, other=0.0).to(tl.float32)
            at = tl.load(
                a_ptr + adapter * stride_an + rr[:, None] * stride_ar + kk[None, :],
                mask=r_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            acc += at.to(tl.float32) * xv[None, :]
    tl.store(ws_ptr + t * BLOCK_R + rr, tl.sum(acc, axis=1))


@triton.jit
def _bgmv_expand_kernel(
    y_ptr, ws_ptr, b_ptr, idx_ptr, scale_ptr, out_ptr,
    N, R, SEQ,
    stride_ym, stride_bn_adapter, stride_bn, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    adapter = tl.load(idx_ptr + t // SEQ)
    yv = tl.load(y_ptr + t * stride_ym + rn, mask=n_mask, other=0.0)
    if adapter >= 0:
        rr = tl.arange(0, BLOCK_R)
        r_mask = rr < R
        # the reference rounds x @ A.T to the adapter's dtype (the compute dtype, or float32) before the expand
        s = tl.load(ws_ptr + t * BLOCK_R + rr).to(b_ptr.dtype.element_ty).to(tl.float32)
        bt = tl.load(
            b_ptr + adapter * stride_bn_adapter + rn[:, None] * stride_bn + rr[None, :],
            mask=n_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        delta = tl.sum(bt.to(tl.float32) * s[None, :], axis=1) * tl.load(scale_ptr + adapter)
        yv = (yv.to(tl.float32) + delta.to(y_ptr.dtype.element_ty).to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(out_ptr + t * stride_om + rn, yv, mask=n_mask)


class _StackCache:
    """Stacked adapter tensors per adapter set, rebuilt when any adapter changes.

    Keyed by the tensors' ids; an entry is valid while every tensor is
    still alive (weak references), is the same object, has the same storage
    and the same in-place version counter.
    """

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self.entries: dict[tuple, tuple] = {}

    @staticmethod
    def _stamp(tensors) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def get(self, As, Bs, scales, device):
        tensors = (*As, *Bs)
        key = (*(id(t) for t in tensors), *scales)
        entry = self.entries.get(key)
        if entry is not None:
            refs, stamp, stacked = entry
            if all(r() is t for r, t in zip(refs, tensors)) and stamp == self._stamp(tensors):
                return stacked
        stacked = (
            torch.stack([a.detach() for a in As]).contiguous(),
            torch.stack([b.detach() for b in Bs]).contiguous(),
            torch.tensor(list(scales), dtype=torch.float32, device=device),
        )
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = ([weakref.ref(t) for t in tensors], self._stamp(tensors), stacked)
        return stacked


_stacks = _StackCache()


# best of scripts/tune_triton.py's sweep on an H100, 16 rows x 8 adapters (2026-11-25)
BGMV_CONFIG = {"SHRINK_BLOCK_K": 1024, "shrink_warps": 8, "EXPAND_BLOCK_N": 128, "expand_warps": 4}


def lora_mixed_add_bgmv(y, x, A_stack, B_stack, scales, rows, config=None):
    """Two launches for any number of adapters: ``A_stack`` ``(n, r, in)``, ``B_stack`` ``(n, out, r)``,
    ``scales`` a float32 tensor ``(n,)``, ``rows`` one adapter index (or -1) per leading row."""
    K = x.shape[-1]
    N = y.shape[-1]
    R = A_stack.shape[1]
    x2 = x.reshape(-1, K).contiguous()
    y2 = y.reshape(-1, N).contiguous()
    T = x2.shape[0]
    out = torch.empty((T, N), device=y.device, dtype=y.dtype)
    if T == 0:
        return out.view(y.shape)
    seq = T // rows.shape[0]
    BLOCK_R = _pow2_at_least(R, 16)
    ws = torch.empty((T, BLOCK_R), device=y.device, dtype=torch.float32)
    idx = rows.to(device=y.device, dtype=torch.int32)
    config = {**BGMV_CONFIG, **(config or {})}
    _bgmv_shrink_kernel[(T,)](
        x2, A_stack, idx, ws, K, R, seq, x2.stride(0), A_stack.stride(0), A_stack.stride(1),
        BLOCK_K=config["SHRINK_BLOCK_K"], BLOCK_R=BLOCK_R, num_warps=config["shrink_warps"],
    )  # fmt: skip
    BLOCK_N = config["EXPAND_BLOCK_N"]
    _bgmv_expand_kernel[(T, cdiv(N, BLOCK_N))](
        y2, ws, B_stack, idx, scales, out, N, R, seq, y2.stride(0), B_stack.stride(0), B_stack.stride(1),
        out.stride(0), BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, num_warps=config["expand_warps"],
    )  # fmt: skip
    return out.view(y.shape)


def lora_mixed_add(y, x, As, Bs, scales, rows):
    """The registered ``lora_mixed_add`` for CUDA: BGMV over the cached adapter stacks."""
    # adapters in the compute dtype or in float32 (gptq's and awq's layers keep theirs in float32), all alike
    adapters = (*As, *Bs)
    if (
        not As
        or not _fast_ok(y, x, ())
        or len({t.dtype for t in adapters}) != 1
        or As[0].dtype not in (y.dtype, torch.float32)
        or not all(t.is_cuda for t in adapters)
        or _needs_grad(*adapters)
        or len({tuple(a.shape) for a in As}) != 1
        or len({tuple(b.shape) for b in Bs}) != 1
        or rows.dim() != 1
        or rows.shape[0] == 0
        or (x.numel() // max(x.shape[-1], 1)) % rows.shape[0]
    ):
        return lora_mixed_add_reference(y, x, As, Bs, scales, rows)
    A_stack, B_stack, scale_t = _stacks.get(As, Bs, [float(s) for s in scales], y.device)
    return lora_mixed_add_bgmv(y, x, A_stack, B_stack, scale_t, rows)


# --------------------------------------------------------------------------
# torch.compile: the split-K kernels as a custom op inductor can see into
# --------------------------------------------------------------------------


def _make_ops():
    triton_op = getattr(torch.library, "triton_op", None)
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    if triton_op is None or wrap_triton is None:  # torch < 2.6: plain call, dynamo traces the launch itself
        return lora_add_splitk

    @triton_op("quantplug::lora_add_splitk", mutates_args=())
    def splitk(
        y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return _launch_splitk(
            wrap_triton(_shrink_splitk_kernel), wrap_triton(_expand_splitk_kernel), y, x, A, B, scale
        )

    return splitk


try:
    _lora_add_splitk_op = _make_ops()
except Exception:  # a torch whose custom-op API differs: the plain launch still works eagerly
    _lora_add_splitk_op = lora_add_splitk


def register(register) -> None:
    """Register the kernels above (``register`` is a :class:`quantplug._kernels.KernelRegister`)."""
    register.kernel("lora_add", lora_add, name="triton-splitk", device="cuda", dtypes=DTYPES, priority=10)
    register.kernel(
        "lora_mixed_add", lora_mixed_add, name="triton-bgmv", device="cuda", dtypes=DTYPES, priority=10
    )
    register.kernel(
        "lora_linear", lora_linear, name="triton-overlap", device="cuda", dtypes=DTYPES, priority=10
    )
