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


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def is_core(status: qp.BackendStatus) -> bool:
    """The core's own dense backend (a plain ``nn.Linear``), shipped in the ``quantplug`` dist itself."""
    return status.plugin_dist == "quantplug"


def variant_of(status: qp.BackendStatus) -> str | None:
    """The format timed for a backend: its first declared variant (its default)."""
    return status.info.variants[0] if status.info and status.info.variants else None


def find(name: str) -> qp.BackendStatus | None:
    """The status of the backend called ``name`` (case-insensitive), or None."""
    return next((s for s in qp.backends() if s.name.lower() == name.lower()), None)


def usable(status: qp.BackendStatus, device: str) -> str | None:
    """Why ``status``'s backend cannot run on ``device`` here, or None when it can."""
    if not status.ok:
        return f"{status.status}: {status.reason or ''}".strip()
    if status.info and device not in status.info.devices:
        return f"runs on {', '.join(status.info.devices)}, not {device}"
    return None


def layer_backends(wanted: str | None, device: str, log: Callable[[str], None]) -> list[qp.BackendStatus]:
    """The backends whose layers are timed: ``wanted`` (comma-separated names), else all usable here."""
    statuses = qp.backends()
    if wanted:
        chosen = []
        for name in wanted.split(","):
            status = find(name.strip())
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
        status = find(wanted.split(",")[0].strip())
        return status if status is not None and usable(status, device) is None else None
    ready = [s for s in qp.backends() if usable(s, device) is None]
    return next((s for s in ready if not is_core(s)), ready[0] if ready else None)


def peft_markers(holder, model) -> None:
    """Set transformers' ``is_loaded_in_4bit``/``is_loaded_in_8bit`` on ``holder`` as transformers would for
    ``model``'s layers: PEFT dispatches its bitsandbytes LoRA classes only on models carrying them."""
    kinds = {type(module).__name__ for module in model.modules()}
    holder.is_loaded_in_4bit = "Linear4bit" in kinds
    holder.is_loaded_in_8bit = "Linear8bitLt" in kinds
