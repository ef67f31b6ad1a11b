"""Transfer path specs → typed endpoints.

Two steps, kept apart so that the first one needs no manager and no network:

1. :func:`parse_path` turns one path as a user writes it into a *spec*:

   =================================  =========================================
   ``/abs``, ``./rel``, ``Path(..)``  :class:`LocalSpec` (trailing slash kept)
   ``f"{server}:/abs"``               :class:`ServerSpec` (``i-…:`` + path)
   ``f"{server}:rel"``                :class:`ServerSpec`, relative to the
                                      login user's home
   ``f"{volume}"``                    :class:`VolumeSpec`, the volume's contents
   ``f"{volume}:/sub"``,
   ``f"{volume}/sub"``                :class:`VolumeSpec` (``sub`` inside it)
   ``":/sub"``                        :class:`PreviousSpec`: the server or
                                      volume of the path before it
   ``user@host:/path``                :class:`UnmanagedSpec`
   ``RemotePath(...)``                :class:`ServerSpec`, :class:`VolumeSpec`
                                      or :class:`HostSpec`
   =================================  =========================================

2. :func:`resolve_paths` (async) turns specs into *endpoints*
   (:class:`LocalEndpoint`, :class:`HostEndpoint`, :class:`UnmanagedEndpoint`)
   that the transfer engine (:mod:`asyncstage.transfer`) copies between. A
   volume resolves to wherever it is mounted; one that is not mounted is
   mounted first, on a server in its zone. Several sources must live on one
   host: :class:`~asyncstage.errors.PathError` otherwise, before anything is
   copied.

Local paths are handed to rsync as arguments (never to a shell), so any byte a
file name may hold arrives unchanged. A local path that rsync would mistake
for ``host:path`` or an option gets a ``./`` prefix.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from asyncstage.errors import NotFound, PathError

if TYPE_CHECKING:
    from asyncstage.ssh import SSHHost

__all__ = [
    "Endpoint",
    "HostEndpoint",
    "HostSpec",
    "LocalEndpoint",
    "LocalSpec",
    "PathLike",
    "PathSpec",
    "PreviousSpec",
    "RemotePath",
    "ServerSpec",
    "UnmanagedEndpoint",
    "UnmanagedSpec",
    "VolumeSpec",
    "check_one_host",
    "parse_path",
    "parse_paths",
    "resolve_names",
    "resolve_paths",
    "same_host",
    "volume_subpath",
]

_SERVER_RE = re.compile(r"^(i-[0-9a-f]{8,17}):(.*)$", re.DOTALL)
_VOLUME_RE = re.compile(r"^(vol-[0-9a-f]{8,17})(?:([:/])(.*))?$", re.DOTALL)
_UNMANAGED_RE = re.compile(r"^([^@/:\s]+)@([^@/:\s\[\]]+|\[[0-9A-Fa-f:.]+\]):(.*)$", re.DOTALL)


# -- the objects users may pass instead of strings ---------------------------


# Python 3.11 checks ``isinstance(obj, runtime_checkable_protocol)`` with ``hasattr``, which
# evaluates properties: ``Server.host`` of a stopped server raises, so a protocol check would
# refuse it. These checks look the members up statically (no property is evaluated), on the
# instance and its class, like 3.12's protocol checks do.
_SERVER_MEMBERS = ("instance_id", "host", "availability_zone")
_VOLUME_MEMBERS = ("volume_id", "mtpt", "mounted", "server", "availability_zone")
_MISSING = object()


def _has_members(obj: object, names: tuple[str, ...]) -> bool:
    return all(inspect.getattr_static(obj, n, _MISSING) is not _MISSING for n in names)


def _is_server(obj: object) -> bool:
    """Whether obj is a managed server (or quacks like one), without evaluating properties."""
    return _has_members(obj, _SERVER_MEMBERS)


def _is_volume(obj: object) -> bool:
    """Whether obj is a managed volume (or quacks like one), without evaluating properties."""
    return _has_members(obj, _VOLUME_MEMBERS)


class RemotePath:
    """A path on a managed server, inside a managed volume, or on an ssh host, as an object.

    ``RemotePath(server, "/etc")``, ``RemotePath(volume, "photos/")`` (relative
    to the volume's root, wherever it is mounted), or ``RemotePath(ssh_host,
    "/srv")`` for a host that is not managed (an :class:`asyncstage.ssh.SSHHost`
    with its own key and known_hosts). ``volume / "sub"`` and ``path / "sub"``
    build them; a trailing slash means "the contents", as in rsync.
    """

    __slots__ = ("path", "sudo", "target")

    def __init__(self, target: Any, path: str | os.PathLike[str] = "", *, sudo: bool = True):
        if not (_is_server(target) or _is_volume(target) or _is_ssh_host(target)):
            raise PathError(f"RemotePath needs a Server, a Volume or an SSHHost, not {target!r}")
        self.target = target
        self.path = os.fspath(path)
        self.sudo = sudo
        """Run the remote side as root (``sudo rsync``); for ssh hosts only."""

    def __truediv__(self, other: str | os.PathLike[str]) -> RemotePath:
        return RemotePath(self.target, _join(self.path, os.fspath(other)), sudo=self.sudo)

    def __str__(self) -> str:
        if _is_volume(self.target):
            sub = self.path.lstrip("/")
            return f"{self.target}:/{sub}" if sub else str(self.target)
        if _is_server(self.target):
            return f"{self.target}:{self.path}"
        label = getattr(self.target, "label", None) or getattr(self.target, "address", "?")
        return f"{label}:{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({self.target!r}, {self.path!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RemotePath):
            return NotImplemented
        return self.target is other.target and self.path == other.path

    def __hash__(self) -> int:
        return hash((id(self.target), self.path))


def _is_ssh_host(obj: object) -> bool:
    return callable(getattr(obj, "openssh_options", None)) and hasattr(obj, "address")


def _join(base: str, sub: str) -> str:
    if not base:
        return sub
    if not sub:
        return base
    return base.rstrip("/") + "/" + sub.lstrip("/")


# -- specs -------------------------------------------------------------------


@dataclass(frozen=True)
class LocalSpec:
    """A path on this machine; a trailing slash means its contents."""

    path: str


@dataclass(frozen=True)
class ServerSpec:
    """A path on a managed server, by instance id or object; relative = login user's home."""

    server: str | Any
    path: str


