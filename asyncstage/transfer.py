"""Transfers: rsync and dd between this machine, ssh hosts, servers and volumes.

Two layers:

* The host-level engine (:func:`rsync_endpoints`, :func:`dd_endpoints`) copies
  between resolved endpoints (:mod:`asyncstage.paths`): this machine, an
  :class:`~asyncstage.ssh.SSHHost` (remote side as root unless told otherwise)
  or an unmanaged ``user@host``. It picks the route:

  - local ↔ host: the local ``rsync`` over OpenSSH ``ssh`` with the host's key
    and known_hosts (``StrictHostKeyChecking=yes``), ``sudo rsync`` remotely;
  - same host: ``rsync`` run on that host;
  - host → host: directly between the two, never through this machine. A
    temporary ed25519 key made on the source for this transfer only is
    authorised on the destination restricted to the source's address
    (``from=``, ``restrict``); the destination's pinned host key goes into a
    temporary known_hosts on the source. Both are removed afterwards, also
    after a failure or a cancellation;
  - unmanaged ``user@host`` ↔ host (or another unmanaged host): relayed through
    a private temporary directory on this machine (two rsyncs, the unmanaged
    leg over the user's own ssh set-up, ``RSYNC_RSH`` honoured), removed
    afterwards in every case.

  Paths are rsync arguments, never shell words: ``-s`` (``--secluded-args``)
  sends them through rsync's protocol, remote sources are glob-escaped, and
  everything that crosses to a remote shell is quoted by
  :func:`asyncstage.ssh.command_line`.

  dd copies a block device to another: on one host locally, between two hosts
  streamed directly. Blocks of zeros are not sent and the destination stays
  sparse (ranges that must be zero are punched, or written with zeros only
  where the old contents are not zero); optional compression (zstd, else
  gzip); a sha256 hash list (over 1 MiB blocks, so that blocks of zeros cost a
  compare rather than a hash) of the source and of the destination read back
  (caches dropped) is compared afterwards.

* The manager level (:func:`rsync`, :func:`dd`) resolves path strings, servers
  and volumes through a :class:`~asyncstage.Manager` and calls the engine.

Every transfer holds a slot of each host's :class:`anyio.CapacityLimiter`
(:func:`host_limiter`, :data:`DEFAULT_HOST_LIMIT` at once per host), reports
:class:`Progress` to an optional callback and logs to ``asyncstage.transfer``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import posixpath
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import anyio
from anyio.abc import Process

from asyncstage.errors import (
    AsyncstageError,
    CommandFailed,
    InvalidArgument,
    MissingDependency,
    PathError,
    RsyncError,
    TransferError,
    UnknownVolume,
    VerifyFailed,
    VolumeMounted,
)
from asyncstage.paths import (
    Endpoint,
    HostEndpoint,
    LocalEndpoint,
    LocalSpec,
    PathLike,
    RemotePath,
    UnmanagedEndpoint,
    check_one_host,
    parse_path,
    resolve_paths,
    same_host,
)
from asyncstage.ssh import command_line

if TYPE_CHECKING:
    from asyncstage.ssh import SSHHost

__all__ = [
    "DEFAULT_HOST_LIMIT",
    "Progress",
    "ProgressCallback",
    "TransferStats",
    "dd",
    "dd_endpoints",
    "host_limiter",
    "rsync",
    "rsync_endpoints",
    "server_get",
    "server_put",
    "set_host_limit",
    "volume_copy",
    "volume_get",
    "volume_put",
]

_log = logging.getLogger("asyncstage.transfer")

DEFAULT_HOST_LIMIT = 4
"""Transfers one host takes part in at once; more wait their turn."""

_CLEANUP_TIMEOUT = 30.0
_RSYNC_MARK = "<<asyncstage-file>>"


# -- results and progress -------------------------------------------------------------


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


class _Reporter:
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
async def _hosts_held(*hosts: SSHHost) -> AsyncIterator[None]:
    """Hold a slot of each host's limiter, taken in one global order (no deadlock)."""
    unique = {id(h): h for h in hosts}.values()
    ordered = sorted(unique, key=lambda h: (h.address, h.port, h.username, id(h)))
    async with AsyncExitStack() as stack:
        for host in ordered:
            await stack.enter_async_context(host_limiter(host))
        yield


# -- rsync arguments -------------------------------------------------------------------

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


def _rsync_error(exit_code: int, stderr: str, what: str) -> RsyncError:
    meaning = _RSYNC_EXIT.get(exit_code, "unexplained error")
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    message = f"rsync {what} failed with exit code {exit_code} ({meaning})"
    if lines:
        message += ":\n" + "\n".join(lines[-10:])
    return RsyncError(message, exit_code=exit_code, stderr=stderr)


def _local_arg(path: str) -> str:
    """A path local to the rsync that reads it: ``./`` before what rsync would misread."""
    if path.startswith("/"):
        return path
    if path.startswith("-") or ":" in path.split("/", 1)[0]:
        return "./" + path
    return path


def _glob_escape(path: str) -> str:
    """Escape a remote source for the remote rsync's globbing (it expands ``*?[``)."""
    if not any(c in path for c in "*?["):
        return path  # no glob: taken as is, backslashes included
    return "".join("\\" + c if c in "\\*?[" else c for c in path)


def _host_spec(host: SSHHost) -> str:
    address = f"[{host.address}]" if ":" in host.address else host.address
    return f"{host.username}@{address}"


def _known_hosts_pattern(host: SSHHost) -> str:
    address = host.address
    return address if host.port == 22 else f"[{address}]:{host.port}"


def _rsync_base(
    options: Sequence[str], compress: bool, delete: bool, *, trust_sender: bool = False
) -> list[str]:
    argv = [
        "-a",
        "-s",
        "--info=progress2",
        f"--out-format={_RSYNC_MARK}%n",
        "--stats",
    ]
    if compress:
        argv.append("-z")
    if delete:
        argv.append("--delete")
    if trust_sender:
        argv.append("--trust-sender")
    for opt in options:
        if not isinstance(opt, str):
            raise InvalidArgument(f"rsync options are strings, not {opt!r}")
        argv.append(opt)
    return argv


