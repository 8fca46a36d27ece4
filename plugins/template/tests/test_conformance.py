"""quantplug's conformance suite on this backend: one test per contract of the hook specs, on CPU.

Run with ``pytest tests`` after ``pip install -e .`` (the entry point needs an install).
A failure names the broken contract ("contract quantplug_dequantize: ...") and the fix.
"""

from quantplug.testing import BackendConformance
from quantplug_template import NAME


class TestConformance(BackendConformance):
    backend = NAME
    # >>> TODO(tolerances): how far module(x) may be from x @ dequantize(module).T + bias,
    #     relative (1e-2 suits a weight-only format computing in fp32; raise it if your forward
    #     quantizes activations or accumulates in low precision). Optional: the layer size
    #     (in_features, out_features; group sizes must divide in_features), the variants to test,
    #     and make_layer(self, linear, variant) to build layers other than through quantplug_quantize.
    forward_tol = 1e-2
    # <<< TODO(tolerances)


# Add tests/test_<name>.py for what the suite cannot know: your library's own traps (in-place
# repacking on the first forward, caches, formats quantplug_quantize does not build).
