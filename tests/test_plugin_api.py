"""The plugin author's API is one declared surface, and the tree keeps to it.

A backend plugin's sources (its tests aside) import from quantplug's core only
``quantplug``, ``quantplug.plugin`` and ``quantplug.testing``, and never
another plugin's package; every other core module is private (its name starts
with an underscore), apps included, which the library never imports. These
tests read the sources with ``ast``, so they fail on the import itself,
whether or not the line runs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core" / "quantplug"
PLUGIN_SURFACE = {"quantplug", "quantplug.plugin", "quantplug.testing"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every ``import x`` / ``from x import y`` in a file (relative imports resolved to '.')."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                continue  # relative: inside the same package
            found.append((node.lineno, node.module or ""))
            # `from quantplug import _registry` imports a module, not a name
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                         if node.module == "quantplug" and alias.name.startswith("_"))  # fmt: skip
    return found


def plugin_packages() -> dict[str, Path]:
    """Each in-tree plugin's import package (``quantplug_hqq`` -> its folder), tests and the template included."""
    packages = {}
    for pyproject in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        for package in pyproject.parent.glob("quantplug_*/__init__.py"):
            packages[package.parent.name] = package.parent
    return packages


def plugin_sources() -> list[Path]:
    return sorted(path for folder in plugin_packages().values() for path in folder.rglob("*.py"))


def test_every_plugin_has_sources_to_check():
    assert len(plugin_packages()) >= 9, plugin_packages()


@pytest.mark.parametrize("path", plugin_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_sources_import_only_the_plugin_api(path):
    own = path.relative_to(ROOT / "plugins").parts[1]  # its package: quantplug_<name>
    bad = []
    for line, module in imported_modules(path):
        top = module.split(".")[0]
        if (
            top == "quantplug"
            and module not in PLUGIN_SURFACE
            and not module.startswith("quantplug.testing.")
        ):
            bad.append(f"line {line}: {module} (private to quantplug's core; use quantplug.plugin)")
        elif top.startswith("quantplug_") and top != own:
            bad.append(f"line {line}: {module} (another plugin's package: plugins share nothing)")
    assert not bad, f"{path.relative_to(ROOT)} imports outside the plugin API:\n  " + "\n  ".join(bad)


def test_core_modules_are_public_or_underscored():
    public = {"__init__", "plugin", "hookspecs", "distributed"}
    for path in CORE.glob("*.py"):
        assert path.stem in public or path.stem.startswith("_"), (
            f"core/quantplug/{path.name} is neither declared public nor private: name it _{path.stem}.py "
            "or add it to the public surface (docs/plugins.md)"
        )


def test_the_library_never_imports_its_apps():
    for path in CORE.rglob("*.py"):
        if "apps" in path.relative_to(CORE).parts:
            continue
        for line, module in imported_modules(path):
            assert not module.startswith("quantplug.apps"), (
                f"{path.relative_to(ROOT)}:{line} imports {module}"
            )


def test_apps_use_only_the_public_library():
    for path in (CORE / "apps").rglob("*.py"):
        for line, module in imported_modules(path):
            private = [part for part in module.split(".")[1:] if part.startswith("_")]
            assert not (module.startswith("quantplug") and private), (
                f"{path.relative_to(ROOT)}:{line} imports {module}: apps use the library like any user"
            )


def test_plugin_api_names_resolve_and_are_documented():
    plugin = importlib.import_module("quantplug.plugin")
    guide = (ROOT / "docs" / "plugins.md").read_text()
    triton = importlib.util.find_spec("triton") is not None
    for name in plugin.__all__:
        if name != "fused_lora" or triton:  # fused_lora is the Triton helpers' module: it imports Triton
            assert getattr(plugin, name) is not None
        assert f"`{name}`" in guide, f"quantplug.plugin.{name} is not documented in docs/plugins.md"


def test_library_modules_stay_small():
    sizes = {path.relative_to(CORE): len(path.read_text().splitlines()) for path in CORE.rglob("*.py")}
    large = {str(path): n for path, n in sizes.items() if n > 550 and path.parts[0] != "testing"}
    assert not large, f"modules over ~500 lines (split by job): {large}"