_PROGRESS_RE = re.compile(
    r"^\s*([\d,]+)\s+(\d+)%\s+([\d.]+)([kMGTP]?B)/s\s+\S+"
    r"(?:\s+\(xfr#(\d+),\s+(ir|to)-chk=(\d+)/(\d+)\))?"
)
_UNITS = {"B": 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "PB": 1 << 50}
_ESCAPE_RE = re.compile(r"\\#([0-7]{3})")


def _unescape(name: str) -> str:
    raw = _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 8)), name)
    return raw.encode("latin-1", "replace").decode("utf-8", "replace") if "\\#" in name else raw


def _number(text: str) -> int:
    return int(text.replace(",", "").replace(".", ""))


class _RsyncOutput:
    """Parses rsync's stdout (``--info=progress2``, ``--out-format``, ``--stats``)."""

    def __init__(self, reporter: _Reporter) -> None:
        self.reporter = reporter
        self.buffer = ""
        self.bytes_done = 0
        self.total: int | None = None
        self.files = 0
        self.file_bytes = 0
        self.wire_bytes = 0

    async def feed(self, data: bytes | str) -> None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        self.buffer += text
        *pieces, self.buffer = re.split(r"[\r\n]", self.buffer)
        for piece in pieces:
            await self._piece(piece)

    async def close(self) -> None:
        if self.buffer:
            await self._piece(self.buffer)
            self.buffer = ""

    async def _piece(self, piece: str) -> None:
        if piece.startswith(_RSYNC_MARK):
            self.reporter.current = _unescape(piece[len(_RSYNC_MARK) :])
            return
        if m := _PROGRESS_RE.match(piece):
            done, pct = _number(m.group(1)), int(m.group(2))
            rate = float(m.group(3)) * _UNITS.get(m.group(4), 1)
            if m.group(6) == "to" and pct > 0:
                self.total = max(done, round(done * 100 / pct))
            elif m.group(6) == "to" and m.group(7) == "0":
                self.total = done
            self.bytes_done = done
            await self.reporter.update(done, self.total, rate)
            return
        stat = piece.strip()
        for prefix, attr in (
            ("Number of regular files transferred:", "files"),
            ("Total transferred file size:", "file_bytes"),
        ):
            if stat.startswith(prefix):
                setattr(self, attr, _number(stat[len(prefix) :].split()[0]))
        if stat.startswith(("Total bytes sent:", "Total bytes received:")):
            self.wire_bytes += _number(stat.split(":", 1)[1].split()[0])


# -- running things --------------------------------------------------------------------


async def _helper(host: SSHHost, sudo: bool, *args: str) -> dict[str, Any]:
    """Run the helper script on ``host`` and return its JSON answer."""
    result = await host.run("python3", "-c", _HELPER, *args, sudo=sudo, timeout=120)
    out = str(result.stdout).strip().splitlines()
    try:
        answer: dict[str, Any] = json.loads(out[-1])
    except (IndexError, ValueError) as e:
        raise TransferError(f"{host.label}: unexpected helper output {result.stdout!r}") from e
    return answer


@asynccontextmanager
async def _workdir(host: SSHHost, sudo: bool) -> AsyncIterator[str]:
    """A private temporary directory on ``host``; processes started in it are stopped at exit."""
    made = await _helper(host, sudo, "workdir")
    path = str(made["dir"])
    try:
        yield path
    finally:
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(_CLEANUP_TIMEOUT):
                    await _helper(host, sudo, "cleanup", path)
            except (AsyncstageError, TimeoutError) as e:
                _log.error("%s: could not clean up %s: %s", host.label, path, e)


async def _stream(
    host: SSHHost,
    sudo: bool,
    workdir: str,
    argv: Sequence[str],
    on_data: Callable[[bytes], Any],
) -> None:
    """Run ``argv`` on ``host`` in a process group recorded in ``workdir`` (so a cleanup
    can stop it), feeding its stdout to ``on_data``; raises CommandFailed."""
    pidfile = f"{workdir}/{secrets.token_hex(4)}.pid"
    async with host.scmd_read(
        "python3", "-c", _HELPER, "run", pidfile, *argv, encoding=None, sudo=sudo
    ) as out:
        while chunk := await out.read(65536):
            await on_data(chunk)


async def _run_local(argv: Sequence[str], on_data: Callable[[bytes], Any]) -> tuple[int, str]:
    """Run a local command in its own process group; stop the group when cancelled."""
    _log.debug("running %s", argv)
    try:
        proc: Process = await anyio.open_process(
            list(argv), stdin=subprocess.DEVNULL, start_new_session=True
        )
    except OSError as e:
        raise MissingDependency(argv[0], argv[0]) from e
    errors: list[bytes] = []

    async def pump_out() -> None:
        assert proc.stdout is not None
        async for chunk in proc.stdout:
            await on_data(chunk)

    async def pump_err() -> None:
        assert proc.stderr is not None
        async for chunk in proc.stderr:
            errors.append(chunk)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump_out)
            tg.start_soon(pump_err)
        code = await proc.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _stop_local(proc)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await proc.aclose()
    return code, b"".join(errors).decode("utf-8", "replace")


async def _stop_local(proc: Process) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with anyio.move_on_after(3.0):
            await proc.wait()


# -- rsync: the engine -----------------------------------------------------------------


