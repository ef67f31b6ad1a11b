"""What every transfer shares: results, progress reports, each host's capacity."""

from __future__ import annotations

import inspect
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import anyio

from asyncstage.errors import AsyncstageError, InvalidArgument, TransferError

if TYPE_CHECKING:
    from asyncstage.ssh import SSHHost

_log = logging.getLogger("asyncstage.transfer")

DEFAULT_HOST_LIMIT = 4
"""Transfers one host takes part in at once; more wait their turn."""

CLEANUP_TIMEOUT = 30.0
"""Seconds a cleanup on a host may take (it runs shielded from cancellation)."""


@dataclass(frozen=True)
class Progress:
    """How far a transfer is; handed to the progress callback."""

    bytes_done: int
    """Bytes copied so far (rsync: file data processed; dd: bytes of the device read)."""
    total: int | None
    """Bytes in all, when known (rsync knows it once its file list is complete)."""
    rate: float
    """Bytes per second."""
    current: str | None
    """The file being copied (rsync) or the source device (dd)."""
    elapsed: float
    """Seconds since the transfer started."""


ProgressCallback = Callable[[Progress], object]
"""Called with a :class:`Progress`; may be a coroutine function. Keep it quick."""


class RsyncOptions(TypedDict, total=False):
    """Keyword options of every rsync-based method (rsync, put, get, copy)."""

    options: Sequence[str]
    """Extra rsync options, e.g. ``["--exclude", "*~"]``."""
    compress: bool
    """Compress on the wire (``-z``)."""
    delete: bool
    """Mirror: delete files in the destination that the sources lack."""
    progress: ProgressCallback | None


class DdOptions(TypedDict, total=False):
    """Keyword options of every dd method."""

    verify: bool
    """Compare sha256 hash lists of source and destination after the copy (default on)."""
    compress: bool | str
    """``True`` (zstd when present, else gzip), ``"zstd"``, ``"gzip"`` or ``False``."""
    unmount: bool
    """Unmount mounted volumes first instead of refusing them."""
    blocks: Literal["used", "all"]
    """``"used"`` (default): of a cleanly unmounted ext2/3/4 filesystem only the blocks
    it uses (free ones arrive as zeros); ``"all"``: every block, a byte-for-byte image."""
    progress: ProgressCallback | None


@dataclass(frozen=True)
class TransferStats:
    """What a finished transfer did."""

    route: str
    """``local``, ``local->host``, ``host->local``, ``same-host``, ``host->host``,
    ``unmanaged->host``, ``host->unmanaged`` (relayed through this machine),
    ``dd-same-host`` or ``dd-host->host``."""
    elapsed: float
    bytes: int
    """rsync: size of the files transferred; dd: bytes of non-zero blocks copied."""
    files: int = 0
    """rsync: regular files transferred."""
    wire_bytes: int = 0
    """rsync: bytes sent and received; dd: bytes streamed between hosts (before compression)."""
    size: int = 0
    """dd: size of the source device."""
    digest: str | None = None
    """dd: the source's sha256 hash list (sha256 of the sha256s of its 1 MiB blocks),
    equal to the destination's when verified."""


class Reporter:
    """Turns raw progress into :class:`Progress` calls and log records."""

    def __init__(self, callback: ProgressCallback | None, what: str) -> None:
        self.callback = callback
        self.what = what
        self.start = time.monotonic()
        self.current: str | None = None
        self._last_log = 0.0
        self._samples: list[tuple[float, int]] = []

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    async def update(self, done: int, total: int | None, rate: float | None = None) -> None:
        now = time.monotonic()
        if rate is None:
            self._samples = [s for s in self._samples if now - s[0] < 5.0] + [(now, done)]
            t0, d0 = self._samples[0]
            if len(self._samples) == 1:  # no recent sample: the average so far
                t0, d0 = self.start, 0
            rate = (done - d0) / (now - t0) if now > t0 else 0.0
        if now - self._last_log >= 5.0:
            self._last_log = now
            pct = f" of {total}" if total else ""
            _log.info("%s: %d bytes%s, %.0f B/s", self.what, done, pct, rate)
        if self.callback is None:
            return
        result = self.callback(Progress(done, total, rate, self.current, now - self.start))
        if inspect.isawaitable(result):
            await result


# -- capacity per host ---------------------------------------------------------------

_limiters: weakref.WeakKeyDictionary[Any, anyio.CapacityLimiter] = weakref.WeakKeyDictionary()
_limits: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def set_host_limit(host: SSHHost, transfers: int) -> None:
    """How many transfers ``host`` takes part in at once (default :data:`DEFAULT_HOST_LIMIT`)."""
    if transfers < 1:
        raise InvalidArgument(f"a host limit must be at least 1, not {transfers}")
    _limits[host] = transfers
    if host in _limiters:
        _limiters[host].total_tokens = transfers


def host_limiter(host: SSHHost) -> anyio.CapacityLimiter:
    """The :class:`anyio.CapacityLimiter` shared by every transfer involving ``host``."""
    limiter = _limiters.get(host)
    if limiter is None:
        limiter = anyio.CapacityLimiter(_limits.get(host, DEFAULT_HOST_LIMIT))
        _limiters[host] = limiter
    return limiter


@asynccontextmanager
async def hosts_held(*hosts: SSHHost) -> AsyncIterator[None]:
    """Hold a slot of each host's limiter, taken in one global order (no deadlock)."""
    unique = {id(h): h for h in hosts}.values()
    ordered = sorted(unique, key=lambda h: (h.address, h.port, h.username, id(h)))
    async with AsyncExitStack() as stack:
        for host in ordered:
            await stack.enter_async_context(host_limiter(host))
        yield


async def cleanup(
    action: Callable[[], Awaitable[object]],
    what: str,
    label: str,
    in_flight: BaseException | None,
    *,
    required: bool = True,
) -> None:
    """Run ``action`` (a cleanup) shielded from cancellation, within :data:`CLEANUP_TIMEOUT`.

    A failure never replaces the exception or cancellation ``in_flight``: it is
    logged and added to that exception as a note. With nothing in flight a failed
    ``required`` cleanup raises :class:`~asyncstage.errors.TransferError`; others
    are only logged.
    """
    with anyio.CancelScope(shield=True):
        try:
            with anyio.fail_after(CLEANUP_TIMEOUT):
                await action()
        except (AsyncstageError, TimeoutError, OSError) as e:
            _log.error("%s: %s failed: %s", label, what, e)
            if in_flight is not None:
                in_flight.add_note(f"{label}: {what} failed too: {e}")
            elif required:
                raise TransferError(f"{label}: {what} failed: {e}") from e
