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
    assert "training path" in out and "quantplug::lean_lora_linear" in out  # which path trains
    # which kernel runs a wrapped layer on CUDA: without a CUDA device no fused kernel registers, so the
    # library's forward with the adapter kernel beside it (tests/gpu checks the names a GPU shows)
    assert out.splitlines()[0].endswith("layer on cuda")
    bnb_row = next(line for line in out.splitlines() if line.startswith("bnb "))
    assert bnb_row.split()[-1] == "library"


def test_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["bnb"]["status"] == "ok" and rows["bnb"]["library"] == "bitsandbytes"
    assert {"requantize", "dense"} <= set(rows["bnb"]["merge_modes"])
    assert rows["linear"]["kernels"]["lora_add@cpu"] == "reference"
    assert rows["bnb"]["kernels"]["fused_lora_linear@cuda"] == "reference"


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
    """A short demo run: the loss falls, both merges report, the adapter reloads; with --json, standard
    output is the JSON alone."""

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantplug.apps.cli",
            "demo",
            "--backend",
            "bnb",
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
    summary = json.loads(out.stdout)
    assert summary["backend"] == "bnb"
    assert summary["loss_after"] < summary["loss_before"] - 0.5
    assert summary["merge"]["dense"]["mean_error"] < 1e-5
    assert summary["merge"]["requantize"]["unmerge_exact"] and summary["merge"]["dense"]["unmerge_exact"]
    assert summary["reload_ok"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "summary.json").exists()


# --------------------------------------------------------------------------
# first-hour rough edges (issue 16)
# --------------------------------------------------------------------------


@pytest.fixture
def plugins_env(monkeypatch):
    """Set QUANTPLUG_LOAD/BLOCK_PLUGINS for one test, with the registry rediscovered before and after."""
    from quantplug import _registry as registry

    def set_env(**env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        registry.reset()

    yield set_env
    monkeypatch.delenv("QUANTPLUG_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("QUANTPLUG_BLOCK_PLUGINS", raising=False)
    registry.reset()


def test_demo_unknown_backend_is_one_line_naming_the_installed_ones(capsys):
    assert main(["demo", "--backend", "foo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no backend named 'foo'" in err and "bnb" in err and "linear" in err


def test_demo_backend_of_a_plugin_not_installed_gives_its_install_line(plugins_env, monkeypatch, capsys):
    from quantplug.apps import backends

    plugins_env(QUANTPLUG_BLOCK_PLUGINS="hqq")
    monkeypatch.setattr(backends, "dist_installed", lambda dist: dist != "quantplug-hqq")
    assert main(["demo", "--backend", "HQQ"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "backend 'HQQ' is not installed; install its plugin: pip install -c " in err
    assert "constraints.txt -e " in err and err.rstrip().endswith("plugins/hqq")


def test_demo_backend_of_a_blocked_plugin_says_so(plugins_env, capsys):
    plugins_env(QUANTPLUG_BLOCK_PLUGINS="hqq")
    assert main(["demo", "--backend", "hqq"]) == 2
    err = capsys.readouterr().err
    assert "is not loaded: its plugin quantplug-hqq is installed" in err and "QUANTPLUG_BLOCK_PLUGINS" in err


def test_backend_names_match_in_any_case():
    from quantplug.apps.backends import resolve

    assert resolve("HQQ").name == "hqq" and resolve(" Bnb ").name == "bnb"


def test_default_backend_is_the_first_ok_one_and_dense_only_when_alone(plugins_env):
    from quantplug.apps.backends import default_backend

    plugins_env(QUANTPLUG_LOAD_PLUGINS="hqq,bnb")
    assert default_backend().name == "bnb"  # doctor's order, not a fixed name
    plugins_env(QUANTPLUG_LOAD_PLUGINS="")
    assert default_backend().name == "linear"  # the core's dense backend: nothing else is loaded


def test_demo_runs_on_the_default_backend_without_backend(monkeypatch):
    from quantplug.apps import demo
    from quantplug.apps.backends import default_backend

    ran = []
    monkeypatch.setattr(demo, "run_demo", lambda args: ran.append(args.backend) or 0)
    assert main(["demo"]) == 0 and main(["demo", "--backend", "BNB"]) == 0
    assert ran == [default_backend().name, "bnb"]


def test_doctor_lists_first_party_plugins_not_installed_with_their_install_line(
    plugins_env, monkeypatch, capsys
):
    from quantplug.apps import backends

    plugins_env(QUANTPLUG_BLOCK_PLUGINS="hqq,torchao,awq")  # awq: installed, only blocked
    monkeypatch.setattr(
        backends, "dist_installed", lambda dist: dist not in ("quantplug-hqq", "quantplug-torchao")
    )
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[0].splitlines()[2:]
    rows = {line.split()[0]: line.split()[1:3] for line in table}
    assert rows["hqq"] == rows["torchao"] == ["not", "installed"] and rows["awq"] == ["not", "loaded"]
    lines = [line for line in out.splitlines() if "-e " in line]
    assert any(line.split()[0] == "hqq" and line.rstrip().endswith("plugins/hqq") for line in lines), out
    assert all("pip install -c " in line and "constraints.txt" in line for line in lines)
    last = out.rstrip().splitlines()[-1]
    assert any(line.split()[:1] == ["awq"] and "left out by" in line for line in out.splitlines()[-8:])
    assert "all" not in last and "3 first-party backends not loaded" in last


def test_doctor_says_all_ok_only_when_nothing_is_absent(plugins_env, monkeypatch, capsys):
    from quantplug.apps import backends

    plugins_env(QUANTPLUG_LOAD_PLUGINS="bnb")
    monkeypatch.setattr(backends, "first_party_plugins", lambda: [])
    assert main(["doctor"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("all 2 backends ok")  # bnb and the core's linear


def test_first_party_plugins_are_read_from_the_clone():
    from pathlib import Path

    from quantplug.apps.backends import first_party_plugins

    found = {p.folder.name: p for p in first_party_plugins()}
    folders = {p.parent.name for p in Path(__file__).parents[1].glob("plugins/*/pyproject.toml")}
    assert set(found) == folders - {"template"}
    assert found["bnb"].dist == "quantplug-bnb" and found["bnb"].backends == ("bnb",)


def _demo_subprocess(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "quantplug.apps.cli", "demo", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_demo_output_is_readable_in_a_log(tmp_path):
    """Not a terminal: a progress line every tenth of the run, no carriage returns, neural-compressor's
    warnings kept out of the output and summed up in one line, and where summary.json went."""
    done = _demo_subprocess(tmp_path, "--backend", "inc", "--steps", "20")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "\r" not in out and max(len(line) for line in out.splitlines()) < 400
    assert [line.split()[2] for line in out.splitlines() if "training step" in line] == [
        f"{step}/20" for step in range(2, 21, 2)
    ]
    assert "[WARNING]" not in out + done.stderr
    note = next(line for line in out.splitlines() if "third-party output" in line)
    assert "neural-compressor warnings" in note and "third-party.log" in note
    assert "[WARNING]" in (tmp_path / "third-party.log").read_text()
    assert "  summary: summary.json" in out.splitlines()


@pytest.mark.slow
def test_demo_verbose_shows_the_libraries_output(tmp_path):
    done = _demo_subprocess(tmp_path, "--backend", "inc", "--steps", "2", "-v")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[WARNING]" in done.stdout + done.stderr
    assert "third-party output" not in done.stdout and not (tmp_path / "third-party.log").exists()


def test_demo_refuses_zero_steps_before_building_anything(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "argument --steps: must be at least 1, got 0" in capsys.readouterr().err
