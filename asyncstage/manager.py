"""Manager: one region's staging servers and volumes, their fleets and their lifetime."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Unpack

import anyio

from asyncstage import keys, transfer
from asyncstage.ec2 import EC2, Resource, RetryMode, tag, tag_filters, tags_of
from asyncstage.errors import (
    AsyncstageError,
    EC2Error,
    FleetError,
    InvalidArgument,
    NameTaken,
    UnknownServer,
    UnknownSnapshot,
    UnknownVolume,
)
from asyncstage.paths import PathLike
from asyncstage.server import Server, check_mount_point
from asyncstage.ssh import KnownHosts, SSHHost
from asyncstage.transfer import DdOptions, RsyncOptions, TransferStats
from asyncstage.volume import Volume


class _CloudLike(Protocol):
    """What local_manager needs of a LocalCloud."""

    @property
    def endpoint_url(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def image_id(self) -> str: ...
    @property
    def default_username(self) -> str: ...

    def session_kwargs(self) -> dict[str, str]: ...


__all__ = ["Manager", "OnExit", "local_manager"]

log = logging.getLogger("asyncstage")

OnExit = Literal["stop", "terminate", "run"]

UBUNTU_OWNER = "099720109477"  # Canonical
UBUNTU_PATTERN = "ubuntu/images/hvm-ssd*/ubuntu-*-24.04-*-server-*"
_LIVE_STATES = ["pending", "running", "stopping", "stopped"]


def _user_for_image(image: Resource) -> str:
    """The login user an image's name suggests (``ubuntu``, ``admin``, ``ec2-user`` ...)."""
    user = tags_of(image).get(tag("user"))
    if user:
        return user
    name = f"{image.get('Name', '')} {image.get('Description', '')}".lower()
    for word, login in (
        ("ubuntu", "ubuntu"),
        ("debian", "admin"),
        ("amzn", "ec2-user"),
        ("amazon", "ec2-user"),
        ("al20", "ec2-user"),
        ("centos", "centos"),
        ("fedora", "fedora"),
        ("rhel", "ec2-user"),
        ("suse", "ec2-user"),
    ):
        if word in name:
            return login
    return "ubuntu"


def _caller_cidr(endpoint_url: str | None) -> str:
    """The caller's address as a /32: loopback for a local endpoint, else asked of AWS."""
    if endpoint_url:
        host = urllib.parse.urlsplit(endpoint_url).hostname or ""
        try:
            if ipaddress.ip_address(host).is_loopback:
                return "127.0.0.1/32"
        except ValueError:
            if host == "localhost":
                return "127.0.0.1/32"
    try:  # pragma: no cover - needs the internet
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=10) as r:
            address = r.read().decode().strip()
        return f"{ipaddress.ip_address(address)}/32"
    except (OSError, ValueError) as e:  # pragma: no cover
        raise InvalidArgument(
            "cannot find this machine's public address: pass ssh_cidr='a.b.c.d/32'"
        ) from e


@dataclass(frozen=True)
class _Spec:
    """What one RunInstances call launches: servers with equal specs launch together."""

    image_id: str
    instance_type: str
    availability_zone: str | None
    username: str


@dataclass
class _Batch:
    names: list[str] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)
    servers: dict[str, Server] = field(default_factory=dict)
    error: BaseException | None = None


