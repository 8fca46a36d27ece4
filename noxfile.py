"""nox sessions: tests, lint, docs (and the backend version matrix, see docs/compatibility.md).

Every session installs torch==2.13.0 (the CPU wheel) first and everything
else under constraints.txt, so no backend release can swap torch for a
multi-GB CUDA build.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
CONSTRAINTS = ("-c", "constraints.txt")


def install_dev(session: nox.Session) -> None:
    session.install("torch==2.13.0")
    session.install(*CONSTRAINTS, "-r", "requirements-dev.txt")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole suite: core, every plugin, the conformance suite on each (what CI runs)."""
    install_dev(session)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check (``nox -s lint -- --fix`` to fix)."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".", *session.posargs)
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Regenerate docs/hooks.md from the hook specs' docstrings."""
    session.install("torch==2.13.0")
    session.install(*CONSTRAINTS, "-e", ".")
    session.run("python", "tools/gen_hook_docs.py")


# -- the backend version matrix (docs/compatibility.md; helpers in tools/matrix.py) -----------------
#
#   nox -s matrix           every session below in 2 streams (QUANTPLUG_MATRIX_JOBS), then
#                           docs/compatibility.{md,json} and the version blocks of the other docs (~40 min)
#   nox -t matrix_run       the same sessions one by one, without the timing and the docs
#   nox -s compatibility    only re-render the docs from the last run's records
#   nox -s matrix_ci        the CI subset: the oldest supported release of each library (~8 min)
#
# Every session is a fresh venv that sees one shared base venv (torch 2.13.0 CPU, quantplug's
# core, pytest, transformers, peft, trl) through a .pth file, and installs only the release under
# test and the plugin (with the dependencies it declares) on top, under a constraints file pinning
# torch: nothing reinstalls torch.

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
import matrix as M  # noqa: E402

MATRIX_TAGS = ["matrix", "matrix_run"]


class _Matrix:
    """What one matrix session shares: its venv, the base, the constraints, the record it writes."""

    def __init__(self, session: nox.Session, kind: str, **record) -> None:
        self.session = session
        self.started = time.perf_counter()
        location = Path(session.virtualenv.location)
        # the interpreter link is the first thing virtualenv writes: from then to now is the venv's creation
        first = location / "bin" / "python"
        self.venv_s = max(0.0, time.time() - os.lstat(first).st_mtime) if os.path.lexists(first) else 0.0
        self.envdir = Path(session.cache_dir).parent
        self.results = M.results_dir(self.envdir)
        self.python = location / "bin" / "python"
        self.base = M.ensure_base(self.envdir, log=session.log)
        M.link_base(self.python, self.base)
        self.constraints = M.constraints_file(self.envdir)
        self.tmp = Path(tempfile.mkdtemp(prefix="matrix-", dir=session.create_tmp()))
        self.install_s = 0.0
        self.tests_s = 0.0
        self.record = {"session": session.name, "kind": kind, "date": M.now(), **record}

    def pip(self, *args: str) -> tuple[int, str]:
        rc, out, elapsed = M.pip(self.python, *args, constraints=self.constraints, log=self.session.log)
        self.install_s += elapsed
        return rc, out

    def plugin(self, backend: str, source: Path | None = None, deps: bool = True) -> None:
        """Install the plugin (editable, or ``source``), with the dependencies it declares: what users get.

        The library release under test is installed first, so the plugin's own requirements
        only add what it declares beside it (quantplug-gptqmodel: requests). ``deps=False``
        for the doctor checks, which install a release outside the range on purpose.
        """
        where = ["-e", str(M.plugin_dir(backend))] if source is None else [str(source)]
        rc, out = self.pip(*([] if deps else ["--no-deps"]), "--no-build-isolation", *where)
        if rc:
            self.finish("error", f"cannot install plugin {backend}: {out[-300:]}")
            self.session.error(f"cannot install plugin {backend}")

    def pytest(self, *targets: str) -> dict:
        junit = self.tmp / "junit.xml"
        started = time.perf_counter()
        self.session.run(
            str(self.python),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            *targets,
            external=True,
            success_codes=[0, 1, 2, 3, 4, 5],
        )
        self.tests_s += time.perf_counter() - started
        return M.junit_counts(junit)

    def doctor(self) -> list[dict]:
        out = subprocess.run(
            [str(self.python), "-m", "quantplug.apps.cli", "doctor", "--json"], capture_output=True, text=True
        )
        self.session.log(f"quantplug doctor --json: exit {out.returncode}")
        if out.returncode:
            raise RuntimeError(f"quantplug doctor raised: {out.stderr[-1500:]}")
        start = out.stdout.find("[")
        return json.loads(out.stdout[start:])

    def finish(self, outcome: str, detail: str = "", **extra) -> None:
        total = time.perf_counter() - self.started + self.venv_s
        self.record.update(
            outcome=outcome,
            detail=detail,
            env=M.python_info(self.python),
            timing={
                "venv_s": round(self.venv_s, 1),
                "install_s": round(self.install_s, 1),
                "tests_s": round(self.tests_s, 1),
                "total_s": round(total, 1),
                "overhead_s": round(total - self.tests_s, 1),
            },
            **extra,
        )
        path = M.write_record(self.results, self.record)
        self.session.log(f"matrix record: {path} ({outcome}{': ' + detail if detail else ''})")


