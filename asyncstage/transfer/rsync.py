"""rsync between endpoints. The route is picked from the endpoints:

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
everything that crosses to a remote shell is built by :mod:`asyncstage.shell`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from asyncstage import shell
from asyncstage.errors import CommandFailed, InvalidArgument, MissingDependency
from asyncstage.paths import (
    Endpoint,
    HostEndpoint,
    LocalEndpoint,
    UnmanagedEndpoint,
    check_one_host,
    same_host,
)
from asyncstage.transfer.base import (
    Progress,
    ProgressCallback,
    Reporter,
    TransferStats,
    hosts_held,
)
from asyncstage.transfer.link import direct_link
from asyncstage.transfer.rsyncout import RSYNC_MARK, RsyncOutput, rsync_error
from asyncstage.transfer.run import run_local, stream, stream_solo

if TYPE_CHECKING:
    from asyncstage.ssh import SSHHost

__all__ = ["rsync_endpoints"]

_log = logging.getLogger("asyncstage.transfer")


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


def _rsync_base(
    options: Sequence[str], compress: bool, delete: bool, *, trust_sender: bool = False
) -> list[str]:
    argv = [
        "-a",
        "-s",
        "--info=progress2",
        f"--out-format={RSYNC_MARK}%n",
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
    reporter = Reporter(progress, what)
    parser = RsyncOutput(reporter)
    hosts = [e.host for e in (*sources, dest) if isinstance(e, HostEndpoint)]
    unmanaged = isinstance(src, UnmanagedEndpoint) or isinstance(dest, UnmanagedEndpoint)
    if unmanaged and not isinstance(src, LocalEndpoint) and not isinstance(dest, LocalEndpoint):
        _log.info("%s: relaying through this machine", what)
        return await _rsync_relay(
            sources, dest, options=options, compress=compress, delete=delete, progress=progress
        )
    _log.info("%s: starting", what)
    async with hosts_held(*hosts):
        if isinstance(src, HostEndpoint) and isinstance(dest, HostEndpoint):
            if same_host(src, dest):
                route = "same-host"
                await _rsync_same_host(sources, dest, parser, options, delete)
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
        ssh = shell.command_line("ssh", *ep.host.openssh_options())
        return ["-e", ssh, *shell.rsync_path(ep.sudo)]
    if isinstance(ep, UnmanagedEndpoint) and not os.environ.get("RSYNC_RSH"):
        return ["-e", shell.command_line("ssh", *shell.BATCH)]
    return []


def _remote_arg(ep: Endpoint, *, source: bool) -> str:
    if isinstance(ep, LocalEndpoint):
        return _local_arg(ep.path)
    path = _glob_escape(ep.path) if source else ep.path
    if isinstance(ep, HostEndpoint):
        return f"{shell.user_at_host(ep.host.username, ep.host.address)}:{path}"
    return f"{shell.user_at_host(ep.username, ep.address)}:{path}"


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
    parser: RsyncOutput,
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
    code, stderr = await run_local(argv, parser.feed)
    if code != 0:
        raise rsync_error(code, stderr, f"{', '.join(map(str, sources))} -> {dest}")


async def _rsync_same_host(
    sources: Sequence[Endpoint],
    dest: HostEndpoint,
    parser: RsyncOutput,
    options: Sequence[str],
    delete: bool,
) -> None:
    """A copy on one host: nothing crosses a wire, so nothing is compressed."""
    host = dest.host
    argv = [
        "rsync",
        *_rsync_base(options, False, delete),
        "--",
        *(_local_arg(s.path) for s in sources),
        _local_arg(dest.path),
    ]
    await _remote_rsync(host, dest.sudo, None, argv, parser, f"on {host.label}")


async def _remote_rsync(
    host: SSHHost, sudo: bool, wd: str | None, argv: list[str], parser: RsyncOutput, what: str
) -> None:
    """rsync on ``host``: in the work dir ``wd`` (a link's), or in one of its own."""
    try:
        if wd is None:
            await stream_solo(host, sudo, argv, parser.feed)
        else:
            await stream(host, sudo, wd, argv, parser.feed)
    except CommandFailed as e:
        stderr = e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else e.stderr
        code = e.exit_status if e.exit_status is not None else 255
        raise rsync_error(code, stderr, what) from e


async def _rsync_direct(
    sources: Sequence[Endpoint],
    dest: HostEndpoint,
    parser: RsyncOutput,
    options: Sequence[str],
    compress: bool,
    delete: bool,
    authorized_keys: str | None,
) -> None:
    src = sources[0]
    assert isinstance(src, HostEndpoint)
    async with direct_link(src.host, src.sudo, dest.host, dest.sudo, authorized_keys) as link:
        argv = [
            "rsync",
            *_rsync_base(options, compress, delete),
            "-e",
            link.rsync_shell,
            *shell.rsync_path(dest.sudo),
            "--",
            *(_local_arg(s.path) for s in sources),
            f"{link.target}:{dest.path}",
        ]
        await _remote_rsync(
            src.host, src.sudo, link.workdir, argv, parser, f"{src.host.label} -> {dest.host.label}"
        )
