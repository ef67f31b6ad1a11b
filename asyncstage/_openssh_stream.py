"""File <-> remote command streams through an OpenSSH ``ssh`` child: no byte through Python.

:meth:`SSHHost.scmd_to_file <asyncstage.ssh.SSHHost.scmd_to_file>` and
:meth:`~asyncstage.ssh.SSHHost.scmd_from_file` run ``ssh`` with the local file's
descriptor itself as its stdout (or stdin): OpenSSH's C code moves the data between
the file and the socket, as ``ssh host cmd > file`` does, where asyncssh would copy
every packet through this one Python process (0.36-0.48x OpenSSH's throughput,
benchmarks/results/streaming.json). Python only reads the child's stderr (small).

The remote line is the command inside a subshell between two lines of ours (see
:func:`remote_line`): the first prints the remote shell's pid (the process group to
kill on cancellation, as for asyncssh commands), the last the command's exit status.
``ssh`` exits 255 for its own failures and for a command's exit 255 alike; the
status line tells the command's status apart from ssh's failure. The children are
multiplexed over one OpenSSH ``ControlMaster`` per host (:class:`Master`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from anyio.abc import ByteReceiveStream, Process

__all__ = [
    "Master",
    "Outcome",
    "openssh",
    "private_dir",
    "remote_line",
    "run",
    "sweep_dead_masters",
]

_EXIT_MARKER = b"asyncstage-exit:"
_EXIT_LINE = re.compile(rb"asyncstage-exit:(\d+)\n")
_PUMP_BYTES = 65536
_MASTER_EXIT = 2.0  # seconds a terminated master may take to exit before SIGKILL
_MASTER_DIR = "asyncstage-ssh-"  # + the controller's pid + "-" + mkdtemp's letters
_MASTER_DIR_PID = re.compile(re.escape(_MASTER_DIR) + r"(\d+)-")
_swept = False  # this process has removed the dead controllers' master dirs


class _Sink(Protocol):
    """Where a pipe's bytes go (``asyncstage.ssh.sinks.Sink``); the stderr sink finds the pgid."""

    pgid: int | None

    def write(self, data: Any) -> int: ...


def openssh() -> str | None:
    """The ``ssh`` on ``PATH`` (looked up on each call: PATH may change), or None."""
    return shutil.which("ssh")


def remote_line(wrapper: str, command: str) -> str:
    """The remote shell line: ``wrapper`` (prints the pgid), the command in a
    subshell, then its exit status on stderr (:data:`_EXIT_MARKER`)."""
    # The newline before ")" ends a trailing comment or here-document of the command.
    return f"{wrapper}(\n{command}\n)\nprintf '%s%s\\n' '{_EXIT_MARKER.decode()}' \"$?\" >&2\n"


def split_status(stderr: bytes) -> tuple[bytes, int | None]:
    """The command's stderr without our status line, and the status it gave (None: no line).

    The line is the last one of ours; what a background process of the command wrote
    after it stays in the stderr.
    """
    at = stderr.rfind(_EXIT_MARKER)
    found = _EXIT_LINE.match(stderr, at) if at >= 0 else None
    if found is None:
        return stderr, None
    return stderr[:at] + stderr[found.end() :], int(found.group(1))


@dataclass(frozen=True)
class Outcome:
    """How the ``ssh`` child ended: its own exit code and the command's status, if known."""

    returncode: int
    status: int | None  # from the status line; None when the command never reported one
    started: bool  # the remote shell printed its pid: the command may have run
    stderr: bytes  # the command's (and ssh's own) stderr, without our lines


async def _pump(stream: ByteReceiveStream | None, sink: _Sink) -> None:
    if stream is None:
        return
    with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
        while True:
            sink.write(await stream.receive(_PUMP_BYTES))


async def run(
    argv: list[str],
    *,
    stdin: int,
    stdout: int | None,
    out: _Sink,
    err: _Sink,
    err_bytes: Callable[[], bytes],
    stop_remote: Callable[[str], Awaitable[None]],
    grace: float,
) -> Outcome:
    """Run ``ssh`` (``argv``) with these descriptors; ``stdout=None`` pipes it into ``out``.

    On cancellation or error the remote process group is killed (``stop_remote(signal)``:
    TERM, then KILL), then the child (by its pid) if it is still there, and reaped.
    """
    proc = await anyio.open_process(
        argv,
        stdin=stdin,
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pump, proc.stderr, err)
            tg.start_soon(_pump, proc.stdout, out)
            await proc.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _stop(proc, out, err, stop_remote, grace)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await proc.aclose()
    stderr, status = split_status(err_bytes())
    assert proc.returncode is not None
    return Outcome(proc.returncode, status, err.pgid is not None, stderr)


