"""Backup manifests: every file of a snapshot, written where the data is, kept inside it.

A ``copy``-mode run writes the manifest on the server holding its work volume once rsync
is done (:func:`write_manifest`, by :mod:`asyncstage.remote.manifest`: one streaming
pass, bounded memory), as the file ``/.asyncstage-manifest`` at the volume's root, so the
snapshot carries it. The manifest's own sha256 goes into the snapshot's
``asyncstage:backup-manifest`` tag with its create call (the manifest is written
first), so before the snapshot is marked complete.

While rsync runs, a :class:`Follower` hashes on that server what has landed already (the
script's ``follow`` pass), then, in the same process once the copy is done, writes the
manifest: its final pass, which still stats every file, reads only what rsync wrote in
the last moments. The digests of the follow pass are a cache that the final pass takes
for a file only while its size, times and inode are the ones they were hashed with.
The follow pass never outlives the copy: its walks end when its stdin does (the copy
is done), and it is stopped like any command on an error or a cancellation. When it
fails, or did not start (a copy over within :data:`FOLLOW_AFTER`), the manifest is
written by a pass of its own (:func:`write_manifest`).

A ``snapshot``-mode set records ``none`` there: its snapshots are the server's own
volumes, taken in place, and a manifest would mean reading all of them at backup time.
Snapshots made before manifests existed have no tag at all.

Tags are written by whoever can write the account's tags: :func:`recorded` accepts only
``none`` or a sha256, and a manifest whose digest is not the tag's is never trusted.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import anyio

from asyncstage import remote
from asyncstage.backup._common import log
from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import AsyncstageError, TransferError
from asyncstage.remote import manifest as script
from asyncstage.volume import Volume

__all__ = [
    "DATA_TAG",
    "MANIFEST_NAME",
    "MANIFEST_TAG",
    "NO_MANIFEST",
    "Follower",
    "Recorded",
    "data_bytes",
    "data_tag",
    "manifest_tag",
    "recorded",
    "write_manifest",
]

MANIFEST_TAG = tag("backup-manifest")
DATA_TAG = tag("backup-data")
"""The bytes of the files a snapshot's manifest lists, tagged with its create call."""
NO_MANIFEST = "none"
"""The tag's value on snapshots that have no manifest by design (``snapshot`` mode)."""
MANIFEST_NAME = script.NAME
"""The manifest's file name at the root of a backup's volume (reserved there)."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
FOLLOW_AFTER = 1.0
"""Seconds of copying before the follow pass starts: a copy that is over by then (a
rerun's few changed files) leaves the little it wrote to the final pass, and its
server starts no helper for it."""

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
    and its counts (``entries``, ``files``, ``bytes``; ``reused`` digests, ``hashed``
    bytes). ``earlier``: the digest of the manifest the volume holds already (its
    snapshot's tag): the files it lists that did not change are not read again."""
    server = volume.server
    if server is None or not volume.mtpt:
        raise TransferError(f"manifest: volume {volume.name} is not mounted")
    args = ["write", volume.mtpt, *_digest_arg(earlier)]
    reply = await remote.run_json(server.host, True, "manifest", *args, timeout=None)
    return _written(server.name, reply)


def _written(server: str, reply: dict[str, Any]) -> dict[str, Any]:
    """A manifest pass's answer, once it has the manifest's digest."""
    digest = reply.get("sha256")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise TransferError(f"manifest: {server} answered no digest: {reply!r}")
    return reply


def _digest_arg(digest: str | None) -> list[str]:
    return [digest] if digest and _SHA256.match(digest) else []


class Follower:
    """The follow pass on the server of a mounted volume while a copy writes into it:
    :meth:`run` in a task beside the copy, :attr:`rsyncing` set as its first rsync
    starts (not before: its hooks may take long, and nothing lands meanwhile),
    :attr:`copied` once the copy is done; :attr:`reply` is then the answer of the
    manifest it wrote (:func:`write_manifest`'s, with ``followed`` digests), or empty:
    it did not start or failed, and the manifest is still to write. The pass starts
    :data:`FOLLOW_AFTER` seconds into the copy, unless it is over by then. A copy that
    fails or is cancelled cancels the task, which stops the remote command."""

    def __init__(self, volume: Volume, earlier: str | None) -> None:
        self.volume = volume
        self.earlier = earlier
        self.rsyncing = anyio.Event()
        self.copied = anyio.Event()
        self.reply: dict[str, Any] = {}

    async def run(self) -> None:
        """Run the follow pass until :attr:`copied`, then take the answer of the manifest
        it writes. Its own failures are logged, never raised: the copy does not depend
        on it."""
        await self.rsyncing.wait()
        with anyio.move_on_after(FOLLOW_AFTER):
            await self.copied.wait()
        server, root = self.volume.server, self.volume.mtpt
        if server is None or not root or self.copied.is_set():
            return
        log.debug("manifest: the follow pass on %s starts", server.name)
        argv = remote.argv("manifest", "follow", root, *_digest_arg(self.earlier))
        try:
            async with server.host.scmd_write(*argv, sudo=True) as stdin:
                await self.copied.wait()
            self.reply = _written(server.name, remote.answer(server.host.label, stdin.output))
        except (AsyncstageError, OSError) as e:
            log.warning("manifest: the follow pass on %s failed: %s", server.name, e)


def data_tag(reply: dict[str, Any]) -> dict[str, str]:
    """The tag that records the bytes of the files a manifest pass listed (``reply``: its
    answer); none when the answer has no such count."""
    n = reply.get("bytes")
    return {DATA_TAG: str(n)} if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else {}


def data_bytes(snap: dict[str, Any]) -> int | None:
    """The bytes the snapshot's data tag records; None without one, or when it is not a
    plain count (tags are anyone's to write)."""
    value = tags_of(snap).get(DATA_TAG, "")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 19 else None


def manifest_tag(digest: str) -> dict[str, str]:
    """The tag that records a manifest digest (or :data:`NO_MANIFEST`)."""
    if digest != NO_MANIFEST and not _SHA256.match(digest):
        raise ValueError(f"not a sha256: {digest!r}")
    return {MANIFEST_TAG: digest}
