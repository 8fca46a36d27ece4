"""Recognising AWQ layers, and the variant names, without importing torch, gptqmodel or AutoAWQ."""

from __future__ import annotations

import re

from quantplug_gptqmodel._classes import declares_method
from quantplug_gptqmodel._classes import parse_variant as _parse_variant

AWQ_METHOD = "awq"

VARIANT_RE = re.compile(r"^int(?P<bits>[2-8])-g(?P<group>\d+|all)-(?P<sym>sym|asym)$")
VARIANTS = (
    "int4-g128-asym",  # AWQ's usual format: zero points, groups of 128
    "int4-g128-sym",
    "int4-g64-asym",
    "int4-g32-asym",
    "int4-gall-asym",
)


def is_autoawq_layer(module) -> bool:
    """AutoAWQ's ``WQLinear_GEMM``, ``WQLinear_GEMV``, ... (package ``awq``), by class name and module."""
    cls = type(module)
    return cls.__name__.startswith("WQLinear") and (
        cls.__module__ == "awq" or cls.__module__.startswith("awq.")
    )


def is_awq_layer(module) -> bool:
    """gptqmodel's AWQ kernels (not ParoQuant's rotated ones, which declare METHOD.PARO) and AutoAWQ's."""
    return is_autoawq_layer(module) or declares_method(module, AWQ_METHOD)


def parse_variant(variant: str | None) -> dict:
    return _parse_variant(
        variant,
        VARIANT_RE,
        VARIANTS,
        "awq",
        "'int<bits>-g<group size>|gall-<sym|asym>' (bits 2-8 with gptqmodel 7.6, 4 before)",
    )
