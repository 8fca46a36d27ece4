"""The conformance suite run on the core's own plain-linear backend."""

from quantplug.testing import BackendConformance


class TestLinearConformance(BackendConformance):
    backend = "linear"
    forward_tol = 1e-5
