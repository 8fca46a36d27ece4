"""The backend version matrix: which releases are tested, and the helpers noxfile.py's matrix sessions use.

One torch for every session: a base virtualenv (``<envdir>/matrix-base``)
holds torch 2.13.0 (the CPU wheel), quantplug's core (editable) and the test
tools; each matrix session is a fresh, small venv that sees the base through
a ``.pth`` file and installs only the backend release under test (and the
plugin, editable, without dependencies) on top, under a constraints file
that pins torch, so no release can swap torch for a CUDA build. A release
the resolver cannot install beside torch 2.13.0 becomes a "cannot install"
row, found by pip failing, not by guessing.

Each session writes one JSON record into the results folder
(``$QUANTPLUG_MATRIX_RESULTS``, default ``.nox/matrix-results``);
:func:`render` turns the folder into docs/compatibility.md and .json.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
TORCH = "2.13.0"
# Base environment: what every session shares (besides quantplug's core, editable).
BASE_REQUIREMENTS = (f"torch=={TORCH}", "setuptools>=69", "wheel")
CORE_EXTRAS = "test"


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend plugin and the releases of its library the matrix installs.

    :param versions: releases run with the plugin's tests; those outside the
        plugin's declared range run against a copy of the plugin whose range
        is widened to admit them ("explore": would the range be right wider?).
    :param too_old: a release below the declared range for the doctor check
        (reported as "too old" with the fix, then made "broken" by deleting
        its metadata, while ``witness`` keeps working).
    """

    name: str
    dist: str
    versions: tuple[str, ...]
    too_old: str | None = None
    pip_name: str | None = None  # what to pip install, when it differs from dist (extras)
    witness: str = "hqq"
    folder: str | None = None  # plugins/<folder> when one dist declares several backends (gptqmodel)
    tests: tuple[str, ...] = ("tests",)  # the plugin folder's test paths for this backend

    @property
    def releases(self) -> tuple[str, ...]:
        """The releases in ``versions``, without the variants ("3.0/setuptools<81" is 3.0 plus a requirement)."""
        return tuple(dict.fromkeys(v.partition("/")[0] for v in self.versions))

    def spec(self, version: str) -> str:
        return f"{self.pip_name or self.dist}=={version}"


# Oldest release each plugin claims -> newest, plus the newest release below the range (an explore
# row: why the range stops there; the older ones failed the same way in earlier runs and were dropped
# to keep the run short) and too_old, a release below the range (the doctor check). A
# release counts as proved when a plain install of it (the plugin's own declared dependencies
# included) passes; "x/req,req" variants only explain why a plain install fails.
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "bnb",
            "bitsandbytes",
            ("0.49.2", "0.50.0", "0.50.1", "0.50.2"),
            too_old="0.49.2",
        ),
        Backend(
            "hqq",
            "hqq",
            ("0.2.6", "0.2.7", "0.2.7.post1", "0.2.8.post1"),
            too_old="0.2.6",
            witness="quanto",
        ),
        Backend("torchao", "torchao", ("0.14.1", "0.15.0", "0.16.0", "0.17.0", "0.18.0"), too_old="0.14.1"),
        Backend("quanto", "optimum-quanto", ("0.2.4", "0.2.5", "0.2.6", "0.2.7"), too_old="0.2.4"),
        Backend("aqlm", "aqlm", ("1.1.6", "1.1.7"), too_old="1.1.6"),
        Backend(
            "inc",
            "neural-compressor",
            # 3.0-3.7 import pkg_resources and six without declaring them: variants run them beside those
            ("3.7.1", "3.7.1/setuptools<81,six", "3.8.1", "3.9", "3.10"),
            too_old="3.7.1",
            pip_name="neural-compressor[pt]",
        ),
        # One dist (plugins/gptqmodel) declares both backends and depends on requests, which gptqmodel
        # 7.3-7.5 import without declaring. 7.3.x-7.4.0 also import torchvision: the variant row shows
        # that the only torchvision for torch 2.13.0 here (0.28.0, a CUDA build) cannot load beside the
        # CPU torch. 7.7.0 requires torch>=2.14.1.
        Backend(
            "gptq",
            "gptqmodel",
            ("7.4.0", "7.4.0/torchvision==0.28.0", "7.5.0", "7.6.0", "7.7.0"),
            too_old="7.4.0",
            folder="gptqmodel",
            tests=("tests/test_gptq.py",),
        ),
        Backend("awq", "gptqmodel", ("7.5.0", "7.6.0"), folder="gptqmodel", tests=("tests/test_awq.py",)),
        Backend(
            "compressed_tensors",
            "compressed-tensors",
            ("0.17.1", "0.18.0", "0.19.0", "0.20.1"),
            too_old="0.17.1",
        ),
        # PyPI has only a CPython 3.10 CUDA wheel of eetq 1.0.0 and no sdist: a "cannot install" row here
        Backend("eetq", "eetq", ("1.0.0",)),
    )
}

# The doctor check (too old, then broken) is the core's; it runs for these backends (CI: quanto).
DOCTOR_BACKENDS = ("quanto", "torchao", "gptq")

