"""quantplug: LoRA adapters on already-quantized models, for every quantization backend.

Importing this package is cheap: torch, the backends' libraries, transformers
and peft are imported only when a function that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import pluggy

from quantplug._config import LoraConfig, LoraConfigError
from quantplug._info import BackendInfo, BackendStatus, Requirement, Status

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("quantplug")

# public name -> module that defines it, imported on first access
_LAZY = {
    "LoraLayer": "quantplug._lora",
    "attach": "quantplug._model",
    "detect": "quantplug._model",
    "set_adapter": "quantplug._model",
    "adapter_batch": "quantplug._model",
    "disable_adapters": "quantplug._model",
    "prepare_for_training": "quantplug._model",
    "trainable_parameters": "quantplug._model",
    "lora_layers": "quantplug._model",
    "quantize": "quantplug._model",
    "merge": "quantplug._merging",
    "unmerge": "quantplug._merging",
    "unload": "quantplug._merging",
    "MergeReport": "quantplug._merging",
    "MergeError": "quantplug._merging",
    "save_adapter": "quantplug._io",
    "load_adapter": "quantplug._io",
    "AdapterFileError": "quantplug._io",
    "register": "quantplug._registry",
    "unregister": "quantplug._registry",
    "backends": "quantplug._registry",
    "load_plugins": "quantplug._registry",
    "PluginConflictError": "quantplug._registry",
    "PluginError": "quantplug._errors",
    "PluginWarning": "quantplug._errors",
    "use_reference_kernels": "quantplug._kernels",
}

__all__ = [
    "AdapterFileError",
    "BackendInfo",
    "BackendStatus",
    "LoraConfig",
    "LoraConfigError",
    "LoraLayer",
    "MergeError",
    "MergeReport",
    "PluginConflictError",
    "PluginError",
    "PluginWarning",
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
    from quantplug._errors import PluginError, PluginWarning
    from quantplug._io import AdapterFileError, load_adapter, save_adapter
    from quantplug._kernels import use_reference_kernels
    from quantplug._lora import LoraLayer
    from quantplug._merging import MergeError, MergeReport, merge, unload, unmerge
    from quantplug._model import (
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
    from quantplug._registry import PluginConflictError, backends, load_plugins, register, unregister
