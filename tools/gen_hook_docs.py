"""Render docs/hooks.md, the per-hook reference, from the docstrings in hookspecs.py.

The docstrings are the only place the contract is written; this page is
generated from them (``nox -s docs``) and a test fails when it is stale.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path

from quantplug import hookspecs

HEADER = """# Hook reference

Generated from `core/quantplug/hookspecs.py` by `python tools/gen_hook_docs.py` (or `nox -s docs`);
do not edit by hand. The guide in [plugins.md](plugins.md) shows them at work.

"""


def hooks() -> list:
    return [fn for name, fn in vars(hookspecs).items() if name.startswith("quantplug_") and callable(fn)]


def render() -> str:
    parts = [HEADER]
    lifecycle = inspect.getdoc(hookspecs).split("Lifecycle", 1)[1].split("\n", 1)[1]
    parts.append("## Lifecycle\n\n```\n" + textwrap.dedent(lifecycle).strip("\n") + "\n```\n\n")
    for fn in hooks():
        opts = getattr(fn, "quantplug_spec", {}) or {}
        kind = "firstresult" if opts.get("firstresult") else "collects all results"
        signature = str(inspect.signature(fn)).replace("'", "")
        parts.append(f"## `{fn.__name__}{signature}`\n\n*{kind}*\n\n{inspect.getdoc(fn)}\n\n")
    return "".join(parts).rstrip() + "\n"


def main() -> int:
    target = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"
    target.write_text(render())
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
