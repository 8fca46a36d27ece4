"""The inline PTX of the gptq and awq fused kernels (``_int4.py``), as text: importable without Triton.

``quantplug.testing.ptx`` runs it on the CPU (``tests/test_ptx.py``), since
Triton's interpreter cannot.
"""


def mantissa(direction: str) -> str:
    """One 4-bit code of a packed word as the float32 ``1 + q / 16``: the code moved into bits 19-22 of 1.0.

    For the one-token GEMVs, as ``tl.inline_asm_elementwise`` with
    ``pack=1``. Operands: ``$0`` the
    float32 result; ``$1`` the word; ``$2`` the shift that brings code ``j``
    (bits ``4j`` to ``4j + 3``) to bit 19: left by ``19 - 4j`` for ``j`` up
    to 4 (``direction`` ``"shl"``), else right by ``4j - 19`` (``"shr"``).
    One shift and one and-or (``lop3``, its two constants in registers:
    Triton's ``(w & m) | c`` compiles to two ``LOP3`` with immediates).
    """
    if direction not in ("shl", "shr"):
        raise ValueError(f"direction is 'shl' or 'shr', not {direction!r}")
    return "\n".join(
        [
            "{",
            ".reg .b32 t, m, o;",
            "mov.b32 m, 0x780000;",
            "mov.b32 o, 0x3F800000;",
            f"{direction}.b32 t, $1, $2;",
            "lop3.b32 $0, t, m, o, 0xEA;",
            "}",
        ]
    )