def _backend_session(session: nox.Session, backend: str, version: str) -> None:
    spec = M.BACKENDS[backend]
    # "3.0/setuptools<81": that release with extra requirements beside it (a variant row)
    version, _, with_ = version.partition("/")
    extra = [r for r in with_.split(",") if r]
    declared = M.declared_range(backend, spec.dist)
    range_ = declared["requirement"] or declared["pyproject"]
    inside = M.in_range(version, range_)
    m = _Matrix(
        session,
        "backend" if inside else "explore",
        backend=backend,
        library=spec.dist,
        version=version,
        declared=declared,
        in_declared_range=inside,
        **({"with": extra} if extra else {}),
    )
    if not M.plugin_available(backend):
        m.finish("skipped", f"plugins/{backend} has no pyproject.toml yet")
        session.skip(f"plugins/{backend} is not installable yet")
    rc, out = m.pip(spec.spec(version), *extra)
    if rc:
        detail = M.classify_install_failure(out)
        m.finish("cannot install", detail)
        session.skip(detail)  # a row in the table, not a failure
    if inside:
        m.plugin(backend)
        targets = [str(M.plugin_dir(backend) / t) for t in spec.tests]
    else:
        copy, wide = M.make_explore_copy(backend, spec.dist, range_, version, m.tmp / f"plugin-{backend}")
        m.record["tested_range"] = wide
        m.plugin(backend, source=copy)
        targets = [
            *(str(copy / t) for t in spec.tests),
            "--rootdir",
            str(copy),
            "-o",
            "addopts=-ra",
            "--import-mode=importlib",
        ]
    tests = m.pytest(*targets)
    failed = tests["failed"] + tests["errors"]
    outcome = "error" if tests["passed"] == 0 and failed == 0 else ("pass" if failed == 0 else "fail")
    m.record["installed"] = M.installed(m.python, [spec.dist, "torch", "transformers", "peft"])
    m.finish(outcome, "" if outcome != "error" else "no test ran (collection error?)", tests=tests)
    if outcome != "pass" and inside and not extra:
        session.error(f"{backend} {version}: {failed} failed (inside the declared range {range_})")


