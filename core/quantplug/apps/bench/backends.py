"""Which backends and formats the bench times, read from the installed backends' own ``BackendInfo``.

No backend is named here: the default run takes every backend that is ok
here and declares the device, each in its first declared variant; the
whole-model rows take the first of those that quantizes (the core's dense
backend only when nothing else is ok).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import quantplug as qp
from quantplug.apps.backends import default_backend, find, usable, variant_of

__all__ = ["importable", "layer_backends", "model_backend", "peft_markers", "variant_of"]


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def layer_backends(wanted: str | None, device: str, log: Callable[[str], None]) -> list[qp.BackendStatus]:
    """The backends whose layers are timed: ``wanted`` (comma-separated names, any case), else all usable
    here."""
    statuses = qp.backends()
    if wanted:
        chosen = []
        for name in wanted.split(","):
            status = find(name, statuses)
            if status is None:
                log(f"skip {name}: no such backend (installed: {', '.join(s.name for s in statuses)})")
            else:
                chosen.append(status)
    else:
        chosen = statuses
    out = []
    for status in chosen:
        why = usable(status, device)
        if why:
            log(f"skip {status.name}: {why}")
        else:
            out.append(status)
    return out


def model_backend(wanted: str | None, device: str) -> qp.BackendStatus | None:
    """The backend of the whole-model rows: the first of ``wanted``, else the first quantizing backend
    usable here (the core's dense one if it is the only one)."""
    if wanted:
        status = find(wanted.split(",")[0])
        return status if status is not None and usable(status, device) is None else None
    return default_backend(device)


def peft_markers(holder, model) -> None:
    """Set transformers' ``is_loaded_in_4bit``/``is_loaded_in_8bit`` on ``holder`` as transformers would for
    ``model``'s layers: PEFT dispatches its bitsandbytes LoRA classes only on models carrying them."""
    kinds = {type(module).__name__ for module in model.modules()}
    holder.is_loaded_in_4bit = "Linear4bit" in kinds
    holder.is_loaded_in_8bit = "Linear8bitLt" in kinds
