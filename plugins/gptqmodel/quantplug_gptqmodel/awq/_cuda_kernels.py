"""Fused 4-bit GEMV + LoRA for AWQ layers in the GEMM layout on CUDA (Triton), for 1-16 tokens.

Registered for the op ``fused_lora_linear`` (backend ``awq``, device
``cuda``, bf16/fp16) by this plugin's ``quantplug_register_kernels`` when
Triton and a CUDA device are there; nothing here is imported otherwise.

What it reads: the layer's own storage, untouched (no repack), as
gptqmodel's ``AwqTorchLinear`` and AutoAWQ's ``WQLinear_GEMM`` keep it (the
GEMM layout, ``_layers.GEMM``): ``qweight`` ``(in, out / 8)`` int32, the
words along the outputs, code ``j`` of word ``(k, w)`` (bits ``4j`` to
``4j + 3``) the weight of input ``k`` for output ``8 w + 2 (j % 4) + j // 4``
(AWQ's lane order ``0 2 4 6 1 3 5 7``); ``qzeros`` ``(groups, out / 8)`` int32 in
the same order; ``scales`` ``(groups, out)``; the bias. The weight is
``(code - zero) * scale`` (gptqmodel's ``dequantize_gemm``).

A program takes a block of words (eight output columns each) and steps down
the inputs. One token (the GEMV): a word's eight codes are eight columns of
one input, so each code keeps its own sums; each goes into the mantissa of
1.0 (``1 + q / 16``, ``_int4.mantissa``), and per group and column the sum
is ``scale * (16 sum((1 + q/16) x) - (16 + zero) sum(x))``. The eight lanes
are put back in column order once, before the core's epilogue; the GPU gets
its programs from split-K. 2-16 tokens: a step's words are spread to
``(inputs, words, 8 columns)`` in column order, dequantized in registers,
taken as one ``(inputs, columns)`` operand and multiplied on tensor cores.

The adapter, split-K, the epilogue and the launcher are the core's
(``quantplug.plugin.fused_lora``); this module holds the format.

It serves a call only when it can reproduce the layer's forward: a 4-bit
layer in the GEMM layout, ``out`` a multiple of 8, whole groups along the
inputs, CUDA tensors in bf16/fp16 (the scales in any float dtype: read as
float32, as the adapter layer calls the library in the scales' dtype
without recasting them), no autograd, at most :data:`MAX_TOKENS`
rows and rank at most :data:`MAX_RANK`; otherwise it returns ``None`` and
the core takes the library's own forward plus ``lora_linear``. Under
``torch.compile`` it also returns ``None``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantplug.plugin import fused_lora as fl

from quantplug_gptqmodel._classes import mro_names
from quantplug_gptqmodel._int4 import code_values, mantissa
from quantplug_gptqmodel.awq import _layers

DTYPES, MAX_TOKENS, MAX_RANK, ONE_LAUNCH = fl.DTYPES, fl.MAX_TOKENS, fl.MAX_RANK, False
# (BLOCK_N columns, BLOCK_K, num_warps, num_stages, SPLITK): "gemv" for one token (_awq4_gemv_kernel), 16 for 2-16
# tokens (_awq4_lora_kernel, on tensor cores). BLOCK_N is in output columns, eight per word. One token, H100
# (2026-12-06, sixth session, 4096x4096 with the adapter, graph): (128, 128, 1 warp, split 16) 10.63 us; 256 and
# 512 columns 16.8-17.6, split 8 28.7. The 16-token one is gptq's, not yet swept.
CONFIGS = {"gemv": (128, 128, 1, 1, 16), 16: (64, 128, 4, 3, 4)}
# The adapter's shrink slices at one token (the core's default).
ONE_TOKEN_SHRINK_SLICES = 32
# Whether the layer's forward uses this kernel: gptqmodel's AwqTorchLinear dequantizes the whole weight on every call.
SERVE = True
# Whether calls above MAX_TOKENS rows are served too (no: the library's own forward serves them).
DENSE = False


@triton.jit
def _lane_sum(words, xk, xs, zw, s_row, cols8, w_ok, j: tl.constexpr):
    # code j of each word over the step's inputs (one group, or part of one), per word: scale * (16 D - (16 +
    # zero) X), D the sum of (1 + q/16) x over the step's inputs, X the sum of its inputs
    d = tl.sum(mantissa(words, j) * xk[:, None], axis=0)
    column: tl.constexpr = 2 * (j % 4) + j // 4  # AWQ's lane order 0 2 4 6 1 3 5 7
    s = tl.load(s_row + cols8 + column, mask=w_ok, other=0.0).to(tl.float32)
    z = ((zw >> (4 * j)) & 15).to(tl.float32)
    return s * (16.0 * d - (16.0 + z) * xs)


@triton.jit
def _column_order(v0, v1, v2, v3, v4, v5, v6, v7, BLOCK_N: tl.constexpr):
    # the eight lanes' (words,) sums as (words * 8,) in column order: column c holds lane 4 (c % 2) + c // 2. Each
    # join adds a last axis of 2, so the first joins pair columns c and c + 4, the last c and c + 1
    top = tl.join(tl.join(v0, v2), tl.join(v1, v3))  # columns 0 4 2 6 as (c // 4, c // 2 % 2)
    odd = tl.join(tl.join(v4, v6), tl.join(v5, v7))  # columns 1 5 3 7
    return tl.reshape(tl.join(top, odd), (BLOCK_N,))


@triton.jit
def _awq4_lora_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, xa_ptr, a_ptr, b_ptr, part_ptr, sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS, stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SHRINK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, SPLITK: tl.constexpr,
    PDL: tl.constexpr, GS: tl.constexpr,
):  # fmt: skip
    # 2-16 tokens; BLOCK_K divides the group, so that a step has one scale and zero point per column
    ticket = fl.program_ticket(
        xa_ptr, a_ptr, part_ptr, sync_ptr, M, KA, R, stride_xam, stride_ar, LORA, SPLITS, K_PER_SPLIT, SHRINK_K, BLOCK_R,
        PDL,
    )  # fmt: skip
    if ticket >= SPLITS:  # a GEMV program (below SPLITS: a shrink slice, done in program_ticket)
        row_block, split, rn, n_mask, rn_safe, rm, m_mask = fl.program_tile(
            ticket, SPLITS, GRID_N, N, M, BLOCK_M, BLOCK_N
        )
        BLOCK_W: tl.constexpr = BLOCK_N // 8
        W = N // 8
        rw = row_block * BLOCK_W + tl.arange(0, BLOCK_W)
        w_ok = rw < W
        rk = tl.arange(0, BLOCK_K)
        c = tl.arange(0, 8)
        lane_shift = 16 * (c % 2) + 4 * (c // 2)  # column c of a word is its lane 4 (c % 2) + c // 2
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b_rows = fl.lora_rows(rn_safe, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
        for k0 in range(split * KS, tl.minimum(K, split * KS + KS), BLOCK_K):
            k = k0 + rk  # below K: BLOCK_K divides the group, the group K
            words = tl.load(qw_ptr + k.to(tl.int64)[:, None] * W + rw[None, :], mask=w_ok[None, :], other=0)
            g = k0 // GS
            s = tl.load(s_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g * W + rw, mask=w_ok, other=0)
            z = tl.reshape((zw[:, None] >> lane_shift[None, :]) & 15, (BLOCK_N,)).to(tl.float32)
            q = tl.reshape(
                code_values((words[:, :, None] >> lane_shift[None, None, :]) & 15), (BLOCK_K, BLOCK_N)
            )
            w = (q * s[None, :] - (z * s)[None, :]).to(dtype)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_mask[:, None], other=0.0)
            acc = tl.dot(xt, w, acc)
        acc, last = fl.splitk_reduce(
            acc, ws_ptr, cnt_ptr, rm, rn_safe, n_mask, row_block, split, N, BLOCK_M, BLOCK_N, SPLITK
        )  # fmt: skip
        if last:  # the whole sum (this program's, or split-K's last to arrive)
            fl.store_rows(
                acc.to(y_ptr.dtype.element_ty), y_ptr, rm, rn, rn_safe, m_mask, n_mask, stride_ym, bias_ptr,
                part_ptr, b_ptr, R, scale, stride_bn, sync_ptr, HAS_BIAS, LORA, SPLITS, BLOCK_S, BLOCK_R, USE_DOT, PDL,
                None, b_rows,
            )  # fmt: skip
    fl.finish(sync_ptr, LORA)


@triton.jit
def _awq4_gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, xa_ptr, a_ptr, b_ptr, part_ptr, sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS, stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SHRINK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, SPLITK: tl.constexpr,
    PDL: tl.constexpr, GS: tl.constexpr,
):  # fmt: skip
    # One token. A step reads a (BLOCK_K inputs, BLOCK_N / 8 words) tile of qweight, within one group (BLOCK_K
    # divides it); each of a word's eight lanes keeps its own float32 sums per word
    row_block, split, rn, n_mask, rn_safe = fl.gemv_program(GRID_N, N, BLOCK_N, PDL, SPLITK)
    BLOCK_W: tl.constexpr = BLOCK_N // 8
    W = N // 8
    rw = row_block * BLOCK_W + tl.arange(0, BLOCK_W)
    w_ok = rw < W
    rk = tl.arange(0, BLOCK_K)
    cols8 = rw * 8
    acc0 = tl.zeros((BLOCK_W,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_W,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_W,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_W,), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_W,), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_W,), dtype=tl.float32)
    acc6 = tl.zeros((BLOCK_W,), dtype=tl.float32)
    acc7 = tl.zeros((BLOCK_W,), dtype=tl.float32)
    b_rows = fl.lora_rows(rn_safe, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
    for k0 in range(split * KS, tl.minimum(K, split * KS + KS), BLOCK_K):
        k = k0 + rk  # below K: BLOCK_K divides the group, the group K
        words = tl.load(
            qw_ptr + k.to(tl.int64)[:, None] * W + rw[None, :], mask=w_ok[None, :], other=0,
            eviction_policy="evict_first",
        )  # fmt: skip
        xk = tl.load(x_ptr + k).to(tl.float32)
        xs = tl.sum(xk, axis=0)
        g = k0 // GS
        zw = tl.load(qz_ptr + g * W + rw, mask=w_ok, other=0)
        s_row = s_ptr + g * N
        acc0 += _lane_sum(words, xk, xs, zw, s_row, cols8, w_ok, 0)
        acc1 += _lane_sum(words, xk, xs, zw, s_row, cols8, w_ok, 1)
        acc2 += _lane_sum(words, xk, xs, zw, s_row, cols8, w_ok, 2)
        acc3 += _lane_sum(words, xk, xs, zw, s_row, cols8, w_ok, 3)
        acc4 += _lane_sum(words, xk, xs, zw, s_row, cols8, w_ok, 4)
        acc5 += _lane_sum(words, xk, xs, zw, s_row, cols8, w_ok, 5)
        acc6 += _lane_sum(words, xk, xs, zw, s_row, cols8, w_ok, 6)
        acc7 += _lane_sum(words, xk, xs, zw, s_row, cols8, w_ok, 7)
    out = _column_order(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, BLOCK_N)
    fl.gemv_store(
        out[:, None], y_ptr, rn, rn_safe, n_mask, row_block, split, N, ws_ptr, cnt_ptr, stride_ym, bias_ptr,
        part_ptr, b_ptr, R, scale, stride_bn, sync_ptr, HAS_BIAS, LORA, SPLITS, BLOCK_S, BLOCK_R, BLOCK_N, SPLITK, PDL,
        b_rows,
    )  # fmt: skip


# --------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------


def _storage(module, x):
    """``(qweight, qzeros, scales, N, K, group)`` when this kernel can reproduce the layer's forward, else None."""
    if not mro_names(module) & _layers.GEMM_CLASSES or _layers.layout(module) != _layers.GEMM:
        return None
    if _layers.bits_of(module) != 4:
        return None
    qweight, qzeros, scales = module.qweight, getattr(module, "qzeros", None), getattr(module, "scales", None)
    K, N = int(module.in_features), int(module.out_features)
    if not (torch.is_tensor(qzeros) and torch.is_tensor(scales)) or x.shape[-1] != K or N % 8:
        return None
    groups = scales.shape[0] if scales.dim() == 2 else 0
    if not groups or K % groups:
        return None
    if (
        tuple(qweight.shape) != (K, N // 8)
        or tuple(qzeros.shape) != (groups, N // 8)
        or tuple(scales.shape) != (groups, N)
        or qweight.dtype != torch.int32
        or qzeros.dtype != torch.int32
        or scales.dtype not in (torch.float16, torch.bfloat16, torch.float32)
    ):
        return None
    if any(t.device != x.device or not t.is_contiguous() for t in (qweight, qzeros, scales)):
        return None
    return qweight, qzeros, scales, N, K, K // groups


def fused_lora_linear(
    module, x, xa, A, B, scale, *, config=None, lora_mode=None, force=False, pdl=None
):  # fmt: skip
    """``layer(x) + scale * (xa @ A.T) @ B.T`` on an AWQ layer in the GEMM layout, or ``None`` when not served here.

    ``A is None``: the base alone. ``config`` (a :data:`CONFIGS` entry),
    ``lora_mode`` (0: base only, 1: shrink launched first, 2: one launch),
    and ``pdl`` are the tuning script's; ``force`` runs it where
    :data:`SERVE` is off.
    """
    found = fl.admit(module, x, xa, A, B, _storage, serve=SERVE or force)
    if found is None:
        return None
    M, qweight, qzeros, scales, N, K, group = found
    block_m = fl.token_block(M)
    gemv = block_m == 1
    config = config or CONFIGS["gemv" if gemv else block_m]
    if config[0] % 8:
        return None  # whole words a program
    # one group a step, or part of one: BLOCK_K divides the group (16 inputs at least, for the dot)
    block_k = min(config[1], fl.next_power_of_2(K))
    while block_k > 16 and group % block_k:
        block_k //= 2
    if group % block_k:
        return None
    kernel = _awq4_gemv_kernel if gemv else _awq4_lora_kernel
    return fl.launch(
        kernel, module, x, xa, A, B, scale, (qweight, qzeros, scales), getattr(module, "bias", None), N=N, rows=N,
        block_m=block_m, block_k=block_k, config=config, one_launch=ONE_LAUNCH, lora_mode=lora_mode, pdl=pdl,
        shrink_slices=ONE_TOKEN_SHRINK_SLICES if gemv else None, GS=group,
    )  # fmt: skip


usable = fl.usable
