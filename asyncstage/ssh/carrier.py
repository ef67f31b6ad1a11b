"""A jump host carrying the connections to the hosts behind it: the outer of their two
layers of encryption, in this process or in child processes (:mod:`asyncstage._jumphop`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol, get_args, overload

import anyio
import asyncssh

from asyncstage import _jumphop, _openssh_stream, _sshwire, shell
from asyncstage.errors import (
    ConnectError,
    HostKeyMismatch,
    InvalidArgument,
    ServerUnreachable,
    SSHError,
)
from asyncstage.ssh.ciphers import encryption_algs, openssh_preferences

__all__ = ["Carrier", "HopMode", "HopSetting", "hop_failure"]

HopMode = Literal["auto", "openssh", "python", "in-process"]
"""How a jump host carries the connections to the hosts behind it (:attr:`SSHHost.hop`)."""


class HopSetting:
    """:attr:`SSHHost.hop`, checked when set. As a jump host, how the connections to the
    hosts behind it are carried (the outer of their two layers of encryption):

    * ``"openssh"``: each by an OpenSSH ``ssh -W`` client of one master connection (what
      ``ssh -J`` runs) with our key files, no ssh config or agent, and only the host key
      this process verified; the outer layer is encrypted in C beside this process;
    * ``"python"``: all by one Python child process of this host's own (asyncssh, the
      same key, ciphers and host key);
    * ``"in-process"``: as channels of this process's own connection, both layers on its
      one core;
    * ``"auto"`` (the default): ``"openssh"`` where ``ssh`` is on PATH and this host has
      a key file, else ``"in-process"``.

    A jump host reached through a jump host of its own carries them in this process.
    The figures are in benchmarks/results/summary.md."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._attribute = f"_{name}"

    @overload
    def __get__(self, instance: None, owner: type) -> HopSetting: ...
    @overload
    def __get__(self, instance: object, owner: type) -> HopMode: ...
    def __get__(self, instance: object | None, owner: type) -> HopSetting | HopMode:
        if instance is None:
            return self
        mode: HopMode = getattr(instance, self._attribute, "auto")
        return mode

    def __set__(self, instance: object, mode: HopMode) -> None:
        if mode not in get_args(HopMode):
            raise InvalidArgument(f"hop: one of {', '.join(get_args(HopMode))}, not {mode!r}")
        setattr(instance, self._attribute, mode)


class HopTarget(Protocol):
    """What a carrier needs of its jump host (:class:`~asyncstage.ssh.connection.Target`)."""

    address: str
    port: int
    username: str
    label: str
    client_keys: list[Path]
    connect_timeout: float
    keepalive_interval: float

    @property
    def hop(self) -> str: ...

    @property
    def jump(self) -> Any: ...


def hop_failure(e: _jumphop.HopUnavailable, label: str) -> SSHError:
    """The error of a jump hop's child that could not connect to the jump host ``label``."""
    if e.kind == "HostKeyNotVerifiable":
        return HostKeyMismatch(
            f"the hop process was shown another host key: {e.reason}", host=label
        )
    if e.kind == "TimeoutError":
        return ServerUnreachable(f"the hop process had no ssh answer: {e.reason}", host=label)
    return ConnectError(f"the hop process could not connect: {e.reason}", host=label)