# Interop: vary one library, keep the rest at the base's newest; these test files need bnb.
INTEROP_TESTS = ("tests/test_peft_interop.py", "tests/test_transformers_models.py")
INTEROP_BACKEND = ("bnb", "0.50.2")
INTEROP = {
    "transformers": ("4.56.2", "4.57.6", "5.0.0", "5.25.0"),
    "peft": ("0.17.1", "0.18.1", "0.21.2"),
}
# Trainer/SFTTrainer: the oldest and the newest supported (transformers, trl) pairs, with the bnb and
# hqq plugins the tests train on (the core's extras: transformers>=4.56, trl>=0.24).
TRAINER_TESTS = ("tests/test_trainer.py",)
TRAINER_BACKENDS = (("bnb", "0.50.2"), ("hqq", "0.2.8.post1"))
TRAINER = (("4.56.2", "0.24.0"), ("5.25.0", "1.16.0"))


# -- paths ---------------------------------------------------------------------------------------


def results_dir(default_envdir: Path | None = None) -> Path:
    env = os.environ.get("QUANTPLUG_MATRIX_RESULTS")
    if env:
        return Path(env)
    return (default_envdir or REPO / ".nox") / "matrix-results"


def plugin_dir(backend: str) -> Path:
    spec = BACKENDS.get(backend)
    return REPO / "plugins" / ((spec.folder if spec else None) or backend)


def plugin_sources(root: Path) -> list[Path]:
    """The plugin's package sources (``quantplug_*/``, subpackages included), not its tests."""
    return sorted(p for p in root.glob("quantplug_*/**/*.py") if p.is_file())


def oldest_inside(backend: str) -> str | None:
    """The oldest plain release in the matrix inside the plugin's declared range (the CI subset runs it)."""
    spec = BACKENDS[backend]
    declared = declared_range(backend, spec.dist)
    range_ = declared["requirement"] or declared["pyproject"]
    return next((v for v in spec.releases if in_range(v, range_)), None)


def plugin_available(backend: str) -> bool:
    return (plugin_dir(backend) / "pyproject.toml").is_file()


def site_packages(python: str | Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


# -- declared ranges -----------------------------------------------------------------------------


def declared_range(backend: str, dist: str) -> dict:
    """The version range a plugin declares for ``dist``: in its pyproject and in its BackendInfo."""
    root = plugin_dir(backend)
    result = {"pyproject": None, "requirement": None}
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        data = tomllib.loads(pyproject.read_text())
        project = data.get("project", {})
        extras = [line for lines in project.get("optional-dependencies", {}).values() for line in lines]
        for line in [*extras, *project.get("dependencies", [])]:  # a hard dependency wins over an extra
            req = Requirement(line)
            if canon(req.name) == canon(dist):
                result["pyproject"] = str(req.specifier)
    text = "\n".join(p.read_text() for p in plugin_sources(root))
    match = re.search(r'Requirement\(\s*"' + re.escape(dist) + r'"\s*,\s*("([^"]*)"|[A-Z_]+)', text)
    if match:
        spec = match.group(2)
        if spec is None:  # a constant: SPECIFIER = ">=..."
            const = re.search(rf'^{match.group(1)}\s*=\s*"([^"]*)"', text, re.M)
            spec = const.group(1) if const else None
        result["requirement"] = str(SpecifierSet(spec)) if spec is not None else None
    return result


def core_range(library: str) -> str | None:
    """The range quantplug's own pyproject allows for ``library`` (dependencies or any extra)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text()).get("project", {})
    lines = [*project.get("dependencies", [])]
    lines += [line for group in project.get("optional-dependencies", {}).values() for line in group]
    for line in lines:
        req = Requirement(line)
        if canon(req.name) == canon(library):
            return str(req.specifier)
    return None


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def in_range(version: str, spec: str | None) -> bool:
    return spec is not None and SpecifierSet(spec).contains(Version(version), prereleases=True)


def widened(spec: str, version: str) -> str:
    """``spec`` with its lower bounds replaced by ``>=version`` (upper bounds kept)."""
    kept = [str(s) for s in SpecifierSet(spec) if s.operator not in (">=", ">", "~=", "==")]
    return ",".join([f">={version}", *sorted(kept)])


# -- pip -----------------------------------------------------------------------------------------


def constraints_file(envdir: Path) -> Path:
    path = envdir / "matrix-constraints.txt"
    text = f"# the matrix: one torch everywhere (the CPU wheel on disk)\ntorch=={TORCH}\n"
    if not path.is_file() or path.read_text() != text:
        envdir.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def pip(python: str | Path, *args: str, constraints: Path | None = None, log=print) -> tuple[int, str, float]:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    if constraints is not None:
        cmd += ["-c", str(constraints)]
    cmd += list(args)
    log("$ " + " ".join(cmd))
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    if proc.returncode:
        log(output[-4000:])
    return proc.returncode, output, elapsed


def classify_install_failure(output: str) -> str:
    """Why pip could not install: the resolver's conflict, a failed build, or no release for here."""
    lines = [ln.strip() for ln in output.splitlines()]
    depends = [ln for ln in lines if " depends on " in ln or ln.startswith("The user requested")]
    if "ResolutionImpossible" in output or "conflicting dependencies" in output:
        why = "; ".join(dict.fromkeys(ln for ln in depends if "depends on" in ln)) or "resolver conflict"
        return f"cannot install beside torch {TORCH}: {why}"
    if "No matching distribution found" in output or "Could not find a version" in output:
        return "cannot install: no release for this Python/platform"
    if (
        "Failed to build" in output
        or "metadata-generation-failed" in output
        or "subprocess-exited-with-error" in output
    ):
        err = next(
            (
                ln
                for ln in reversed(lines)
                if ln.startswith(("error:", "ERROR:", "RuntimeError", "Exception"))
            ),
            "",
        )
        return f"cannot install: the sdist fails to build ({err[:200]})".replace(" ()", "")
    tail = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), "pip failed")
    return f"cannot install: {tail[:200]}"


