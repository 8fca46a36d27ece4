"""What a backend plugin declares about itself, and what the core reports back.

These are plain data: a plugin returns a :class:`BackendInfo` from
``quantplug_backend_info`` and the core turns its requirements into a
:class:`BackendStatus` per backend (see :mod:`quantplug._versions`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# every merge mode the core knows; "zeros" folds a QALoRA adapter into the zero points of
# group-quantized layers and only formats that store zero points declare it
MERGE_MODES = ("requantize", "dense", "zeros")
DEFAULT_MERGE_MODES = ("requantize", "dense")


class Status(str, enum.Enum):
    """Outcome of a backend's availability probe."""

    OK = "ok"
    MISSING = "missing"
    TOO_OLD = "too old"
    TOO_NEW = "too new"
    BROKEN = "broken"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Requirement:
    """One distribution a backend needs, with the versions it supports.

    :param dist: the distribution name as pip knows it (``"bitsandbytes"``).
    :param specifier: a PEP 440 specifier set (``">=0.45,<0.51"``); empty accepts any.
    :param module: the import name when it differs from ``dist``
        (``"neural_compressor"``); used to tell "missing" from "broken".
    :param pip: the install line to print when it is absent or out of range;
        defaults to ``pip install '<dist><specifier>'``.
    """

    dist: str
    specifier: str = ""
    module: str | None = None
    pip: str | None = None

    def install_line(self) -> str:
        return self.pip or f"pip install '{self.dist}{self.specifier}'"


@dataclass(frozen=True)
class BackendInfo:
    """A backend's self-description, returned by ``quantplug_backend_info``.

    :param name: the backend's name, unique among installed plugins (``"bnb"``).
    :param requires: the distributions it needs at run time.
    :param devices: device types its layers run on (``("cpu", "cuda")``).
    :param merge_modes: the merge modes it supports, out of ``MERGE_MODES``;
        the core's ``"dense"`` merge only needs ``quantplug_dequantize``,
        ``"requantize"`` also needs ``quantplug_requantize``, and ``"zeros"``
        (QALoRA adapters into the zero points) needs ``quantplug_group_size``
        and ``quantplug_fold_into_zeros``. Default: ``("requantize", "dense")``.
    :param variants: the quantization formats ``quantplug_quantize`` can build,
        the first being the default (``("nf4", "fp4", "int8")``).
    :param dora: DoRA works on its layers.
    :param mixed_batch: ``adapter_names=`` batches work on its layers.
    :param compile_safe: a wrapped layer runs under ``torch.compile(fullgraph=True)``.
    :param shardable: its quantized weights can be sharded by FSDP2.
    :param limits: capability -> why not, for every capability it lacks,
        shown by ``quantplug doctor`` and raised by the core when asked for.
    """

    name: str
    requires: tuple[Requirement, ...] = ()
    devices: tuple[str, ...] = ("cpu",)
    merge_modes: tuple[str, ...] = DEFAULT_MERGE_MODES
    variants: tuple[str, ...] = ()
    dora: bool = True
    mixed_batch: bool = True
    compile_safe: bool = True
    shardable: bool = False
    limits: dict[str, str] = field(default_factory=dict)


@dataclass
class BackendStatus:
    """One row of ``quantplug doctor``: is this backend usable here, and if not, the fix."""

    name: str
    status: Status
    plugin_dist: str | None = None
    plugin_name: str | None = None
    plugin_version: str | None = None
    library: str | None = None
    found: str | None = None
    required: str | None = None
    fix: str | None = None
    reason: str | None = None
    info: BackendInfo | None = None
    kernels: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    def as_dict(self) -> dict:
        info = self.info
        return {
            "name": self.name,
            "status": str(self.status),
            "plugin_dist": self.plugin_dist,
            "plugin_version": self.plugin_version,
            "library": self.library,
            "found": self.found,
            "required": self.required,
            "fix": self.fix,
            "reason": self.reason,
            "devices": list(info.devices) if info else [],
            "merge_modes": list(info.merge_modes) if info else [],
            "variants": list(info.variants) if info else [],
            "dora": info.dora if info else None,
            "mixed_batch": info.mixed_batch if info else None,
            "compile_safe": info.compile_safe if info else None,
            "shardable": info.shardable if info else None,
            "limits": dict(info.limits) if info else {},
            "kernels": dict(self.kernels),
        }
