"""Transfer path specs: parsing (pure), endpoints and the one-host rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asyncstage.errors import PathError, ServerNotRunning
from asyncstage.paths import (
    HostEndpoint,
    HostSpec,
    LocalEndpoint,
    LocalSpec,
    PreviousSpec,
    RemotePath,
    ServerSpec,
    UnmanagedEndpoint,
    UnmanagedSpec,
    VolumeSpec,
    check_one_host,
    parse_path,
    parse_paths,
    resolve_paths,
    same_host,
)

IID = "i-0123456789abcdef0"
VID = "vol-0123456789abcdef0"


class FakeServer:
    """Just enough of a Server for the typed paths (no network)."""

    def __init__(self, instance_id: str = IID) -> None:
        self.instance_id = instance_id
        self.host: Any = FakeHost("127.0.0.9")
        self.availability_zone = "us-east-1a"

    def __str__(self) -> str:
        return self.instance_id


class FakeVolume:
    def __init__(self, volume_id: str = VID) -> None:
        self.volume_id = volume_id
        self.mtpt: str | None = None
        self.mounted = False
        self.server: Any = None
        self.availability_zone = "us-east-1a"

    def __str__(self) -> str:
        return self.volume_id

    def __truediv__(self, sub: str) -> RemotePath:
        return RemotePath(self, sub)


class FakeHost:
    def __init__(self, address: str, port: int = 22, username: str = "admin") -> None:
        self.address = address
        self.port = port
        self.username = username
        self.label = address

    def openssh_options(self) -> list[str]:
        return []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/abs/path", LocalSpec("/abs/path")),
        ("/abs/path/", LocalSpec("/abs/path/")),
        ("./rel/path/", LocalSpec("./rel/path/")),
        ("rel", LocalSpec("rel")),
        ("a file: with colon", LocalSpec("a file: with colon")),
        (f"{IID}:/opt", ServerSpec(IID, "/opt")),
        (f"{IID}:/opt/", ServerSpec(IID, "/opt/")),
        (f"{IID}:rel/dir", ServerSpec(IID, "rel/dir")),
        (VID, VolumeSpec(VID, "")),
        (f"{VID}:/sub", VolumeSpec(VID, "sub")),
        (f"{VID}:/sub/", VolumeSpec(VID, "sub/")),
        (f"{VID}/sub/x", VolumeSpec(VID, "sub/x")),
        (f"{VID}:sub", VolumeSpec(VID, "sub")),
        (":/other", PreviousSpec("/other")),
        ("fred@gw.example.org:media/", UnmanagedSpec("fred", "gw.example.org", "media/")),
        ("root@127.0.0.5:/srv", UnmanagedSpec("root", "127.0.0.5", "/srv")),
        ("me@[::1]:/srv", UnmanagedSpec("me", "::1", "/srv")),
    ],
)
def test_parse_strings(text: str, expected: object) -> None:
    assert parse_path(text) == expected


def test_hostile_names_stay_byte_identical() -> None:
    name = "/tmp/sp ace/'q\"$x`y`;*\n/ünï/"
    assert parse_path(name) == LocalSpec(name)
    assert parse_path(f"{IID}:{name}") == ServerSpec(IID, name)
    assert parse_path(f"{VID}:{name}") == VolumeSpec(VID, name.lstrip("/"))


def test_pathlib_is_always_local() -> None:
    assert parse_path(Path(f"{IID}:/x")) == LocalSpec(f"{IID}:/x")


def test_empty_and_bad() -> None:
    with pytest.raises(PathError):
        parse_path("")
    with pytest.raises(PathError):
        parse_path(42)
    with pytest.raises(PathError):
        parse_path(f"{VID}:/../etc")


def test_previous_shorthand() -> None:
    specs = parse_paths([f"{IID}:/a", ":/b", f"{VID}:/c", ":/d/", "/local"])
    assert specs == [
        ServerSpec(IID, "/a"),
        ServerSpec(IID, "/b"),
        VolumeSpec(VID, "c"),
        VolumeSpec(VID, "d/"),
        LocalSpec("/local"),
    ]
    with pytest.raises(PathError, match="needs a server or volume"):
        parse_paths([":/x", "/y"])
    with pytest.raises(PathError, match="local path"):
        parse_paths(["/x", ":/y", "/z"])


def test_typed_paths() -> None:
    server, volume, host = FakeServer(), FakeVolume(), FakeHost("127.0.0.7")
    assert parse_path(RemotePath(server, "/etc")) == ServerSpec(server, "/etc")
    assert parse_path(volume) == VolumeSpec(volume, "")
    sub = volume / "photos" / "2024/"
    assert isinstance(sub, RemotePath)
    assert parse_path(sub) == VolumeSpec(volume, "photos/2024/")
    assert str(sub) == f"{VID}:/photos/2024/"
    assert parse_path(RemotePath(host, "/srv")) == HostSpec(host, "/srv", True)
    assert parse_paths([RemotePath(host, "/a"), ":/b"])[1] == HostSpec(host, "/b", True)
    with pytest.raises(PathError):
        parse_path(server)  # a server alone is not a path
    with pytest.raises(PathError):
        RemotePath(object(), "/x")


def test_local_endpoint_protects_odd_names() -> None:
    assert LocalEndpoint("/a:b").rsync_arg() == "/a:b"
    assert LocalEndpoint("a:b/c").rsync_arg() == "./a:b/c"
    assert LocalEndpoint("-rf").rsync_arg() == "./-rf"
    assert LocalEndpoint("dir/x:y").rsync_arg() == "dir/x:y"


def test_one_host_rule() -> None:
    a, b = FakeHost("127.0.0.2"), FakeHost("127.0.0.3")
    check_one_host([LocalEndpoint("/x"), LocalEndpoint("/y")])
    check_one_host([HostEndpoint(a, "/x"), HostEndpoint(a, "/y")])  # type: ignore[arg-type]
    assert same_host(HostEndpoint(a, "/x"), HostEndpoint(FakeHost("127.0.0.2"), "/y"))  # type: ignore[arg-type]
    with pytest.raises(PathError, match="one host"):
        check_one_host([HostEndpoint(a, "/x"), HostEndpoint(b, "/y")])  # type: ignore[arg-type]
    with pytest.raises(PathError, match="one host"):
        check_one_host([LocalEndpoint("/x"), HostEndpoint(a, "/y")])  # type: ignore[arg-type]
    with pytest.raises(PathError, match="one host"):
        check_one_host([UnmanagedEndpoint("u", "h", "/x"), UnmanagedEndpoint("u", "g", "/x")])
    with pytest.raises(PathError):
        check_one_host([])


class StoppedServer:
    """A server whose ``host`` property raises while it is stopped, like the real one."""

    def __init__(self) -> None:
        self.instance_id = IID
        self.availability_zone = "us-east-1a"
        self.state = "stopped"
        self.starts = 0
        self._host = FakeHost("127.0.0.11")

    @property
    def host(self) -> FakeHost:
        if self.state != "running":
            raise ServerNotRunning(f"server {self.instance_id} has no address")
        return self._host

    async def start(self) -> None:
        self.starts += 1
        self.state = "running"

    def __str__(self) -> str:
        return self.instance_id


class OneServerManager:
    def __init__(self, server: StoppedServer) -> None:
        self.server = server

    def find_server_by_instance(self, instance_id: str) -> StoppedServer:
        assert instance_id == self.server.instance_id
        return self.server


@pytest.mark.anyio
async def test_a_stopped_server_in_a_remote_path_is_started_not_refused() -> None:
    """Python 3.11's isinstance against a runtime protocol evaluated ``host``, which
    raises for a stopped server: RemotePath refused it instead of starting it."""
    server = StoppedServer()
    path = RemotePath(server, "/etc/hostname")
    assert str(path) == f"{IID}:/etc/hostname"
    assert parse_path(path) == ServerSpec(server, "/etc/hostname")
    assert server.starts == 0  # parsing looks nothing up, starts nothing
    for given in (path, f"{IID}:/etc/hostname"):
        server.state = "stopped"
        (endpoint,) = await resolve_paths(OneServerManager(server), [given])
        assert isinstance(endpoint, HostEndpoint)
        assert endpoint.host is server.host and endpoint.path == "/etc/hostname"
    assert server.starts == 2
