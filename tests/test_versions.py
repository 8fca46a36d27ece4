"""Probes report a status with the fix, and never raise."""

import sys

import pytest
from quantplug import BackendInfo, Requirement, Status
from quantplug._versions import probe, probe_backend


def test_ok():
    row = probe(Requirement("pluggy", ">=1.0"))
    assert row.status is Status.OK and row.found


def test_missing_gives_pip_line():
    row = probe(Requirement("quantplug-no-such-dist", ">=1.2"))
    assert row.status is Status.MISSING
    assert row.fix == "pip install 'quantplug-no-such-dist>=1.2'"


def test_too_old_and_too_new_name_both_versions():
    old = probe(Requirement("pluggy", ">=99"))
    assert old.status is Status.TOO_OLD and old.found and old.required == ">=99"
    assert "older" in old.reason and "pluggy>=99" in old.fix
    new = probe(Requirement("pluggy", "<0.1"))
    assert new.status is Status.TOO_NEW and "newer" in new.reason


def test_module_without_metadata_is_broken(tmp_path, monkeypatch):
    (tmp_path / "qp_ghost_lib").mkdir()
    (tmp_path / "qp_ghost_lib" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    row = probe(Requirement("qp-ghost-lib", ">=1", module="qp_ghost_lib"))
    assert row.status is Status.BROKEN
    assert "no metadata" in row.reason and "--force-reinstall" in row.fix


def test_import_failure_is_broken(tmp_path, monkeypatch):
    """The torchao case in PEFT: metadata present, import raises. Here: reported, not raised."""
    (tmp_path / "pluggy_shadow").mkdir()
    (tmp_path / "pluggy_shadow" / "__init__.py").write_text("raise ImportError('compiled extension missing')")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pluggy_shadow", raising=False)
    row = probe(Requirement("pluggy", ">=1", module="pluggy_shadow"), import_check=True)
    assert row.status is Status.BROKEN and "compiled extension missing" in row.reason


@pytest.mark.parametrize("spec", ["not a spec", ">=1.0,<<2"])
def test_garbage_specifier_is_broken_not_raised(spec):
    assert probe(Requirement("pluggy", spec)).status is Status.BROKEN


def test_backend_status_takes_the_first_failing_requirement():
    info = BackendInfo(name="x", requires=(Requirement("pluggy"), Requirement("quantplug-absent", ">=1")))
    status = probe_backend(info)
    assert status.status is Status.MISSING and status.library == "quantplug-absent"
    assert status.info is info
