"""Recognising gptqmodel's GPTQ layers, and the variant names, without importing torch or gptqmodel."""

from __future__ import annotations

import re

from quantplug_gptqmodel._classes import declares_method, mro_names
from quantplug_gptqmodel._classes import parse_variant as _parse_variant

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


def is_gptq_layer(module) -> bool:
    """gptqmodel's GPTQ linear kernels; not its AWQ/GGUF/FP8/QQQ ones, nor its quantized embeddings."""
    if not declares_method(module, GPTQ_METHOD):
        return False
    # TorchQuantEmbeddings takes token ids, not activations
    return not any("Embedding" in name for name in mro_names(module))


def parse_variant(variant: str | None) -> dict:
    spec = _parse_variant(
        variant,
        VARIANT_RE,
        VARIANTS,
        "gptq",
        "'int<bits>-g<group size>|gall-<sym|asym>[-actorder]' with bits 2-8",
    )
    spec["desc_act"] = (variant or VARIANTS[0]).endswith("-actorder")
    return spec
