"""A guard that refuses every connection outside the loopback range.

Installed for the whole test session by ``conftest.py``: any attempt to
connect (or send a datagram) to an address outside 127.0.0.0/8 and ::1 raises
:class:`NonLoopbackConnection`, and the attempt is recorded so that the test
fails even when the code under test swallows the exception.

The one exception: the public range of a local cloud running in this process (its
addresses live only in the namespaces it made, behind its router), which the cloud
registers while it runs (``asyncstage.localcloud._network.RUNNING_RANGES``); the rest of
198.18.0.0/15, a range of a cloud that stopped, and every other address stay refused.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

violations: list[str] = []

_orig_connect = socket.socket.connect
_orig_connect_ex = socket.socket.connect_ex
_orig_sendto = socket.socket.sendto


class NonLoopbackConnection(RuntimeError):
    """A test tried to reach an address outside 127.0.0.0/8, ::1 and a running cloud's
    public range."""


def _allowed(sock: socket.socket, address: Any) -> bool:
    if sock.family == socket.AF_UNIX:
        return True
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return True  # netlink and friends never leave the machine
    host = address[0] if isinstance(address, tuple) else address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # an unresolved name: refuse, tests use addresses
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return True
    from asyncstage.localcloud._network import RUNNING_RANGES

    return any(ip in network for network in list(RUNNING_RANGES))


def _check(sock: socket.socket, address: Any) -> None:
    if not _allowed(sock, address):
        violations.append(repr(address))
        raise NonLoopbackConnection(f"test tried to connect to non-loopback {address!r}")


def _connect(self: socket.socket, address: Any) -> None:
    _check(self, address)
    return _orig_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    _check(self, address)
    return _orig_connect_ex(self, address)


def _sendto(self: socket.socket, *args: Any) -> int:
    _check(self, args[-1])
    return _orig_sendto(self, *args)  # type: ignore[no-any-return]


def install() -> None:
    socket.socket.connect = _connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = _sendto  # type: ignore[method-assign,assignment]
