"""The inline PTX of this plugin's fused kernels (``_cuda_kernels``), as text: importable without Triton.

``quantplug.testing.ptx`` runs it on the CPU (``tests/test_ptx.py``), since
Triton's interpreter cannot.
"""

# Four bytes of W_q in WORD (one 32-bit register: four codes of the top half in the high nibbles, four of the
# bottom half in the low ones) to their codes less BASE's power of two, exactly, two per register (t01, t23
# the top half's, b01, b23 the bottom's, each of bytes 0-1 and 2-3): each pair of bytes spread to the two
# 16-bit halves (prmt); the nibble put in the mantissa of a power of two (shift, and-or: 128 + q in bf16, 1024
# + q in fp16) and BASE added (fma with 1, exact: BASE is minus that power, or minus it and 8).
_DECODE = """.reg .b32 b01, b23, t01, t23, one, base, neg0;
prmt.b32 b01, WORD, 0, 0x4140;
prmt.b32 b23, WORD, 0, 0x4342;
shr.b32 t01, b01, 4;
shr.b32 t23, b23, 4;
lop3.b32 t01, t01, 0x000F000F, MAGIC, 0xea;
lop3.b32 t23, t23, 0x000F000F, MAGIC, 0xea;
lop3.b32 b01, b01, 0x000F000F, MAGIC, 0xea;
lop3.b32 b23, b23, 0x000F000F, MAGIC, 0xea;
mov.b32 one, ONE;
mov.b32 base, BASE;
mov.b32 neg0, 0x80008000;
fma.rn.TYPE t01, t01, one, base;
fma.rn.TYPE t23, t23, one, base;
fma.rn.TYPE b01, b01, one, base;
fma.rn.TYPE b23, b23, one, base;
"""
# Four bytes to eight weights, two per 32-bit register, rounded as hqq's dequantize(): the codes decoded
# (q exactly), then q - zero and (q - zero) * scale, each rounded once to the compute dtype (fma with 1 and
# with -0: these run on sm_80, where add and mul on bf16x2 do not). Operands: $0-$3 the weights out (top,
# bottom), $4 the bytes, $5-$12 scale and -zero of the top, then the bottom, two per register.
CODES_TO_WEIGHTS = (
    "{\n"
    + _DECODE.replace("WORD", "$4").replace("BASE", "MINUS_MAGIC")
    + """fma.rn.TYPE t01, t01, one, $7;
fma.rn.TYPE t23, t23, one, $8;
fma.rn.TYPE b01, b01, one, $11;
fma.rn.TYPE b23, b23, one, $12;
fma.rn.TYPE $0, t01, $5, neg0;
fma.rn.TYPE $1, t23, $6, neg0;
fma.rn.TYPE $2, b01, $9, neg0;
fma.rn.TYPE $3, b23, $10, neg0;
}"""
)
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


# One packed word of W_q (four bytes: four inputs k..k+3, the top half's codes in the high nibbles, the bottom
# half's in the low ones) times its four inputs, for the one-token GEMV: each code spread to a 16-bit half and
# put under a power of two as above, that power and 8 taken off (fma, exact: q - 8 in -8..7), then multiplied
# by its input and summed in pairs (fma), each product and sum rounded once to the compute dtype. Operands: $0
# the top half's sums, $1 the bottom's (inputs k and k+2 in the low half, k+1 and k+3 in the high half); $2
# the word; $3 the 64-bit address of the four inputs (8-byte aligned), which it loads itself in one 64-bit
# load. Centring on 8 keeps the later sum(q x) - zero sum(x) from cancelling: zero - 8 is small.
DOT_WORD = (
    "{\n.reg .b32 x01, x23;\nld.global.nc.v2.b32 {x01, x23}, [$3];\n"
    + _DECODE.replace("WORD", "$2").replace("BASE", "MINUS_CENTRE")
    + """fma.rn.TYPE t01, t01, x01, neg0;
fma.rn.TYPE $0, t23, x23, t01;
fma.rn.TYPE b01, b01, x01, neg0;
fma.rn.TYPE $1, b23, x23, b01;
}"""
)
# the power of two plus 8, negated: 136 in bf16, 1032 in fp16
_CENTRE = {"bf16x2": "0xC308C308", "f16x2": "0xE408E408"}


def dot_word(half2: str) -> str:
    """:data:`DOT_WORD` for ``half2`` ``"bf16x2"`` or ``"f16x2"``."""
    asm = DOT_WORD.replace("TYPE", half2).replace("MINUS_CENTRE", _CENTRE[half2])
    for name, value in _CONSTANTS[half2].items():
        asm = asm.replace(name, value)
    return asm
