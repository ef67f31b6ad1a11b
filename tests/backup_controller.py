"""A backup controller in a process of its own, stopped at a chosen point so that a test
can SIGKILL it there: ``python -m tests.backup_controller CONFIG_JSON``.

CONFIG_JSON holds the Manager options (the local cloud's endpoint, credentials, image,
dot directory), the backup's name, its mode (``copy``, the default, or ``snapshot``), its
sources, whether it keeps its work volume (``keep_volume``), the server (of the work
volume, or whose volumes are taken), and the point to stop at. At that point the process
prints ``STOPPED <point>`` and blocks, event loop and all, until it is killed. Each point
wraps the one library call that ends the step, so the stop comes right after (or right
before) that step, whatever its timing:

- ``lease``: the lease is taken, nothing else made yet (before the sweep);
- ``created``: CreateVolume has returned (the work volume exists, is not attached);
- ``attached``: the work volume is attached (not yet formatted nor mounted);
- ``formatted``: its filesystem is made (mkfs, for a first backup) or recognised, not
  yet mounted;
- ``volume``: the work volume is made and mounted, nothing copied yet;
- ``copy``: rsync has reported progress (it is copying);
- ``copied``: the copy is done, the snapshot not yet asked for;
- ``snapshot``: CreateSnapshot has returned (the snapshot is pending);
- ``complete``: the snapshot is completed but not yet marked complete;
- ``marked``: the snapshot is marked complete, the work volume not yet deleted;
- ``detached``: the first volume the run deletes is unmounted and detached, not yet
  deleted (its own work volume, or in a sweep, a dead run's);
- ``set``: ``snapshot`` mode, CreateSnapshots has returned (the set is pending);
- ``set-complete``: ``snapshot`` mode, the set is completed, not yet marked complete.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import anyio

from asyncstage import Manager, backup
from asyncstage.attachments import Attachments
from asyncstage.backup import copy as backup_copy
from asyncstage.backup import snapshot_mode
from asyncstage.disks import Disks
from asyncstage.ec2 import EC2

POINTS = (
    "lease",
    "created",
    "attached",
    "formatted",
    "volume",
    "copy",
    "copied",
    "snapshot",
    "complete",
    "marked",
    "detached",
    "set",
    "set-complete",
)


def _stop(point: str) -> NoReturn:
    """Say where, then block the whole process (its event loop too) until killed."""
    print(f"STOPPED {point}", flush=True)
    while True:
        time.sleep(3600)


def _after(point: str, real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, then a stop."""

    async def call_then_stop(*args: Any, **kwargs: Any) -> NoReturn:
        await real(*args, **kwargs)
        _stop(point)

    return call_then_stop


def _before(point: str) -> Callable[..., Any]:
    """A stop instead of the call."""

    async def stop(*args: Any, **kwargs: Any) -> NoReturn:
        _stop(point)

    return stop


def _install(point: str) -> None:
    """Wrap the call that ends the step ``point`` names."""
    if point not in POINTS:
        raise SystemExit(f"unknown point {point!r}")
    if point == "lease":
        backup_copy.sweep = _before(point)  # type: ignore[assignment]
    elif point == "created":
        EC2.create_volume = _after(point, EC2.create_volume)  # type: ignore[method-assign]
    elif point == "attached":
        Attachments.attach = _after(point, Attachments.attach)  # type: ignore[method-assign]
    elif point == "formatted":
        Disks.mount = _before(point)  # type: ignore[method-assign]
    elif point == "snapshot":
        EC2.create_snapshot = _after(point, EC2.create_snapshot)  # type: ignore[method-assign]
    elif point == "complete":
        backup_copy.mark_complete = _before(point)  # type: ignore[assignment]
    elif point == "marked":
        backup_copy.mark_complete = _after(point, backup_copy.mark_complete)  # type: ignore[assignment]
    elif point == "detached":
        EC2.delete_volume = _before(point)  # type: ignore[method-assign]
    elif point == "set":
        snapshot_mode._create_snapshots = _after(point, snapshot_mode._create_snapshots)  # type: ignore[assignment]
    elif point == "set-complete":
        snapshot_mode.mark_complete = _before(point)  # type: ignore[assignment]


async def main(config: dict[str, Any]) -> None:
    point = config["point"]
    _install(point)

    def phase(name: str) -> None:
        if (name, point) in (("rsync", "volume"), ("snapshot", "copied")):
            _stop(point)

    def progress(_: Any) -> None:
        if point == "copy":
            _stop(point)

    async with Manager(**config["manager"]) as m:
        server = m.find_server_by_name(config["server"])
        assert server is not None, config["server"]
        if config.get("mode") == "snapshot":
            await backup.snapshot_backup(m, config["name"], server)
        else:
            await backup.backup(
                m,
                config["name"],
                config["sources"],
                server=server,
                progress=progress,
                phase=phase,
                keep_volume=config.get("keep_volume", False),
            )
    print("DONE", flush=True)


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