async def rsync_endpoints(
    sources: Sequence[Endpoint],
    dest: Endpoint,
    *,
    options: Sequence[str] = (),
    compress: bool = False,
    delete: bool = False,
    progress: ProgressCallback | None = None,
    authorized_keys: str | None = None,
) -> TransferStats:
    """rsync ``sources`` (all on one host) to ``dest`` with ``-a`` semantics.

    ``options`` are more rsync options (a list, e.g. ``["--exclude", "*~"]``),
    ``compress`` adds ``-z``, ``delete`` adds ``--delete`` (a mirror).
    ``authorized_keys`` is the file on the destination host where a host → host
    transfer authorises its temporary key (default: the login user's
    ``~/.ssh/authorized_keys``). An unmanaged ``user@host`` and another remote
    endpoint are copied through a temporary directory here (:func:`_rsync_relay`).
    Raises :class:`~asyncstage.errors.PathError` for sources on several hosts,
    :class:`~asyncstage.errors.RsyncError` when rsync fails.
    """
    sources = list(sources)
    check_one_host(sources)
    src = sources[0]
    what = f"rsync {', '.join(map(str, sources))} -> {dest}"
    reporter = _Reporter(progress, what)
    parser = _RsyncOutput(reporter)
    hosts = [e.host for e in (*sources, dest) if isinstance(e, HostEndpoint)]
    unmanaged = isinstance(src, UnmanagedEndpoint) or isinstance(dest, UnmanagedEndpoint)
    if unmanaged and not isinstance(src, LocalEndpoint) and not isinstance(dest, LocalEndpoint):
        _log.info("%s: relaying through this machine", what)
        return await _rsync_relay(
            sources, dest, options=options, compress=compress, delete=delete, progress=progress
        )
    _log.info("%s: starting", what)
    async with _hosts_held(*hosts):
        if isinstance(src, HostEndpoint) and isinstance(dest, HostEndpoint):
            if same_host(src, dest):
                route = "same-host"
                await _rsync_same_host(sources, dest, parser, options, compress, delete)
            else:
                route = "host->host"
                await _rsync_direct(
                    sources, dest, parser, options, compress, delete, authorized_keys
                )
        else:
            route = _local_route(src, dest)
            await _rsync_local(sources, dest, parser, options, compress, delete)
    await parser.close()
    stats = TransferStats(
        route=route,
        elapsed=reporter.elapsed,
        bytes=parser.file_bytes,
        files=parser.files,
        wire_bytes=parser.wire_bytes,
    )
    _log.info(
        "%s: done (%s, %d files, %d bytes in %.1fs)",
        what,
        route,
        stats.files,
        stats.bytes,
        stats.elapsed,
    )
    return stats


async def _rsync_relay(
    sources: Sequence[Endpoint],
    dest: Endpoint,
    *,
    options: Sequence[str],
    compress: bool,
    delete: bool,
    progress: ProgressCallback | None,
) -> TransferStats:
    """Copy between an unmanaged ``user@host`` and another remote endpoint through a private
    temporary directory here: ``rsync sources... tmp/``, then ``tmp/<name>...`` (or ``tmp/``
    when a source meant its contents) to ``dest``, so that trailing slashes, several sources
    and ``delete`` keep rsync's meaning. ``options`` and ``delete`` apply to the final leg;
    progress counts the bytes of both legs. The directory is removed in every case."""
    start = time.monotonic()
    done = [0, 0]  # bytes each leg has reported

    def leg(i: int) -> ProgressCallback | None:
        if progress is None:
            return None

        async def report(p: Progress) -> None:
            done[i] = p.bytes_done
            total = None if p.total is None else (2 * p.total if i == 0 else done[0] + p.total)
            now = time.monotonic() - start
            result = progress(Progress(sum(done), total, p.rate, p.current, now))
            if inspect.isawaitable(result):
                await result

        return report

    tmp = tempfile.mkdtemp(prefix="asyncstage-relay-")  # mode 0700
    try:
        first = await rsync_endpoints(
            sources, LocalEndpoint(tmp + "/"), compress=compress, progress=leg(0)
        )
        if any(_is_contents(s.path) for s in sources):
            relayed = [LocalEndpoint(tmp + "/")]
        else:
            names = dict.fromkeys(posixpath.basename(s.path) for s in sources)
            relayed = [LocalEndpoint(f"{tmp}/{name}") for name in names]
        second = await rsync_endpoints(
            relayed, dest, options=options, compress=compress, delete=delete, progress=leg(1)
        )
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, tmp, True))
    kind = ["unmanaged" if isinstance(e, UnmanagedEndpoint) else "host" for e in (sources[0], dest)]
    return TransferStats(
        route="->".join(kind),
        elapsed=time.monotonic() - start,
        bytes=second.bytes,
        files=second.files,
        wire_bytes=first.wire_bytes + second.wire_bytes,
    )


def _is_contents(path: str) -> bool:
    """Whether rsync copies the contents of source ``path`` rather than the entry itself."""
    return path == "" or path.endswith("/") or posixpath.basename(path) in (".", "..")


def _local_route(src: Endpoint, dest: Endpoint) -> str:
    if isinstance(src, LocalEndpoint) and isinstance(dest, LocalEndpoint):
        return "local"
    return "host->local" if isinstance(dest, LocalEndpoint) else "local->host"


def _remote_shell(ep: Endpoint) -> list[str]:
    if isinstance(ep, HostEndpoint):
        argv = ["-e", command_line("ssh", *ep.host.openssh_options())]
        if ep.sudo:
            argv.append("--rsync-path=sudo -n rsync")
        return argv
    if isinstance(ep, UnmanagedEndpoint) and not os.environ.get("RSYNC_RSH"):
        return ["-e", "ssh -o BatchMode=yes"]
    return []


def _remote_arg(ep: Endpoint, *, source: bool) -> str:
    if isinstance(ep, LocalEndpoint):
        return _local_arg(ep.path)
    path = _glob_escape(ep.path) if source else ep.path
    if isinstance(ep, HostEndpoint):
        return f"{_host_spec(ep.host)}:{path}"
    address = f"[{ep.address}]" if ":" in ep.address else ep.address
    return f"{ep.username}@{address}:{path}"


