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
