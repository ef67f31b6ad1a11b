"""The engine of the local cloud: hosts, disks, the API server and their threads.

Blocking and thread-based on purpose: moto's server answers in its own threads, and
the engine's work (boot a host, kill it, copy an image) is blocking system work. One
lock (``lock``) guards moto's records and the engine's tables; the API request threads
hold it while moto and the backend hooks run, the worker threads take it to change a
state. :class:`~asyncstage.localcloud.LocalCloud` drives ``start()`` and ``close()``
from worker threads so that the event loop never blocks.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncstage.errors import LocalCloudError
from asyncstage.localcloud._disks import Disk, copy_sparse
from asyncstage.localcloud._hosts import Host
from asyncstage.localcloud._registry import RunRecord, register
from asyncstage.localcloud._system import check_machine, run, which

if TYPE_CHECKING:
    from werkzeug.serving import BaseWSGIServer

    from asyncstage.localcloud._moto import LocalBackend

log = logging.getLogger("asyncstage.localcloud")

IMAGE_NAME = "asyncstage-local-debian-12"
SSHD_TIMEOUT = 120.0  # a host whose sshd does not answer by then failed to boot
_BAD_PATH_CHARS = set(",:\\ \t\n")
_ACCOUNTS: set[tuple[str, str]] = set()  # (account, region) of the clouds in this process
_ACCOUNTS_LOCK = threading.Lock()


@dataclass
class _Machine:
    """An instance's host and what the engine knows about it."""

    host: Host
    wanted: str = "running"  # running | stopped | terminated
    ready: bool = False  # booted: its /dev takes device nodes
    prepared: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    op_lock: threading.Lock = field(default_factory=threading.Lock)
    boots: int = 0  # counts boots: a pending-time timer of an earlier boot does nothing


