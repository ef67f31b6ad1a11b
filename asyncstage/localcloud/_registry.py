"""The registry of local-cloud runs on this machine, and the cleanup of crashed ones.

Every running :class:`~asyncstage.localcloud.LocalCloud` keeps a record in
``/run/asyncstage-localcloud/<pid>-<token>.json``: its owner process, its state dir,
its address block, and every process, mount and loop device it made, updated as they
come and go. A run whose owner process is gone (a crash, ``kill -9``) is cleaned up by
the next local cloud that starts: it kills the recorded processes, unmounts the
recorded mounts (only if the mount there is still the run's own, known by its source
name, which carries the run's token), frees the recorded loop devices (only if they are
still bound to the recorded image: path, inode and device, so that a path now used by
something else is never touched) and removes the state dir if that run created it and
no live cloud holds it (a state dir is locked by its cloud: :func:`lock_state_dir`).
Nothing that a run did not record is touched.

Each run also owns one address block ``127.<100+n>.0.0/16`` so that clouds running at
the same time never hand out the same address.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncstage.localcloud._isolation import remove_cgroup_tree
from asyncstage.localcloud._network import del_unreachable, sweep
from asyncstage.localcloud._system import process_start_time, run, which
from asyncstage.localcloud.errors import LocalCloudError, StateDirInUse

REGISTRY_DIR = Path("/run/asyncstage-localcloud")
FIRST_BLOCK = 100  # 127.100.0.0/16 and up: far from 127.0.0.0/24, where test sshds listen
BLOCKS = 155


@dataclass(frozen=True)
class LoopId:
    """A loop device's backing file, told apart from any other file at that path."""

    image: str
    inode: int
    device: str  # "major:minor" of the filesystem holding the image

    @classmethod
    def of(cls, image: str | os.PathLike[str]) -> LoopId:
        st = os.stat(image)
        return cls(os.fspath(image), st.st_ino, f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}")


