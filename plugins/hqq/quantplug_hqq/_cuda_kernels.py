"""Fused 4-bit GEMV + LoRA for hqq ``HQQLinear`` (4-bit, ``axis=1``) on CUDA (Triton), and its dequantization.

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
Each program reads one block of bytes and produces its rows of both halves.
One token (the GEMV, :data:`ONE_TOKEN`): ``scale * (sum(q x) - zero *
sum(x))`` per group, each code decoded into the mantissa of 1.0. 2-16
tokens (tensor cores): ``(q - zero) * scale`` two weights per instruction
in inline PTX, rounded as hqq rounds (bit for bit ``dequantize()``), one
group a step, into the MMA with the input rows. :func:`dequantize` writes
the dense weight in one launch, bit for bit hqq's; above
:data:`MAX_TOKENS` rows it and cuBLAS serve the layer (``DENSE``), and the
plugin's ``quantplug_dequantize`` uses it on CUDA.

The adapter, split-K, the one-launch variant, the epilogue and the
launcher are the core's, shared by every plugin's fused kernel
(``quantplug.plugin.fused_lora``); this module holds the format.

It serves a call only when it can reproduce the layer's forward
(``x @ dequantize().T + bias``): CUDA tensors in the layer's compute dtype
(bf16/fp16), no autograd, rank at most
:data:`MAX_RANK`, 4 bits, ``axis=1``, plain ``scale``/``zero`` tensors (not
hqq's older quantized meta), an even ``out_features`` and ``in_features`` a
multiple of the group size; otherwise it returns ``None`` and the core takes
the library's own forward plus ``lora_linear``. Under ``torch.compile`` it
also returns ``None``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from quantplug.plugin import fused_lora as fl

from quantplug_hqq import _ptx

# The core's limits and per-layer counters; ONE_LAUNCH: the adapter's shrink inside the GEMV launch
# (LORA=2), off (quantplug._fused says why)
DTYPES, MAX_TOKENS, MAX_RANK, ONE_LAUNCH, _sync = fl.DTYPES, fl.MAX_TOKENS, fl.MAX_RANK, False, fl.sync
# (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLITK): "gemv" for one token (_hqq4_gemv_kernel), 16 for 2-16
# tokens and 1 for one token with ONE_TOKEN = "mma" (_hqq4_lora_kernel, on tensor cores; its BLOCK_K only sets
# the split-K granularity: it steps one group at a time); BLOCK_N counts rows of one half (a program writes
# twice as many). From scripts/tune_fused.py's sweeps on an H100 (2026-12-05, with the adapter): the GEMV's
# with the mantissa decode (the four fastest within 3%), the tensor-core kernel's with the packed decode
# (splits 2, 4 and 8 within 4%; re-swept with every copy warmed, 2026-12-06 sixth session, H100: split 4 14.59 us
# at 4096x4096 and 16 tokens, split 2 16.89).
# "word": _hqq4_word_gemv_kernel's, from the H100 sweep of 2026-12-06 (third session): (4, 2048, 4 warps) 8.18 us
# at 4096x4096 with the adapter, the next five within 6%.
CONFIGS = {
    "gemv": (2, 2048, 4, 1, 1),
    "word": (4, 2048, 4, 1, 1),
    16: (32, 64, 4, 4, 4),
    1: (32, 64, 4, 4, 2),
}
# Which kernel serves one token: "word" (_hqq4_word_gemv_kernel: products in the compute dtype, 4.1-4.5
# instructions per weight element; 8.18 us at 4096x4096 with the adapter on an H100), "gemv" (_hqq4_gemv_kernel,
# float32 products, 8.2 instructions per element: 9.18 us) or "mma" (the 2-16 token kernel, the token padded to
# 16 rows of the MMA: 23.7 us). scripts/tune_fused.py --formats hqq --tokens 1 --sweep times all three.
ONE_TOKEN = "word"
# The adapter's shrink slices at one token (the core's default is 32): a word GEMV program (eight rows) runs long
# enough to hide 16 longer slices, and sums half as many. On an H100 (2026-12-06, fourth session, wrapped layer,
# side by side) 16 slices took 7.22 / 16.51 / 15.01 us at 4096x4096 / 4096x14336 / 11008x4096, 32 took 7.95 /
# 17.26 / 15.20.
ONE_TOKEN_SHRINK_SLICES = 16
# Whether the layer's forward uses this kernel (on an H200 it is 4-14x faster than hqq's PyTorch
# backend, which dequantizes the whole weight on every call: docs/performance.md).
SERVE = True
# Calls above MAX_TOKENS rows: this plugin's one-launch dequantization and cuBLAS (fused_lora.dense_lora_linear),
# faster than the library's forward, which dequantizes in several elementwise launches.
DENSE = True


# inline PTX: on NVIDIA GPUs, not in Triton's interpreter nor on ROCm (the same rounding in float32 there)
_PTX = tl.constexpr(not fl.INTERPRET and torch.version.hip is None)
_BF16_ASM = tl.constexpr(_ptx.codes_to_weights("bf16x2"))
_FP16_ASM = tl.constexpr(_ptx.codes_to_weights("f16x2"))
_DOT_BF16_ASM = tl.constexpr(_ptx.dot_word("bf16x2"))
_DOT_FP16_ASM = tl.constexpr(_ptx.dot_word("f16x2"))


@triton.jit
def _codes_to_weights(packed, s_top, nz_top, s_bot, nz_bot):
    # (top, bottom) weights of a tile of W_q bytes, (q - zero) * scale rounded as hqq does, in the scales'
    # dtype (nz: -zero); two per instruction in inline PTX, else in float32
    if not _PTX:
        top = ((packed >> 4).to(tl.float32) + nz_top.to(tl.float32)).to(s_top.dtype).to(tl.float32)
        bot = ((packed & 15).to(tl.float32) + nz_bot.to(tl.float32)).to(s_bot.dtype).to(tl.float32)
        return (top * s_top.to(tl.float32)).to(s_top.dtype), (bot * s_bot.to(tl.float32)).to(s_bot.dtype)
    else:
        return tl.inline_asm_elementwise(
            _FP16_ASM if s_top.dtype == tl.float16 else _BF16_ASM,
            "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
            [packed, s_top, nz_top, s_bot, nz_bot],
            dtype=(s_top.dtype, s_bot.dtype),
            is_pure=True,
            pack=4,
        )


@triton.jit
def _group_meta(scale_ptr, zero_ptr, groups_top, groups_bot, k, GS: tl.constexpr):
    # the scale and -zero of the group at input k of each row of both halves
    g = k // GS
    s_top = tl.load(scale_ptr + groups_top + g)
    nz_top = -tl.load(zero_ptr + groups_top + g)
    s_bot = tl.load(scale_ptr + groups_bot + g)
    nz_bot = -tl.load(zero_ptr + groups_bot + g)
    return s_top, nz_top, s_bot, nz_bot


@triton.jit
def _hqq4_lora_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, xa_ptr, a_ptr, b_ptr, part_ptr, sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS, stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SHRINK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, SPLITK: tl.constexpr,
    PDL: tl.constexpr,
    GS: tl.constexpr,
):  # fmt: skip
    ticket = fl.program_ticket(
        xa_ptr, a_ptr, part_ptr, sync_ptr, M, KA, R, stride_xam, stride_ar, LORA, SPLITS, K_PER_SPLIT, SHRINK_K, BLOCK_R,
        PDL,
    )  # fmt: skip
    if ticket >= SPLITS:  # a GEMV program (below SPLITS: a shrink slice, done in program_ticket)
        HALF_N = N // 2
        row_block, split, rn, n_mask, rn_safe, rm, m_mask = fl.program_tile(
            ticket, SPLITS, GRID_N, HALF_N, M, BLOCK_M, BLOCK_N
        )
        row_bytes = rn_safe.to(tl.int64) * K
        groups_top = rn_safe.to(tl.int64) * (K // GS)
        groups_bot = (rn_safe + HALF_N).to(tl.int64) * (K // GS)
        acc_top = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_bot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # both halves' adapter B rows, loaded before the loop (lora_rows)
        b_top = fl.lora_rows(rn_safe, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
        b_bot = fl.lora_rows(rn_safe + HALF_N, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
        # one group a step, whose loads Triton pipelines over num_stages (BLOCK_K only sets the split-K
        # granularity); its weights two per instruction, rounded as hqq rounds them. Wider steps decoded group
        # by group with no loads in flight, and loading a step's scales the step before measured slower (62 and
        # 33 against 25.5 us at 4096x4096, 16 tokens, H100, 2026-12-05).
        rj = tl.arange(0, GS)
        w_rows = w_ptr + row_bytes[:, None] + rj[None, :]
        x_rows = x_ptr + rm[:, None] * stride_xm + rj[None, :]
        for k0 in range(split * KS, tl.minimum(K, split * KS + KS), GS):
            s_top, nz_top, s_bot, nz_bot = _group_meta(scale_ptr, zero_ptr, groups_top, groups_bot, k0, GS)
            packed = tl.load(w_rows + k0)
            xt = tl.load(x_rows + k0, mask=m_mask[:, None], other=0.0)
            w_top, w_bot = _codes_to_weights(
                packed, s_top[:, None], nz_top[:, None], s_bot[:, None], nz_bot[:, None]
            )
            acc_top = tl.dot(xt, tl.trans(w_top), acc_top)
            acc_bot = tl.dot(xt, tl.trans(w_bot), acc_bot)
        last = True
        if SPLITK > 1:  # split-K: partial sums to a workspace; the last split of this row block finishes
            fl.splitk_store(ws_ptr, acc_top, rm, rn_safe, n_mask, split, N, BLOCK_M)
            fl.splitk_store(ws_ptr, acc_bot, rm, rn_safe + HALF_N, n_mask, split, N, BLOCK_M)
            last = fl.splitk_arrive(cnt_ptr, row_block, SPLITK)
        if last:
            if SPLITK > 1:
                acc_top = fl.splitk_sum(ws_ptr, rm, rn_safe, n_mask, N, BLOCK_M, BLOCK_N, SPLITK)
                acc_bot = fl.splitk_sum(ws_ptr, rm, rn_safe + HALF_N, n_mask, N, BLOCK_M, BLOCK_N, SPLITK)
                tl.atomic_xchg(cnt_ptr + row_block, 0)
            shrunk = (
                fl.lora_shrunk(rm, part_ptr, sync_ptr, LORA, SPLITS, BLOCK_S, BLOCK_R, PDL) if LORA else None
            )
            for half in tl.static_range(2):  # both halves' expands from one read of the shrink
                fl.store_rows(
                    (acc_top if half == 0 else acc_bot).to(y_ptr.dtype.element_ty), y_ptr, rm,
                    rn + half * HALF_N, rn_safe + half * HALF_N, m_mask, n_mask, stride_ym, bias_ptr,
                    part_ptr, b_ptr, R, scale, stride_bn, sync_ptr, HAS_BIAS, LORA, SPLITS, BLOCK_S, BLOCK_R, USE_DOT, PDL,
                    shrunk, b_top if half == 0 else b_bot,
                )  # fmt: skip
    fl.finish(sync_ptr, LORA)


@triton.jit
def _nibble(q):
    # a 4-bit code (int32, 0-15) as float32 without a conversion instruction: 2^23 + q, less 2^23
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _group_bytes(w_ptr, row_bytes, k0, k_end, rg, rj, GS: tl.constexpr):
    # one step's (byte rows, groups, GS bytes) tile of W_q; groups at or past k_end (the next split, or past
    # the row) read nothing
    kk = (k0 + rg * GS)[:, None] + rj[None, :]
    g_ok = (k0 + rg * GS < k_end)[None, :, None]
    return tl.load(
        w_ptr + row_bytes[:, None, None] + kk[None, :, :], mask=g_ok, other=0, eviction_policy="evict_first"
    )


@triton.jit
def _gemv_scales(scale_ptr, zero_ptr, groups_top, groups_bot, g, g_mask):
    # a one-token step's scale and zero per (row, group) of both halves, float32; masked groups 0
    s_top = tl.load(scale_ptr + groups_top[:, None] + g[None, :], mask=g_mask[None, :], other=0.0)
    z_top = tl.load(zero_ptr + groups_top[:, None] + g[None, :], mask=g_mask[None, :], other=0.0)
    s_bot = tl.load(scale_ptr + groups_bot[:, None] + g[None, :], mask=g_mask[None, :], other=0.0)
    z_bot = tl.load(zero_ptr + groups_bot[:, None] + g[None, :], mask=g_mask[None, :], other=0.0)
    return s_top.to(tl.float32), z_top.to(tl.float32), s_bot.to(tl.float32), z_bot.to(tl.float32)


@triton.jit
def _gemv_store(
    acc_top, acc_bot, b_top, b_bot, ws_ptr, cnt_ptr, rn, rn_safe, n_mask, row_block, split, N, y_ptr,
    stride_ym, bias_ptr, part_ptr, b_ptr, R, scale, stride_bn, sync_ptr, HAS_BIAS: tl.constexpr, LORA: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # a one-token program's per-thread sums of both halves' rows, summed, split-K, then the epilogue (``b_top``,
    # ``b_bot``: both halves' lora_rows, loaded before the loop, or None). Unsplit, the program finishes both
    # halves and reads the shrink once for both
    HALF_N = N // 2
    # the shrink's sum read before the cross-thread sums, whose latency its loads then overlap (unsplit: split-K
    # leaves it to the row block's last program)
    rm = tl.arange(0, 1)
    shrunk = (
        fl.lora_shrunk(rm, part_ptr, sync_ptr, LORA, SPLITS, BLOCK_S, BLOCK_R, PDL)
        if LORA and SPLITK == 1
        else None
    )
    for half in tl.static_range(2):
        out, rm, last = fl.gemv_reduce(
            acc_top if half == 0 else acc_bot, ws_ptr, cnt_ptr, rn_safe + half * HALF_N, n_mask,
            row_block * 2 + half, split, N, BLOCK_N, SPLITK,
        )  # fmt: skip
        if last:
            fl.store_rows(
                out.to(y_ptr.dtype.element_ty), y_ptr, rm, rn + half * HALF_N, rn_safe + half * HALF_N, rm < 1,
                n_mask, stride_ym, bias_ptr, part_ptr, b_ptr, R, scale, stride_bn, sync_ptr,
                HAS_BIAS, LORA, SPLITS, BLOCK_S, BLOCK_R, False, PDL, shrunk, b_top if half == 0 else b_bot,
            )  # fmt: skip


@triton.jit
def _hqq4_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, xa_ptr, a_ptr, b_ptr, part_ptr, sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS, stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SHRINK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, SPLITK: tl.constexpr,
    PDL: tl.constexpr, GS: tl.constexpr,
):  # fmt: skip
    # One token. A step reads a (BLOCK_N byte rows, GB groups, GS inputs) tile of W_q; per group and row
    # scale * (sum(q * x) - zero * sum(x)), kept per thread as float32 sums per (row, group), summed at the end.
    HALF_N = N // 2
    row_block, split, rn, n_mask, rn_safe = fl.gemv_program(GRID_N, HALF_N, BLOCK_N, PDL, SPLITK)
    GB: tl.constexpr = BLOCK_K // GS
    rg = tl.arange(0, GB)
    rj = tl.arange(0, GS)
    row_bytes = rn_safe.to(tl.int64) * K
    groups_top = rn_safe.to(tl.int64) * (K // GS)
    groups_bot = (rn_safe + HALF_N).to(tl.int64) * (K // GS)
    acc_top = tl.zeros((BLOCK_N, GB), dtype=tl.float32)
    acc_bot = tl.zeros((BLOCK_N, GB), dtype=tl.float32)
    # both halves' adapter B rows, loaded before the loop (lora_rows)
    b_top = fl.lora_rows(rn_safe, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
    b_bot = fl.lora_rows(rn_safe + HALF_N, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
    k_start = split * KS
    k_end = tl.minimum(K, split * KS + KS)
    for k0 in range(k_start, k_end, BLOCK_K):
        packed = _group_bytes(w_ptr, row_bytes, k0, k_end, rg, rj, GS)
        g = k0 // GS + rg
        g_mask = k0 + rg * GS < k_end
        kk = (k0 + rg * GS)[:, None] + rj[None, :]
        xt = tl.load(x_ptr + kk, mask=g_mask[:, None], other=0.0, eviction_policy="evict_last").to(tl.float32)
        s_top, z_top, s_bot, z_bot = _gemv_scales(scale_ptr, zero_ptr, groups_top, groups_bot, g, g_mask)
        x_sum = tl.sum(xt, axis=1)[None, :]
        # each code into the mantissa of 1.0, as 1 + q / 16, by a shift and an and-or (no float subtract):
        # sum((1 + q/16) x) = sum(x) + sum(q x) / 16
        codes = packed.to(tl.int32)
        top = ((codes << 15) & 0x780000 | 0x3F800000).to(tl.float32, bitcast=True)
        bot = ((codes << 19) & 0x780000 | 0x3F800000).to(tl.float32, bitcast=True)
        dot_top = (tl.sum(top * xt[None, :, :], axis=2) - x_sum) * 16.0
        dot_bot = (tl.sum(bot * xt[None, :, :], axis=2) - x_sum) * 16.0
        acc_top += s_top * (dot_top - z_top * x_sum)
        acc_bot += s_bot * (dot_bot - z_bot * x_sum)
    _gemv_store(
        acc_top, acc_bot, b_top, b_bot, ws_ptr, cnt_ptr, rn, rn_safe, n_mask, row_block, split, N, y_ptr,
        stride_ym, bias_ptr, part_ptr, b_ptr, R, scale, stride_bn, sync_ptr, HAS_BIAS, LORA, SPLITS, BLOCK_S,
        BLOCK_R, BLOCK_N, SPLITK, PDL,
    )  # fmt: skip


@triton.jit
def _centred_nibble(q):
    # a 4-bit code (int32, 0-15) less 8 as float32 without a conversion instruction: 2^23 + q, less 2^23 + 8
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _dot_words(words, x_at, dtype: tl.constexpr):
    # float32 sums of each packed word's four top and four bottom codes, less 8, times their four inputs (x_at:
    # a pointer to each word's first input, 8-byte aligned). In registers by inline PTX, which also loads the
    # inputs (_ptx.dot_word: each product and pair sum rounded once to dtype), else in float32.
    if not _PTX:
        top = tl.zeros(words.shape, tl.float32)
        bot = tl.zeros(words.shape, tl.float32)
        for j in tl.static_range(4):
            x = tl.load(x_at + j).to(tl.float32)
            top += _centred_nibble((words >> (8 * j + 4)) & 15) * x
            bot += _centred_nibble((words >> (8 * j)) & 15) * x
        return top, bot
    else:
        top, bot = tl.inline_asm_elementwise(
            _DOT_FP16_ASM if dtype == tl.float16 else _DOT_BF16_ASM, "=r,=r,r,l", [words, x_at.to(tl.int64)],
            dtype=(tl.int32, tl.int32), is_pure=True, pack=1,
        )  # fmt: skip
        top_low, top_high = fl.pair_floats(top, dtype)
        bot_low, bot_high = fl.pair_floats(bot, dtype)
        return top_low + top_high, bot_low + bot_high


@triton.jit
def _hqq4_word_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, xa_ptr, a_ptr, b_ptr, part_ptr, sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS, stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SHRINK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, SPLITK: tl.constexpr,
    PDL: tl.constexpr, GS: tl.constexpr,
):  # fmt: skip
    # One token. A step reads a (BLOCK_N byte rows, GB groups, GW words) tile of W_q as 32-bit words (four
    # inputs, both halves' codes); per group and row scale * (sum((q - 8) x) - (zero - 8) * sum(x)), kept per
    # thread as float32 sums per (row, group), summed at the end.
    HALF_N = N // 2
    row_block, split, rn, n_mask, rn_safe = fl.gemv_program(GRID_N, HALF_N, BLOCK_N, PDL, SPLITK)
    GB: tl.constexpr = BLOCK_K // GS
    GW: tl.constexpr = GS // 4  # words per group
    DT: tl.constexpr = x_ptr.dtype.element_ty
    rg = tl.arange(0, GB)
    rj = tl.arange(0, GS)
    rw = tl.arange(0, GW)
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32))
    row_words = tl.multiple_of(rn_safe.to(tl.int64) * (K // 4), 4)  # K is a multiple of GS >= 16
    x_offsets = (rg * GS)[:, None] + 4 * rw[None, :]  # a step's words' first inputs, from its first
    groups_top = rn_safe.to(tl.int64) * (K // GS)
    groups_bot = (rn_safe + HALF_N).to(tl.int64) * (K // GS)
    acc_top = tl.zeros((BLOCK_N, GB), dtype=tl.float32)
    acc_bot = tl.zeros((BLOCK_N, GB), dtype=tl.float32)
    # both halves' adapter B rows, loaded before the loop (lora_rows)
    b_top = fl.lora_rows(rn_safe, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
    b_bot = fl.lora_rows(rn_safe + HALF_N, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
    k_start = split * KS
    k_end = tl.minimum(K, split * KS + KS)
    for k0 in range(k_start, k_end, BLOCK_K):
        g = k0 // GS + rg
        word = (tl.multiple_of(k0 // 4, GW) + rg * GW)[:, None] + rw[None, :]  # k0: a multiple of BLOCK_K
        g_mask = k0 + rg * GS < k_end
        if EVEN_K:  # every group of the step is in the row
            words = tl.load(
                words_ptr + row_words[:, None, None] + word[None, :, :], eviction_policy="evict_first"
            )
            x_at = x_ptr + k0 + x_offsets
        else:  # the last step runs past the row: masked groups read nothing (their inputs: the row's first)
            words = tl.load(
                words_ptr + row_words[:, None, None] + word[None, :, :], mask=g_mask[None, :, None], other=0,
                eviction_policy="evict_first",
            )  # fmt: skip
            x_at = tl.where(g_mask[:, None], x_ptr + k0 + x_offsets, x_ptr)
        kk = (k0 + rg * GS)[:, None] + rj[None, :]
        x_sum = tl.sum(tl.load(x_ptr + kk, mask=g_mask[:, None], other=0.0).to(tl.float32), axis=1)[None, :]
        s_top, z_top, s_bot, z_bot = _gemv_scales(scale_ptr, zero_ptr, groups_top, groups_bot, g, g_mask)
        top, bot = _dot_words(words, x_at[None, :, :], DT)
        dot_top = tl.sum(top, axis=2)
        dot_bot = tl.sum(bot, axis=2)
        if not EVEN_K:
            dot_top = tl.where(g_mask[None, :], dot_top, 0.0)
            dot_bot = tl.where(g_mask[None, :], dot_bot, 0.0)
        acc_top += s_top * (dot_top - (z_top - 8.0) * x_sum)
        acc_bot += s_bot * (dot_bot - (z_bot - 8.0) * x_sum)
    _gemv_store(
        acc_top, acc_bot, b_top, b_bot, ws_ptr, cnt_ptr, rn, rn_safe, n_mask, row_block, split, N, y_ptr,
        stride_ym, bias_ptr, part_ptr, b_ptr, R, scale, stride_bn, sync_ptr, HAS_BIAS, LORA, SPLITS, BLOCK_S,
        BLOCK_R, BLOCK_N, SPLITK, PDL,
    )  # fmt: skip


# --------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------


def _layout(module):
    """The layer's packed weight, scale and zero, ``(W_q, scale, zero, N, K, group)``, when these
    kernels read its layout (4-bit ``4bit_u8``, ``axis=1``, plain scale/zero in the compute dtype), else None."""
    if type(module).__name__ != "HQQLinear":
        return None
    W_q, meta = getattr(module, "W_q", None), getattr(module, "meta", None)
    if (
        not torch.is_tensor(W_q)
        or type(W_q) not in (torch.Tensor, torch.nn.Parameter)
        or not isinstance(meta, dict)
    ):
        return None  # a DTensor (FSDP2, outside the forward) is not read here
    if meta.get("nbits") != 4 or meta.get("axis") != 1 or meta.get("packing") != "4bit_u8":
        return None
    if meta.get("view_as_float") or meta.get("quant_scale") or meta.get("quant_zero") or "zero_scale" in meta:
        return None
    scale, zero = meta.get("scale"), meta.get("zero")
    dtype = getattr(module, "compute_dtype", None)
    if not (torch.is_tensor(scale) and torch.is_tensor(zero)) or scale.dtype != dtype or zero.dtype != dtype:
        return None
    if meta.get("compute_dtype", torch.float16) != dtype:  # hqq unpacks to meta's dtype (fp16 without one)
        return None
    N, K = (int(d) for d in meta["shape"])
    group = int(meta["group_size"])
    if N % 2 or K % group or group & (group - 1) or W_q.dtype != torch.uint8 or W_q.numel() != N * K // 2:
        return None
    if scale.device != W_q.device or zero.device != W_q.device or scale.numel() != N * K // group:
        return None
    if not (W_q.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()):
        return None
    return W_q, scale, zero, N, K, group


def _storage(module, x):
    """:func:`_layout` when this kernel can reproduce the layer's forward on ``x``, else None."""
    found = _layout(module)
    if found is None or found[1].dtype != x.dtype or found[0].device != x.device or found[4] != x.shape[-1]:
        return None
    return found


