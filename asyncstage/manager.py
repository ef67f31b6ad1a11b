"""Manager: one region's staging servers and volumes, their fleets and their lifetime.

The Manager holds the configuration and the lifetime (open, scan, close with ``on_exit``);
the work is done by its parts, which share one :class:`~asyncstage.context.Context`
(``manager.context``) and never hold the manager:

- :class:`~asyncstage.registry.Registry` (``manager.registry``): servers, volumes, names;
- :class:`~asyncstage.fleet.Fleet` (``manager.fleet``): launch, wait, start, stop, terminate;
- :class:`~asyncstage.account.Account` (``manager.account``): key pair and security group;
- :class:`~asyncstage.images.Images` (``manager.images``): images and cross-region copies;
- :class:`~asyncstage.timeouts.Timeouts` (``manager.timeouts``): every timing knob.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, Unpack, cast

import anyio

from asyncstage import closing, keys, transfer
from asyncstage.account import Account
from asyncstage.capacity import LaunchOptions, check_choices
from asyncstage.context import Context
from asyncstage.disks import our_snapshots
from asyncstage.ec2 import EC2, Resource
from asyncstage.errors import (
    AsyncstageError,
)
from asyncstage.fleet import Fleet
from asyncstage.images import Images
from asyncstage.jumps import JumpSpec, check_jump, remember, set_jump
from asyncstage.names import check_mount_point, check_name, check_user
from asyncstage.options import (
    NewVolumeOptions,
    ProvisionOptions,
    ServerOptions,
    VolumeOptions,
    check_keys,
)
from asyncstage.paths import PathLike
from asyncstage.refs import ServerRef
from asyncstage.registry import Registry
from asyncstage.server import Server
from asyncstage.settings import (
    Access,
    Connection,
    HostKeySource,
    Launch,
    ManagerKeywords,
    OnExit,
    Settings,
    Storage,
    check_host_keys,
    check_on_exit,
    local_credentials,
    settings_from,
)
from asyncstage.ssh import KnownHosts
from asyncstage.ssh.known_hosts import HostKeyPolicy, check_policy
from asyncstage.timeouts import Timeouts
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


class Manager:
    """Staging servers and volumes of one EC2 region.

    ``async with Manager(region="us-east-1") as m: server = await m.get_server("s1")``.
    On leaving the block (also on an exception or cancellation) the servers this
    manager started are stopped (``on_exit="stop"``), terminated (``"terminate"``,
    which also deletes the volumes it made) or left running (``"run"``).
    The settings come as objects, as httpx's ``Timeout`` and ``Limits`` do:
    ``connection`` (:class:`~asyncstage.settings.Connection`: endpoint, credentials),
    ``launch`` (:class:`~asyncstage.settings.Launch`: instance type, image, zone, user),
    ``access`` (:class:`~asyncstage.settings.Access`: ssh CIDR, security group, key,
    host key policy), ``storage`` (:class:`~asyncstage.settings.Storage`: volume reuse,
    mount options) and ``timeouts`` (:class:`~asyncstage.timeouts.Timeouts`). Each of
    their fields may also be given as a keyword argument (:class:`~asyncstage.settings.
    ManagerKeywords`: ``instance_type=``, ``server_timeout=`` ..., the names of
    VM::EC2::Staging::Manager's options without the dash), which overrides the object's.
    ``jump_host``: the bastion of servers without a public address (:mod:`asyncstage.jumps`).
    """

    def __init__(
        self,
        *,
        region: str | None = None,
        on_exit: OnExit = "stop",
        connection: Connection | None = None,
        launch: Launch | None = None,
        access: Access | None = None,
        storage: Storage | None = None,
        timeouts: Timeouts | None = None,
        scan: bool = True,
        dotdir: str | Path | None = None,
        verbosity: int = 1,
        server_class: type[Server] = Server,
        volume_class: type[Volume] = Volume,
        jump_host: JumpSpec | None = None,
        **settings: Unpack[ManagerKeywords],
    ) -> None:
        given = settings_from(connection, launch, access, storage, timeouts, settings)
        self.connection: Connection = given.connection
        """How it reaches EC2 (:class:`~asyncstage.settings.Connection`)."""
        self.launch: Launch = given.launch
        """What new servers are launched as (:class:`~asyncstage.settings.Launch`)."""
        self.access: Access = given.access
        """Key pair, security group, host keys (:class:`~asyncstage.settings.Access`)."""
        self.storage: Storage = given.storage
        """How volumes are made and mounted (:class:`~asyncstage.settings.Storage`)."""
        self.timeouts: Timeouts = given.timeouts
        self.host_key_policy: HostKeyPolicy = check_policy(self.access.host_key_policy)
        self.host_keys: HostKeySource = check_host_keys(self.access.host_keys)
        """Where new servers' host keys come from: ``console`` or ``user-data``."""
        ec2_options: dict[str, Any] = asdict(self.connection)
        ec2_options["poll_interval"] = self.timeouts.poll_interval
        self.ec2 = EC2(region=region, **ec2_options)
        self.region = self.ec2.region
        self.endpoint_url: str | None = self.connection.endpoint_url
        self.on_exit: OnExit = check_on_exit(on_exit)
        self.architecture: str = self.launch.architecture
        self.instance_type: str = self.launch.effective_instance_type
        self.availability_zone: str | None = self.launch.availability_zone
        username = self.launch.username
        self.username = check_user(username) if username is not None else None
        self.mount_options: str = self.storage.mount_options
        """The ``mount -o`` options of every volume mount (``nosuid,nodev`` by default)."""
        self.reuse_volumes: bool = self.storage.reuse_volumes
        self.scan = scan
        self.verbosity = verbosity
        self.server_class = server_class
        self.volume_class = volume_class
        self.install_packages: bool = self.storage.install_packages
        self.context = _context(self, self.ec2, given, dotdir, verbosity)
        """What the manager's parts, servers and volumes share (they never hold the manager)."""
        ctx = self.context
        self.dotdir, self.known_hosts, self.registry = ctx.dotdir, ctx.known_hosts, ctx.registry
        self.account, self.images = ctx.account, ctx.images
        ctx.jump_host = check_jump(jump_host)
        self.fleet = Fleet(self.context)  # the account, set up when a launch first needs it
        self.context.fleet = self.fleet
        self._open = False

    def __repr__(self) -> str:
        return f"<Manager {self.region} {self.registry}>"

    async def __aenter__(self) -> Manager:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(raise_errors=exc_info[1] is None)

    async def open(self) -> Manager:
        """Open the EC2 client and scan: reads only.

        The key pair and the security group are made or checked when first needed (a
        launch, an ssh connection to one of our servers), not here.
        """
        if self._open:
            return self
        await self.ec2.open()
        try:
            self._open = True
            if self.scan:
                await self.scan_region()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.ec2.close()
            self._open = False
            raise
        return self

    @property
    def jump_host(self) -> JumpSpec | None:
        """The jump host of servers without a public address (:mod:`asyncstage.jumps`)."""
        return self.context.jump_host

    @jump_host.setter
    def jump_host(self, spec: JumpSpec | None) -> None:
        self.context.jump_host = check_jump(spec)

    @property
    def key_pair(self) -> keys.KeyPair:
        """The key pair of the servers this manager launches (the dot directory's; made
        there on first use; imported into EC2 at the first launch)."""
        return self.account.local_key()

    @property
    def security_group_id(self) -> str | None:
        """The security group's id, once a launch or a connection needed it (else None)."""
        return self.account.group_id

    async def close(self, *, raise_errors: bool = True) -> None:
        """Apply ``on_exit`` to the servers this manager started, then close connections.

        Runs shielded from cancellation (bounded by ``timeouts.exit``).
        """
        if self._open:
            try:
                await closing.close(self.fleet, self.on_exit, raise_errors=raise_errors)
            finally:
                self._open = False

    def _require_open(self) -> None:
        if not self._open:
            raise AsyncstageError("the manager is not open: use `async with Manager(...)`")

    def known_key_names(self) -> set[str]:
        """The EC2 key pairs whose private keys this manager holds (its dot directory's):
        only servers launched with one, and volumes and snapshots whose owner tag names
        one, are adopted."""
        return self.context.known_key_names()

    @property
    def keyfile(self) -> Path:
        """The private key file servers of this manager are reached with."""
        return self.key_pair.private_key

    def servers(self) -> list[Server]:
        """Every server this manager knows (made or adopted)."""
        return cast(list[Server], self.registry.servers())

    def volumes(self) -> list[Volume]:
        """Every volume this manager knows (made or adopted)."""
        return cast(list[Volume], self.registry.volumes())

    def find_server_by_instance(self, instance_id: str) -> Server:
        """The managed server with this instance id (UnknownServer otherwise)."""
        return cast(Server, self.registry.find_server_by_instance(instance_id))

    def find_server_by_name(self, name: str) -> Server | None:
        """The managed server of that name, or None."""
        return cast(Server | None, self.registry.find_server_by_name(name))

    def find_volume_by_volid(self, volume_id: str) -> Volume:
        """The managed volume with this id (UnknownVolume otherwise)."""
        return cast(Volume, self.registry.find_volume_by_volid(volume_id))

    def find_volume_by_name(self, name: str) -> Volume | None:
        """The managed volume of that name, or None."""
        return cast(Volume | None, self.registry.find_volume_by_name(name))

    def new_server_name(self) -> str:
        """A fresh name: ``server-xxxxxxxx``."""
        return self.registry.new_server_name()

    def new_volume_name(self) -> str:
        """A fresh name: ``volume-xxxxxxxx``."""
        return self.registry.new_volume_name()

    async def scan_region(self) -> None:
        """Adopt the servers and volumes earlier managers made (by tags), and their mounts."""
        self._require_open()
        await self.fleet.adopt_region()

    async def provision_server(
        self, name: str | None = None, **options: Unpack[ProvisionOptions]
    ) -> Server:
        """Launch a new server and wait until it is up (running and answering ssh).

        Concurrent calls with the same launch options share one RunInstances call.
        ``zones`` / ``instance_types``: fallbacks, as for :meth:`provision_servers`.
        ``jump_host``: reach it through this one (:attr:`Server.jump_host`).
        """
        self._require_open()
        opts = _options(options, ProvisionOptions, "provision_server")
        name = check_name(name, "server") if name is not None else self.new_server_name()
        remember(self.context, options.get("jump_host"), name)
        timeout = options.get("timeout") or self.timeouts.server
        return _one(await self.fleet.provision_one(name, opts, timeout))

    async def provision_servers(
        self,
        names_or_count: int | Sequence[str] | None = None,
        *,
        count: int | None = None,
        **options: Unpack[ProvisionOptions],
    ) -> list[Server]:
        """Launch a fleet with one RunInstances call and wait until all are up.

        ``names_or_count``: names or a number (or ``count=``). Servers that fail are terminated;
        a :class:`FleetError` names them, the others in ``succeeded``. ``zones=[...]``,
        ``instance_types=[...]``, ``partial="terminate"|"keep"``: where EC2 has no capacity,
        the next choice (:mod:`asyncstage.capacity`).
        """
        self._require_open()
        opts = _options(options, ProvisionOptions, "provision_servers")
        names = [check_name(n, "server") for n in self.fleet.names_for(names_or_count, count)]
        remember(self.context, options.get("jump_host"), *names)
        timeout = options.get("timeout") or self.timeouts.server
        return _all(await self.fleet.provision_many(names, opts, timeout))

    async def get_server(self, name: str | None = None, **options: Unpack[ServerOptions]) -> Server:
        """The server of that name, started if stopped; a new one when there is none.
        ``jump_host``: reach it through this one (:attr:`Server.jump_host`)."""
        self._require_open()
        launch = _options(options, ServerOptions, "get_server")
        name = check_name(name, "server") if name is not None else None
        jump_host = options.get("jump_host")
        if jump_host is not None:
            name = name or self.new_server_name()
            set_jump(self.context, name, jump_host)
        timeout = options.get("timeout") or self.timeouts.server
        return _one(await self.fleet.get(name, launch, timeout))

    async def get_server_in_zone(self, zone: str) -> Server:
        """A server up in this zone: a running one, else a started one, else a new one."""
        self._require_open()
        return _one(await self.fleet.server_in_zone(zone))

    async def wait_for_servers(
        self, servers: Iterable[Server], timeout: float | None = None
    ) -> list[Server]:
        """Wait until every server is up; FleetError names those that are not."""
        return _all(await self.fleet.wait_all(list(servers), timeout or self.timeouts.server))

    async def start_all_servers(self, timeout: float | None = None) -> list[Server]:
        """Start every managed server at once (one StartInstances call) and wait until up."""
        self._require_open()
        return _all(await self.fleet.start(self.servers(), timeout=timeout or self.timeouts.server))

    async def stop_all_servers(self, timeout: float | None = None) -> list[Server]:
        """Stop every managed server at once and wait until they are stopped."""
        self._require_open()
        return _all(await self.fleet.stop(self.servers(), timeout=timeout or self.timeouts.stop))

    async def terminate_all_servers(self, timeout: float | None = None) -> list[Server]:
        """Terminate every managed server at once, wait, and unregister them."""
        self._require_open()
        return _all(
            await self.fleet.terminate(self.servers(), timeout=timeout or self.timeouts.stop)
        )

    async def force_terminate_all_servers(self) -> None:
        """Terminate every managed server at once without waiting (emergency brake)."""
        self._require_open()
        await self.fleet.terminate_now(self.servers())

    async def start_servers(
        self, servers: Iterable[Server], timeout: float | None = None
    ) -> list[Server]:
        """Start these servers at once and wait until they are up."""
        return _all(await self.fleet.start(list(servers), timeout=timeout or self.timeouts.server))

    async def stop_servers(
        self, servers: Iterable[Server], timeout: float | None = None
    ) -> list[Server]:
        """Stop these servers at once and wait until they are stopped."""
        return _all(await self.fleet.stop(list(servers), timeout=timeout or self.timeouts.stop))

    async def terminate_servers(
        self, servers: Iterable[Server], timeout: float | None = None
    ) -> list[Server]:
        """Terminate these servers at once, wait, and unregister them."""
        return _all(
            await self.fleet.terminate(list(servers), timeout=timeout or self.timeouts.stop)
        )

    async def snapshots(self, name: str | None = None) -> list[Resource]:
        """Our staging snapshots (of volumes named ``name``), newest first, failed ones left out.

        Only snapshots this manager's keys own (their ``asyncstage:owner`` tag) with tags that
        pass the naming rules are listed: nothing else is ever restored from.

        Each is EC2's description (``SnapshotId``, ``VolumeSize``, ``StartTime``, ``Tags`` ...).
        """
        return await our_snapshots(self.context, name)

    async def provision_volume(
        self, name: str | None = None, **options: Unpack[VolumeOptions]
    ) -> Volume:
        """A volume mounted on a server of its zone (one is started or made if needed).

        Same options as :meth:`Server.provision_volume`.
        """
        self._require_open()
        check_keys(options, VolumeOptions, "provision_volume")
        name = check_name(name, "volume") if name is not None else None
        reuse = options.get("reuse")
        reuse = self.reuse_volumes if reuse is None else reuse
        where = options.get("mtpt") or options.get("mount")
        where = check_mount_point(where) if where else None
        volume_id = options.get("volume_id")
        if existing := await self.fleet.reuse_volume(name, volume_id, reuse=reuse, mtpt=where):
            return cast(Volume, existing)  # made by this manager's volume_class
        zone = await self.fleet.zone_for_volume(volume_id, options.get("availability_zone"))
        server = await self.get_server_in_zone(zone)
        chosen: VolumeOptions = {**options, "reuse": reuse, "availability_zone": zone}
        return await server.provision_volume(name, **chosen)

    async def get_volume(self, name: str, **options: Unpack[NewVolumeOptions]) -> Volume:
        """The volume of that name (mounted somewhere), made when there is none."""
        check_keys(options, NewVolumeOptions, "get_volume")
        return await self.provision_volume(name, **options, reuse=True)

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
        return await self.images.copy_snapshot(
            snapshot,
            region_or_manager,
            description=description,
            timeout=timeout or self.timeouts.snapshot,
        )

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
        return await self.images.copy_image(
            image,
            region_or_manager,
            name=name,
            description=description,
            timeout=timeout or self.timeouts.snapshot,
            **register_options,
        )

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


def _context(
    m: Manager, ec2: EC2, given: Settings, dotdir: str | Path | None, verbosity: int
) -> Context:
    """The parts of manager ``m`` (on ``ec2``, with ``given`` settings) as one Context."""
    access, launch = given.access, given.launch
    # a non-AWS endpoint (the local cloud ...) never shares the real region's key files
    home = keys.dotdir_for(given.connection.endpoint_url, dotdir)
    cidrs = [access.ssh_cidr] if isinstance(access.ssh_cidr, str) else list(access.ssh_cidr or [])
    account = Account(ec2, home, access.reuse_key, cidrs, access.security_group)
    account.checkip_url = access.checkip_url
    ec2_options = {**asdict(given.connection), "poll_interval": given.timeouts.poll_interval}
    images = Images(ec2, launch.image, launch.image_owners, launch.root_type, ec2_options)
    return Context(
        ec2,
        Registry(lambda desc: m.volume_class(m, desc)),
        given.timeouts,
        KnownHosts(keys.known_hosts_path(home)),
        account,
        images,
        ec2.region,
        home,
        lambda desc, key, user: m.server_class(m, desc, keyfile=key, username=user),
        launch,
        given.storage,
        check_policy(access.host_key_policy),
        check_host_keys(access.host_keys),
        verbosity,
    )


def _one(server: ServerRef) -> Server:
    """A server of the fleet as what it is: made by this manager's ``server_class``."""
    return cast(Server, server)


def _all(servers: list[ServerRef]) -> list[Server]:
    """The servers of the fleet as what they are (see :func:`_one`)."""
    return cast(list[Server], servers)


def _options(options: Any, allowed: Any, call: str) -> LaunchOptions:
    """The launch options of a provision call (``options`` of the TypedDict ``allowed``),
    its login user name and choices checked."""
    check_keys(options, allowed, call)
    username = options.get("username")
    user = check_user(username) if username is not None else None
    zone, instance_type = options.get("availability_zone"), options.get("instance_type")
    partial = options.get("partial", "terminate")
    zones, types = check_choices(
        zone, options.get("zones"), instance_type, options.get("instance_types"), partial
    )
    image, architecture = options.get("image"), options.get("architecture")
    return LaunchOptions(instance_type, image, zone, user, architecture, zones, types, partial)


def local_manager(cloud: _CloudLike, **options: Any) -> Manager:
    """A Manager for an embedded local cloud (its endpoint, region, image and user).

    ``options`` are Manager options; they override the local cloud's defaults. A
    ``region`` other than the cloud's own gets that region's id of the image. The cloud's
    endpoint, credentials, image and user are given as keywords, so they win over the same
    fields of a settings object passed (the endpoint above all: it keeps the manager on
    this cloud); pass ``image=`` ... to change them.
    """
    session = cloud.session_kwargs()
    region = str(options.get("region") or cloud.region)
    image_in = getattr(cloud, "image_id_in", None)  # a cloud of several regions
    defaults: dict[str, Any] = {
        "region": region,
        "endpoint_url": cloud.endpoint_url,
        **local_credentials(session),
        "image": cloud.image_id if image_in is None else image_in(region),
        "username": cloud.default_username,
        "install_packages": False,
    }
    checkip = str(getattr(cloud, "checkip_url", "") or "")
    if checkip:  # instances behind the cloud's router: this machine as they see it
        defaults["checkip_url"] = checkip
    else:  # instances on the machine's loopback
        defaults["ssh_cidr"] = "127.0.0.1/32"
    defaults.update(options)
    return Manager(**defaults)