@dataclass(frozen=True)
class VolumeSpec:
    """A path inside a managed volume (relative to its root; ``""`` = its contents)."""

    volume: str | Any
    path: str


@dataclass(frozen=True)
class PreviousSpec:
    """``":/sub"``: ``sub`` on the server or volume of the path before this one."""

    path: str


@dataclass(frozen=True)
class UnmanagedSpec:
    """``user@host:/path`` on a host reached with the user's own ssh set-up."""

    username: str
    address: str
    path: str


@dataclass(frozen=True)
class HostSpec:
    """A path on an :class:`~asyncstage.ssh.SSHHost` given as an object."""

    host: Any
    path: str
    sudo: bool = True


PathSpec: TypeAlias = LocalSpec | ServerSpec | VolumeSpec | PreviousSpec | UnmanagedSpec | HostSpec
PathLike: TypeAlias = "str | os.PathLike[str] | RemotePath | Any"
"""What transfers accept: a string, a local path, a RemotePath, a Server or a Volume."""


def parse_path(path: PathLike) -> PathSpec:
    """Parse one transfer path (string, ``os.PathLike``, :class:`RemotePath`, Server or Volume).

    Pure: looks nothing up. ``os.PathLike`` objects (``pathlib.Path``) are
    always local, whatever characters they hold.
    """
    if isinstance(path, RemotePath):
        target = path.target
        if _is_volume(target):
            return VolumeSpec(target, volume_subpath(path.path))
        if _is_server(target):
            return ServerSpec(target, path.path)
        return HostSpec(target, path.path, path.sudo)
    if _is_volume(path):
        return VolumeSpec(path, "")
    if _is_server(path):
        raise PathError(
            f"a server alone is not a path: write f'{{server}}:/path' or RemotePath(server, path) "
            f"(got {path!r})"
        )
    if isinstance(path, os.PathLike):
        text = os.fspath(path)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        if not text:
            raise PathError("empty path")
        return LocalSpec(text)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str):
        raise PathError(f"not a transfer path: {path!r}")
    if not path:
        raise PathError("empty path")
    if m := _SERVER_RE.match(path):
        return ServerSpec(m.group(1), m.group(2))
    if m := _VOLUME_RE.match(path):
        return VolumeSpec(m.group(1), volume_subpath(m.group(3) or ""))
    if path.startswith(":"):
        return PreviousSpec(path[1:])
    if m := _UNMANAGED_RE.match(path):
        return UnmanagedSpec(m.group(1), m.group(2).strip("[]"), m.group(3))
    return LocalSpec(path)


