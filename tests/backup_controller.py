"""A backup controller in a process of its own, stopped at a chosen point so that a test
can SIGKILL it there: ``python -m tests.backup_controller CONFIG_JSON``.

CONFIG_JSON holds the Manager options (the local cloud's endpoint, credentials, image,
dot directory), the backup's name, its sources, the server of its work volume, and the
point to stop at. At that point the process prints ``STOPPED <point>`` and blocks until it
is killed:

- ``lease``: the lease is taken, nothing else made yet;
- ``volume``: the work volume is made and mounted, nothing copied yet;
- ``copy``: rsync has reported progress (it is copying);
- ``copied``: the copy is done, the snapshot not yet asked for;
- ``snapshot``: CreateSnapshot has returned (the snapshot is pending);
- ``complete``: the snapshot is completed but not yet marked complete.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, NoReturn

import anyio

from asyncstage import Manager, backup
from asyncstage.backup import copy as backup_copy
from asyncstage.ec2 import EC2


def _stop(point: str) -> NoReturn:
    """Say where, then block the whole process (its event loop too) until killed."""
    print(f"STOPPED {point}", flush=True)
    while True:
        time.sleep(3600)


async def main(config: dict[str, Any]) -> None:
    point = config["point"]
    if point == "snapshot":
        real_create = EC2.create_snapshot

        async def create_then_stop(self: EC2, *args: Any, **kwargs: Any) -> Any:
            await real_create(self, *args, **kwargs)
            _stop(point)

        EC2.create_snapshot = create_then_stop  # type: ignore[method-assign]
    if point == "lease":

        async def stop_before_sweeping(*args: Any, **kwargs: Any) -> None:
            _stop(point)

        backup_copy.sweep = stop_before_sweeping  # type: ignore[assignment]
    if point == "complete":

        async def stop_before_marking(*args: Any) -> None:
            _stop(point)

        backup_copy.mark_complete = stop_before_marking  # type: ignore[assignment]

    def phase(name: str) -> None:
        if (name, point) in (("rsync", "volume"), ("snapshot", "copied")):
            _stop(point)

    def progress(_: Any) -> None:
        if point == "copy":
            _stop(point)

    async with Manager(**config["manager"]) as m:
        server = m.find_server_by_name(config["server"])
        await backup.backup(
            m, config["name"], config["sources"], server=server, progress=progress, phase=phase
        )
    print("DONE", flush=True)


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
