"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's (``base_model.model.<path>.lora_A.weight``, ``.lora_B.weight``,
``.lora_magnitude_vector``), so an adapter saved here loads in PEFT and vLLM
and a PEFT adapter loads here. Everything is checked before the model is
touched, and pickle files are never read.

Saving is all or nothing: a new folder is written as a hidden sibling and
renamed into place; into an existing folder (a Trainer checkpoint holds
``optimizer.pt`` and more beside the adapter, which stay as they are) both
files are written to temporary names first, the old ones kept as hard-link
backups, and the two renames are undone on any exception, Ctrl-C included.
What remains is the instant between the two renames: a process killed there
(``kill -9``, power loss) leaves the new weights beside the old config.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quantplug._config import LoraConfig
from quantplug._lora import GroupSizeError, LoraLayer, check_adapter_name
from quantplug._model import _plan, attach_weights, lora_layers, qalora_group_size

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
PREFIX = "base_model.model."
SUFFIXES = {
    "lora_A": ".lora_A.weight",
    "lora_B": ".lora_B.weight",
    "lora_magnitude": ".lora_magnitude_vector",
}


ADAPTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt or does not fit the model; names the file and key."""


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default") -> Path:
    """Write ``adapter`` as PEFT does; returns the folder. Files are replaced atomically.

    On a model sharded by FSDP2 (:func:`quantplug.distributed.shard`) every rank
    must call it: each adapter tensor is gathered whole (a collective) and rank 0
    alone writes the same files as single-device training.
    """
    from safetensors.torch import save_file

    folder = Path(path)
    _check_writable_folder(folder)
    layers = lora_layers(model, adapter)
    if not layers:
        raise ValueError(f"no layer has adapter {adapter!r}")
    config = next(iter(layers.values())).configs[adapter]
    tensors = {}
    sharded = False
    for key, param in adapter_parameters(layers, adapter).items():
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):  # an FSDP2 shard (DTensor)
            tensor, sharded = tensor.full_tensor(), True
        tensors[key] = tensor.to("cpu").contiguous().clone()
    data = config.to_peft_dict()
    if config.use_qalora:
        data["qalora_group_size"] = _saved_group_size(layers, adapter)
    if sharded and torch.distributed.get_rank() != 0:
        return folder
    text = json.dumps(data, indent=2)
    _write_files(
        folder,
        {
            WEIGHTS_NAME: lambda f: save_file(tensors, f, metadata={"format": "pt"}),
            CONFIG_NAME: lambda f: Path(f).write_text(text),
        },
    )
    return folder


def adapter_parameters(layers: dict[str, LoraLayer], adapter: str) -> dict[str, torch.Tensor]:
    """``adapter``'s parameters in ``layers`` under PEFT's file keys (``base_model.model.<path>.lora_A.weight``)."""
    return {
        PREFIX + path + suffix: getattr(layer, attr)[adapter]
        for path, layer in layers.items()
        for attr, suffix in SUFFIXES.items()
        if adapter in getattr(layer, attr)
    }


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


# -- paths -------------------------------------------------------------------------


def _kind_of(path: Path) -> str:
    """What is at ``path``: "folder", "file", "missing", "dangling" (a symlink to nothing), "loop"
    (a symlink loop on the way), "under-file" (a file where a folder on the way should be), "denied"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "dangling" if os.path.islink(path) else "missing"
    except NotADirectoryError:
        return "under-file"
    except PermissionError:
        return "denied"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "loop"
        if exc.errno == errno.ENAMETOOLONG:
            return "too-long"
        raise
    return "folder" if stat.S_ISDIR(mode) else "file"