def _needs_trust(sources: Sequence[Endpoint]) -> bool:
    # rsync's check of the names a remote sender returns does not understand an
    # escaped backslash: skip it (for our own hosts) only when one was needed.
    return any(
        not isinstance(s, LocalEndpoint) and "\\" in s.path and _glob_escape(s.path) != s.path
        for s in sources
    )


async def _rsync_local(
    sources: Sequence[Endpoint],
    dest: Endpoint,
    parser: _RsyncOutput,
    options: Sequence[str],
    compress: bool,
    delete: bool,
) -> None:
    remote = dest if not isinstance(dest, LocalEndpoint) else sources[0]
    if isinstance(remote, HostEndpoint):
        await remote.host.host_public_key()  # pins the key that OpenSSH then checks strictly
    rsync_bin = shutil.which("rsync")
    if rsync_bin is None:
        raise MissingDependency("rsync", "rsync")
    argv = [
        rsync_bin,
        *_rsync_base(options, compress, delete, trust_sender=_needs_trust(sources)),
        *_remote_shell(remote),
        "--",
        *(_remote_arg(s, source=True) for s in sources),
        _remote_arg(dest, source=False),
    ]
    code, stderr = await _run_local(argv, parser.feed)
    if code != 0:
        raise _rsync_error(code, stderr, f"{', '.join(map(str, sources))} -> {dest}")


async def _rsync_same_host(
    sources: Sequence[Endpoint],
    dest: HostEndpoint,
    parser: _RsyncOutput,
    options: Sequence[str],
    compress: bool,
    delete: bool,
) -> None:
    host = dest.host
    argv = [
        "rsync",
        *_rsync_base(options, False, delete),
        "--",
        *(_local_arg(s.path) for s in sources),
        _local_arg(dest.path),
    ]
    async with _workdir(host, dest.sudo) as wd:
        await _remote_rsync(host, dest.sudo, wd, argv, parser, f"on {host.label}")


async def _remote_rsync(
    host: SSHHost, sudo: bool, wd: str, argv: list[str], parser: _RsyncOutput, what: str
) -> None:
    try:
        await _stream(host, sudo, wd, argv, parser.feed)
    except CommandFailed as e:
        stderr = e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else e.stderr
        code = e.exit_status if e.exit_status is not None else 255
        raise _rsync_error(code, stderr, what) from e


@dataclass(frozen=True)
class _Link:
    """A temporary way for one host to ssh into another (see :func:`_direct_link`)."""

    ssh_argv: list[str]
    """``ssh`` and its options, without the destination."""
    target: str
    """``user@address`` of the destination."""


@asynccontextmanager
async def _direct_link(
    src: SSHHost,
    src_sudo: bool,
    workdir: str,
    dst: SSHHost,
    dst_sudo: bool,
    authorized_keys: str | None,
) -> AsyncIterator[_Link]:
    """Let ``src`` ssh into ``dst`` for one transfer: a temporary key authorised on ``dst``
    only from ``src``'s address, and ``dst``'s pinned host key in a known_hosts on ``src``.
    The key is revoked when the block ends (also on error or cancellation); the files on
    ``src`` live in ``workdir`` and go with it."""
    tag = f"asyncstage-transfer-{secrets.token_hex(8)}"
    pinned = " ".join((await dst.host_public_key()).split()[:2])
    made = await _helper(
        src, src_sudo, "keygen", workdir, tag, f"{_known_hosts_pattern(dst)} {pinned}", src.address
    )
    line = f'from="{src.address}",restrict {made["public"]} {tag}'
    keys_file = authorized_keys or ""
    _log.debug("%s: authorising %s for %s", dst.label, tag, src.label)
    try:
        await _helper(dst, dst_sudo, "authorize", dst.username, keys_file, line)
        argv = [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(made["key"]),
            "-p",
            str(dst.port),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={made['known_hosts']}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "CheckHostIP=no",
            "-o",
            "ConnectTimeout=30",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "LogLevel=ERROR",
        ]
        if made.get("bindable"):
            argv += ["-b", src.address]
        yield _Link(argv, _host_spec(dst))
    finally:
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(_CLEANUP_TIMEOUT):
                    await _helper(dst, dst_sudo, "revoke", dst.username, keys_file, tag)
                _log.debug("%s: revoked %s", dst.label, tag)
            except (AsyncstageError, TimeoutError) as e:
                _log.error("%s: could not revoke the transfer key %s: %s", dst.label, tag, e)
                raise TransferError(
                    f"{dst.label}: could not remove the temporary transfer key {tag} "
                    f"from {keys_file or '~/.ssh/authorized_keys'}: {e}"
                ) from e


async def _rsync_direct(
    sources: Sequence[Endpoint],
    dest: HostEndpoint,
    parser: _RsyncOutput,
    options: Sequence[str],
    compress: bool,
    delete: bool,
    authorized_keys: str | None,
) -> None:
    src = sources[0]
    assert isinstance(src, HostEndpoint)
    async with (
        _workdir(src.host, src.sudo) as wd,
        _direct_link(src.host, src.sudo, wd, dest.host, dest.sudo, authorized_keys) as link,
    ):
        argv = [
            "rsync",
            *_rsync_base(options, compress, delete),
            "-e",
            command_line(*link.ssh_argv),
        ]
        if dest.sudo:
            argv.append("--rsync-path=sudo -n rsync")
        argv += ["--", *(_local_arg(s.path) for s in sources), f"{link.target}:{dest.path}"]
        await _remote_rsync(
            src.host, src.sudo, wd, argv, parser, f"{src.host.label} -> {dest.host.label}"
        )


# -- dd: the engine --------------------------------------------------------------------


async def _dd_info(host: SSHHost, sudo: bool, *args: str) -> dict[str, Any]:
    result = await host.run("python3", "-c", _DD, *args, sudo=sudo, timeout=120)
    answer: dict[str, Any] = json.loads(str(result.stdout).strip().splitlines()[-1])
    return answer


