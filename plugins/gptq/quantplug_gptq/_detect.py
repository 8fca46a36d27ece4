"""Recognising gptqmodel's GPTQ layers, and the variant names, without importing torch or gptqmodel."""

from __future__ import annotations

import re

GPTQ_METHOD = "gptq"

VARIANT_RE = re.compile(r"^int(?P<bits>[2-8])-g(?P<group>\d+|all)-(?P<sym>sym|asym)(?P<act>-actorder)?$")
VARIANTS = (
    "int4-g128-sym",
    "int4-g128-asym",
    "int4-g32-sym",
    "int4-g32-asym",
    "int4-gall-sym",
    "int4-g128-sym-actorder",
    "int8-g128-sym",
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


def is_gptq_layer(module) -> bool:
    """gptqmodel's GPTQ linear kernels; not its AWQ/GGUF/FP8/QQQ ones, nor its quantized embeddings."""
    if not is_gptqmodel_layer(module) or GPTQ_METHOD not in declared_methods(module):
        return False
    # TorchQuantEmbeddings takes token ids, not activations
    return not any("Embedding" in name for name in mro_names(module))


def parse_variant(variant: str | None) -> dict:
    variant = variant or VARIANTS[0]
    match = VARIANT_RE.match(variant)
    if match is None:
        raise ValueError(
            f"unknown gptq variant {variant!r}; variants are 'int<bits>-g<group size>|gall-<sym|asym>[-actorder]' "
            f"with bits 2-8, e.g. {', '.join(VARIANTS)}"
        )
    group = match["group"]
    return {
        "bits": int(match["bits"]),
        "group_size": -1 if group == "all" else int(group),
        "sym": match["sym"] == "sym",
        "desc_act": match["act"] is not None,
    }