def _doctor_session(session: nox.Session, backend: str) -> None:
    """A release below the range is reported "too old" with the fix; without metadata, "broken"; others work."""
    spec = M.BACKENDS[backend]
    witness = M.BACKENDS[spec.witness]
    declared = M.declared_range(backend, spec.dist)
    m = _Matrix(
        session,
        "doctor",
        backend=backend,
        library=spec.dist,
        version=spec.too_old,
        declared=declared,
        witness=witness.name,
    )
    checks = {"too_old": None, "broken": None, "witness": None}
    problems: list[str] = []
    for name in dict.fromkeys((backend, witness.name)):
        m.plugin(name, deps=False)
    rc, out = m.pip(witness.spec(witness.releases[-1]))
    if rc:
        m.finish("error", "cannot install the witness: " + M.classify_install_failure(out), checks=checks)
        session.error("cannot install the witness backend")
    # no extras here: an old release's extras may not resolve (neural-compressor 2.6 [pt])
    rc, out = m.pip(f"{spec.dist}=={spec.too_old}")
    version = spec.too_old
    if rc:
        # the old release does not install here: check "broken" on the oldest in-range release instead
        problems_note = f"{spec.too_old}: {M.classify_install_failure(out)}"
        version = next(
            v for v in spec.releases if M.in_range(v, declared["requirement"] or declared["pyproject"])
        )
        rc, out = m.pip(spec.spec(version))
        if rc:
            m.finish("cannot install", problems_note, checks=checks)
            session.skip(problems_note)
        m.record["detail_install"] = problems_note
    else:
        p = M.check_doctor(m.doctor(), backend, "too old", version, spec.dist)
        checks["too_old"] = not p
        problems += p

    def witness_works() -> bool:
        rows = {r["name"]: r for r in m.doctor()}
        if rows.get(witness.name, {}).get("status") != "ok":
            problems.append(f"witness {witness.name}: {rows.get(witness.name)}")
            return False
        run = subprocess.run(
            [str(m.python), str(M.REPO / "tools" / "matrix_witness.py"), witness.name],
            capture_output=True,
            text=True,
        )
        session.log(run.stdout.strip()[-500:])
        if run.returncode:
            problems.append(f"witness {witness.name} failed: {(run.stdout + run.stderr)[-400:]}")
        return run.returncode == 0

    ok_before = witness_works()
    removed = M.remove_metadata(m.python, spec.dist)
    session.log(f"removed {removed}")
    p = M.check_doctor(m.doctor(), backend, "broken", None, "--force-reinstall")
    checks["broken"] = not p
    problems += p
    checks["witness"] = ok_before and witness_works()
    detail = "; ".join(problems)
    note = m.record.pop("detail_install", None)
    if note:
        detail = (
            detail + "; " if detail else ""
        ) + f"too-old check impossible ({note}); broken checked on {version}"
    m.record["version"] = version if checks["too_old"] is None else spec.too_old
    m.finish("pass" if not problems else "fail", detail, checks=checks)
    if problems:
        session.error("; ".join(problems))


def _interop_session(session: nox.Session, library: str, version: str) -> None:
    m = _Matrix(session, "interop", library=library, version=version)
    tests = [t for t in M.INTEROP_TESTS if (M.REPO / t).is_file()]
    if not tests:
        m.finish("skipped", "no interop test files yet")
        session.skip("no interop tests")
    backend, bnb_version = M.INTEROP_BACKEND
    m.plugin(backend)
    rc, out = m.pip(M.BACKENDS[backend].spec(bnb_version), f"{library}=={version}")
    if rc:
        detail = M.classify_install_failure(out)
        m.finish("cannot install", detail)
        session.skip(detail)
    counts = m.pytest(*[str(M.REPO / t) for t in tests])
    failed = counts["failed"] + counts["errors"]
    outcome = "error" if counts["passed"] == 0 and failed == 0 else ("pass" if failed == 0 else "fail")
    m.record["installed"] = M.installed(m.python, ["transformers", "peft", "bitsandbytes", "torch"])
    m.finish(outcome, "", tests=counts)
    if outcome != "pass":
        session.error(f"{library} {version}: {failed} failed")


def _trainer_session(session: nox.Session, transformers: str, trl: str) -> None:
    m = _Matrix(session, "trainer", library="transformers+trl", version=f"{transformers} / {trl}")
    tests = [t for t in M.TRAINER_TESTS if (M.REPO / t).is_file()]
    if not tests:
        m.finish("skipped", "no Trainer test files yet")
        session.skip("no trainer tests")
    for backend, _ in M.TRAINER_BACKENDS:
        m.plugin(backend, deps=False)
    libs = [M.BACKENDS[b].spec(v) for b, v in M.TRAINER_BACKENDS]
    rc, out = m.pip(*libs, f"transformers=={transformers}", f"trl=={trl}")
    if rc:
        detail = M.classify_install_failure(out)
        m.finish("cannot install", detail)
        session.skip(detail)
    counts = m.pytest(*[str(M.REPO / t) for t in tests])
    failed = counts["failed"] + counts["errors"]
    outcome = "error" if counts["passed"] == 0 and failed == 0 else ("pass" if failed == 0 else "fail")
    m.record["installed"] = M.installed(m.python, ["transformers", "trl", "peft", "datasets", "torch"])
    m.finish(outcome, "", tests=counts)
    if outcome != "pass":
        session.error(f"transformers {transformers} + trl {trl}: {failed} failed")


MATRIX_SESSIONS: list[str] = []  # every matrix session's name, in the order nox lists them


