"""The plugin manager: lazy entry-point discovery, allow/block lists, statuses.

Plugins are found in the entry-point group ``quantplug.backends`` the first
time anything needs them, never at import. A plugin that fails to import is
recorded as broken (``quantplug doctor`` shows why) and every other backend
keeps working. Environment variables:

- ``QUANTPLUG_LOAD_PLUGINS=a,b`` loads only those entry points (empty: none);
- ``QUANTPLUG_BLOCK_PLUGINS=a`` skips those;
- ``QUANTPLUG_TRACE_PLUGINS=1`` prints every hook call to stderr.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

import importlib_metadata as metadata
import pluggy

from quantplug import hookspecs
from quantplug._info import BackendInfo, BackendStatus, Status
from quantplug._versions import probe_backend

ENTRY_POINT_GROUP = "quantplug.backends"
BUILTIN_PLUGINS = ("quantplug._builtin",)


class PluginConflictError(RuntimeError):
    """Two plugins claim the same backend name."""


@dataclass
class Plugin:
    """A loaded plugin and where it came from."""

    name: str
    module: object
    dist: str | None = None
    version: str | None = None


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


class HookRelay:
    """The plugin manager's hooks, with each call that names a ``backend`` sent to that backend's plugin.

    ``hook().quantplug_dequantize(module=layer, backend="hqq")`` asks only the
    plugin that declared ``"hqq"``, then the core's defaults (the built-in
    plugin, ``trylast``): a plugin never sees another backend's layers, so
    its hookimpls need no ``backend`` check, and no plugin can answer for
    a backend it did not declare. Hooks without a ``backend``
    argument (detect, prepare_for_training, ...) ask every plugin, as pluggy does.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getattr__(self, name: str) -> pluggy.HookCaller | _BackendCaller:
        caller = getattr(self._registry.pm.hook, name)
        if caller.spec is not None and "backend" in caller.spec.argnames:
            return _BackendCaller(self._registry, name, caller)
        return caller


class _BackendCaller:
    """One dispatch hook: call it with ``backend=`` and only that backend's plugin answers."""

    def __init__(self, registry: Registry, name: str, caller: pluggy.HookCaller) -> None:
        self._registry, self._name, self._caller = registry, name, caller

    def __call__(self, **kwargs: object) -> object:
        backend = kwargs.get("backend")
        if not isinstance(backend, str):
            raise TypeError(f"{self._name}() needs backend=<name>: the backend whose plugin should answer")
        return self._registry.backend_caller(self._name, backend)(**kwargs)

    def __getattr__(self, name: str) -> object:  # get_hookimpls(), spec, ...: pluggy's own
        return getattr(self._caller, name)


class Registry:
    """Everything loaded: the plugin manager, the backends, and what failed."""

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        self.pm = pm or get_plugin_manager()
        self.plugins: dict[str, Plugin] = {}
        self.backends: dict[str, BackendStatus] = {}
        self.failures: list[BackendStatus] = []
        self._backend_callers: dict[tuple[str, str], pluggy.HookCaller] = {}
        self.relay = HookRelay(self)
        from quantplug._kernels import KernelRegistry

        self.kernels = KernelRegistry()
        for name in BUILTIN_PLUGINS:
            module = self.pm.get_plugin(name)
            plugin = self.plugins[name] = Plugin(name, module, "quantplug", metadata.version("quantplug"))
            for impl in self.pm.hook.quantplug_backend_info.get_hookimpls():
                if impl.plugin is module:
                    self._add_backend(impl.function(), plugin)
        if os.environ.get("QUANTPLUG_TRACE_PLUGINS", "") not in ("", "0"):
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()

    # -- discovery ---------------------------------------------------------

    def load_entry_points(self) -> None:
        allow = _env_list("QUANTPLUG_LOAD_PLUGINS")
        block = _env_list("QUANTPLUG_BLOCK_PLUGINS") or set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
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
                self.failures.append(
                    BackendStatus(
                        name=ep.name,
                        status=Status.BROKEN,
                        plugin_dist=dist,
                        plugin_version=version,
                        reason=f"plugin {ep.value!r} failed to import: {type(exc).__name__}: {exc}",
                        fix=f"pip install --force-reinstall {dist or ep.name}",
                    )
                )
                continue
            self.add(module, name=ep.name, dist=dist, version=version)

    def add(
        self, module: object, name: str | None = None, dist: str | None = None, version: str | None = None
    ) -> str:
        """Register one plugin object and describe its backend (if it declares one)."""
        name = name or getattr(module, "__name__", None) or repr(module)
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
        plugin = self.plugins[name] = Plugin(name, module, dist, version)
        added: list[str] = []
        try:
            self.pm.check_pending()
            for impl in self.pm.hook.quantplug_backend_info.get_hookimpls():
                if impl.plugin is module:
                    added.append(self._add_backend(impl.function(), plugin))
        except Exception:
            self.pm.unregister(module)
            del self.plugins[name]
            for backend in added:
                del self.backends[backend]
            raise
        return name

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
        from quantplug._kernels import KernelRegister

        self.pm.hook.quantplug_register_kernels(register=KernelRegister(self.kernels))

    def plugins_changed(self) -> None:
        """Forget what was derived from the set of plugins and derive it again: the kernels, and the
        per-backend callers (each excludes only the plugins it knew of when it was built)."""
        self._backend_callers.clear()
        self.kernels.clear()
        self.load_kernels()

    # -- queries -----------------------------------------------------------

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


def unregister(name: str) -> None:
    """Remove a plugin added with :func:`register` (tests use this in ``finally``)."""
    registry = load_plugins()
    with _lock:
        plugin = registry.plugins.pop(name, None)
        if plugin is None:
            return
        registry.pm.unregister(plugin.module)
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
