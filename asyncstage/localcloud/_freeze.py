"""One instant for all the volumes of an instance (``CreateSnapshots``).

While the images of an instance's volumes are copied, every process of the instance is
frozen (and seen frozen), after which
``flush`` writes what those processes had written into the volumes' images (the engine
flushes each of the instance's loop devices and the filesystem mounted on it, not the
whole machine: a machine-wide ``sync`` would wait for every other copy's writes). No
write of the instance can then fall between the copy of one volume and the next: the
set shows the volumes as they were at one moment, as EBS multi-volume snapshots do.
Every process is continued afterwards, also on error.

The freeze is the cgroup v2 freezer of the instance's cgroup (``cgroup.freeze``) where
the machine has one: no process of the instance sees it. ``SIGSTOP`` is the fallback,
and it is seen: a parent that waits for its children's stops (``sudo`` does) stops
itself again when it sees its command stopped, after the thaw, and nobody continues it;
the command it runs then never ends for its ssh session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["frozen", "namespace_pids"]

_ROUNDS = 16  # processes forked while the others are stopped are caught in later rounds
_STOPPING = 2.0  # seconds a process may take to stop (one in a system call finishes it)


def _ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def namespace_pids(init_pid: int) -> set[int]:
    """The pids (as this machine sees them) of every process in ``init_pid``'s pid namespace."""
    ns = _ns(init_pid)
    if ns is None:
        return set()
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _ns(int(entry.name)) == ns:
            found.add(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a stop signal is taken on its way back from the kernel)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False  # gone
    return state not in (b"T", b"t", b"Z", b"X")


def _cgroup_frozen(cgroup: Path) -> bool:
    """Whether every process of ``cgroup`` is frozen (``cgroup.events``: ``frozen 1``)."""
    try:
        return "frozen 1" in (cgroup / "cgroup.events").read_text().splitlines()
    except OSError:
        return True  # gone: nothing in it runs


def _set_freeze(cgroup: Path, value: str) -> None:
    with open(cgroup / "cgroup.freeze", "w") as f:
        f.write(value)


@contextlib.contextmanager
def frozen(
    init_pid: int, flush: Callable[[], None] = os.sync, cgroup: Path | None = None
) -> Iterator[int]:
    """Freeze every process of ``init_pid``'s pid namespace (by its cgroup v2 ``cgroup``,
    else by ``SIGSTOP``), wait until each is frozen, ``flush``; yield how many processes
    the namespace has; thaw them all on the way out."""
    if cgroup is not None:
        try:
            _set_freeze(cgroup, "1")
            deadline = time.monotonic() + _STOPPING
            while not _cgroup_frozen(cgroup) and time.monotonic() < deadline:
                time.sleep(0.001)
            flush()
            yield len(namespace_pids(init_pid))
        finally:
            with contextlib.suppress(FileNotFoundError):  # removed with its host
                _set_freeze(cgroup, "0")
        return
    stopped: set[int] = set()
    try:
        for _ in range(_ROUNDS):
            new = namespace_pids(init_pid) - stopped
            if not new:
                break
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                stopped.add(pid)
        deadline = time.monotonic() + _STOPPING
        waiting = {pid for pid in stopped if _running(pid)}
        while waiting and time.monotonic() < deadline:
            time.sleep(0.001)
            waiting = {pid for pid in waiting if _running(pid)}
        flush()
        yield len(stopped)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
