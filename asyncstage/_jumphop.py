"""The outer hop to a jump host in a child process of its own, carrying every connection
to the hosts behind it.

Through a jump host, each byte is encrypted twice: for the host behind it (the inner
connection) and again for the jump host (the outer one, which carries the inner one as a
``direct-tcpip`` channel's data). In one process both run on its one core. Here the
outer connection runs in a child process (:mod:`asyncstage._hopchild`, the same asyncssh
and cipher policy), one per jump host and :class:`~asyncstage.ssh.connection.Connection`,
started when the first tunnel is wanted: for each tunnel the parent makes a socket pair,
hands one end to the child over the control socket (``SCM_RIGHTS``) with the target's
address and port, and runs its inner asyncssh connection over the other end.

The child is owned by the :class:`Hop` that started it: it exits at the control socket's
EOF (the parent closed it, or died) and at its parent's death (``PR_SET_PDEATHSIG``), and
:meth:`Hop.aclose` kills it by its pid if it lingers, and reaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncssh

from asyncstage._sshwire import GatheringWire

__all__ = ["Hop", "HopTunnel", "HopUnavailable"]

_MESSAGE = 64 * 1024
_EXIT_WAIT = 2.0  # seconds the child has to exit on its own before it is killed
# Each tunnel's socket buffers: with the kernel's default (about 200 KiB) a stream
# through the child cost this process and the child a third more CPU per byte, both
# waking for less data each time (benchmarks/bench_network.py measures them).
_SOCKET_BUFFER = 1 << 20
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class HopUnavailable(Exception):
    """The child could not connect to the jump host: ``reason`` and asyncssh's ``kind``
    of error (``HostKeyNotVerifiable``, ``PermissionDenied``, ``OSError`` ...)."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class Hop:
    """A running child process holding the connection to one jump host."""

    def __init__(self, proc: anyio.abc.Process, control: socket.socket, host_key: str) -> None:
        self._proc = proc
        self._control = control
        self.host_key = host_key
        """The jump host's key the child was told to accept (and nothing else)."""
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._ended = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """The child still runs and its control socket is open."""
        return not self._ended and self._proc.returncode is None

    @classmethod
    async def start(cls, settings: dict[str, Any], timeout: float) -> Hop:
        """Start the child and have it connect with ``settings`` (see :mod:`_hopchild`);
        :class:`HopUnavailable` when it cannot. On any failure or cancellation the child
        is killed and reaped."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p
            )
            argv = [sys.executable, "-P", "-m", "asyncstage._hopchild"]
            proc = await anyio.open_process(
                [*argv, str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,
                env=env,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a terminal's Ctrl-C is the parent's to handle
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        hop = cls(proc, ours, settings["host_keys"][0])
        try:
            with anyio.fail_after(timeout + _EXIT_WAIT):
                ours.send(json.dumps(settings).encode())
                loop = asyncio.get_running_loop()
                answer = json.loads(await loop.sock_recv(ours, _MESSAGE) or b"null")
            if not isinstance(answer, dict):
                raise HopUnavailable("the hop process ended before it connected", "EOF")
            if not answer.get("ready"):
                raise HopUnavailable(str(answer.get("error")), str(answer.get("kind")))
            loop.add_reader(ours, hop._read)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await hop.aclose()
            raise
        return hop

    def _read(self) -> None:
        try:
            data = self._control.recv(_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._end()
            return
        answer = json.loads(data)
        waiting = self._waiting.pop(answer.get("id"), None)
        if waiting is not None and not waiting.done():
            waiting.set_result(answer)

    def _end(self) -> None:
        """The control socket is closed: no more tunnels (those open end with the child)."""
        if self._ended:
            return
        self._ended = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._control)
        self._control.close()
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_result({"code": asyncssh.OPEN_CONNECT_FAILED, "reason": "hop ended"})
        self._waiting.clear()

    async def open(self, host: str, port: int) -> socket.socket:
        """Our end of a new tunnel to ``host:port``; asyncssh's ChannelOpenError when the
        jump host refuses it (or the child is gone)."""
        if not self.alive:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "hop process ended")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            with contextlib.suppress(OSError):  # the kernel caps it at net.core.wmem_max
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        self._next_id += 1
        key = self._next_id
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = answer
        try:
            request = json.dumps({"id": key, "host": host, "port": port}).encode()
            while True:
                try:
                    socket.send_fds(self._control, [request], [theirs.fileno()])
                    break
                except BlockingIOError:
                    await anyio.wait_socket_writable(self._control)
            theirs.close()
            got = await answer
        except BaseException:
            self._waiting.pop(key, None)
            ours.close()
            theirs.close()
            raise
        if not got.get("ok"):
            ours.close()
            code = int(got.get("code") or asyncssh.OPEN_CONNECT_FAILED)
            raise asyncssh.ChannelOpenError(code, str(got.get("reason")))
        ours.setblocking(False)
        return ours

    def close_now(self) -> None:
        """Close the control socket and stop the child (reaped by the event loop)."""
        self._end()
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def aclose(self) -> None:
        """Close the control socket; the child exits at its EOF, or is killed by its pid
        after a short wait; then reaped."""
        self._end()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(_EXIT_WAIT):
                await self._proc.wait()
            if self._proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
            await self._proc.aclose()


class HopTunnel:
    """asyncssh's tunnel for a connection through :class:`Hop` (``tunnel=``)."""

    def __init__(self, hop: Hop) -> None:
        self.hop = hop

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        sock = await self.hop.open(host, port)
        loop = asyncio.get_running_loop()
        try:
            transport, wire = await loop.create_connection(
                lambda: GatheringWire(session_factory()), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        return transport, wire.inner

    def close(self) -> None:
        """Nothing to close: the hop belongs to the jump host's connection."""

    async def wait_closed(self) -> None:
        """Nothing to wait for (see :meth:`close`)."""