async def _device_size(ep: HostEndpoint) -> int:
    try:
        return int((await _dd_info(ep.host, ep.sudo, "size", ep.path))["size"])
    except CommandFailed as e:
        raise InvalidArgument(f"{ep}: not a readable block device ({e})") from e


async def _compression(method: bool | str, *eps: HostEndpoint) -> str:
    if method is False or method in ("", "none"):
        return "none"
    if method not in (True, "zstd", "gzip"):
        raise InvalidArgument(f"compress must be True, False, 'zstd' or 'gzip', not {method!r}")
    have = [await _dd_info(ep.host, ep.sudo, "which", "zstd", "gzip") for ep in eps]
    if method is True:
        return "zstd" if all(h["zstd"] for h in have) else "gzip"
    for ep, h in zip(eps, have, strict=True):
        if not h[str(method)]:
            raise MissingDependency(f"{method} (on {ep.host.label})", str(method))
    return str(method)


async def dd_endpoints(
    source: HostEndpoint,
    dest: HostEndpoint,
    *,
    verify: bool = True,
    compress: bool | str = False,
    progress: ProgressCallback | None = None,
    authorized_keys: str | None = None,
) -> TransferStats:
    """Copy block device ``source.path`` to ``dest.path`` (each on its host), block by block.

    Blocks of zeros are not sent; the destination's matching ranges are made
    zero without writing where possible (it stays sparse). ``compress``: True
    (zstd when both hosts have it, else gzip), ``"zstd"``, ``"gzip"`` or False.
    ``verify``: the sha256 of the source and of the destination read back must
    match (:class:`~asyncstage.errors.VerifyFailed` otherwise). The destination
    must be at least as large as the source
    (:class:`~asyncstage.errors.InvalidArgument`).
    """
    what = f"dd {source} -> {dest}"
    same = same_host(source, dest)
    if same and source.path == dest.path:
        raise InvalidArgument(f"{what}: source and destination are the same device")
    reporter = _Reporter(progress, what)
    reporter.current = source.path
    async with _hosts_held(source.host, dest.host):
        src_size = await _device_size(source)
        dst_size = await _device_size(dest)
        if dst_size < src_size:
            raise InvalidArgument(
                f"{what}: the destination ({dst_size} bytes) is smaller than the source "
                f"({src_size} bytes)"
            )
        method = "none" if same else await _compression(compress, source, dest)
        _log.info("%s: starting (%d bytes, compression %s)", what, src_size, method)
        result: dict[str, Any] = {}

        async def on_line(line: str) -> None:
            if line.startswith("P "):
                _, done, total = line.split()
                await reporter.update(int(done), int(total))
            elif line.startswith("R "):
                result.update(json.loads(line[2:]))

        feed = _LineFeeder(on_line)
        flag = "1" if verify else "0"
        async with _workdir(source.host, source.sudo) as wd:
            try:
                if same:
                    route = "dd-same-host"
                    argv = ["python3", "-c", _DD, "copy", source.path, dest.path, flag]
                    await _stream(source.host, source.sudo, wd, argv, feed.feed)
                else:
                    route = "dd-host->host"
                    async with _direct_link(
                        source.host, source.sudo, wd, dest.host, dest.sudo, authorized_keys
                    ) as link:
                        recv = ["python3", "-c", _DD, "recv", dest.path, method, flag]
                        if dest.sudo:
                            recv = ["sudo", "-n", "--", *recv]
                        ssh = [*link.ssh_argv, link.target, "--", command_line(*recv)]
                        argv = ["python3", "-c", _DD, "send", source.path, method, json.dumps(ssh)]
                        await _stream(source.host, source.sudo, wd, argv, feed.feed)
            except CommandFailed as e:
                err = (
                    e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else e.stderr
                )
                tail = "\n".join(err.strip().splitlines()[-10:])
                raise TransferError(f"{what} failed: {tail or e}") from e
        await feed.close()
    if "source_sha256" not in result:
        raise TransferError(f"{what}: no result from the copy")
    if verify and result.get("dest_sha256") != result["source_sha256"]:
        raise VerifyFailed(
            f"{what}: the destination's sha256 {result.get('dest_sha256')} differs from the "
            f"source's {result['source_sha256']}",
            source=str(result["source_sha256"]),
            destination=str(result.get("dest_sha256")),
        )
    stats = TransferStats(
        route=route,
        elapsed=reporter.elapsed,
        bytes=int(result.get("data_bytes", 0)),
        wire_bytes=int(result.get("sent_bytes", 0)),
        size=int(result["size"]),
        digest=str(result["source_sha256"]),
    )
    _log.debug("%s: details %s", what, result)
    _log.info(
        "%s: done (%s, %d of %d bytes were data, %.1fs%s)",
        what,
        route,
        stats.bytes,
        stats.size,
        stats.elapsed,
        ", verified" if verify else "",
    )
    return stats


