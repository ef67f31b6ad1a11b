"""Scratch volumes: a temporary volume made from a snapshot, to read a backup from."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio

from asyncstage.backup._common import Phase, delete_own, log
from asyncstage.manager import Manager
from asyncstage.server import Server
from asyncstage.volume import Volume

__all__ = ["volume_from"]


@contextlib.asynccontextmanager
async def volume_from(
    m: Manager,
    snapshot_id: str,
    server: Server | None,
    volume_name: str | None,
    phase: Phase | None,
    *,
    put_back: bool = False,
) -> AsyncIterator[Volume]:
    """A volume made from ``snapshot_id``, mounted on ``server`` (default: any), deleted
    on the way out (also on error and cancellation). With ``put_back``, a server started
    for it is stopped again and one made for it is terminated."""
    if phase:
        phase("volume")
    known = {s.instance_id: s.state for s in m.servers()}
    volume: Volume | None = None
    try:
        if server is not None:
            volume = await server.provision_volume(
                volume_name, snapshot_id=snapshot_id, reuse=False
            )
        else:
            volume = await m.provision_volume(volume_name, snapshot_id=snapshot_id, reuse=False)
        yield volume
    finally:
        if phase:
            phase("cleanup")
        if volume is not None:
            await delete_own(volume)
        if put_back:
            await _put_back(m, known)


async def _put_back(m: Manager, known: dict[str, str]) -> None:
    """Stop the servers that were not running before, terminate those that did not exist."""
    with anyio.CancelScope(shield=True):
        for s in m.servers():
            before = known.get(s.instance_id)
            if before == "running" or s.state not in ("pending", "running"):
                continue
            try:
                if before is None:
                    await s.terminate()
                else:
                    await s.stop()
            except Exception as e:
                log.warning("backup: could not put %s back (%s): %s", s.name, before, e)
