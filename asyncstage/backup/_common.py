"""What every part of a backup shares: the logger, rsync options, callbacks, cleanup."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from asyncstage.transfer import Progress
from asyncstage.volume import Volume

log = logging.getLogger("asyncstage.backup")

GiB = 1 << 30
RSYNC_OPTIONS = ("--hard-links", "--numeric-ids", "--exclude", "/lost+found")
"""rsync options of every backup and restore; a volume's own ``lost+found`` never moves."""

Phase = Callable[[str], object]
"""Told each phase as it starts: ``volume``, ``rsync``, ``manifest``, ``snapshot``,
``cleanup`` (a backup); ``check`` and ``verify`` (checks and restores)."""
ProgressCallback = Callable[[Progress], object]


async def delete_own(volume: Volume) -> None:
    """Delete a volume the backup made; a failure here is logged, never raised over the
    error or cancellation already in flight."""
    with anyio.CancelScope(shield=True):
        try:
            await volume.delete()
        except Exception as e:
            log.warning("backup: could not delete its volume %s: %s", volume.volume_id, e)