class Carrier:
    """The hop of one jump host's connection (:attr:`hop`: started at the first tunnel
    wanted, started again when its mode or the jump host's key changed)."""

    def __init__(self, target: HopTarget) -> None:
        self.target = target
        self.hop: _jumphop.Hop | _jumphop.OpenSSHHop | None = None
        self._lock: anyio.Lock | None = None

    def mode(self) -> str:
        """:attr:`HopTarget.hop`, with ``"auto"`` resolved: OpenSSH's ``ssh`` when it is on
        PATH, the host has a key file of ours and the kernel lets this process take its
        children's sockets (:func:`asyncstage._jumphop.acknowledging`), else in this
        process. A jump host with a jump host of its own carries them in this process."""
        t = self.target
        if t.jump is not None:
            return "in-process"
        if t.hop == "auto":
            usable = t.client_keys and _jumphop.acknowledging() and _openssh_stream.openssh()
            return "openssh" if usable else "in-process"
        return t.hop

    async def tunnel(self, conn: asyncssh.SSHClientConnection, host_key: str) -> Any:
        """asyncssh's ``tunnel`` for a connection to a host behind the jump host, whose
        connection ``conn`` showed ``host_key`` (see :meth:`mode`): OpenSSH's ``ssh -W``
        clients or the Python hop's child, or a channel of ``conn``."""
        mode = self.mode()
        if mode == "in-process":
            _sshwire.acknowledge_at_once(conn)
            return _sshwire.JumpTunnel(conn)
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            hop = self.hop
            if (
                hop is None
                or not hop.alive
                or hop.host_key != host_key
                or isinstance(hop, _jumphop.OpenSSHHop) != (mode == "openssh")
            ):
                self.hop = None
                if hop is not None:
                    await hop.aclose()
                if mode == "openssh":
                    self.hop = hop = self._openssh_hop(host_key)
                else:
                    self.hop = hop = await self._start_hop(host_key)
        if isinstance(hop, _jumphop.OpenSSHHop):
            return _jumphop.OpenSSHTunnel(hop, self.target.connect_timeout)
        return _jumphop.HopTunnel(hop)

    def close_now(self) -> None:
        """Stop the hop's children by their pids."""
        hop, self.hop = self.hop, None
        if hop is not None:
            hop.close_now()

    async def aclose(self) -> None:
        """Stop the hop's children and reap them."""
        hop, self.hop = self.hop, None
        if hop is not None:
            await hop.aclose()

    def _openssh_hop(self, host_key: str) -> _jumphop.OpenSSHHop:
        """The ``ssh -W`` clients' hop: our key files, no agent, only the host key just
        verified, the same key exchange and ciphers as OpenSSH's other children."""
        t = self.target
        ssh = _openssh_stream.openssh()
        if ssh is None:
            raise ConnectError("no OpenSSH ssh on PATH for the jump hop", host=t.label)
        keys = [str(k) for k in t.client_keys]

        def options(known_hosts: str) -> list[str]:
            found = shell.openssh_options(
                port=t.port,
                known_hosts=known_hosts,
                client_keys=keys,
                connect_timeout=t.connect_timeout,
                keepalive_interval=t.keepalive_interval,
                algorithms=openssh_preferences(),
            )
            return [*found, "-o", "IdentityAgent=none"] if keys else found

        try:
            return _jumphop.OpenSSHHop(ssh, options, t.username, t.address, t.port, host_key)
        except OSError as e:
            raise ConnectError(f"cannot set up the jump hop: {e}", host=t.label) from e

    async def _start_hop(self, host_key: str) -> _jumphop.Hop:
        """The Python child holding the outer hop: our key, only the host key just
        verified, the same ciphers and keepalives."""
        t = self.target
        settings = {
            "address": t.address,
            "port": t.port,
            "username": t.username,
            "client_keys": [str(k) for k in t.client_keys],
            "host_keys": [host_key],
            "encryption_algs": encryption_algs(),
            "keepalive_interval": t.keepalive_interval,
            "connect_timeout": t.connect_timeout,
        }
        try:
            return await _jumphop.Hop.start(settings, t.connect_timeout)
        except _jumphop.HopUnavailable as e:
            raise hop_failure(e, t.label) from e
        except TimeoutError as e:
            raise ServerUnreachable(
                f"the hop process had no ssh answer within {t.connect_timeout:g}s", host=t.label
            ) from e
        except OSError as e:
            raise ConnectError(f"cannot start the hop process: {e}", host=t.label) from e
