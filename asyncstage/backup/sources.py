"""Backup sources: what a user may name, and how each is copied into the work volume.

A source is written like any transfer path (:mod:`asyncstage.paths` parses it):

================================  ===================================================
``/srv/data``, ``Path(...)``      a local path; kept at its absolute path
``SERVER:/path``, ``i-…:/path``   a path on a managed server; under ``/SERVER/path``
``user@host:/path``               any ssh host (a pull backup); under ``/user@host/path``
``VOLUME:``, ``VOLUME``           a managed volume's contents; the snapshot's root when
                                  it is the only source, else under ``/VOLUME/``
``VOLUME:/sub``                   ``sub`` inside a volume; under ``/VOLUME/<basename>``
``Volume``, ``RemotePath``        the same, as objects
================================  ===================================================

Sources on several hosts are copied one host after another, each by one ``rsync --delete``
into its own directory of the work volume, so that one host's files never delete
another's.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from asyncstage import paths
from asyncstage.backup.hooks import Hooked
from asyncstage.backup.sizes import data_size, size_for
from asyncstage.errors import CommandFailed, InvalidArgument
from asyncstage.manager import Manager
from asyncstage.server import Server
from asyncstage.transfer.rsync import rsync_endpoints
from asyncstage.volume import Volume

__all__ = ["Group", "Source", "plan_sources"]

Source = str | os.PathLike[str] | Volume | paths.RemotePath | Hooked
"""A backup source: a path as transfers take it (see the module's table), a Volume, or
one of these with consistency hooks (:class:`~asyncstage.backup.hooks.Hooked`)."""


@dataclass
class Group:
    """Sources on one host, copied by one rsync into ``dest`` of the work volume."""

    key: tuple[str, ...]
    dest: str
    """Directory in the work volume, relative to its root (``""``: the root)."""
    relative: bool
    """``rsync --relative``: each source keeps its full path under ``dest``."""
    paths: list[Any] = field(default_factory=list)
    """The sources, as :meth:`Manager.rsync` takes them."""
    labels: list[str] = field(default_factory=list)
    server: Server | None = None
    local: list[str] = field(default_factory=list)
    volume_gib: int = 0
    hooks: list[Hooked] = field(default_factory=list)
    """Each source's hooks, in order (``Hooked(source)`` when it has none)."""


def _dir_label(text: str) -> str:
    """A directory name for a host (``[::1]``'s colons and brackets become ``_``)."""
    return "".join(c if c.isalnum() or c in "._-@" else "_" for c in text) or "_"


def plan_sources(m: Manager, sources: Sequence[Source]) -> list[Group]:
    """Group ``sources`` by host, in the order given; typed errors for what cannot be one.

    Names (``web:/srv``, ``data:``) are looked up among the manager's servers and volumes
    (:func:`asyncstage.paths.resolve_names`); a local path must exist.
    """
    if not sources:
        raise InvalidArgument("backup: nothing to back up")
    hooked = [s if isinstance(s, Hooked) else Hooked(s) for s in sources]
    sources = [h.source for h in hooked]
    for s in sources:
        if isinstance(s, Server):
            raise InvalidArgument(f"backup: name a path on {s.name}, e.g. '{s.name}:/srv'")
    specs = paths.parse_paths([paths.resolve_names(m, s) for s in sources])
    groups: dict[tuple[str, ...], Group] = {}

    def group(key: tuple[str, ...], dest: str, relative: bool) -> Group:
        if key not in groups:
            groups[key] = Group(key, dest, relative)
        return groups[key]

    for source, spec, hooks in zip(sources, specs, hooked, strict=True):
        has_hooks = hooks.pre is not None or hooks.post is not None
        if has_hooks and not isinstance(spec, paths.LocalSpec | paths.ServerSpec):
            raise InvalidArgument(
                f"backup: {source}: hooks run on a managed server or this machine, "
                "so only local paths and SERVER:/path sources may have them"
            )
        if isinstance(spec, paths.LocalSpec):
            path = os.path.abspath(spec.path)
            if not os.path.lexists(path):
                raise InvalidArgument(f"backup: {source} does not exist")
            g = group(("local",), "", True)
            g.paths.append(path)
            g.local.append(path)
            g.labels.append(path)
        elif isinstance(spec, paths.ServerSpec):
            server = spec.server
            if isinstance(server, str):
                server = m.find_server_by_instance(server)
            if not spec.path:
                raise InvalidArgument(f"backup: {source}: name a path on the server")
            g = group(("server", server.instance_id), _dir_label(server.name), True)
            g.server = server
            g.paths.append(f"{server.instance_id}:{spec.path}")
            g.labels.append(f"{server.name}:{spec.path}")
        elif isinstance(spec, paths.UnmanagedSpec):
            # relayed through a temporary directory here, so rsync --relative would keep
            # the relay's path: each path is copied into its own parent directory instead
            where = f"{spec.username}@{spec.address}"
            path = spec.path.rstrip("/") or "/"
            parent = posixpath.dirname(path).strip("/")
            dest = posixpath.join(_dir_label(where), parent) if parent else _dir_label(where)
            g = group(("ssh", spec.username, spec.address, path), dest, False)
            g.paths.append(f"{spec.username}@{_bracketed(spec.address)}:{path}")
            g.labels.append(f"{where}:{spec.path}")
        elif isinstance(spec, paths.HostSpec):
            host = spec.host
            g = group(("host", str(id(host))), _dir_label(str(host.address)), True)
            g.paths.append(paths.RemotePath(host, spec.path, sudo=spec.sudo))
            g.labels.append(f"{host.address}:{spec.path}")
        elif isinstance(spec, paths.VolumeSpec):
            volume = spec.volume
            if isinstance(volume, str):
                volume = m.find_volume_by_volid(volume)
            g = group(("volume", volume.volume_id, spec.path), _dir_label(volume.name), False)
            sub = spec.path.rstrip("/")
            g.paths.append(f"{volume.volume_id}:/{sub}" if sub else f"{volume.volume_id}:/")
            g.labels.append(f"{volume.name}:/{spec.path}")
            g.volume_gib = volume.size
        else:  # pragma: no cover - parse_paths replaces PreviousSpec
            raise InvalidArgument(f"backup: cannot back up {source!r}")
        g.hooks.append(hooks)
    found = list(groups.values())
    if len(found) == 1 and found[0].key[0] == "volume" and not found[0].key[2]:
        found[0].dest = ""  # one whole volume: its root is the snapshot's root
    return found


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address else address


async def measure(groups: Sequence[Group]) -> int:
    """GiB for the data of these sources (local files, server paths and ssh hosts' paths
    measured, volumes by their size)."""
    total = 0
    for g in groups:
        if g.local:
            total += await anyio.to_thread.run_sync(data_size, g.local)
        if g.server is not None:
            total += await _du(g.server, [p.split(":", 1)[1] for p in g.paths])
        if g.key[0] == "ssh":
            total += await _pulled_size(g)
    gib = size_for(total) if total else 1
    return max([gib, *(g.volume_gib for g in groups)])


async def _pulled_size(g: Group) -> int:
    """Bytes a path on an ssh host holds (apparent sizes, as rsync copies them): a dry run
    of the pull's own rsync, over the same ssh (``$RSYNC_RSH`` honoured), into an empty
    directory here. An unreachable host or a missing path is that rsync's
    :class:`~asyncstage.errors.RsyncError`, before anything is made."""
    _, user, address, path = g.key
    with tempfile.TemporaryDirectory(prefix="asyncstage-measure-") as empty:
        source = paths.UnmanagedEndpoint(user, address, path)
        stats = await rsync_endpoints(
            [source], paths.LocalEndpoint(empty + "/"), options=["--dry-run"]
        )
    return stats.bytes


async def _du(server: Server, where: list[str]) -> int:
    """Bytes the paths take on ``server``; a path that is not there is a typed error."""
    try:
        out = await server.scmd("du", "-sb", "--", *where, sudo=True, timeout=600)
    except CommandFailed as e:
        shown = ", ".join(f"{server.name}:{w}" for w in where)
        raise InvalidArgument(f"backup: {shown}: missing or unreadable ({e})") from e
    total = 0
    for line in out.splitlines():
        first = line.split("\t", 1)[0].strip()
        if first.isdigit():
            total += int(first)
    return total


def volume_dir(dest: str) -> str:
    """``dest`` as a path inside the work volume (``/`` or ``/web1/``)."""
    return posixpath.join("/", dest, "")