def _stamp(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def ensure_base(envdir: Path, log=print) -> Path:
    """The shared base venv (torch + quantplug core + test tools); built once, rebuilt when its inputs change."""
    base = envdir / "matrix-base"
    python = base / "bin" / "python"
    if os.environ.get("QUANTPLUG_MATRIX_BASE_FROZEN") and python.exists():
        return (
            base  # `nox -s matrix` built it before starting sessions side by side: never rebuild under them
        )
    core = (REPO / "pyproject.toml").read_text()
    stamp = _stamp([*BASE_REQUIREMENTS, core, str(REPO), sys.version])
    stamp_file = base / ".matrix-stamp"
    if python.exists() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return base
    started = time.perf_counter()
    if base.exists():
        shutil.rmtree(base)
    interpreter = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([interpreter, "-m", "venv", str(base)], check=True)
    constraints = constraints_file(envdir)
    for args in ([*BASE_REQUIREMENTS], ["-e", f"{REPO}[{CORE_EXTRAS}]"]):
        rc, out, _ = pip(python, *args, constraints=constraints, log=log)
        if rc:
            raise RuntimeError(f"cannot build the matrix base venv: {out[-2000:]}")
    stamp_file.write_text(stamp)
    log(f"matrix base venv built in {time.perf_counter() - started:.0f} s: {base}")
    return base


def link_base(session_python: str | Path, base: Path) -> None:
    """Make the base venv's packages (torch, core, pytest...) visible in a session venv, after its own."""
    base_site = site_packages(base / "bin" / "python")
    own = site_packages(session_python)
    (own / "_quantplug_matrix_base.pth").write_text(f"import site; site.addsitedir({str(base_site)!r})\n")


def python_info(python: str | Path) -> dict:
    code = (
        "import json, platform, sys, torch;"
        "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__,"
        " 'platform': platform.platform()}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception:
        return {"python": None, "torch": None, "platform": None, "error": out.stderr[-500:]}


def installed(python: str | Path, dists: list[str]) -> dict[str, str | None]:
    code = (
        "import json, sys, importlib.metadata as m\n"
        "out = {}\n"
        "for d in sys.argv[1:]:\n"
        "    try: out[d] = m.version(d)\n"
        "    except Exception: out[d] = None\n"
        "print(json.dumps(out))"
    )
    out = subprocess.run([str(python), "-c", code, *dists], capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception:
        return dict.fromkeys(dists)


def remove_metadata(python: str | Path, dist: str) -> str:
    """Delete ``dist``'s .dist-info from the session venv, leaving its modules: a "broken" install."""
    code = (
        "import sys, importlib.metadata as m, shutil\n"
        "d = m.distribution(sys.argv[1])\n"
        "path = d._path\n"
        "shutil.rmtree(path)\n"
        "print(path)"
    )
    out = subprocess.run([str(python), "-c", code, dist], capture_output=True, text=True, check=True)
    return out.stdout.strip()


# -- running tests -------------------------------------------------------------------------------


def junit_counts(path: Path) -> dict:
    """Counts from pytest's JUnit XML, the failed tests, and one line saying why each failed."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": [], "reasons": {}}
    if not path.is_file():
        return counts
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        children = {child.tag: child for child in case}
        bad = children.get("failure")
        if bad is None:
            bad = children.get("error")
        if bad is not None:
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            counts["failed_tests"].append(name)
            counts["reasons"][name] = failure_reason(bad.get("message") or "", bad.text or "")
        elif "skipped" in children:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


_ERROR_LINE = re.compile(r"^E\s+((?:[\w.]+(?:Error|Exception|Exit)|AssertionError|assert)\b.*)$")


def failure_reason(message: str, text: str) -> str:
    """One line: the exception pytest reported (``E   ImportError: ...``), else its message."""
    found = [m.group(1).strip() for m in map(_ERROR_LINE.match, text.splitlines()) if m]
    errors = [f for f in found if not f.startswith("assert")]
    first = message.strip().splitlines()[0] if message.strip() else ""
    line = (
        errors[-1] if errors else (first if first and first != "collection failure" else (found or ["?"])[0])
    )
    line = line.split("\\n")[0]  # a repr()'d tensor: its first line says enough
    line = re.sub(r" \(/[^)]*\)", "", line)  # "(/path/to/site-packages/...)"
    return re.sub(r"\s+", " ", line)[:160]


def top_reason(record: dict, tests: list[str]) -> str | None:
    """The most common failure reason among ``tests`` in ``record``, with how many it covers."""
    reasons = (record.get("tests") or {}).get("reasons") or {}
    picked = [reasons[t] for t in tests if t in reasons]
    if not picked:
        return None
    best = max(set(picked), key=picked.count)
    return f"{best} ({picked.count(best)} of {len(tests)})" if len(tests) > 1 else best


def make_explore_copy(backend: str, dist: str, declared: str, version: str, dest: Path) -> tuple[Path, str]:
    """A copy of the plugin whose declared range admits ``version`` (every literal of it replaced)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(
        plugin_dir(backend),
        dest,
        ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__", ".pytest_cache"),
    )
    wide = widened(declared, version)
    target = {str(s) for s in SpecifierSet(declared)}
    literal = re.compile(r"""(?P<q>["'])(?P<pre>[A-Za-z0-9_.\-\[\]]*)(?P<spec>[<>=!~][^"'\n]*)(?P=q)""")

    def swap(match: re.Match) -> str:
        try:
            same = {str(s) for s in SpecifierSet(match["spec"])} == target
        except Exception:
            same = False
        return f"{match['q']}{match['pre']}{wide}{match['q']}" if same else match.group(0)

    for path in dest.rglob("*"):
        if path.suffix in (".py", ".toml") and path.is_file():
            text = path.read_text()
            new = literal.sub(swap, text)
            if new != text:
                path.write_text(new)
    return dest, wide


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_record(folder: Path, record: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (re.sub(r"[^A-Za-z0-9_.-]+", "_", record["session"]) + ".json")
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


# -- doctor checks ---------------------------------------------------------------------------------


def check_doctor(rows: list[dict], backend: str, expected: str, found: str | None, fix_has: str) -> list[str]:
    """Problems with ``quantplug doctor --json`` output for ``backend``; empty when it says what it should."""
    by_name = {row["name"]: row for row in rows}
    row = by_name.get(backend)
    if row is None:
        return [f"doctor does not list {backend!r} (listed: {sorted(by_name)})"]
    problems = []
    if row["status"] != expected:
        problems.append(f"{backend}: status {row['status']!r}, expected {expected!r} ({row.get('reason')})")
    if found is not None and row.get("found") != found:
        problems.append(f"{backend}: found {row.get('found')!r}, expected {found!r}")
    if not row.get("fix") or fix_has not in row["fix"]:
        problems.append(f"{backend}: fix {row.get('fix')!r} does not contain {fix_has!r}")
    if not row.get("reason"):
        problems.append(f"{backend}: no reason given")
    return problems


# -- rendering -----------------------------------------------------------------------------------

OUTCOME_ORDER = {
    "pass": 0,
    "pass (plugin failures)": 1,
    "fail": 2,
    "cannot install": 3,
    "skipped": 4,
    "error": 5,
}


def load_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        if path.name == "run.json":
            continue
        try:
            records.append(json.loads(path.read_text()))
        except Exception:
            continue
    return records


def _vkey(v: str):
    try:
        return Version(v)
    except Exception:
        return Version("0")


def summarize(records: list[dict]) -> dict:
    """Per backend: declared range, rows by version, and the range the matrix proves."""
    out: dict[str, dict] = {}
    for name, backend in BACKENDS.items():
        every = sorted(
            (r for r in records if r.get("kind") in ("backend", "explore") and r.get("backend") == name),
            key=lambda r: (_vkey(r["version"]), bool(r.get("with"))),
        )
        rows = [r for r in every if not r.get("with")]  # variants (extra requirements) prove nothing alone
        doctor = [r for r in records if r.get("kind") == "doctor" and r.get("backend") == name]
        declared = (
            declared_range(name, backend.dist)
            if plugin_available(name)
            else {"pyproject": None, "requirement": None}
        )
        spec = declared["requirement"] or declared["pyproject"]
        # failures that also happen on the newest passing-or-failing in-range release are the plugin's own,
        # not the version's: a version "passes (plugin failures)" when it fails nothing more than that one
        in_rng = [r for r in rows if r.get("outcome") in ("pass", "fail") and in_range(r["version"], spec)]
        reference = in_rng[-1] if in_rng else None
        ref_failed = (
            set(reference["tests"]["failed_tests"]) if reference and reference.get("tests") else set()
        )
        for r in every:
            r["version_specific_failures"] = []
            if r.get("outcome") == "fail" and r.get("tests"):
                extra = sorted(set(r["tests"]["failed_tests"]) - ref_failed)
                r["version_specific_failures"] = extra
                r["verdict"] = "works (same failures as newest)" if not extra and ref_failed else "fails"
            elif r.get("outcome") == "pass":
                r["verdict"] = "works"
            else:
                r["verdict"] = r.get("outcome", "?")
        works = [r["version"] for r in rows if r["verdict"].startswith("works")]
        broken = [r["version"] for r in rows if r["verdict"] == "fails"]
        cannot = [r["version"] for r in rows if r["verdict"] == "cannot install"]
        proved = proved_range(spec, rows)
        out[name] = {
            "library": backend.dist,
            "declared": declared,
            "rows": every,
            "doctor": doctor,
            "works": works,
            "fails": broken,
            "cannot_install": cannot,
            "proved": proved,
            "verdict": range_verdict(spec, rows, proved, variants=[r for r in every if r.get("with")]),
        }
    return out


def proved_range(spec: str | None, rows: list[dict]) -> str | None:
    """The range the matrix proves: from the newest working release down while releases keep working.

    The upper bounds stay the declared ones (no release above them was tested inside the
    plugin's own range); ``None`` when no release works.
    """
    tested = sorted(
        (r for r in rows if r.get("verdict") != "cannot install"), key=lambda r: _vkey(r["version"])
    )
    working = [i for i, r in enumerate(tested) if r["verdict"].startswith("works")]
    if not working or spec is None:
        return None
    i = working[-1]
    while i > 0 and tested[i - 1]["verdict"].startswith("works"):
        i -= 1
    return pretty(widened(spec, tested[i]["version"]))


def range_verdict(spec: str | None, rows: list[dict], proved, variants: list[dict] = ()) -> str:
    if spec is None:
        return "plugin not present"
    if not rows:
        return "not run"
    notes = []
    inside = [r for r in rows if in_range(r["version"], spec)]
    outside = [r for r in rows if not in_range(r["version"], spec)]
    bad_inside = [r["version"] for r in inside if r["verdict"] == "fails"]
    cannot_inside = [r["version"] for r in inside if r["verdict"] == "cannot install"]
    good_outside = [r["version"] for r in outside if r["verdict"].startswith("works")]
    if bad_inside:
        notes.append("fails inside the declared range on " + ", ".join(bad_inside))
    if cannot_inside:
        notes.append("cannot install here (torch " + TORCH + "): " + ", ".join(cannot_inside))
    if good_outside:
        notes.append("also works outside it: " + ", ".join(good_outside))
    rescued = [
        f"{r['version']} with {', '.join(r['with'])}" for r in variants if r["verdict"].startswith("works")
    ]
    if rescued:
        notes.append("works only with extra requirements: " + "; ".join(rescued))
    good_inside = [r["version"] for r in inside if r["verdict"].startswith("works")]
    if not good_inside:
        notes.insert(0, "not proved: no release inside the range was shown to work")
    if not notes:
        return "confirmed: every tested release inside the range works, none outside was shown to work"
    return "; ".join(notes)


def pretty(spec: str | None) -> str:
    """A specifier with its lower bounds first (``>=0.46,<0.51``), as people write it."""
    if not spec:
        return "-"
    order = {">=": 0, ">": 0, "~=": 0, "==": 1, "!=": 2, "<=": 3, "<": 3}
    return ",".join(
        str(s) for s in sorted(SpecifierSet(spec), key=lambda s: (order.get(s.operator, 2), str(s)))
    )


def render(folder: Path, run: dict | None = None) -> tuple[str, dict]:
    records = load_records(folder)
    run = run or (json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {})
    summary = summarize(records)
    env = next((r["env"] for r in records if r.get("env", {}).get("torch")), {})
    dates = sorted(r["date"] for r in records if r.get("date"))
    interop = sorted(
        (r for r in records if r.get("kind") == "interop"), key=lambda r: (r["library"], _vkey(r["version"]))
    )
    trainer_rows = [_slim(r) for r in records if r.get("kind") == "trainer"]
    total_session_s = sum(r.get("timing", {}).get("total_s", 0) for r in records)
    overheads = [
        r["timing"]["overhead_s"] for r in records if r.get("timing", {}).get("overhead_s") is not None
    ]

    lines = [
        "# Backend compatibility",
        "",
        "Generated by `nox -s compatibility` (the full matrix and this page: `nox -s matrix`) from the last",
        "matrix run; do not edit by hand. Each row is a real install of that release beside torch",
        f"{env.get('torch', TORCH)} (CPU) and the plugin's own test suite (conformance suite included) run on it.",
        "",
        f"- date: {dates[0][:10] if dates else '?'}"
        + (f" to {dates[-1][:10]}" if dates and dates[-1][:10] != dates[0][:10] else ""),
        f"- torch {env.get('torch', '?')}, Python {env.get('python', '?')}, {env.get('platform', '?')}",
    ]
    if run.get("wall_s"):
        streams = f"{run['jobs']} streams side by side" if run.get("jobs", 1) > 1 else "sequential"
        lines.append(
            f"- matrix wall time: {run['wall_s'] / 60:.1f} min for {len(records)} sessions ({streams})"
        )
    else:
        lines.append(f"- sessions: {len(records)}, {total_session_s / 60:.1f} min in all")
    if run.get("note"):
        lines.append(f"- {run['note']}")
    if overheads:
        overheads.sort()
        lines.append(
            f"- per-session overhead (fresh venv over the shared torch base + installs, outside the tests): "
            f"median {overheads[len(overheads) // 2]:.0f} s, max {overheads[-1]:.0f} s"
        )
    lines += [
        "",
        "Outcomes: **pass** — every test passed; **works (same failures as newest)** — the only failures",
        "are ones the newest in-range release has too (the plugin's, not the version's); **fails** —",
        "failures this release alone has; **cannot install** — pip's resolver or build refused it beside",
        f"torch {TORCH}. A release outside the declared range is tested against a copy of the plugin",
        "whose range is widened to admit it (marked *outside*). A release shown `with` requirements is a",
        "variant: that release plus dependencies it needs but does not declare. A range is proved only by",
        "plain installs (what `pip install` gives users); variants just say why a plain install failed.",
        "",
        "## Declared vs proved ranges",
        "",
        "| backend | library | declared (pyproject / BackendInfo) | proved here | works on | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        d = s["declared"]
        declared = pretty(d["pyproject"])
        if d["requirement"] and d["requirement"] != d["pyproject"]:
            declared += f" / {pretty(d['requirement'])} (differ!)"
        lines.append(
            f"| {name} | {s['library']} | `{declared}` | `{s['proved'] or '-'}` | {', '.join(s['works']) or '-'} "
            f"| {s['verdict']} |"
        )
    lines += [
        "",
        "## Results",
        "",
        "| backend | version | range | result | tests (pass/fail/skip) | detail |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        spec = s["declared"]["requirement"] or s["declared"]["pyproject"]
        for r in s["rows"]:
            t = r.get("tests") or {}
            counts = (
                f"{t.get('passed', 0)}/{t.get('failed', 0) + t.get('errors', 0)}/{t.get('skipped', 0)}"
                if t
                else "-"
            )
            where = "inside" if in_range(r["version"], spec) else "*outside*"
            label = r["version"] + (f" with `{', '.join(r['with'])}`" if r.get("with") else "")
            detail = r.get("detail") or ""
            only = r.get("version_specific_failures") or []
            if only:
                detail = "only here: " + ", ".join(f"`{x.split('::')[-1]}`" for x in only[:3])
                if len(only) > 3:
                    detail += f" (+{len(only) - 3})"
                why = top_reason(r, only)
                if why:
                    detail += f"; cause: `{why}`"
            lines.append(f"| {name} | {label} | {where} | {r['verdict']} | {counts} | {_cell(detail)} |")
    lines += [
        "",
        "## Too old and broken installs",
        "",
        "Each check installs a release below the plugin's range and asks `quantplug doctor --json`; then it",
        "deletes that release's metadata (module present, no dist-info) and asks again. Both times the",
        "status and the fix must be right, and another backend (the witness) must still attach, train and merge.",
        "",
        "| backend | release | too old reported | broken reported | witness still works | detail |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        for r in s["doctor"]:
            c = r.get("checks", {})
            lines.append(
                f"| {name} | {r['version']} | {_yn(c.get('too_old'))} | {_yn(c.get('broken'))} | "
                f"{_yn(c.get('witness'))} ({r.get('witness', '?')}) | {_cell(r.get('detail') or '')} |"
            )
    if interop:
        lines += [
            "",
            "## transformers and PEFT",
            "",
            f"`{' '.join(INTEROP_TESTS)}` with one library at the release shown and the other at the base's newest",
            f"(bitsandbytes {INTEROP_BACKEND[1]}).",
            "",
            "| library | version | result | tests (pass/fail/skip) | detail |",
            "|---|---|---|---|---|",
        ]
        for r in interop:
            t = r.get("tests") or {}
            counts = (
                f"{t.get('passed', 0)}/{t.get('failed', 0) + t.get('errors', 0)}/{t.get('skipped', 0)}"
                if t
                else "-"
            )
            detail = r.get("detail") or ""
            if t.get("failed_tests"):
                detail = ", ".join(f"`{x.split('::')[-1]}`" for x in t["failed_tests"][:3]) + (
                    f" (+{len(t['failed_tests']) - 3})" if len(t["failed_tests"]) > 3 else ""
                )
                why = top_reason(r, t["failed_tests"])
                if why:
                    detail += f"; cause: `{why}`"
            lines.append(f"| {r['library']} | {r['version']} | {r['outcome']} | {counts} | {_cell(detail)} |")
    trainer = sorted((r for r in records if r.get("kind") == "trainer"), key=lambda r: r["version"])
    if trainer:
        lines += [
            "",
            "## Trainer and SFTTrainer",
            "",
            f"`{' '.join(TRAINER_TESTS)}` on the oldest and the newest supported transformers / trl pair",
            "(" + ", ".join(f"{b} {v}" for b, v in TRAINER_BACKENDS) + ").",
            "",
            "| transformers / trl | result | tests (pass/fail/skip) | detail |",
            "|---|---|---|---|",
        ]
        for r in trainer:
            t = r.get("tests") or {}
            counts = (
                f"{t.get('passed', 0)}/{t.get('failed', 0) + t.get('errors', 0)}/{t.get('skipped', 0)}"
                if t
                else "-"
            )
            detail = r.get("detail") or ""
            if t.get("failed_tests"):
                detail = ", ".join(f"`{x.split('::')[-1]}`" for x in t["failed_tests"][:3])
                why = top_reason(r, t["failed_tests"])
                if why:
                    detail += f"; cause: `{why}`"
            lines.append(f"| {r['version']} | {r['outcome']} | {counts} | {_cell(detail)} |")
    lines += [
        "",
        "## CI",
        "",
        "CI (`.ci/run`) runs the whole test suite on the newest releases the constraints allow, then",
        "`nox -s matrix_ci`: the oldest in-range release of every backend with more than one, the oldest",
        "supported transformers and peft under the interop tests, the oldest transformers / trl pair under",
        "the Trainer tests, and one too-old + broken doctor check. So both ends of every range run on",
        "every change; the releases between them run here.",
        "",
        *TORCH_AXIS_PLAN,
        "",
        "Regenerate: `nox -s matrix` (everything: about 50 min on 2 cores) or `nox -s compatibility` (this page only).",
        "",
    ]
    data = {
        "generated": now(),
        "env": env,
        "run": run,
        "torch_pin": TORCH,
        "backends": {
            name: {k: v for k, v in s.items() if k not in ("rows", "doctor")}
            | {"rows": [_slim(r) for r in s["rows"]], "doctor": [_slim(r) for r in s["doctor"]]}
            for name, s in summary.items()
        },
        "interop": [_slim(r) for r in interop],
        "trainer": trainer_rows,
    }
    return "\n".join(lines), data


TORCH_AXIS_PLAN = (
    "## Plan: a torch axis",
    "",
    f"Every row above runs torch {TORCH} (the CPU wheel), the only torch on this machine's disk. Some",
    "releases are out of reach for that alone: gptqmodel 7.7.0 requires torch>=2.14.1, and gptqmodel",
    "7.3.x-7.4.0 import torchvision, whose only wheel for torch 2.13.0 here (0.28.0) is a CUDA build that",
    "does not load beside the CPU torch. On a machine that has the wheels, the matrix takes torch as one",
    "more axis, in four steps:",
    "",
    "1. `TORCH` becomes `TORCHES` in tools/matrix.py: a few (torch, index URL, torchvision) triples, e.g.",
    "   2.13.0 and 2.14.1 from `https://download.pytorch.org/whl/cpu` (CPU torchvision builds included).",
    "2. `ensure_base` builds one base venv per torch (`matrix-base-<torch>`), keyed in its stamp as today;",
    "   `constraints_file` writes one constraints file per torch, pinning torch and torchvision together.",
    "3. Every session is parametrized by torch as well (`matrix_gptq(7.7.0, torch=2.14.1)`); a backend",
    "   lists, per release, the torches to try (by default: the newest torch only, plus the oldest for the",
    "   oldest in-range release), so the run grows by the releases that need another torch, not 2x.",
    "   A release that cannot install beside a given torch stays a `cannot install` row for that torch.",
    "4. Records carry `env.torch` already; the tables gain a torch column, and a range is proved per",
    "   torch: the README shows the range for the newest torch and notes releases that need another.",
    "",
    "Cost: with two torches, about 15 more sessions (gptqmodel 7.3.6, 7.4.0, 7.7.0 for gptq and awq;",
    "the oldest release of each other backend on the second torch), about 10 more minutes on 2 cores.",
    "",
    "Tried once by hand (2026-12-04), the first step of that plan: torch 2.14.1 and torchvision 0.29.1",
    "(the CUDA builds on this disk, run on the CPU) in a venv with gptqmodel 7.7.0 and a copy of the",
    "plugin whose range admits it: 109 of its 121 tests pass. The 12 failures say what the plugin must",
    "learn before 7.7 joins the range: 7.7 retired the torch INT8 kernels for weights of fewer than 8 bits",
    "(`NotImplementedError: Torch INT8 requires 8-bit source weights`; `AWQ_TORCH_INT8 is retired`), so",
    "that variant must be probed and reported unavailable, and its TorchAten layers refuse activations in",
    "another dtype than they were transformed for (`transformed for torch.bfloat16 but received",
    "torch.float32`), which the training tests feed. gptqmodel 7.3.x/7.4.0 need pypcre built from source",
    "there (a cmake build of many minutes on 2 cores), so they were not tried.",
)


def _slim(r: dict) -> dict:
    keep = (
        "session",
        "kind",
        "backend",
        "library",
        "version",
        "outcome",
        "verdict",
        "detail",
        "declared",
        "tested_range",
        "in_declared_range",
        "tests",
        "timing",
        "date",
        "checks",
        "witness",
        "with",
        "version_specific_failures",
        "installed",
    )
    out = {k: r[k] for k in keep if k in r}
    if out.get("version_specific_failures"):
        out["version_specific_failures"] = out["version_specific_failures"][:10]
    if out.get("tests"):
        out["tests"] = dict(out["tests"])
        out["tests"]["failed_tests"] = out["tests"].get("failed_tests", [])[:10]
        reasons = out["tests"].get("reasons") or {}
        out["tests"]["reasons"] = {t: reasons[t] for t in out["tests"]["failed_tests"] if t in reasons}
    return out


def _yn(v) -> str:
    return {True: "yes", False: "**no**", None: "-"}[v]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]


def write_docs(folder: Path, md_path: Path, json_path: Path, blocks: bool = False) -> None:
    """Write compatibility.md and .json from ``folder``'s records; ``blocks``: also the other docs' ranges."""
    md, data = render(folder)
    md_path.write_text(md)
    json_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if blocks:
        update_compat_blocks(data)


# -- the version ranges other docs show, generated from one source ----------------------------------
#
# docs/backends.md and each plugin's README hold blocks
#     <!-- compat:begin NAME --> ... <!-- compat:end -->
# (NAME: a backend, or "all" for the table of every backend) whose body is generated from the
# plugins' declared ranges (pyproject = BackendInfo, which tests/test_matrix.py checks) and the
# last matrix run (docs/compatibility.json). `nox -s matrix` and `nox -s compatibility` rewrite
# them (`python tools/matrix.py blocks` from docs/compatibility.json alone); tests/test_matrix.py fails
# when one is stale.

COMPAT_BLOCK = re.compile(r"(<!-- compat:begin (?P<name>\w+) -->\n)(?P<body>.*?)(<!-- compat:end -->)", re.S)
COMPAT_DOCS = ("README.md", "docs/backends.md", "plugins/*/README.md")


def compat_doc_files() -> list[Path]:
    return sorted({p for pattern in COMPAT_DOCS for p in REPO.glob(pattern)})


def _versions_of(data: dict, name: str, verdict: str) -> list[str]:
    rows = ((data.get("backends") or {}).get(name) or {}).get("rows") or []
    return [r["version"] for r in rows if not r.get("with") and (r.get("verdict") or "").startswith(verdict)]


def compat_row(name: str, data: dict) -> dict:
    """What the docs say about ``name``: its library, declared range and the matrix's verdicts."""
    spec = BACKENDS[name]
    declared = declared_range(name, spec.dist) if plugin_available(name) else {}
    return {
        "library": spec.dist,
        "range": pretty(declared.get("requirement") or declared.get("pyproject")),
        "works": _versions_of(data, name, "works"),
        "fails": _versions_of(data, name, "fails"),
        "cannot": _versions_of(data, name, "cannot install"),
    }


def compat_body(name: str, data: dict, doc: Path) -> str:
    link = os.path.relpath(REPO / "docs" / "compatibility.md", doc.parent).replace(os.sep, "/")
    torch = data.get("torch_pin") or TORCH
    if name == "all":
        lines = [
            f"| backend | library | supported range | passing releases (torch {torch}, CPU) | failing or not installable here |",
            "|---|---|---|---|---|",
        ]
        for backend in BACKENDS:
            row = compat_row(backend, data)
            bad = [f"{v} (fails)" for v in row["fails"]] + [f"{v} (cannot install)" for v in row["cannot"]]
            lines.append(
                f"| {backend} | {row['library']} | `{row['range']}` | {', '.join(row['works']) or '-'} "
                f"| {', '.join(bad) or '-'} |"
            )
        lines += [
            "",
            f"Generated from the plugins' declared ranges and the last matrix run ([details]({link})).",
        ]
        return "\n".join(lines) + "\n"
    row = compat_row(name, data)
    text = f"Supported: `{row['library']}{row['range']}`. "
    text += f"Passing in the last matrix run (torch {torch}, CPU): {', '.join(row['works']) or 'none'}"
    if row["fails"]:
        text += f"; failing: {', '.join(row['fails'])}"
    if row["cannot"]:
        text += f"; cannot install here: {', '.join(row['cannot'])}"
    return text + f". Generated from the plugin's declared range and [the matrix]({link}).\n"


def render_compat_blocks(text: str, data: dict, doc: Path) -> str:
    def body(match: re.Match) -> str:
        name = match["name"]
        if name != "all" and name not in BACKENDS:
            return match.group(0)
        return match.group(1) + compat_body(name, data, doc) + match.group(4)

    return COMPAT_BLOCK.sub(body, text)


def update_compat_blocks(data: dict) -> list[Path]:
    """Rewrite every compat block in docs/backends.md and the plugin READMEs; the files changed."""
    changed = []
    for doc in compat_doc_files():
        text = doc.read_text()
        new = render_compat_blocks(text, data, doc)
        if new != text:
            doc.write_text(new)
            changed.append(doc)
    return changed


if __name__ == "__main__":
    # `python tools/matrix.py blocks`: rewrite the version blocks of README.md, docs/backends.md and the
    # plugin READMEs from docs/compatibility.json (no matrix records needed), e.g. after adding a block
    if sys.argv[1:] != ["blocks"]:
        sys.exit("usage: python tools/matrix.py blocks")
    for doc in update_compat_blocks(json.loads((REPO / "docs" / "compatibility.json").read_text())):
        print(f"updated {doc.relative_to(REPO)}")
