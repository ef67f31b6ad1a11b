"""dd: a block device copied onto another, on one host or streamed between two.

Blocks of zeros are not sent and the destination stays sparse (ranges that
must be zero are punched, or written with zeros only where the old contents are
not zero); optional compression (zstd, else gzip); a sha256 hash list (over 1 MiB
blocks, so that blocks of zeros cost a compare rather than a hash) of the source
and of the destination read back (caches dropped) is compared afterwards. When the
source holds a cleanly unmounted ext2/3/4 filesystem, only the blocks it uses are
read (its block bitmaps): its free blocks arrive as zeros (see docs/transfers.md).

The copy itself is :mod:`asyncstage.remote.blockcopy`, run on the source host
(and, between hosts, its receiver on the destination over the direct link,
:mod:`asyncstage.transfer.link`). Before a byte is written the copier checks
that the destination is not mounted and opens it with ``O_EXCL``, that the
source is not mounted read-write, and (when the volumes are known) that each
device is that volume; a refusal becomes
:class:`~asyncstage.errors.VolumeMounted`, :class:`~asyncstage.errors.VolumeInUse`
or :class:`~asyncstage.errors.VolumeError`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import anyio

from asyncstage import remote, shell
from asyncstage.errors import (
    CommandFailed,
    InvalidArgument,
    MissingDependency,
    TransferError,
    VerifyFailed,
    VolumeError,
    VolumeInUse,
    VolumeMounted,
)
from asyncstage.paths import HostEndpoint, same_host
from asyncstage.transfer.base import ProgressCallback, Reporter, TransferStats, hosts_held
from asyncstage.transfer.link import direct_link
from asyncstage.transfer.run import LineFeeder, stream, stream_solo

if TYPE_CHECKING:
    from asyncstage.ssh import SSHHost

__all__ = ["dd_endpoints"]

_log = logging.getLogger("asyncstage.transfer")

REFUSALS: Mapping[str, type[Exception]] = {
    "mounted": VolumeMounted,
    "busy": VolumeInUse,
    "not-volume": VolumeError,
    "small": InvalidArgument,
}
"""The error each kind of refusal of the block copier becomes."""


async def _dd_info(host: SSHHost, sudo: bool, *args: str) -> dict[str, Any]:
    return await remote.run_json(host, sudo, "blockcopy", *args, refused=REFUSALS)


async def _device_size(ep: HostEndpoint) -> int:
    try:
        return int((await _dd_info(ep.host, ep.sudo, "size", ep.path))["size"])
    except CommandFailed as e:
        raise InvalidArgument(f"{ep}: not a readable block device ({e})") from e


async def _device_sizes(*eps: HostEndpoint) -> list[int]:
    """The sizes of the devices, asked at once; the first failure is raised as itself."""
    found: list[int | Exception] = [0] * len(eps)

    async def one(i: int) -> None:
        try:
            found[i] = await _device_size(eps[i])
        except Exception as e:  # raised below, not as an ExceptionGroup
            found[i] = e

    async with anyio.create_task_group() as tg:
        for i in range(len(eps)):
            tg.start_soon(one, i)
    sizes = []
    for value in found:
        if isinstance(value, Exception):
            raise value
        sizes.append(value)
    return sizes


async def _compression(method: bool | str, *eps: HostEndpoint) -> str:
    if method is False or method in ("", "none"):
        return "none"
    if method not in (True, "zstd", "gzip"):
        raise InvalidArgument(f"compress must be True, False, 'zstd' or 'gzip', not {method!r}")
    have = [await _dd_info(ep.host, ep.sudo, "which", "zstd", "gzip") for ep in eps]
    if method is True:
        return "zstd" if all(h["zstd"] for h in have) else "gzip"
    for ep, h in zip(eps, have, strict=True):
        if not h[str(method)]:
            raise MissingDependency(f"{method} (on {ep.host.label})", str(method))
    return str(method)


def _expect(volume: Mapping[str, str] | None) -> str:
    return json.dumps(dict(volume)) if volume else ""


async def dd_endpoints(
    source: HostEndpoint,
    dest: HostEndpoint,
    *,
    verify: bool = True,
    compress: bool | str = False,
    blocks: Literal["used", "all"] = "used",
    progress: ProgressCallback | None = None,
    authorized_keys: str | None = None,
    source_volume: Mapping[str, str] | None = None,
    dest_volume: Mapping[str, str] | None = None,
) -> TransferStats:
    """Copy block device ``source.path`` to ``dest.path`` (each on its host), block by block.

    Blocks of zeros are not sent; the destination's matching ranges are made
    zero without writing where possible (it stays sparse). Of a cleanly unmounted
    ext2/3/4 filesystem only the blocks it uses are read and copied (free ones
    arrive as zeros); anything else is read whole. ``blocks="all"`` reads every
    block of any device (a byte-for-byte image, free blocks included). ``compress``: True
    (zstd when both hosts have it, else gzip), ``"zstd"``, ``"gzip"`` or False.
    ``verify``: the sha256 of the source and of the destination read back must
    match (:class:`~asyncstage.errors.VerifyFailed` otherwise). The destination
    must be at least as large as the source
    (:class:`~asyncstage.errors.InvalidArgument`), not mounted
    (:class:`~asyncstage.errors.VolumeMounted`) nor held by anything else
    (:class:`~asyncstage.errors.VolumeInUse`); the source must not be mounted
    read-write. ``source_volume``/``dest_volume`` (``{"serial": "vol…",
    "device": "/dev/sdf"}``) name the volume each device must be
    (:class:`~asyncstage.errors.VolumeError` otherwise).
    """
    what = f"dd {source} -> {dest}"
    if blocks not in ("used", "all"):
        raise InvalidArgument(f"{what}: blocks must be 'used' or 'all', not {blocks!r}")
    same = same_host(source, dest)
    if same and source.path == dest.path:
        raise InvalidArgument(f"{what}: source and destination are the same device")
    reporter = Reporter(progress, what)
    reporter.current = source.path
    expect = (_expect(source_volume), _expect(dest_volume))
    async with hosts_held(source.host, dest.host):
        src_size, dst_size = await _device_sizes(source, dest)
        if dst_size < src_size:
            raise InvalidArgument(
                f"{what}: the destination ({dst_size} bytes) is smaller than the source "
                f"({src_size} bytes)"
            )
        method = "none" if same else await _compression(compress, source, dest)
        _log.info("%s: starting (%d bytes, compression %s)", what, src_size, method)
        result = await _copy(
            source, dest, method, verify, reporter, authorized_keys, (*expect, blocks)
        )
    return _stats(what, result, reporter, verify, "dd-same-host" if same else "dd-host->host")


async def _copy(
    source: HostEndpoint,
    dest: HostEndpoint,
    method: str,
    verify: bool,
    reporter: Reporter,
    authorized_keys: str | None,
    expect: tuple[str, str, str],
) -> dict[str, Any]:
    """Run the block copier on the source host; its result (``R`` line).

    ``expect``: the source's and the destination's identity, and which blocks to copy.
    """
    result: dict[str, Any] = {}
    refusal: dict[str, Any] = {}

    async def on_line(line: str) -> None:
        if line.startswith("P "):
            _, done, total = line.split()
            await reporter.update(int(done), int(total))
        elif line.startswith("R "):
            result.update(remote.answer(source.host.label, line, prefix="R "))
        elif line.startswith("E "):
            refusal.update(remote.answer(source.host.label, line, prefix="E "))

    feed = LineFeeder(on_line)
    flag = "1" if verify else "0"
    what = f"dd {source} -> {dest}"
    try:
        if same_host(source, dest):
            argv = remote.argv("blockcopy", "copy", source.path, dest.path, flag, *expect)
            await stream_solo(source.host, source.sudo, argv, feed.feed)
        else:
            async with direct_link(
                source.host, source.sudo, dest.host, dest.sudo, authorized_keys
            ) as link:
                recv = remote.argv("blockcopy", "recv", dest.path, method, flag, expect[1])
                ssh = link.argv(*shell.sudo_argv(recv, dest.sudo))
                argv = remote.argv(
                    "blockcopy", "send", source.path, method, json.dumps(ssh), *expect[::2]
                )
                await stream(source.host, source.sudo, link.workdir, argv, feed.feed)
    except CommandFailed as e:
        await feed.close()
        if refusal:
            error = REFUSALS.get(str(refusal.get("kind")), TransferError)
            raise error(f"{what}: {refusal.get('error')}") from e
        err = e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else e.stderr
        tail = "\n".join(err.strip().splitlines()[-10:])
        raise TransferError(f"{what} failed: {tail or e}") from e
    await feed.close()
    return result


def _stats(
    what: str, result: dict[str, Any], reporter: Reporter, verify: bool, route: str
) -> TransferStats:
    """Check the copier's result (verification included) and turn it into stats."""
    if "source_sha256" not in result:
        raise TransferError(f"{what}: no result from the copy")
    if verify and result.get("dest_sha256") != result["source_sha256"]:
        raise VerifyFailed(
            f"{what}: the destination's sha256 {result.get('dest_sha256')} differs from the "
            f"source's {result['source_sha256']}",
            source=str(result["source_sha256"]),
            destination=str(result.get("dest_sha256")),
        )
    stats = TransferStats(
        route=route,
        elapsed=reporter.elapsed,
        bytes=int(result.get("data_bytes", 0)),
        wire_bytes=int(result.get("sent_bytes", 0)),
        size=int(result["size"]),
        digest=str(result["source_sha256"]),
    )
    _log.debug("%s: details %s", what, result)
    _log.info(
        "%s: done (%s, %d of %d bytes were data, %d read%s, %.1fs%s)",
        what,
        route,
        stats.bytes,
        stats.size,
        int(result.get("read_bytes", stats.size)),
        " (the ext filesystem's used blocks)" if result.get("layout") == "ext" else "",
        stats.elapsed,
        ", verified" if verify else "",
    )
    return stats
