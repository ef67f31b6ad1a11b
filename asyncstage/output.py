"""Output shared by the command line and the demo: sizes, durations, tables, progress.

Nothing here talks to the cloud; :mod:`asyncstage.cli` and :mod:`asyncstage.demo` both
import it (and neither imports the other).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

from asyncstage.transfer import Progress

__all__ = ["Output", "ProgressPrinter", "human_bytes", "human_duration", "table"]


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A plain text table, columns aligned (numbers to the right)."""
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    numeric = [
        bool(cells) and all(re.fullmatch(r"[-+]?[\d.,]+( \S+)?", row[i]) for row in cells)
        for i in range(len(headers))
    ]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if numeric[i] else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])


class Output:
    """Where a command's results and messages go: tables or JSON on stdout, notes on stderr."""

    def __init__(self, *, json_output: bool, quiet: bool, verbose: int) -> None:
        self.json = json_output
        self.quiet = quiet
        self.verbose = verbose

    def note(self, message: str) -> None:
        """A message for people (stderr), unless -q."""
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def result(self, data: Any, text: str | None = None) -> None:
        """The command's result: ``data`` as JSON with --json, else ``text`` (if any)."""
        if self.json:
            print(json.dumps(data, indent=2, default=str))
        elif text is not None:
            print(text)

    def progress(self, what: str) -> ProgressPrinter:
        """A progress line on stderr (a terminal only; nothing with -q or --json)."""
        enabled = not self.quiet and not self.json and sys.stderr.isatty()
        return ProgressPrinter(what, enabled=enabled)


class ProgressPrinter:
    """A progress callback that redraws one line on stderr, at most 10 times a second.

    Called from the facade's event loop thread; only prints (never calls the API).
    """

    def __init__(self, what: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.what = what
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._last = 0.0
        self._drawn = False
        self._lock = threading.Lock()

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._last < 0.1:
                return
            self._last = now
            done = human_bytes(p.bytes_done)
            if p.total:
                pct = min(100.0, 100.0 * p.bytes_done / p.total)
                amount = f"{pct:5.1f}% {done} of {human_bytes(p.total)}"
            else:
                amount = done
            current = f"  {p.current}" if p.current else ""
            line = f"{self.what}: {amount}  {human_bytes(p.rate)}/s{current}"
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r" + line[:width].ljust(width))
            self.stream.flush()
            self._drawn = True

    def done(self) -> None:
        """End the line (when one was drawn)."""
        with self._lock:
            if self._drawn:
                self.stream.write("\r" + " " * (shutil.get_terminal_size((100, 20)).columns - 1))
                self.stream.write("\r")
                self.stream.flush()
                self._drawn = False


def human_duration(seconds: float) -> str:
    """``3725`` → ``1h02m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"
