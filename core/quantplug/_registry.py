"""The plugin manager: lazy entry-point discovery, allow/block lists, statuses, and the hook relay.

Plugins are found in the entry-point group ``quantplug.backends`` the first
time anything needs them, never at import. A plugin that fails to import, or
whose ``quantplug_backend_info`` fails, is recorded as broken (``quantplug
doctor`` shows why) and every other backend keeps working. Environment
variables:

- ``QUANTPLUG_LOAD_PLUGINS=a,b`` loads only those entry points (empty: none);
- ``QUANTPLUG_BLOCK_PLUGINS=a`` skips those;
- ``QUANTPLUG_TRACE_PLUGINS=1`` prints every hook call to stderr.

A name in either list that no installed entry point has gives a
:class:`~quantplug._errors.PluginWarning` naming the ones there are. An entry
point's name is its backend's name (``hqq = "quantplug_hqq"`` declares
backend ``"hqq"``), so both lists work by backend name; a plugin whose entry
point and backend disagree is not loaded, and ``quantplug doctor`` says why.

Every hook call the core makes goes through the registry's
:class:`~quantplug._relay.HookRelay` (``relay``): a plugin's exception comes
out as a :class:`~quantplug.PluginError` naming the plugin, its
distribution, the hook and the backend, and a ``quantplug_detect_layer``
that raises is reported once and skipped (see :mod:`quantplug._relay`).
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from dataclasses import dataclass

import importlib_metadata as metadata
import pluggy

from quantplug import hookspecs
from quantplug._errors import PluginWarning
from quantplug._info import BackendInfo, BackendStatus, Status
from quantplug._kernels import KernelRegister, KernelRegistry
from quantplug._relay import BLOCK_ENV, BUILTIN_PLUGINS, HookRelay, failure, text, warn_once
from quantplug._versions import probe_backend

ENTRY_POINT_GROUP = "quantplug.backends"
LOAD_ENV = "QUANTPLUG_LOAD_PLUGINS"


class PluginConflictError(RuntimeError):
    """Two plugins claim the same backend name."""


class _NotLoaded(Exception):
    """An entry point's plugin cannot be loaded: recorded as a broken row, never raised to users."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason, self.fix = reason, fix


@dataclass
class Plugin:
    """A loaded plugin and where it came from (``entry_point``: its name there, if it came from one)."""

    name: str
    module: object
    dist: str | None = None
    version: str | None = None
    entry_point: str | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """A fresh manager with the hook specs and the built-in plugins, nothing else."""
    pm = pluggy.PluginManager("quantplug")
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        pm.register(__import__(name, fromlist=["_"]), name=name)
    return pm


