"""Backup runs: who is running, whether it still is, and the tags that say so.

Every volume and snapshot a run makes carries its run tags from the create call on
(:data:`asyncstage.adoption.extra_tags`): the backup's name, the run id, the controller
(host and pid) and an expiry. Tags can be written by anyone with access to the account,
so what is read back is validated (:meth:`RunInfo.from_tags`) and a resource whose tags
do not parse is never deleted as a leftover, only reported.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from asyncstage.ec2 import tag
from asyncstage.names import check_name

__all__ = ["RUN_TAGS", "RunInfo", "this_host"]

OF_TAG = tag("backup-of")
RUN_TAG = tag("backup-run")
CONTROLLER_TAG = tag("backup-controller")
EXPIRES_TAG = tag("backup-expires")
RUN_TAGS = (OF_TAG, RUN_TAG, CONTROLLER_TAG, EXPIRES_TAG)

_RUN_ID = re.compile(r"^[0-9a-f]{16}$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")
_PID_MAX = 1 << 22


def this_host() -> str:
    """This machine's name as run tags record it (characters outside a hostname: ``-``)."""
    raw = socket.gethostname() or "localhost"
    host = re.sub(r"[^A-Za-z0-9.-]", "-", raw)[:253]
    return host if _HOST.match(host) else "localhost"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """Process ``pid``'s state letter and start time (clock ticks since boot), or None
    when there is no such process. The start time tells a pid used again by another
    process from the run's controller."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _proc_start(pid: int) -> str:
    found = _proc_stat(pid)
    return found[1] if found else ""


@dataclass(frozen=True)
class RunInfo:
    """One backup run: its name, id, controller and expiry (seconds since the epoch)."""

    name: str
    run_id: str
    host: str
    pid: int
    pid_start: str
    expires: int

    @classmethod
    def new(cls, name: str, ttl: float) -> RunInfo:
        """A run of backup ``name`` by this process, expiring ``ttl`` seconds from now."""
        pid = os.getpid()
        return cls(
            name=check_name(name, "backup"),
            run_id=secrets.token_hex(8),
            host=this_host(),
            pid=pid,
            pid_start=_proc_start(pid),
            expires=int(time.time() + ttl),
        )

    def renewed(self, ttl: float) -> RunInfo:
        """The same run, expiring ``ttl`` seconds from now."""
        return replace(self, expires=int(time.time() + ttl))

    @property
    def controller(self) -> str:
        """``host:pid:start`` (how the run tags name the controller)."""
        return f"{self.host}:{self.pid}:{self.pid_start}"

    def tags(self) -> dict[str, str]:
        """The run tags."""
        return {
            OF_TAG: self.name,
            RUN_TAG: self.run_id,
            CONTROLLER_TAG: self.controller,
            EXPIRES_TAG: str(self.expires),
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> RunInfo | None:
        """The run these tags describe, or None when they are missing or ill-formed."""
        try:
            name = check_name(tags[OF_TAG], "backup")
            run_id = tags[RUN_TAG]
            host, pid_text, start = tags[CONTROLLER_TAG].rsplit(":", 2)
            expires_text = tags[EXPIRES_TAG]
        except (KeyError, ValueError):
            return None
        if not (_RUN_ID.match(run_id) and _HOST.match(host)):
            return None
        if not (pid_text.isdigit() and 0 < int(pid_text) < _PID_MAX):
            return None
        if not (start == "" or (start.isdigit() and len(start) <= 20)):
            return None
        if not (expires_text.isdigit() and len(expires_text) <= 12):
            return None
        return cls(name, run_id, host, int(pid_text), start, int(expires_text))

    def expired(self, now: float | None = None) -> bool:
        """Whether the expiry has passed."""
        return (time.time() if now is None else now) >= self.expires

    def dead(self, now: float | None = None) -> bool:
        """Whether the run is surely over: expired, or its controller ran on this host and
        that process is gone. A live controller on another host is seen only by its expiry."""
        if self.expired(now):
            return True
        if self.host != this_host():
            return False
        if self.pid == os.getpid():
            return False  # this process: its runs end through their own cleanup
        found = _proc_stat(self.pid)
        if found is None or found[0] in ("Z", "X"):
            return True  # gone, or killed and not yet reaped
        return bool(self.pid_start) and found[1] != self.pid_start
