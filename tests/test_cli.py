"""The command line: doctor's table and JSON, the demo end to end, --help that teaches."""

import json
import subprocess
import sys

import pytest
from quantplug.apps.cli import main


def test_doctor_table(capsys):
    assert main(["doctor", "-v"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["backend", "status", "plugin"]
    assert "linear" in out and "bnb" in out


def test_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["bnb"]["status"] == "ok" and rows["bnb"]["library"] == "bitsandbytes"
    assert {"requantize", "dense"} <= set(rows["bnb"]["merge_modes"])
    assert rows["linear"]["kernels"]["lora_add@cpu"] == "reference"


def test_doctor_reports_a_missing_library_with_the_fix(monkeypatch, capsys):
    """Blocking every plugin but one, then making its library look absent: a row, not a crash."""
    from quantplug import _registry as registry
    from quantplug import _versions as versions

    real = versions.installed_version
    monkeypatch.setattr(
        versions, "installed_version", lambda dist: None if dist == "bitsandbytes" else real(dist)
    )
    monkeypatch.setattr(versions, "_module_present", lambda name: name != "bitsandbytes")
    registry.reset()
    try:
        assert main(["doctor"]) == 0
        out = capsys.readouterr().out
        assert "bnb: missing" in out and "pip install 'bitsandbytes" in out
    finally:
        registry.reset()


@pytest.mark.parametrize("command", ["doctor", "demo", "bench"])
def test_help_explains_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert len(capsys.readouterr().out) > 300


def test_demo_end_to_end(tmp_path):
    """A short demo run: the loss falls, both merges report, the adapter reloads."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantplug.apps.cli",
            "demo",
            "--steps",
            "25",
            "--out",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout[out.stdout.index("{") :])
    assert summary["loss_after"] < summary["loss_before"] - 0.5
    assert summary["merge"]["dense"]["mean_error"] < 1e-5
    assert summary["merge"]["requantize"]["unmerge_exact"] and summary["merge"]["dense"]["unmerge_exact"]
    assert summary["reload_ok"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "summary.json").exists()
