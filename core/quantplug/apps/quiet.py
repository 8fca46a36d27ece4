"""Third-party output during a command: kept in a log file and summed up in one line; ``-v`` shows it live.

Quantization libraries write a lot at import and on every layer they build
(neural-compressor logs a warning per conversion, gptqmodel prints a banner,
torchao reports optional CUDA libraries it cannot load on a CPU machine,
bitsandbytes reports a kernel hub it was not allowed to use). The messages
known to be harmless are counted by source; any other line is printed after
the summary, so nothing unexpected is hidden.

The capture is at the file-descriptor level (C extensions and loggers that
hold the original streams write there too); the command prints to
:attr:`Capture.console` and :attr:`Capture.errors`, copies of the real
standard output and error.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

# (what, pattern): lines of third-party output known to be harmless on a CPU machine, checked 2026-12
# with neural-compressor 3.10, gptqmodel 7.6.0, torchao 0.18, bitsandbytes 0.50.2, torch 2.13
KNOWN_HARMLESS = (
    ("neural-compressor warnings", r"\[(WARNING|INFO)\]\[[\w.]+:\d+\]"),
    ("gptqmodel's banner", r"GPT-QModel|Transformers\s+:|Torch\s+:|^(INFO|WARN)\s|[┌└│]"),
    ("torchao's optional CUDA libraries", r"^Failed to load .*torchao.*\.so"),
    ("bitsandbytes' kernels-community message", r"kernels-community"),
    ("torch notices", r"torch/utils/_pytree\.py|torch/_dynamo"),
    ("deprecation notices", r"(Deprecation|Future)Warning:"),
    ("progress bars", r"\d+/\d+ \[|\d+%\|"),
)
_PATTERNS = [(what, re.compile(pattern)) for what, pattern in KNOWN_HARMLESS]


@dataclass
class Capture:
    """Where the command prints (``console``, and ``errors`` for standard error), and after the block, what
    the libraries wrote."""

    console: TextIO
    errors: TextIO
    log: Path | None = None
    lines: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """One line naming the log and what was in it, then any line not known to be harmless."""
        if self.log is None or not self.lines:
            return []
        known: Counter[str] = Counter()
        other: list[str] = []
        follows_warning = False
        for line in self.lines:
            what = next((what for what, pattern in _PATTERNS if pattern.search(line)), None)
            if what is None and follows_warning and line.startswith("  "):
                what = "deprecation notices"  # the source line Python prints under a warning
            follows_warning = what == "deprecation notices"
            if what is None:
                other.append(line)
            else:
                known[what] += 1
        parts = ", ".join(f"{what} ({n})" for what, n in known.most_common())
        out = [
            f"  third-party output ({len(self.lines)} lines{': ' + parts if parts else ''}) is in "
            f"{_relative(self.log)}; -v shows it live"
        ]
        if other:
            out.append(f"  {len(other)} of them not known to be harmless:")
            out += [f"    {line[:200]}" for line in dict.fromkeys(other)][:10]
        return out


@contextlib.contextmanager
def captured(log: Path, verbose: bool) -> Iterator[Capture]:
    """Send everything written to standard output and error into ``log`` (unless ``verbose``) while the
    block runs; the block prints to the yielded :attr:`Capture.console`."""
    if verbose:
        yield Capture(sys.stdout, sys.stderr)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    console, errors = _copy(sys.stdout, 1), _copy(sys.stderr, 2)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    capture = Capture(console, errors, log)
    # append mode: Python's writes and the C libraries' writes to fd 1 and 2 all land at the end
    sink = open(log, "a", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115
    saved = os.dup(1), os.dup(2)
    old = sys.stdout, sys.stderr
    try:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        sys.stdout = sys.stderr = sink
        yield capture
    finally:
        with contextlib.suppress(Exception):
            sink.flush()
        sys.stdout, sys.stderr = old
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        sink.close()
        text = log.read_text(encoding="utf-8", errors="replace")
        capture.lines = [line for line in text.split("\n") if line.strip()]
        console.flush()
        errors.flush()


def _copy(stream: TextIO, fd: int) -> TextIO:
    """A stream on a copy of file descriptor ``fd`` (so it survives the redirect) when ``stream`` writes
    there; ``stream`` itself otherwise (a test's capture)."""
    try:
        if stream.fileno() != fd:
            return stream
    except (AttributeError, OSError, ValueError):
        return stream
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return os.fdopen(os.dup(fd), "w", encoding=encoding, errors="replace", buffering=1)


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
