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
