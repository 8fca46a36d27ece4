"""Triton helpers of the gptq and awq fused kernels (``gptq/_cuda_kernels.py``, ``awq/_cuda_kernels.py``).

Both formats pack eight 4-bit codes into an int32 word (code ``j`` in bits
``4j`` to ``4j + 3``) and dequantize ``(code - zero) * scale`` per group of
inputs. Imported only where Triton and a CUDA device are (by the kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantplug.plugin import fused_lora as fl

from quantplug_gptqmodel import _ptx

# inline PTX: on NVIDIA GPUs, not in Triton's interpreter nor on ROCm (the same decode in Triton there)
_PTX = tl.constexpr(not fl.INTERPRET and torch.version.hip is None)
_SHL_ASM = tl.constexpr(_ptx.mantissa("shl"))
_SHR_ASM = tl.constexpr(_ptx.mantissa("shr"))


@triton.jit
def mantissa(words, j: tl.constexpr):
    # code j of each word (bits 4j to 4j+3) as the float32 1 + q / 16: the code into bits 19-22 of 1.0. A group's
    # sum is then scale * (16 sum((1 + q/16) x) - (16 + zero) sum(x)): no float subtraction per weight
    left: tl.constexpr = 4 * j <= 19
    amount: tl.constexpr = 19 - 4 * j if left else 4 * j - 19
    if _PTX:
        return tl.inline_asm_elementwise(
            _SHL_ASM if left else _SHR_ASM, "=r,r,r", [words, tl.full(words.shape, amount, tl.int32)],
            dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        shifted = words << amount if left else words >> amount
        return ((shifted & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def code_values(codes):
    # 4-bit codes (int32) as float32: 2^23 + q less 2^23, no conversion instruction
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
