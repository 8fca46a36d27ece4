"""INC's availability, from installed metadata only (no import of neural_compressor).

Two things the core's probe of ``neural-compressor`` cannot see:

- INC's PyTorch API also ships as the torch-only distribution
  ``neural-compressor-pt`` (same ``neural_compressor`` package);
- ``pip install neural-compressor`` without the ``[pt]`` extra installs a
  package whose ``import neural_compressor.torch`` fails (3.10: no
  ``cpuinfo``, no ``prettytable``), while the metadata looks fine.
"""

from __future__ import annotations

import importlib_metadata as metadata
from packaging.markers import UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement
from packaging.requirements import Requirement as Req
from quantplug.plugin import BackendStatus, Requirement, Status, installed_version, probe, probe_backend

TORCH_ONLY_DIST = "neural-compressor-pt"


def _torch_requirements(dist: str, extra: str | None) -> list[Req]:
    """What ``dist`` needs for its PyTorch API: its ``extra`` requirements, or all when ``extra`` is None."""
    wanted = []
    for line in metadata.requires(dist) or []:
        try:
            req = Req(line)
        except InvalidRequirement:
            continue
        if req.marker is None:
            if extra is None:
                wanted.append(req)
            continue
        try:
            if req.marker.evaluate({"extra": extra or ""}):
                wanted.append(req)
        except UndefinedEnvironmentName:
            continue
    return wanted


def _missing(requirements: list[Req]) -> list[str]:
    return [req.name for req in requirements if installed_version(req.name) is None]


def check(info) -> BackendStatus | None:
    """A refined status for INC, or ``None`` to keep the core's."""
    try:
        requirement = info.requires[0]
        if installed_version(requirement.dist) is None and installed_version(TORCH_ONLY_DIST) is not None:
            torch_only = Requirement(
                TORCH_ONLY_DIST, requirement.specifier, module=requirement.module, pip=requirement.pip
            )
            row = probe(torch_only)
            status = BackendStatus(
                name=info.name,
                status=row.status,
                library=row.library,
                found=row.found,
                required=row.required,
                reason=row.reason,
                fix=row.fix,
                info=info,
            )
            dist, extra = TORCH_ONLY_DIST, None
        else:
            status = probe_backend(info)
            dist, extra = requirement.dist, "pt"
        if status.status is not Status.OK:
            return status
        missing = _missing(_torch_requirements(dist, extra))
        if missing:
            status.status = Status.BROKEN
            status.reason = (
                f"{dist} {status.found} is installed without the dependencies of its PyTorch API "
                f"(missing: {', '.join(missing)}), so `import neural_compressor.torch` fails"
            )
            status.fix = requirement.install_line()
        return status
    except Exception as exc:  # a probe reports, never raises
        return BackendStatus(
            name=info.name,
            status=Status.BROKEN,
            reason=f"could not read neural-compressor's metadata: {type(exc).__name__}: {exc}",
            fix=info.requires[0].install_line() if info.requires else None,
            info=info,
        )
