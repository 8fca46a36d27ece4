"""The error a plugin's failure becomes: it names the plugin, the hook, the backend and the layer."""

from __future__ import annotations


class PluginError(RuntimeError):
    """A plugin's hook raised, or returned something the core refuses; the model is unchanged.

    The message and the attributes name who failed and where: ``plugin`` (its
    registered name), ``dist`` (the distribution to report or reinstall),
    ``hook``, ``backend`` and ``layer`` (the module path, when the call was
    about one layer). The plugin's own exception, if any, is ``__cause__``.
    """

    def __init__(
        self,
        problem: str,
        *,
        plugin: str | None = None,
        dist: str | None = None,
        hook: str | None = None,
        backend: str | None = None,
        layer: str | None = None,
    ) -> None:
        self.problem, self.plugin, self.dist, self.hook, self.backend, self.layer = (
            problem, plugin, dist, hook, backend, layer
        )  # fmt: skip
        super().__init__(self._message())

    def _message(self) -> str:
        where = [
            f"{label} {value!r}"
            for label, value in (
                ("plugin", self.plugin),
                ("distribution", self.dist),
                ("hook", self.hook),
                ("backend", self.backend),
                ("layer", self.layer),
            )
            if value
        ]
        return f"{self.problem} ({', '.join(where)})" if where else self.problem

    def with_layer(self, layer: str) -> PluginError:
        """The same error, naming the layer the call was about (call sites that know the path add it)."""
        if self.layer is None:
            self.layer = layer
            self.args = (self._message(),)
        return self


class PluginWarning(UserWarning):
    """A plugin misbehaved and was skipped for the call, or a plugin setting names nothing installed."""


# A plugin that raises ValueError / TypeError / NotImplementedError is saying "not this layer" the way
# the hook specs document (quantplug_quantize: unknown variant; quantplug_fold_into_zeros: no zero
# points): the PluginError it becomes is also one of those, so ``except ValueError`` keeps working.
class PluginValueError(PluginError, ValueError):
    """A :class:`PluginError` whose cause is a ``ValueError``."""


class PluginTypeError(PluginError, TypeError):
    """A :class:`PluginError` whose cause is a ``TypeError``."""


class PluginNotImplementedError(PluginError, NotImplementedError):
    """A :class:`PluginError` whose cause is a ``NotImplementedError``."""


_KINDS = (
    (ValueError, PluginValueError),
    (TypeError, PluginTypeError),
    (NotImplementedError, PluginNotImplementedError),
)


def plugin_error(cause: BaseException, problem: str, **where: str | None) -> PluginError:
    """The :class:`PluginError` for a plugin's exception ``cause``: also a ValueError, TypeError or
    NotImplementedError when ``cause`` is one, so callers that catch those keep catching it.
    Raise it ``from cause``."""
    cls = next((cls for kind, cls in _KINDS if isinstance(cause, kind)), PluginError)
    return cls(problem, **where)
