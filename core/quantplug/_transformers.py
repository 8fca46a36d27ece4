"""transformers' Trainer, TRL's SFTTrainer and ``save_pretrained`` on a model carrying quantplug adapters.

What transformers already honours (read from its source, 4.56 to 5.25):

- ``PreTrainedModel._hf_peft_config_loaded`` is its own flag for "this model
  carries adapters". With it, ``Trainer`` accepts a quantized model for
  training (``validate_quantization_for_training`` refuses a "purely
  quantized" one), and ``gradient_checkpointing_enable`` makes the input
  embeddings carry gradients, as PEFT models need.
- ``Trainer`` saves checkpoints and ``save_model`` through
  ``model.save_pretrained(dir)``.
- ``Trainer`` resumes a checkpoint that holds no full weights through
  ``load_sharded_checkpoint``: it reads ``model.safetensors.index.json`` and
  loads each file it names with ``model.load_state_dict(tensors, strict=False)``.
  (Its adapter branch is for ``peft.PeftModel`` instances only.)

So :func:`sync` gives an adapted transformers model a subclass of its own class
(as ``torch.nn.utils.parametrize`` does), :class:`AdapterModelMixin`, that sets
the flag, saves the adapters in PEFT's files with an index naming them, and
loads PEFT-keyed adapter tensors back into the active adapter. Nothing else
changes: the class keeps its name and module, its ``forward`` and its config,
and the original class comes back when the last adapter layer is removed.
Like ``peft.get_peft_model``, adapting a transformers model freezes every
parameter that is not an adapter's: its checkpoints hold the adapters alone,
so anything else trained would be lost on resume.

transformers is never imported here; a model is recognised by its class's MRO.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

INDEX_NAME = "model.safetensors.index.json"  # transformers' SAFE_WEIGHTS_INDEX_NAME
_ADAPTED: dict[type, type] = {}


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
        for cls in type(model).__mro__
    )


def sync(model: nn.Module) -> None:
    """Make ``model`` an adapter-carrying transformers model while it has adapter layers, a plain one after."""
    if not is_transformers_model(model):
        return
    from quantplug._model import lora_layers, trainable_parameters

    adapted = isinstance(model, AdapterModelMixin)
    if lora_layers(model):
        adapters = {id(p) for p in trainable_parameters(model)}
        for param in model.parameters():
            if id(param) not in adapters:
                param.requires_grad_(False)
        if not adapted:
            model.__class__ = _adapted_class(type(model))
    elif adapted:
        model.__class__ = model._quantplug_original_class


def _adapted_class(cls: type) -> type:
    adapted = _ADAPTED.get(cls)
    if adapted is None:
        adapted = _ADAPTED[cls] = type(
            cls.__name__,
            (AdapterModelMixin, cls),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "_quantplug_original_class": cls,
            },
        )
    return adapted


def _adapter_folder(root: Path, adapter: str) -> Path:
    """Where PEFT puts an adapter: ``"default"`` in the folder itself, any other in a subfolder of its name."""
    return root if adapter == "default" else root / adapter


class AdapterModelMixin:
    """transformers' adapter-carrying model protocol, served by quantplug (see the module docstring)."""

    _hf_peft_config_loaded = True
    _quantplug_original_class: type

    # -- transformers' adapter API -----------------------------------------

    def active_adapters(self) -> list[str]:
        """The active adapters' names (transformers' ``PeftAdapterMixin.active_adapters``)."""
        from quantplug._model import lora_layers

        active: list[str] = []
        for layer in lora_layers(self).values():
            active.extend(name for name in layer.active_adapters if name not in active)
        return active

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        from quantplug._model import set_adapter

        set_adapter(self, adapter_name)

    def load_adapter(
        self, peft_model_id: str | os.PathLike, adapter_name: str | None = None, **_ignored
    ) -> None:
        """Load a PEFT-format adapter folder (transformers' signature; hub ids are not fetched)."""
        from quantplug._io import load_adapter

        load_adapter(self, peft_model_id, adapter=adapter_name or "default")

    @property
    def peft_config(self) -> dict:
        """Each adapter's :class:`quantplug.LoraConfig`, by name (``to_peft_dict()`` gives PEFT's JSON)."""
        from quantplug._model import lora_layers

        configs: dict = {}
        for layer in lora_layers(self).values():
            for name, config in layer.configs.items():
                configs.setdefault(name, config)
        return configs

    def get_adapter_state_dict(self, adapter_name: str | None = None, state_dict: dict | None = None) -> dict:
        """The adapter's tensors under PEFT's keys without the ``base_model.model.`` prefix (as transformers')."""
        from quantplug._io import PREFIX, adapter_parameters
        from quantplug._model import lora_layers

        adapter = adapter_name or self.active_adapters()[0]
        parameters = adapter_parameters(lora_layers(self, adapter), adapter)
        return {key.removeprefix(PREFIX): tensor.detach() for key, tensor in parameters.items()}

    # -- saving and resuming -----------------------------------------------

    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, state_dict=None, **_ignored
    ) -> None:
        """Write every adapter in PEFT's files, as ``PeftModel.save_pretrained`` lays them out.

        ``"default"`` goes in ``save_directory`` itself and any other adapter
        in a subfolder of its name. The quantized base is not written. An
        index (``model.safetensors.index.json``) names the active adapter's
        tensors, so ``Trainer(resume_from_checkpoint=...)`` loads them back
        through :meth:`load_state_dict`. ``state_dict`` (the whole model's,
        which Trainer may pass) is ignored: the adapters are read from the layers.
        """
        from quantplug._io import WEIGHTS_NAME, save_adapter
        from quantplug._model import lora_layers

        root = Path(save_directory)
        sharded = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not is_main_process and not sharded:
            return
        names = sorted({name for layer in lora_layers(self).values() for name in layer.adapters})
        for name in names:  # every rank of an FSDP2 model calls save_adapter: it gathers shards
            save_adapter(self, _adapter_folder(root, name), adapter=name)
        active = self.active_adapters()
        if not is_main_process or len(active) != 1:
            return  # resume loads one active adapter; several active are saved but not indexed
        weights = _adapter_folder(root, active[0]) / WEIGHTS_NAME
        index = {
            "metadata": {
                "format": "pt",
                "quantplug": "adapter checkpoint: the files named here hold LoRA adapters in PEFT's format, "
                "not the base model; transformers' Trainer resumes from this index",
            },
            # the model's own keys for the adapter's parameters -> the file holding them (under PEFT's names)
            "weight_map": {key: str(weights.relative_to(root)) for key in sorted(_own_keys(self, active[0]))},
        }
        (root / INDEX_NAME).write_text(json.dumps(index, indent=2))

    @property
    def _keys_to_ignore_on_save(self) -> list[str]:
        """Every state-dict key but the active adapter's: what an adapter checkpoint does not hold.

        transformers' Trainer compares these with the keys a resumed checkpoint
        lacked, and warns (listing the whole base) when they differ.
        """
        active = self.active_adapters()
        ours = _own_keys(self, active[0]) if len(active) == 1 else set()
        return [key for key in nn.Module.state_dict(self) if key not in ours]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, also taking PEFT-keyed adapter tensors into the active adapter.

        This is how ``Trainer(resume_from_checkpoint=...)`` reads back what
        :meth:`save_pretrained` wrote. Other keys load as usual.
        """
        from quantplug._io import PREFIX, SUFFIXES, _split_key

        adapter_keys = {
            key: value
            for key, value in state_dict.items()
            if key.startswith(PREFIX) and key.endswith(tuple(SUFFIXES.values()))
        }
        if not adapter_keys:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        active = self.active_adapters()
        if len(active) != 1:
            raise ValueError(
                f"PEFT-format adapter tensors load into the one active adapter; this model has {active} active. "
                "Call qp.set_adapter(model, name) first, or qp.load_adapter(model, folder, adapter=name)"
            )
        own = {}
        for key, value in adapter_keys.items():
            if not value.is_floating_point() or not torch.isfinite(value).all():
                raise ValueError(f"adapter tensor {key!r} must be floating point and finite")
            module_path, attr = _split_key(key, Path(INDEX_NAME))  # always a match: filtered above
            own[f"{module_path}.{attr}.{active[0]}"] = value
        params = dict(self.named_parameters())
        # all checked before anything is copied: a refused load changes nothing
        for key, value in own.items():
            if key not in params:
                raise ValueError(
                    f"adapter tensor for {key!r}: this model has no such adapter parameter; the checkpoint was "
                    "saved from another model or another target_modules"
                )
            if tuple(value.shape) != tuple(params[key].shape):
                raise RuntimeError(
                    f"size mismatch for {key!r}: the checkpoint has {tuple(value.shape)}, the model "
                    f"{tuple(params[key].shape)} (another rank or model)"
                )
        rest = {key: value for key, value in state_dict.items() if key not in adapter_keys}
        result = super().load_state_dict({**rest, **own}, strict=False, assign=assign)
        # report what concerns the adapter (its tensors the files lacked) and the other keys, not the whole
        # quantized base, which an adapter checkpoint never holds
        ours = _own_keys(self, active[0])
        missing = [key for key in result.missing_keys if key in ours]
        unexpected = [key for key in result.unexpected_keys if key in rest]
        if strict and (missing or unexpected):
            raise RuntimeError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        return type(result)(missing, unexpected)


def _own_keys(model: nn.Module, adapter: str) -> set[str]:
    """``adapter``'s parameters under the model's own state-dict keys (``<path>.lora_A.<adapter>``)."""
    from quantplug._io import SUFFIXES
    from quantplug._model import lora_layers

    return {
        f"{path}.{attr}.{adapter}"
        for path, layer in lora_layers(model, adapter).items()
        for attr in SUFFIXES
        if adapter in getattr(layer, attr)
    }
