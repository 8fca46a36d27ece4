"""The inline PTX of this plugin's fused kernels (``_cuda_kernels``), as text: importable without Triton.

``quantplug.testing.ptx`` runs it on the CPU (``tests/test_ptx.py``), since
Triton's interpreter cannot.
"""

# Four bytes of the packed weight (eight codes; a byte's first element in its high nibble) to their eight
# table values, two per 32-bit register, looked up in registers rather than in memory: the 16-entry table
# (fp16 or bf16) is held as byte planes (H0-H3: the high bytes of entries 0-15, four a register; L0-L3: the
# low bytes). One prmt looks up four codes at once in a pair of plane registers (entries 0-7, or 8-15: the
# selectors' bit 3 cleared, since prmt reads it as "replicate the sign"), a lop3 takes the pair the code's
# bit 3 names (spread to a byte mask by a third prmt), and a last prmt joins each value's two bytes. The
# selectors are the word's own nibbles: its low 16 bits name the four codes of bytes 0 and 1 (low nibble
# first), its high 16 bits those of bytes 2 and 3. Operands: $0-$1 the values of the four high nibbles, $2-$3
# of the low nibbles; $4 the bytes; $5-$36 H0, H1, H2, H3, L0, L1, L2, L3, four registers each (one value,
# broadcast); with SCALED, $37-$38 the four bytes' absmax in the table's dtype, which the values are
# multiplied by (fma with -0: it runs on sm_80, where mul on bf16x2 does not).
LOOKUP_HALF = """
and.b32 s, SELECT, 0x7777;
shr.b32 m, SELECT, 1;
and.b32 m, m, 0x4444;
prmt.b32 m, zero, ones, m;
prmt.b32 a, $5, $9, s;
prmt.b32 b, $13, $17, s;
lop3.b32 h, a, b, m, 0xD8;
prmt.b32 a, $21, $25, s;
prmt.b32 b, $29, $33, s;
lop3.b32 l, a, b, m, 0xD8;
prmt.b32 HIGH, l, h, 0x7351;
prmt.b32 LOW, l, h, 0x6240;
"""
LOOKUP = (
    "{\n.reg .b32 w, s, m, a, b, h, l, zero, ones, v0, v1, v2, v3, neg0;\nmov.b32 zero, 0;\nmov.b32 ones, -1;\n"
    + LOOKUP_HALF.replace("SELECT", "$4").replace("HIGH", "v0").replace("LOW", "v2")
    + "shr.b32 w, $4, 16;\n"
    + LOOKUP_HALF.replace("SELECT", "w").replace("HIGH", "v1").replace("LOW", "v3")
    + "SCALE}"
)
UNSCALED = "mov.b32 $0, v0;\nmov.b32 $1, v1;\nmov.b32 $2, v2;\nmov.b32 $3, v3;\n"
SCALED = (
    "mov.b32 neg0, 0x80008000;\nfma.rn.TYPE $0, v0, $37, neg0;\nfma.rn.TYPE $1, v1, $38, neg0;\n"
    "fma.rn.TYPE $2, v2, $37, neg0;\nfma.rn.TYPE $3, v3, $38, neg0;\n"
)
# the two variants the kernels use: the values alone (fp16, the one-token GEMV), and times absmax in TYPE
LOOKUP_VALUES = LOOKUP.replace("SCALE", UNSCALED)


def lookup_scaled(half2: str) -> str:
    """The lookup times absmax, for ``half2`` ``"bf16x2"`` or ``"f16x2"``."""
    return LOOKUP.replace("SCALE", SCALED.replace("TYPE", half2))
