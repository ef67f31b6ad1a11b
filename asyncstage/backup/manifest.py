"""Backup manifests: every file of a snapshot, written where the data is, kept inside it.

A ``copy``-mode run writes the manifest on the server holding its work volume once rsync
is done (:func:`write_manifest`, by :mod:`asyncstage.remote.manifest`: one streaming
pass, bounded memory), as the file ``/.asyncstage-manifest`` at the volume's root, so the
snapshot carries it. The manifest's own sha256 goes into the snapshot's
``asyncstage:backup-manifest`` tag with its create call (the manifest is written
first), so before the snapshot is marked complete.

A ``snapshot``-mode set records ``none`` there: its snapshots are the server's own
volumes, taken in place, and a manifest would mean reading all of them at backup time.
Snapshots made before manifests existed have no tag at all.

Tags are written by whoever can write the account's tags: :func:`recorded` accepts only
``none`` or a sha256, and a manifest whose digest is not the tag's is never trusted.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from asyncstage import remote
from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import TransferError
from asyncstage.remote import manifest as script
from asyncstage.volume import Volume

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_TAG",
    "NO_MANIFEST",
    "Recorded",
    "manifest_tag",
    "recorded",
    "write_manifest",
]

MANIFEST_TAG = tag("backup-manifest")
NO_MANIFEST = "none"
"""The tag's value on snapshots that have no manifest by design (``snapshot`` mode)."""
MANIFEST_NAME = script.NAME
"""The manifest's file name at the root of a backup's volume (reserved there)."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Recorded = tuple[Literal["sha256", "none", "untagged", "bad-tag"], str]
"""What a snapshot's tag says: (``sha256``, digest), (``none``, ""), (``untagged``, "")
or (``bad-tag``, the value as found)."""


def recorded(snap: dict[str, Any]) -> Recorded:
    """What the snapshot's manifest tag says, validated."""
    tags = tags_of(snap)
    if MANIFEST_TAG not in tags:
        return ("untagged", "")
    value = tags[MANIFEST_TAG]
    if value == NO_MANIFEST:
        return ("none", "")
    if _SHA256.match(value):
        return ("sha256", value)
    return ("bad-tag", value[:80])


async def write_manifest(volume: Volume, earlier: str | None = None) -> dict[str, Any]:
    """Write the manifest of a mounted volume at its root, on its server; its ``sha256``
    and its counts (``entries``, ``files``, ``bytes``; ``reused`` digests and ``hashed``
    bytes). ``earlier``: the digest of the manifest the volume holds already (its
    snapshot's tag): the files it lists that did not change are not read again."""
    server = volume.server
    if server is None or not volume.mtpt:
        raise TransferError(f"manifest: volume {volume.name} is not mounted")
    args = ["write", volume.mtpt, *([earlier] if earlier and _SHA256.match(earlier) else [])]
    reply = await remote.run_json(server.host, True, "manifest", *args, timeout=None)
    digest = reply.get("sha256")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise TransferError(f"manifest: {server.name} answered no digest: {reply!r}")
    return reply


def manifest_tag(digest: str) -> dict[str, str]:
    """The tag that records a manifest digest (or :data:`NO_MANIFEST`)."""
    if digest != NO_MANIFEST and not _SHA256.match(digest):
        raise ValueError(f"not a sha256: {digest!r}")
    return {MANIFEST_TAG: digest}