async def _stop(
    proc: Process,
    out: _Sink,
    err: _Sink,
    stop_remote: Callable[[str], Awaitable[None]],
    grace: float,
) -> None:
    """Make sure the remote command and the ``ssh`` child are gone (the child reaped)."""
    async with anyio.create_task_group() as tg:
        # Keep reading: the pgid line may still be on its way, and a full pipe would
        # block the child.
        tg.start_soon(_pump, proc.stderr, err)
        tg.start_soon(_pump, proc.stdout, out)
        with anyio.move_on_after(grace):
            while err.pgid is None and proc.returncode is None:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        if err.pgid is not None:
            for signal in ("TERM", "KILL"):
                if proc.returncode is not None:
                    break
                with anyio.move_on_after(grace):
                    await stop_remote(signal)
                    await proc.wait()  # ssh ends when the command's channel closes
        if proc.returncode is None:
            proc.terminate()
            with anyio.move_on_after(grace):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        tg.cancel_scope.cancel()


def _alive_pid(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: no signal sent, only whether the pid exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep_dead_masters() -> list[str]:
    """Remove the master directories of controllers that died without :meth:`Master.close`
    (SIGKILL, power loss): their masters ended with them (the session reads a pipe of
    theirs) and took the socket along, but not its directory. Once per process; only
    this user's directories, named with a pid that no longer runs. The removed paths."""
    global _swept
    if _swept:
        return []
    _swept = True
    removed = []
    top = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.scandir(top):
            found = _MASTER_DIR_PID.match(entry.name)
            if found is None or _alive_pid(int(found[1])):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False) and entry.stat().st_uid == os.getuid():
                    shutil.rmtree(entry.path)
                    removed.append(entry.path)
    return removed


def private_dir() -> str:
    """A new directory of this process's own (mode 0700) for an ``ssh`` child's files
    (a master's socket, a jump hop's known_hosts), named with this process's pid so that
    :func:`sweep_dead_masters` removes it once this process is gone without removing it."""
    sweep_dead_masters()
    return tempfile.mkdtemp(prefix=f"{_MASTER_DIR}{os.getpid()}-")


class Master:
    """One OpenSSH ``ControlMaster`` per host: the file streams' ``ssh`` children
    multiplex over its connection instead of each opening its own (about 0.2 s of key
    exchange and login each, measured: benchmarks/bench_streaming.py).

    A multiplexed ``ssh`` hands its descriptors to the master, which reads and writes
    them itself: still no byte through Python. The master's own session is
    ``cat > /dev/null`` reading a pipe of ours, so that it ends with this process even
    when :meth:`close` is never reached (:func:`sweep_dead_masters` removes the empty
    directory such a crash leaves). ``key`` names what it connected to (address,
    port, user, keys, known_hosts, host key): a host that changed gets a new master.
    """

    def __init__(self, key: tuple[object, ...], sessions: int) -> None:
        self.key = key
        self.sessions = anyio.Semaphore(max(1, sessions))  # sshd's MaxSessions per connection
        self._lock = anyio.Lock()
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The master's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _path(self) -> str:
        assert self._dir is not None
        return os.path.join(self._dir, "control")

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and os.path.exists(self._path())

    async def options(
        self, argv: Callable[[list[str], str], list[str]], timeout: float
    ) -> list[str]:
        """The ``ssh`` options that multiplex over the master, started if needed; none
        (each ``ssh`` connects on its own) when it cannot start."""
        async with self._lock:
            if not self._alive():
                self.close()
                await self._start(argv, timeout)
            if not self._alive():
                self.close()
                return []
            return ["-o", "ControlMaster=no", "-o", f"ControlPath={self._path()}"]

    async def _start(self, argv: Callable[[list[str], str], list[str]], timeout: float) -> None:
        self._dir = private_dir()
        options = ["-o", "ControlMaster=yes", "-o", f"ControlPath={self._path()}"]
        options += ["-o", "ControlPersist=no"]
        try:
            # A Popen (not anyio's process): close() must stop and reap it synchronously.
            proc = self._proc = subprocess.Popen(  # noqa: ASYNC220
                argv(options, "exec cat > /dev/null"),
                stdin=subprocess.PIPE,  # never written: its EOF (our exit) ends the master
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            return
        with anyio.move_on_after(timeout):
            while proc.poll() is None and not os.path.exists(self._path()):  # noqa: ASYNC110, ASYNC240
                await anyio.sleep(0.005)

    def close(self) -> None:
        """Stop the master by its pid, reap it and remove its socket."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(_MASTER_EXIT)  # ssh exits at once on TERM
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
