"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's (``base_model.model.<path>.lora_A.weight``, ``.lora_B.weight``,
``.lora_magnitude_vector``), so an adapter saved here loads in PEFT and vLLM
and a PEFT adapter loads here. Everything is checked before the model is
touched, and pickle files are never read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from quantplug._config import LoraConfig
from quantplug._lora import GroupSizeError, LoraLayer, check_adapter_name, qalora_group_size
from quantplug._model import _plan, attach, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
PREFIX = "base_model.model."
SUFFIXES = {
    "lora_A": ".lora_A.weight",
    "lora_B": ".lora_B.weight",
    "lora_magnitude": ".lora_magnitude_vector",
}


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt or does not fit the model; names the file and key."""


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default") -> Path:
    """Write ``adapter`` as PEFT does; returns the folder. Files are replaced atomically.

    On a model sharded by FSDP2 (:func:`quantplug.distributed.shard`) every rank
    must call it: each adapter tensor is gathered whole (a collective) and rank 0
    alone writes the same files as single-device training.
    """
    from safetensors.torch import save_file

    layers = lora_layers(model, adapter)
    if not layers:
        raise ValueError(f"no layer has adapter {adapter!r}")
    config = next(iter(layers.values())).configs[adapter]
    tensors = {}
    sharded = False
    for module_path, layer in layers.items():
        for attr, suffix in SUFFIXES.items():
            store = getattr(layer, attr)
            if adapter in store:
                tensor = store[adapter].detach()
                if hasattr(tensor, "full_tensor"):  # an FSDP2 shard (DTensor)
                    tensor, sharded = tensor.full_tensor(), True
                tensors[PREFIX + module_path + suffix] = tensor.to("cpu").contiguous().clone()
    data = config.to_peft_dict()
    if config.use_qalora:
        data["qalora_group_size"] = _saved_group_size(layers, adapter)
    folder = Path(path)
    if sharded and torch.distributed.get_rank() != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(data, indent=2)))
    return folder


def _saved_group_size(layers: dict, adapter: str) -> int:
    """The one ``qalora_group_size`` PEFT's config holds: the group every layer of a QALoRA adapter pools over."""
    groups = {path: layer.qalora_group_size[adapter] for path, layer in layers.items()}
    if len(set(groups.values())) > 1:
        raise ValueError(
            f"adapter {adapter!r} pools its input over groups of {sorted(set(groups.values()))} columns on "
            f"different layers ({groups}); PEFT's adapter_config.json holds one qalora_group_size. Attach it "
            "with an explicit LoraConfig(qalora_group_size=...) to save it"
        )
    return next(iter(groups.values()))


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter folder, validated as files; raises AdapterFileError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {str(folder)!r} does not exist")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterFileError(f"{str(config_file)!r} is missing: an adapter folder needs {CONFIG_NAME}")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{str(config_file)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{str(config_file)!r} must hold a JSON object, got {type(data).__name__}")
    try:
        config = LoraConfig.from_peft_dict(data)
    except (ValueError, TypeError) as exc:
        raise AdapterFileError(f"{str(config_file)!r}: {exc}") from None
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        pickles = [name for name in PICKLE_NAMES if (folder / name).exists()]
        hint = (
            f"; found {pickles[0]}, a pickle file, which quantplug never loads (it can run code): "
            "convert it with safetensors from a trusted environment"
            if pickles
            else ""
        )
        raise AdapterFileError(f"{str(weights_file)!r} is missing{hint}")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{str(weights_file)!r} is not a readable safetensors file: {exc}") from None
    return config, tensors