class Manager:
    """Staging servers and volumes of one EC2 region.

    ``async with Manager(region="us-east-1") as m: server = await m.get_server("s1")``.
    On leaving the block (also on an exception or cancellation) the servers this
    manager started are stopped (``on_exit="stop"``), terminated (``"terminate"``,
    which also deletes the volumes it made) or left running (``"run"``).
    Keyword arguments mirror VM::EC2::Staging::Manager's options without the dash.
    """

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        on_exit: OnExit = "stop",
        instance_type: str | None = None,
        image: str | None = None,
        image_owners: Sequence[str] | None = None,
        availability_zone: str | None = None,
        username: str | None = None,
        architecture: str = "x86_64",
        root_type: str | None = "ebs",
        reuse_key: bool = True,
        reuse_volumes: bool = True,
        scan: bool = True,
        dotdir: str | Path | None = None,
        verbosity: int = 1,
        server_class: type[Server] = Server,
        volume_class: type[Volume] = Volume,
        ssh_cidr: str | Sequence[str] | None = None,
        security_group: str = "asyncstage",
        install_packages: bool = True,
        retry_mode: RetryMode = "adaptive",
        poll_interval: float = 1.0,
        launch_window: float = 0.05,
        server_timeout: float = 120.0,
        volume_timeout: float = 120.0,
        snapshot_timeout: float = 1800.0,
        exit_timeout: float = 600.0,
    ) -> None:
        if on_exit not in ("stop", "terminate", "run"):
            raise InvalidArgument(f"on_exit must be 'stop', 'terminate' or 'run', not {on_exit!r}")
        self._ec2_options: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "profile": profile,
            "aws_access_key_id": aws_access_key_id,
            "aws_secret_access_key": aws_secret_access_key,
            "aws_session_token": aws_session_token,
            "retry_mode": retry_mode,
            "poll_interval": poll_interval,
        }
        self.ec2 = EC2(region=region, **self._ec2_options)
        self.region = self.ec2.region
        self.endpoint_url = endpoint_url
        self.on_exit: OnExit = on_exit
        self.architecture = architecture
        self.instance_type = instance_type or (
            "t4g.micro" if architecture == "arm64" else "t3.micro"
        )
        self.image = image
        self.image_owners = list(image_owners) if image_owners is not None else None
        self.availability_zone = availability_zone
        self.username = username
        self.root_type = root_type
        self.reuse_key = reuse_key
        self.reuse_volumes = reuse_volumes
        self.scan = scan
        self.verbosity = verbosity
        self.server_class = server_class
        self.volume_class = volume_class
        self.ssh_cidrs = [ssh_cidr] if isinstance(ssh_cidr, str) else list(ssh_cidr or [])
        self.security_group_name = security_group
        self.install_packages = install_packages
        self.launch_window = launch_window
        self.server_timeout = server_timeout
        self.volume_timeout = volume_timeout
        self.snapshot_timeout = snapshot_timeout
        self.exit_timeout = exit_timeout
        self.dotdir = keys.dotdir(dotdir)
        self.known_hosts = KnownHosts(keys.known_hosts_path(self.dotdir))
        self.key_pair: keys.KeyPair | None = None
        self.security_group_id: str | None = None
        self._servers: dict[str, Server] = {}
        self._volumes: dict[str, Volume] = {}
        self._started: set[str] = set()
        self._created_volumes: set[str] = set()
        self._reserved_names: set[str] = set()
        self._batches: dict[_Spec, _Batch] = {}
        self._images: dict[tuple[str, str | None, str | None], Resource] = {}
        self._zone_locks: dict[str, anyio.Lock] = {}
        self._old_hosts: list[SSHHost] = []
        self._setup_lock = anyio.Lock()
        self._open = False

    def __repr__(self) -> str:
        return f"<Manager {self.region} {len(self._servers)} servers {len(self._volumes)} volumes>"

    def _log(self, message: str, level: int = 1) -> None:
        if self.verbosity >= level:
            log.info("%s", message)
        else:
            log.debug("%s", message)

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> Manager:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(raise_errors=exc is None)

    async def open(self) -> Manager:
        """Open the EC2 client, make sure of the key pair and security group, scan."""
        if self._open:
            return self
        await self.ec2.open()
        try:
            await self._ensure_key_and_group()
            self._open = True
            if self.scan:
                await self.scan_region()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.ec2.close()
            self._open = False
            raise
        return self

    async def _ensure_key_and_group(self) -> None:
        """Make sure of our key pair and security group (again after another removed them)."""
        if self.key_pair is None:
            self.key_pair = await keys.ensure_key_pair(self.ec2, self.dotdir, reuse=self.reuse_key)
        elif not await self.ec2.key_pair_exists(self.key_pair.name):
            try:
                await self.ec2.import_key_pair(
                    self.key_pair.name, self.key_pair.public_key, tags={tag("role"): "key"}
                )
            except EC2Error as e:
                if e.code != "InvalidKeyPair.Duplicate":
                    raise
        cidrs = self.ssh_cidrs or [_caller_cidr(self.endpoint_url)]
        self.security_group_id = await self.ec2.ensure_security_group(
            self.security_group_name,
            cidrs=cidrs,
            tags={tag("role"): "security-group"},
        )

    async def close(self, *, raise_errors: bool = True) -> None:
        """Apply ``on_exit`` to the servers this manager started, then close connections.

        Runs shielded from cancellation (bounded by ``exit_timeout``).
        """
        if not self._open:
            return
        error: BaseException | None = None
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.exit_timeout) as scope:
                try:
                    await self._on_exit()
                except Exception as e:
                    log.warning("on_exit=%s failed: %s", self.on_exit, e)
                    error = e
            if scope.cancelled_caught:
                log.warning("on_exit=%s gave up after %gs", self.on_exit, self.exit_timeout)
            for host in [*(s._host for s in self._servers.values()), *self._old_hosts]:
                if host is not None:
                    try:
                        await host.close()
                    except Exception as e:  # pragma: no cover - best effort
                        log.debug("closing %s: %s", host, e)
            self._old_hosts.clear()
            await self.ec2.close()
            self._open = False
        if error is not None and raise_errors:
            raise error

    async def _on_exit(self) -> None:
        mine = [s for s in self._servers.values() if s.instance_id in self._started]
        if self.on_exit == "run":
            return
        if self.on_exit == "stop":
            live = [s for s in mine if s.state in ("pending", "running")]
            if live:
                await self._stop(live, timeout=self.server_timeout * 3)
            return
        # terminate: our servers, the volumes we made, then the key pair and group if unused
        if mine:
            await self._terminate(mine, timeout=self.server_timeout * 3)
        failures: list[Exception] = []
        for volume_id in list(self._created_volumes):
            volume = self._volumes.get(volume_id)
            if volume is not None:
                try:
                    await volume.delete()
                except AsyncstageError as e:
                    failures.append(e)
        await self._delete_key_and_group_if_unused()
        if failures:
            raise (
                failures[0]
                if len(failures) == 1
                else ExceptionGroup("some volumes could not be deleted", failures)
            )

    async def _delete_key_and_group_if_unused(self) -> None:
        others = await self.ec2.describe_instances(
            filters=[{"Name": "instance-state-name", "Values": [*_LIVE_STATES, "shutting-down"]}]
        )
        if self.key_pair and not any(i.get("KeyName") == self.key_pair.name for i in others):
            await self.ec2.delete_key_pair(self.key_pair.name)
        group = self.security_group_id
        if group and not any(
            g.get("GroupId") == group for i in others for g in i.get("SecurityGroups", [])
        ):
            try:
                await self.ec2.delete_security_group(group)
            except EC2Error as e:  # still referenced somewhere: leave it
                log.debug("security group %s kept: %s", group, e)

    def _closing(self, host: SSHHost) -> None:
        """Remember an ssh host whose address went away, to close it on exit."""
        self._old_hosts.append(host)

    def _require_open(self) -> None:
        if not self._open:
            raise AsyncstageError("the manager is not open: use `async with Manager(...)`")

    # -- registry ------------------------------------------------------------------------

    @property
    def keyfile(self) -> Path:
        """The private key file servers of this manager are reached with."""
        if self.key_pair is None:
            raise AsyncstageError("the manager is not open yet: no key pair")
        return self.key_pair.private_key

    def servers(self) -> list[Server]:
        """Every server this manager knows (made or adopted)."""
        return list(self._servers.values())

    def volumes(self) -> list[Volume]:
        """Every volume this manager knows (made or adopted)."""
        return list(self._volumes.values())

    def find_server_by_instance(self, instance_id: str) -> Server:
        """The managed server with this instance id (UnknownServer otherwise)."""
        try:
            return self._servers[str(instance_id)]
        except KeyError:
            raise UnknownServer(f"no managed server {instance_id}") from None

    def find_server_by_name(self, name: str) -> Server | None:
        """The managed server of that name, or None."""
        for server in self._servers.values():
            if server.name == name:
                return server
        return None

    def find_volume_by_volid(self, volume_id: str) -> Volume:
        """The managed volume with this id (UnknownVolume otherwise)."""
        try:
            return self._volumes[str(volume_id)]
        except KeyError:
            raise UnknownVolume(f"no managed volume {volume_id}") from None

    def find_volume_by_name(self, name: str) -> Volume | None:
        """The managed volume of that name, or None."""
        for volume in self._volumes.values():
            if volume.name == name:
                return volume
        return None

    def new_server_name(self) -> str:
        """A fresh name: ``server-xxxxxxxx``."""
        return f"server-{secrets.token_hex(4)}"

    def new_volume_name(self) -> str:
        """A fresh name: ``volume-xxxxxxxx``."""
        return f"volume-{secrets.token_hex(4)}"

    def _adopt_server(self, instance: Resource) -> Server:
        iid = str(instance["InstanceId"])
        server = self._servers.get(iid)
        if server is not None:
            server._update(instance)
            return server
        if self.key_pair and instance.get("KeyName") == self.key_pair.name:
            keyfile: Path | None = self.key_pair.private_key
        else:
            known = keys.keyfiles(self.dotdir, self.region)
            keyfile = known.get(str(instance.get("KeyName", "")))
        username = tags_of(instance).get(tag("user")) or self.username or "ubuntu"
        server = self.server_class(self, instance, keyfile=keyfile, username=username)
        self._servers[iid] = server
        return server

    def _register_volume(self, desc: Resource, *, created: bool = False) -> Volume:
        vid = str(desc["VolumeId"])
        volume = self._volumes.get(vid)
        if volume is None:
            volume = self.volume_class(self, desc)
            self._volumes[vid] = volume
        else:
            volume.volume = desc
        if created:
            self._created_volumes.add(vid)
        return volume

    def _unregister_volume(self, volume: Volume) -> None:
        self._volumes.pop(volume.volume_id, None)
        self._created_volumes.discard(volume.volume_id)

    async def _discard_volume(self, volume: Volume) -> None:
        """Best effort: detach and delete a volume whose provisioning failed."""
        try:
            if volume.server is not None:
                if volume.mtdev is not None and volume.server.state == "running":
                    await volume.server.run("umount", volume.mtdev, sudo=True, check=False)
                await self.ec2.detach_volume(volume.volume_id, force=True)
                await self.ec2.wait_for_volume(
                    volume.volume_id,
                    lambda v: v.get("State") == "available",
                    what=f"volume {volume.volume_id} to detach",
                    timeout=self.volume_timeout,
                )
            await self.ec2.delete_volume(volume.volume_id)
        except AsyncstageError as e:
            log.warning("could not delete volume %s: %s", volume.volume_id, e)
        self._unregister_volume(volume)

    # -- scan ------------------------------------------------------------------------------------

    async def scan_region(self) -> None:
        """Adopt the servers and volumes earlier managers made (by tags), and their mounts."""
        self._require_open()
        instances = await self.ec2.describe_instances(
            filters=[
                *tag_filters({tag("role"): "server"}),
                {"Name": "instance-state-name", "Values": _LIVE_STATES},
            ]
        )
        for inst in instances:
            self._adopt_server(inst)
        described = await self.ec2.describe_volumes(filters=tag_filters({tag("role"): "volume"}))
        by_server: dict[Server, list[Volume]] = {}
        for desc in described:
            if desc.get("State") not in ("available", "in-use", "creating"):
                continue
            volume = self._register_volume(desc)
            atts = [a for a in desc.get("Attachments", []) if a.get("State") == "attached"]
            server = self._servers.get(str(atts[0]["InstanceId"])) if atts else None
            if server is None or not atts:
                volume.server, volume.mtdev, volume.ec2_device = None, None, None
                volume.mounted = False
                continue
            volume.server, volume.ec2_device = server, str(atts[0]["Device"])
            if server.state == "running":
                by_server.setdefault(server, []).append(volume)

        async def mounts_of(server: Server, volumes: list[Volume]) -> None:
            try:
                if not await server.ping(timeout=10.0):
                    return
                mounts = await server._mounts()
                for volume in volumes:
                    assert volume.ec2_device
                    volume.mtdev = await server._find_device(
                        volume.volume_id, volume.ec2_device, timeout=5.0
                    )
                    where = [mp for dev, mp, _ in mounts if dev == volume.mtdev]
                    volume.mounted = bool(where)
                    if where:
                        volume.mtpt = where[0]
            except AsyncstageError as e:
                log.warning("cannot read the mounts of %s: %s", server.name, e)

        async with anyio.create_task_group() as tg:
            for server, volumes in by_server.items():
                tg.start_soon(mounts_of, server, volumes)

    # -- images and launch specs -------------------------------------------------------------

    async def _image(self, image: str | None, architecture: str | None) -> Resource:
        pattern = image or self.image
        owners: Sequence[str] = self.image_owners or ()
        if pattern is None:
            pattern = UBUNTU_PATTERN
            owners = self.image_owners if self.image_owners is not None else [UBUNTU_OWNER]
        key = (pattern, architecture, self.root_type)
        if key not in self._images:
            self._images[key] = await self.ec2.find_image(
                pattern, owners=owners, architecture=architecture, root_type=self.root_type
            )
        return self._images[key]

    async def _spec(
        self,
        *,
        image: str | None,
        instance_type: str | None,
        availability_zone: str | None,
        username: str | None,
        architecture: str | None,
    ) -> _Spec:
        desc = await self._image(image, architecture or self.architecture)
        return _Spec(
            image_id=str(desc["ImageId"]),
            instance_type=instance_type or self.instance_type,
            availability_zone=availability_zone or self.availability_zone,
            username=username or self.username or _user_for_image(desc),
        )

    def _reserve(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        if len(set(names)) != len(names):
            raise NameTaken(f"duplicate server names in {names}")
        for name in names:
            if name in self._reserved_names or self.find_server_by_name(name) is not None:
                raise NameTaken(f"a server named {name!r} exists already")
        self._reserved_names.update(names)
        return names

    async def _launch(self, spec: _Spec, names: list[str]) -> dict[str, Server]:
        """One RunInstances call for all these names; the servers, registered, by name."""
        assert self.key_pair and self.security_group_id
        common = {tag("role"): "server", tag("user"): spec.username}
        if len(names) == 1:
            common |= {tag("name"): names[0], "Name": names[0]}
        self._log(f"launching {len(names)} server(s): {', '.join(names)}")
        for attempt in range(2):
            try:
                instances = await self.ec2.run_instances(
                    image_id=spec.image_id,
                    count=len(names),
                    instance_type=spec.instance_type,
                    key_name=self.key_pair.name,
                    security_group_ids=[self.security_group_id],
                    availability_zone=spec.availability_zone,
                    tags=common,
                )
                break
            except EC2Error as e:
                # another manager's on_exit="terminate" removed the key pair or group
                if attempt or e.code not in ("InvalidKeyPair.NotFound", "InvalidGroup.NotFound"):
                    raise
                await self._ensure_key_and_group()
        servers: dict[str, Server] = {}
        for name, inst in zip(names, instances, strict=True):
            inst.setdefault("Tags", [])
            inst["Tags"] = [
                *(t for t in inst["Tags"] if t["Key"] not in (tag("name"), "Name")),
                {"Key": tag("name"), "Value": name},
                {"Key": "Name", "Value": name},
                *(
                    {"Key": k, "Value": v}
                    for k, v in common.items()
                    if k not in {t["Key"] for t in inst["Tags"]}
                ),
            ]
            server = self._adopt_server(inst)
            server._fresh = True
            self._started.add(server.instance_id)
            servers[name] = server
        if len(names) > 1:
            limiter = anyio.CapacityLimiter(10)

            async def name_it(name: str, server: Server) -> None:
                async with limiter:
                    await self.ec2.create_tags(
                        [server.instance_id], {tag("name"): name, "Name": name}
                    )

            async with anyio.create_task_group() as tg:
                for name, server in servers.items():
                    tg.start_soon(name_it, name, server)
        return servers

    async def _launch_coalesced(self, spec: _Spec, name: str) -> Server:
        """Launch one server, sharing the RunInstances call of concurrent equal requests."""
        batch = self._batches.get(spec)
        leader = batch is None
        if batch is None:
            batch = self._batches[spec] = _Batch()
        batch.names.append(name)
        if leader:
            try:
                await anyio.sleep(self.launch_window)
                del self._batches[spec]
                batch.servers = await self._launch(spec, batch.names)
            except BaseException as e:
                batch.error = e
                raise
            finally:
                if self._batches.get(spec) is batch:
                    del self._batches[spec]
                batch.done.set()
        else:
            await batch.done.wait()
        if name in batch.servers:
            return batch.servers[name]
        if isinstance(batch.error, Exception) and not isinstance(
            batch.error, anyio.get_cancelled_exc_class()
        ):
            raise batch.error
        raise AsyncstageError(f"launching server {name} was cancelled")

    # -- servers -----------------------------------------------------------------------------------

    async def provision_server(
        self,
        name: str | None = None,
        *,
        instance_type: str | None = None,
        image: str | None = None,
        availability_zone: str | None = None,
        username: str | None = None,
        architecture: str | None = None,
        timeout: float | None = None,
    ) -> Server:
        """Launch a new server and wait until it is up (running and answering ssh).

        Concurrent calls with the same launch options share one RunInstances call.
        """
        self._require_open()
        name = self._reserve([name or self.new_server_name()])[0]
        try:
            spec = await self._spec(
                image=image,
                instance_type=instance_type,
                availability_zone=availability_zone,
                username=username,
                architecture=architecture,
            )
            server = await self._launch_coalesced(spec, name)
        finally:
            self._reserved_names.discard(name)
        try:
            await self._wait_all([server], timeout or self.server_timeout, single=True)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._cleanup_failed([server])
            raise
        return server

    async def provision_servers(
        self,
        names_or_count: int | Sequence[str] | None = None,
        *,
        count: int | None = None,
        instance_type: str | None = None,
        image: str | None = None,
        availability_zone: str | None = None,
        username: str | None = None,
        architecture: str | None = None,
        timeout: float | None = None,
    ) -> list[Server]:
        """Launch a fleet with one RunInstances call and wait until all are up.

        ``names_or_count`` is a list of names or a number of servers (or pass
        ``count=``). When some fail, they are terminated and a :class:`FleetError`
        names each, with the others in its ``succeeded``.
        """
        self._require_open()
        if (names_or_count is None) == (count is None):
            raise InvalidArgument("provision_servers needs names, a number, or count=")
        what: int | Sequence[str] = names_or_count if names_or_count is not None else count or 0
        if isinstance(what, int):
            if what < 1:
                raise InvalidArgument("provision_servers needs at least one server")
            wanted = [self.new_server_name() for _ in range(what)]
        else:
            wanted = list(what)
            if not wanted:
                raise InvalidArgument("provision_servers needs at least one server")
        names = self._reserve(wanted)
        try:
            spec = await self._spec(
                image=image,
                instance_type=instance_type,
                availability_zone=availability_zone,
                username=username,
                architecture=architecture,
            )
            launched = await self._launch(spec, names)
        finally:
            self._reserved_names.difference_update(names)
        servers = [launched[n] for n in names]
        try:
            await self._wait_all(servers, timeout or self.server_timeout, single=False)
        except FleetError as e:
            with anyio.CancelScope(shield=True):
                await self._cleanup_failed([s for s in servers if s not in e.succeeded])
            raise
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._cleanup_failed(servers)
            raise
        return servers

    async def _cleanup_failed(self, servers: list[Server]) -> None:
        try:
            await self._terminate(servers, timeout=self.server_timeout * 3, single=False)
        except AsyncstageError as e:
            log.warning("could not terminate failed servers: %s", e)

    async def get_server(
        self,
        name: str | None = None,
        *,
        instance_type: str | None = None,
        image: str | None = None,
        availability_zone: str | None = None,
        username: str | None = None,
        architecture: str | None = None,
        timeout: float | None = None,
    ) -> Server:
        """The server of that name, started if stopped; a new one when there is none."""
        self._require_open()
        if name is not None:
            server = self.find_server_by_name(name)
            if server is not None:
                if not await server.ping():
                    await server.start(timeout=timeout or self.server_timeout)
                return server
        return await self.provision_server(
            name,
            instance_type=instance_type,
            image=image,
            availability_zone=availability_zone,
            username=username,
            architecture=architecture,
            timeout=timeout,
        )

    async def get_server_in_zone(self, zone: str) -> Server:
        """A server up in this zone: a running one, else a started one, else a new one."""
        self._require_open()
        lock = self._zone_locks.setdefault(zone, anyio.Lock())
        async with lock:
            in_zone = [s for s in self._servers.values() if s.availability_zone == zone]
            for server in in_zone:
                if server.state == "running" and await server.ping():
                    return server
            for server in in_zone:
                if server.state in ("stopped", "stopping"):
                    await server.start()
                    return server
            return await self.provision_server(availability_zone=zone)

    # -- fleets --------------------------------------------------------------------------------

    def _result(
        self,
        action: str,
        servers: Sequence[Server],
        errors: dict[Server, Exception],
        single: bool,
    ) -> list[Server]:
        ok = [s for s in servers if s not in errors]
        if errors:
            if single and len(errors) == 1:
                raise next(iter(errors.values()))
            names = ", ".join(f"{s.name} ({s.instance_id})" for s in errors)
            raise FleetError(
                f"{len(errors)} of {len(servers)} server(s) failed to {action}: {names}",
                list(errors.values()),
                succeeded=ok,
            )
        return ok

    async def _refresh(self, servers: Sequence[Server]) -> None:
        found = await self.ec2.describe_instances_shared(s.instance_id for s in servers)
        for server in servers:
            if server.instance_id in found:
                server._update(found[server.instance_id])

    async def _wait_all(
        self,
        servers: Sequence[Server],
        timeout: float,
        *,
        single: bool,
    ) -> list[Server]:
        errors = await self._wait_up(servers, timeout)
        return self._result("come up", servers, errors, single)

    async def _wait_up(
        self,
        servers: Sequence[Server],
        timeout: float,
    ) -> dict[Server, Exception]:
        """Wait until running (one describe per round), then until ssh answers (at once)."""
        deadline = anyio.current_time() + timeout
        by_id = {s.instance_id: s for s in servers}
        errors: dict[Server, Exception] = {}
        limiter = anyio.CapacityLimiter(32)

        async def ssh_up(server: Server) -> None:
            async with limiter:
                try:
                    await server._wait_ssh(deadline)
                except AsyncstageError as e:
                    errors[server] = e

        async with anyio.create_task_group() as tg:

            def reached(instance_id: str, instance: Resource) -> None:
                server = by_id[instance_id]
                before = server.address
                server._update(instance)
                if before is not None and server.address != before:  # a new address on start
                    self.known_hosts.remove(before, 22)
                    server._fresh = True
                tg.start_soon(ssh_up, server)

            _, failed = await self.ec2.wait_for_instances(
                list(by_id),
                "running",
                timeout=timeout,
                labels={s.instance_id: s.name for s in servers},
                on_reached=reached,
            )
            for instance_id, error in failed.items():
                errors[by_id[instance_id]] = error
        return errors

    async def wait_for_servers(
        self,
        servers: Iterable[Server],
        timeout: float | None = None,
    ) -> list[Server]:
        """Wait until every server is up; FleetError names those that are not."""
        servers = list(servers)
        return await self._wait_all(servers, timeout or self.server_timeout, single=False)

    async def _start(
        self,
        servers: Sequence[Server],
        *,
        timeout: float,
        single: bool = False,
    ) -> list[Server]:
        if not servers:
            return []
        await self._refresh(servers)
        stopping = [s for s in servers if s.state == "stopping"]
        errors: dict[Server, Exception] = {}
        if stopping:
            _, failed = await self.ec2.wait_for_instances(
                [s.instance_id for s in stopping], "stopped", timeout=timeout
            )
            errors |= {s: failed[s.instance_id] for s in stopping if s.instance_id in failed}
            await self._refresh(servers)
        for server in servers:
            if server.state in ("terminated", "shutting-down"):
                errors[server] = UnknownServer(f"server {server.name} is {server.state}")
        to_start = [s for s in servers if s.state == "stopped" and s not in errors]
        if to_start:
            self._log(f"starting {len(to_start)} server(s)")
            await self.ec2.start_instances([s.instance_id for s in to_start])
        self._started.update(s.instance_id for s in servers)
        rest = [s for s in servers if s not in errors]
        errors |= await self._wait_up(rest, timeout)

        async def remount(server: Server) -> None:
            for volume in server.volumes():
                if volume._remount:
                    try:
                        volume.mtdev = None
                        await server.remount_volume(volume)
                        volume._remount = False
                    except AsyncstageError as e:
                        errors[server] = e

        async with anyio.create_task_group() as tg:
            for server in rest:
                if server not in errors:
                    tg.start_soon(remount, server)
        return self._result("start", servers, errors, single)

    async def _stop(
        self,
        servers: Sequence[Server],
        *,
        timeout: float,
        single: bool = False,
    ) -> list[Server]:
        if not servers:
            return []
        await self._refresh(servers)
        to_stop = [s for s in servers if s.state in ("pending", "running")]
        if to_stop:
            self._log(f"stopping {len(to_stop)} server(s)")
            await self.ec2.stop_instances([s.instance_id for s in to_stop])
        for server in to_stop:
            server._up = False
            for volume in server.volumes():
                volume._remount = volume._remount or volume.mounted
                volume.mounted = False
            if server._host is not None:
                self._closing(server._host)
                server._host = None
        errors: dict[Server, Exception] = {}
        for server in servers:
            if server.state in ("terminated", "shutting-down"):
                errors[server] = UnknownServer(f"server {server.name} is {server.state}")
        ids = [s.instance_id for s in servers if s not in errors]
        reached, failed = await self.ec2.wait_for_instances(
            ids, "stopped", timeout=timeout, labels={s.instance_id: s.name for s in servers}
        )
        for server in servers:
            if server.instance_id in reached:
                server._update(reached[server.instance_id])
            elif server.instance_id in failed:
                errors[server] = failed[server.instance_id]
        return self._result("stop", servers, errors, single)

    async def _terminate(
        self,
        servers: Sequence[Server],
        *,
        timeout: float,
        single: bool = False,
        wait: bool = True,
    ) -> list[Server]:
        if not servers:
            return []
        ids = [s.instance_id for s in servers]
        self._log(f"terminating {len(servers)} server(s)")
        await self.ec2.terminate_instances(ids)
        errors: dict[Server, Exception] = {}
        if wait:
            _reached, failed = await self.ec2.wait_for_instances(
                ids, "terminated", timeout=timeout, labels={s.instance_id: s.name for s in servers}
            )
            errors = {s: failed[s.instance_id] for s in servers if s.instance_id in failed}
        for server in servers:
            if server in errors:
                continue
            for volume in server.volumes():
                volume.server, volume.mtdev, volume.ec2_device = None, None, None
                volume.mounted = volume._remount = False
            if server._host is not None:
                self._closing(server._host)
                server._host = None
            if server.address:
                self.known_hosts.remove(server.address, 22)
            server.instance.setdefault("State", {})["Name"] = "terminated"
            server._up = False
            self._servers.pop(server.instance_id, None)
            self._started.discard(server.instance_id)
        return self._result("terminate", servers, errors, single)

    async def start_all_servers(
        self,
        timeout: float | None = None,
    ) -> list[Server]:
        """Start every managed server at once (one StartInstances call) and wait until up."""
        self._require_open()
        return await self._start(self.servers(), timeout=timeout or self.server_timeout)

    async def stop_all_servers(
        self,
        timeout: float | None = None,
    ) -> list[Server]:
        """Stop every managed server at once and wait until they are stopped."""
        self._require_open()
        return await self._stop(self.servers(), timeout=timeout or self.server_timeout * 3)

    async def terminate_all_servers(
        self,
        timeout: float | None = None,
    ) -> list[Server]:
        """Terminate every managed server at once, wait, and unregister them."""
        self._require_open()
        return await self._terminate(self.servers(), timeout=timeout or self.server_timeout * 3)

    async def force_terminate_all_servers(self) -> None:
        """Terminate every managed server at once without waiting (emergency brake)."""
        self._require_open()
        await self._terminate(self.servers(), timeout=0, wait=False)

    async def start_servers(
        self,
        servers: Iterable[Server],
        timeout: float | None = None,
    ) -> list[Server]:
        """Start these servers at once and wait until they are up."""
        return await self._start(list(servers), timeout=timeout or self.server_timeout)

    async def stop_servers(
        self,
        servers: Iterable[Server],
        timeout: float | None = None,
    ) -> list[Server]:
        """Stop these servers at once and wait until they are stopped."""
        return await self._stop(list(servers), timeout=timeout or self.server_timeout * 3)

    async def terminate_servers(
        self,
        servers: Iterable[Server],
        timeout: float | None = None,
    ) -> list[Server]:
        """Terminate these servers at once, wait, and unregister them."""
        return await self._terminate(list(servers), timeout=timeout or self.server_timeout * 3)

    # -- volumes ------------------------------------------------------------------------------

    async def snapshots(self, name: str | None = None) -> list[Resource]:
        """The staging snapshots (of volumes named ``name``), newest first, failed ones left out.

        Each is EC2's description (``SnapshotId``, ``VolumeSize``, ``StartTime``, ``Tags`` ...).
        """
        wanted = {tag("role"): "snapshot"} | ({tag("name"): name} if name else {})
        snaps = await self.ec2.describe_snapshots(filters=tag_filters(wanted))
        # StartTime has whole seconds at best: our own tag breaks ties
        return sorted(
            (s for s in snaps if s.get("State") != "error"),
            key=lambda s: (str(s.get("StartTime", "")), tags_of(s).get(tag("created"), "")),
            reverse=True,
        )

    async def _newest_snapshot(self, name: str) -> Resource | None:
        snaps = await self.snapshots(name)
        return snaps[0] if snaps else None

    async def provision_volume(
        self,
        name: str | None = None,
        *,
        size: int | None = None,
        fstype: str | None = None,
        mtpt: str | None = None,
        mount: str | None = None,
        volume_id: str | None = None,
        snapshot_id: str | None = None,
        reuse: bool | None = None,
        label: str | None = None,
        uuid: str | None = None,
        availability_zone: str | None = None,
    ) -> Volume:
        """A volume mounted on a server of its zone (one is started or made if needed).

        Same options as :meth:`Server.provision_volume`.
        """
        self._require_open()
        reuse = self.reuse_volumes if reuse is None else reuse
        if mtpt or mount:
            check_mount_point(str(mtpt or mount))
        if name is not None and volume_id is None:
            existing = self.find_volume_by_name(name)
            if existing is not None and reuse:
                if existing.mounted or (existing.fstype == "raw" and existing.server):
                    return existing
                await existing.mount(mtpt=mtpt or mount)
                return existing
            if existing is not None:
                raise NameTaken(f"a volume named {name!r} exists already ({existing.volume_id})")
        zone = availability_zone or self.availability_zone
        if zone is None and volume_id is not None:
            found = await self.ec2.describe_volumes([volume_id])
            if not found:
                raise UnknownVolume(f"volume {volume_id} does not exist")
            zone = str(found[0]["AvailabilityZone"])
        if zone is None:
            up = [s for s in self._servers.values() if s.state == "running"]
            zone = up[0].availability_zone if up else (await self.ec2.availability_zones())[0]
        server = await self.get_server_in_zone(zone)
        return await server.provision_volume(
            name,
            size=size,
            fstype=fstype,
            mtpt=mtpt,
            mount=mount,
            volume_id=volume_id,
            snapshot_id=snapshot_id,
            reuse=reuse,
            label=label,
            uuid=uuid,
            availability_zone=zone,
        )

    async def get_volume(
        self,
        name: str,
        *,
        size: int | None = None,
        fstype: str | None = None,
        mtpt: str | None = None,
        mount: str | None = None,
        availability_zone: str | None = None,
    ) -> Volume:
        """The volume of that name (mounted somewhere), made when there is none."""
        return await self.provision_volume(
            name,
            size=size,
            fstype=fstype,
            mtpt=mtpt,
            mount=mount,
            reuse=True,
            availability_zone=availability_zone,
        )

    # -- snapshots and images across regions --------------------------------------------------

    def _other_ec2(self, region_or_manager: str | Manager) -> tuple[EC2, bool]:
        if isinstance(region_or_manager, Manager):
            return region_or_manager.ec2, False
        return EC2(region=region_or_manager, **self._ec2_options), True

    async def copy_snapshot(
        self,
        snapshot: str,
        region_or_manager: str | Manager,
        *,
        description: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Copy one of our snapshots to another region (or manager); the copy's id, completed."""
        self._require_open()
        snaps = await self.ec2.describe_snapshots([str(snapshot)])
        if not snaps:
            raise UnknownSnapshot(f"snapshot {snapshot} does not exist")
        dest, own = self._other_ec2(region_or_manager)
        try:
            await dest.open()
            new_id = await dest.copy_snapshot(
                str(snapshot),
                source_region=self.region,
                description=description or str(snaps[0].get("Description", "")),
            )
            await dest.create_tags([new_id], tags_of(snaps[0]))
            await dest.wait_for_snapshot(new_id, timeout=timeout or self.snapshot_timeout)
        finally:
            if own:
                with anyio.CancelScope(shield=True):
                    await dest.close()
        return new_id

    # -- transfers (the work is done in asyncstage.transfer) --------------------------------

    async def rsync(self, *paths: PathLike, **options: Unpack[RsyncOptions]) -> TransferStats:
        """rsync sources to a destination (the last path), between any path forms.

        Local paths (a trailing slash copies the contents), ``f"{server}:/abs"``,
        ``f"{volume}/sub"``, ``":/sub"`` (the previous source's server or volume),
        ``user@host:/path`` and :class:`~asyncstage.paths.RemotePath`. Several sources
        must live on one host. Server to server goes directly, with a temporary key.
        """
        return await transfer.rsync(self, *paths, **options)

    async def dd(
        self, source: Volume | str, dest: Volume | str, **options: Unpack[DdOptions]
    ) -> TransferStats:
        """Block-copy volume ``source`` onto ``dest``: zero blocks skipped, verified by sha256.

        Both must be attached and not mounted (``unmount=True`` unmounts them first).
        """
        return await transfer.dd(self, source, dest, **options)

    async def copy_image(
        self,
        image: str,
        region_or_manager: str | Manager,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        **register_options: Any,
    ) -> str:
        """Copy an image to another region (or manager); the copy's id, once available.

        ``register_options`` are passed on to CopyImage (``Encrypted``, ``KmsKeyId`` ...).
        """
        self._require_open()
        found = await self.ec2.describe_images([str(image)])
        if not found:
            raise EC2Error(f"image {image} does not exist", code="InvalidAMIID.NotFound")
        dest, own = self._other_ec2(region_or_manager)
        try:
            await dest.open()
            new_id = await dest.copy_image(
                str(image),
                source_region=self.region,
                name=name or str(found[0].get("Name", image)),
                description=description or str(found[0].get("Description", "")),
                **register_options,
            )
            await dest.wait_for_image(new_id, timeout=timeout or self.snapshot_timeout)
        finally:
            if own:
                with anyio.CancelScope(shield=True):
                    await dest.close()
        return new_id


def local_manager(cloud: _CloudLike, **options: Any) -> Manager:
    """A Manager for an embedded local cloud (its endpoint, region, image and user).

    ``options`` are Manager options; they override the local cloud's defaults.
    """
    session = cloud.session_kwargs()
    defaults: dict[str, Any] = {
        "region": cloud.region,
        "endpoint_url": cloud.endpoint_url,
        "aws_access_key_id": session.get("aws_access_key_id", "asyncstage-local"),
        "aws_secret_access_key": session.get("aws_secret_access_key", "asyncstage-local"),
        "image": cloud.image_id,
        "username": cloud.default_username,
        "ssh_cidr": "127.0.0.1/32",
        "install_packages": False,
    }
    defaults.update(options)
    return Manager(**defaults)
