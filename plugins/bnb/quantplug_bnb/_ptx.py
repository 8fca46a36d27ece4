"""The inline PTX of this plugin's fused kernels (``_cuda_kernels``), as text: importable without Triton.

``quantplug.testing.ptx`` runs it on the CPU (``tests/test_ptx.py``), since
Triton's interpreter cannot.

Both pieces look the 4-bit codes up in registers rather than in memory. The
16-entry table (fp16 or bf16) is held as byte planes: H0-H3 the high bytes of
entries 0-15, four a register, L0-L3 the low bytes. One ``prmt`` looks up
four codes at once in a pair of plane registers (entries 0-7, or 8-15: the
selectors' bit 3 cleared, since prmt reads it as "replicate the sign"), a
``lop3`` takes the pair the code's bit 3 names (spread to a byte mask by a
third prmt), and a last prmt joins each value's two bytes. The selectors are
the packed word's own nibbles: its low 16 bits name the four codes of bytes
0 and 1 (a byte's low nibble first: its second element), its high 16 bits
those of bytes 2 and 3.
"""

PLANES = ("H0", "H1", "H2", "H3", "L0", "L1", "L2", "L3")
_REGISTERS = ".reg .b32 s, m, k, a, b, h, l, p0, p1, p2, p3, zero, ones, neg0;"
# the selectors (bit 3 cleared) and the bit-3 masks' selectors (4 where set) of all eight codes of WORD
_SELECTORS = "and.b32 s, WORD, 0x77777777;\nshr.b32 m, WORD, 1;\nand.b32 m, m, 0x44444444;\n"
_NEXT_TWO_BYTES = "shr.b32 s, s, 16;\nshr.b32 m, m, 16;\n"
# the four codes the low 16 bits of s name: h their values' high bytes, l their low bytes (a code's second
# element first, as the nibbles come)
_LOOKUP_FOUR = """prmt.b32 k, zero, ones, m;
prmt.b32 a, H0, H1, s;
prmt.b32 b, H2, H3, s;
lop3.b32 h, a, b, k, 0xD8;
prmt.b32 a, L0, L1, s;
prmt.b32 b, L2, L3, s;
lop3.b32 l, a, b, k, 0xD8;
"""


def table_planes(half2: str) -> str:
    """The 16-entry table (float32 in memory) as the eight plane registers the lookups read.

    Operands: ``$0``-``$7`` the planes H0-H3, L0-L3; ``$8`` the table's
    64-bit address (16-byte aligned). Four 128-bit loads, each pair of
    entries rounded once to ``half2``'s type and packed by one ``cvt``, and
    two ``prmt`` per four entries: 20 instructions where building the planes
    from scalar loads took about a hundred, in every program.
    """
    cvt = f"cvt.rn.{half2}.f32"
    lines = ["{", ".reg .b32 " + ", ".join(f"e{i}" for i in range(16)) + ", a, b, high, low;"]
    # the selectors carry the lane number in their upper half, which prmt ignores: ptxas then keeps the planes
    # in each thread's registers, not in uniform ones it would copy back before each use in the loop
    lines += [
        "mov.u32 high, %laneid;",
        "shl.b32 high, high, 16;",
        "or.b32 low, high, 0x6420;",
        "or.b32 high, high, 0x7531;",
    ]
    for j in range(4):
        offset = f"+{16 * j}" if j else ""
        lines.append(
            f"ld.global.nc.v4.b32 {{e{4 * j}, e{4 * j + 1}, e{4 * j + 2}, e{4 * j + 3}}}, [$8{offset}];"
        )
    for j in range(4):  # entries 4j..4j+3: a = (e0 low, e1 high), b = (e2, e3); H takes their high bytes
        e = [f"e{4 * j + t}" for t in range(4)]
        lines += [f"{cvt} a, {e[1]}, {e[0]};", f"{cvt} b, {e[3]}, {e[2]};"]
        lines += [f"prmt.b32 ${j}, a, b, high;", f"prmt.b32 ${4 + j}, a, b, low;"]
    return "\n".join([*lines, "}"])


