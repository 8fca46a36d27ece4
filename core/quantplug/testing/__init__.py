"""Conformance suite for backend plugins: subclass :class:`BackendConformance` in your tests.

::

    from quantplug.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend = "mybackend"          # the name your plugin declares
        forward_tol = 2e-2             # how far layer(x) may be from x @ W.T + b

Every contract of ``quantplug/hookspecs.py`` becomes a test, run on layers
your plugin builds through ``quantplug_quantize`` (override
:meth:`BackendConformance.make_layer` to build them another way), for every
variant you declare. A failure message names the broken contract and the fix.
"""

from quantplug.testing.conformance import BackendConformance, random_linear, relative_error

__all__ = ["BackendConformance", "random_linear", "relative_error"]
