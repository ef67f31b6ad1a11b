"""Registry: the servers and volumes one Manager knows, reserved names, lookups. No I/O."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar

from asyncstage.ec2 import Resource
from asyncstage.errors import NameTaken, UnknownServer, UnknownVolume
from asyncstage.refs import ServerRef, VolumeRef
from asyncstage.ssh import SSHHost

__all__ = ["Registry"]


class Registry:
    """What a Manager knows: servers by instance id, volumes by volume id, which of them it
    started or created (for ``on_exit``), names reserved by launches under way, and every
    ssh connection made to its servers (closed on exit).

    ``make_volume`` builds the Volume object for an EC2 description (the manager's
    ``volume_class``).
    """

    def __init__(self, make_volume: Callable[[Resource], VolumeRef]) -> None:
        self._make_volume = make_volume
        self._servers: dict[str, ServerRef] = {}
        self._volumes: dict[str, VolumeRef] = {}
        self._started: set[str] = set()
        self._created_volumes: set[str] = set()
        self._reserved_names: set[str] = set()
        self._hosts: dict[str, SSHHost] = {}  # each server's current connection
        self._retired_hosts: list[SSHHost] = []  # connections to addresses gone
        self.jump_hosts: dict[str, SSHHost] = {}
        """The unmanaged jump hosts (``"user@host[:port]"``) servers were reached through."""

    def __repr__(self) -> str:
        return f"{len(self._servers)} servers {len(self._volumes)} volumes"

    # -- servers -----------------------------------------------------------------------------

    def servers(self) -> list[ServerRef]:
        """Every server known (made or adopted)."""
        return list(self._servers.values())

    def server(self, instance_id: str) -> ServerRef | None:
        """The server with this instance id, or None."""
        return self._servers.get(str(instance_id))

    def add_server(self, server: ServerRef) -> ServerRef:
        """Know this server (by its instance id)."""
        self._servers[server.instance_id] = server
        return server

    def record_stop(self, server: ServerRef) -> None:
        """A server was asked to stop: its mounted volumes are mounted again when it starts."""
        server._record_stop()
        for volume in self._volumes_on(server):
            volume._record_unmount(server_stopped=True)

    def forget_server(self, server: ServerRef) -> None:
        """Forget a server (terminated): its volumes are detached from it."""
        attached = self._volumes_on(server)
        server._record_termination()
        for volume in attached:
            volume._record_detach()
        self._servers.pop(server.instance_id, None)
        self._started.discard(server.instance_id)
        host = self._hosts.pop(server.instance_id, None)
        if host is not None:
            self._retired_hosts.append(host)

    def _volumes_on(self, server: ServerRef) -> list[VolumeRef]:
        return [v for v in self._volumes.values() if v.server is server]

    def find_server_by_instance(self, instance_id: str) -> ServerRef:
        """The server with this instance id (UnknownServer otherwise)."""
        return _by_id(self._servers, instance_id, UnknownServer(f"no managed server {instance_id}"))

    def find_server_by_name(self, name: str) -> ServerRef | None:
        """The server of that name, or None."""
        return _named(self._servers.values(), name)

    def mark_started(self, servers: Iterable[ServerRef]) -> None:
        """These servers were launched or started here: ``on_exit`` applies to them."""
        self._started.update(s.instance_id for s in servers)

    def started(self) -> list[ServerRef]:
        """The known servers this manager launched or started."""
        return [s for s in self._servers.values() if s.instance_id in self._started]

    # -- names -------------------------------------------------------------------------------

    def reserve(self, names: Iterable[str]) -> list[str]:
        """Reserve server names for a launch (NameTaken when one is in use or reserved)."""
        names = list(names)
        if len(set(names)) != len(names):
            raise NameTaken(f"duplicate server names in {names}")
        for name in names:
            if name in self._reserved_names or self.find_server_by_name(name) is not None:
                raise NameTaken(f"a server named {name!r} exists already")
        self._reserved_names.update(names)
        return names

    def release(self, names: Iterable[str]) -> None:
        """Release reserved names (the launch registered its servers, or failed)."""
        self._reserved_names.difference_update(names)

    @staticmethod
    def new_server_name() -> str:
        """A fresh name: ``server-xxxxxxxx``."""
        return f"server-{secrets.token_hex(4)}"

    @staticmethod
    def new_volume_name() -> str:
        """A fresh name: ``volume-xxxxxxxx``."""
        return f"volume-{secrets.token_hex(4)}"

    # -- volumes -----------------------------------------------------------------------------

    def volumes(self) -> list[VolumeRef]:
        """Every volume known (made or adopted)."""
        return list(self._volumes.values())

    def add_volume(self, desc: Resource, *, created: bool = False) -> VolumeRef:
        """The Volume for this EC2 description (known already: its description refreshed).

        ``created``: made by this manager (``on_exit="terminate"`` deletes it).
        """
        vid = str(desc["VolumeId"])
        volume = self._volumes.get(vid)
        if volume is None:
            volume = self._volumes[vid] = self._make_volume(desc)
        else:
            volume._record_description(desc)
        if created:
            self._created_volumes.add(vid)
        return volume

    def adopt_volumes(self, described: Iterable[Resource]) -> dict[ServerRef, list[VolumeRef]]:
        """Know these volumes (EC2 descriptions, found by a scan) and their attachments to
        known servers; the volumes attached to each running server, whose mounts are to read."""
        by_server: dict[ServerRef, list[VolumeRef]] = {}
        for desc in described:
            if desc.get("State") not in ("available", "in-use", "creating"):
                continue
            volume = self.add_volume(desc)
            atts = [a for a in desc.get("Attachments", []) if a.get("State") == "attached"]
            server = self._servers.get(str(atts[0]["InstanceId"])) if atts else None
            if server is None:
                volume._record_detach()
                continue
            volume._record_attach(server, str(atts[0]["Device"]), volume.mtdev)
            if server.state == "running":
                by_server.setdefault(server, []).append(volume)
        return by_server

    def forget_volume(self, volume: VolumeRef) -> None:
        """Forget a volume (deleted)."""
        self._volumes.pop(volume.volume_id, None)
        self._created_volumes.discard(volume.volume_id)

    def created_volumes(self) -> list[VolumeRef]:
        """The known volumes this manager created."""
        return [v for vid, v in self._volumes.items() if vid in self._created_volumes]

    def find_volume_by_volid(self, volume_id: str) -> VolumeRef:
        """The volume with this id (UnknownVolume otherwise)."""
        return _by_id(self._volumes, volume_id, UnknownVolume(f"no managed volume {volume_id}"))

    def find_volume_by_name(self, name: str) -> VolumeRef | None:
        """The volume of that name, or None."""
        return _named(self._volumes.values(), name)

    # -- connections ---------------------------------------------------------------------------

    def track_host(self, server: ServerRef, host: SSHHost) -> None:
        """Remember the ssh connection a server now uses (its previous one retires), to
        close them on exit."""
        old = self._hosts.get(server.instance_id)
        if old is not None and old is not host:
            self._retired_hosts.append(old)
        self._hosts[server.instance_id] = host

    def hosts_to_close(self) -> list[SSHHost]:
        """The connections to close on exit: the servers' current ones (kept: a later
        command reconnects), the retired ones (forgotten) and the unmanaged jump hosts."""
        retired, self._retired_hosts = self._retired_hosts, []
        return [*self._hosts.values(), *retired, *self.jump_hosts.values()]


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_T = TypeVar("_T", bound=_Named)


def _named(known: Iterable[_T], name: str) -> _T | None:
    """The first of ``known`` with that name, or None."""
    return next((item for item in known if item.name == name), None)


def _by_id(known: Mapping[str, _T], key: str, missing: Exception) -> _T:
    """``known[key]``; ``missing`` raised when there is none."""
    found = known.get(str(key))
    if found is None:
        raise missing
    return found
