"""``quantplug._grid``: the host-side ``cdiv`` and ``next_power_of_2`` agree with Triton's, which cost 6 µs a call."""

import pytest
from quantplug._grid import cdiv, next_power_of_2

triton = pytest.importorskip("triton", reason="requirements-dev.txt installs Triton (the CI run has it)")


def test_they_agree_with_triton_on_every_small_value_and_the_layer_sizes():
    values = [*range(1, 300), 1000, 1023, 1024, 1025, 2048, 4096, 11008, 14336, 65535, 65536, 65537]
    for n in values:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 32, 64, 128, 1024):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert cdiv(0, 16) == 0
    assert all(isinstance(v, int) for v in (cdiv(5, 2), next_power_of_2(5)))
