"""Fused int8 weight-only GEMV + LoRA for torchao ``Int8Tensor`` weights on CUDA (Triton), for 1-16 tokens.

Registered for the op ``fused_lora_linear`` (backend ``torchao``, device
``cuda``, bf16/fp16) by this plugin's ``quantplug_register_kernels`` when
Triton and a CUDA device are there; nothing here is imported otherwise.

What it reads: torchao's own storage, untouched: ``weight.qdata`` (int8,
``(out, in)``), ``weight.scale`` (one float per output row) and the bias.
torchao's weight-only linear for a per-row ``Int8Tensor`` is
``(x @ qdata.T.to(dtype)) * scale.to(dtype) + bias`` (its zero point is not
read there), and so is this kernel, with the product accumulated in float32
and rounded where torchao rounds.

The adapter, split-K, the one-launch variant, the epilogue and the
launcher are the core's, shared by every plugin's fused kernel
(``quantplug.plugin.fused_lora``); this module holds the format.

It serves a call only when it can reproduce the layer's forward: CUDA
tensors in the weight's dtype (bf16/fp16), no autograd, at most
:data:`MAX_TOKENS` rows, rank at most :data:`MAX_RANK`, an ``Int8Tensor``
quantized per row with no activation quantization or pre-scale; otherwise
it returns ``None`` and the core takes the library's own forward plus
``lora_linear``. Under ``torch.compile`` it also returns ``None``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantplug.plugin import fused_lora as fl

# The core's limits and per-layer counters; ONE_LAUNCH: the adapter's shrink inside the GEMV launch
# (LORA=2), off (quantplug._fused says why)
DTYPES, MAX_TOKENS, MAX_RANK, ONE_LAUNCH, _sync = fl.DTYPES, fl.MAX_TOKENS, fl.MAX_RANK, False, fl.sync
# (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLITK): "gemv" for one token (_int8_gemv_kernel), 16 for 2-16
# tokens (the main kernel, on tensor cores); from scripts/tune_fused.py's sweeps on an H200 (2026-12-04,
# the one-token one timed with the adapter; the 16-token one re-swept on an H100, 2026-12-06 sixth session: split 2
# and 4 within 0.2% at 4096x4096).
CONFIGS = {"gemv": (8, 2048, 8, 1, 1), 16: (32, 128, 4, 3, 2)}
# The adapter's shrink slices at one token (the core's default is 32). On an H100 (2026-12-06, fourth session,
# wrapped layer, side by side) 16 slices took 9.33 / 24.09 / 19.78 us at 4096x4096 / 4096x14336 / 11008x4096, 32
# took 9.15 / 27.25 / 20.24: at 14336 inputs 32 slices' shrink ran past the GEMV programs' loops.
ONE_TOKEN_SHRINK_SLICES = 16
# Whether the layer's forward uses this kernel (on an H200 it is 4-8x faster than torchao's
# weight-only int8 linear at 1-16 tokens: docs/performance.md).
SERVE = True
# Whether calls above MAX_TOKENS rows are served too (no: the library's own forward serves them).
DENSE = False


@triton.jit
def _int8_lora_kernel(
    x_ptr, w_ptr, wscale_ptr, bias_ptr, xa_ptr, a_ptr, b_ptr, part_ptr, sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS, stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SHRINK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, SPLITK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    ticket = fl.program_ticket(
        xa_ptr, a_ptr, part_ptr, sync_ptr, M, KA, R, stride_xam, stride_ar, LORA, SPLITS, K_PER_SPLIT, SHRINK_K, BLOCK_R,
        PDL,
    )  # fmt: skip
    if ticket >= SPLITS:  # a GEMV program (below SPLITS: a shrink slice, done in program_ticket)
        row_block, split, rn, n_mask, rn_safe, rm, m_mask = fl.program_tile(
            ticket, SPLITS, GRID_N, N, M, BLOCK_M, BLOCK_N
        )
        rk = tl.arange(0, BLOCK_K)
        rows = rn_safe.to(tl.int64) * K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b_rows = fl.lora_rows(rn_safe, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
        for k0 in range(split * KS, tl.minimum(K, split * KS + KS), BLOCK_K):
            kk = k0 + rk
            if EVEN_K:
                q = tl.load(w_ptr + rows[:, None] + kk[None, :])
                xt = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None], other=0.0)
            else:
                k_mask = kk < K
                q = tl.load(w_ptr + rows[:, None] + kk[None, :], mask=k_mask[None, :], other=0)
                xt = tl.load(
                    x_ptr + rm[:, None] * stride_xm + kk[None, :],
                    mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
            acc = tl.dot(xt, tl.trans(q.to(xt.dtype)), acc)
        acc, last = fl.splitk_reduce(
            acc, ws_ptr, cnt_ptr, rm, rn_safe, n_mask, row_block, split, N, BLOCK_M, BLOCK_N, SPLITK
        )  # fmt: skip
        if last:  # the whole sum (this program's, or split-K's last to arrive)
            dtype = y_ptr.dtype.element_ty  # torchao: (x @ q.T) in the compute dtype, times the row scale
            wscale = tl.load(wscale_ptr + rn_safe).to(dtype).to(tl.float32)
            fl.store_rows(
                (acc.to(dtype).to(tl.float32) * wscale[None, :]).to(dtype), y_ptr, rm, rn, rn_safe, m_mask, n_mask,
                stride_ym, bias_ptr, part_ptr, b_ptr, R, scale, stride_bn, sync_ptr,
                HAS_BIAS, LORA, SPLITS, BLOCK_S, BLOCK_R, USE_DOT, PDL, None, b_rows,
            )  # fmt: skip
    fl.finish(sync_ptr, LORA)


@triton.jit
def _int8_gemv_kernel(
    x_ptr, w_ptr, wscale_ptr, bias_ptr, xa_ptr, a_ptr, b_ptr, part_ptr, sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS, stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SHRINK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, SPLITK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    # One token. Each thread keeps float32 sums per (row, input) it reads, summed once at the end; int8 to
    # float32 without a conversion instruction (2^23 + 128 + q, less 2^23 + 128).
    row_block, split, rn, n_mask, rn_safe = fl.gemv_program(GRID_N, N, BLOCK_N, PDL, SPLITK)
    rk = tl.arange(0, BLOCK_K)
    rows = rn_safe.to(tl.int64) * K
    # wide steps (few of them) are summed across the row as they come; narrow ones per input, at the end
    STEP_SUM: tl.constexpr = BLOCK_K >= 1024
    acc = tl.zeros((BLOCK_N, 1 if STEP_SUM else BLOCK_K), dtype=tl.float32)
    b_rows = fl.lora_rows(rn_safe, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
    for k0 in range(split * KS, tl.minimum(K, split * KS + KS), BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            q = tl.load(w_ptr + rows[:, None] + kk[None, :], eviction_policy="evict_first")
            xt = tl.load(x_ptr + kk, eviction_policy="evict_last").to(tl.float32)
        else:
            k_mask = kk < K
            q = tl.load(w_ptr + rows[:, None] + kk[None, :], mask=k_mask[None, :], other=0)
            xt = tl.load(x_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
        product = ((q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0) * xt[None, :]
        if STEP_SUM:
            acc += tl.sum(product, axis=1, keep_dims=True)
        else:
            acc += product
    # the shrink's sum read before the cross-thread sums, whose latency its loads then overlap (unsplit: split-K
    # leaves it to the row block's last program)
    rm = tl.arange(0, 1)
    shrunk = (
        fl.lora_shrunk(rm, part_ptr, sync_ptr, LORA, SPLITS, BLOCK_S, BLOCK_R, PDL)
        if LORA and SPLITK == 1
        else None
    )
    out, rm, last = fl.gemv_reduce(
        acc, ws_ptr, cnt_ptr, rn_safe, n_mask, row_block, split, N, BLOCK_N, SPLITK
    )
    if last:
        dtype = y_ptr.dtype.element_ty  # torchao: (x @ q.T) in the compute dtype, times the row scale
        wscale = tl.load(wscale_ptr + rn_safe).to(dtype).to(tl.float32)
        fl.store_rows(
            (out.to(dtype).to(tl.float32) * wscale[None, :]).to(dtype), y_ptr, rm, rn, rn_safe, rm < 1, n_mask,
            stride_ym, bias_ptr, part_ptr, b_ptr, R, scale, stride_bn, sync_ptr,
            HAS_BIAS, LORA, SPLITS, BLOCK_S, BLOCK_R, False, PDL, shrunk, b_rows,
        )  # fmt: skip


# --------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------


def _storage(module, x):
    """The weight's int8 data and row scales when this kernel can reproduce the layer's forward, else None."""
    weight = module._parameters.get("weight") if isinstance(module, torch.nn.Linear) else None
    if weight is None or type(weight).__name__ != "Int8Tensor":
        return None
    if (
        getattr(weight, "act_quant_kwargs", None) is not None
        or getattr(weight, "act_pre_scale", None) is not None
    ):
        return None
    qdata, wscale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if (
        not (torch.is_tensor(qdata) and torch.is_tensor(wscale))
        or qdata.dim() != 2
        or weight.dtype != x.dtype
    ):
        return None
    N, K = qdata.shape
    if list(getattr(weight, "block_size", ())) != [1, K] or wscale.numel() != N or x.shape[-1] != K:
        return None
    if qdata.device != x.device or not qdata.is_contiguous() or qdata.dtype != torch.int8:
        return None
    return qdata, wscale.reshape(-1), N, K


def fused_lora_linear(
    module, x, xa, A, B, scale, *, config=None, lora_mode=None, force=False, pdl=None
):  # fmt: skip
    """``linear(x) + scale * (xa @ A.T) @ B.T`` on an int8 weight, or ``None`` when not served.

    ``A is None`` computes the base alone; ``config`` (a :data:`CONFIGS`
    entry), ``lora_mode`` (0-2), ``pdl`` and ``force`` (past :data:`SERVE`)
    are for the tuning script and the tests.
    """
    found = fl.admit(module, x, xa, A, B, _storage, serve=SERVE or force)
    if found is None:
        return None
    M, qdata, wscale, N, K = found
    block_m = fl.token_block(M)
    gemv = block_m == 1
    config = config or CONFIGS["gemv" if gemv else block_m]
    block_k = min(config[1], max(16, fl.next_power_of_2(K)))
    return fl.launch(
        _int8_gemv_kernel if gemv else _int8_lora_kernel, module, x, xa, A, B, scale, (qdata, wscale),
        module.bias, N=N, rows=N, block_m=block_m, block_k=block_k, config=config,
        one_launch=ONE_LAUNCH, lora_mode=lora_mode, pdl=pdl,
        shrink_slices=ONE_TOKEN_SHRINK_SLICES if gemv else None,
    )  # fmt: skip


usable = fl.usable
