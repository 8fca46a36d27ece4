"""quantplug's conformance suite on the EETQ plugin, run on the STAND-IN layer (tests/standin.py).

EETQ cannot be installed on CI (CUDA-only, built with nvcc, no wheel for these
Pythons), so the suite's layers are stand-in ``EetqLinear``s built by the
stand-in's ``quant_weights``, and the backend is marked usable while each test
runs (``standin_backend`` in conftest.py). Two checks differ from the suite's:
only the stand-in's one format is tested, and ``test_check_backend`` expects
EETQ "missing" with an honest fix where EETQ is absent.
"""

import importlib.util

import pytest
import quantplug_eetq
import quantplug_eetq_standin as standin  # loaded by conftest.py
from quantplug._info import Status
from quantplug._registry import load_plugins
from quantplug.testing import BackendConformance


class TestEetqStandinConformance(BackendConformance):
    backend = quantplug_eetq.NAME
    variants = ("int8",)  # the stand-in mimics eetq.EetqLinear only
    forward_tol = 2e-3  # weight-only int8; the kernel rounds its output to fp16

    @pytest.fixture(autouse=True)
    def _standin(self, standin_backend):
        return standin_backend

    def make_layer(self, linear, variant):
        return standin.from_linear(linear)

    def test_check_backend(self):
        if importlib.util.find_spec("eetq") is not None:
            return super().test_check_backend()
        real = quantplug_eetq.REQUIREMENT
        status = load_plugins().status(self.backend)
        # the fixture marked it usable; the registry's real answer for this machine is "missing"
        from quantplug._versions import probe

        assert probe(real).status is Status.MISSING
        assert status.info.requires == (real,) and real.install_line().startswith("pip install")