def parse_paths(paths: Sequence[PathLike]) -> list[PathSpec]:
    """Parse sources and destination; ``":/x"`` must follow a server or volume path."""
    specs = [parse_path(p) for p in paths]
    for i, spec in enumerate(specs):
        if isinstance(spec, PreviousSpec):
            if i == 0:
                raise PathError(f"{':' + spec.path!r}: ':' needs a server or volume path before it")
            prev = specs[i - 1]
            if isinstance(prev, ServerSpec):
                specs[i] = ServerSpec(prev.server, spec.path)
            elif isinstance(prev, VolumeSpec):
                specs[i] = VolumeSpec(prev.volume, volume_subpath(spec.path))
            elif isinstance(prev, HostSpec):
                specs[i] = HostSpec(prev.host, spec.path, prev.sudo)
            elif isinstance(prev, UnmanagedSpec):
                specs[i] = UnmanagedSpec(prev.username, prev.address, spec.path)
            else:
                raise PathError(
                    f"{':' + spec.path!r}: ':' needs a server or volume path before it, "
                    f"not the local path {getattr(prev, 'path', prev)!r}"
                )
    return specs


def volume_subpath(sub: str) -> str:
    """Normalise a path inside a volume: relative to its root, no ``..``, trailing slash kept."""
    if any(part == ".." for part in sub.split("/")):
        raise PathError(f"{sub!r}: '..' may not leave the volume")
    return sub.lstrip("/")


# -- endpoints ---------------------------------------------------------------


