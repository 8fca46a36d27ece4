"""The inline PTX of this plugin's fused kernels (``_cuda_kernels``), as text: importable without Triton.

``quantplug.testing.ptx`` runs it on the CPU (``tests/test_ptx.py``), since
Triton's interpreter cannot.
"""

# Four bytes of W_q (one 32-bit register: four codes of the top half in the high nibbles, four of the
# bottom half in the low ones) to eight weights, two per 32-bit register, rounded as hqq's dequantize():
# each pair of bytes spread to the two 16-bit halves (prmt); the nibble put in the mantissa of a power
# of two (shift, and-or: 128 + q in bf16, 1024 + q in fp16) and that power taken off (fma, exact);
# then q - zero and (q - zero) * scale, each rounded once to the compute dtype (fma with 1 and with
# -0: these run on sm_80, where add and mul on bf16x2 do not). Operands: $0-$3 the weights out (top,
# bottom), $4 the bytes, $5-$12 scale and -zero of the top, then the bottom, two per register.
CODES_TO_WEIGHTS = """{
.reg .b32 b01, b23, t01, t23, one, base, neg0;
prmt.b32 b01, $4, 0, 0x4140;
prmt.b32 b23, $4, 0, 0x4342;
shr.b32 t01, b01, 4;
shr.b32 t23, b23, 4;
lop3.b32 t01, t01, 0x000F000F, MAGIC, 0xea;
lop3.b32 t23, t23, 0x000F000F, MAGIC, 0xea;
lop3.b32 b01, b01, 0x000F000F, MAGIC, 0xea;
lop3.b32 b23, b23, 0x000F000F, MAGIC, 0xea;
mov.b32 one, ONE;
mov.b32 base, MINUS_MAGIC;
mov.b32 neg0, 0x80008000;
fma.rn.TYPE t01, t01, one, base;
fma.rn.TYPE t23, t23, one, base;
fma.rn.TYPE b01, b01, one, base;
fma.rn.TYPE b23, b23, one, base;
fma.rn.TYPE t01, t01, one, $7;
fma.rn.TYPE t23, t23, one, $8;
fma.rn.TYPE b01, b01, one, $11;
fma.rn.TYPE b23, b23, one, $12;
fma.rn.TYPE $0, t01, $5, neg0;
fma.rn.TYPE $1, t23, $6, neg0;
fma.rn.TYPE $2, b01, $9, neg0;
fma.rn.TYPE $3, b23, $10, neg0;
}"""
# the constants of each compute dtype: the power of two a nibble is put under, its negation, and 1
_CONSTANTS = {
    "bf16x2": {"MINUS_MAGIC": "0xC300C300", "MAGIC": "0x43004300", "ONE": "0x3F803F80"},
    "f16x2": {"MINUS_MAGIC": "0xE400E400", "MAGIC": "0x64006400", "ONE": "0x3C003C00"},
}


def codes_to_weights(half2: str) -> str:
    """:data:`CODES_TO_WEIGHTS` for ``half2`` ``"bf16x2"`` or ``"f16x2"``."""
    asm = CODES_TO_WEIGHTS.replace("TYPE", half2)
    for name, value in _CONSTANTS[half2].items():  # MINUS_MAGIC before MAGIC, which it contains
        asm = asm.replace(name, value)
    return asm
