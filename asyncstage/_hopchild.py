"""The jump host's outer hop, run as a child process of the controller (see
:mod:`asyncstage._jumphop`): one asyncssh connection to the bastion, carrying every
tunnel the parent hands over.

The parent passes the control socket (a ``SOCK_SEQPACKET`` pair end) as file descriptor
``argv[1]`` and its own pid as ``argv[2]``. The first message is the bastion's settings
(JSON); the child answers ``{"ready": true}`` once it is connected and authenticated, or
``{"error": ..., "kind": ...}`` and exits. Then each message is a tunnel: one end of a
socket pair (``SCM_RIGHTS``) with ``{"id", "host", "port"}``; the child opens a
``direct-tcpip`` channel to that host and port, answers ``{"id", "ok": true}`` or
``{"id", "code", "reason"}`` (the channel's open failure) and pumps the bytes both ways.

The child exits when the control socket reaches EOF (the parent closed it or died), when
its parent dies (``PR_SET_PDEATHSIG``), or when the bastion's connection is lost: the
parent then starts a new one for the next tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import warnings
from typing import Any

_PR_SET_PDEATHSIG = 1
_MESSAGE = 64 * 1024  # the largest control message (settings, a tunnel request)


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the parent dies; exit now if it already has (reparented)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(0)


def main() -> None:
    control_fd, parent = int(sys.argv[1]), int(sys.argv[2])
    _die_with_parent(parent)
    # The dependencies' deprecation notices would land on the parent's stderr.
    warnings.simplefilter("ignore")
    control = socket.socket(fileno=control_fd)
    control.setblocking(False)
    try:
        asyncio.run(_serve(control))
    finally:
        control.close()


def _send(control: socket.socket, message: dict[str, Any]) -> None:
    """A control message (small: the socket buffer takes it at once)."""
    with contextlib.suppress(OSError):  # the parent is gone: the control socket's EOF ends us
        control.send(json.dumps(message).encode())


async def _serve(control: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    settings = json.loads(await loop.sock_recv(control, _MESSAGE) or b"null")
    if not isinstance(settings, dict):
        return  # closed before the settings came
    import asyncssh

    from asyncstage import _sshwire

    try:
        conn = await _connect(asyncssh, _sshwire, settings)
    except asyncssh.Error as e:
        _send(control, {"error": e.reason, "kind": type(e).__name__})
        return
    except OSError as e:
        _send(control, {"error": str(e), "kind": "OSError", "errno": e.errno})
        return
    except TimeoutError:
        _send(control, {"error": "no ssh answer", "kind": "TimeoutError"})
        return
    _send(control, {"ready": True})
    done = loop.create_future()

    def ended(*_: object) -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(control, _Requests(control, conn, ended).read)
    lost = asyncio.ensure_future(conn.wait_closed())
    lost.add_done_callback(ended)
    try:
        await done
    finally:
        loop.remove_reader(control)
        conn.close()
        lost.cancel()


async def _connect(asyncssh: Any, sshwire: Any, settings: dict[str, Any]) -> Any:
    """The bastion's connection: its host key is the one the parent verified."""
    trusted = [asyncssh.import_public_key(k) for k in settings["host_keys"]]
    options: dict[str, Any] = {}
    if settings["client_keys"]:
        options["client_keys"] = settings["client_keys"]
        options["agent_path"] = None
        options["preferred_auth"] = "publickey"
    async with asyncio.timeout(settings["connect_timeout"]):
        conn = await asyncssh.connect(
            settings["address"],
            settings["port"],
            tunnel=sshwire.DIRECT,
            username=settings["username"],
            known_hosts=(trusted, [], []),
            config=[],
            keepalive_interval=settings["keepalive_interval"],
            keepalive_count_max=3,
            encryption_algs=settings["encryption_algs"],
            login_timeout=settings["connect_timeout"],
            **options,
        )
    sshwire.acknowledge_at_once(conn)  # as the in-process hop's bastion connection does
    return conn


class _Requests:
    """Reads the parent's tunnel requests off the control socket."""

    def __init__(self, control: socket.socket, conn: Any, ended: Any) -> None:
        self._control = control
        self._conn = conn
        self._ended = ended
        self._tasks: set[asyncio.Task[None]] = set()

    def read(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self._control, _MESSAGE, 1)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            self._ended()
            return
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        request = json.loads(data)
        task = asyncio.ensure_future(self._open(request, socket.socket(fileno=fds[0])))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, request: dict[str, Any], sock: socket.socket) -> None:
        import asyncssh

        from asyncstage import _sshwire as sshwire

        sock.setblocking(False)
        channel_side = _ChannelSide()
        try:
            chan, _ = await self._conn.create_connection(
                lambda: channel_side, request["host"], int(request["port"])
            )
        except asyncssh.ChannelOpenError as e:
            sock.close()
            _send(self._control, {"id": request["id"], "code": e.code, "reason": e.reason})
            return
        except (OSError, asyncssh.Error) as e:
            sock.close()
            reason = getattr(e, "reason", None) or str(e)
            code = asyncssh.OPEN_CONNECT_FAILED
            _send(self._control, {"id": request["id"], "code": code, "reason": reason})
            return
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: _SocketSide(chan), sock)
        except OSError as e:
            chan.close()
            sock.close()
            code = asyncssh.OPEN_CONNECT_FAILED
            _send(self._control, {"id": request["id"], "code": code, "reason": str(e)})
            return
        channel_side.attach(transport, sshwire.gathered(transport))
        _send(self._control, {"id": request["id"], "ok": True})


class _SocketSide(asyncio.Protocol):
    """The parent's end of the tunnel: what it writes goes on as the channel's data."""

    def __init__(self, chan: Any) -> None:
        self._chan = chan

    def data_received(self, data: bytes) -> None:
        self._chan.write(data)

    def eof_received(self) -> bool:
        self._chan.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._chan.close()

    def pause_writing(self) -> None:
        self._chan.pause_reading()

    def resume_writing(self) -> None:
        self._chan.resume_reading()


class _ChannelSide:
    """The channel's session: what the server sends goes on to the parent's end (kept
    until that end is attached: the server speaks first)."""

    def __init__(self) -> None:
        self._raw: asyncio.Transport | None = None
        self._transport: asyncio.Transport | None = None
        self._early: list[bytes] = []
        self._eof = False
        self._closed = False
        self._paused = False

    def attach(self, raw: asyncio.BaseTransport, transport: asyncio.Transport) -> None:
        """Send to ``transport`` (``raw``'s writes, gathered); pause ``raw``'s reading."""
        assert isinstance(raw, asyncio.Transport)
        self._raw, self._transport = raw, transport
        for data in self._early:
            transport.write(data)
        self._early.clear()
        if self._paused:
            raw.pause_reading()
        if self._eof:
            transport.write_eof()
        if self._closed:
            transport.close()

    def connection_made(self, chan: Any) -> None:
        pass

    def session_started(self) -> None:
        pass

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self._transport is None:
            self._early.append(data)
        else:
            self._transport.write(data)

    def eof_received(self) -> bool:
        self._eof = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def pause_writing(self) -> None:
        self._paused = True
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._raw is not None:
            self._raw.resume_reading()


if __name__ == "__main__":
    main()