@dataclass(frozen=True)
class LocalEndpoint:
    """A path on this machine."""

    path: str

    def rsync_arg(self) -> str:
        """The path as an rsync argument: ``./`` before names rsync would misread."""
        p = self.path
        if p.startswith("/"):
            return p
        if p.startswith("-") or (":" in p.split("/", 1)[0]):
            return "./" + p
        return p

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True, eq=False)
class HostEndpoint:
    """A path on an ssh host we hold an :class:`~asyncstage.ssh.SSHHost` for."""

    host: SSHHost
    path: str
    sudo: bool = True
    """Run the remote side as root (managed servers and volumes: always)."""
    label: str = ""
    """How errors and logs name it (``i-…:/path``, ``vol-…:/sub``)."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HostEndpoint):
            return NotImplemented
        return self.host is other.host and self.path == other.path and self.sudo == other.sudo

    def __hash__(self) -> int:
        return hash((id(self.host), self.path))

    def __str__(self) -> str:
        return self.label or f"{self.host.label}:{self.path}"


@dataclass(frozen=True)
class UnmanagedEndpoint:
    """``user@host:/path``, reached with the user's own ssh (``RSYNC_RSH`` honoured).

    To or from a managed server or volume the transfer is relayed through a
    temporary directory on this machine.
    """

    username: str
    address: str
    path: str

    def __str__(self) -> str:
        return f"{self.username}@{self.address}:{self.path}"


Endpoint: TypeAlias = LocalEndpoint | HostEndpoint | UnmanagedEndpoint


def same_host(a: Endpoint, b: Endpoint) -> bool:
    """Whether two endpoints live on one machine (one SSHHost, one user@host, or local)."""
    if isinstance(a, LocalEndpoint) and isinstance(b, LocalEndpoint):
        return True
    if isinstance(a, HostEndpoint) and isinstance(b, HostEndpoint):
        return a.host is b.host or (
            a.host.address == b.host.address
            and a.host.port == b.host.port
            and a.host.username == b.host.username
        )
    if isinstance(a, UnmanagedEndpoint) and isinstance(b, UnmanagedEndpoint):
        return (a.username, a.address) == (b.username, b.address)
    return False


def check_one_host(sources: Sequence[Endpoint]) -> None:
    """Raise :class:`PathError` unless every source lives on one host."""
    if not sources:
        raise PathError("no source given")
    first = sources[0]
    for other in sources[1:]:
        if not same_host(first, other):
            raise PathError(
                f"all sources must live on one host: {first} and {other} do not; "
                "copy them in separate transfers"
            )
    if len({s.sudo for s in sources if isinstance(s, HostEndpoint)}) > 1:
        raise PathError("sources on one host must all run as root, or all not")


# -- resolution against a manager ---------------------------------------------

_NAMED_PATH = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._+-]*):(.*)$", re.DOTALL)


class _NamesLike(Protocol):
    def find_server_by_name(self, name: str) -> Any: ...
    def find_volume_by_name(self, name: str) -> Any: ...


def resolve_names(manager: _NamesLike, path: PathLike) -> PathLike:
    """``mydata:/sub`` → ``vol-…:/sub``, ``web:/etc`` → ``i-…:/etc``; other paths unchanged.

    Names are looked up among the servers and volumes ``manager`` knows (a blocking or an
    async manager). ``NAME:…`` with a NAME that is neither a server nor a volume is refused
    with :class:`~asyncstage.errors.NotFound` (rsync would take it for a remote host);
    ``user@host:…``, ids and non-strings are returned as they are.
    """
    if not isinstance(path, str):
        return path
    match = _NAMED_PATH.match(path)
    if match is None or "@" in match.group(1):
        return path
    name, rest = match.groups()
    if re.fullmatch(r"(i|vol)-[0-9a-f]{8,17}", name):
        return path
    server = manager.find_server_by_name(name)
    if server is not None:
        return f"{server.instance_id}:{rest}"
    volume = manager.find_volume_by_name(name)
    if volume is not None:
        return f"{volume.volume_id}:{rest}"
    raise NotFound(
        f"{path!r}: no server or volume named {name!r} (write ./{path} for a local path)"
    )


class _ManagerLike(Protocol):
    def find_server_by_instance(self, instance_id: str) -> Any: ...
    def find_volume_by_volid(self, volume_id: str) -> Any: ...
    async def get_server_in_zone(self, zone: str) -> Any: ...


async def resolve_paths(manager: Any, paths: Sequence[PathLike]) -> list[Endpoint]:
    """Resolve transfer paths (sources then destination) into endpoints.

    Looks servers and volumes up in ``manager``; mounts a volume that is not
    mounted (on a server in its zone, made if needed). Raises
    :class:`PathError` for paths that cannot be resolved,
    :class:`~asyncstage.errors.UnknownServer` /
    :class:`~asyncstage.errors.UnknownVolume` for ids the manager does not know.
    Does not check that sources share a host: see :func:`check_one_host`.
    """
    specs = parse_paths(paths)
    result: list[Endpoint] = []
    for spec in specs:
        result.append(await _resolve_one(manager, spec))
    return result


async def _resolve_one(manager: _ManagerLike, spec: PathSpec) -> Endpoint:
    if isinstance(spec, LocalSpec):
        return LocalEndpoint(spec.path)
    if isinstance(spec, UnmanagedSpec):
        return UnmanagedEndpoint(spec.username, spec.address, spec.path)
    if isinstance(spec, HostSpec):
        return HostEndpoint(spec.host, spec.path, spec.sudo)
    if isinstance(spec, ServerSpec):
        server = spec.server
        if isinstance(server, str):  # the manager raises UnknownServer for a stranger
            server = manager.find_server_by_instance(server)
        await _ensure_running(server)
        return HostEndpoint(server.host, spec.path, True, f"{server}:{spec.path}")
    if isinstance(spec, VolumeSpec):
        volume = spec.volume
        if isinstance(volume, str):  # likewise UnknownVolume
            volume = manager.find_volume_by_volid(volume)
        # checked on its server right now: this very volume at its mount point (mounted
        # again if need be), the path resolved there and inside it; nothing is copied else
        (where,) = await volume._checked_paths(spec.path or "./")
        server = volume.server
        if server is None:
            raise PathError(f"{volume}: could not be mounted for the transfer")
        label = f"{volume}:/{spec.path}" if spec.path else str(volume)
        return HostEndpoint(server.host, where, True, label)
    raise PathError(f"unresolved path {spec!r}")  # PreviousSpec is replaced by parse_paths


async def _ensure_running(server: Any) -> None:
    """Start a stopped server a path lives on (waits until ssh answers)."""
    if getattr(server, "state", "running") != "running":
        await server.start()