class _LineFeeder:
    def __init__(self, on_line: Callable[[str], Any]) -> None:
        self.on_line = on_line
        self.buffer = b""

    async def feed(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            await self.on_line(line.decode("utf-8", "replace"))

    async def close(self) -> None:
        if self.buffer:
            await self.on_line(self.buffer.decode("utf-8", "replace"))
            self.buffer = b""


# -- the manager level -----------------------------------------------------------------


async def rsync(
    manager: Any,
    *paths: PathLike,
    options: Sequence[str] = (),
    compress: bool = False,
    delete: bool = False,
    progress: ProgressCallback | None = None,
) -> TransferStats:
    """rsync sources to a destination (the last path), any of them local, on a managed
    server, in a managed volume or on an unmanaged ``user@host``.

    Path forms: see :mod:`asyncstage.paths`. Several sources must live on one
    host (:class:`~asyncstage.errors.PathError` before anything is copied). A
    volume that is not mounted is mounted first.
    """
    if len(paths) < 2:
        raise PathError("rsync needs at least one source and a destination")
    endpoints = await resolve_paths(manager, paths)
    *sources, dest = endpoints
    return await rsync_endpoints(
        sources, dest, options=options, compress=compress, delete=delete, progress=progress
    )


async def dd(
    manager: Any,
    source: Any,
    dest: Any,
    *,
    verify: bool = True,
    compress: bool | str = False,
    unmount: bool = False,
    progress: ProgressCallback | None = None,
) -> TransferStats:
    """Block-copy volume ``source`` onto volume ``dest`` (both attached, neither mounted).

    A mounted volume raises :class:`~asyncstage.errors.VolumeMounted`, unless
    ``unmount`` is true: then it is unmounted first (and not mounted again).
    """
    src = _volume(manager, source)
    dst = _volume(manager, dest)
    if src is dst:
        raise InvalidArgument(f"dd: {src} onto itself")
    for vol in (src, dst):
        if vol.mounted:
            if not unmount:
                raise VolumeMounted(
                    f"{vol} is mounted on {vol.server} at {vol.mtpt}: dd needs it unmounted "
                    "(unmount it first, or pass unmount=True)"
                )
            await vol.unmount()
    for vol in (src, dst):
        if vol.server is None or not vol.mtdev:
            raise InvalidArgument(f"{vol} is not attached to a server: dd needs it attached")
    return await dd_endpoints(
        HostEndpoint(src.server.host, src.mtdev, True, str(src)),
        HostEndpoint(dst.server.host, dst.mtdev, True, str(dst)),
        verify=verify,
        compress=compress,
        progress=progress,
    )


def _volume(manager: Any, ref: Any) -> Any:
    if isinstance(ref, str):
        found = None
        with contextlib.suppress(UnknownVolume):
            found = manager.find_volume_by_volid(ref)
        if found is None:
            found = manager.find_volume_by_name(ref)
        if found is None:
            raise UnknownVolume(f"{ref}: no managed volume with that id or name")
        return found
    if not hasattr(ref, "volume_id"):
        raise InvalidArgument(f"dd copies volumes, not {ref!r}")
    return ref


# -- what the Server and Volume methods call ------------------------------------------------


def _on(target: Any, path: PathLike) -> PathLike:
    """A path as Server.put/get and Volume.put/get take it: plain means on ``target``."""
    if isinstance(path, (str, bytes, os.PathLike)) and not isinstance(path, RemotePath):
        spec = parse_path(path)
        if isinstance(spec, LocalSpec):
            return RemotePath(target, spec.path)
    return path


async def server_put(server: Any, *paths: PathLike, **options: Any) -> TransferStats:
    """``server.put(*local_sources, dest)``: a plain ``dest`` is a path on ``server``."""
    if len(paths) < 2:
        raise PathError("put needs at least one source and a destination")
    *sources, dest = paths
    return await rsync(server.manager, *sources, _on(server, dest), **options)


async def server_get(server: Any, *paths: PathLike, **options: Any) -> TransferStats:
    """``server.get(*sources, dest)``: plain sources are paths on ``server``."""
    if len(paths) < 2:
        raise PathError("get needs at least one source and a destination")
    *sources, dest = paths
    return await rsync(server.manager, *(_on(server, s) for s in sources), dest, **options)


async def volume_put(
    volume: Any, *sources: PathLike, dest: str = ".", **options: Any
) -> TransferStats:
    """``volume.put(*sources, dest=".")``: ``dest`` is relative to the volume's root."""
    if not sources:
        raise PathError("put needs at least one source")
    sub = "" if dest in (".", "./", "/") else dest
    return await rsync(volume.manager, *sources, RemotePath(volume, sub), **options)


async def volume_get(volume: Any, *paths: PathLike, **options: Any) -> TransferStats:
    """``volume.get(*sources, dest)``: plain sources are relative to the volume's root."""
    if len(paths) < 2:
        raise PathError("get needs at least one source and a destination")
    *sources, dest = paths
    return await rsync(volume.manager, *(_on(volume, s) for s in sources), dest, **options)


async def volume_copy(volume: Any, dest: PathLike, **options: Any) -> TransferStats:
    """``volume.copy(dest)``: the volume's whole contents to ``dest`` (any path form)."""
    return await rsync(volume.manager, volume, dest, **options)


# -- scripts run on the hosts (python3, standard library only) -------------------------

_HELPER = r"""
import errno
import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def _keys_file(user, path):
    if path:
        return path
    return os.path.join(pwd.getpwnam(user).pw_dir, ".ssh", "authorized_keys")


def _locked(path):
    d = os.path.dirname(path)
    lockfile = os.path.join(d, ".asyncstage-authorized_keys.lock")
    lock = os.open(lockfile, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def workdir():
    print(json.dumps({"dir": tempfile.mkdtemp(prefix="asyncstage-xfer-")}))


def keygen(d, comment, known_hosts_line, bind_address):
    key = os.path.join(d, "id_ed25519")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key],
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )
    kh = os.path.join(d, "known_hosts")
    with open(kh, "w") as f:
        f.write(known_hosts_line + "\n")
    with open(key + ".pub") as f:
        pub = f.read().split()
    bindable = False
    if bind_address:
        try:
            fam = socket.AF_INET6 if ":" in bind_address else socket.AF_INET
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.bind((bind_address, 0))
            bindable = True
        except OSError:
            pass
    answer = {"key": key, "known_hosts": kh, "public": " ".join(pub[:2]), "bindable": bindable}
    print(json.dumps(answer))


def authorize(user, path, line):
    path = _keys_file(user, path)
    pw = pwd.getpwnam(user)
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        os.makedirs(d, 0o700)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    lock = _locked(path)
    try:
        new = not os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            prefix = b""
            if size:
                with open(path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        prefix = b"\n"
            os.write(fd, prefix + line.encode() + b"\n")
            if new:
                os.fchown(fd, pw.pw_uid, pw.pw_gid)
        finally:
            os.close(fd)
    finally:
        os.close(lock)
    print(json.dumps({"file": path}))


def revoke(user, path, tag):
    path = _keys_file(user, path)
    if not os.path.exists(path):
        print(json.dumps({"removed": 0}))
        return
    lock = _locked(path)
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines(True)
        keep = [ln for ln in lines if tag.encode() not in ln]
        removed = len(lines) - len(keep)
        if removed:
            st = os.stat(path)
            tmp = path + ".asyncstage-tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, st.st_mode & 0o7777)
            try:
                os.write(fd, b"".join(keep))
                os.fchown(fd, st.st_uid, st.st_gid)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
    finally:
        os.close(lock)
    print(json.dumps({"removed": removed}))


def _kill_group(pgid):
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        try:
            os.killpg(pgid, sig)
        except OSError as e:
            if e.errno == errno.ESRCH:
                return
            raise
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except OSError:
                return
            time.sleep(0.02)


def cleanup(d):
    killed = []
    if os.path.isdir(d):
        for name in os.listdir(d):
            if name.endswith(".pid"):
                try:
                    with open(os.path.join(d, name)) as f:
                        pgid = int(f.read().strip() or "0")
                except (OSError, ValueError):
                    continue
                if pgid > 1:
                    _kill_group(pgid)
                    killed.append(pgid)
        shutil.rmtree(d, ignore_errors=True)
    print(json.dumps({"killed": killed}))


def run(pidfile, argv):
    # The command runs in a process group of its own whose id is written to
    # pidfile, so that a cleanup can stop it and everything it started.
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.execvp(argv[0], argv)
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(pid))
    os.rename(pidfile + ".tmp", pidfile)

    def forward(signum, frame):
        try:
            os.killpg(pid, signum)
        except OSError:
            pass

    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, forward)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    try:
        os.unlink(pidfile)
    except OSError:
        pass
    if os.WIFSIGNALED(status):
        sys.exit(128 + os.WTERMSIG(status))
    sys.exit(os.WEXITSTATUS(status))


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd == "workdir":
        workdir()
    elif cmd == "keygen":
        keygen(*args)
    elif cmd == "authorize":
        authorize(*args)
    elif cmd == "revoke":
        revoke(*args)
    elif cmd == "cleanup":
        cleanup(*args)
    elif cmd == "run":
        run(args[0], args[1:])
    else:
        sys.exit("unknown helper command " + cmd)


main(sys.argv[1:])
"""

_DD = r"""
import fcntl
import hashlib
import json
import os
import struct
import subprocess
import sys
import time

CHUNK = 1 << 20
READ = 4 << 20
MAGIC = b"ASDD\x01"
SIZE = struct.Struct(">Q")
HDR = struct.Struct(">QI")
END = 0xFFFFFFFFFFFFFFFF
ZERO = bytes(CHUNK)
BLKFLSBUF = 0x1261
COMPRESS = {"zstd": ["zstd", "-q", "-c", "-T0"], "gzip": ["gzip", "-c", "-1"]}
DECOMPRESS = {"zstd": ["zstd", "-q", "-d", "-c"], "gzip": ["gzip", "-d", "-c"]}


def say(*words):
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


class Progress:
    def __init__(self, total):
        self.total = total
        self.last = 0.0

    def __call__(self, done, force=False):
        now = time.monotonic()
        if force or now - self.last >= 0.25:
            self.last = now
            say("P", done, self.total)


def devsize(fd):
    return os.lseek(fd, 0, os.SEEK_END)


def pread_full(fd, n, off):
    parts = []
    while n:
        b = os.pread(fd, n, off)
        if not b:
            raise IOError("unexpected end of device at offset %d" % off)
        parts.append(b)
        n -= len(b)
        off += len(b)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def pwrite_full(fd, data, off):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view = view[n:]
        off += n


def read_exact(f, n):
    parts = []
    while n:
        b = f.read(n)
        if not b:
            raise EOFError("the stream from the source ended early")
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def chunks(fd, size):
    # Read READ bytes at a time (loop and network block devices are much faster
    # with large requests), hand them out in CHUNK-sized blocks.
    off = 0
    while off < size:
        buf = pread_full(fd, min(READ, size - off), off)
        for i in range(0, len(buf), CHUNK):
            yield off + i, buf[i : i + CHUNK]
        off += len(buf)


class Writer:
    # Writes records in offset order; the ranges between them end up zero.

    def __init__(self, fd, size, progress):
        self.fd = fd
        self.size = size
        self.pos = 0
        self.written = 0
        self.zeroed = 0
        self.punched = 0
        self.progress = progress

    def zero_to(self, end):
        # Skipped ranges must read back as zero (a reused destination holds old
        # data). Punching the range does it without writing, and the kernel
        # guarantees zeros (a hole; on a block device a zeroout that may
        # unmap). Where that is not supported, write zeros only where the
        # destination is not zero already, so that a sparse one stays sparse.
        if end > self.pos and punch(self.fd, self.pos, end - self.pos):
            self.punched += end - self.pos
            self.pos = end
            return
        while self.pos < end:
            n = min(CHUNK - self.pos % CHUNK, end - self.pos)
            if pread_full(self.fd, n, self.pos) != ZERO[:n]:
                pwrite_full(self.fd, ZERO[:n], self.pos)
                self.zeroed += n
            self.pos += n
            if self.progress:
                self.progress(self.pos)

    def put(self, off, data):
        if off < self.pos:
            raise ValueError("records out of order")
        self.zero_to(off)
        pwrite_full(self.fd, data, off)
        self.pos = off + len(data)
        self.written += len(data)
        if self.progress:
            self.progress(self.pos)

    def finish(self):
        self.zero_to(self.size)
        os.fsync(self.fd)


_libc = None


def punch(fd, off, n):
    # Zero a range by unmapping it (a hole; on a block device: a zeroout that may unmap).
    global _libc
    try:
        import ctypes
        import ctypes.util

        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
        return _libc.fallocate(fd, 3, ctypes.c_long(off), ctypes.c_long(n)) == 0
    except Exception:
        return False


def drop_cache(fd):
    try:
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    except OSError:
        pass
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass


class Digest:
    # A sha256 hash list: the sha256 of the sha256s of the 1 MiB blocks. Blocks
    # of zeros (most of a sparse volume) cost a compare, not a hash.
    ZERO_BLOCK = hashlib.sha256(ZERO).digest()

    def __init__(self):
        self.h = hashlib.sha256()

    def add(self, data, is_zero):
        if is_zero and len(data) == CHUNK:
            self.h.update(self.ZERO_BLOCK)
        else:
            self.h.update(hashlib.sha256(data).digest())

    def digest(self):
        return self.h.digest()

    def hexdigest(self):
        return self.h.hexdigest()


def sha256_of(fd, size):
    drop_cache(fd)
    h = Digest()
    for _, data in chunks(fd, size):
        h.add(data, data == ZERO[: len(data)])
    return h.hexdigest()


def cmd_size(dev):
    fd = os.open(dev, os.O_RDONLY)
    try:
        print(json.dumps({"size": devsize(fd)}))
    finally:
        os.close(fd)


def cmd_copy(src, dst, verify):
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR)
    size = devsize(sfd)
    if devsize(dfd) < size:
        sys.exit("destination %s is smaller than source %s" % (dst, src))
    progress = Progress(size)
    w = Writer(dfd, size, None)
    h = Digest()
    data_bytes = 0
    for off, data in chunks(sfd, size):
        is_zero = data == ZERO[: len(data)]
        h.add(data, is_zero)
        if not is_zero:
            w.put(off, data)
            data_bytes += len(data)
        progress(off + len(data))
    w.finish()
    progress(size, True)
    result = {"size": size, "source_sha256": h.hexdigest(), "data_bytes": data_bytes,
              "sent_bytes": 0, "zeroed": w.zeroed, "punched": w.punched}
    if verify == "1":
        started = time.monotonic()
        result["dest_sha256"] = sha256_of(dfd, size)
        result["verify_seconds"] = round(time.monotonic() - started, 3)
    say("R", json.dumps(result))


def cmd_send(src, method, ssh_argv_json):
    fd = os.open(src, os.O_RDONLY)
    size = devsize(fd)
    ssh = subprocess.Popen(json.loads(ssh_argv_json), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    comp = None
    if method in COMPRESS:
        comp = subprocess.Popen(COMPRESS[method], stdin=subprocess.PIPE, stdout=ssh.stdin)
        ssh.stdin.close()
        out = comp.stdin
    else:
        out = ssh.stdin
    progress = Progress(size)
    h = Digest()
    data_bytes = 0
    try:
        out.write(MAGIC + SIZE.pack(size))
        for off, data in chunks(fd, size):
            is_zero = data == ZERO[: len(data)]
            h.add(data, is_zero)
            if not is_zero:
                out.write(HDR.pack(off, len(data)))
                out.write(data)
                data_bytes += len(data)
            progress(off + len(data))
        out.write(HDR.pack(END, 0))
        out.write(h.digest())
        out.close()
    except BrokenPipeError:
        pass
    if comp is not None and comp.wait() != 0:
        ssh.kill()
        sys.exit("compressor %s failed" % method)
    reply = ssh.stdout.read()
    rc = ssh.wait()
    if rc != 0:
        sys.exit("the receiving side failed (exit status %d)" % rc)
    remote = json.loads(reply.decode().strip().splitlines()[-1])
    progress(size, True)
    result = {"size": size, "source_sha256": h.hexdigest(), "data_bytes": data_bytes}
    result.update(remote)
    say("R", json.dumps(result))


def cmd_recv(dst, method, verify):
    fd = os.open(dst, os.O_RDWR)
    inp = sys.stdin.buffer
    dec = None
    if method in DECOMPRESS:
        dec = subprocess.Popen(DECOMPRESS[method], stdin=sys.stdin.buffer, stdout=subprocess.PIPE)
        inp = dec.stdout
    if read_exact(inp, len(MAGIC)) != MAGIC:
        sys.exit("not an asyncstage dd stream")
    (size,) = SIZE.unpack(read_exact(inp, SIZE.size))
    if devsize(fd) < size:
        sys.exit("destination %s (%d bytes) is smaller than the source (%d bytes)"
                 % (dst, devsize(fd), size))
    w = Writer(fd, size, None)
    sent = 0
    while True:
        off, n = HDR.unpack(read_exact(inp, HDR.size))
        if off == END:
            digest = read_exact(inp, 32)
            break
        data = read_exact(inp, n)
        sent += n
        w.put(off, data)
    w.finish()
    if dec is not None and dec.wait() != 0:
        sys.exit("decompressor %s failed" % method)
    result = {"sent_bytes": sent, "zeroed": w.zeroed, "punched": w.punched,
              "stream_sha256": digest.hex()}
    if verify == "1":
        started = time.monotonic()
        result["dest_sha256"] = sha256_of(fd, size)
        result["verify_seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result))


def cmd_sha256(dev, size):
    fd = os.open(dev, os.O_RDONLY)
    print(json.dumps({"sha256": sha256_of(fd, int(size))}))


def cmd_which(*names):
    import shutil
    print(json.dumps({n: shutil.which(n) is not None for n in names}))


COMMANDS = {"size": cmd_size, "copy": cmd_copy, "send": cmd_send, "recv": cmd_recv,
            "sha256": cmd_sha256, "which": cmd_which}
COMMANDS[sys.argv[1]](*sys.argv[2:])
"""