def _with_planes(asm: str, operands: list[str]) -> str:
    for plane, operand in zip(PLANES, operands, strict=True):
        asm = asm.replace(plane, operand)
    return asm


def dot_word(half2: str) -> str:
    """One packed word's eight weights times their inputs: two partial sums of four products, in ``half2``.

    For the one-token GEMV. Operands: ``$0`` the result (the first, third,
    fifth and seventh elements' products summed in its low half, the others'
    in its high half); ``$1`` the word (four bytes, eight codes); ``$2`` the
    64-bit address of its eight inputs (16-byte aligned, read-only for the
    kernel), which it loads itself in one 128-bit load: the kernel's own
    loads of them would land in another register layout, and Triton would
    move them through shared memory; ``$3``-``$10`` the planes H0-L3. The
    table values are taken in ``half2``'s type and each product and partial
    sum is rounded once to it, as bitsandbytes' own GEMV rounds each
    product (``fma`` with -0 for the first: it runs on sm_80, where
    ``mul.bf16x2`` does not).
    """
    # per two bytes: p0 the first byte's two values, p1 the second's, each in its inputs' order (first low)
    two_bytes = _LOOKUP_FOUR + "prmt.b32 p0, l, h, 0x4051;\nprmt.b32 p1, l, h, 0x6273;\n"
    fma = f"fma.rn.{half2}"
    asm = (
        "{\n" + _REGISTERS + "\n.reg .b32 x0, x1, x2, x3;\nmov.b32 zero, 0;\nmov.b32 ones, -1;\n"
        + "mov.b32 neg0, 0x80008000;\nld.global.nc.v4.b32 {x0, x1, x2, x3}, [$2];\n"
        + _SELECTORS.replace("WORD", "$1")
        + two_bytes
        + f"{fma} p2, p0, x0, neg0;\n{fma} p2, p1, x1, p2;\n"
        + _NEXT_TWO_BYTES
        + two_bytes
        + f"{fma} p2, p0, x2, p2;\n{fma} $0, p1, x3, p2;\n}}"
    )  # fmt: skip
    return _with_planes(asm, [f"${3 + i}" for i in range(8)])


def lookup_scaled(half2: str) -> str:
    """Four packed bytes' eight table values times their blocks' absmax, in ``half2``'s type.

    For the tensor-core kernel, as ``tl.inline_asm_elementwise`` with
    ``pack=4``. Operands: ``$0``-``$1`` the values of the four high nibbles
    (the bytes' first elements), two a register, ``$2``-``$3`` of the low
    nibbles; ``$4`` the bytes; ``$5``-``$36`` the planes H0-L3, four
    registers each (one value, broadcast); ``$37``-``$38`` the four bytes'
    absmax in the table's type. Each value is the table value times absmax,
    rounded once (``fma`` with -0).
    """
    # per two bytes: HIGH their high nibbles' values, LOW their low nibbles'
    two_bytes = _LOOKUP_FOUR + "prmt.b32 HIGH, l, h, 0x7351;\nprmt.b32 LOW, l, h, 0x6240;\n"
    fma = f"fma.rn.{half2}"
    asm = (
        "{\n" + _REGISTERS + "\nmov.b32 zero, 0;\nmov.b32 ones, -1;\nmov.b32 neg0, 0x80008000;\n"
        + _SELECTORS.replace("WORD", "$4")
        + two_bytes.replace("HIGH", "p0").replace("LOW", "p2")
        + _NEXT_TWO_BYTES
        + two_bytes.replace("HIGH", "p1").replace("LOW", "p3")
        + f"{fma} $0, p0, $37, neg0;\n{fma} $1, p1, $38, neg0;\n"
        + f"{fma} $2, p2, $37, neg0;\n{fma} $3, p3, $38, neg0;\n}}"
    )  # fmt: skip
    return _with_planes(asm, [f"${5 + 4 * i}" for i in range(8)])
