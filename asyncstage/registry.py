"""Registry: the servers and volumes one Manager knows, reserved names, lookups. No I/O."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from asyncstage.ec2 import Resource
from asyncstage.errors import NameTaken, UnknownServer, UnknownVolume

if TYPE_CHECKING:
    from asyncstage.server import Server
    from asyncstage.ssh import SSHHost
    from asyncstage.volume import Volume

__all__ = ["Registry"]


class Registry:
    """What a Manager knows: servers by instance id, volumes by volume id, which of them it
    started or created (for ``on_exit``), names reserved by launches under way, and every
    ssh connection made to its servers (closed on exit).

    ``make_volume`` builds the Volume object for an EC2 description (the manager's
    ``volume_class``).
    """

    def __init__(self, make_volume: Callable[[Resource], Volume]) -> None:
        self._make_volume = make_volume
        self._servers: dict[str, Server] = {}
        self._volumes: dict[str, Volume] = {}
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

    def servers(self) -> list[Server]:
        """Every server known (made or adopted)."""
        return list(self._servers.values())

    def server(self, instance_id: str) -> Server | None:
        """The server with this instance id, or None."""
        return self._servers.get(str(instance_id))

    def add_server(self, server: Server) -> Server:
        """Know this server (by its instance id)."""
        self._servers[server.instance_id] = server
        return server

    def record_stop(self, server: Server) -> None:
        """A server was asked to stop: its mounted volumes are mounted again when it starts."""
        server._record_stop()
        for volume in self._volumes_on(server):
            volume._record_unmount(server_stopped=True)

    def forget_server(self, server: Server) -> None:
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

    def _volumes_on(self, server: Server) -> list[Volume]:
        return [v for v in self._volumes.values() if v.server is server]

    def find_server_by_instance(self, instance_id: str) -> Server:
        """The server with this instance id (UnknownServer otherwise)."""
        found = self._servers.get(str(instance_id))
        if found is None:
            raise UnknownServer(f"no managed server {instance_id}")
        return found

    def find_server_by_name(self, name: str) -> Server | None:
        """The server of that name, or None."""
        for server in self._servers.values():
            if server.name == name:
                return server
        return None

    def mark_started(self, servers: Iterable[Server]) -> None:
        """These servers were launched or started here: ``on_exit`` applies to them."""
        self._started.update(s.instance_id for s in servers)

    def started(self) -> list[Server]:
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

    def volumes(self) -> list[Volume]:
        """Every volume known (made or adopted)."""
        return list(self._volumes.values())

    def add_volume(self, desc: Resource, *, created: bool = False) -> Volume:
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

    def adopt_volumes(self, described: Iterable[Resource]) -> dict[Server, list[Volume]]:
        """Know these volumes (EC2 descriptions, found by a scan) and their attachments to
        known servers; the volumes attached to each running server, whose mounts are to read."""
        by_server: dict[Server, list[Volume]] = {}
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

    def forget_volume(self, volume: Volume) -> None:
        """Forget a volume (deleted)."""
        self._volumes.pop(volume.volume_id, None)
        self._created_volumes.discard(volume.volume_id)

    def created_volumes(self) -> list[Volume]:
        """The known volumes this manager created."""
        return [v for vid, v in self._volumes.items() if vid in self._created_volumes]

    def find_volume_by_volid(self, volume_id: str) -> Volume:
        """The volume with this id (UnknownVolume otherwise)."""
        found = self._volumes.get(str(volume_id))
        if found is None:
            raise UnknownVolume(f"no managed volume {volume_id}")
        return found

    def find_volume_by_name(self, name: str) -> Volume | None:
        """The volume of that name, or None."""
        for volume in self._volumes.values():
            if volume.name == name:
                return volume
        return None

    # -- connections ---------------------------------------------------------------------------

    def track_host(self, server: Server, host: SSHHost) -> None:
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