def fused_lora_linear(
    module, x, xa, A, B, scale, *, config=None, lora_mode=None, force=False, pdl=None, kernel=None
):  # fmt: skip
    """``HQQLinear(x) + scale * (xa @ A.T) @ B.T`` (``A is None``: the base), or ``None`` when not served.

    Above :data:`MAX_TOKENS` rows: :func:`dequantize` and cuBLAS
    (``fused_lora.dense_lora_linear``), which is what hqq's PyTorch backend
    does, less its several elementwise launches. ``kernel``
    (``"gemv"``, ``"word"`` or ``"mma"``) overrides :data:`ONE_TOKEN` for one token;
    ``config``, ``lora_mode``, ``pdl`` and ``force`` as in
    ``quantplug_bnb._cuda_kernels`` (tuning, tests).
    """
    found = fl.admit(
        module, x, xa, A, B, _storage, serve=SERVE or force, max_tokens=None if DENSE else MAX_TOKENS
    )
    if found is None:
        return None
    M, W_q, w_scale, w_zero, N, K, group = found
    bias = getattr(module, "bias", None)
    if M > MAX_TOKENS:
        weight = _dequantize(W_q, w_scale, w_zero, N, K, group)
        return fl.dense_lora_linear(x, weight, bias, xa, A, B, scale)
    choice = (kernel or ONE_TOKEN) if M == 1 else "mma"
    if choice not in ("gemv", "word", "mma"):
        raise ValueError(f"kernel={choice!r}: one of 'gemv', 'word', 'mma'")
    if choice == "word" and (group % 16 or W_q.data_ptr() % 4):
        # it reads W_q as 32-bit words (and a word's four inputs in one 64-bit load: x_align); asked for by
        # name it declines, as the default it leaves the call to the float32 GEMV
        if kernel == "word":
            return None
        choice = "gemv"
    gemv = choice != "mma"
    config = config or CONFIGS[choice if gemv else 1 if M == 1 else 16]
    block_k = fl.group_block_k(K, group, config[1])
    if block_k is None:
        return None
    fn = {"gemv": _hqq4_gemv_kernel, "word": _hqq4_word_gemv_kernel, "mma": _hqq4_lora_kernel}[choice]
    return fl.launch(
        fn, module, x, xa, A, B, scale, (W_q, w_scale, w_zero),
        bias, N=N, rows=N // 2, block_m=1 if gemv else 16, block_k=block_k, config=config,
        one_launch=ONE_LAUNCH, lora_mode=lora_mode, pdl=pdl, x_align=8 if choice == "word" else 1,
        shrink_slices=ONE_TOKEN_SHRINK_SLICES if gemv else None, GS=group,
    )  # fmt: skip


