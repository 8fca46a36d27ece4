"""quantplug's conformance suite on this backend: one test per contract of the hook specs, on CPU.

Run with ``pytest tests`` after ``pip install -e .`` (the entry point needs an install).
A failure names the broken contract ("contract quantplug_dequantize: ...") and the fix.
"""

from quantplug.testing import BackendConformance
from quantplug_quanto import NAME


class TestConformance(BackendConformance):
    backend = NAME
    forward_tol = 1e-4  # weight-only: QLinear's forward is F.linear on the dequantized weight
    # 256 inputs: quanto groups qint4/qint2 weights by 128 only when in_features > 128
    # (at 128 it falls back to one scale per row), so this exercises the grouped format.
    in_features = 256


# quanto's own traps, which the suite cannot know, are in test_quanto.py.
