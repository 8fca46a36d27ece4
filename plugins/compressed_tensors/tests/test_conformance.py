"""quantplug's conformance suite on the compressed_tensors backend: one test per contract of the hook specs, on CPU.

Run with ``pytest tests`` after ``pip install -e .`` (the entry point needs an install).
A failure names the broken contract ("contract quantplug_dequantize: ...") and the fix.
"""

from quantplug.testing import BackendConformance
from quantplug_compressed_tensors import NAME, layers

WEIGHT_ONLY = (
    "int4-g32",
    "int4-asym-g32",
    "int4-channel",
    "int4-asym-channel",
    "int8-channel",
    "fp8-channel",
    "fp8-tensor",
)


class TestConformance(BackendConformance):
    """Weight-only schemes, built as quantplug_quantize builds them: compressed by the library, then
    decompressed by it (the state a loaded checkpoint reaches on its first forward)."""

    backend = NAME
    variants = WEIGHT_ONLY
    # the forward is F.linear on the dequantized weight: only the fp32 reference's rounding differs
    forward_tol = 1e-4


class TestConformanceActivations(BackendConformance):
    """FP8_DYNAMIC and W8A8: the forward also quantizes each token's activations (FP8: 3 mantissa bits)."""

    backend = NAME
    variants = ("fp8-dynamic", "w8a8")
    forward_tol = 4e-2


class TestConformanceFrozen(BackendConformance):
    """Layers before compression (float weight, fake-quantized in each forward), as llm-compressor
    leaves them after calibration and as a checkpoint saved uncompressed loads."""

    backend = NAME
    variants = ("int4-asym-g32", "int8-channel", "fp8-tensor")
    forward_tol = 1e-4

    def make_layer(self, linear, variant):
        return layers.quantize(linear, variant, state="frozen")
