"""quantplug: LoRA adapters on already-quantized models, for every quantization backend.

Importing this package is cheap: torch, the backends' libraries, transformers
and peft are imported only when a function that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import pluggy

from quantplug.config import LoraConfig
from quantplug.info import BackendInfo, BackendStatus, Requirement, Status

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("quantplug")

# public name -> module that defines it, imported on first access
_LAZY = {
    "LoraLayer": "quantplug.lora",
    "attach": "quantplug.model",
    "detect": "quantplug.model",
    "set_adapter": "quantplug.model",
    "adapter_batch": "quantplug.model",
    "disable_adapters": "quantplug.model",
    "prepare_for_training": "quantplug.model",
    "trainable_parameters": "quantplug.model",
    "lora_layers": "quantplug.model",
    "quantize": "quantplug.model",
    "merge": "quantplug.merging",
    "unmerge": "quantplug.merging",
    "unload": "quantplug.merging",
    "MergeReport": "quantplug.merging",
    "MergeError": "quantplug.merging",
    "save_adapter": "quantplug.io",
    "load_adapter": "quantplug.io",
    "AdapterFileError": "quantplug.io",
    "register": "quantplug.registry",
    "unregister": "quantplug.registry",
    "backends": "quantplug.registry",
    "load_plugins": "quantplug.registry",
    "PluginConflictError": "quantplug.registry",
    "use_reference_kernels": "quantplug.kernels",
}

__all__ = [
    "AdapterFileError",
    "BackendInfo",
    "BackendStatus",
    "LoraConfig",
    "LoraLayer",
    "MergeError",
    "MergeReport",
    "PluginConflictError",
    "Requirement",
    "Status",
    "__version__",
    "adapter_batch",
    "attach",
    "backends",
    "detect",
    "disable_adapters",
    "hookimpl",
    "load_adapter",
    "load_plugins",
    "lora_layers",
    "merge",
    "prepare_for_training",
    "quantize",
    "register",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
    "unregister",
    "use_reference_kernels",
]


# submodules reached as attributes (``qp.distributed.shard``), imported on first access; not in
# __all__, which lists names defined by a submodule (tests/test_import.py keeps the two apart)
_SUBMODULES = ("distributed",)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"quantplug.{name}")  # also sets the package attribute
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quantplug' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBMODULES])


if TYPE_CHECKING:
    from quantplug import distributed as distributed
    from quantplug.io import AdapterFileError, load_adapter, save_adapter
    from quantplug.kernels import use_reference_kernels
    from quantplug.lora import LoraLayer
    from quantplug.merging import MergeError, MergeReport, merge, unload, unmerge
    from quantplug.model import (
        adapter_batch,
        attach,
        detect,
        disable_adapters,
        lora_layers,
        prepare_for_training,
        quantize,
        set_adapter,
        trainable_parameters,
    )
    from quantplug.registry import PluginConflictError, backends, load_plugins, register, unregister
