"""Fused 4-bit GEMV + LoRA for bitsandbytes ``Linear4bit`` on CUDA (Triton), for 1-16 tokens.

Registered for the op ``fused_lora_linear`` (backend ``bnb``, device
``cuda``, bf16/fp16) by this plugin's ``quantplug_register_kernels`` when
Triton and a CUDA device are there; nothing here is imported otherwise.

What it reads: bitsandbytes' own storage, untouched (no repack): the packed
``weight`` (two 4-bit codes per byte, the first element in the high
nibble, row-major over the ``(out, in)`` weight), ``quant_state.code`` (the
16-entry NF4 or FP4 table), ``quant_state.absmax`` (float32 per block of
``blocksize`` elements, or, nested, uint8 codes into ``state2.code`` times
``state2.absmax`` per 256 blocks, plus ``offset``), and the bias. Each
program dequantizes its ``BLOCK_N`` rows in registers (code lookup times
absmax in float32, as ``dequantize_4bit`` does) and multiplies them by the
1-16 input rows it holds.

The adapter: the shrink ``xa @ A.T`` runs as its own short launch (about
32 programs, one slice of the input each, into a float32 scratch) before the
GEMV (``LORA=1``), and each GEMV program expands its rows (``t @ B.T``) and
adds them before it stores. :data:`ONE_LAUNCH` puts the shrink in the same
launch instead (``LORA=2``): the first ``SPLITS`` programs to start (a ticket
from an atomic counter, so they are always running, never waiting) compute
the slices, and the GEMV programs wait for their counter before the expand;
the last program out resets the counters. Measured slower on the H200 (the
atomics cost more than the launch), so it is off. The counters belong to the
layer (a small int32 tensor per layer, made on its first eager call; one
layer never runs on two streams at once). Split-K (``SPLITK`` in
:data:`CONFIGS`): each row block's input range is split over programs that
store float32 partial sums; the last to arrive (a per-row-block counter,
reset by it) sums them and runs the epilogue. A layer first called under
CUDA-graph capture has no counters yet and runs unsplit.

It serves a call only when it can reproduce the layer's forward: CUDA
tensors in bf16/fp16 matching the layer's compute dtype, no autograd, at
most :data:`MAX_TOKENS` rows, rank at most :data:`MAX_RANK`, ``in_features``
a multiple of the blocksize, a ``Params4bit`` not repacked for bitsandbytes'
CPU kernel; otherwise it returns ``None`` and the core takes the library's
own forward plus ``lora_linear``. Under ``torch.compile`` it also returns
``None`` (the core's compiled path serves).
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

DTYPES = (torch.bfloat16, torch.float16)
MAX_TOKENS = 16
MAX_RANK = 64
# The adapter's shrink inside the GEMV launch (LORA=2) rather than as its own launch before it (LORA=1).
# Off: on an H200 the ticket and counter atomics cost more than the extra launch (docs/performance.md).
ONE_LAUNCH = False

# (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLITK) per token block (1: FMA; 2-16: tensor cores),
# from scripts/tune_fused.py's sweep on an H200 (2026-12-04).
CONFIGS = {
    1: (16, 1024, 4, 1, 1),
    16: (32, 128, 4, 1, 4),
}
# Whether the layer's forward uses this kernel. Off: on an H200 (bitsandbytes 0.50.2, Triton 3.6) it is
# slower than bitsandbytes' own GEMV (4096x4096, 1 token: 19.6 us against 10.7 us; two code-table
# lookups per byte keep it ALU-bound, docs/performance.md), so the library's forward plus the core's
# lora_linear serve, and the plugin does not register it (set this before plugins load to try it).
# ``fused_lora_linear(..., force=True)`` still runs it (tests, tuning).
SERVE = False


def _token_block(m: int) -> int:
    # 2-16 tokens on tensor cores: the FMA path at 4 tokens took 2-3x its 16-token time (H200)
    return 1 if m == 1 else 16


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _shrink_slice(
    xa_ptr, a_ptr, part_ptr, s, M, KA, R, stride_xam, stride_ar,
    K_PER_SPLIT: tl.constexpr, SHRINK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # part[s, m, :] = xa[m, slice s] @ A[:, slice s].T for the (up to) 16 rows, float32
    rm = tl.arange(0, 16)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, SHRINK_K)
    acc = tl.zeros((16, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, SHRINK_K):
        kk = s * K_PER_SPLIT + k0 + rk
        k_mask = kk < KA
        xt = tl.load(
            xa_ptr + rm[:, None] * stride_xam + kk[None, :],
            mask=(rm < M)[:, None] & k_mask[None, :],
            other=0.0,
        )
        at = tl.load(
            a_ptr + rr[:, None] * stride_ar + kk[None, :], mask=(rr < R)[:, None] & k_mask[None, :], other=0.0
        )
        acc = tl.dot(xt.to(at.dtype), tl.trans(at), acc)  # float32 adapters (fp16 layers): tf32
    tl.store(part_ptr + s * (16 * BLOCK_R) + rm[:, None] * BLOCK_R + rr[None, :], acc)


@triton.jit
def _shrink_kernel(
    xa_ptr, a_ptr, part_ptr, M, KA, R, stride_xam, stride_ar,
    K_PER_SPLIT: tl.constexpr, SHRINK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    _shrink_slice(
        xa_ptr,
        a_ptr,
        part_ptr,
        tl.program_id(0),
        M,
        KA,
        R,
        stride_xam,
        stride_ar,
        K_PER_SPLIT,
        SHRINK_K,
        BLOCK_R,
    )


@triton.jit
def _lora_epilogue(
    base, rm, rn_safe, part_ptr, b_ptr, R, scale, stride_bn, sync_ptr,
    LORA: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    USE_DOT: tl.constexpr,
):  # fmt: skip
    # base (BLOCK_M, BLOCK_N) in the output dtype; returns base + scale * t @ B[rows].T rounded as the reference
    if LORA == 2:  # wait for the shrink programs (they started first and never wait)
        done = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
        while done < SPLITS:
            done = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
        tl.debug_barrier()
    rs = tl.arange(0, BLOCK_S)
    rr = tl.arange(0, BLOCK_R)
    parts = tl.load(
        part_ptr + rs[:, None, None] * (16 * BLOCK_R) + rm[None, :, None] * BLOCK_R + rr[None, None, :],
        mask=(rs < SPLITS)[:, None, None],
        other=0.0,
        cache_modifier=".cg",
    )
    bt = tl.load(b_ptr + rn_safe[:, None] * stride_bn + rr[None, :], mask=(rr < R)[None, :], other=0.0)
    t = tl.sum(parts, axis=0).to(bt.dtype)  # the reference rounds x @ A.T to the adapter's dtype
    if USE_DOT:
        delta = tl.dot(t, tl.trans(bt))
    else:
        delta = tl.sum(t.to(tl.float32)[:, None, :] * bt.to(tl.float32)[None, :, :], axis=2)
    return (base.to(tl.float32) + (delta * scale).to(base.dtype).to(tl.float32)).to(base.dtype)


@triton.jit
def _finish(sync_ptr, LORA: tl.constexpr):
    if LORA == 2:  # the last program out resets the counters for the next call / graph replay
        out = tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel")
        if out == tl.num_programs(0) - 1:
            tl.atomic_xchg(sync_ptr, 0)
            tl.atomic_xchg(sync_ptr + 1, 0)
            tl.atomic_xchg(sync_ptr + 2, 0)


@triton.jit
def _nf4_lora_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, abs2_ptr, code2_ptr, offset_ptr, bias_ptr,
    xa_ptr, a_ptr, b_ptr, part_ptr, sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS,
    stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr, SHRINK_K: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr, SPLITK: tl.constexpr,
):  # fmt: skip
    if LORA == 2:  # noqa: SIM108  (two statements read clearer in a kernel)
        ticket = tl.atomic_add(sync_ptr, 1)
    else:
        ticket = tl.program_id(0) + SPLITS
    if ticket < SPLITS:  # only ever true in one launch (LORA == 2): this program computes a shrink slice
        if LORA == 2:
            _shrink_slice(
                xa_ptr,
                a_ptr,
                part_ptr,
                ticket,
                M,
                KA,
                R,
                stride_xam,
                stride_ar,
                K_PER_SPLIT,
                SHRINK_K,
                BLOCK_R,
            )
            tl.debug_barrier()
            tl.atomic_add(sync_ptr + 1, 1, sem="release")
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        G: tl.constexpr = BLOCK_K // BS
        row_block = (ticket - SPLITS) % GRID_N
        split = (ticket - SPLITS) // GRID_N
        rn = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rn_safe = tl.where(n_mask, rn, 0)
        rm = tl.arange(0, BLOCK_M)
        m_mask = rm < M
        rj = tl.arange(0, HALF)
        rk = tl.arange(0, BLOCK_K)
        rg = tl.arange(0, G)
        row_bytes = rn_safe.to(tl.int64) * (K // 2)
        row_groups = rn_safe.to(tl.int64) * (K // BS)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(split * KS, tl.minimum(K, split * KS + KS), BLOCK_K):
            g = row_groups[:, None] + (k0 // BS + rg)[None, :]
            if EVEN_K:
                packed = tl.load(w_ptr + row_bytes[:, None] + (k0 // 2 + rj)[None, :])
                xt = tl.load(
                    x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_mask[:, None], other=0.0
                )
                g_mask = (rg < G)[None, :]  # all true: folded away
            else:  # the last block runs past the row: masked codes meet masked (zero) inputs
                packed = tl.load(
                    w_ptr + row_bytes[:, None] + (k0 // 2 + rj)[None, :],
                    mask=(k0 // 2 + rj < K // 2)[None, :],
                    other=0,
                )
                xt = tl.load(
                    x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :],
                    mask=m_mask[:, None] & (k0 + rk < K)[None, :],
                    other=0.0,
                )
                g_mask = (k0 // BS + rg < K // BS)[None, :]
            hi = tl.load(code_ptr + (packed >> 4).to(tl.int32))
            lo = tl.load(code_ptr + (packed & 15).to(tl.int32))
            if NESTED:
                q = tl.load(absmax_ptr + g, mask=g_mask, other=0).to(tl.int32)
                absmax = tl.load(code2_ptr + q) * tl.load(abs2_ptr + g // BS2, mask=g_mask, other=0.0)
                absmax += tl.load(offset_ptr)
            else:
                absmax = tl.load(absmax_ptr + g, mask=g_mask, other=0.0)
            hi = tl.reshape(tl.reshape(hi, (BLOCK_N, G, BS // 2)) * absmax[:, :, None], (BLOCK_N, HALF))
            lo = tl.reshape(tl.reshape(lo, (BLOCK_N, G, BS // 2)) * absmax[:, :, None], (BLOCK_N, HALF))
            x_even, x_odd = tl.split(tl.reshape(xt, (BLOCK_M, HALF, 2)))
            if USE_DOT:  # dequantized tile rounded to the compute dtype, as dequantize_4bit returns it
                acc = tl.dot(x_even, tl.trans(hi.to(xt.dtype)), acc)
                acc = tl.dot(x_odd, tl.trans(lo.to(xt.dtype)), acc)
            else:  # reduced every block: few live registers, so the block (bytes in flight) can be large
                part = (
                    hi[None, :, :] * x_even.to(tl.float32)[:, None, :]
                    + lo[None, :, :] * x_odd.to(tl.float32)[:, None, :]
                )
                acc += tl.sum(part, axis=2)
        if SPLITK > 1:  # split-K: partial sums to a workspace; the last split of this row block finishes
            tl.store(
                ws_ptr + rm[:, None] * N + (rn_safe)[None, :] + split * (BLOCK_M * N),
                acc,
                mask=n_mask[None, :],
            )
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + row_block, 1, sem="acq_rel")
            last = arrived == SPLITK - 1
        else:
            last = True
        if last:
            if SPLITK > 1:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in tl.static_range(SPLITK):
                    acc += tl.load(
                        ws_ptr + rm[:, None] * N + (rn_safe)[None, :] + s * (BLOCK_M * N),
                        mask=n_mask[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                tl.atomic_xchg(cnt_ptr + row_block, 0)
            out = acc.to(y_ptr.dtype.element_ty)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + rn_safe).to(tl.float32)
                out = (out.to(tl.float32) + bias[None, :]).to(y_ptr.dtype.element_ty)
            if LORA > 0:
                out = _lora_epilogue(
                    out, rm, rn_safe, part_ptr, b_ptr, R, scale, stride_bn, sync_ptr,
                    LORA, SPLITS, BLOCK_S, BLOCK_R, USE_DOT,
                )  # fmt: skip
            tl.store(
                y_ptr + rm[:, None] * stride_ym + rn[None, :], out, mask=m_mask[:, None] & n_mask[None, :]
            )
    _finish(sync_ptr, LORA)


# --------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------

# TRITON_INTERPRET=1 runs these kernels on the CPU (scripts/check_fused_cpu.py)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_sync: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> its int32 counters
_counters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> split-K arrivals per row block


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _capturing() -> bool:
    return not _INTERPRET and torch.cuda.is_current_stream_capturing()


def _storage(module, x):
    """The layer's packed weight and quant state when this kernel can reproduce its forward, else None."""
    if type(module).__name__ not in ("Linear4bit", "LinearNF4", "LinearFP4"):
        return None
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return None
    if (
        getattr(state, "quant_type", None) not in ("nf4", "fp4")
        or state.shape is None
        or len(state.shape) != 2
    ):
        return None
    compute = getattr(module, "compute_dtype", None)
    if compute is not None and compute != x.dtype:
        return None
    N, K = (int(d) for d in state.shape)
    blocksize = int(state.blocksize)
    if x.shape[-1] != K or K % blocksize or blocksize % 2:
        return None
    packed = weight.data
    if packed.device != x.device or packed.numel() * packed.element_size() != N * K // 2:
        return None
    packed = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    code = state.code
    if code is None or code.numel() != 16 or code.device != x.device:
        return None
    return packed, state, N, K, blocksize