class Engine:
    """Everything of one local cloud; blocking, thread-safe."""

    def __init__(
        self, *, boot_delay: float, state_dir: str | os.PathLike[str] | None, region: str, port: int
    ) -> None:
        self.boot_delay = boot_delay
        self.region = region
        self.port = port
        self.account = os.environ.get("MOTO_ACCOUNT_ID") or "".join(
            str(secrets.randbelow(10)) for _ in range(12)
        )
        self.image_name = IMAGE_NAME
        self.image_id = ""
        self.endpoint_url = ""
        self.api_calls: collections.Counter[str] = collections.Counter()
        self.lock = threading.RLock()
        self.machines: dict[str, _Machine] = {}
        self.disks: dict[str, Disk] = {}
        self.snapshots: dict[str, Path] = {}
        self.consoles: dict[str, str] = {}  # terminated instances' last console
        self._given_state_dir = None if state_dir is None else Path(state_dir)
        self.state_dir = Path()
        self._record: RunRecord | None = None
        self._roots_mounted = False
        self._backend: LocalBackend | None = None
        self._server: BaseWSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self._workers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="localcloud")
        self._next_address = 10
        self._closed = False
        self._account_claimed = False

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
        self._record = RunRecord(self.state_dir, created)
        register(self._record)  # cleans crashed runs, claims an address block
        for sub in ("instances", "volumes", "snapshots", "roots"):
            (self.state_dir / sub).mkdir(mode=0o700, exist_ok=True)
        roots = self.state_dir / "roots"
        self._record.add_mount(roots)
        run(
            which("mount"),
            "-t",
            "tmpfs",
            "-o",
            "mode=0700",
            "asyncstage-roots",
            roots,
            what="mount",
        )
        self._roots_mounted = True
        self._start_api()

    def _start_api(self) -> None:
        try:
            from werkzeug.serving import make_server

            from asyncstage.localcloud import _moto
        except ImportError as e:
            raise LocalCloudError(
                "the local cloud needs moto: pip install 'asyncstage[local]'"
            ) from e
        from moto.moto_server.werkzeug_app import MotoRequestHandler

        class _QuietHandler(MotoRequestHandler):
            def log_request(self, *args: Any) -> None:
                pass

        with self.lock:
            backend = _moto.make_backend(self.region, self.account)
            self._backend = backend
            image = backend.register_image(
                name=IMAGE_NAME,
                description="Debian 12: this machine's root, copy-on-write (asyncstage)",
            )
            image.architecture = "x86_64"
            image.virtualization_type = "hvm"
            image.hypervisor = "xen"
            image.root_device_type = "ebs"
            image.root_device_name = "/dev/xvda"
            self.image_id = image.id
            backend.engine = self
        self._server = make_server(
            "127.0.0.1",
            self.port,
            _moto.make_app(self),
            threaded=True,
            request_handler=_QuietHandler,
        )
        self.port = self._server.server_address[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._server_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="localcloud-api",
            daemon=True,
        )
        self._server_thread.start()

    def ensure_installed(self) -> None:
        if self._backend is not None:
            from asyncstage.localcloud._moto import install_backend

            install_backend(self._backend)

    def close(self) -> None:
        """Stop the API, kill every host, free every loop device, remove the state."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._server_thread is not None:
            self._server_thread.join(timeout=10)
        with self.lock:
            for machine in self.machines.values():
                machine.wanted = "terminated"
                machine.cancel.set()
        self._workers.shutdown(wait=True, cancel_futures=True)
        for machine in list(self.machines.values()):
            with machine.op_lock:
                machine.host.kill()
        for disk in list(self.disks.values()):
            loop = disk.loop
            disk.detach()
            if loop is not None and self._record is not None:
                self._record.remove_loop(loop)
        if self._backend is not None:
            from asyncstage.localcloud._moto import uninstall_backend

            self._backend.engine = None
            uninstall_backend(self._backend)
        if self._account_claimed:
            with _ACCOUNTS_LOCK:
                _ACCOUNTS.discard((self.account, self.region))
        if self._roots_mounted:
            roots = self.state_dir / "roots"
            try:
                _unmount(roots)
                if self._record is not None:
                    self._record.remove_mount(roots)
            except LocalCloudError as e:
                errors.append(str(e))
        if self._record is not None and not errors:
            if self._record.data["created_state_dir"]:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            else:
                for sub in ("instances", "volumes", "snapshots", "roots"):
                    shutil.rmtree(self.state_dir / sub, ignore_errors=True)
            self._record.close()
        if errors:
            raise LocalCloudError("local cloud cleanup incomplete: " + "; ".join(errors))

    # -- addresses ---------------------------------------------------------------------

    def new_address(self) -> str:
        """A loopback address of this run's block where nothing listens on port 22."""
        assert self._record is not None
        block = 100 + self._record.block
        while self._next_address < 256 * 254:
            i = self._next_address
            self._next_address += 1
            address = f"127.{block}.{i // 254}.{i % 254 + 1}"
            if _port_free(address, 22):
                return address
        raise LocalCloudError(f"no free address left in 127.{block}.0.0/16")

    # -- instances (called by the API under self.lock) ---------------------------------

    def launched(self, instance_id: str, address: str, public_key: str | None) -> None:
        assert self._record is not None
        host = Host(
            instance_id=instance_id,
            address=address,
            state_dir=self.state_dir / "instances" / instance_id,
            root_dir=self.state_dir / "roots" / instance_id,
            public_key=public_key,
            on_pid=self._record.add_pid,
        )
        machine = _Machine(host)
        self.machines[instance_id] = machine
        self._submit(self._boot, machine)

    def start_instance(self, instance_id: str) -> None:
        machine = self.machines[instance_id]
        machine.wanted = "running"
        machine.cancel.clear()
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

    def console(self, instance_id: str) -> str | None:
        machine = self.machines.get(instance_id)
        if machine is not None:
            return machine.host.console()
        return self.consoles.get(instance_id)

    def _submit(self, job: Callable[[_Machine], None], machine: _Machine) -> None:
        if not self._closed:
            self._workers.submit(self._guarded, job, machine)

    def _guarded(self, job: Callable[[_Machine], None], machine: _Machine) -> None:
        try:
            job(machine)
        except Exception:
            log.exception("local cloud: %s of %s failed", job.__name__, machine.host.instance_id)

    def _instance(self, instance_id: str) -> Any:
        assert self._backend is not None
        return self._backend.get_instance(instance_id)

    def _boot(self, machine: _Machine) -> None:
        host = machine.host
        with machine.op_lock:
            if machine.wanted != "running" or self._closed:
                return
            try:
                if not machine.prepared:
                    host.prepare()
                    machine.prepared = True
                host.boot()
                if not host.wait_for_sshd(SSHD_TIMEOUT, machine.cancel.is_set):
                    return
                with self.lock:
                    if machine.wanted != "running":
                        return
                    for disk in self.disks.values():
                        if disk.instance_id == host.instance_id:
                            assert disk.name is not None and disk.rdev is not None
                            host.add_device(disk.name, disk.rdev, disk.volume_id)
                    machine.ready = True
                    machine.boots += 1
                    boot = machine.boots
                if self.boot_delay > 0:
                    # EC2's pending time runs on a timer, not on a worker: a fleet's
                    # instances all wait it out at once, however few the workers.
                    timer = threading.Timer(self.boot_delay, self._running, (machine, boot))
                    timer.daemon = True
                    timer.start()
                    return
                self._running(machine, boot, locked=True)
            except Exception as e:
                log.error("local cloud: %s failed to boot: %s", host.instance_id, e)
                host.kill()
                with self.lock:
                    machine.ready = False
                    instance = self._instance(host.instance_id)
                    if instance.state == "pending":
                        instance.stop()
                        instance._reason = f"Server.InternalError: {e}"
                raise

    def _running(self, machine: _Machine, boot: int, locked: bool = False) -> None:
        """The boot delay is over: pending -> running, unless stopped or booted again since."""
        from asyncstage.localcloud._moto import set_state

        if self._closed:
            return
        with contextlib.nullcontext() if locked else machine.op_lock, self.lock:
            if self._closed or machine.boots != boot or not machine.ready:
                return
            try:
                instance = self._instance(machine.host.instance_id)
                if machine.wanted == "running" and instance.state == "pending":
                    machine.host.write_console()
                    set_state(instance, "running")
            except Exception:
                if not locked:  # a timer thread: nobody else would see it
                    log.exception("local cloud: %s did not start", machine.host.instance_id)
                    return
                raise

    def _halt(self, machine: _Machine) -> None:
        host = machine.host
        with machine.op_lock:
            host.kill()
            with self.lock:
                machine.ready = False
                instance = self._instance(host.instance_id)
                if machine.wanted == "terminated":
                    # moto's terminate detaches the volumes (through volume_detaching)
                    instance.terminate()
                    self.consoles[host.instance_id] = host.console()
                    host.remove()
                    del self.machines[host.instance_id]
                elif machine.wanted == "stopped" and instance.state == "stopping":
                    instance.stop()
                machine.cancel.clear()

    # -- volumes and snapshots (called by the API under self.lock) ---------------------

    def volume_created(self, volume_id: str, size: int, source: Path | None) -> None:
        image = self.state_dir / "volumes" / f"{volume_id}.img"
        self.disks[volume_id] = Disk.create(volume_id, image, size, source)

    def volume_attached(self, volume_id: str, instance_id: str, name: str) -> None:
        assert self._record is not None
        disk = self.disks[volume_id]
        loop = disk.attach()
        self._record.add_loop(loop, disk.image)
        disk.instance_id = instance_id
        disk.name = name
        machine = self.machines[instance_id]
        if machine.ready and machine.host.alive:
            assert disk.rdev is not None
            try:
                machine.host.add_device(name, disk.rdev, volume_id)
            except OSError as e:
                self._free(disk)
                raise LocalCloudError(f"{volume_id}: cannot make its device node: {e}") from e

    def volume_detaching(self, volume_id: str) -> None:
        """Remove the volume's device node and loop device; refuse while it is mounted."""
        from moto.ec2.exceptions import EC2ClientError

        disk = self.disks[volume_id]
        machine = self.machines.get(disk.instance_id or "")
        if machine is not None and disk.major_minor is not None:
            mounts = machine.host.mounted_devices()
            where = mounts.get(disk.major_minor)
            if where is not None:
                raise EC2ClientError(
                    "VolumeInUse",
                    f"{volume_id} is mounted at {where} on {disk.instance_id}: unmount it "
                    "first (the local cloud refuses instead of waiting in EC2's 'busy' state)",
                )
            if disk.name is not None:
                machine.host.remove_device(disk.name, volume_id)
        self._free(disk)

    def _free(self, disk: Disk) -> None:
        loop = disk.loop
        disk.detach()
        if loop is not None and self._record is not None:
            self._record.remove_loop(loop)

    def volume_deleted(self, volume_id: str) -> None:
        disk = self.disks.pop(volume_id, None)
        if disk is not None:
            self._free(disk)
            disk.image.unlink(missing_ok=True)

    def snapshot_created(self, snapshot_id: str, source: Path) -> None:
        """Copy the image now (the snapshot's moment); report `completed` right after."""
        image = self.state_dir / "snapshots" / f"{snapshot_id}.img"
        copy_sparse(source, image)
        self.snapshots[snapshot_id] = image
        threading.Timer(0.05, self._snapshot_completed, args=(snapshot_id,)).start()

    def _snapshot_completed(self, snapshot_id: str) -> None:
        with self.lock:
            if self._backend is not None and snapshot_id in self._backend.snapshots:
                self._backend.snapshots[snapshot_id].status = "completed"

    def snapshot_deleted(self, snapshot_id: str) -> None:
        image = self.snapshots.pop(snapshot_id, None)
        if image is not None:
            image.unlink(missing_ok=True)


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


def _unmount(path: Path) -> None:
    """Unmount ``path``; waits a little for dying namespaces, then detaches lazily."""
    umount = which("umount")
    deadline = time.monotonic() + 5
    while True:
        try:
            run(umount, path, what="umount")
            return
        except LocalCloudError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    with contextlib.suppress(LocalCloudError):
        run(umount, "--lazy", path, what="umount --lazy")
        return
    raise LocalCloudError(f"cannot unmount {path}")
