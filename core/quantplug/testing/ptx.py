"""Run a kernel's inline PTX on the CPU: check the logic of ``tl.inline_asm_elementwise`` code without a GPU.

Triton's interpreter cannot run inline assembly, so a plugin's fused
kernel takes another path there, and the asm itself would only be tested
on a GPU. This runs the few instructions such decode code uses, one
invocation at a time, on Python integers::

    from quantplug.testing.ptx import run

    out = run(asm, {4: packed_word, 5: scale_pair})  # operand number -> 32-bit value
    out[0], out[1]  # the output operands $0, $1

Instructions: ``mov`` (also of ``%laneid``), ``and``, ``or``, ``xor``, ``shl``, ``shr`` (``.b32``/``.u32``, logical),
``prmt.b32`` (the default mode: a selector nibble's bit 3 replicates the
selected byte's sign), ``lop3.b32``, ``fma.rn`` on ``bf16x2``/``f16x2``
(each half rounded once, to nearest even, from the exact result),
``cvt.rn.bf16x2.f32``/``cvt.rn.f16x2.f32``, and vector loads
``ld.global[.nc].v2/.v4.b32 {...}, [r]`` or ``[r+offset]`` from a
``memory`` the caller gives. Anything else raises
``ValueError`` naming it, so a test never passes on an instruction it did
not run. Registers are 32 bits (an operand may hold a 64-bit address); ``{`` ``}``, ``.reg`` lines and ``//``
comments are skipped.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import torch

MASK = 0xFFFFFFFF
_HALF_TYPES = {"bf16x2": torch.bfloat16, "f16x2": torch.float16}


def prmt(a: int, b: int, selector: int) -> int:
    """``prmt.b32 d, a, b, c`` in its default mode: byte k of d is byte ``c``'s nibble k of {b, a}."""
    source = [(a >> (8 * i)) & 255 for i in range(4)] + [(b >> (8 * i)) & 255 for i in range(4)]
    out = 0
    for k in range(4):
        nibble = (selector >> (4 * k)) & 15
        byte = source[nibble & 7]
        if nibble & 8:  # replicate the sign bit of the selected byte
            byte = 255 if byte & 128 else 0
        out |= byte << (8 * k)
    return out


def lop3(a: int, b: int, c: int, table: int) -> int:
    """``lop3.b32 d, a, b, c, table``: each bit of d is ``table``'s bit at index (a << 2 | b << 1 | c)."""
    out = 0
    for bit in range(32):
        index = ((a >> bit) & 1) << 2 | ((b >> bit) & 1) << 1 | ((c >> bit) & 1)
        out |= ((table >> index) & 1) << bit
    return out


def halves(word: int, dtype: torch.dtype) -> list[float]:
    """The two 16-bit floats of a 32-bit word (the low half first) as Python floats."""
    bits = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16)
    return bits.view(dtype).double().tolist()


# (explicit mantissa bits, exponent bias) of each 16-bit float type
_FORMATS = {torch.bfloat16: (7, 127), torch.float16: (10, 15)}


def round_half(value: Fraction, dtype: torch.dtype, negative: bool = False) -> int:
    """The 16-bit pattern of the exact ``value`` rounded once to ``dtype``, to nearest even.

    ``negative`` gives zero its sign (IEEE: an exact zero sum is +0 unless
    every term was -0).
    """
    mantissa, bias = _FORMATS[dtype]
    if value == 0:
        return 0x8000 if negative else 0
    sign = 0x8000 if value < 0 else 0
    value = abs(value)
    exponent = value.numerator.bit_length() - value.denominator.bit_length()
    if Fraction(2) ** exponent > value:
        exponent -= 1  # now 2**exponent <= value < 2**(exponent + 1)
    exponent = max(exponent, 1 - bias)  # below the normal range: subnormal steps
    units = value / Fraction(2) ** (exponent - mantissa)
    steps, rest = divmod(units, 1)
    steps += 1 if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and steps % 2) else 0
    if steps == 2 << mantissa:  # rounded up to the next binade
        steps, exponent = steps // 2, exponent + 1
    if exponent > bias:
        return sign | (((2 * bias + 1) << mantissa) & 0x7FFF)  # infinity
    if steps < 1 << mantissa:
        return sign | int(steps)  # subnormal
    return sign | (exponent + bias) << mantissa | int(steps) - (1 << mantissa)


