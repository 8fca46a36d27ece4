"""Fused 4-bit GEMV + LoRA for hqq ``HQQLinear`` (4-bit, ``axis=1``) on CUDA (Triton), for 1-16 tokens.

Registered for the op ``fused_lora_linear`` (backend ``hqq``, device
``cuda``, bf16/fp16) by this plugin's ``quantplug_register_kernels`` when
Triton and a CUDA device are there; nothing here is imported otherwise.

What it reads: hqq's own storage, untouched: ``W_q`` packed ``4bit_u8``
(hqq's ``BitPack.pack_4bit_u8`` packs the first half of the groups into the
high nibbles and the second half into the low nibbles of the same bytes;
with ``axis=1`` a group is ``group_size`` consecutive inputs of one output
row, so byte ``(n, k)`` of ``W_q`` viewed as ``(out/2, in)`` holds
``W[n, k]`` and ``W[n + out/2, k]``), ``meta["scale"]`` and
``meta["zero"]`` (one each per group, in the compute dtype) and the bias.
Each program reads one block of bytes and produces its rows of both halves:
``(q - zero) * scale`` in registers, times the 1-16 input rows.

The adapter, split-K and the one-launch variant work as in
``quantplug_bnb._cuda_kernels`` (the same scheme, kept in each plugin
because plugins do not import each other): the first programs to start compute the shrink, the
GEMV programs add ``scale * t @ B.T`` to their rows after their own work.

It serves a call only when it can reproduce the layer's forward
(``x @ dequantize().T + bias``): CUDA tensors in the layer's compute dtype
(bf16/fp16), no autograd, at most :data:`MAX_TOKENS` rows, rank at most
:data:`MAX_RANK`, 4 bits, ``axis=1``, plain ``scale``/``zero`` tensors (not
hqq's older quantized meta), an even ``out_features`` and ``in_features`` a
multiple of the group size; otherwise it returns ``None`` and the core takes
the library's own forward plus ``lora_linear``. Under ``torch.compile`` it
also returns ``None``.
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
# BLOCK_N counting rows of one half (each program writes twice as many);
# from scripts/tune_fused.py's sweep on an H200 (2026-12-04).
CONFIGS = {
    1: (2, 1024, 4, 1, 1),
    16: (32, 128, 4, 3, 1),
}
# Whether the layer's forward uses this kernel (on an H200 it is 4-14x faster than hqq's PyTorch
# backend, which dequantizes the whole weight on every call: docs/performance.md).
SERVE = True


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
def _hqq4_lora_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr,
    xa_ptr, a_ptr, b_ptr, part_ptr, sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS,
    stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    GS: tl.constexpr, HAS_BIAS: tl.constexpr, EXACT: tl.constexpr,
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
        G: tl.constexpr = BLOCK_K // GS
        HALF_N = N // 2
        row_block = (ticket - SPLITS) % GRID_N
        split = (ticket - SPLITS) // GRID_N
        rn = row_block * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of the top half
        n_mask = rn < HALF_N
        rn_safe = tl.where(n_mask, rn, 0)
        rm = tl.arange(0, BLOCK_M)
        m_mask = rm < M
        rk = tl.arange(0, BLOCK_K)
        rg = tl.arange(0, G)
        row_bytes = rn_safe.to(tl.int64) * K
        groups_top = rn_safe.to(tl.int64) * (K // GS)
        groups_bot = (rn_safe + HALF_N).to(tl.int64) * (K // GS)
        acc_top = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_bot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(split * KS, tl.minimum(K, split * KS + KS), BLOCK_K):
            g = (k0 // GS + rg)[None, :]
            if EVEN_K:
                packed = tl.load(w_ptr + row_bytes[:, None] + (k0 + rk)[None, :])
                xt = tl.load(
                    x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_mask[:, None], other=0.0
                )
                g_mask = (rg < G)[None, :]  # all true: folded away
            else:  # the last block runs past the row: masked codes meet masked (zero) inputs
                k_mask = (k0 + rk < K)[None, :]
                packed = tl.load(w_ptr + row_bytes[:, None] + (k0 + rk)[None, :], mask=k_mask, other=0)
                xt = tl.load(
                    x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :],
                    mask=m_mask[:, None] & k_mask,
                    other=0.0,
                )
                g_mask = (k0 // GS + rg < K // GS)[None, :]
            s_top = tl.load(scale_ptr + groups_top[:, None] + g, mask=g_mask, other=0.0).to(tl.float32)[
                :, :, None
            ]
            z_top = tl.load(zero_ptr + groups_top[:, None] + g, mask=g_mask, other=0.0).to(tl.float32)[
                :, :, None
            ]
            s_bot = tl.load(scale_ptr + groups_bot[:, None] + g, mask=g_mask, other=0.0).to(tl.float32)[
                :, :, None
            ]
            z_bot = tl.load(zero_ptr + groups_bot[:, None] + g, mask=g_mask, other=0.0).to(tl.float32)[
                :, :, None
            ]
            q_top = tl.reshape((packed >> 4).to(tl.float32), (BLOCK_N, G, GS))
            q_bot = tl.reshape((packed & 15).to(tl.float32), (BLOCK_N, G, GS))
            if EXACT:  # hqq's own rounding: (q - zero) and then * scale, each in the compute dtype
                w_top = ((q_top - z_top).to(xt.dtype).to(tl.float32) * s_top).to(xt.dtype)
                w_bot = ((q_bot - z_bot).to(xt.dtype).to(tl.float32) * s_bot).to(xt.dtype)
            else:
                w_top = (q_top - z_top) * s_top
                w_bot = (q_bot - z_bot) * s_bot
            w_top = tl.reshape(w_top, (BLOCK_N, BLOCK_K))
            w_bot = tl.reshape(w_bot, (BLOCK_N, BLOCK_K))
            if USE_DOT:
                acc_top = tl.dot(xt, tl.trans(w_top.to(xt.dtype)), acc_top)
                acc_bot = tl.dot(xt, tl.trans(w_bot.to(xt.dtype)), acc_bot)
            else:  # reduced every block: few live registers, so the block (bytes in flight) can be large
                xf = xt.to(tl.float32)[:, None, :]
                acc_top += tl.sum(w_top.to(tl.float32)[None, :, :] * xf, axis=2)
                acc_bot += tl.sum(w_bot.to(tl.float32)[None, :, :] * xf, axis=2)
        if SPLITK > 1:  # split-K: partial sums to a workspace; the last split of this row block finishes
            tl.store(
                ws_ptr + rm[:, None] * N + (rn_safe)[None, :] + split * (BLOCK_M * N),
                acc_top,
                mask=n_mask[None, :],
            )
            tl.store(
                ws_ptr + rm[:, None] * N + (rn_safe + HALF_N)[None, :] + split * (BLOCK_M * N),
                acc_bot,
                mask=n_mask[None, :],
            )
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + row_block, 1, sem="acq_rel")
            last = arrived == SPLITK - 1
        else:
            last = True
        if last:
            if SPLITK > 1:
                acc_top = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc_bot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in tl.static_range(SPLITK):
                    acc_top += tl.load(
                        ws_ptr + rm[:, None] * N + (rn_safe)[None, :] + s * (BLOCK_M * N),
                        mask=n_mask[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    acc_bot += tl.load(
                        ws_ptr + rm[:, None] * N + (rn_safe + HALF_N)[None, :] + s * (BLOCK_M * N),
                        mask=n_mask[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                tl.atomic_xchg(cnt_ptr + row_block, 0)
            for half in tl.static_range(2):
                rows = rn_safe + half * HALF_N
                out = (acc_top if half == 0 else acc_bot).to(y_ptr.dtype.element_ty)
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + rows).to(tl.float32)
                    out = (out.to(tl.float32) + bias[None, :]).to(y_ptr.dtype.element_ty)
                if LORA > 0:
                    out = _lora_epilogue(
                        out, rm, rows, part_ptr, b_ptr, R, scale, stride_bn, sync_ptr,
                        LORA, SPLITS, BLOCK_S, BLOCK_R, USE_DOT,
                    )  # fmt: skip
                tl.store(
                    y_ptr + rm[:, None] * stride_ym + (rn + half * HALF_N)[None, :],
                    out,
                    mask=m_mask[:, None] & n_mask[None, :],
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
    """The layer's packed weight, scale and zero when this kernel can reproduce its forward, else None."""
    if type(module).__name__ != "HQQLinear":
        return None
    W_q, meta = getattr(module, "W_q", None), getattr(module, "meta", None)
    if W_q is None or not isinstance(meta, dict):
        return None
    if meta.get("nbits") != 4 or meta.get("axis") != 1 or meta.get("packing") != "4bit_u8":
        return None
    if meta.get("view_as_float") or meta.get("quant_scale") or meta.get("quant_zero") or "zero_scale" in meta:
        return None
    scale, zero = meta.get("scale"), meta.get("zero")
    if (
        not (torch.is_tensor(scale) and torch.is_tensor(zero))
        or scale.dtype != x.dtype
        or zero.dtype != x.dtype
    ):
        return None
    if getattr(module, "compute_dtype", x.dtype) != x.dtype:
        return None
    N, K = (int(d) for d in meta["shape"])
    group = int(meta["group_size"])
    if x.shape[-1] != K or N % 2 or K % group or W_q.dtype != torch.uint8 or W_q.numel() != N * K // 2:
        return None
    if W_q.device != x.device or scale.device != x.device or scale.numel() != N * K // group:
        return None
    if not (W_q.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()):
        return None
    return W_q, scale, zero, N, K, group


