"""One instant for all the volumes of an instance (``CreateSnapshots``).

While the images of an instance's volumes are copied, every process of the instance (its
whole pid namespace) is stopped with ``SIGSTOP``, after which ``sync`` writes out what
those processes had written. No write of the instance can then fall between the copy of
one volume and the next: the set shows the volumes as they were at one moment, as EBS
multi-volume snapshots do. Every process is continued afterwards, also on error.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

__all__ = ["frozen", "namespace_pids"]

_ROUNDS = 16  # processes forked while the others are stopped are caught in later rounds


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


@contextlib.contextmanager
def frozen(init_pid: int) -> Iterator[int]:
    """Stop every process of ``init_pid``'s pid namespace, ``sync``, yield how many were
    stopped; continue them all on the way out."""
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
        os.sync()
        yield len(stopped)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