# --------------------------------------------------------------------------
# Dequantization (the lean training backward's dx, and the forward above the GEMV range)
# --------------------------------------------------------------------------


@triton.jit
def _hqq4_dequant_kernel(
    w_ptr, scale_ptr, zero_ptr, out_ptr, HALF_N, K,
    GS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
):  # fmt: skip
    # A (BLOCK_N byte rows, GROUPS groups, GS inputs) tile of W_q to both halves of the weight, rounded as
    # hqq's dequantize: (q - zero), then * scale, each rounded to the compute dtype (PyTorch's CUDA
    # elementwise ops compute in float32 and round once, as here).
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    rj = tl.arange(0, GS)
    n_mask = (rn < HALF_N)[:, None]
    gk = K // GS
    mask = n_mask & (g < gk)[None, :]
    at = rn.to(tl.int64)[:, None, None] * K + (g * GS)[None, :, None] + rj[None, None, :]
    packed = tl.load(w_ptr + at, mask=mask[:, :, None], other=0)
    dtype = out_ptr.dtype.element_ty
    for half in tl.static_range(2):
        groups = (rn + half * HALF_N).to(tl.int64)[:, None] * gk + g[None, :]
        s = tl.load(scale_ptr + groups, mask=mask, other=0.0).to(tl.float32)[:, :, None]
        z = tl.load(zero_ptr + groups, mask=mask, other=0.0).to(tl.float32)[:, :, None]
        q = _nibble(((packed >> 4) if half == 0 else (packed & 15)).to(tl.int32))
        w = ((q - z).to(dtype).to(tl.float32) * s).to(dtype)
        tl.store(out_ptr + at + (half * HALF_N).to(tl.int64) * K, w, mask=mask[:, :, None])