def _block_k(K: int, group: int, want: int) -> int | None:
    bk = min(want, triton.next_power_of_2(K))
    return bk if bk >= group and bk % group == 0 else None


def fused_lora_linear(module, x, xa, A, B, scale, *, config=None, lora_mode=None, force=False, exact=False):
    """``HQQLinear(x) + scale * (xa @ A.T) @ B.T`` in one launch, or ``None`` when not served here.

    ``config`` ``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` and ``lora_mode``
    (0: base only, 1: shrink launched first, 2: one launch) are for the tuning
    script; ``A is None`` computes the base alone; ``force`` runs it where :data:`SERVE` is off. ``exact`` rounds the
    dequantized weight as hqq does (tensor-core path only).
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
    W_q, w_scale, w_zero, N, K, group = found
    bias = getattr(module, "bias", None)
    if bias is not None and (not torch.is_tensor(bias) or bias.device != x.device or bias.numel() != N):
        return None
    block_m = _token_block(M)
    block_n, want_k, warps, stages, splitk = (*(config or CONFIGS[block_m]), 1)[:5]
    block_k = _block_k(K, group, want_k)
    if block_k is None:
        return None
    x2 = x.reshape(M, K).contiguous()
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    mode = (2 if ONE_LAUNCH and (module in _sync or not _capturing()) else 1) if lora else 0
    mode = lora_mode if lora_mode is not None and lora else mode
    grid_n = triton.cdiv(N // 2, block_n)
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
    _hqq4_lora_kernel[(grid_n * splitk + (splits if mode == 2 else 0),)](
        x2, W_q, w_scale, w_zero, bias if bias is not None else y,
        xa2, A, B, part, sync, y, ws, counters if splitk > 1 else y,
        M, N, K, KA, R, float(scale) if lora else 0.0, grid_n, k_split,
        x2.stride(0), xa2.stride(0), A.stride(0), B.stride(0), y.stride(0),
        GS=group, HAS_BIAS=bias is not None, EXACT=exact and block_m >= 16,
        LORA=mode, SPLITS=splits if mode else 0, K_PER_SPLIT=k_per_split, SHRINK_K=shrink_k,
        BLOCK_S=block_s, BLOCK_R=block_r,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=block_m >= 16, EVEN_K=K % block_k == 0, SPLITK=splitk,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y.view(*x.shape[:-1], N)


def usable() -> bool:
    """Whether these kernels can serve here: a CUDA device (Triton imported, or this module would not be)."""
    return torch.cuda.is_available()
