"""Load the EETQ stand-in (tests/standin.py) under a fixed module name, and let tests use it.

EETQ cannot be installed on CI (CUDA-only, built with nvcc, no wheel for these
Pythons), so the plugin reports it "missing" and the core refuses to attach to
its layers. Tests of the plugin's logic on the stand-in use ``standin_backend``,
which marks the backend usable for the duration of one test; the real status
is checked, unpatched, by test_doctor_reports_eetq_missing.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
from quantplug._info import Status
from quantplug._registry import load_plugins

_spec = importlib.util.spec_from_file_location(
    "quantplug_eetq_standin", Path(__file__).with_name("standin.py")
)
standin = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = standin  # the plugin finds a layer's ops through sys.modules[cls.__module__]
_spec.loader.exec_module(standin)


@pytest.fixture
def standin_backend(monkeypatch):
    """The "eetq" backend, usable with stand-in layers although EETQ itself is missing here."""
    status = load_plugins().status("eetq")
    monkeypatch.setattr(status, "status", Status.OK)
    return standin