def _define_matrix_sessions() -> None:
    for backend, spec in M.BACKENDS.items():
        MATRIX_SESSIONS.extend(f"matrix_{backend}({v})" for v in spec.versions)

        def run(session: nox.Session, version: str, backend: str = backend) -> None:
            _backend_session(session, backend, version)

        run.__doc__ = f"{spec.dist} releases x the {backend} plugin's tests (conformance suite included)."
        versions = list(spec.versions)
        nox.session(
            name=f"matrix_{backend}", python=PYTHON, reuse_venv=False, tags=MATRIX_TAGS, default=False
        )(nox.parametrize("version", versions, ids=versions)(run))
    doctor_backends = [b for b in M.DOCTOR_BACKENDS if M.BACKENDS[b].too_old]
    MATRIX_SESSIONS.extend(f"matrix_doctor({b})" for b in doctor_backends)

    def run_doctor(session: nox.Session, backend: str) -> None:
        """A too-old release, then a broken install (no metadata): doctor says so, the witness backend still works."""
        _doctor_session(session, backend)

    nox.session(name="matrix_doctor", python=PYTHON, reuse_venv=False, tags=MATRIX_TAGS, default=False)(
        nox.parametrize("backend", doctor_backends, ids=doctor_backends)(run_doctor)
    )
    for library, versions in M.INTEROP.items():
        MATRIX_SESSIONS.extend(f"matrix_{library}({v})" for v in versions)

        def run_interop(session: nox.Session, version: str, library: str = library) -> None:
            _interop_session(session, library, version)

        run_interop.__doc__ = f"{library} releases x {', '.join(M.INTEROP_TESTS)}."
        nox.session(
            name=f"matrix_{library}", python=PYTHON, reuse_venv=False, tags=MATRIX_TAGS, default=False
        )(nox.parametrize("version", list(versions), ids=list(versions))(run_interop))

    def run_trainer(session: nox.Session, pair: tuple[str, str]) -> None:
        """The Trainer/SFTTrainer tests on the oldest and the newest supported (transformers, trl)."""
        _trainer_session(session, *pair)

    ids = [f"{a}-{b}" for a, b in M.TRAINER]
    MATRIX_SESSIONS.extend(f"matrix_trainer({i})" for i in ids)
    nox.session(name="matrix_trainer", python=PYTHON, reuse_venv=False, tags=MATRIX_TAGS, default=False)(
        nox.parametrize("pair", [list(p) for p in M.TRAINER], ids=ids)(run_trainer)
    )


_define_matrix_sessions()


def ci_sessions() -> list[str]:
    """The CI subset: the oldest supported release of every library (CI's own test run has the newest).

    ``.ci/run`` installs the newest releases the constraints allow and runs every plugin's tests on
    them, so the subset adds the other end of each range: the oldest in-range release of each backend,
    the oldest transformers and peft under the interop tests, the oldest (transformers, trl) pair
    under the Trainer tests, and one too-old + broken doctor check.
    """
    names = []
    for backend, spec in M.BACKENDS.items():
        if not M.plugin_available(backend):
            continue
        oldest = M.oldest_inside(backend)
        newest = next((v for v in reversed(spec.releases) if M.in_range(v, _range(backend))), None)
        if oldest is not None and oldest != newest:  # a one-release range: CI's own run covers it
            names.append(f"matrix_{backend}({oldest})")
    names += [f"matrix_{lib}({_oldest_supported(lib, vs)})" for lib, vs in M.INTEROP.items()]
    names.append(f"matrix_trainer({M.TRAINER[0][0]}-{M.TRAINER[0][1]})")
    names.append("matrix_doctor(quanto)")
    return names


def _range(backend: str) -> str | None:
    declared = M.declared_range(backend, M.BACKENDS[backend].dist)
    return declared["requirement"] or declared["pyproject"]


def _oldest_supported(library: str, versions: tuple[str, ...]) -> str:
    """The oldest release of ``library`` the core's extras allow (``peft>=0.18``, ``transformers>=4.56``)."""
    return next(v for v in versions if M.in_range(v, M.core_range(library)))


