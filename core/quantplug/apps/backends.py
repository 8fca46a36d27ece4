"""The apps' view of backends: the installed ones (from their ``BackendInfo``), a name a user typed, the
default one, and the first-party plugins of this clone that are not installed, with their install lines.

No backend is named here. First-party plugins are read from the clone's
``plugins/*/pyproject.toml`` (entry points in group ``quantplug.backends``),
so a plugin added to the repository is listed without a change here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import quantplug as qp

ENTRY_POINT_GROUP = "quantplug.backends"
TEMPLATE = "template"  # plugins/template: the skeleton third parties copy, not a backend


class BackendChoiceError(ValueError):
    """A backend name that cannot be used here; the message is one line with the fix or the known names."""


def is_core(status: qp.BackendStatus) -> bool:
    """The core's own dense backend (a plain ``nn.Linear``), shipped in the ``quantplug`` dist itself."""
    return status.plugin_dist == "quantplug"


def variant_of(status: qp.BackendStatus) -> str | None:
    """A backend's default format: its first declared variant."""
    return status.info.variants[0] if status.info and status.info.variants else None


def find(name: str, statuses: list[qp.BackendStatus] | None = None) -> qp.BackendStatus | None:
    """The installed backend called ``name``, matched case-insensitively, or None."""
    rows = qp.backends() if statuses is None else statuses
    return next((row for row in rows if row.name.lower() == name.strip().lower()), None)


def usable(status: qp.BackendStatus, device: str) -> str | None:
    """Why ``status``'s backend cannot run on ``device`` here, or None when it can."""
    if not status.ok:
        return f"{status.status}: {status.reason or ''}".strip()
    if status.info and device not in status.info.devices:
        return f"runs on {', '.join(status.info.devices)}, not {device}"
    return None


def default_backend(device: str = "cpu") -> qp.BackendStatus | None:
    """The first backend, in ``quantplug doctor``'s order, that is ok here and runs on ``device``; the core's
    dense backend only when no quantizing backend is."""
    ready = [row for row in qp.backends() if usable(row, device) is None]
    return next((row for row in ready if not is_core(row)), ready[0] if ready else None)


def resolve(name: str, device: str = "cpu") -> qp.BackendStatus:
    """The usable backend called ``name`` (any case), or :class:`BackendChoiceError` saying why not in one
    line: the install line of a first-party plugin not installed, the known names, or the fix."""
    rows = qp.backends()
    status = find(name, rows)
    if status is None:
        plugin = next((p for p in first_party_plugins() if name.strip().lower() in p.backends_lower), None)
        if plugin is not None and plugin.installed():
            raise BackendChoiceError(
                f"backend {name!r} is not loaded: its plugin {plugin.dist} is installed, so "
                "QUANTPLUG_LOAD_PLUGINS or QUANTPLUG_BLOCK_PLUGINS leaves it out"
            )
        if plugin is not None:
            raise BackendChoiceError(
                f"backend {name!r} is not installed; install its plugin: {plugin.install_line()}"
            )
        known = ", ".join(row.name for row in rows)
        absent = [backend for backend, _ in missing_first_party(rows)]
        more = f"; not loaded: {', '.join(absent)} (see quantplug doctor)" if absent else ""
        raise BackendChoiceError(f"no backend named {name!r}; installed: {known}{more}")
    why = usable(status, device)
    if why:
        fix = f"; fix: {status.fix}" if status.fix and not status.ok else ""
        raise BackendChoiceError(f"backend {status.name!r} cannot run here: {why}{fix}")
    return status


# --------------------------------------------------------------------------
# first-party plugins of this clone
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstParty:
    """A plugin folder of the repository: its dist and the backends its entry points declare."""

    folder: Path
    dist: str
    backends: tuple[str, ...]

    @property
    def backends_lower(self) -> tuple[str, ...]:
        return tuple(name.lower() for name in self.backends)

    def installed(self) -> bool:
        """Whether its dist is installed (it may still be left out by QUANTPLUG_LOAD/BLOCK_PLUGINS)."""
        return dist_installed(self.dist)

    def install_line(self) -> str:
        root = self.folder.parent.parent
        constraints, folder = root / "constraints.txt", self.folder
        if Path.cwd().resolve() == root.resolve():
            constraints, folder = Path("constraints.txt"), folder.relative_to(root)
        return f"pip install -c {constraints} -e {folder}"


def dist_installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def clone_root() -> Path | None:
    """The repository quantplug runs from (an editable install or a source checkout), else None."""
    root = Path(qp.__file__).resolve().parents[2]  # <root>/core/quantplug/__init__.py
    return root if (root / "plugins").is_dir() and (root / "pyproject.toml").is_file() else None


def first_party_plugins() -> list[FirstParty]:
    """Every plugin folder of the clone but the template, sorted; empty outside a clone."""
    root = clone_root()
    if root is None:
        return []
    out = []
    for pyproject in sorted((root / "plugins").glob("*/pyproject.toml")):
        if pyproject.parent.name == TEMPLATE:
            continue
        parsed = _read_pyproject(pyproject.read_text(encoding="utf-8"))
        if parsed is not None and parsed[1]:
            out.append(FirstParty(pyproject.parent, parsed[0], parsed[1]))
    return out


def missing_first_party(statuses: list[qp.BackendStatus] | None = None) -> list[tuple[str, FirstParty]]:
    """(backend, plugin) for each backend a plugin of the clone declares that is not loaded: not
    installed, or left out by QUANTPLUG_LOAD_PLUGINS / QUANTPLUG_BLOCK_PLUGINS (:meth:`FirstParty.installed`
    tells which)."""
    rows = qp.backends() if statuses is None else statuses
    return [(b, p) for p in first_party_plugins() for b in p.backends if find(b, rows) is None]


def _read_pyproject(text: str) -> tuple[str, tuple[str, ...]] | None:
    """(dist name, backend entry-point names) of a plugin's pyproject.toml, or None if unreadable."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the two fields, by their plain TOML lines
        return _read_pyproject_lines(text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None
    project = data.get("project", {})
    entry_points = project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
    return project.get("name", ""), tuple(entry_points)


def _read_pyproject_lines(text: str) -> tuple[str, tuple[str, ...]] | None:
    section, name, backends = None, "", []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            section = line.strip("[]").replace(" ", "")
            continue
        key = re.match(r'^"?([\w.-]+)"?\s*=\s*"([^"]*)"', line)
        if not key:
            continue
        if section == "project" and key.group(1) == "name":
            name = key.group(2)
        elif section == f'project.entry-points."{ENTRY_POINT_GROUP}"':
            backends.append(key.group(1))
    return name, tuple(backends)


def relative(path: Path) -> str:
    """``path`` relative to the working directory when under it (shorter messages)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return os.fspath(path)
