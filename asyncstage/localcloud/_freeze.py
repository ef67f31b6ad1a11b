"""One instant for all the volumes of an instance (``CreateSnapshots``).

While the images of an instance's volumes are copied, every process of the instance (its
whole pid namespace) is stopped with ``SIGSTOP`` (and seen stopped), after which
``flush`` writes what those processes had written into the volumes' images (the engine
flushes each of the instance's loop devices and the filesystem mounted on it, not the
whole machine: a machine-wide ``sync`` would wait for every other copy's writes). No
write of the instance can then fall between the copy of one volume and the next: the
set shows the volumes as they were at one moment, as EBS multi-volume snapshots do.
Every process is continued afterwards, also on error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator

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


@contextlib.contextmanager
def frozen(init_pid: int, flush: Callable[[], None] = os.sync) -> Iterator[int]:
    """Stop every process of ``init_pid``'s pid namespace, wait until each is stopped,
    ``flush``; yield how many were stopped; continue them all on the way out."""
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