@nox.session(venv_backend="none", default=False)
def matrix_ci(session: nox.Session) -> None:
    """CI subset of the matrix (:func:`ci_sessions`): the oldest supported releases, one doctor check."""
    envdir = Path(session.cache_dir).parent
    folder = envdir / "matrix-ci-results"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):
        old.unlink()
    names = ci_sessions()
    started = time.time()
    codes = _run_streams(session, envdir, folder, [["-s", *names[i :: _jobs()]] for i in range(_jobs())])
    session.log(
        f"matrix_ci: {len(names)} sessions in {(time.time() - started) / 60:.1f} min, nox exit {codes}"
    )
    for record in sorted(folder.glob("*.json")):
        data = json.loads(record.read_text())
        session.log(f"  {data['session']}: {data['outcome']} in {data.get('timing', {}).get('total_s')} s")
    if max(codes):
        session.error("a CI matrix session failed")


def _jobs() -> int:
    """How many nox processes run matrix sessions side by side (``QUANTPLUG_MATRIX_JOBS``, default 2)."""
    return max(1, int(os.environ.get("QUANTPLUG_MATRIX_JOBS", "2")))


def _run_streams(session: nox.Session, envdir: Path, folder: Path, shards: list[list[str]]) -> list[int]:
    """Run each shard's nox arguments in its own nox process, side by side; their exit codes.

    The shared base venv is built once first; the streams then never rebuild it
    (``QUANTPLUG_MATRIX_BASE_FROZEN``), and each session writes its own record into ``folder``.
    Each stream's output goes to ``<envdir>/matrix-job-N.log``.
    """
    M.ensure_base(envdir, log=session.log)
    nox_cmd = [sys.executable, "-m", "nox", "-f", str(M.REPO / "noxfile.py"), "--envdir", str(envdir)]
    env = {**os.environ, "QUANTPLUG_MATRIX_RESULTS": str(folder), "QUANTPLUG_MATRIX_BASE_FROZEN": "1"}
    procs = []
    for i, args in enumerate(a for a in shards if a[1:] or a[0] != "-s"):
        log = envdir / f"matrix-job-{i}.log"
        session.log(f"$ {' '.join(nox_cmd + args)} > {log}")
        procs.append(
            subprocess.Popen(nox_cmd + args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        )
    return [p.wait() for p in procs]


@nox.session(venv_backend="none", default=False)
def compatibility(session: nox.Session) -> None:
    """Write docs/compatibility.md and docs/compatibility.json from the last matrix run's records."""
    folder = Path(session.posargs[0]) if session.posargs else M.results_dir(Path(session.cache_dir).parent)
    if not any(folder.glob("*.json")):
        session.error(f"no matrix records in {folder}: run `nox -s matrix` first")
    M.write_docs(
        folder, M.REPO / "docs" / "compatibility.md", M.REPO / "docs" / "compatibility.json", blocks=True
    )
    session.log(f"wrote docs/compatibility.md, .json and the version blocks of the other docs from {folder}")


@nox.session(venv_backend="none", default=False)
def matrix(session: nox.Session) -> None:
    """The full backend version matrix, then the docs (``-- -s NAME ...`` style nox args run a subset).

    The sessions run in ``QUANTPLUG_MATRIX_JOBS`` (default 2) nox processes side by side, each a
    share of the list dealt round-robin, its output in ``<envdir>/matrix-job-N.log``: installs and
    mostly single-threaded tests overlap on 2 cores. Every session writes its own record, so the
    streams never meet.
    """
    envdir = Path(session.cache_dir).parent
    folder = M.results_dir(envdir)
    folder.mkdir(parents=True, exist_ok=True)
    if not session.posargs:  # a full run replaces the last one's records
        for old in folder.glob("*.json"):
            old.unlink()
    started, started_at = time.time(), M.now()
    if session.posargs:
        shards = [list(session.posargs)]
    else:
        shards = [["-s", *MATRIX_SESSIONS[i :: _jobs()]] for i in range(_jobs())]
    codes = _run_streams(session, envdir, folder, shards)
    rc = max(codes)
    run = {
        "started": started_at,
        "wall_s": round(time.time() - started, 1),
        "nox_exit": rc,
        "jobs": len(codes),
        "command": "nox -s matrix",
    }
    if not session.posargs:
        (folder / "run.json").write_text(json.dumps(run, indent=2))
    M.write_docs(
        folder, M.REPO / "docs" / "compatibility.md", M.REPO / "docs" / "compatibility.json", blocks=True
    )
    session.log(
        f"matrix: {run['wall_s'] / 60:.1f} min in {len(shards)} streams, nox exit {codes}; wrote docs"
    )
    if rc:
        session.error("some matrix sessions failed (see docs/compatibility.md)")
