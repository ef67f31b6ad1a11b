"""The two faces the local cloud's halves show each other, declared.

The engine (hosts, disks, threads: :mod:`._engine`) and the API (moto's records and the
WSGI app: :mod:`._moto`, :mod:`._api`) call each other. Neither imports the other: each
sees the other only through the protocol here, and :class:`~._cloud.LocalCloud` wires
them together.
"""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Protocol

from asyncstage.localcloud._auth import Credentials
from asyncstage.localcloud._disks import Disk
from asyncstage.localcloud._firewall import Policy
from asyncstage.localcloud._network import Placement
from asyncstage.localcloud._realism import Realism


class ApiRefusal(Exception):
    """The engine refuses an operation; the API answers with EC2's ``code`` and the message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class EngineHooks(Protocol):
    """What the API calls on the engine (under :attr:`lock`, from request threads)."""

    lock: threading.RLock
    api_calls: collections.Counter[str]
    throttled: collections.Counter[str]  # requests answered RequestLimitExceeded, by Action
    account: str
    region: str
    image_name: str
    port: int  # the API's port (0 asks for a free one; the API sets the one it bound)
    credentials: Credentials
    read_only_credentials: Credentials  # may call Describe*/Get* only (_iam)
    realism: Realism
    random: random.Random  # every random choice draws from it (the cloud's seed)

    @property
    def disks(self) -> Mapping[str, Disk]:
        """Volume id -> its image and attachment."""

    @property
    def snapshots(self) -> Mapping[str, Path]:
        """Snapshot id -> its image."""

    network: str  # the network in force: "vpc" or "loopback"

    def new_address(self) -> str: ...
    def new_public_address(self) -> str: ...
    def launched(
        self,
        instance_id: str,
        address: str,
        public_address: str,
        public_key: str | None,
        instance_type: str,
        placement: Placement | None = None,
        user_data: bytes | None = None,
    ) -> None: ...
    def start_instance(self, instance_id: str, public_address: str | None = None) -> None: ...
    def stop_instance(self, instance_id: str) -> None: ...
    def terminate_instance(self, instance_id: str) -> None: ...
    def console(self, instance_id: str, latest: bool = False) -> str | None: ...
    def volume_created(self, volume_id: str, size: int, source: Path | None) -> bool:
        """Make its image; True: a copy of ``source`` under way (``copy_done`` ends it)."""

    def volume_attached(self, volume_id: str, instance_id: str, device: str) -> bool: ...
    def volume_detaching(self, volume_id: str, *, force: bool = False) -> str | None: ...
    def volume_deleted(self, volume_id: str) -> None: ...
    def snapshot_created(self, snapshot_id: str, source: Path) -> None:
        """Start the copy of ``source`` for the snapshot (``copy_done`` ends it)."""

    def snapshot_deleted(self, snapshot_id: str) -> None: ...
    def instance_frozen(self, instance_id: str) -> AbstractContextManager[None]: ...
    def wait_copied(self, volume_ids: Iterable[str]) -> None:
        """Wait (the lock released meanwhile) until no copy reads one of the volumes."""

    def security_changed(self) -> None:
        """Groups, their rules or their members changed: refresh the firewalls."""


class ApiHooks(Protocol):
    """What the engine calls on the API (its records of instances and snapshots)."""

    endpoint_url: str
    image_id: str  # the AMI instances boot (in the cloud's own region)

    def image_in(self, region: str) -> str:
        """The AMI id of the same image in ``region`` (each region has its own)."""

    def set_start_time(self, snapshot_id: str, when: datetime) -> None:
        """Set a snapshot's StartTime (not EC2: for tests of retention)."""

    def instance_state(self, instance_id: str) -> str: ...
    def set_running(self, instance_id: str) -> None: ...
    def boot_failed(self, instance_id: str, reason: str) -> None: ...
    def launch_failed(self, instance_id: str, message: str) -> None: ...
    def halted(self, instance_id: str, *, terminated: bool) -> None: ...
    def copy_done(self, resource_id: str, error: str | None) -> None:
        """The image of a new snapshot or volume is made (``error``: it failed)."""

    def attachment_done(self, volume_id: str) -> None: ...
    def root_volume(self, instance_id: str) -> str | None: ...
    def security_policies(self, instance_ids: Iterable[str]) -> dict[str, Policy]:
        """The instances' security groups, parsed (:mod:`._firewall`), read in one go;
        an instance that is not found is left out."""

    def close(self) -> None: ...
