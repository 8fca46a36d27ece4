"""The shared part of the plugins' fused quantized-GEMV + LoRA Triton kernels (op ``fused_lora_linear``).

Plugins reach it as ``quantplug.plugin.fused_lora`` (this module, imported
on first access: it imports Triton) and register their kernel with
``quantplug.plugin.register_fused_lora`` (``quantplug._fused_register``,
which imports nothing until it is called). A plugin's ``_cuda_kernels.py``
keeps only its format: a ``_storage`` that finds the layer's packed
weight, a one-token GEMV kernel and a 2-16 token main kernel (tensor cores)
that dequantize their tiles in registers, and its config table
(``CONFIGS["gemv"]``, ``CONFIGS[16]``; a plugin whose main kernel may also
serve one token says which with ``ONE_TOKEN`` and ``CONFIGS[1]``, as hqq
does, and ``scripts/tune_fused.py`` times both). Everything else is here:

- programmatic dependent launch (:data:`PDL`, Hopper and later): the shrink
  launch lets the GEMV launch start at once (:func:`gdc_launch_dependents`
  after its own :func:`gdc_wait`); a kernel's ``PDL`` constexpr is 1 (wait
  for the previous kernel at the start: no shrink before it), 2 (wait only
  before the adapter's expand, in :func:`lora_shrunk`) or 0 (off);
- a one-token GEMV program's place (:func:`gemv_program`) and its per-thread
  partial sums summed once and split-K'd (:func:`gemv_reduce`);
- the adapter: the shrink ``xa @ A.T`` as its own short launch
  (:func:`shrink_kernel`, :data:`SHRINK_SPLITS` programs: 32 for one
  token unless the plugin asks for fewer, 2 for more; one slice of the
  input each, into a float32 scratch)
  before the GEMV (``LORA=1``), or inside the GEMV launch (``LORA=2``,
  :func:`program_ticket`): the first ``SPLITS`` programs to start (a ticket
  from an atomic counter, so they are always running, never waiting)
  compute the slices, and the GEMV programs wait for their
  counter in :func:`lora_shrunk` before the expand ``t @ B.T`` (whose
  ``B`` rows they load before their loop, :func:`lora_rows`); the last
  program out resets the counters (:func:`finish`). The counters belong to
  the layer (:data:`sync`, a small int32 tensor per layer, made on its first
  eager call; one layer never runs on two streams at once);
- a GEMV program's tile (:func:`program_tile`) and split-K (``SPLITK`` in a
  plugin's config): each row block's input range is split over programs
  that store float32 partial sums (:func:`splitk_store`); the last to arrive
  (:func:`splitk_arrive`, a per-row-block counter in :data:`counters`, reset
  by it) sums them (:func:`splitk_sum`; all three for one accumulator:
  :func:`splitk_reduce`) and runs the epilogue (:func:`store_rows`: bias,
  adapter, store). A layer first called under CUDA-graph capture has no
  counters yet and runs unsplit;
- the launcher, in ``quantplug._fused_launch`` and re-exported here:
  :func:`admit` (the checks every kernel makes on the call), :func:`launch`
  (buffers, the shrink launch, split-K, the main launch). It reads this
  module's names at call time, so a tool that patches ``shrink_kernel``,
  ``INTERPRET`` or ``capability`` here changes what it launches.

A main kernel's signature: the plugin's own pointers (``x_ptr`` first,
``bias_ptr`` last), then ``xa_ptr, a_ptr, b_ptr, part_ptr, sync_ptr, y_ptr,
ws_ptr, cnt_ptr, M, N, K, KA, R, scale, GRID_N, KS, stride_xm, stride_xam,
stride_ar, stride_bn, stride_ym`` and the constexprs ``HAS_BIAS, LORA,
SPLITS, K_PER_SPLIT, SHRINK_K, BLOCK_S, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K,
USE_DOT, EVEN_K, SPLITK, PDL`` plus its own, as :func:`launch` passes them
(a GEMV kernel has the same signature with ``BLOCK_M = 1``). A main
kernel's body: :func:`program_ticket`; for a ticket from ``SPLITS`` up
:func:`program_tile`, :func:`lora_rows`, the format's loop over K,
split-K and :func:`store_rows`; :func:`finish` last. A GEMV kernel's:
:func:`gemv_program`, :func:`lora_rows`, the loop, then :func:`gemv_store`
(:func:`lora_shrunk` unsplit, :func:`gemv_reduce`, :func:`store_rows`), or
those three itself when its epilogue differs (a scale per row, two row
blocks).
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import triton
import triton.language as tl

DTYPES = (torch.bfloat16, torch.float16)
MAX_TOKENS = 16
MAX_RANK = 64

# TRITON_INTERPRET=1 runs these kernels on the CPU (scripts/check_fused_cpu.py)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The shrink's input slices (at most) per BLOCK_M (1: a GEMV, 16: a main kernel): one shrink program each, all
# summed (float32, 16 rows of R) in every program's epilogue. One token: many short slices, done before the short
# GEMV's epilogue (a plugin with longer GEMV programs passes fewer: ``launch(..., shrink_slices=)``). 2-16 tokens:
# two long slices hide under the main kernel, and 32 cost each program 32 KB of reads (H100, 2026-12-06, r=16:
# 32 -> 2 took the layer 8-18% faster at 16 tokens; at one token 2 slices were 4-37% slower).
SHRINK_SPLITS = {1: 32, 16: 2}
# Inputs a shrink program multiplies per step, per BLOCK_M: one token, a whole slice (up to 1024) in one step
SHRINK_STEP = {1: 1024, 16: 128}
# The shrink inside the GEMV launch (LORA=2) rather than its own launch before it (LORA=1): each plugin's
# ONE_LAUNCH, off in all three (on an H200 the ticket and counter atomics cost more than the extra launch).
sync: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> its int32 counters (LORA=2)
counters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> split-K arrivals per row block
# Programmatic dependent launch (Hopper and later, Triton's ``launch_pdl``): the shrink launch lets the GEMV
# launch start at once, so the GEMV's programs stream weights while the shrink runs and wait for it
# (``gdc_wait``) only before the adapter's expand; without it the GEMV starts after the shrink drains, about
# 2 us later. The GEMV without a shrink before it waits at its start (its input comes from any kernel).
_CUDA_EXTRA = getattr(getattr(tl, "extra", None), "cuda", None)
HAS_PDL = hasattr(_CUDA_EXTRA, "gdc_wait") and not INTERPRET
PDL = HAS_PDL and os.environ.get("QUANTPLUG_PDL", "1") != "0"

if HAS_PDL:

    @triton.jit
    def gdc_wait():
        tl.extra.cuda.gdc_wait()

    @triton.jit
    def gdc_launch_dependents():
        tl.extra.cuda.gdc_launch_dependents()

else:

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


# --------------------------------------------------------------------------
# Triton helpers, called from the plugins' main kernels
# --------------------------------------------------------------------------


@triton.jit
def shrink_slice(
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
def shrink_kernel(
    xa_ptr, a_ptr, part_ptr, M, KA, R, stride_xam, stride_ar,
    K_PER_SPLIT: tl.constexpr, SHRINK_K: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # the input is the previous kernel's; once it is complete the GEMV may launch (its x is ready too)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    shrink_slice(
        xa_ptr, a_ptr, part_ptr, tl.program_id(0), M, KA, R, stride_xam, stride_ar, K_PER_SPLIT, SHRINK_K, BLOCK_R
    )  # fmt: skip


@triton.jit
def program_ticket(
    xa_ptr, a_ptr, part_ptr, sync_ptr, M, KA, R, stride_xam, stride_ar,
    LORA: tl.constexpr, SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr, SHRINK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL == 1:  # launched early after any kernel: its output (our input) is complete only after the wait
        gdc_wait()
    # This program's place: below SPLITS (only in one launch, LORA == 2) it has computed a shrink slice;
    # from SPLITS up, ticket - SPLITS numbers the GEMV programs
    if LORA == 2:  # noqa: SIM108  (two statements read clearer in a kernel)
        ticket = tl.atomic_add(sync_ptr, 1)
    else:
        ticket = tl.program_id(0) + SPLITS
    if ticket < SPLITS:  # noqa: SIM102  (LORA == 2 is static, ticket < SPLITS is not)
        if LORA == 2:
            shrink_slice(
                xa_ptr, a_ptr, part_ptr, ticket, M, KA, R, stride_xam, stride_ar, K_PER_SPLIT, SHRINK_K, BLOCK_R
            )  # fmt: skip
            tl.debug_barrier()
            tl.atomic_add(sync_ptr + 1, 1, sem="release")
    return ticket


@triton.jit
def program_tile(ticket, SPLITS: tl.constexpr, GRID_N, rows, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # a GEMV program's tile: its row block and K split, its BLOCK_N output rows (of ``rows``) and BLOCK_M tokens
    row_block = (ticket - SPLITS) % GRID_N
    split = (ticket - SPLITS) // GRID_N
    rn = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < rows
    rn_safe = tl.where(n_mask, rn, 0)
    rm = tl.arange(0, BLOCK_M)
    m_mask = rm < M
    return row_block, split, rn, n_mask, rn_safe, rm, m_mask


@triton.jit
def gemv_program(GRID_N, rows, BLOCK_N: tl.constexpr, PDL: tl.constexpr, SPLITK: tl.constexpr = 0):
    # a one-token GEMV program (a plugin's ``*_gemv_kernel``): its row block, K split and BLOCK_N rows. SPLITK:
    # the kernel's (1: unsplit, no integer division, some 25 instructions a program); 0 (unknown) divides
    if PDL == 1:  # launched early after any kernel: its output (our input) is complete only after the wait
        gdc_wait()
    if SPLITK == 1:
        row_block = tl.program_id(0)
        split = 0
    else:
        row_block = tl.program_id(0) % GRID_N
        split = tl.program_id(0) // GRID_N
    rn = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < rows
    return row_block, split, rn, n_mask, tl.where(n_mask, rn, 0)


@triton.jit
def pair_floats(pair, dtype: tl.constexpr):
    # the two 16-bit floats (dtype: bf16 or fp16) packed in int32 words, as float32: the low half, then the high
    # half (a plugin's asm returns bf16x2/f16x2 sums so)
    if dtype == tl.bfloat16:  # bf16 -> float32 is a shift
        return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)
    else:
        low = (pair & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return low, (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def gemv_reduce(
    acc, ws_ptr, cnt_ptr, rn_safe, n_mask, row_block, split, N, BLOCK_N: tl.constexpr, SPLITK: tl.constexpr
):  # fmt: skip
    # a one-token GEMV's per-thread partial sums ``acc`` (BLOCK_N, any) summed once, then split-K:
    # ((1, BLOCK_N) float32, the token index (1,), whether this program finishes the row block)
    total = tl.sum(acc, axis=1)[None, :]
    rm = tl.arange(0, 1)
    total, last = splitk_reduce(
        total, ws_ptr, cnt_ptr, rm, rn_safe, n_mask, row_block, split, N, 1, BLOCK_N, SPLITK
    )  # fmt: skip
    return total, rm, last


@triton.jit
def gemv_store(
    acc, y_ptr, rn, rn_safe, n_mask, row_block, split, N, ws_ptr, cnt_ptr, stride_ym, bias_ptr, part_ptr, b_ptr,
    R, scale, stride_bn, sync_ptr, HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLITK: tl.constexpr, PDL: tl.constexpr,
    b_rows=None,
):  # fmt: skip
    # a one-token GEMV's epilogue: its per-thread sums ``acc`` (BLOCK_N, any) summed and split-K'd
    # (gemv_reduce), then bias, adapter and store (store_rows); unsplit, the shrink's sum is read first, so that
    # its loads overlap the cross-thread sums (split-K leaves it to the row block's last program)
    rm = tl.arange(0, 1)
    shrunk = (
        lora_shrunk(rm, part_ptr, sync_ptr, LORA, SPLITS, BLOCK_S, BLOCK_R, PDL)
        if LORA and SPLITK == 1
        else None
    )
    out, rm, last = gemv_reduce(acc, ws_ptr, cnt_ptr, rn_safe, n_mask, row_block, split, N, BLOCK_N, SPLITK)
    if last:
        store_rows(
            out.to(y_ptr.dtype.element_ty), y_ptr, rm, rn, rn_safe, rm < 1, n_mask, stride_ym, bias_ptr,
            part_ptr, b_ptr, R, scale, stride_bn, sync_ptr, HAS_BIAS, LORA, SPLITS, BLOCK_S, BLOCK_R, False, PDL,
            shrunk, b_rows,
        )  # fmt: skip


@triton.jit
def lora_shrunk(
    rm, part_ptr, sync_ptr, LORA: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # the adapter's shrink ``xa @ A.T`` for the token rows ``rm``, float32 (BLOCK_M, BLOCK_R): its slices summed,
    # once the shrink is done. A program that writes several row blocks (hqq's halves) calls it once.
    if PDL == 2:  # launched while the shrink ran: its slices are visible after the wait
        gdc_wait()
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
    return tl.sum(parts, axis=0)


@triton.jit
def lora_rows(rn_safe, b_ptr, R, stride_bn, BLOCK_R: tl.constexpr):
    # the adapter's B rows for the output rows ``rn_safe`` (BLOCK_N, BLOCK_R), loaded before the loop over K (for
    # store_rows) so that their latency hides under the weights' instead of adding to every program's epilogue
    rr = tl.arange(0, BLOCK_R)
    return tl.load(b_ptr + rn_safe[:, None] * stride_bn + rr[None, :], mask=(rr < R)[None, :], other=0.0)


@triton.jit
def lora_expand(base, shrunk, b_rows, scale, USE_DOT: tl.constexpr):
    # base (BLOCK_M, BLOCK_N) in the output dtype; returns base + scale * shrunk @ b_rows.T rounded as the
    # reference (``shrunk``: :func:`lora_shrunk`'s, ``b_rows``: :func:`lora_rows`')
    t = shrunk.to(b_rows.dtype)  # the reference rounds x @ A.T to the adapter's dtype
    if USE_DOT:
        delta = tl.dot(t, tl.trans(b_rows))
    else:
        delta = tl.sum(t.to(tl.float32)[:, None, :] * b_rows.to(tl.float32)[None, :, :], axis=2)
    return (base.to(tl.float32) + (delta * scale).to(base.dtype).to(tl.float32)).to(base.dtype)


@triton.jit
def splitk_store(ws_ptr, acc, rm, cols, n_mask, split, N, BLOCK_M: tl.constexpr):
    # split-K: this program's float32 partial sums for output columns ``cols`` to the workspace
    tl.store(ws_ptr + rm[:, None] * N + cols[None, :] + split * (BLOCK_M * N), acc, mask=n_mask[None, :])


@triton.jit
def splitk_arrive(cnt_ptr, row_block, SPLITK: tl.constexpr):
    # after splitk_store: whether this program is the last of its row block to arrive (it then finishes)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + row_block, 1, sem="acq_rel")
    return arrived == SPLITK - 1


@triton.jit
def splitk_sum(
    ws_ptr, rm, cols, n_mask, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITK: tl.constexpr,
):  # fmt: skip
    # the last program in: all splits' partial sums for output columns ``cols``, in split order
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLITK):
        acc += tl.load(
            ws_ptr + rm[:, None] * N + cols[None, :] + s * (BLOCK_M * N),
            mask=n_mask[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
    return acc


@triton.jit
def splitk_reduce(
    acc, ws_ptr, cnt_ptr, rm, cols, n_mask, row_block, split, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITK: tl.constexpr,
):  # fmt: skip
    # split-K for one accumulator: (the full sum, whether this program finishes the row block)
    last = True
    if SPLITK > 1:  # partial sums to a workspace; the last split of this row block to arrive finishes
        splitk_store(ws_ptr, acc, rm, cols, n_mask, split, N, BLOCK_M)
        last = splitk_arrive(cnt_ptr, row_block, SPLITK)
        if last:
            acc = splitk_sum(ws_ptr, rm, cols, n_mask, N, BLOCK_M, BLOCK_N, SPLITK)
            tl.atomic_xchg(cnt_ptr + row_block, 0)
    return acc, last


@triton.jit
def store_rows(
    out, y_ptr, rm, cols, cols_safe, m_mask, n_mask, stride_ym, bias_ptr,
    part_ptr, b_ptr, R, scale, stride_bn, sync_ptr,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr, PDL: tl.constexpr, shrunk=None, b_rows=None,
):  # fmt: skip
    # the base product ``out`` (output dtype) plus bias, plus the adapter, stored to y[:, cols]; ``shrunk`` (the
    # program's lora_shrunk) and ``b_rows`` (lora_rows for ``cols_safe``): when the program has them already
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols_safe).to(tl.float32)
        out = (out.to(tl.float32) + bias[None, :]).to(y_ptr.dtype.element_ty)
    if LORA > 0:
        if shrunk is None:
            shrunk = lora_shrunk(rm, part_ptr, sync_ptr, LORA, SPLITS, BLOCK_S, BLOCK_R, PDL)
        if b_rows is None:
            b_rows = lora_rows(cols_safe, b_ptr, R, stride_bn, BLOCK_R)
        out = lora_expand(out, shrunk, b_rows, scale, USE_DOT)
    tl.store(y_ptr + rm[:, None] * stride_ym + cols[None, :], out, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def finish(sync_ptr, LORA: tl.constexpr):
    if LORA == 2:  # the last program out resets the counters for the next call / graph replay
        out = tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel")
        if out == tl.num_programs(0) - 1:
            tl.atomic_xchg(sync_ptr, 0)
            tl.atomic_xchg(sync_ptr + 1, 0)
            tl.atomic_xchg(sync_ptr + 2, 0)


# --------------------------------------------------------------------------
# The device, and the launcher (quantplug._fused_launch)
# --------------------------------------------------------------------------


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability, ``(major, minor)``."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


# The fused kernels' tensor-core dots in bf16/fp16, cp.async pipelining and packed bf16x2 math need Ampere
# (sm_80); programmatic dependent launch needs Hopper (sm_90): ptxas rejects griddepcontrol below it.
MIN_CAPABILITY, PDL_CAPABILITY = (8, 0), (9, 0)

# the host side, re-exported so that plugins keep one name for the shared part (``fused_lora.launch``); last, since
# it reads this module's names at call time
from quantplug._fused_launch import (  # noqa: E402, F401
    admit,
    capturing,
    dense_lora_linear,
    group_block_k,
    launch,
    token_block,
    usable,
)
from quantplug._grid import cdiv, next_power_of_2  # noqa: E402, F401  (host-side: triton's cost 6 us a call)
