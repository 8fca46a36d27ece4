"""Host-side integer helpers for kernel launches: grid sizes and power-of-two block sizes.

``triton.cdiv`` and ``triton.next_power_of_2`` are Triton 3.6 ``ConstexprFunction`` objects: called
from Python they cost about 6 µs each (measured on the CI machine's CPU), and a fused layer's launch
made ten such calls, 60 µs of host time a layer on every eager decode step. These are plain ints.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ``a`` and positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two at least ``n`` (1 for ``n <= 1``)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
