"""The host side of the plugins' fused quantized-GEMV + LoRA kernels: :func:`admit` and :func:`launch`.

Plugins call these as ``quantplug.plugin.fused_lora.admit`` / ``.launch``
(``quantplug._fused`` re-exports them); the Triton helpers their kernels
call, and the shared constants and counters, are in ``quantplug._fused``.
This module reads those at call time through that module (``shared.X``),
so that what tools patch there (``shrink_kernel``, ``INTERPRET``,
``capability``: ``scripts/tune_fused.py``, ``scripts/sass_fused.py``,
``tests/gpu``) is what the launcher uses.
"""

from __future__ import annotations

import torch

from quantplug import _fused as shared
from quantplug._grid import cdiv, next_power_of_2


def token_block(m: int) -> int:
    """``BLOCK_M`` for ``m`` tokens: 1 (the plugin's one-token GEMV kernel) for one token, else 16
    (its main kernel, on tensor cores)."""
    return 1 if m == 1 else 16


def group_block_k(K: int, group: int, want: int) -> int | None:
    """``BLOCK_K`` near ``want`` holding whole quantization groups of ``group`` inputs, or None."""
    bk = min(want, next_power_of_2(K))
    return bk if bk >= group and bk % group == 0 else None


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never under Triton's interpreter).

    Eagerly each launch from Python costs the host tens of microseconds, which a replayed graph does not
    pay: a plugin whose library is as fast for some calls may leave those to it outside a capture."""
    return not shared.INTERPRET and torch.cuda.is_current_stream_capturing()


def admit(
    module, x, xa, A, B, storage, *, serve: bool, max_tokens: int | None = shared.MAX_TOKENS
) -> tuple | None:
    """``(tokens, *storage(module, x))`` when a fused kernel may serve this call, else None.

    ``serve``: the plugin's SERVE, or ``force``; ``storage``: the plugin's
    check of the layer (its packed tensors, or None). None under
    ``torch.compile``, off CUDA (unless interpreted), on a GPU older than
    :data:`MIN_CAPABILITY`, outside :data:`DTYPES`, with mismatched adapter
    dtypes, a rank above :data:`MAX_RANK`, autograd, or more than
    ``max_tokens`` rows (``None``: any number, for a plugin that serves
    larger calls with :func:`dense_lora_linear`).
    """
    if not serve or _compiling() or not (x.is_cuda or shared.INTERPRET) or x.dtype not in shared.DTYPES:
        return None
    if x.is_cuda and shared.capability(x.device) < shared.MIN_CAPABILITY:
        return None
    lora = A is not None
    tensors = (x, xa, A, B) if lora else (x,)
    if lora and (
        xa.dtype != x.dtype
        or A.dtype not in (x.dtype, torch.float32)
        or B.dtype != A.dtype
        or A.shape[0] > shared.MAX_RANK
    ):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    found = storage(module, x) if M > 0 and (max_tokens is None or max_tokens >= M) else None
    return None if found is None else (M, *found)


def _bias_readable(bias, x, N) -> bool:
    """Whether a kernel can add the layer's ``bias``: none, or a tensor of ``N`` values on ``x``'s device."""
    return bias is None or (torch.is_tensor(bias) and bias.device == x.device and bias.numel() == N)


def dense_lora_linear(x, weight, bias, xa, A, B, scale):
    """``x @ weight.T + bias + scale * (xa @ A.T) @ B.T`` in two cuBLAS calls and the small shrink.

    Above the GEMV range (more than :data:`MAX_TOKENS` rows) a plugin with a
    fast dequantization kernel serves its layer with it and this: one matmul
    with the bias as its input, then the expand added into that output in
    place (``addmm_``, the scale as alpha). ``A is None``: the base alone.
    None when the bias cannot be read (as :func:`launch`).
    """
    K, N = x.shape[-1], weight.shape[0]
    if not _bias_readable(bias, x, N):
        return None
    x2 = x.reshape(-1, K)
    y = torch.addmm(bias.to(x.dtype), x2, weight.T) if bias is not None else x2 @ weight.T
    if A is not None:
        shrink = xa.reshape(-1, xa.shape[-1]).to(A.dtype) @ A.T
        if A.dtype == y.dtype:
            y.addmm_(shrink, B.T, alpha=scale)
        else:  # float32 adapters: the update in their dtype, rounded once, as the reference
            y += (shrink @ B.T * scale).to(y.dtype)
    return y.view(*x.shape[:-1], N)


def launch(
    kernel, module, x, xa, A, B, scale, weights, bias, *, N, rows, block_m, block_k, config,
    one_launch=False, lora_mode=None, pdl=None, x_align=1, shrink_slices=None, **constexprs,
):  # fmt: skip
    """Run ``kernel`` on ``x`` (after :func:`admit`) and return ``y`` shaped like ``x`` with ``N`` outputs.

    ``weights``: the kernel's own pointer arguments after ``x``; ``bias``
    the layer's (or None: then served only when it matches); ``rows`` the
    output rows that ``BLOCK_N`` (``config[0]``) tiles (``N``, or fewer when
    a program writes several rows per row); ``config`` ``(BLOCK_N, BLOCK_K,
    num_warps, num_stages[, SPLITK])``; ``lora_mode`` forces 0/1/2 (tuning);
    ``one_launch`` picks ``LORA=2`` over 1 (2-16 token main kernels only);
    ``pdl`` overrides :data:`PDL` (tuning); ``x_align`` the bytes ``x``'s
    start must be aligned to for the kernel's vector loads of it (a view at
    another offset is copied); ``shrink_slices`` the adapter's shrink slices
    (at most; default :data:`SHRINK_SPLITS`); ``constexprs`` the kernel's
    own. Returns None when the bias cannot be read.
    """
    if not _bias_readable(bias, x, N):
        return None
    block_n, _, warps, stages, splitk = (*config, 1)[:5]
    K = x.shape[-1]
    M = x.numel() // K
    x2 = x.reshape(M, K).contiguous()
    if x2.data_ptr() % x_align:
        x2 = x2.clone()  # a fresh allocation: aligned
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    lora = A is not None
    mode = (2 if one_launch and (module in shared.sync or not capturing()) else 1) if lora else 0
    mode = lora_mode if lora_mode is not None and lora else mode
    mode = min(mode, 1) if block_m == 1 else mode  # a one-token GEMV kernel has no in-launch shrink (LORA=2)
    pdl = shared.PDL if pdl is None else (pdl and shared.HAS_PDL)
    pdl = pdl and shared.capability(x.device) >= shared.PDL_CAPABILITY
    launch_pdl = {"launch_pdl": True} if pdl else {}
    grid_n = cdiv(rows, block_n)
    if lora:
        KA = xa.shape[-1]
        xa2 = xa.reshape(M, KA).contiguous()
        A = A.contiguous()
        B = B.contiguous()
        R = A.shape[0]
        k_per_split = max(64, next_power_of_2(cdiv(KA, shrink_slices or shared.SHRINK_SPLITS[block_m])))
        splits = cdiv(KA, k_per_split)
        block_r = max(16, next_power_of_2(R))
        block_s = next_power_of_2(splits)
        part = torch.empty((splits, 16, block_r), device=x.device, dtype=torch.float32)
        shrink_k = min(k_per_split, shared.SHRINK_STEP[block_m])
        if mode == 2:
            sync_t = shared.sync.get(module)
            if sync_t is None:
                sync_t = shared.sync[module] = torch.zeros(4, device=x.device, dtype=torch.int32)
        else:
            sync_t = part
            shared.shrink_kernel[(splits,)](
                xa2, A, part, M, KA, R, xa2.stride(0), A.stride(0),
                K_PER_SPLIT=k_per_split, SHRINK_K=shrink_k, BLOCK_R=block_r, PDL=pdl, num_warps=4, **launch_pdl,
            )  # fmt: skip
    else:
        xa2, A, B, part, sync_t = x2, x2, x2, y, y
        KA = R = splits = 1
        k_per_split = shrink_k = block_r = block_s = 16
    k_blocks = cdiv(K, block_k)
    cnt = shared.counters.get(module)
    if splitk > 1 and cnt is None and not capturing():
        cnt = shared.counters[module] = torch.zeros(N, device=x.device, dtype=torch.int32)
    splitk = min(splitk, k_blocks) if cnt is not None else 1  # first call under capture: no counters
    k_split = cdiv(k_blocks, splitk) * block_k
    splitk = cdiv(K, k_split)
    ws = torch.empty((splitk, block_m, N), device=x.device, dtype=torch.float32) if splitk > 1 else y
    kernel[(grid_n * splitk + (splits if mode == 2 else 0),)](
        x2, *weights, bias if bias is not None else y,
        xa2, A, B, part, sync_t, y, ws, cnt if splitk > 1 else y,
        M, N, K, KA, R, float(scale) if lora else 0.0, grid_n, k_split,
        x2.stride(0), xa2.stride(0), A.stride(0), B.stride(0), y.stride(0),
        HAS_BIAS=bias is not None,
        LORA=mode, SPLITS=splits if mode else 0, K_PER_SPLIT=k_per_split, SHRINK_K=shrink_k,
        BLOCK_S=block_s, BLOCK_R=block_r,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=block_m >= 16, EVEN_K=K % block_k == 0, SPLITK=splitk,
        PDL=(2 if mode == 1 else 1) if pdl else 0, num_warps=warps, num_stages=stages, **launch_pdl, **constexprs,
    )  # fmt: skip
    return y.view(*x.shape[:-1], N)


def usable() -> bool:
    """Whether the fused kernels can serve here: a CUDA device (Triton imported, or this module would not be)."""
    return torch.cuda.is_available()
