"""Run a kernel's inline PTX on the CPU: check the logic of ``tl.inline_asm_elementwise`` code without a GPU.

Triton's interpreter cannot run inline assembly, so a plugin's fused
kernel takes another path there, and the asm itself would only be tested
on a GPU. This runs the few instructions such decode code uses, one
invocation at a time, on Python integers::

    from quantplug.testing.ptx import run

    out = run(asm, {4: packed_word, 5: scale_pair})  # operand number -> 32-bit value
    out[0], out[1]  # the output operands $0, $1

Instructions: ``mov``, ``and``, ``or``, ``xor``, ``shl``, ``shr`` (``.b32``/``.u32``, logical),
``prmt.b32`` (the default mode: a selector nibble's bit 3 replicates the
selected byte's sign), ``lop3.b32`` and ``fma.rn`` on ``bf16x2``/``f16x2``
(each half rounded once, to nearest even). Anything else raises
``ValueError`` naming it, so a test never passes on an instruction it did
not run. Registers are 32 bits; ``{`` ``}``, ``.reg`` lines and ``//``
comments are skipped.
"""

from __future__ import annotations

import re

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


def pack_halves(values: list[float], dtype: torch.dtype) -> int:
    """Two values (the low half first), each rounded once to ``dtype``, in one 32-bit word."""
    as_float = torch.tensor(values, dtype=torch.float64).float()
    if as_float.double().tolist() != list(values):
        raise ValueError(f"the emulator rounds through float32, which would round {values} twice")
    low, high = (int(v) & 0xFFFF for v in as_float.to(dtype).view(torch.int16).tolist())
    return low | high << 16


def _fma(a: int, b: int, c: int, dtype: torch.dtype) -> int:
    x, y, z = halves(a, dtype), halves(b, dtype), halves(c, dtype)
    return pack_halves([x[i] * y[i] + z[i] for i in range(2)], dtype)


_OPS = {
    "mov.b32": lambda a: a,
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
}


def run(asm: str, operands: dict[int, int]) -> dict[int, int]:
    """Run ``asm`` (one invocation) with the input operands ``{n: value}`` (``$n``); the ``$n`` it writes."""
    registers: dict[str, int] = {f"${n}": value & MASK for n, value in operands.items()}

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
