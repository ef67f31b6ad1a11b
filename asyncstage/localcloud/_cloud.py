"""LocalCloud: the async face of the embedded cloud."""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import anyio

from asyncstage.localcloud._disks import Store
from asyncstage.localcloud._engine import Engine
from asyncstage.localcloud._hooks import ApiHooks, EngineHooks
from asyncstage.localcloud._hosts import LOGIN_USER
from asyncstage.localcloud._isolation import DeviceIsolation
from asyncstage.localcloud._network import NetworkMode
from asyncstage.localcloud._realism import Realism, resolve

if TYPE_CHECKING:
    from asyncstage.manager import Manager


class LocalCloud:
    """An EC2-compatible endpoint on this machine with real hosts and block devices.

    ``async with LocalCloud() as cloud:`` starts moto's EC2 API on ``127.0.0.1`` (a free
    port unless ``port`` is given) with hooks that make instances real isolated hosts
    (namespaces, an overlay of ``/``, their own sshd) and volumes real loop devices.
    Leaving the block kills every host and frees every loop device, mount, namespace,
    route and state it made — also on an exception or cancellation. Needs root.

    Instances stay ``pending`` until their sshd answers, plus ``boot_delay`` seconds.
    State lives in a temporary directory unless ``state_dir`` is given (one cloud per
    state dir: a second one gets ``StateDirInUse``). The API accepts only requests
    signed with its own credentials (:meth:`session_kwargs`). Its random choices (NVMe
    device numbers, delays, consistency windows) come from ``seed`` (or a random one
    that the log names); ``ASYNCSTAGE_LOCAL_SEED=N`` in the environment replays them.

    ``realism="aws"`` (the default) plays EC2's behaviour with times scaled down to
    seconds (:class:`~asyncstage.localcloud.Realism` lists each one); ``realism="harsh"``
    hides every new id for a while, not only some (for tests of retries);
    ``realism="off"`` is the instant cloud. ``api_rate`` scales EC2's API token buckets (1.0: AWS's
    published sizes and rates; smaller is stricter; None: unlimited);
    ``insufficient_capacity`` names zones (or zone -> instance types) where RunInstances
    and StartInstances answer ``InsufficientInstanceCapacity``.

    ``device_isolation`` chooses how instances are kept off the machine's block devices:
    ``"auto"`` (the default) the cgroup v1 ``devices`` controller if the machine has it,
    else a cgroup v2 device BPF program; ``"v1"`` or ``"bpf"`` that one only. Where none
    works the cloud refuses to start (:class:`~asyncstage.localcloud.errors.NoDeviceIsolation`,
    naming what is missing) unless given ``"none"``, which accepts that root in an
    instance can reach the machine's disks. :attr:`device_isolation` says which is in force.

    ``network`` chooses where instances live: ``"vpc"`` each in a network namespace of
    its own, at its private address from its subnet's CIDR, behind the cloud's router,
    which NATs public addresses (of ``198.18.0.0/15``) to them (the machine reaches only
    those, as a controller outside the VPC does on EC2), security groups enforced;
    ``"auto"`` (the default) ``"vpc"`` where the machine can make it (``ip``, ``nft``,
    network namespaces), else ``"loopback"``, with the reason in the log; ``"loopback"``
    on the machine's own loopback addresses (127.x, a private and a public one each;
    security groups recorded, not enforced), the fallback for machines without network
    namespaces or nftables. :attr:`network` says which is in force; :attr:`checkip_url`
    is the cloud's checkip service.

    ``store`` chooses where the volumes' and snapshots' images live: ``"plain"`` (the
    default) files in the state dir, each snapshot and each volume made from one a copy
    of its data (instant where the state dir's filesystem shares blocks: xfs, btrfs);
    ``"reflink"`` an XFS filesystem of the cloud's own (a sparse file in the state dir,
    on a loop device of its own, removed with the cloud), where they share their
    source's blocks at once, as EBS's incremental snapshots do (needs ``mkfs.xfs``).
    """

    def __init__(
        self,
        *,
        boot_delay: float = 0.0,
        state_dir: str | os.PathLike[str] | None = None,
        region: str = "us-east-1",
        port: int = 0,
        realism: Literal["aws", "off", "harsh"] | Realism = "aws",
        api_rate: float | Literal["default"] | None = "default",
        insufficient_capacity: Iterable[str] | Mapping[str, Iterable[str] | None] | None = None,
        seed: int | None = None,
        device_isolation: DeviceIsolation = "auto",
        network: NetworkMode = "auto",
        store: Store = "plain",
    ) -> None:
        self.realism = resolve(
            realism, api_rate=api_rate, insufficient_capacity=insufficient_capacity
        )
        self._engine = Engine(
            boot_delay=boot_delay,
            state_dir=state_dir,
            region=region,
            port=port,
            api=_make_api,
            seed=seed,
            realism=self.realism,
            device_isolation=device_isolation,
            network=network,
            store=store,
        )
        self.region = region
        self.image_name = self._engine.image_name
        self.default_username = LOGIN_USER

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the EC2 API (empty before the cloud started)."""
        return self._engine.endpoint_url

    @property
    def store(self) -> str:
        """Where the volumes' and snapshots' images live: ``"plain"`` or ``"reflink"``."""
        return self._engine.store

    @property
    def device_isolation(self) -> str:
        """How instances are kept off the machine's disks: ``"v1"`` (cgroup v1 devices
        controller), ``"bpf"`` (cgroup v2 device program) or ``"none"`` once started;
        what was asked for before."""
        return self._engine.device_isolation

    @property
    def network(self) -> str:
        """Where instances live once started: ``"vpc"`` (namespaces behind the cloud's
        router) or ``"loopback"`` (the machine's loopback addresses); what was asked for
        before."""
        return self._engine.network

    @property
    def checkip_url(self) -> str:
        """The cloud's checkip.amazonaws.com: an HTTP GET answers the caller's address as
        the cloud's edge sees it (an instance's public address, or the machine's own on
        the cloud's network); "" with ``network="loopback"`` or before the start."""
        return self._engine.checkip_url

    @property
    def seed(self) -> int:
        """The seed of the cloud's random choices (pass it back to replay them)."""
        return self._engine.seed

    @property
    def image_id(self) -> str:
        """The AMI id of the local image (named :attr:`image_name`)."""
        return self._engine.image_id

    def image_id_in(self, region: str) -> str:
        """The AMI id of the local image in ``region`` (each region has its own ids)."""
        return self._engine.api.image_in(region)

    def set_snapshot_start_time(self, snapshot_id: str, when: datetime) -> None:
        """Give a snapshot another ``StartTime`` (any region's), as DescribeSnapshots shows it.

        Not an EC2 operation (EC2's StartTime is the moment of CreateSnapshot): it lets
        tests of retention make snapshots of many dates at once. ``when`` is aware, or UTC.
        """
        self._engine.api.set_start_time(snapshot_id, when)

    @property
    def account_id(self) -> str:
        """The cloud's own account id (its records are kept apart from other clouds')."""
        return self._engine.account

    @property
    def api_calls(self) -> collections.Counter[str]:
        """How many times each EC2 Action reached the endpoint."""
        return self._engine.api_calls

    @property
    def throttled(self) -> collections.Counter[str]:
        """How many requests of each Action were answered ``RequestLimitExceeded``."""
        return self._engine.throttled

    @property
    def state_dir(self) -> str:
        """Where volumes, snapshots and instance state live while the cloud runs."""
        return str(self._engine.state_dir)

    def session_kwargs(
        self, region: str | None = None, *, read_only: bool = False
    ) -> dict[str, str]:
        """What an aioboto3 session or client needs: endpoint, region, the credentials.

        One cloud serves every EC2 region, each taken from the signature of a request
        (its SigV4 credential scope): ``region`` (default: the cloud's own) is the one
        the client signs for.

        The credentials (``aws_access_key_id``, ``aws_secret_access_key``) are the cloud's
        own, random; also in ``<state_dir>/credentials`` (0600, an AWS shared-credentials
        file) while it runs. Requests signed otherwise get EC2's ``AuthFailure``.

        ``read_only=True``: the cloud's second pair (profile ``read-only`` of that file),
        which may call only ``Describe*`` and ``Get*``, a small stand-in for an IAM
        policy: anything else is answered ``UnauthorizedOperation``.
        """
        engine = self._engine
        pair = engine.read_only_credentials if read_only else engine.credentials
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": region or self.region,
            **pair.as_kwargs(),
        }

    async def start(self) -> None:
        """Start the cloud (what ``async with`` does)."""
        try:
            await anyio.to_thread.run_sync(self._engine.start)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._engine.close)
            raise

    async def close(self) -> None:
        """Stop the cloud and remove everything it made; idempotent."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._engine.close)

    async def __aenter__(self) -> LocalCloud:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def manager(self, *, read_only: bool = False, **options: Any) -> Manager:
        """A :class:`asyncstage.Manager` for this cloud: ``async with cloud.manager() as m``.

        ``cloud.manager(region="eu-west-1")`` manages that region of the same cloud
        (its own zones, image id, key pairs, volumes and snapshots).
        ``read_only=True``: signed with the read-only pair (:meth:`session_kwargs`).
        """
        from asyncstage.manager import local_manager

        if read_only:
            creds = self.session_kwargs(read_only=True)
            options = {k: v for k, v in creds.items() if k.startswith("aws_")} | options
        return local_manager(self, **options)


def _make_api(engine: EngineHooks) -> ApiHooks:
    """The cloud's API (moto is imported only when a cloud starts)."""
    from asyncstage.localcloud._api import LocalApi

    return LocalApi(engine)
