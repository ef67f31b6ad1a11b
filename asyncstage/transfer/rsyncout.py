"""rsync's output and exit codes: progress, the files copied, ``--stats``, errors.

Pure parsing, no I/O: :class:`RsyncOutput` reads what rsync prints with
``--info=progress2``, ``--out-format=<<asyncstage-file>>%n`` and ``--stats``.
"""

from __future__ import annotations

import codecs
import re

from asyncstage.errors import RsyncError
from asyncstage.transfer.base import Reporter

__all__ = ["RSYNC_MARK", "RsyncOutput", "rsync_error", "unescape"]

RSYNC_MARK = "<<asyncstage-file>>"
"""What ``--out-format`` prints before the name of each file copied."""

_RSYNC_EXIT = {
    1: "syntax or usage error",
    2: "protocol incompatibility",
    3: "errors selecting input/output files, dirs",
    4: "requested action not supported",
    5: "error starting client-server protocol",
    6: "daemon unable to append to log-file",
    10: "error in socket I/O",
    11: "error in file I/O",
    12: "error in rsync protocol data stream",
    13: "errors with program diagnostics",
    14: "error in IPC code",
    15: "sibling process crashed",
    16: "sibling process was killed by a signal",
    19: "received SIGUSR1",
    20: "received SIGINT, SIGTERM, or SIGHUP",
    21: "some error returned by waitpid()",
    22: "error allocating core memory buffers",
    23: "partial transfer due to error",
    24: "partial transfer due to vanished source files",
    25: "the --max-delete limit stopped deletions",
    30: "timeout in data send/receive",
    35: "timeout waiting for daemon connection",
    255: "the remote shell (ssh) failed",
}


def rsync_error(exit_code: int, stderr: str, what: str) -> RsyncError:
    meaning = _RSYNC_EXIT.get(exit_code, "unexplained error")
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    message = f"rsync {what} failed with exit code {exit_code} ({meaning})"
    if lines:
        message += ":\n" + "\n".join(lines[-10:])
    return RsyncError(message, exit_code=exit_code, stderr=stderr)


_PROGRESS_RE = re.compile(
    r"^\s*([\d,]+)\s+(\d+)%\s+([\d.]+)([kMGTP]?B)/s\s+\S+"
    r"(?:\s+\(xfr#(\d+),\s+(ir|to)-chk=(\d+)/(\d+)\))?"
)
_UNITS = {"B": 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "PB": 1 << 50}
_ESCAPE_RE = re.compile(r"\\#([0-7]{3})")


def unescape(name: str) -> str:
    raw = _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 8)), name)
    return raw.encode("latin-1", "replace").decode("utf-8", "replace") if "\\#" in name else raw


def _number(text: str) -> int:
    return int(text.replace(",", "").replace(".", ""))


class RsyncOutput:
    """Parses rsync's stdout (``--info=progress2``, ``--out-format``, ``--stats``)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.buffer = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.bytes_done = 0
        self.total: int | None = None
        self.files = 0
        self.file_bytes = 0
        self.wire_bytes = 0

    async def feed(self, data: bytes | str) -> None:
        # incremental: a character split between two reads is decoded whole
        text = self._decoder.decode(data) if isinstance(data, bytes) else data
        self.buffer += text
        *pieces, self.buffer = re.split(r"[\r\n]", self.buffer)
        await self._pieces(pieces)

    async def close(self) -> None:
        if self.buffer:
            await self._pieces([self.buffer])
            self.buffer = ""

    async def _pieces(self, pieces: list[str]) -> None:
        """Read a batch of rsync's lines. Its progress is reported once, from its latest
        line, with the file current then: rsync prints a line or two per file, and a
        report per line cost the controller more than reading them."""
        latest: re.Match[str] | None = None
        # the latest file name, and the one current at the latest progress (as printed)
        mark: str | None = None
        at_latest: str | None = None
        for piece in pieces:
            if piece.startswith(RSYNC_MARK):
                mark = piece
            elif m := _PROGRESS_RE.match(piece):
                latest, at_latest = m, mark
            else:
                self._stat(piece.strip())
        if latest is not None:
            if at_latest is not None:
                self.reporter.current = unescape(at_latest[len(RSYNC_MARK) :])
            await self._progress(latest)
        if mark is not None:
            self.reporter.current = unescape(mark[len(RSYNC_MARK) :])

    async def _progress(self, m: re.Match[str]) -> None:
        done, pct = _number(m.group(1)), int(m.group(2))
        rate = float(m.group(3)) * _UNITS.get(m.group(4), 1)
        if m.group(6) == "to" and pct > 0:
            self.total = max(done, round(done * 100 / pct))
        elif m.group(6) == "to" and m.group(7) == "0":
            self.total = done
        self.bytes_done = done
        await self.reporter.update(done, self.total, rate)

    def _stat(self, stat: str) -> None:
        for prefix, attr in (
            ("Number of regular files transferred:", "files"),
            ("Total transferred file size:", "file_bytes"),
        ):
            if stat.startswith(prefix):
                setattr(self, attr, _number(stat[len(prefix) :].split()[0]))
        if stat.startswith(("Total bytes sent:", "Total bytes received:")):
            self.wire_bytes += _number(stat.split(":", 1)[1].split()[0])