def _split_key(key: str, weights_file: Path) -> tuple[str, str]:
    """``base_model.model.a.b.lora_A.weight`` -> (``a.b``, ``lora_A``)."""
    name = key.removeprefix(PREFIX)
    for attr, suffix in SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], attr
        adapter_form = suffix.replace(".weight", "")  # PEFT's in-memory form: lora_A.<adapter>.weight
        if f"{adapter_form}." in name and name.endswith(".weight"):
            raise AdapterFileError(
                f"{str(weights_file)!r}: key {key!r} carries an adapter name; PEFT files store "
                f"'{PREFIX}<module>{suffix}'"
            )
    raise AdapterFileError(f"{str(weights_file)!r}: key {key!r} is not a LoRA weight quantplug knows")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default") -> nn.Module:
    """Load an adapter folder (saved here or by PEFT) as ``adapter``, attaching it first.

    :raises AdapterFileError: naming the file and key, for a missing,
        corrupt, non-JSON, mis-shaped or mis-targeted adapter. The model is
        unchanged when it raises.
    """
    check_adapter_name(adapter)
    config, tensors = read_adapter(path)
    weights_file = Path(path) / WEIGHTS_NAME
    if any(adapter in layer.lora_A for layer in lora_layers(model).values()):
        raise AdapterFileError(
            f"the model already has an adapter named {adapter!r}; load {str(path)!r} under another name"
        )
    try:
        planned = _plan(model, config)
    except GroupSizeError as exc:
        raise AdapterFileError(f"{str(Path(path) / CONFIG_NAME)!r}: key 'qalora_group_size': {exc}") from None
    except (ValueError, TypeError) as exc:
        raise AdapterFileError(f"{str(Path(path) / CONFIG_NAME)!r}: key 'target_modules': {exc}") from None
    plan = {p: m for p, m, _ in planned}
    backends = {p: b for p, _, b in planned}
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module_path, attr = _split_key(key, weights_file)
        if module_path not in plan:
            raise AdapterFileError(
                f"{str(weights_file)!r}: key {key!r} names module {module_path!r}, which the model does not have "
                "or the config's target_modules does not target"
            )
        by_module.setdefault(module_path, {})[attr] = tensor
    needed = ("lora_A", "lora_B", "lora_magnitude") if config.use_dora else ("lora_A", "lora_B")
    for module_path, found in by_module.items():
        for attr in found:
            if attr not in needed:
                raise AdapterFileError(
                    f"{str(weights_file)!r}: key {PREFIX + module_path + SUFFIXES[attr]!r} does not belong to an "
                    f"adapter with use_dora={config.use_dora} (see {CONFIG_NAME})"
                )
    for module_path, module in plan.items():
        found = by_module.get(module_path, {})
        for attr in needed:
            if attr not in found:
                raise AdapterFileError(
                    f"{str(weights_file)!r} lacks key {PREFIX + module_path + SUFFIXES[attr]!r}"
                )
        in_f, out_f = int(module.in_features), int(module.out_features)
        if config.use_qalora:  # A holds one column per pooled group
            base = module.base if isinstance(module, LoraLayer) else module
            in_f //= qalora_group_size(base, backends[module_path], in_f, config)
        shapes = {"lora_A": (config.r, in_f), "lora_B": (out_f, config.r), "lora_magnitude": (out_f,)}
        for attr, tensor in found.items():
            if tuple(tensor.shape) != shapes[attr]:
                raise AdapterFileError(
                    f"{str(weights_file)!r}: key {PREFIX + module_path + SUFFIXES[attr]!r} has shape "
                    f"{tuple(tensor.shape)}, the model needs {shapes[attr]} (r={config.r})"
                )
            if not torch.isfinite(tensor).all():
                raise AdapterFileError(
                    f"{str(weights_file)!r}: key {PREFIX + module_path + SUFFIXES[attr]!r} has NaN/inf"
                )
    attach(model, config, adapter=adapter)
    layers = lora_layers(model, adapter)
    with torch.no_grad():
        for module_path, found in by_module.items():
            layer = layers[module_path]
            for attr, tensor in found.items():
                param = getattr(layer, attr)[adapter]
                param.copy_(tensor.to(param.device, param.dtype))
    return model
