"""Recognising AWQ layers, and the variant names, without importing torch, gptqmodel or AutoAWQ."""

from __future__ import annotations

import re

AWQ_METHOD = "awq"

VARIANT_RE = re.compile(r"^int(?P<bits>[2-8])-g(?P<group>\d+|all)-(?P<sym>sym|asym)$")
VARIANTS = (
    "int4-g128-asym",  # AWQ's usual format: zero points, groups of 128
    "int4-g128-sym",
    "int4-g64-asym",
    "int4-g32-asym",
    "int4-gall-asym",
)


def mro_names(module) -> frozenset[str]:
    """The class names along ``type(module).__mro__``, cached per class (the adapter layer asks on every call)."""
    cls = type(module)
    names = _CLASS_NAMES.get(cls)
    if names is None:
        names = _CLASS_NAMES[cls] = frozenset(klass.__name__ for klass in cls.__mro__)
    return names


_CLASS_NAMES: dict[type, frozenset[str]] = {}


def is_gptqmodel_layer(module) -> bool:
    """A subclass of gptqmodel's ``BaseQuantLinear``, told by name: gptqmodel need not be imported."""
    return any(
        cls.__name__ == "BaseQuantLinear" and cls.__module__.startswith("gptqmodel.")
        for cls in type(module).__mro__
    )


def declared_methods(module) -> set[str]:
    """The quantization methods the layer's class declares (``SUPPORTS_METHODS``), lower case."""
    methods = getattr(type(module), "SUPPORTS_METHODS", None) or ()
    return {str(getattr(method, "value", method)).lower() for method in methods}


def is_autoawq_layer(module) -> bool:
    """AutoAWQ's ``WQLinear_GEMM``, ``WQLinear_GEMV``, ... (package ``awq``), by class name and module."""
    cls = type(module)
    return cls.__name__.startswith("WQLinear") and (
        cls.__module__ == "awq" or cls.__module__.startswith("awq.")
    )


def is_awq_layer(module) -> bool:
    """gptqmodel's AWQ kernels (not ParoQuant's rotated ones, which declare METHOD.PARO) and AutoAWQ's."""
    if is_autoawq_layer(module):
        return True
    return is_gptqmodel_layer(module) and AWQ_METHOD in declared_methods(module)


def parse_variant(variant: str | None) -> dict:
    variant = variant or VARIANTS[0]
    match = VARIANT_RE.match(variant)
    if match is None:
        raise ValueError(
            f"unknown awq variant {variant!r}; variants are 'int<bits>-g<group size>|gall-<sym|asym>' "
            f"(bits 2-8 with gptqmodel 7.6, 4 before), e.g. {', '.join(VARIANTS)}"
        )
    group = match["group"]
    return {
        "bits": int(match["bits"]),
        "group_size": -1 if group == "all" else int(group),
        "sym": match["sym"] == "sym",
    }
