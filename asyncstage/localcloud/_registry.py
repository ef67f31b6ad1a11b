"""The registry of local-cloud runs on this machine, and the cleanup of crashed ones.

Every running :class:`~asyncstage.localcloud.LocalCloud` keeps a record in
``/run/asyncstage-localcloud/<pid>-<token>.json``: its owner process, its state dir,
its address block, and every process, mount and loop device it made, updated as they
come and go. A run whose owner process is gone (a crash, ``kill -9``) is cleaned up by
the next local cloud that starts: it kills the recorded processes, unmounts the
recorded mounts, frees the recorded loop devices (only if they still point at the
recorded image) and removes the state dir if that run created it. Nothing that a run
did not record is touched.

Each run also owns one address block ``127.<100+n>.0.0/16`` so that clouds running at
the same time never hand out the same address.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from asyncstage.errors import LocalCloudError
from asyncstage.localcloud._system import process_start_time, run, which

REGISTRY_DIR = Path("/run/asyncstage-localcloud")
FIRST_BLOCK = 100  # 127.100.0.0/16 and up: far from 127.0.0.0/24, where test sshds listen
BLOCKS = 155


class RunRecord:
    """The registry entry of this run; every change is written at once."""

    def __init__(self, state_dir: Path, created_state_dir: bool) -> None:
        self._lock = threading.Lock()
        self.path = REGISTRY_DIR / f"{os.getpid()}-{secrets.token_hex(4)}.json"
        self.data: dict[str, Any] = {
            "owner": os.getpid(),
            "owner_start": process_start_time(os.getpid()),
            "state_dir": str(state_dir),
            "created_state_dir": created_state_dir,
            "block": None,
            "pids": {},  # pid -> start time
            "mounts": [],
            "loops": {},  # /dev/loopN -> image path
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

    def add_mount(self, path: Path) -> None:
        with self._lock:
            self.data["mounts"].append(str(path))
        self.save()

    def remove_mount(self, path: Path) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self.data["mounts"].remove(str(path))
        self.save()

    def add_loop(self, device: str, image: Path) -> None:
        with self._lock:
            self.data["loops"][device] = str(image)
        self.save()

    def remove_loop(self, device: str) -> None:
        with self._lock:
            self.data["loops"].pop(device, None)
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


def register(record: RunRecord) -> None:
    """Clean up crashed runs, then claim a free address block and enter ``record``."""
    with _locked():
        used: set[int] = set()
        for path in sorted(REGISTRY_DIR.glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if _alive(data.get("owner"), data.get("owner_start")):
                if data.get("block") is not None:
                    used.add(int(data["block"]))
                continue
            clean_run(data)
            path.unlink(missing_ok=True)
        free = [n for n in range(BLOCKS) if n not in used]
        if not free:
            raise LocalCloudError(f"{BLOCKS} local clouds already run on this machine")
        record.data["block"] = free[0]
        record.save()


def _alive(pid: Any, start: Any) -> bool:
    return isinstance(pid, int) and process_start_time(pid) == start


def clean_run(data: dict[str, Any]) -> None:
    """Undo what a dead run recorded: its processes, mounts, loop devices, state dir."""
    pids = [int(p) for p, start in data.get("pids", {}).items() if _alive(int(p), start)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(process_start_time(p) is not None for p in pids):
        time.sleep(0.05)
    for mount in reversed(data.get("mounts", [])):
        if _is_mount_point(mount):
            with contextlib.suppress(LocalCloudError):
                run(which("umount"), "--lazy", mount, what="umount")
    for device, image in data.get("loops", {}).items():
        free_loop(device, image)
    state_dir = data.get("state_dir")
    if state_dir and data.get("created_state_dir"):
        shutil.rmtree(state_dir, ignore_errors=True)


def _is_mount_point(path: str) -> bool:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[4] == path for line in lines)


def loop_backing_file(device: str) -> str | None:
    """The image a loop device is attached to, None when the device is free."""
    name = Path(device).name
    try:
        backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None
    return backing.removesuffix(" (deleted)")


def free_loop(device: str, image: str | os.PathLike[str], wait: float = 10.0) -> None:
    """Detach ``device`` if it is still attached to ``image``; wait until it is free."""
    if loop_backing_file(device) != os.fspath(image):
        return
    with contextlib.suppress(LocalCloudError):
        run(which("losetup"), "--detach", device, what="losetup --detach")
    # a filesystem on it that is still being unmounted (a namespace that just died)
    # keeps it busy: the kernel frees it when the last user lets go
    deadline = time.monotonic() + wait
    while loop_backing_file(device) == os.fspath(image) and time.monotonic() < deadline:
        time.sleep(0.02)