def _env_list(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


class Registry:
    """Everything loaded: the plugin manager, the backends, the kernels, and what failed.

    It owns the one :class:`KernelRegistry` (``kernels``) and the one
    :class:`HookRelay` (``relay``) it hands to the layers it wraps.
    """

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        self.pm = pm or get_plugin_manager()
        self.plugins: dict[str, Plugin] = {}
        self.backends: dict[str, BackendStatus] = {}
        self.failures: list[BackendStatus] = []
        self._backend_callers: dict[tuple[str, str], pluggy.HookCaller] = {}
        self.warned: set[tuple[str, str]] = set()  # (plugin, hook): reported once
        self.relay = HookRelay(self)
        self.kernels = KernelRegistry()
        for name in BUILTIN_PLUGINS:
            module = self.pm.get_plugin(name)
            plugin = self.plugins[name] = Plugin(name, module, "quantplug", metadata.version("quantplug"))
            for impl in self.pm.hook.quantplug_backend_info.get_hookimpls():
                if impl.plugin is module:
                    self._add_backend(impl.function(), plugin)
        self.trace = None  # hook calls the relay makes, written where pluggy writes its own
        if os.environ.get("QUANTPLUG_TRACE_PLUGINS", "") not in ("", "0"):
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()
            self.trace = self.pm.trace.root.get("hook")

    # -- discovery ---------------------------------------------------------

    def load_entry_points(self) -> None:
        allow = _env_list(LOAD_ENV)
        block = _env_list(BLOCK_ENV) or set()
        points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        self._check_env_lists(allow, block, sorted({ep.name for ep in points}))
        for ep in points:
            if (allow is not None and ep.name not in allow) or ep.name in block:
                continue
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if ep.name in self.plugins:
                other = self.plugins[ep.name].dist
                raise PluginConflictError(
                    f"two plugins claim the backend name {ep.name!r}: distribution {other!r} and "
                    f"distribution {dist!r}; uninstall one, or set QUANTPLUG_BLOCK_PLUGINS={ep.name} "
                    "and register the one you want with quantplug.register()"
                )
            try:
                module = ep.load()
            except Exception as exc:
                self._broken(ep.name, dist, version, f"plugin {ep.value!r} failed to import: {text(exc)}",
                             f"pip install --force-reinstall {dist or ep.name}")  # fmt: skip
                continue
            try:
                self.add(module, name=ep.name, dist=dist, version=version, entry_point=ep.name)
            except _NotLoaded as exc:
                self._broken(ep.name, dist, version, exc.reason, exc.fix)

    def _broken(self, name: str, dist: str | None, version: str | None, reason: str, fix: str) -> None:
        self.failures.append(
            BackendStatus(
                name, Status.BROKEN, plugin_dist=dist, plugin_version=version, reason=reason, fix=fix
            )
        )

    def _check_env_lists(self, allow: set[str] | None, block: set[str], known: list[str]) -> None:
        """Warn about names in the allow/block lists that no installed entry point has (a typo
        there would otherwise load, or fail to block, a plugin without a word)."""
        listed = ", ".join(known) or "none"
        builtin = {row.name for row in self.backends.values()}  # the core's own: always loaded
        for env, names in ((LOAD_ENV, allow or set()), (BLOCK_ENV, block)):
            for name in sorted(names - set(known)):
                if name in builtin:
                    if env == BLOCK_ENV:
                        warnings.warn(
                            f"{env} names {name!r}, the core's own backend, which cannot be blocked",
                            PluginWarning,
                            stacklevel=4,
                        )
                    continue
                warnings.warn(
                    f"{env} names {name!r}, which no installed plugin provides; installed entry points in "
                    f"group {ENTRY_POINT_GROUP!r}: {listed}",
                    PluginWarning,
                    stacklevel=4,
                )

    def add(
        self,
        module: object,
        name: str | None = None,
        dist: str | None = None,
        version: str | None = None,
        entry_point: str | None = None,
    ) -> str:
        """Register one plugin object and describe its backend (if it declares one); all or nothing.

        A plugin from an entry point must declare the backend of the entry point's name (or none,
        for a plugin that only adds kernels): otherwise it is not loaded (``_NotLoaded``).
        """
        name = name or getattr(module, "__name__", None) or repr(module)
        if not isinstance(name, str):
            raise TypeError(f"a plugin's name must be a str, got {type(name).__name__} {name!r}")
        try:
            hash(module)
        except TypeError:
            raise TypeError(
                f"plugin {name!r}: a {type(module).__name__} cannot be a plugin (it is unhashable); "
                "register a module, a class, or an instance of a class that keeps object's __hash__"
            ) from None
        if self.pm.is_registered(module) or self.pm.has_plugin(name):
            raise PluginConflictError(f"a plugin named {name!r} is already registered")
        self.pm.register(module, name=name)
        plugin = self.plugins[name] = Plugin(name, module, dist, version, entry_point)
        added: list[str] = []
        try:
            self.pm.check_pending()
            self._refuse_wrappers(plugin)
            for impl in self.pm.hook.quantplug_backend_info.get_hookimpls():
                if impl.plugin is module:
                    added.append(self._add_backend(self._backend_info(impl, plugin), plugin))
        except Exception:
            self.pm.unregister(module)
            del self.plugins[name]
            for backend in added:
                del self.backends[backend]
            raise
        return name

    def _refuse_wrappers(self, plugin: Plugin) -> None:
        """Hook wrappers (``wrapper=True``, ``hookwrapper=True``) cannot be attributed or skipped one
        plugin at a time, which is how :meth:`call` runs hooks: refused when the plugin is added."""
        for caller in self.pm.get_hookcallers(plugin.module) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin.module and (impl.wrapper or impl.hookwrapper):
                    problem = (
                        f"plugin {plugin.name!r}: {caller.name} is a hook wrapper; quantplug calls each "
                        "plugin's hookimpls one at a time and supports no wrappers"
                    )
                    fix = "implement the hook as a plain @quantplug.hookimpl (tryfirst/trylast order it)"
                    if plugin.entry_point is not None:
                        raise _NotLoaded(problem, fix)
                    raise TypeError(f"{problem}: {fix}")

    def _backend_info(self, impl: pluggy.HookImpl, plugin: Plugin) -> BackendInfo:
        where = f"plugin {plugin.name!r} (distribution {plugin.dist or 'an in-process plugin'!r})"
        try:
            info = impl.function()
        except Exception as exc:
            if plugin.entry_point is not None:
                raise _NotLoaded(
                    f"{where}: quantplug_backend_info raised {text(exc)}",
                    f"report it to {plugin.dist or plugin.name}, or pip install --force-reinstall {plugin.dist}",
                ) from exc
            raise failure(self, exc, "quantplug_backend_info", plugin.name) from exc
        if not isinstance(info, BackendInfo):
            problem = f"quantplug_backend_info() must return quantplug.BackendInfo, got {type(info).__name__}"
            if plugin.entry_point is not None:
                raise _NotLoaded(f"{where}: {problem}", f"report it to {plugin.dist or plugin.name}")
            raise TypeError(f"plugin {plugin.name!r}: {problem}")
        if plugin.entry_point is not None and info.name != plugin.entry_point:
            raise _NotLoaded(
                f"{where}: its entry point is named {plugin.entry_point!r} and it declares backend "
                f"{info.name!r}; the two names must agree (QUANTPLUG_BLOCK_PLUGINS and "
                "QUANTPLUG_LOAD_PLUGINS take that one name)",
                f"in {plugin.dist or 'the plugin'}'s pyproject.toml, name the entry point after the backend: "
                f'[project.entry-points."{ENTRY_POINT_GROUP}"] {info.name} = "..."',
            )
        return info

    def _add_backend(self, info: BackendInfo, plugin: Plugin) -> str:
        if not isinstance(info, BackendInfo):
            raise TypeError(
                f"plugin {plugin.name!r}: quantplug_backend_info() must return quantplug.BackendInfo, "
                f"got {type(info).__name__}"
            )
        if info.name in self.backends:
            other = self.backends[info.name].plugin_dist or "an in-process plugin"
            raise PluginConflictError(
                f"two plugins claim the backend name {info.name!r}: distribution {other!r} and "
                f"distribution {plugin.dist or 'an in-process plugin'!r}; uninstall one, or block one "
                "with QUANTPLUG_BLOCK_PLUGINS"
            )
        status = probe_backend(info)
        try:
            refined = self.pm.hook.quantplug_check_backend(info=info)
        except Exception as exc:  # a check must never take the registry down
            refined = [
                BackendStatus(
                    info.name,
                    Status.BROKEN,
                    reason=f"quantplug_check_backend raised {type(exc).__name__}: {exc}",
                )
            ]
        for row in refined:
            if isinstance(row, BackendStatus) and row.name == info.name:
                status = row
                status.info = info
        status.plugin_dist = plugin.dist
        status.plugin_version = plugin.version
        status.plugin_name = plugin.name
        self.backends[info.name] = status
        return info.name

    def load_kernels(self) -> None:
        """Ask every plugin for its kernels; one whose registration fails is reported and its kernels
        left out (the references, and every other plugin's kernels, still serve)."""
        register = KernelRegister(self.kernels)
        for impl in reversed(self.pm.hook.quantplug_register_kernels.get_hookimpls()):
            if self.trace is not None:
                self.trace("quantplug_register_kernels", impl.plugin_name)
            before = list(self.kernels.kernels)
            try:
                impl.function(*[{"register": register}[arg] for arg in impl.argnames])
            except Exception as exc:
                if impl.plugin_name in BUILTIN_PLUGINS:
                    raise
                self.kernels.kernels[:] = before
                self.kernels.clear_cache()
                warn_once(
                    self, impl.plugin_name, "quantplug_register_kernels", exc, "its kernels are not used"
                )

    def plugins_changed(self) -> None:
        """Forget what was derived from the set of plugins and derive it again: the kernels, and the
        per-backend callers (each excludes only the plugins it knew of when it was built)."""
        self._backend_callers.clear()
        self.kernels.clear()
        self.load_kernels()

    # -- queries -----------------------------------------------------------

    def declared_by(self, plugin_name: str) -> list[str]:
        """The backends the plugin registered as ``plugin_name`` declared."""
        return sorted(name for name, row in self.backends.items() if row.plugin_name == plugin_name)

    def backend_caller(self, hook_name: str, backend: str) -> pluggy.HookCaller:
        """``hook_name`` as ``backend``'s layers see it: the plugin that declared it, then the core's defaults.

        Raises ``KeyError`` naming the installed backends for a name no plugin declares.
        """
        caller = self._backend_callers.get((hook_name, backend))
        if caller is None:
            with _lock:  # built from the plugin set as register()/unregister() leave it, never mid-change
                keep = {self.status(backend).plugin_name, *BUILTIN_PLUGINS}
                others = [plugin for name, plugin in self.pm.list_name_plugin() if name not in keep]
                caller = self.pm.subset_hook_caller(hook_name, others)
                self._backend_callers[hook_name, backend] = caller
        return caller

    def statuses(self) -> list[BackendStatus]:
        rows = [*self.backends.values(), *self.failures]
        for row in rows:
            row.kernels = self.kernels.describe(row.name)
        return sorted(rows, key=lambda row: row.name)

    def status(self, backend: str) -> BackendStatus:
        if backend not in self.backends:
            installed = ", ".join(sorted(self.backends)) or "none"
            raise KeyError(f"no backend named {backend!r}; installed: {installed}")
        return self.backends[backend]

    def find(self, plugin: object) -> str:
        """The registered name of ``plugin``: a name :func:`register` returned, or the object itself."""
        if isinstance(plugin, str) and plugin in self.plugins:
            return plugin
        for name, record in self.plugins.items():
            if record.module is plugin:
                return name
        names = ", ".join(sorted(set(self.plugins) - set(BUILTIN_PLUGINS))) or "none"
        raise ValueError(
            f"no plugin {plugin!r} is registered; pass the name quantplug.register() returned or the "
            f"plugin object itself (registered plugins: {names})"
        )


_registry: Registry | None = None
_lock = threading.RLock()


def load_plugins() -> Registry:
    """The process-wide registry, loading plugins on first use (idempotent)."""
    global _registry
    if _registry is not None:  # no lock on the hot path: forward code reads this
        return _registry
    with _lock:
        if _registry is None:
            registry = Registry()
            registry.load_entry_points()
            registry.load_kernels()
            _registry = registry
        return _registry


def reset() -> None:
    """Forget the loaded plugins; the next ``load_plugins()`` discovers them again."""
    global _registry
    with _lock:
        _registry = None


def register(plugin: object, name: str | None = None) -> str:
    """Add an in-process plugin (a module, or a hashable object, with hookimpls); returns its name.

    For tests and notebooks: call it while no other thread is inside a quantplug call.
    """
    registry = load_plugins()
    with _lock:
        name = registry.add(plugin, name=name)
        registry.plugins_changed()
        return name


def unregister(plugin: object) -> None:
    """Remove a plugin: pass the name :func:`register` returned, or the plugin object itself.

    :raises ValueError: for a plugin that is not registered (naming the ones that are), and for the
        core's own plugin, which cannot be removed.
    """
    registry = load_plugins()
    with _lock:
        name = registry.find(plugin)
        if name in BUILTIN_PLUGINS:
            raise ValueError(f"{name!r} is the core's own plugin (the reference kernels, plain linears); "
                             "it cannot be unregistered")  # fmt: skip
        record = registry.plugins.pop(name)
        registry.pm.unregister(record.module)
        for backend, status in list(registry.backends.items()):
            if status.plugin_name == name:
                del registry.backends[backend]
        registry.plugins_changed()


def hook() -> HookRelay:
    """The loaded plugins' hooks (``hook().quantplug_dequantize(module=..., backend=...)``; see :class:`HookRelay`)."""
    return load_plugins().relay


def backends() -> list[BackendStatus]:
    """One status record per backend, as ``quantplug doctor`` shows them."""
    return load_plugins().statuses()
