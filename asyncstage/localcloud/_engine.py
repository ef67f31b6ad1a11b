"""The engine of the local cloud: hosts, disks and their threads.

Blocking and thread-based on purpose: the API server answers in its own threads, and
the engine's work (boot a host, kill it, copy an image) is blocking system work. One
lock (``lock``) guards the API's records and the engine's tables; the API request threads
hold it while moto and the backend hooks run, the worker threads take it to change a
state. The engine is the API's :class:`~._hooks.EngineHooks` and sees the API only as
:class:`~._hooks.ApiHooks`; it imports nothing of the API's.
:class:`~asyncstage.localcloud.LocalCloud` drives ``start()`` and ``close()`` from worker
threads so that the event loop never blocks.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from asyncstage.errors import InvalidArgument
from asyncstage.localcloud._auth import Credentials
from asyncstage.localcloud._devices import is_nitro, root_nodes
from asyncstage.localcloud._disks import STORES, Disk, Store
from asyncstage.localcloud._firewall import Firewalls, Policy
from asyncstage.localcloud._hooks import ApiHooks, EngineHooks
from asyncstage.localcloud._hosts import Host
from asyncstage.localcloud._isolation import ISOLATION_MODES, DeviceIsolation
from asyncstage.localcloud._machine import Machine
from asyncstage.localcloud._network import (
    Network,
    NetworkMode,
    Placement,
    add_unreachable,
    checked_mode,
    possible,
)
from asyncstage.localcloud._realism import Realism
from asyncstage.localcloud._registry import REGISTRY_DIR
from asyncstage.localcloud._run import _Run
from asyncstage.localcloud._storage import StorageEvents
from asyncstage.localcloud._system import check_machine
from asyncstage.localcloud.errors import LocalCloudError

log = logging.getLogger("asyncstage.localcloud")

IMAGE_NAME = "asyncstage-local-debian-12"
SSHD_TIMEOUT = 120.0  # a host whose sshd does not answer by then failed to boot
_BAD_PATH_CHARS = set(",:\\ \t\n")
_ACCOUNTS: set[tuple[str, str]] = set()  # (account, region) of the clouds in this process
_ACCOUNTS_LOCK = threading.Lock()


def _checked_isolation(value: DeviceIsolation) -> DeviceIsolation:
    if value not in ISOLATION_MODES:
        raise InvalidArgument(f"device_isolation={value!r}: one of {', '.join(ISOLATION_MODES)}")
    return value


def _random_account() -> str:
    """A 12-digit account id of the cloud's own (moto's default is a fixed one)."""
    return "".join(str(secrets.randbelow(10)) for _ in range(12))


def _seed(seed: int | None) -> int:
    """The seed asked for, else ``ASYNCSTAGE_LOCAL_SEED`` (to replay a run), else random."""
    if seed is None and os.environ.get("ASYNCSTAGE_LOCAL_SEED", "").isdigit():
        seed = int(os.environ["ASYNCSTAGE_LOCAL_SEED"])
    return secrets.randbits(32) if seed is None else seed


class Engine(StorageEvents):
    """Everything of one local cloud; blocking, thread-safe.

    ``api`` makes the cloud's API (:class:`~._api.LocalApi`) once the engine is ready
    for it; the engine sees it only as :class:`~._hooks.ApiHooks`, and the API sees the
    engine only as :class:`~._hooks.EngineHooks`.
    """

    def __init__(
        self,
        *,
        boot_delay: float,
        state_dir: str | os.PathLike[str] | None,
        region: str,
        port: int,
        api: Callable[[EngineHooks], ApiHooks],
        seed: int | None = None,
        realism: Realism | None = None,
        device_isolation: DeviceIsolation = "auto",
        network: NetworkMode = "auto",
        store: Store = "plain",
    ) -> None:
        self._isolation_wanted = _checked_isolation(device_isolation)
        if store not in STORES:
            raise InvalidArgument(f"store={store!r}: one of {', '.join(STORES)}")
        self.store: Store = store
        self._network_wanted = checked_mode(network)
        # what was asked for; once started the network in force: "vpc" or "loopback"
        self.network: str = network
        self.net: Network | None = None
        # what was asked for; once started the mechanism in force: "v1", "bpf" or "none"
        self.device_isolation: str = device_isolation
        self.boot_delay = boot_delay
        self.realism = Realism() if realism is None else realism
        self.region = region
        self.port = port
        self.account = os.environ.get("MOTO_ACCOUNT_ID") or _random_account()
        self.credentials = Credentials.generate()
        self.read_only_credentials = Credentials.generate()  # Describe*/Get* only (_iam)
        self.seed = _seed(seed)
        self.random = random.Random(self.seed)  # every random choice: replayable with the seed
        self.image_name = IMAGE_NAME
        self.image_id = ""
        self.endpoint_url = ""
        self.api_calls: collections.Counter[str] = collections.Counter()
        self.throttled: collections.Counter[str] = collections.Counter()
        self.lock = threading.RLock()
        self.machines: dict[str, Machine] = {}
        self.disks: dict[str, Disk] = {}
        self.snapshots: dict[str, Path] = {}
        self.consoles: dict[str, str] = {}  # terminated instances' last console
        self._given_state_dir = None if state_dir is None else Path(state_dir)
        self.state_dir = Path()
        self._run = _Run()
        self._make_api = api
        self._api: ApiHooks | None = None
        self._workers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="localcloud")
        self.firewalls = Firewalls(self.lock, self._firewalled, self._security_policies)
        self._next_address = 10
        self._closed = False
        self._account_claimed = False
        self._start_storage()

    # -- life --------------------------------------------------------------------------

    def start(self) -> None:
        """Check the machine, clean up crashed runs, start the API server."""
        check_machine()
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        _check_port_22()
        with _ACCOUNTS_LOCK:
            if (self.account, self.region) in _ACCOUNTS:
                raise LocalCloudError(
                    f"a local cloud of account {self.account} ({self.region}) already runs in "
                    "this process (MOTO_ACCOUNT_ID is set: unset it to run several)"
                )
            _ACCOUNTS.add((self.account, self.region))
            self._account_claimed = True
        if self._given_state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="asyncstage-localcloud-"))
            created = True
        else:
            self.state_dir = self._given_state_dir.absolute()
            created = not self.state_dir.exists()
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _BAD_PATH_CHARS & set(str(self.state_dir)):
            raise LocalCloudError(
                f"state dir {self.state_dir}: overlayfs cannot use a path with "
                "commas, colons, backslashes or white space"
            )
        self._run.start(self.state_dir, created, self._isolation_wanted, self.store)
        self.device_isolation = self._run.isolation
        self._start_network()
        self.credentials.write(
            self.state_dir / "credentials", {"read-only": self.read_only_credentials}
        )
        self._api = self._make_api(self)
        self.image_id = self._api.image_id
        self.endpoint_url = self._api.endpoint_url
        log.info("local cloud at %s (seed %d)", self.endpoint_url, self.seed)

    def _start_network(self) -> None:
        """The cloud's own network (``network="vpc"``), or loopback addresses."""
        record = self._run.record
        assert record is not None
        why = possible() if self._network_wanted != "loopback" else "loopback asked for"
        if why is None:
            self.net = Network(
                record.token,
                self._run.block,
                claim_route=lambda prefix: record.claim_route(prefix, add_unreachable),
                release_routes=record.release_routes,
            )
            try:
                self.net.start()
            except LocalCloudError as e:
                self.net.close()
                self.net = None
                why = str(e)
        if self.net is not None:
            self.network = "vpc"
        elif self._network_wanted == "vpc":
            raise LocalCloudError(f"the local cloud cannot make its network here: {why}")
        else:
            self.network = "loopback"
        log.info("local cloud: network: %s", self.network if why is None else f"loopback ({why})")

    @property
    def checkip_url(self) -> str:
        """The cloud's checkip service ("" without the cloud's network)."""
        return self.net.checkip_url if self.net is not None else ""

    def close(self) -> None:
        """Stop the API, kill every host, free every loop device, remove the state."""
        if self._closed:
            return
        self._closed = True
        if self._api is not None:
            self._api.close()
        with self.lock:
            for machine in self.machines.values():
                machine.wanted = "terminated"
                machine.cancel.set()
        self._stop_copies()  # (and a boot waiting for one goes on, to its cancel)
        self._workers.shutdown(wait=True, cancel_futures=True)
        self.firewalls.close()
        for machine in list(self.machines.values()):
            with machine.op_lock:
                machine.host.kill()
                if machine.host.cgroup is not None:  # and its device program's fd
                    machine.host.cgroup.remove()
        for disk in list(self.disks.values()):
            self._free(disk)
        if self.net is not None:
            self.net.close()
        if self._account_claimed:
            with _ACCOUNTS_LOCK:
                _ACCOUNTS.discard((self.account, self.region))
        self._run.close()

    # -- addresses ---------------------------------------------------------------------

    def new_address(self) -> str:
        """A loopback address of this run's block where nothing listens on port 22."""
        block = 100 + self._run.block
        while self._next_address < 256 * 254:
            i = self._next_address
            self._next_address += 1
            address = f"127.{block}.{i // 254}.{i % 254 + 1}"
            if _port_free(address, 22):
                return address
        raise LocalCloudError(f"no free address left in 127.{block}.0.0/16")

    def new_public_address(self) -> str:
        """A public address no instance holds: of the cloud's range on its network."""
        if self.net is None:
            return self.new_address()
        with self.lock:
            taken = {m.host.public_address for m in self.machines.values()}
            return self.net.new_public_address(taken)

    # -- instances (called by the API under self.lock) ---------------------------------

    def launched(
        self,
        instance_id: str,
        address: str,
        public_address: str,
        public_key: str | None,
        instance_type: str,
        placement: Placement | None = None,
        user_data: bytes | None = None,
    ) -> None:
        """A new instance at its private ``address`` (for life) and ``public_address``
        ("": none), in ``placement`` (its VPC and subnet) on the cloud's network;
        ``user_data`` its launch's (cloud-config ``ssh_keys`` honoured at its first boot,
        unless ``realism.cloud_init`` is off: an image without cloud-init)."""
        record = self._run.record
        assert record is not None
        cgroup = self._run.instance_cgroup(instance_id)
        host = Host(
            instance_id=instance_id,
            address=address,
            public_address=public_address,
            state_dir=self.state_dir / "instances" / instance_id,
            root_dir=self.state_dir / "roots" / instance_id,
            public_key=public_key,
            on_pid=record.add_pid,
            cgroup=cgroup,
            freezer=self._run.instance_freezer(instance_id, cgroup),
            masked=[self.state_dir, REGISTRY_DIR],
            user_data=user_data if self.realism.cloud_init else None,
        )
        machine = Machine(host, nitro=is_nitro(instance_type), placement=placement)
        self.machines[instance_id] = machine
        self._submit(self._boot, machine)
        self.security_changed()  # a new member of its groups

    def start_instance(self, instance_id: str, public_address: str | None = None) -> None:
        """Boot a stopped instance again (at a new ``public_address``, if given; "": none)."""
        machine = self.machines[instance_id]
        if public_address is not None:
            machine.host.public_address = public_address
        machine.wanted = "running"
        machine.cancel.clear()
        machine.launched = time.monotonic()
        self._submit(self._boot, machine)

    def stop_instance(self, instance_id: str) -> None:
        machine = self.machines[instance_id]
        machine.wanted = "stopped"
        machine.cancel.set()
        self._submit(self._halt, machine)

    def terminate_instance(self, instance_id: str) -> None:
        machine = self.machines[instance_id]
        machine.wanted = "terminated"
        machine.cancel.set()
        self._submit(self._halt, machine)

    def console(self, instance_id: str, latest: bool = False) -> str | None:
        """The console as GetConsoleOutput shows it: a boot's output only after a while.

        EC2 makes it available minutes after the boot (``realism.console``); with
        ``Latest=True`` a Nitro instance shows it current (``realism.console_latest``);
        the API refuses Latest on a Xen one, as EC2 does.
        """
        machine = self.machines.get(instance_id)
        if machine is None:
            return self.consoles.get(instance_id)
        shown_at = machine.console_latest_at if latest and machine.nitro else machine.console_at
        if time.monotonic() < shown_at:
            return machine.host.console(upto=machine.console_shown)
        return machine.host.console()

    def _submit(self, job: Callable[[Machine], None], machine: Machine) -> None:
        if not self._closed:
            self._workers.submit(self._guarded, job, machine)

    def _guarded(self, job: Callable[[Machine], None], machine: Machine) -> None:
        try:
            job(machine)
        except Exception:
            log.exception("local cloud: %s of %s failed", job.__name__, machine.host.instance_id)

    @property
    def api(self) -> ApiHooks:
        assert self._api is not None
        return self._api

    def _boot(self, machine: Machine) -> None:
        host = machine.host
        if self._launch_fails(machine):
            # EC2 sometimes loses a new instance: pending -> terminated, with a StateReason
            with self.lock:
                machine.wanted = "terminated"
            self._halt(machine)
            with self.lock:
                self.api.launch_failed(host.instance_id, "Internal error on launch")
            return
        with machine.op_lock:
            if machine.wanted != "running" or self._closed:
                return
            try:
                if not machine.prepared:
                    host.prepare()
                    machine.prepared = True
                self._connect(machine)
                if host.netns:  # its security groups, before sshd listens: from the first packet
                    self.firewalls.booted(host.instance_id, host.netns)
                host.boot()
                if not host.wait_for_sshd(SSHD_TIMEOUT, machine.cancel.is_set):
                    return
                with self.lock:
                    # no device node while a snapshot of a volume is copied (lock let go)
                    mine = [
                        d for d, disk in self.disks.items() if disk.instance_id == host.instance_id
                    ]
                    self.wait_copied(mine)
                    if machine.wanted != "running":
                        return
                    self._add_devices(machine)
                    machine.ready = True
                    self.security_changed()  # any change since its table was made
                    machine.boots += 1
                    boot = machine.boots
                # EC2's pending time runs on a timer, not on a worker: a fleet's
                # instances all wait it out at once, however few the workers.
                since = time.monotonic() - machine.launched
                delay = max(self.boot_delay, self.realism.pending - since)
                if delay > 0:
                    timer = threading.Timer(delay, self._running, (machine, boot))
                    timer.daemon = True
                    timer.start()
                    return
                self._running(machine, boot, locked=True)
            except Exception as e:
                log.error("local cloud: %s failed to boot: %s", host.instance_id, e)
                host.kill()
                with self.lock:
                    machine.ready = False
                    self.api.boot_failed(host.instance_id, str(e))
                raise

    def _connect(self, machine: Machine) -> None:
        """The host's namespace on the cloud's network, its public address NATed to it."""
        host = machine.host
        if self.net is None or machine.placement is None:
            return
        host.netns = self.net.attach(host.instance_id, machine.placement, host.address)
        if host.public_address:
            self.net.publish(host.instance_id, host.public_address)

    def _launch_fails(self, machine: Machine) -> bool:
        """A first boot that ``realism.launch_failure`` (seeded) makes fail."""
        if machine.prepared or machine.boots or self.realism.launch_failure <= 0:
            return False
        with self.lock:
            return self.random.random() < self.realism.launch_failure

    def _add_devices(self, machine: Machine) -> None:
        """The root device's nodes and those of the attached volumes, in a booted host."""
        host = machine.host
        root = self._run.root_disk
        if root is not None and root.rdev is not None and root.part_rdev is not None:
            disk_node, part_node = root_nodes(machine.nitro)
            serial = self.api.root_volume(host.instance_id) if machine.nitro else None
            host.add_device(disk_node, root.rdev, serial, read_only=True)
            host.add_device(part_node, root.part_rdev, None, read_only=True)
        for disk in self.disks.values():
            if disk.instance_id == host.instance_id:
                assert disk.name is not None and disk.rdev is not None
                host.add_device(disk.name, disk.rdev, disk.serial)

    def _running(self, machine: Machine, boot: int, locked: bool = False) -> None:
        """The boot delay is over: pending -> running, unless stopped or booted again since."""
        if self._closed:
            return
        with contextlib.nullcontext() if locked else machine.op_lock, self.lock:
            if self._closed or machine.boots != boot or not machine.ready:
                return
            try:
                instance_id = machine.host.instance_id
                if (
                    machine.wanted == "running"
                    and self.api.instance_state(instance_id) == "pending"
                ):
                    self._write_console(machine)
                    self.api.set_running(instance_id)
            except Exception:
                if not locked:  # a timer thread: nobody else would see it
                    log.exception("local cloud: %s did not start", machine.host.instance_id)
                    return
                raise

    def _write_console(self, machine: Machine) -> None:
        """This boot's console output, shown after the delays the realism draws."""
        machine.console_shown = machine.host.console_length()
        machine.host.write_console()
        now, realism = time.monotonic(), self.realism
        machine.console_at = now + self.random.uniform(*realism.console)
        machine.console_latest_at = now + self.random.uniform(*realism.console_latest)

    def _halt(self, machine: Machine) -> None:
        host = machine.host
        with machine.op_lock:
            host.kill()
            with self.lock:
                self.host_halted(host.instance_id)
                machine.ready = False  # out of the firewalls' refreshes
                gone = machine.wanted == "terminated"  # final once so
            if self.net is not None:  # out of the cloud's lock: the kernel takes its time
                self.net.unpublish(host.instance_id)
                if gone:  # its namespace goes before it is reported terminated
                    self.net.remove(host.instance_id)
            with self.lock:
                if gone:
                    self.api.halted(host.instance_id, terminated=True)
                    self.consoles[host.instance_id] = host.console()
                    host.netns = ""
                    host.remove()
                    del self.machines[host.instance_id]
                    self.security_changed()  # no longer a member of its groups
                elif machine.wanted == "stopped":
                    self.api.halted(host.instance_id, terminated=False)
                machine.cancel.clear()

    # -- security groups (called under self.lock) --------------------------------------

    def security_changed(self) -> None:
        """Groups, rules or members changed: every instance's table follows shortly."""
        if any(m.host.netns for m in self.machines.values()):
            self.firewalls.changed()

    def _firewalled(self) -> dict[str, str]:
        """The running instances that have a network namespace: id -> its name."""
        return {
            i: m.host.netns
            for i, m in self.machines.items()
            if m.host.netns and m.ready and m.wanted == "running"
        }

    def _security_policies(self, instance_ids: list[str]) -> dict[str, Policy]:
        return self.api.security_policies(instance_ids)


def _check_port_22() -> None:
    """Refuse when something listens on the wildcard address port 22 (it takes them all)."""
    for table, wildcard in (
        ("/proc/net/tcp", "00000000:0016"),
        ("/proc/net/tcp6", "0" * 32 + ":0016"),
    ):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(line.split()[1] == wildcard and line.split()[3] == "0A" for line in lines):
            raise LocalCloudError(
                "something listens on port 22 of every address (the machine's sshd?): "
                "instances need port 22 on their own loopback addresses; give that sshd a "
                "ListenAddress (e.g. your external address) or another Port"
            )


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True
