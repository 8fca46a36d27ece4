"""Fused 4-bit GEMV + LoRA for gptqmodel's packed GPTQ layers on CUDA (Triton), for 1-16 tokens.

Registered for the op ``fused_lora_linear`` (backend ``gptq``, device
``cuda``, bf16/fp16) by this plugin's ``quantplug_register_kernels`` when
Triton and a CUDA device are there; nothing here is imported otherwise.

What it reads: gptqmodel's own storage, untouched (no repack), as its
packed torch and Triton layers keep it (``TorchLinear``, ``TritonV2Linear``:
``PackableQuantLinear`` with ``REQUIRES_FORMAT_V2``): ``qweight``
``(in / 8, out)`` int32, input ``8 w + j`` of output ``n`` in bits ``4 j``
to ``4 j + 3`` of word ``(w, n)``; ``qzeros`` ``(groups, out / 8)`` int32,
the zero point of ``(g, n)`` in bits ``4 (n % 8)`` of word ``(g, n / 8)``
(the true zero: format v2); ``scales`` ``(groups, out)``; the bias. The
weight is ``scales[g] * (code - zero[g])`` with ``g = k / group_size``
(gptqmodel's ``dequantize_weight``).

Because the words run down the input dimension, a program takes a block
of output columns and steps down the rows of words, each read whole by
its threads (coalesced along the outputs). One token (the GEMV): each code
goes into the mantissa of 1.0 (``1 + q / 16``, a shift and an and-or), so
a group's sum is ``scale * (16 sum((1 + q/16) x) - (16 + zero) sum(x))``
with no float subtract per weight; per-thread float32 sums are reduced
once at the end; the GPU gets its programs from split-K. 2-16 tokens: a
step's words are spread to ``(rows of words, 8 codes, columns)``,
dequantized in registers (``(code - zero) * scale`` in float32, rounded to
the compute dtype), taken as one ``(inputs, columns)`` operand in the
inputs' own order and multiplied on tensor cores: one dot a step.

The adapter, split-K, the epilogue and the launcher are the core's
(``quantplug.plugin.fused_lora``); this module holds the format.

It serves a call only when it can reproduce the layer's forward: a packed
4-bit layer (32-bit words, not planar) whose groups follow the input order
(``g_idx[k] == k // group_size``: no act-order permutation; checked once per
``g_idx`` by ``_layers.groups_in_order``, first when the layer is wrapped),
no gptqmodel adapter or online Hadamard rotation, CUDA tensors in bf16/fp16,
no autograd, at most :data:`MAX_TOKENS` rows and rank at most
:data:`MAX_RANK`; otherwise it returns ``None`` and the core takes the
library's own forward plus ``lora_linear``. Under ``torch.compile`` it also
returns ``None``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantplug.plugin import fused_lora as fl

from quantplug_gptqmodel._classes import mro_names
from quantplug_gptqmodel._int4 import code_values, mantissa
from quantplug_gptqmodel.gptq import _layers

DTYPES, MAX_TOKENS, MAX_RANK, ONE_LAUNCH = fl.DTYPES, fl.MAX_TOKENS, fl.MAX_RANK, False
# (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLITK): "gemv" for one token (_gptq4_gemv_kernel), 16 for 2-16
# tokens (_gptq4_lora_kernel, on tensor cores; its BLOCK_K is at least 128: eight codes a word, 16 rows of words a
# dot). From scripts/tune_fused.py --sweep on an H100 (2026-12-06, fifth session, with the adapter, 4096x4096):
# one token 10.40 us, the next (256, 256, 4, 1, 16) and (64, 256, 2, 1, 8) 10.83 and 11.05; 16 tokens 26.85 us,
# the next (64, 128, 4, 4, 4) and (64, 256, 4, 3, 2) 28.27 and 28.38. The GEMV's programs are short (split-K 16):
# its words run down the inputs, so a program takes columns, and only split-K gives the GPU enough programs.
CONFIGS = {"gemv": (64, 128, 1, 1, 16), 16: (64, 128, 4, 3, 4)}
# The adapter's shrink slices at one token (the core's default).
ONE_TOKEN_SHRINK_SLICES = 32
# Whether the layer's forward uses this kernel: gptqmodel's packed layers dequantize the whole weight on every
# call (TorchLinear) or in a launch of their own before the matmul (TritonV2Linear).
SERVE = True
# Whether calls above MAX_TOKENS rows are served too (no: the library's own forward serves them).
DENSE = False


@triton.jit
def _group_params(s_ptr, qz_ptr, g, cols, N, mask):
    # the scale and zero point (float32) of groups ``g`` for output columns ``cols`` (contiguous, so that the
    # loads are vectors; masked past N), broadcast together
    s = tl.load(s_ptr + g * N + cols, mask=mask, other=0.0).to(tl.float32)
    zw = tl.load(qz_ptr + g * ((N + 7) // 8) + cols // 8, mask=mask, other=0)
    return s, ((zw >> ((cols % 8) * 4)) & 15).to(tl.float32)


@triton.jit
def _gptq4_lora_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, xa_ptr, a_ptr, b_ptr, part_ptr, sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS, stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SHRINK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, SPLITK: tl.constexpr,
    PDL: tl.constexpr, GS: tl.constexpr,
):  # fmt: skip
    ticket = fl.program_ticket(
        xa_ptr, a_ptr, part_ptr, sync_ptr, M, KA, R, stride_xam, stride_ar, LORA, SPLITS, K_PER_SPLIT, SHRINK_K, BLOCK_R,
        PDL,
    )  # fmt: skip
    if ticket >= SPLITS:  # a GEMV program (below SPLITS: a shrink slice, done in program_ticket)
        row_block, split, rn, n_mask, rn_safe, rm, m_mask = fl.program_tile(
            ticket, SPLITS, GRID_N, N, M, BLOCK_M, BLOCK_N
        )
        WR: tl.constexpr = BLOCK_K // 8  # rows of words a step
        rw = tl.arange(0, WR)
        rk = tl.arange(0, BLOCK_K)
        shifts = (4 * tl.arange(0, 8))[None, :, None]  # code j of a word: bits 4j to 4j+3
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b_rows = fl.lora_rows(rn_safe, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
        for k0 in range(split * KS, tl.minimum(K, split * KS + KS), BLOCK_K):
            w_row = k0 // 8 + rw
            row_ok = w_row < K // 8
            tile_ok = row_ok[:, None] & n_mask[None, :]
            words = tl.load(qw_ptr + w_row.to(tl.int64)[:, None] * N + rn[None, :], mask=tile_ok, other=0)
            s, z = _group_params(s_ptr, qz_ptr, ((w_row * 8) // GS)[:, None], rn[None, :], N, tile_ok)
            # (q - z) s, the step's eight codes a word spread to (rows, 8, columns) and then taken as
            # (inputs, columns) in their own order: one dot a step
            codes = (words[:, None, :] >> shifts) & 15
            w = (code_values(codes) * s[:, None, :] - (z * s)[:, None, :]).to(dtype)
            xt = tl.load(
                x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :],
                mask=m_mask[:, None] & (k0 + rk < K)[None, :],
                other=0.0,
            )
            acc = tl.dot(xt, tl.reshape(w, (BLOCK_K, BLOCK_N)), acc)
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
def _gptq4_gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, xa_ptr, a_ptr, b_ptr, part_ptr, sync_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KA, R, scale, GRID_N, KS, stride_xm, stride_xam, stride_ar, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SHRINK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, SPLITK: tl.constexpr,
    PDL: tl.constexpr, GS: tl.constexpr, GB: tl.constexpr, WG: tl.constexpr,
):  # fmt: skip
    # One token. A step reads a (GB groups, WG rows of words, BLOCK_N columns) tile of qweight: GB whole groups,
    # or part of one (GB = 1, WG * 8 < GS). Per group and column: scale * (16 D - (16 + zero) X), D the sum of
    # (1 + q/16) x over the group's words, X the sum of its inputs, taken per row of words: each thread keeps
    # float32 sums per (group slot, row, column), summed across rows and threads once at the end. Threads run
    # along the columns (four each); warps beyond the columns' split the rows.
    row_block, split, rn, n_mask, rn_safe = fl.gemv_program(GRID_N, N, BLOCK_N, PDL, SPLITK)
    rb = tl.arange(0, GB)
    rw = tl.arange(0, WG)
    cols = rn[None, None, :]  # contiguous (the loads are vectors), masked past N
    col_ok = n_mask[None, None, :]
    DT: tl.constexpr = x_ptr.dtype.element_ty
    x_pairs = x_ptr.to(tl.pointer_type(tl.int32))  # the launcher makes x 4-byte aligned
    # every tile is 3-D, (group slot, row of words, column), with 1 for the rows where a value is per group
    acc = tl.zeros((GB, WG, BLOCK_N), dtype=tl.float32)
    b_rows = fl.lora_rows(rn_safe, b_ptr, R, stride_bn, BLOCK_R) if LORA else None
    for k0 in range(split * KS, tl.minimum(K, split * KS + KS), BLOCK_K):
        slot_ok = k0 // GS + rb < K // GS  # the last step may run past the row (whole groups: K % GS == 0)
        g = (k0 // GS + rb)[:, None, None]
        g_ok = slot_ok[:, None, None]
        w_row = (k0 // 8 + rb * WG)[:, None, None] + rw[None, :, None]
        words = tl.load(
            qw_ptr + w_row.to(tl.int64) * N + cols, mask=g_ok & col_ok, other=0, eviction_policy="evict_first"
        )
        s, z = _group_params(s_ptr, qz_ptr, g, cols, N, g_ok & col_ok)
        # the inputs two at a time (one 32-bit load per pair, as float32 by a shift or two); per row of words
        # the sum of its eight products and of its eight inputs
        d = tl.zeros((GB, WG, BLOCK_N), dtype=tl.float32)
        xs = tl.zeros((GB, WG, 1), dtype=tl.float32)
        for i in tl.static_range(4):
            pair = tl.load(x_pairs + w_row * 4 + i, mask=g_ok, other=0)
            first, second = fl.pair_floats(pair, DT)
            d += mantissa(words, 2 * i) * first
            d += mantissa(words, 2 * i + 1) * second
            xs += first + second
        acc += s * (16.0 * d - (16.0 + z) * xs)
    per_slot = tl.trans(tl.sum(acc, axis=1))  # (columns, group slots) for the core's epilogue
    fl.gemv_store(
        per_slot, y_ptr, rn, rn_safe, n_mask, row_block, split, N, ws_ptr, cnt_ptr, stride_ym, bias_ptr, part_ptr,
        b_ptr, R, scale, stride_bn, sync_ptr, HAS_BIAS, LORA, SPLITS, BLOCK_S, BLOCK_R, BLOCK_N, SPLITK, PDL, b_rows,
    )  # fmt: skip


# --------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------


def _storage(module, x):
    """``(qweight, qzeros, scales, N, K, group)`` when this kernel can reproduce the layer's forward, else None."""
    if "PackableQuantLinear" not in mro_names(module) or _layers.layout(module) != _layers.PACKED:
        return None
    if getattr(module, "bits", None) != 4 or getattr(module, "pack_dtype_bits", 32) != 32:
        return None
    if getattr(module, "planar", False) or getattr(module, "adapter", None) is not None:
        return None
    if getattr(module, "online_full_had", False) or getattr(module, "online_partial_had", False):
        return None
    qweight, qzeros, scales = module.qweight, getattr(module, "qzeros", None), getattr(module, "scales", None)
    K, N = int(module.in_features), int(module.out_features)
    if not (torch.is_tensor(qzeros) and torch.is_tensor(scales)) or x.shape[-1] != K or K % 8:
        return None
    groups = scales.shape[0] if scales.dim() == 2 else 0
    if not groups or K % groups or (K // groups) % 8:
        return None
    group = K // groups
    if (
        tuple(qweight.shape) != (K // 8, N)
        or tuple(qzeros.shape) != (groups, (N + 7) // 8)
        or tuple(scales.shape) != (groups, N)
        or qweight.dtype != torch.int32
        or qzeros.dtype != torch.int32
        or scales.dtype not in (torch.float16, torch.bfloat16, torch.float32)
    ):
        return None
    if any(t.device != x.device or not t.is_contiguous() for t in (qweight, qzeros, scales)):
        return None
    if not _layers.groups_in_order(module, group):
        return None
    return qweight, qzeros, scales, N, K, group


def fused_lora_linear(
    module, x, xa, A, B, scale, *, config=None, lora_mode=None, force=False, pdl=None
):  # fmt: skip
    """``layer(x) + scale * (xa @ A.T) @ B.T`` on a packed GPTQ layer, or ``None`` when not served here.

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
    if gemv:  # whole groups a step, or a power-of-two part of one
        block_k = min(config[1], fl.next_power_of_2(K))
        if block_k >= group:
            block_k -= block_k % group
            groups_per_step, rows_per_group = block_k // group, group // 8
        elif group % block_k == 0:
            groups_per_step, rows_per_group = 1, block_k // 8
        else:
            return None
        if groups_per_step & (groups_per_step - 1) or rows_per_group & (rows_per_group - 1):
            return None  # tile sides are powers of two
        kernel, own = _gptq4_gemv_kernel, {"GB": groups_per_step, "WG": rows_per_group}
    else:
        block_k = max(128, min(config[1], fl.next_power_of_2(K)))
        kernel, own = _gptq4_lora_kernel, {}
    return fl.launch(
        kernel, module, x, xa, A, B, scale, (qweight, qzeros, scales), getattr(module, "bias", None), N=N, rows=N,
        block_m=block_m, block_k=block_k, config=config, one_launch=ONE_LAUNCH, lora_mode=lora_mode, pdl=pdl,
        x_align=4 if gemv else 1, shrink_slices=ONE_TOKEN_SHRINK_SLICES if gemv else None, GS=group, **own,
    )  # fmt: skip


usable = fl.usable
