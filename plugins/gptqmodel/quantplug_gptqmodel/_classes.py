"""What the gptq and awq backends share about gptqmodel's layers, without importing torch or gptqmodel.

Both backends recognise their layers by class names along the MRO and parse
variant names of the form ``int<bits>-g<group size>|gall-<sym|asym>``; this
module holds that. The torch-side helpers both use (reading a layer through
its forward, compute dtype, the adapter layer's base call) are in
``quantplug_gptqmodel/_torch.py``. Both are private to this dist.
"""

from __future__ import annotations

import re

# The gptqmodel releases both backends support: what the nox matrix proves (docs/compatibility.md).
# 7.3-7.5 import requests without declaring it (this dist declares it); 7.3-7.4 also import torchvision,
# and 7.7.0 requires torch>=2.14.1, so neither can be proved beside torch 2.13.0+cpu here.
GPTQMODEL_RANGE = ">=7.5,<7.7"


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


def declares_method(module, method: str) -> bool:
    """A gptqmodel layer whose class declares ``method`` (``"gptq"``, ``"awq"``, ...)."""
    return is_gptqmodel_layer(module) and method in declared_methods(module)


def parse_variant(
    variant: str | None, pattern: re.Pattern, variants: tuple[str, ...], backend: str, grammar: str
) -> dict:
    """``bits``, ``group_size`` (-1 for ``gall``) and ``sym`` of ``variant`` (``None``: ``variants[0]``).

    :param pattern: the backend's variant regex, with named groups ``bits``, ``group`` and ``sym``.
    :param grammar: how the error message describes the names ``pattern`` accepts.
    """
    variant = variant or variants[0]
    match = pattern.match(variant)
    if match is None:
        raise ValueError(
            f"unknown {backend} variant {variant!r}; variants are {grammar}, e.g. {', '.join(variants)}"
        )
    group = match["group"]
    return {
        "bits": int(match["bits"]),
        "group_size": -1 if group == "all" else int(group),
        "sym": match["sym"] == "sym",
    }
