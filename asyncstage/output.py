"""Output shared by the command line and the demo: sizes, durations, tables, progress.

Nothing here talks to the cloud; :mod:`asyncstage.cli` and :mod:`asyncstage.demo` both
import it (and neither imports the other).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # rich is imported where it draws: most commands print plain text
    from rich.console import Console
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

    from asyncstage.transfer import Progress

__all__ = [
    "Output",
    "TransferDisplay",
    "TransferTask",
    "human_bytes",
    "human_duration",
    "print_table",
    "table",
]


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


def print_table(
    rows: Sequence[Sequence[object]],
    headers: Sequence[str],
    *,
    console: Console | None = None,
    stream: TextIO | None = None,
) -> None:
    """A table: drawn by rich on ``console`` (a terminal), else :func:`table` text on
    ``stream``."""
    if console is None:
        print(table(rows, headers), file=stream or sys.stdout, flush=True)
        return
    from rich.table import Table

    drawn = Table(*headers, header_style="bold", box=None, pad_edge=False)
    for row in rows:
        drawn.add_row(*("-" if c is None else str(c) for c in row))
    console.print(drawn)


class TransferTask:
    """One row of a :class:`TransferDisplay`: a transfer's bar, or a wait's spinner.

    Calling it with a :class:`~asyncstage.transfer.Progress` updates the bar (it is a
    progress callback); :meth:`phase` shows what it waits for. Safe from any thread.
    """

    def __init__(self, display: TransferDisplay, label: str, task: TaskID | None) -> None:
        self.display = display
        self.label = label
        self._task = task
        self._phase = ""

    def phase(self, text: str, detail: str = "") -> None:
        """A new phase (``starting``, ``snapshot``, ...): the bar becomes a spinner."""
        changed = text != self._phase
        self._phase = text
        shown = f"{self.label} {text}" + (f"  {detail}" if detail else "")
        if self._task is not None and self.display.rich is not None:
            self.display.indeterminate(self._task)
            self.display.rich.update(self._task, description=shown, completed=0, rate="")
        elif changed:
            self.display.plain(shown)

    def __call__(self, p: Progress) -> None:
        if self._task is None or self.display.rich is None:
            return
        self.display.rich.update(
            self._task,
            description=f"{self.label} {self._phase}".rstrip(),
            completed=p.bytes_done,
            total=p.total,
            rate=f"{human_bytes(p.rate)}/s",  # the transfer's own rate, not rich's estimate
        )

    def done(self, text: str) -> None:
        """The end of this row: its last words, bar full."""
        self._phase = text
        if self._task is not None and self.display.rich is not None:
            self.display.rich.update(self._task, description=f"{self.label} {text}", total=1)
            self.display.rich.update(self._task, completed=1)
        else:
            self.display.plain(f"{self.label} {text}")


class TransferDisplay:
    """Live progress: one row per concurrent transfer (bytes, rate, time left) or wait
    (a spinner and its state), drawn by rich on a terminal.

    Off a terminal (``live=False``) nothing is drawn; ``phases`` then prints a line per
    phase change to ``stream`` instead (the demo's log), else stays silent.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        live: bool,
        phases: bool = False,
        transient: bool = False,
    ) -> None:
        self.stream = stream or sys.stderr
        self.phases = phases
        self._lock = threading.Lock()
        self.rich: RichProgress | None = None
        if live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                SpinnerColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.rich = RichProgress(
                SpinnerColumn(finished_text="[green]✓"),
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=transient,
                refresh_per_second=8,
            )

    def indeterminate(self, task: TaskID) -> None:
        """Make a row a spinner again (rich's ``update(total=None)`` keeps the total)."""
        if self.rich is not None:
            for t in self.rich.tasks:
                if t.id == task:
                    t.total = None

    def plain(self, line: str) -> None:
        """A line of the plain log (off a terminal, with ``phases``)."""
        if self.phases:
            with self._lock:
                print(f"  {line}", file=self.stream, flush=True)

    def task(self, label: str) -> TransferTask:
        """A new row."""
        task = None if self.rich is None else self.rich.add_task(label, total=None, rate="")
        return TransferTask(self, label, task)

    def __enter__(self) -> TransferDisplay:
        if self.rich is not None:
            self.rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rich is not None:
            self.rich.stop()


class Output:
    """Where a command's results and messages go: tables or JSON on stdout, notes and
    live progress on stderr.

    Rich drawing (tables, bars, spinners) only when stdout is a terminal and neither
    ``--json`` nor ``-q`` was given; otherwise plain text that scripts can read.
    """

    def __init__(
        self, *, json_output: bool, quiet: bool, verbose: int, fancy: bool | None = None
    ) -> None:
        self.json = json_output
        self.quiet = quiet
        self.verbose = verbose
        if fancy is None:
            fancy = sys.stdout.isatty() and not json_output
        self.fancy = fancy
        self.console: Console | None = None
        if fancy:
            from rich.console import Console

            self.console = Console()
        self.live = fancy and not quiet and sys.stderr.isatty()

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

    def table(
        self, data: Any, rows: Sequence[Sequence[object]], headers: Sequence[str], empty: str
    ) -> None:
        """A list result: JSON, a rich table (a terminal) or aligned text; ``empty`` if none."""
        if self.json or not rows:
            self.result(data, empty)
        else:
            print_table(rows, headers, console=self.console)

    @contextlib.contextmanager
    def transfer(self, what: str) -> Iterator[TransferTask]:
        """A live row for one transfer or wait (a progress callback with phases)."""
        # transient: the command's result line replaces the bar (or the error does)
        with TransferDisplay(live=self.live, transient=True) as display:
            yield display.task(what)

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[Callable[[str], None]]:
        """A spinner while the block waits (a terminal only); the note otherwise.

        Yields a function that changes the spinner's text (the state waited for)."""
        if not self.live:
            self.note(f"{what} ...")
            yield lambda _: None
            return
        from rich.console import Console

        with Console(stderr=True).status(what) as status:
            yield lambda state: status.update(f"{what}: {state}")


def human_duration(seconds: float) -> str:
    """``3725`` → ``1h02m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"
