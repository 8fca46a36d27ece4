"""Reading an ``aqlm.QuantizedLinear`` whatever state its first forward left it in.

The layer stores ``codes`` as ``[num_out_groups, num_in_groups, num_codebooks]``
(signed ints holding unsigned codes). On its first forward on anything but
CUDA, a layer with 2^8-entry codebooks replaces ``codes.data`` by the
``(1, 0, 2)`` permutation, ``[num_in_groups, num_out_groups, ...]``, for its
numba kernel (``QuantizedLinear.prepare_matmul_op``, "TODO: fix this thing";
aqlm 1.0.0 to 1.1.7 and git main of 2025-08). Nothing records that it
happened, and it happens before the kernel import, so a CPU machine without
numba gets the permuted layout and an ``ImportError`` (measured, aqlm 1.1.7).
Everything here first puts the codes back in the stored layout, then uses
aqlm's own ``_dequantize_weight`` / ``dequantize_gemm``.
"""

from __future__ import annotations

import torch


def is_aqlm_layer(module) -> bool:
    """Whether ``module`` is (a subclass of) ``aqlm.QuantizedLinear``, without importing aqlm."""
    return any(
        cls.__name__ == "QuantizedLinear" and cls.__module__.split(".", 1)[0] == "aqlm"
        for cls in type(module).__mro__
    )


def groups(module) -> tuple[int, int]:
    """``(num_out_groups, num_in_groups)`` of the layer."""
    return module.out_features // module.out_group_size, module.in_features // module.in_group_size


def _prepared(module) -> bool:
    """Whether the library already chose its kernels, which is when it permutes (1.1: gemv_op; 1.0.2: matmul_op)."""
    return getattr(module, "gemv_op", None) is not None or getattr(module, "matmul_op", None) is not None


def codes_permuted(module) -> bool:
    """Whether ``module.codes`` is in the ``[in_groups, out_groups, codebooks]`` layout of aqlm's CPU kernel.

    Told by the shape where the group counts differ. Where they are equal
    (a 2048 -> 256 k_proj with 8-wide groups, say) the shape cannot tell, and
    the layer is taken as permuted when the library prepared its kernels
    away from CUDA with 2^8 codebooks, the exact condition under which it
    permutes. Not covered: a square-grid layer whose forward failed on a
    machine without numba (permuted, kernels not prepared).
    """
    out_groups, in_groups = groups(module)
    rows, cols = module.codes.shape[:2]
    if (rows, cols) == (out_groups, in_groups) and out_groups != in_groups:
        return False
    if (rows, cols) == (in_groups, out_groups) and out_groups != in_groups:
        return True
    if (rows, cols) != (out_groups, in_groups):
        raise ValueError(
            f"aqlm layer codes have shape {tuple(module.codes.shape)}; expected ({out_groups}, {in_groups}, "
            f"{module.num_codebooks}) or its (1, 0, 2) permutation"
        )
    return _prepared(module) and module.codebook_size == 256 and module.codebooks.device.type != "cuda"


def standard_codes(module) -> torch.Tensor:
    """``module.codes`` as ``[num_out_groups, num_in_groups, num_codebooks]`` (a view when permuted)."""
    codes = module.codes
    return codes.permute(1, 0, 2) if codes_permuted(module) else codes


def unpacked_codes(module) -> torch.Tensor:
    """The codes as int64 in ``[0, 2^nbits)``, stored layout, an ordinary (not inference-mode) tensor."""
    from aqlm.utils import unpack_int_data

    # unpack_int_data runs under torch.inference_mode(); the clone is a normal tensor
    return unpack_int_data(standard_codes(module).detach(), module.nbits_per_codebook).clone()


def dequantize(module) -> torch.Tensor:
    """The dense ``(out_features, in_features)`` weight, in the codebooks' dtype, through aqlm's own decoder."""
    from aqlm.utils import _dequantize_weight, unpack_int_data

    with torch.no_grad():
        codes = unpack_int_data(standard_codes(module).detach(), module.nbits_per_codebook)
        return _dequantize_weight(codes, module.codebooks.detach(), module.scales.detach())


def forward(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` through aqlm's own pure-PyTorch kernel (``dequantize_gemm``) on the stored layout.

    This is the kernel aqlm itself runs on CPU for every codebook size but
    2^8; differentiable in ``x``, traceable by ``torch.compile``, and it
    never touches the layer's state.
    """
    from aqlm.inference_kernels.dequantization import dequantize_gemm

    return dequantize_gemm(x, standard_codes(module), module.codebooks, module.scales, module.bias)