def _block_k(K: int, blocksize: int, want: int) -> int | None:
    bk = min(want, triton.next_power_of_2(K))
    return bk if bk >= blocksize and bk % blocksize == 0 else None


def fused_lora_linear(module, x, xa, A, B, scale, *, config=None, lora_mode=None, force=False):
    """``Linear4bit(x) + scale * (xa @ A.T) @ B.T`` in one launch, or ``None`` when not served here.

    ``config`` ``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` and ``lora_mode``
    (0: base only, 1: shrink launched first, 2: one launch) are for the tuning
    script; ``A is None`` computes the base alone; ``force`` runs it where :data:`SERVE` is off.
    """
    if not (SERVE or force) or _compiling() or not (x.is_cuda or _INTERPRET) or x.dtype not in DTYPES:
        return None
    lora = A is not None
    tensors = (x, xa, A, B) if lora else (x,)
    if lora and (
        xa.dtype != x.dtype
        or A.dtype not in (x.dtype, torch.float32)
        or B.dtype != A.dtype
        or A.shape[0] > MAX_RANK
    ):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if M == 0 or M > MAX_TOKENS:
        return None
    found = _storage(module, x)
    if found is None:
        return None
    packed, state, N, K, blocksize = found
    bias = getattr(module, "bias", None)
    if bias is not None and (bias.device != x.device or bias.numel() != N):
        return None
    block_m = _token_block(M)
    block_n, want_k, warps, stages, splitk = (*(config or CONFIGS[block_m]), 1)[:5]
    block_k = _block_k(K, blocksize, want_k)
    if block_k is None:
        return None
    x2 = x.reshape(M, K).contiguous()
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    nested = bool(getattr(state, "nested", False))
    if nested:
        state2 = state.state2
        absmax, abs2, code2, offset, bs2 = (
            state.absmax,
            state2.absmax,
            state2.code,
            state.offset,
            state2.blocksize,
        )
        if not torch.is_tensor(offset):
            return None
    else:
        absmax = state.absmax
        abs2 = code2 = offset = absmax
        bs2 = 1
    if absmax.dtype != (torch.uint8 if nested else torch.float32):
        return None
    mode = (2 if ONE_LAUNCH and (module in _sync or not _capturing()) else 1) if lora else 0
    mode = lora_mode if lora_mode is not None and lora else mode
    grid_n = triton.cdiv(N, block_n)
    if lora:
        KA = xa.shape[-1]
        xa2 = xa.reshape(M, KA).contiguous()
        A = A.contiguous()
        B = B.contiguous()
        R = A.shape[0]
        k_per_split = max(64, triton.next_power_of_2(triton.cdiv(KA, 32)))
        splits = triton.cdiv(KA, k_per_split)
        block_r = max(16, triton.next_power_of_2(R))
        block_s = triton.next_power_of_2(splits)
        part = torch.empty((splits, 16, block_r), device=x.device, dtype=torch.float32)
        shrink_k = min(k_per_split, 128)
        if mode == 2:
            sync = _sync.get(module)
            if sync is None:
                sync = _sync[module] = torch.zeros(4, device=x.device, dtype=torch.int32)
        else:
            sync = part
            _shrink_kernel[(splits,)](
                xa2, A, part, M, KA, R, xa2.stride(0), A.stride(0),
                K_PER_SPLIT=k_per_split, SHRINK_K=shrink_k, BLOCK_R=block_r, num_warps=4,
            )  # fmt: skip
    else:
        xa2, A, B, part, sync = x2, x2, x2, y, y
        KA = R = splits = 1
        k_per_split = shrink_k = block_r = block_s = 16
    k_blocks = triton.cdiv(K, block_k)
    counters = _counters.get(module)
    if splitk > 1 and counters is None and not _capturing():
        counters = _counters[module] = torch.zeros(N, device=x.device, dtype=torch.int32)
    splitk = min(splitk, k_blocks) if counters is not None else 1  # first call under capture: no counters
    k_split = triton.cdiv(k_blocks, splitk) * block_k
    splitk = triton.cdiv(K, k_split)
    ws = torch.empty((splitk, block_m, N), device=x.device, dtype=torch.float32) if splitk > 1 else y
    _nf4_lora_kernel[(grid_n * splitk + (splits if mode == 2 else 0),)](
        x2, packed, absmax, state.code, abs2, code2, offset, bias if bias is not None else y,
        xa2, A, B, part, sync, y, ws, counters if splitk > 1 else y,
        M, N, K, KA, R, float(scale) if lora else 0.0, grid_n, k_split,
        x2.stride(0), xa2.stride(0), A.stride(0), B.stride(0), y.stride(0),
        BS=blocksize, BS2=bs2, NESTED=nested, HAS_BIAS=bias is not None,
        LORA=mode, SPLITS=splits if mode else 0, K_PER_SPLIT=k_per_split, SHRINK_K=shrink_k,
        BLOCK_S=block_s, BLOCK_R=block_r,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=block_m >= 16, EVEN_K=K % block_k == 0, SPLITK=splitk,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y.view(*x.shape[:-1], N)


def usable() -> bool:
    """Whether these kernels can serve here: a CUDA device (Triton imported, or this module would not be)."""
    return torch.cuda.is_available()
