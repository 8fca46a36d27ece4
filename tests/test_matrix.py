"""The backend version matrix's tooling (tools/matrix.py, noxfile.py): CPU-fast, no installs.

The matrix itself (``nox -s matrix``) installs real releases; these tests
check what decides its rows: the declared ranges it reads, how a failed
install is classified, how doctor's JSON is judged, the widened plugin copy,
and the page it renders. And the promise the doctor sessions check on real
installs: a too-old or broken library is reported, never raised.
"""

from __future__ import annotations

import json
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
import quantplug as qp
import torch
from quantplug import _registry as registry
from quantplug._info import BackendInfo, Requirement, Status
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import matrix as M  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _entry_points(folder: Path) -> list[str]:
    project = tomllib.loads((folder / "pyproject.toml").read_text()).get("project", {})
    return list(project.get("entry-points", {}).get("quantplug.backends", {}))


PLUGIN_FOLDERS = sorted(
    p for p in (REPO / "plugins").iterdir() if (p / "pyproject.toml").is_file() and p.name != "template"
)
# backends, not folders: one dist may declare several (plugins/gptqmodel: gptq and awq)
PLUGINS = sorted(name for folder in PLUGIN_FOLDERS for name in _entry_points(folder))


# -- what the matrix reads from the plugins ---------------------------------------------------------


@pytest.mark.parametrize("backend", PLUGINS)
def test_every_plugin_is_in_the_matrix(backend):
    assert backend in M.BACKENDS, f"plugins/{backend} is not in tools/matrix.py BACKENDS: add its releases"


@pytest.mark.parametrize("backend", [b for b in PLUGINS if b in M.BACKENDS])
def test_pyproject_and_backend_info_declare_the_same_range(backend):
    declared = M.declared_range(backend, M.BACKENDS[backend].dist)
    assert declared["pyproject"], (
        f"plugins/{backend}/pyproject.toml does not depend on {M.BACKENDS[backend].dist}"
    )
    assert declared["requirement"], (
        f"quantplug_{backend}: no Requirement({M.BACKENDS[backend].dist!r}, ...) found"
    )
    assert declared["pyproject"] == declared["requirement"], declared


@pytest.mark.parametrize("backend", [b for b in PLUGINS if b in M.BACKENDS])
def test_matrix_covers_the_declared_range_from_its_oldest_release(backend):
    spec = M.BACKENDS[backend]
    declared = M.declared_range(backend, spec.dist)["requirement"]
    inside = [v for v in spec.releases if M.in_range(v, declared)]
    assert len(inside) >= 1, f"no release of {spec.dist} inside {declared} in the matrix"
    lower = [s.version for s in M.SpecifierSet(declared) if s.operator in (">=", "~=")]
    if lower:
        oldest = min(inside, key=M.Version)
        # the oldest tested release inside the range is the first release of the lower bound's series
        assert M.Version(oldest).release[: len(M.Version(lower[0]).release)] == M.Version(lower[0]).release, (
            f"{backend}: the range starts at {lower[0]} but the oldest tested release inside it is {oldest}"
        )
    if spec.too_old:
        assert not M.in_range(spec.too_old, declared), (
            f"{backend}: too_old {spec.too_old} is inside {declared}"
        )


@pytest.mark.parametrize("backend", PLUGINS)
def test_the_matrix_finds_each_backend_in_its_folder(backend):
    folder = M.plugin_dir(backend)
    assert backend in _entry_points(folder), f"{folder} declares no entry point {backend!r}"


def test_docs_show_the_declared_ranges_from_one_source():
    """docs/backends.md and every plugin README show the ranges through generated blocks, and each
    block says what the plugins declare (pyproject = BackendInfo) and the last matrix run proved."""
    data = json.loads((REPO / "docs" / "compatibility.json").read_text())
    docs = M.compat_doc_files()
    assert REPO / "docs" / "backends.md" in docs
    for folder in PLUGIN_FOLDERS:
        readme = folder / "README.md"
        names = {m["name"] for m in M.COMPAT_BLOCK.finditer(readme.read_text())}
        assert names & set(_entry_points(folder)), f"{readme}: no <!-- compat:begin NAME --> block"
    stale = [str(d) for d in docs if M.render_compat_blocks(d.read_text(), data, d) != d.read_text()]
    assert not stale, f"stale version blocks (run `nox -s compatibility`): {stale}"
    table = (REPO / "docs" / "backends.md").read_text()
    for backend in M.BACKENDS:
        if M.plugin_available(backend):
            assert f"`{M.compat_row(backend, data)['range']}`" in table