def _fma(a: int, b: int, c: int, dtype: torch.dtype) -> int:
    # each half: a * b + c exact, then one rounding (inputs finite)
    x, y, z = halves(a, dtype), halves(b, dtype), halves(c, dtype)
    out = 0
    for i in range(2):
        exact = Fraction(x[i]) * Fraction(y[i]) + Fraction(z[i])
        zero_sign = math.copysign(1.0, x[i] * y[i] + z[i]) < 0  # float arithmetic signs an exact zero as IEEE
        out |= round_half(exact, dtype, zero_sign) << (16 * i)
    return out


def _float32(word: int) -> float:
    return torch.tensor([word & MASK], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


def _cvt_pack(a: int, b: int, dtype: torch.dtype) -> int:
    # cvt.rn.{bf16x2,f16x2}.f32 d, a, b: a rounded into d's high half, b into its low half (finite inputs)
    high, low = (_float32(v) for v in (a, b))
    return round_half(Fraction(high), dtype, math.copysign(1.0, high) < 0) << 16 | round_half(
        Fraction(low), dtype, math.copysign(1.0, low) < 0
    )


_OPS = {
    "mov.b32": lambda a: a,
    "mov.u32": lambda a: a,
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "xor.b32": lambda a, b: a ^ b,
    "shl.b32": lambda a, b: a << b if b < 32 else 0,
    "shr.b32": lambda a, b: a >> b,
    "shr.u32": lambda a, b: a >> b,
    "prmt.b32": prmt,
    "lop3.b32": lop3,
    **{
        f"fma.rn.{half2}": lambda a, b, c, dtype=dtype: _fma(a, b, c, dtype)
        for half2, dtype in _HALF_TYPES.items()
    },
    **{
        f"cvt.rn.{half2}.f32": lambda a, b, dtype=dtype: _cvt_pack(a, b, dtype)
        for half2, dtype in _HALF_TYPES.items()
    },
}


_VECTOR_LOAD = re.compile(r"ld\.global(?:\.nc)?\.v([24])\.b32 \{([^}]*)\}, \[([^\]+]+)(?:\+(\d+))?\]")


def run(
    asm: str, operands: dict[int, int], memory: dict[int, int] | None = None, lane: int = 0
) -> dict[int, int]:
    """Run ``asm`` (one invocation) with the input operands ``{n: value}`` (``$n``); the ``$n`` it writes.

    ``memory``: ``{byte address: 32-bit word}`` for ``ld.global[.nc].v2/.v4.b32``
    (an address operand is 64 bits; the address must be aligned to the
    vector's size, as on the GPU). ``lane``: the thread's ``%laneid``.
    """
    registers: dict[str, int] = {f"${n}": value & 0xFFFFFFFFFFFFFFFF for n, value in operands.items()}
    registers["%laneid"] = lane % 32

    def value(token: str) -> int:
        if token in registers:
            return registers[token]
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", token):
            return int(token, 0) & MASK
        raise ValueError(f"PTX emulator: {token!r} is read before it is written")

    for line in asm.splitlines():
        line = line.split("//")[0].strip().rstrip(";").strip()
        if not line or line in ("{", "}") or line.startswith(".reg"):
            continue
        load = _VECTOR_LOAD.fullmatch(line)
        if load is not None:
            width, targets = int(load[1]), [t.strip() for t in load[2].split(",")]
            address = value(load[3]) + int(load[4] or 0)
            if address % (4 * width) or len(targets) != width:
                raise ValueError(
                    f"PTX emulator: misaligned or malformed vector load {line!r} (address {address})"
                )
            for i, target in enumerate(targets):
                if memory is None or address + 4 * i not in memory:
                    raise ValueError(f"PTX emulator: {line!r} reads address {address + 4 * i}, not in memory")
                registers[target] = memory[address + 4 * i] & MASK
            continue
        opcode, _, rest = line.partition(" ")
        if opcode not in _OPS:
            raise ValueError(f"PTX emulator: {opcode!r} is not emulated (line {line!r})")
        target, *sources = (part.strip() for part in rest.split(","))
        registers[target] = _OPS[opcode](*(value(s) for s in sources)) & MASK
    return {
        int(name[1:]): v
        for name, v in registers.items()
        if name.startswith("$") and int(name[1:]) not in operands
    }
