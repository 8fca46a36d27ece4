"""Test helpers for plugin authors and for quantplug's own tests.

Conformance suite: subclass :class:`BackendConformance` in your tests::

    from quantplug.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend = "mybackend"          # the name your plugin declares
        forward_tol = 2e-2             # how far layer(x) may be from x @ W.T + b

Every contract of ``quantplug/hookspecs.py`` becomes a test, run on layers
your plugin builds through ``quantplug_quantize`` (override
:meth:`BackendConformance.make_layer` to build them another way), for every
variant you declare. A failure message names the broken contract and the fix.

Also: :func:`random_linear` (a seeded dense layer), :func:`relative_error`,
:class:`Holder` (a one-layer model to attach to), and :func:`tiny_llama` (a
tiny LLaMA built from a config, no download). Names load on first access, so
``tiny_llama`` needs transformers but not pytest. :mod:`quantplug.testing.ptx`
runs a fused kernel's inline PTX on the CPU (Triton's interpreter cannot).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "BackendConformance": "quantplug.testing.conformance",
    "Holder": "quantplug.testing.conformance",
    "random_linear": "quantplug.testing.conformance",
    "relative_error": "quantplug.testing.conformance",
    "tiny_llama": "quantplug.testing.models",
}

__all__ = ["BackendConformance", "Holder", "random_linear", "relative_error", "tiny_llama"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quantplug.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from quantplug.testing.conformance import BackendConformance, Holder, random_linear, relative_error
    from quantplug.testing.models import tiny_llama