def lock_state_dir(state_dir: Path) -> int:
    """Lock ``state_dir`` for this cloud's life (an fd to close); StateDirInUse if taken."""
    fd = os.open(state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirInUse(
            f"state dir {state_dir} is in use by another local cloud (its lock "
            f"{state_dir / '.lock'} is held): stop that cloud or choose another state dir"
        ) from None
    return fd


def state_dir_locked(state_dir: Path) -> bool:
    """True when a live cloud holds ``state_dir``'s lock."""
    try:
        fd = os.open(state_dir / ".lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class RunRecord:
    """The registry entry of this run; every change is written at once."""

    def __init__(self, state_dir: Path, created_state_dir: bool) -> None:
        self._lock = threading.Lock()
        self.token = secrets.token_hex(4)
        self.path = REGISTRY_DIR / f"{os.getpid()}-{self.token}.json"
        self.data: dict[str, Any] = {
            "token": self.token,
            "owner": os.getpid(),
            "owner_start": process_start_time(os.getpid()),
            "state_dir": str(state_dir),
            "created_state_dir": created_state_dir,
            "block": None,
            "pids": {},  # pid -> start time
            "mounts": [],  # [path, source name]
            "loops": {},  # /dev/loopN -> [image path, inode, "major:minor" of its fs]
            "cgroups": [],  # device cgroups of the run (removed after its processes)
            "routes": [],  # the machine's unreachable routes the run claims (its network)
        }

    @property
    def block(self) -> int:
        return int(self.data["block"])

    def save(self) -> None:
        with self._lock:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.path)

    def add_pid(self, pid: int, alive: bool) -> None:
        with self._lock:
            if alive:
                self.data["pids"][str(pid)] = process_start_time(pid)
            else:
                self.data["pids"].pop(str(pid), None)
        self.save()

    def mount_source(self, what: str) -> str:
        """A mount's source name that says whose it is (``asyncstage-roots-<token>``)."""
        return f"asyncstage-{what}-{self.token}"

    def add_mount(self, path: Path, source: str) -> None:
        with self._lock:
            self.data["mounts"].append([str(path), source])
        self.save()

    def remove_mount(self, path: Path) -> None:
        with self._lock:
            self.data["mounts"] = [m for m in self.data["mounts"] if m[0] != str(path)]
        self.save()

    def add_loop(self, device: str, loop: LoopId) -> None:
        with self._lock:
            self.data["loops"][device] = [loop.image, loop.inode, loop.device]
        self.save()

    def remove_loop(self, device: str) -> None:
        with self._lock:
            self.data["loops"].pop(device, None)
        self.save()

    def add_cgroup(self, path: Path) -> None:
        with self._lock:
            self.data["cgroups"].append(str(path))
        self.save()

    def remove_cgroup(self, path: Path) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self.data["cgroups"].remove(str(path))
        self.save()

    def claim_route(self, prefix: str, add: Callable[[str], object]) -> None:
        """Record ``prefix`` as the run's, then ``add`` its route (another run's may be
        there already: both claim it, the last to end removes it)."""
        with _locked():
            with self._lock:
                if prefix not in self.data["routes"]:
                    self.data["routes"].append(prefix)
            self.save()
            add(prefix)

    def release_routes(self) -> None:
        """Remove the run's routes that no other running cloud claims."""
        with _locked():
            claimed = _live_routes(self.token)
            with self._lock:
                mine, self.data["routes"] = list(self.data["routes"]), []
            for prefix in mine:
                if prefix not in claimed:
                    del_unreachable(prefix)
            self.save()

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    REGISTRY_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(REGISTRY_DIR / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _records() -> Iterator[tuple[Path, dict[str, Any], bool]]:
    """Every run's record: (path, data, whether its owner lives)."""
    for path in sorted(REGISTRY_DIR.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            yield path, data, _alive(data.get("owner"), data.get("owner_start"))


def _live_routes(except_token: str | None = None) -> set[str]:
    """The machine routes that running clouds (other than ``except_token``) claim."""
    return {
        str(prefix)
        for _, data, alive in _records()
        if alive and data.get("token") != except_token
        for prefix in data.get("routes", [])
    }


def register(record: RunRecord) -> None:
    """Clean up crashed runs, then claim a free address block and enter ``record``."""
    with _locked():
        used: set[int] = set()
        claimed = _live_routes()
        for path, data, alive in list(_records()):
            if alive:
                if data.get("block") is not None:
                    used.add(int(data["block"]))
                continue
            clean_run(data, claimed)
            path.unlink(missing_ok=True)
        free = [n for n in range(BLOCKS) if n not in used]
        if not free:
            raise LocalCloudError(f"{BLOCKS} local clouds already run on this machine")
        record.data["block"] = free[0]
        record.save()


def _alive(pid: Any, start: Any) -> bool:
    return isinstance(pid, int) and process_start_time(pid) == start


def clean_run(data: dict[str, Any], claimed: set[str] | frozenset[str] = frozenset()) -> None:
    """Undo what a dead run recorded: its processes, mounts, loop devices, network (its
    routes but those in ``claimed`` by running clouds), state dir."""
    pids = [int(p) for p, start in data.get("pids", {}).items() if _alive(int(p), start)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(process_start_time(p) is not None for p in pids):
        time.sleep(0.05)
    token = data.get("token")
    if isinstance(token, str) and re.fullmatch(r"[0-9a-f]{8}", token):
        routes = [str(r) for r in data.get("routes", []) if str(r) not in claimed]
        sweep(token, routes)
    for cgroup in data.get("cgroups", []):
        if Path(cgroup).name.startswith("asyncstage-localcloud-"):
            remove_cgroup_tree(Path(cgroup))
    mounts = [m for m in data.get("mounts", []) if isinstance(m, list) and len(m) == 2]
    loops = [
        (str(device), LoopId(*loop))
        for device, loop in data.get("loops", {}).items()
        if isinstance(loop, list) and len(loop) == 3
    ]
    # first the loop devices of images in a recorded mount (the reflink store's: their
    # path is the recorded one only while it is mounted), then the mounts, then the rest
    inside = {d for d, loop in loops if any(_below(loop.image, m[0]) for m in mounts)}
    for device, loop in loops:
        if device in inside:
            free_loop(device, loop)
    for mount in reversed(mounts):
        if _mounted_source(mount[0]) == mount[1]:
            with contextlib.suppress(LocalCloudError):
                run(which("umount"), "--lazy", mount[0], what="umount")
    for device, loop in loops:
        if device not in inside:
            free_loop(device, loop)
    state_dir = data.get("state_dir")
    if state_dir and data.get("created_state_dir") and not state_dir_locked(Path(state_dir)):
        shutil.rmtree(state_dir, ignore_errors=True)


def _below(path: str, top: str) -> bool:
    return Path(path).is_relative_to(top) and path != top


def _mounted_source(path: str) -> str | None:
    """The source name of the mount on ``path`` (the topmost), None if none."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        if fields[4] == path:
            found = fields[fields.index("-") + 2]
    return found


def loop_backing(device: str) -> LoopId | None:
    """What a loop device is bound to (even a deleted file), None when it is free."""
    try:
        out = subprocess.run(
            [
                which("losetup"),
                "--list",
                "--noheadings",
                "--raw",
                "-O",
                "BACK-INO,BACK-MAJ:MIN,BACK-FILE",
                device,
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return None
    if not out:
        return None
    inode, majmin, backing = (_unraw(f) for f in out.split(" ", 2))
    try:
        return LoopId(backing.removesuffix(" (deleted)"), int(inode), majmin)
    except ValueError:
        return None


def _unraw(field: str) -> str:
    """losetup --raw escapes blanks as \\x20."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m[1], 16)), field).strip()


def free_loop(device: str, loop: LoopId, wait: float = 10.0) -> None:
    """Detach ``device`` if it is still bound to ``loop``; wait until it is free."""
    if loop_backing(device) != loop:
        return
    with contextlib.suppress(LocalCloudError):
        run(which("losetup"), "--detach", device, what="losetup --detach")
    # a filesystem on it that is still being unmounted (a namespace that just died)
    # keeps it busy: the kernel frees it when the last user lets go
    deadline = time.monotonic() + wait
    while loop_backing(device) == loop and time.monotonic() < deadline:
        time.sleep(0.02)