# (BLOCK_N byte rows, groups per program, num_warps) at groups of 64: 16 KB of codes per program; larger
# groups take fewer per program, then fewer rows, to stay near that
DEQUANT_CONFIG = (16, 16, 4)


def _dequantize(W_q, scale, zero, N, K, group):
    half = N // 2
    out = torch.empty((N, K), device=W_q.device, dtype=scale.dtype)
    block_n, groups, warps = DEQUANT_CONFIG
    budget = block_n * groups * 64  # codes per program (group is a power of two)
    block_n = max(1, min(block_n, budget // group))
    groups = max(1, min(groups, budget // (block_n * group), fl.next_power_of_2(K // group)))
    grid = (fl.cdiv(half, block_n), fl.cdiv(K // group, groups))
    # Triton launches on the current device: the weight's, which need not be the current one
    with torch.cuda.device(W_q.device) if W_q.is_cuda else contextlib.nullcontext():
        _hqq4_dequant_kernel[grid](
            W_q, scale, zero, out, half, K, GS=group, BLOCK_N=block_n, GROUPS=groups, num_warps=warps
        )
    return out


def dequantize(module) -> torch.Tensor | None:
    """The layer's dense weight, bit for bit ``HQQLinear.dequantize()``, in one launch; None when its
    layout is not the one read here, off CUDA (unless interpreted) or under ``torch.compile``."""
    found = _layout(module)
    if found is None or torch.compiler.is_compiling() or not (found[0].is_cuda or fl.INTERPRET):
        return None
    with torch.no_grad():
        return _dequantize(*found)


usable = fl.usable
