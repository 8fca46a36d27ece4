"""Fused 4-bit GEMV + LoRA for bitsandbytes ``Linear4bit`` on CUDA (Triton), for 1-16 tokens.

Registered for the op ``fused_lora_linear`` (backend ``bnb``, device
``cuda``, bf16/fp16) by this plugin's ``quantplug_register_kernels`` when
Triton and a CUDA device are there; nothing here is imported otherwise.

What it reads: bitsandbytes' own storage, untouched (no repack): the packed
``weight`` (two 4-bit codes per byte, the first element in the high
nibble, row-major over the ``(out, in)`` weight), ``quant_state.code`` (the
16-entry NF4 or FP4 table), ``quant_state.absmax`` (float32 per block of
``blocksize`` elements, or, nested, uint8 codes into ``state2.code`` times
``state2.absmax`` per 256 blocks, plus ``offset``), and the bias. The
codes are looked up in registers (``_ptx``). At 2-16 tokens each program
dequantizes its ``BLOCK_N`` rows (table value times absmax, in the compute
dtype) and multiplies them by the input rows on tensor cores. At one token
each packed word's eight products are summed in the compute dtype (as
bitsandbytes' own GEMV rounds its products), then in float32 per absmax
block, times the absmax.

The adapter (its shrink as its own launch, or in the same launch with
:data:`ONE_LAUNCH`), split-K (``SPLITK`` in :data:`CONFIGS`), the epilogue
and the launcher are the core's, shared by every plugin's fused kernel
(``quantplug.plugin.fused_lora``); this module holds the format: the checks
on the storage, the tile dequantization and its config table.

It serves a call only when it can reproduce the layer's forward: CUDA
tensors in bf16/fp16 matching the layer's compute dtype, no autograd, at
most :data:`MAX_TOKENS` rows, rank at most :data:`MAX_RANK`, ``in_features``
a multiple of the blocksize, a ``Params4bit`` not repacked for bitsandbytes'
CPU kernel; otherwise it returns ``None`` and the core takes the library's
own forward plus ``lora_linear``. Under ``torch.compile`` it also returns
``None`` (the core's compiled path serves), and so it does for one token's
base alone outside a CUDA-graph capture, after the layer's first
(:data:`LIBRARY_EAGER_ONE_TOKEN_BASE`).
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl
from quantplug.plugin import fused_lora as fl

from quantplug_bnb import _ptx

# The core's limits and per-layer counters; ONE_LAUNCH: the adapter's shrink inside the GEMV launch
# (LORA=2), off (quantplug._fused says why)
DTYPES, MAX_TOKENS, MAX_RANK, ONE_LAUNCH, _sync = fl.DTYPES, fl.MAX_TOKENS, fl.MAX_RANK, False, fl.sync
# (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLITK): "gemv" for one token (_nf4_gemv_kernel), 16 for 2-16
# tokens (the main kernel, on tensor cores); from scripts/tune_fused.py's sweeps on an H100 (2026-12-06, with
# the adapter: the one-token one after the word GEMV, the 16-token one after the register lookup).
CONFIGS = {"gemv": (2, 2048, 2, 1, 1), 16: (32, 128, 4, 4, 2)}
# The adapter's shrink slices at one token. A GEMV program here (two rows, two warps) is short: the shrink must be
# done early, so many short slices. On an H100 (2026-12-06, fourth session, wrapped layer, side by side) 32 slices
# took 9.30 / 23.89 / 18.90 us at 4096x4096 / 4096x14336 / 11008x4096; 16 took 9.70 / 25.16 / 19.70, 64 took
# 9.57 / 24.47 / 19.25 (scripts/tune_fused.py --shrink-slices times them).
ONE_TOKEN_SHRINK_SLICES = 32
# Whether the layer's forward uses this kernel. On an H100 (bitsandbytes 0.50.2, Triton 3.6, 2026-12-06) the
# kernel with the r=16 adapter takes 0.81-0.88x what bitsandbytes' own bare GEMV takes at one token (4096x4096:
# 9.52 against 10.85 us), and at 16 tokens half of what its dequantize and matmul take (21.2 against 38.4 us):
# the wrapped layer is faster than the library's forward plus the adapter at every size up to 16 tokens
# (docs/performance.md). ``fused_lora_linear(..., force=True)`` runs it when off.
SERVE = True
# Whether calls above MAX_TOKENS rows are served too (no: the library's own forward serves them).
DENSE = False
# Whether one token's base alone (adapters disabled or merged, adapter_names= batches, DoRA) is left to
# bitsandbytes' own GEMV outside a CUDA-graph capture. Its GPU time is close to this kernel's (a graph at
# 4096x4096, H100: bitsandbytes' bare layer 10.8 us, this kernel with an adapter 9.0), and it is one C++ op,
# while this kernel's launch from Python costs the host tens of microseconds: an eager decode waits on the
# host (LLaMA-1.1B, one H100 run: merged on this kernel 33.8 tokens/s; adapters disabled on the library's
# forward 43.7). Captured, this kernel serves it. A layer's first such call still runs it (_BASE_LOADED):
# Triton loads a kernel into the GPU on its first launch, which a capture does not permit, so the eager
# warm-up before a capture must have launched it.
LIBRARY_EAGER_ONE_TOKEN_BASE = True
_BASE_LOADED: weakref.WeakSet = weakref.WeakSet()  # layers whose one-token base alone ran here once


# inline PTX: on NVIDIA GPUs, not in Triton's interpreter nor on ROCm (the table in memory there)
_PTX = tl.constexpr(not fl.INTERPRET and torch.version.hip is None)
_PLANES_BF16_ASM = tl.constexpr(_ptx.table_planes("bf16x2"))
_PLANES_FP16_ASM = tl.constexpr(_ptx.table_planes("f16x2"))
_DOT_BF16_ASM = tl.constexpr(_ptx.dot_word("bf16x2"))
_DOT_FP16_ASM = tl.constexpr(_ptx.dot_word("f16x2"))
_LOOKUP_BF16_ASM = tl.constexpr(_ptx.lookup_scaled("bf16x2"))
_LOOKUP_FP16_ASM = tl.constexpr(_ptx.lookup_scaled("f16x2"))


@triton.jit
def _plane_words(code_ptr, first, dtype: tl.constexpr):
    # table entries first..first+3 in dtype: their high bytes in one 32-bit word, their low bytes in another
    high = tl.zeros((), tl.int32)
    low = tl.zeros((), tl.int32)
    for t in tl.static_range(4):
        bits = tl.load(code_ptr + first + t).to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        high |= (bits >> 8) << (8 * t)
        low |= (bits & 255) << (8 * t)
    return high, low


@triton.jit
def _table_planes(code_ptr, dtype: tl.constexpr):
    # the 16-entry code table in dtype as the byte planes the asm reads (_ptx.PLANES): H0-H3, then L0-L3; by
    # inline PTX (_ptx.table_planes: four vector loads, eight packing cvt), else from sixteen scalar loads
    if _PTX:
        return tl.inline_asm_elementwise(
            _PLANES_FP16_ASM if dtype == tl.float16 else _PLANES_BF16_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,l",
            [code_ptr.to(tl.int64)], dtype=(tl.int32,) * 8, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        h0, l0 = _plane_words(code_ptr, 0, dtype)
        h1, l1 = _plane_words(code_ptr, 4, dtype)
        h2, l2 = _plane_words(code_ptr, 8, dtype)
        h3, l3 = _plane_words(code_ptr, 12, dtype)
        return h0, h1, h2, h3, l0, l1, l2, l3


@triton.jit
def _gather(packed, code_ptr):
    # (high-nibble, low-nibble) float32 table values from the table in memory (interpreter, ROCm)
    return tl.load(code_ptr + (packed >> 4).to(tl.int32)), tl.load(code_ptr + (packed & 15).to(tl.int32))


@triton.jit
def _byte_dot(byte, pair, code_ptr, dtype: tl.constexpr):
    # a packed byte's two weights (table values from memory) times its input pair, in float32
    first, second = fl.pair_floats(pair, dtype)
    return tl.load(code_ptr + ((byte >> 4) & 15)) * first + tl.load(code_ptr + (byte & 15)) * second


@triton.jit
def _dot_words(words, x_at, planes, code_ptr, dtype: tl.constexpr):
    # float32 sums of each packed word's eight table values times their inputs (x_at: int32 pointers to each
    # word's four input pairs, 16-byte aligned; a pair's first element in its low half). In registers by inline
    # PTX, which also loads the inputs: two partial sums of four products each in dtype (_ptx.dot_word), then
    # float32; else the table from memory, in float32.
    if not _PTX:
        total = _byte_dot(words & 255, tl.load(x_at), code_ptr, dtype)
        total += _byte_dot((words >> 8) & 255, tl.load(x_at + 1), code_ptr, dtype)
        total += _byte_dot((words >> 16) & 255, tl.load(x_at + 2), code_ptr, dtype)
        return total + _byte_dot((words >> 24) & 255, tl.load(x_at + 3), code_ptr, dtype)
    else:
        h0, h1, h2, h3, l0, l1, l2, l3 = planes
        sums = tl.inline_asm_elementwise(
            _DOT_FP16_ASM if dtype == tl.float16 else _DOT_BF16_ASM, "=r,r,l" + ",r" * 8,
            [words, x_at.to(tl.int64), h0, h1, h2, h3, l0, l1, l2, l3], dtype=tl.int32, is_pure=True, pack=1,
        )  # fmt: skip
        firsts, seconds = fl.pair_floats(sums, dtype)  # each byte's first elements' products, its seconds'
        return firsts + seconds


@triton.jit
def _lookup_scaled(packed, planes, absmax, code_ptr, dtype: tl.constexpr):
    # the dequantized tile: table values times absmax (float32, broadcast to the tile), in dtype; dequantize_4bit
    # rounds the float32 product once, the register lookup the table value and then the product (within one
    # unit in the last place)
    if not _PTX:
        hi, lo = _gather(packed, code_ptr)
        return (hi * absmax).to(dtype), (lo * absmax).to(dtype)
    else:
        h0, h1, h2, h3, l0, l1, l2, l3 = planes
        return tl.inline_asm_elementwise(
            _LOOKUP_FP16_ASM if dtype == tl.float16 else _LOOKUP_BF16_ASM, "=r,=r,=r,=r,r" + ",r" * 34,
            [packed, h0, h1, h2, h3, l0, l1, l2, l3, absmax.to(dtype)], dtype=(dtype.value, dtype.value), is_pure=True, pack=4,
        )  # fmt: skip


@triton.jit
def _nf4_lora_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, abs2_ptr, code2_ptr, offset_ptr, bias_ptr, xa_ptr, a_ptr, b_ptr, part_ptr,
    sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS, stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SHRINK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, SPLITK: tl.constexpr,
    PDL: tl.constexpr,
    BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr,
):  # fmt: skip
    ticket = fl.program_ticket(
        xa_ptr, a_ptr, part_ptr, sync_ptr, M, KA, R, stride_xam, stride_ar, LORA, SPLITS, K_PER_SPLIT, SHRINK_K, BLOCK_R,
        PDL,
    )  # fmt: skip
    if ticket >= SPLITS:  # a GEMV program (below SPLITS: a shrink slice, done in program_ticket)
        HALF: tl.constexpr = BLOCK_K // 2
        G: tl.constexpr = BLOCK_K // BS
        row_block, split, rn, n_mask, rn_safe, rm, m_mask = fl.program_tile(
            ticket, SPLITS, GRID_N, N, M, BLOCK_M, BLOCK_N
        )
        rj = tl.arange(0, HALF)
        rk = tl.arange(0, BLOCK_K)
        rg = tl.arange(0, G)
        row_bytes = tl.multiple_of(
            rn_safe.to(tl.int64) * (K // 2), 16
        )  # K is a multiple of BS >= 64: 16-byte rows
        row_groups = rn_safe.to(tl.int64) * (K // BS)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        planes = _table_planes(code_ptr, x_ptr.dtype.element_ty)
        b_rows = fl.lora_rows(rn_safe, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
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
            if NESTED:
                q = tl.load(absmax_ptr + g, mask=g_mask, other=0).to(tl.int32)
                absmax = tl.load(code2_ptr + q) * tl.load(abs2_ptr + g // BS2, mask=g_mask, other=0.0)
                absmax += tl.load(offset_ptr)
            else:
                absmax = tl.load(absmax_ptr + g, mask=g_mask, other=0.0)
            absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (BLOCK_N, G, BS // 2)), (BLOCK_N, HALF))
            hi, lo = _lookup_scaled(packed, planes, absmax, code_ptr, xt.dtype)
            x_even, x_odd = tl.split(tl.reshape(xt, (BLOCK_M, HALF, 2)))
            acc = tl.dot(x_even, tl.trans(hi), acc)
            acc = tl.dot(x_odd, tl.trans(lo), acc)
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
def _nf4_gemv_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, abs2_ptr, code2_ptr, offset_ptr, bias_ptr, xa_ptr, a_ptr, b_ptr, part_ptr,
    sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS, stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SHRINK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, SPLITK: tl.constexpr,
    PDL: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr,
):  # fmt: skip
    # One token. A step reads a (BLOCK_N rows, GB blocks, HW words) tile of packed 32-bit words straight from
    # bitsandbytes' layout (eight codes a word); each word's eight products are summed in registers and each
    # thread keeps float32 sums per (row, block), so the only cross-thread sums are one per block of words and
    # one at the end: no reshapes, no per-step reductions across the row block.
    row_block, split, rn, n_mask, rn_safe = fl.gemv_program(GRID_N, N, BLOCK_N, PDL, SPLITK)
    HW: tl.constexpr = BS // 8  # packed words per absmax block
    GB: tl.constexpr = BLOCK_K // BS  # absmax blocks per step
    rg = tl.arange(0, GB)
    rw = tl.arange(0, HW)
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32))
    x_pairs = x_ptr.to(tl.pointer_type(tl.int32))  # the launcher makes x 16-byte aligned
    row_words = tl.multiple_of(rn_safe.to(tl.int64) * (K // 8), 4)  # K is a multiple of BS >= 32
    row_blocks = rn_safe.to(tl.int64) * (K // BS)
    x_offsets = 4 * ((rg * HW)[:, None] + rw[None, :])  # a step's words' first input pairs, from its first
    acc = tl.zeros((BLOCK_N, GB), dtype=tl.float32)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    planes = _table_planes(code_ptr, DT)
    b_rows = fl.lora_rows(rn_safe, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
    for k0 in range(split * KS, tl.minimum(K, split * KS + KS), BLOCK_K):
        g = k0 // BS + rg
        word = (tl.multiple_of(k0 // 8, HW) + rg * HW)[:, None] + rw[None, :]  # k0: a multiple of BLOCK_K
        blocks = row_blocks[:, None] + g[None, :]
        if EVEN_K:
            words = tl.load(
                words_ptr + row_words[:, None, None] + word[None, :, :], eviction_policy="evict_first"
            )
            if NESTED:
                q = tl.load(absmax_ptr + blocks).to(tl.int32)
                absmax = tl.load(code2_ptr + q) * tl.load(abs2_ptr + blocks // BS2) + tl.load(offset_ptr)
            else:
                absmax = tl.load(absmax_ptr + blocks)
            sums = tl.sum(
                _dot_words(words, (x_pairs + k0 // 2 + x_offsets)[None, :, :], planes, code_ptr, DT), axis=2
            )
        else:  # the last step runs past the row: masked blocks read nothing (their inputs: the row's first)
            g_mask = g < K // BS
            words = tl.load(
                words_ptr + row_words[:, None, None] + word[None, :, :], mask=g_mask[None, :, None], other=0,
                eviction_policy="evict_first",
            )  # fmt: skip
            if NESTED:
                q = tl.load(absmax_ptr + blocks, mask=g_mask[None, :], other=0).to(tl.int32)
                abs2 = tl.load(abs2_ptr + blocks // BS2, mask=g_mask[None, :], other=0.0)
                absmax = tl.load(code2_ptr + q) * abs2 + tl.load(offset_ptr)
            else:
                absmax = tl.load(absmax_ptr + blocks, mask=g_mask[None, :], other=0.0)
            x_at = tl.where(g_mask[:, None], x_pairs + k0 // 2 + x_offsets, x_pairs)
            sums = tl.sum(_dot_words(words, x_at[None, :, :], planes, code_ptr, DT), axis=2)
            sums = tl.where(g_mask[None, :], sums, 0.0)
        acc += sums * absmax
    fl.gemv_store(
        acc, y_ptr, rn, rn_safe, n_mask, row_block, split, N, ws_ptr, cnt_ptr, stride_ym, bias_ptr, part_ptr, b_ptr,
        R, scale, stride_bn, sync_ptr, HAS_BIAS, LORA, SPLITS, BLOCK_S, BLOCK_R, BLOCK_N, SPLITK, PDL, b_rows,
    )  # fmt: skip


# --------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------


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
    if code is None or code.numel() != 16 or code.device != x.device or code.dtype != torch.float32:
        return None
    if code.data_ptr() % 16 or not code.is_contiguous():
        return None  # the table planes' asm reads the table in four 16-byte loads
    return packed, state, N, K, blocksize


def fused_lora_linear(
    module, x, xa, A, B, scale, *, config=None, lora_mode=None, force=False, pdl=None
):  # fmt: skip
    """``Linear4bit(x) + scale * (xa @ A.T) @ B.T``, or ``None`` when not served here.

    ``A is None``: the base alone. ``config`` (a :data:`CONFIGS` entry),
    ``lora_mode`` (0: base only, 1: shrink launched first, 2: one launch),
    and ``pdl`` are the tuning script's; ``force`` runs it where
    :data:`SERVE` is off.
    """
    found = fl.admit(module, x, xa, A, B, _storage, serve=SERVE or force)
    if found is None:
        return None
    M, packed, state, N, K, blocksize = found
    if A is None and M == 1 and LIBRARY_EAGER_ONE_TOKEN_BASE and not force and not fl.capturing():
        if module in _BASE_LOADED:
            return None
        _BASE_LOADED.add(module)
    block_m = fl.token_block(M)
    gemv = block_m == 1
    config = config or CONFIGS["gemv" if gemv else block_m]
    block_k = fl.group_block_k(K, blocksize, config[1])
    if block_k is None or (gemv and (blocksize % 8 or packed.data_ptr() % 4)):
        return None  # the one-token kernel reads the codes as 32-bit words, and a word's inputs in one load
    nested = bool(getattr(state, "nested", False))
    if nested:
        state2 = state.state2
        absmax, offset = state.absmax, state.offset
        abs2, code2, bs2 = state2.absmax, state2.code, state2.blocksize
        if not torch.is_tensor(offset):
            return None
    else:
        absmax = state.absmax
        abs2 = code2 = offset = absmax
        bs2 = 1
    if absmax.dtype != (torch.uint8 if nested else torch.float32):
        return None
    return fl.launch(
        _nf4_gemv_kernel if gemv else _nf4_lora_kernel, module, x, xa, A, B, scale,
        (packed, absmax, state.code, abs2, code2, offset), getattr(module, "bias", None), N=N, rows=N,
        block_m=block_m, block_k=block_k, config=config, one_launch=ONE_LAUNCH,
        lora_mode=lora_mode, pdl=pdl, x_align=16 if gemv else 1,
        shrink_slices=ONE_TOKEN_SHRINK_SLICES if gemv else None, BS=blocksize, BS2=bs2, NESTED=nested,
    )  # fmt: skip


usable = fl.usable
