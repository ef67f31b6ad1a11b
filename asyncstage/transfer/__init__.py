"""Transfers: rsync and dd between this machine, ssh hosts, servers and volumes.

Two layers:

* The host-level engine (:func:`rsync_endpoints`, :func:`dd_endpoints`) copies
  between resolved endpoints (:mod:`asyncstage.paths`): this machine, an
  :class:`~asyncstage.ssh.SSHHost` (remote side as root unless told otherwise)
  or an unmanaged ``user@host``. The routes: :mod:`~asyncstage.transfer.rsync`;
  dd: :mod:`~asyncstage.transfer.dd`; the temporary key between two hosts and
  :func:`sweep_stale_keys`: :mod:`~asyncstage.transfer.link`. The scripts that
  run on the hosts are modules of :mod:`asyncstage.remote`.
* The manager level (:func:`rsync`, :func:`dd`, and what ``Server.put``/``get``
  and ``Volume.put``/``get``/``copy`` call) resolves path strings, servers and
  volumes through a :class:`~asyncstage.Manager` and calls the engine.

Every transfer holds a slot of each host's :class:`anyio.CapacityLimiter`
(:func:`host_limiter`, :data:`DEFAULT_HOST_LIMIT` at once per host), reports
:class:`Progress` to an optional callback and logs to ``asyncstage.transfer``.
See docs/transfers.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Unpack

from asyncstage.errors import InvalidArgument, PathError, UnknownVolume, VolumeMounted
from asyncstage.paths import (
    HostEndpoint,
    LocalSpec,
    PathLike,
    RemotePath,
    parse_path,
    resolve_paths,
)
from asyncstage.transfer.base import (
    DEFAULT_HOST_LIMIT,
    DdOptions,
    Progress,
    ProgressCallback,
    RsyncOptions,
    TransferStats,
    host_limiter,
    set_host_limit,
)
from asyncstage.transfer.dd import dd_endpoints
from asyncstage.transfer.link import sweep_stale_keys
from asyncstage.transfer.rsync import rsync_endpoints

if TYPE_CHECKING:  # what transfers use of a manager, server and volume (imports flow one way)
    from asyncstage.refs import LookupRef as Manager
    from asyncstage.refs import ServerRef as Server
    from asyncstage.refs import VolumeRef as Volume

__all__ = [
    "DEFAULT_HOST_LIMIT",
    "DdOptions",
    "Progress",
    "ProgressCallback",
    "RsyncOptions",
    "TransferStats",
    "dd",
    "dd_endpoints",
    "get_from",
    "host_limiter",
    "rsync",
    "rsync_endpoints",
    "server_put",
    "set_host_limit",
    "sweep_stale_keys",
    "volume_copy",
    "volume_put",
]


async def rsync(
    manager: Manager,
    *paths: PathLike,
    options: Sequence[str] = (),
    compress: bool = False,
    delete: bool = False,
    progress: ProgressCallback | None = None,
) -> TransferStats:
    """rsync sources to a destination (the last path), any of them local, on a managed
    server, in a managed volume or on an unmanaged ``user@host``.

    Path forms: see :mod:`asyncstage.paths`. Several sources must live on one
    host (:class:`~asyncstage.errors.PathError` before anything is copied). A
    volume that is not mounted is mounted first.
    """
    if len(paths) < 2:
        raise PathError("rsync needs at least one source and a destination")
    endpoints = await resolve_paths(manager, paths)
    *sources, dest = endpoints
    return await rsync_endpoints(
        sources, dest, options=options, compress=compress, delete=delete, progress=progress
    )


async def dd(
    manager: Manager,
    source: Volume | str,
    dest: Volume | str,
    *,
    verify: bool = True,
    compress: bool | str = False,
    unmount: bool = False,
    blocks: Literal["used", "all"] = "used",
    progress: ProgressCallback | None = None,
) -> TransferStats:
    """Block-copy volume ``source`` onto volume ``dest`` (both attached, neither mounted).

    A mounted volume raises :class:`~asyncstage.errors.VolumeMounted`, unless
    ``unmount`` is true: then it is unmounted first (and not mounted again).
    """
    src = _volume(manager, source)
    dst = _volume(manager, dest)
    if src is dst:
        raise InvalidArgument(f"dd: {src} onto itself")
    for vol in (src, dst):
        if vol.mounted:
            if not unmount:
                raise VolumeMounted(
                    f"{vol} is mounted on {vol.server} at {vol.mtpt}: dd needs it unmounted "
                    "(unmount it first, or pass unmount=True)"
                )
            await vol.unmount()
    return await dd_endpoints(
        _attached(src),
        _attached(dst),
        verify=verify,
        compress=compress,
        blocks=blocks,
        progress=progress,
        source_volume=_identity(src),
        dest_volume=_identity(dst),
    )


def _attached(vol: Volume) -> HostEndpoint:
    if vol.server is None or not vol.mtdev:
        raise InvalidArgument(f"{vol} is not attached to a server: dd needs it attached")
    return HostEndpoint(vol.server.host, vol.mtdev, True, str(vol))


def _identity(volume: Volume) -> dict[str, str]:
    """What the block copier checks a device against: the volume's NVMe serial and its
    attachment device."""
    found = {"serial": volume.volume_id.replace("-", "")}
    if volume.ec2_device:
        found["device"] = volume.ec2_device
    return found


def _volume(manager: Manager, ref: Volume | str) -> Volume:
    if isinstance(ref, str):
        found = None
        with contextlib.suppress(UnknownVolume):
            found = manager.find_volume_by_volid(ref)
        if found is None:
            found = manager.find_volume_by_name(ref)
        if found is None:
            raise UnknownVolume(f"{ref}: no managed volume with that id or name")
        return found
    if not hasattr(ref, "volume_id"):
        raise InvalidArgument(f"dd copies volumes, not {ref!r}")
    return ref


# -- what the Server and Volume methods call ------------------------------------------------


def _on(target: Server | Volume, path: PathLike) -> PathLike:
    """A path as Server.put/get and Volume.put/get take it: plain means on ``target``."""
    if isinstance(path, (str, bytes, os.PathLike)) and not isinstance(path, RemotePath):
        spec = parse_path(path)
        if isinstance(spec, LocalSpec):
            return RemotePath(target, spec.path)
    return path


async def server_put(
    server: Server, *paths: PathLike, **options: Unpack[RsyncOptions]
) -> TransferStats:
    """``server.put(*local_sources, dest)``: a plain ``dest`` is a path on ``server``."""
    if len(paths) < 2:
        raise PathError("put needs at least one source and a destination")
    *sources, dest = paths
    return await rsync(server.manager, *sources, _on(server, dest), **options)


async def volume_put(
    volume: Volume, *sources: PathLike, dest: str = ".", **options: Unpack[RsyncOptions]
) -> TransferStats:
    """``volume.put(*sources, dest=".")``: ``dest`` is relative to the volume's root."""
    if not sources:
        raise PathError("put needs at least one source")
    sub = "" if dest in (".", "./", "/") else dest
    return await rsync(volume.manager, *sources, RemotePath(volume, sub), **options)


async def get_from(
    target: Server | Volume, *paths: PathLike, **options: Unpack[RsyncOptions]
) -> TransferStats:
    """``server.get(*sources, dest)`` and ``volume.get(*sources, dest)``: plain sources are
    paths on the server, or relative to the volume's root."""
    if len(paths) < 2:
        raise PathError("get needs at least one source and a destination")
    *sources, dest = paths
    return await rsync(target.manager, *(_on(target, s) for s in sources), dest, **options)


async def volume_copy(
    volume: Volume, dest: PathLike, **options: Unpack[RsyncOptions]
) -> TransferStats:
    """``volume.copy(dest)``: the volume's whole contents to ``dest`` (any path form)."""
    return await rsync(volume.manager, volume, dest, **options)
