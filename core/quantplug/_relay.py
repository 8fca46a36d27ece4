"""How the core calls hooks: one hookimpl at a time, in pluggy's order, each failure attributed.

pluggy runs a hook's implementations in one loop and lets the first exception
out with no word of whose it was. The core needs to know: a plugin's
exception becomes a :class:`~quantplug.PluginError` naming the plugin, its
distribution, the hook and the backend (chained to the original), and a
plugin whose ``quantplug_detect_layer`` raises is reported once
(:class:`~quantplug._errors.PluginWarning`) and skipped, so every other
backend keeps working. So :func:`call` runs the implementations itself, in
the order pluggy would (``get_hookimpls()`` lists them in reverse call
order: ``tryfirst`` last, ``trylast`` first). Hook wrappers are refused
when a plugin is added (:mod:`quantplug._registry`). The core's own plugin
(:mod:`quantplug._builtin`) raises the core's errors as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from quantplug._errors import PluginError, PluginWarning, plugin_error

if TYPE_CHECKING:
    import pluggy

    from quantplug._registry import Registry

BUILTIN_PLUGINS = ("quantplug._builtin",)
DETECT = "quantplug_detect_layer"
BLOCK_ENV = "QUANTPLUG_BLOCK_PLUGINS"


class HookRelay:
    """The plugin manager's hooks as the core calls them: one plugin at a time, failures attributed.

    ``relay.quantplug_dequantize(module=layer, backend="hqq")`` asks only the
    plugin that declared ``"hqq"``, then the core's defaults (the built-in
    plugin, ``trylast``): a plugin never sees another backend's layers, so
    its hookimpls need no ``backend`` check, and no plugin can answer for
    a backend it did not declare. Hooks without a ``backend`` argument
    (detect, prepare_for_training, ...) ask every plugin, as pluggy does.
    Either way a plugin's exception is re-raised as a ``PluginError`` (see :func:`call`).
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getattr__(self, name: str) -> _Caller:
        if name.startswith("_"):
            raise AttributeError(name)
        caller = getattr(self._registry.pm.hook, name)
        if caller.spec is not None and "backend" in caller.spec.argnames:
            return _BackendCaller(self._registry, name, caller)
        return _Caller(self._registry, name, caller)


class _Caller:
    """One hook, called through :func:`call`; pluggy's own attributes pass through."""

    def __init__(self, registry: Registry, name: str, caller: pluggy.HookCaller) -> None:
        self._registry, self._name, self._caller = registry, name, caller

    def __call__(self, **kwargs: object) -> object:
        return call(self._registry, self._name, self._caller.get_hookimpls(), kwargs)

    def __getattr__(self, name: str) -> object:  # get_hookimpls(), spec, ...: pluggy's own
        return getattr(self._caller, name)


class _BackendCaller(_Caller):
    """One dispatch hook: call it with ``backend=`` and only that backend's plugin answers."""

    def __call__(self, **kwargs: object) -> object:
        backend = kwargs.get("backend")
        if not isinstance(backend, str):
            raise TypeError(f"{self._name}() needs backend=<name>: the backend whose plugin should answer")
        impls = self._registry.backend_caller(self._name, backend).get_hookimpls()
        return call(self._registry, self._name, impls, kwargs, backend=backend)


def call(
    registry: Registry,
    hook_name: str,
    impls: Sequence[pluggy.HookImpl],
    kwargs: dict,
    backend: str | None = None,
) -> object:
    """Call ``impls`` (as ``get_hookimpls()`` lists them) as pluggy would, one at a time.

    A ``firstresult`` hook returns the first non-None answer, any other hook the list of them. A
    plugin that raises becomes a :class:`PluginError` (also a ``ValueError``/``TypeError``/
    ``NotImplementedError`` when the plugin raised one, the way hook specs let a plugin say "not
    this layer") naming it, chained to its exception; for ``quantplug_detect_layer`` it is reported
    instead (once per plugin) and skipped for this call. A detect answer must name a backend the
    answering plugin declared.
    """
    spec = getattr(registry.pm.hook, hook_name).spec
    firstresult = bool(spec and spec.opts.get("firstresult"))
    if registry.trace is not None:
        registry.trace(hook_name, kwargs)
    results = []
    for impl in reversed(impls):
        try:
            args = [kwargs[arg] for arg in impl.argnames]
        except KeyError as missing:
            raise TypeError(
                f"{hook_name}() called without argument {missing}, which the hook needs"
            ) from None
        try:
            result = impl.function(*args)
        except PluginError:
            raise  # a plugin calling back into quantplug: the error already names who failed
        except Exception as exc:
            if impl.plugin_name in BUILTIN_PLUGINS:
                raise
            if hook_name == DETECT:
                warn_once(registry, impl.plugin_name, hook_name, exc, "it claims no layer in this call")
                continue
            raise failure(registry, exc, hook_name, impl.plugin_name, backend) from exc
        if result is None:
            continue
        if hook_name == DETECT:
            _check_detected(registry, result, impl.plugin_name)
        if firstresult:
            return result
        results.append(result)
    return None if firstresult else results


def failure(
    registry: Registry, exc: Exception, hook_name: str, plugin_name: str, backend: str | None = None
) -> PluginError:
    """The :class:`PluginError` for ``exc``, raised by ``plugin_name``'s ``hook_name``: raise it ``from exc``."""
    plugin = registry.plugins.get(plugin_name)
    return plugin_error(
        exc,
        f"{hook_name} raised {text(exc)}",
        plugin=plugin_name,
        dist=plugin.dist if plugin else None,
        hook=hook_name,
        backend=backend or ", ".join(registry.declared_by(plugin_name)) or None,
    )


def warn_once(registry: Registry, plugin_name: str, hook_name: str, exc: Exception, consequence: str) -> None:
    """A :class:`PluginWarning` naming the plugin, its distribution and ``exc``, once per plugin and hook."""
    if (plugin_name, hook_name) in registry.warned:
        return
    registry.warned.add((plugin_name, hook_name))
    plugin = registry.plugins.get(plugin_name)
    dist = plugin.dist if plugin and plugin.dist else "an in-process plugin"
    warnings.warn(
        f"plugin {plugin_name!r} (distribution {dist!r}): {hook_name} raised {text(exc)}; "
        f"{consequence}, and every other backend keeps working. Report it to {dist}, or block it "
        f"with {BLOCK_ENV}={plugin_name}",
        PluginWarning,
        stacklevel=5,
    )


def _check_detected(registry: Registry, result: object, plugin_name: str) -> None:
    """A detect answer must be a backend the answering plugin declared."""
    own = registry.declared_by(plugin_name)
    if isinstance(result, str) and result in own:
        return
    plugin = registry.plugins.get(plugin_name)
    backends = registry.backends
    owner = backends[result].plugin_name if isinstance(result, str) and result in backends else None
    why = (
        f"which plugin {owner!r} declared, not this one"
        if owner
        else "which no quantplug_backend_info declared"
        if isinstance(result, str)
        else f"a {type(result).__name__}, not a backend name or None"
    )
    raise PluginError(
        f"{DETECT} returned {result!r}, {why}; the plugin declares {own or 'no backend'} "
        f"(declared backends: {', '.join(sorted(backends))})",
        plugin=plugin_name,
        dist=plugin.dist if plugin else None,
        hook=DETECT,
    )


def text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