def test_widened_keeps_upper_bounds():
    assert M.widened(">=0.46,<0.51", "0.45.5") == ">=0.45.5,<0.51"
    assert M.widened("<0.3,>=0.2.7", "0.2.6") == ">=0.2.6,<0.3"
    assert M.widened(">=3.0", "2.6") == ">=2.6"


def test_explore_copy_replaces_every_spelling_of_the_range(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    plugin = repo / "plugins" / "fake"
    (plugin / "quantplug_fake").mkdir(parents=True)
    (plugin / "tests").mkdir()
    (plugin / "pyproject.toml").write_text(
        '[project]\ndependencies = ["quantplug>=0.1", "fakelib[pt]>=1.2,<2"]\n'
    )
    (plugin / "quantplug_fake" / "__init__.py").write_text(
        'SPECIFIER = ">=1.2,<2"\nOTHER = ">=1.2"\nR = Requirement("fakelib", "<2,>=1.2")\n'
    )
    (plugin / "tests" / "test_fake.py").write_text("assert fix == \"pip install 'fakelib>=1.2,<2'\"\n")
    monkeypatch.setattr(M, "REPO", repo)
    copy, wide = M.make_explore_copy("fake", "fakelib", "<2,>=1.2", "1.1.0", tmp_path / "copy")
    assert wide == ">=1.1.0,<2"
    assert '"fakelib[pt]>=1.1.0,<2"' in (copy / "pyproject.toml").read_text()
    init = (copy / "quantplug_fake" / "__init__.py").read_text()
    assert 'SPECIFIER = ">=1.1.0,<2"' in init and 'Requirement("fakelib", ">=1.1.0,<2")' in init
    assert 'OTHER = ">=1.2"' in init  # another range is left alone
    assert "fakelib>=1.1.0,<2" in (copy / "tests" / "test_fake.py").read_text()
    assert (
        'SPECIFIER = ">=1.2,<2"' in (plugin / "quantplug_fake" / "__init__.py").read_text()
    )  # original untouched


# -- pip failures become rows -----------------------------------------------------------------------

RESOLVER = """\
Collecting gptqmodel==7.7.0
ERROR: Cannot install gptqmodel==7.7.0 because these package versions have conflicting dependencies.

The conflict is caused by:
    The user requested torch==2.13.0
    gptqmodel 7.7.0 depends on torch>=2.14.1

Additionally, some packages in these conflicts have no matching distributions available for your environment:
    torch

To fix this you could try to:
1. loosen the range of package versions you've specified
2. remove package versions to allow pip to attempt to solve the dependency conflict

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/
"""

BUILD = """\
  Getting requirements to build wheel did not run successfully.
  exit code: 1
  RuntimeError: CUDA_HOME is not set
error: subprocess-exited-with-error
ERROR: Failed to build 'gptqmodel' when getting requirements to build wheel
"""


def test_resolver_conflict_is_cannot_install_with_the_reason():
    why = M.classify_install_failure(RESOLVER)
    assert why.startswith(f"cannot install beside torch {M.TORCH}")
    assert "gptqmodel 7.7.0 depends on torch>=2.14.1" in why


def test_failed_build_and_missing_release_are_cannot_install():
    assert "fails to build" in M.classify_install_failure(BUILD)
    missing = "ERROR: Could not find a version that satisfies the requirement x==9\nERROR: No matching distribution found for x==9"
    assert "no release" in M.classify_install_failure(missing)


# -- doctor's JSON, judged ---------------------------------------------------------------------------


def _row(name, status, found=None, fix=None, reason="why"):
    return {"name": name, "status": status, "found": found, "fix": fix, "reason": reason}


def test_check_doctor_accepts_a_correct_too_old_row():
    rows = [_row("hqq", "too old", "0.2.2", "pip install 'hqq>=0.2.3,<0.3'"), _row("bnb", "ok", "0.50.2")]
    assert M.check_doctor(rows, "hqq", "too old", "0.2.2", "hqq") == []


def test_check_doctor_names_every_problem():
    rows = [_row("hqq", "ok", "0.2.8", None, reason=None)]
    problems = M.check_doctor(rows, "hqq", "broken", None, "--force-reinstall")
    assert any("status 'ok', expected 'broken'" in p for p in problems)
    assert any("--force-reinstall" in p for p in problems)
    assert any("no reason" in p for p in problems)
    assert M.check_doctor(rows, "aqlm", "too old", "1.0.3", "aqlm") == [
        "doctor does not list 'aqlm' (listed: ['hqq'])"
    ]


# -- too old and broken: reported, not raised ---------------------------------------------------------


@pytest.fixture
def fresh_registry():
    registry.reset()
    yield
    registry.reset()


def _plugin(name, requirement):
    module = types.ModuleType(f"matrix_fake_{name}")

    @qp.hookimpl
    def quantplug_backend_info():
        return BackendInfo(name=name, requires=(requirement,))

    module.quantplug_backend_info = quantplug_backend_info
    return module


def test_too_old_and_broken_are_reported_not_raised(fresh_registry, capsys):
    found = metadata.version("pytest")
    qp.register(_plugin("tooold", Requirement("pytest", ">=999")), name="tooold")
    # "json" imports but no distribution "matrix-no-such-dist" has metadata: a broken install
    qp.register(_plugin("broken", Requirement("matrix-no-such-dist", ">=1", module="json")), name="broken")
    rows = {row.name: row for row in qp.backends()}
    assert rows["tooold"].status is Status.TOO_OLD
    assert rows["tooold"].found == found and rows["tooold"].fix == "pip install 'pytest>=999'"
    assert found in rows["tooold"].reason and ">=999" in rows["tooold"].reason
    assert rows["broken"].status is Status.BROKEN and "--force-reinstall" in rows["broken"].fix
    # doctor lists them with the fix, exits 0
    from quantplug.apps.cli import main

    assert main(["doctor", "--json"]) == 0
    listed = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert listed["tooold"]["status"] == "too old" and listed["broken"]["status"] == "broken"
    assert M.check_doctor(list(listed.values()), "tooold", "too old", found, "pytest>=999") == []
    # and everything else keeps working: plain linears attach and merge
    model = nn.Sequential(nn.Linear(8, 8))
    qp.attach(model, qp.LoraConfig(r=2, alpha=4, target_modules=["0"]))
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = model(x)
        qp.merge(model, mode="dense")
        assert torch.allclose(model(x), before, atol=1e-6)
    # asking the too-old backend for work is one clear error, with the fix
    with pytest.raises(RuntimeError, match=r"too old.*pip install 'pytest>=999'"):
        qp.quantize(nn.Linear(8, 8), "tooold")


# -- the page -----------------------------------------------------------------------------------------


def _record(session, kind, version, outcome, failed=(), passed=10, **extra):
    return {
        "session": session,
        "kind": kind,
        "backend": "bnb",
        "library": "bitsandbytes",
        "version": version,
        "outcome": outcome,
        "date": "2026-11-25T04:00:00+00:00",
        "env": {"torch": "2.13.0+cpu", "python": "3.11.7", "platform": "Linux"},
        "tests": {
            "passed": passed,
            "failed": len(failed),
            "errors": 0,
            "skipped": 1,
            "failed_tests": list(failed),
        },
        "timing": {"total_s": 60.0, "tests_s": 40.0, "overhead_s": 20.0},
        **extra,
    }


def test_render_writes_the_table_and_the_verdicts(tmp_path, monkeypatch):
    monkeypatch.setattr(
        M, "declared_range", lambda b, d: {"pyproject": "<0.51,>=0.46", "requirement": "<0.51,>=0.46"}
    )
    monkeypatch.setattr(M, "plugin_available", lambda b: b == "bnb")
    records = [
        _record("matrix_bnb(0.45.5)", "explore", "0.45.5", "pass"),
        _record("matrix_bnb(0.46.0)", "backend", "0.46.0", "fail", failed=["t::a", "t::b"]),
        {
            **_record("matrix_bnb(0.46.0/setuptools<81)", "backend", "0.46.0", "pass"),
            "with": ["setuptools<81"],
        },
        _record("matrix_bnb(0.49.2)", "backend", "0.49.2", "fail", failed=["t::a"]),
        _record("matrix_bnb(0.50.2)", "backend", "0.50.2", "fail", failed=["t::a"]),
        {
            **_record("matrix_bnb(0.51.0)", "explore", "0.51.0", "cannot install"),
            "tests": None,
            "detail": "cannot install beside torch 2.13.0: bitsandbytes 0.51.0 depends on torch>=2.14.1",
        },
        {
            **_record("matrix_doctor(bnb)", "doctor", "0.45.5", "pass"),
            "tests": None,
            "witness": "hqq",
            "checks": {"too_old": True, "broken": True, "witness": True},
        },
    ]
    for r in records:
        M.write_record(tmp_path, r)
    (tmp_path / "run.json").write_text(json.dumps({"wall_s": 3000}))
    md_path, json_path = tmp_path / "c.md", tmp_path / "c.json"
    M.write_docs(tmp_path, md_path, json_path)
    md = md_path.read_text()
    assert "torch 2.13.0+cpu, Python 3.11.7" in md and "2026-11-25" in md and "50.0 min" in md
    assert "| bnb | 0.45.5 | *outside* | works | 10/0/1 |" in md
    assert "| bnb | 0.46.0 | inside | fails | 10/2/1 | only here: `b` |" in md
    assert "| bnb | 0.49.2 | inside | works (same failures as newest) |" in md
    assert "| bnb | 0.51.0 | *outside* | cannot install |" in md and "depends on torch>=2.14.1" in md
    assert "| bnb | 0.45.5 | yes | yes | yes (hqq) |" in md
    verdict = next(line for line in md.splitlines() if line.startswith("| bnb | bitsandbytes |"))
    assert "`>=0.46,<0.51`" in verdict and "`>=0.49.2,<0.51`" in verdict  # declared, proved
    assert (
        "fails inside the declared range on 0.46.0" in verdict and "also works outside it: 0.45.5" in verdict
    )
    assert "not proved" not in verdict
    assert "works only with extra requirements: 0.46.0 with setuptools<81" in verdict
    assert "| bnb | 0.46.0 with `setuptools<81` | inside | works | 10/0/1 |" in md
    quanto = next(line for line in md.splitlines() if line.startswith("| quanto |"))
    assert "plugin not present" in quanto
    data = json.loads(json_path.read_text())
    assert data["backends"]["bnb"]["works"] == ["0.45.5", "0.49.2", "0.50.2"]
    assert data["backends"]["bnb"]["cannot_install"] == ["0.51.0"]
    assert data["backends"]["hqq"]["verdict"] == "plugin not present"


def test_noxfile_defines_the_matrix_sessions():
    text = (REPO / "noxfile.py").read_text()
    for name in ("def matrix(", "def matrix_ci(", "def compatibility(", "_define_matrix_sessions()"):
        assert name in text


def test_junit_counts_and_failure_reasons(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        """<testsuites><testsuite>
<testcase classname="t" name="ok"/>
<testcase classname="t" name="skip"><skipped message="no avx"/></testcase>
<testcase classname="t" name="bad"><failure message="assert 1 == 2">def test():
&gt;   x()
E   ImportError: cannot import name 'to_nf4' from 'torchao.quantization'
</failure></testcase>
<testcase classname="plugins.x" name="test_x"><error message="collection failure">
E   ModuleNotFoundError: No module named 'pkg_resources'</error></testcase>
</testsuite></testsuites>"""
    )
    counts = M.junit_counts(junit)
    assert (counts["passed"], counts["skipped"], counts["failed"], counts["errors"]) == (1, 1, 1, 1)
    assert (
        counts["reasons"]["t::bad"] == "ImportError: cannot import name 'to_nf4' from 'torchao.quantization'"
    )
    assert counts["reasons"]["plugins.x::test_x"] == "ModuleNotFoundError: No module named 'pkg_resources'"
    record = {"tests": counts}
    assert M.top_reason(record, ["t::bad"]) == counts["reasons"]["t::bad"]