def _path_problem(path: Path, kind: str, role: str) -> str:
    """The message for a ``path`` whose kind is not the ``role`` it was passed for."""
    shown = repr(str(path))
    if kind == "file" and role == "folder":
        hint = (
            f"; pass its folder {str(path.parent)!r}"
            if path.name in (CONFIG_NAME, WEIGHTS_NAME)
            else f": an adapter is a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
        return f"{shown} is a file, not a folder{hint}"
    if kind == "folder" and role == "file":
        return f"{shown} is a folder, not a file"
    if kind == "loop":
        return f"{shown} is a symlink loop (a link on the way points back to itself); fix or remove the link"
    if kind == "dangling":
        return f"{shown} is a symlink to {os.readlink(path)!r}, which does not exist"
    if kind == "under-file":
        above = next((str(p) for p in path.parents if os.path.isfile(p)), "a part of it")
        return f"{shown} cannot exist: {above!r} is a file, not a folder"
    if kind == "denied":
        return f"{shown} cannot be read: permission denied"
    if kind == "too-long":
        return f"{shown} is too long a path for this file system"
    return f"{shown} does not exist"


def _check_writable_folder(folder: Path) -> None:
    """Refuse before anything is computed or written: a file, a symlink loop or a file on the way."""
    kind = _kind_of(folder)
    if kind in ("folder", "missing"):
        return
    raise AdapterFileError(f"cannot save the adapter: {_path_problem(folder, kind, 'folder')}")


# -- all-or-nothing writes -----------------------------------------------------------


def _write_files(folder: Path, writers: dict[str, Callable[[str], None]]) -> None:
    """Put the files ``writers`` write (name -> write(path)) into ``folder``, all or none."""
    if _kind_of(folder) == "missing":
        _write_new_folder(folder, writers)
    else:
        _replace_in_folder(folder, writers)


def _write_new_folder(folder: Path, writers: dict[str, Callable[[str], None]]) -> None:
    """Write into a hidden sibling, then rename it into place: the folder appears whole or not at all
    (and the parent folders this created are removed again on failure)."""
    created = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        for name, write in writers.items():
            write(str(tmp / name))
            _fsync(tmp / name)
        os.rename(tmp, folder)
        _fsync(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # deepest first
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _replace_in_folder(folder: Path, writers: dict[str, Callable[[str], None]]) -> None:
    """Replace files in an existing folder, leaving every other file there as it is.

    Each new file is written whole under a temporary name; each old one gets a hard-link backup;
    then the renames run, and any exception among them puts the old files back."""
    temps: dict[str, Path] = {}
    backups: dict[str, Path] = {}
    done: list[str] = []
    try:
        for name, write in writers.items():
            temps[name] = _temp_path(folder, name, "tmp")
            write(str(temps[name]))
            _fsync(temps[name])
        for name in writers:
            target = folder / name
            if _kind_of(target) == "folder":
                raise AdapterFileError(f"cannot save the adapter: {_path_problem(target, 'folder', 'file')}")
            if os.path.lexists(target):
                backups[name] = _temp_path(folder, name, "old")
                _keep_copy(target, backups[name])
        try:
            for name in writers:
                os.replace(temps[name], folder / name)
                done.append(name)
        except BaseException:
            for name in reversed(done):
                if name in backups:
                    os.replace(backups.pop(name), folder / name)
                else:
                    os.unlink(folder / name)
            raise
        _fsync(folder)
    finally:
        for leftover in (*temps.values(), *backups.values()):
            if os.path.lexists(leftover):
                os.unlink(leftover)


def _temp_path(folder: Path, name: str, tag: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=f".{tag}")
    os.close(fd)
    os.unlink(tmp)  # a free name in the folder; the writers create the file themselves
    return Path(tmp)


def _keep_copy(target: Path, backup: Path) -> None:
    try:
        os.link(target, backup, follow_symlinks=False)  # instant, and the old bytes stay as they are
    except OSError:  # a file system without hard links
        shutil.copy2(target, backup, follow_symlinks=False)


def _fsync(path: Path) -> None:
    """Flush a written file or a folder's entries to disk (best effort: not every system can)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter folder, validated as files; raises AdapterFileError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    kind = _kind_of(folder)
    if kind != "folder":
        problem = _path_problem(folder, kind, "folder")
        raise AdapterFileError(
            f"adapter folder {problem}" if kind == "missing" else f"cannot load the adapter: {problem}"
        )
    config_file = folder / CONFIG_NAME
    kind = _kind_of(config_file)
    if kind == "missing":
        raise AdapterFileError(f"{str(config_file)!r} is missing: an adapter folder needs {CONFIG_NAME}")
    if kind != "file":
        raise AdapterFileError(_path_problem(config_file, kind, "file"))
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
    kind = _kind_of(weights_file)
    if kind not in ("file", "missing"):
        raise AdapterFileError(_path_problem(weights_file, kind, "file"))
    if kind == "missing":
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
    for key, tensor in tensors.items():
        if tensor.dtype not in ADAPTER_DTYPES:
            raise AdapterFileError(
                f"{str(weights_file)!r}: key {key!r} holds {str(tensor.dtype).removeprefix('torch.')} values; "
                "adapter tensors must be floating point (float32, bfloat16, float16 or float64), and quantplug "
                "casts nothing else into an adapter"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{str(weights_file)!r}: key {key!r} has NaN/inf")
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
    # each layer's adapter is built with these values off the model, then all go in at once
    return attach_weights(model, config, adapter, by_module)
