"""Availability and version probes that never raise.

A probe reads installed metadata first and imports nothing: PEFT's raising
``is_torchao_available()`` broke plain LoRA for everyone with an old
torchao (peft#2285), so here every outcome is a :class:`Status` with the
fix, never an exception.
"""

from __future__ import annotations

import importlib
import importlib.util

import importlib_metadata as metadata
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from quantplug._info import BackendInfo, BackendStatus, Requirement, Status


def installed_version(dist: str) -> str | None:
    """The installed version of ``dist``, or ``None`` when its metadata is absent."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    except Exception:  # corrupt metadata is "absent" here; probe() says broken
        return None


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:  # a parent package that fails to import, say
        return False


def probe(requirement: Requirement, import_check: bool = False) -> BackendStatus:
    """The status of one requirement: ok, missing, too old, too new or broken.

    :param requirement: the distribution and the version range wanted.
    :param import_check: also import the module, reporting an import
        failure as broken (off by default: imports can be slow or noisy).
    """
    spec_text = requirement.specifier
    module = requirement.module or requirement.dist.replace("-", "_")
    found = installed_version(requirement.dist)
    row = BackendStatus(
        name=requirement.dist,
        status=Status.OK,
        library=requirement.dist,
        found=found,
        required=spec_text or "any",
    )
    if found is None:
        if _module_present(module):
            row.status = Status.BROKEN
            row.reason = (
                f"module {module!r} is importable but distribution {requirement.dist!r} has no metadata"
            )
            row.fix = f"pip install --force-reinstall '{requirement.dist}{spec_text}'"
        else:
            row.status = Status.MISSING
            row.reason = f"{requirement.dist} is not installed"
            row.fix = requirement.install_line()
        return row
    try:
        version = Version(found)
        specifier = SpecifierSet(spec_text)
    except (InvalidVersion, InvalidSpecifier) as exc:
        row.status = Status.BROKEN
        row.reason = f"cannot compare version {found!r} with {spec_text!r}: {exc}"
        row.fix = requirement.install_line()
        return row
    if not specifier.contains(version, prereleases=True):
        below = any(_below(version, s) for s in specifier)
        row.status = Status.TOO_OLD if below else Status.TOO_NEW
        row.reason = (
            f"{requirement.dist} {found} is {'older' if below else 'newer'} than supported ({spec_text})"
        )
        row.fix = requirement.install_line()
        return row
    if import_check:
        try:
            importlib.import_module(module)
        except Exception as exc:
            row.status = Status.BROKEN
            row.reason = f"import {module} failed: {type(exc).__name__}: {exc}"
            row.fix = f"pip install --force-reinstall '{requirement.dist}{spec_text}'"
    return row


def _below(version: Version, spec) -> bool:
    """Whether ``version`` fails ``spec`` by being too low."""
    if spec.operator in (">=", ">", "~=", "==", "==="):
        try:
            return version < Version(spec.version.rstrip(".*"))
        except InvalidVersion:
            return False
    return False


def probe_backend(info: BackendInfo) -> BackendStatus:
    """One status for a backend: the first requirement that is not ok, else ok."""
    rows = [probe(req) for req in info.requires]
    primary = rows[0] if rows else None
    failing = next((row for row in rows if not row.ok), None)
    chosen = failing or primary
    status = BackendStatus(name=info.name, status=Status.OK, info=info)
    if chosen is not None:
        status.status = chosen.status
        status.library = chosen.library
        status.found = chosen.found
        status.required = chosen.required
        status.reason = chosen.reason
        status.fix = chosen.fix
    return status
