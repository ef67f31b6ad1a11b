"""The registry of a Manager: what it knows, names, lookups (pure, no I/O, no cloud)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from asyncstage.ec2 import Resource
from asyncstage.errors import NameTaken, UnknownServer, UnknownVolume
from asyncstage.registry import Registry
from asyncstage.server import Server
from asyncstage.settings import Storage
from asyncstage.volume import Volume


class Owner:
    """The manager side a Server and a Volume see: a context with just the registry."""

    def __init__(self) -> None:
        self.registry = Registry(lambda desc: Volume(self, desc))  # type: ignore[arg-type]
        self.context = SimpleNamespace(registry=self.registry, storage=Storage())


def _instance(iid: str, name: str, state: str = "running") -> Resource:
    return {
        "InstanceId": iid,
        "State": {"Name": state},
        "Tags": [{"Key": "asyncstage:name", "Value": name}],
    }


def _volume(vid: str, name: str, **extra: Any) -> Resource:
    tags = [
        {"Key": "asyncstage:name", "Value": name},
        {"Key": "asyncstage:fstype", "Value": "ext4"},
    ]
    return {"VolumeId": vid, "Size": 1, "AvailabilityZone": "z1", "Tags": tags} | extra


def _server(owner: Owner, iid: str, name: str, state: str = "running") -> Server:
    server = Server(owner, _instance(iid, name, state), keyfile=None, username="admin")  # type: ignore[arg-type]
    return owner.registry.add_server(server)


def test_servers_by_id_and_name() -> None:
    owner = Owner()
    reg = owner.registry
    a = _server(owner, "i-0000000a", "alpha")
    assert reg.servers() == [a] and reg.server("i-0000000a") is a
    assert reg.find_server_by_instance("i-0000000a") is a
    assert reg.find_server_by_name("alpha") is a and reg.find_server_by_name("beta") is None
    with pytest.raises(UnknownServer):
        reg.find_server_by_instance("i-0000000b")
    reg.mark_started([a])
    assert reg.started() == [a]
    reg.forget_server(a)
    assert reg.servers() == [] and reg.started() == []
    assert "0 servers 0 volumes" in repr(reg)


def test_names_are_reserved_until_released() -> None:
    owner = Owner()
    reg = owner.registry
    _server(owner, "i-0000000a", "alpha")
    assert reg.reserve(["b", "c"]) == ["b", "c"]
    for taken in (["alpha"], ["b"], ["d", "d"]):
        with pytest.raises(NameTaken):
            reg.reserve(taken)
    reg.release(["b"])
    assert reg.reserve(["b"]) == ["b"]
    assert reg.new_server_name().startswith("server-")
    assert reg.new_volume_name() != reg.new_volume_name()


def test_volumes_made_once_refreshed_after() -> None:
    reg = Owner().registry
    v = reg.add_volume(_volume("vol-0000000a", "data"), created=True)
    again = reg.add_volume(_volume("vol-0000000a", "data", Size=5))
    assert again is v and v.size == 5 and v.fstype == "ext4"
    assert reg.find_volume_by_volid("vol-0000000a") is v
    assert reg.find_volume_by_name("data") is v and reg.find_volume_by_name("x") is None
    assert reg.created_volumes() == [v]
    reg.forget_volume(v)
    assert reg.volumes() == [] and reg.created_volumes() == []
    with pytest.raises(UnknownVolume):
        reg.find_volume_by_volid("vol-0000000a")


def test_a_scan_adopts_attachments_to_known_servers() -> None:
    owner = Owner()
    reg = owner.registry
    up = _server(owner, "i-0000000a", "up")
    down = _server(owner, "i-0000000b", "down", state="stopped")

    def attached(iid: str) -> list[dict[str, str]]:
        return [{"InstanceId": iid, "State": "attached", "Device": "/dev/sdf"}]

    found = reg.adopt_volumes(
        [
            _volume("vol-0000000a", "on-up", State="in-use", Attachments=attached(up.instance_id)),
            _volume("vol-0000000b", "on-down", State="in-use", Attachments=attached("i-0000000b")),
            _volume("vol-0000000c", "elsewhere", State="in-use", Attachments=attached("i-9")),
            _volume("vol-0000000d", "free", State="available"),
            _volume("vol-0000000e", "gone", State="deleting"),
        ]
    )
    on_up, on_down = reg.find_volume_by_name("on-up"), reg.find_volume_by_name("on-down")
    assert on_up is not None and on_down is not None
    assert found == {up: [on_up]}  # only running servers have mounts to read
    assert on_up.server is up and on_up.ec2_device == "/dev/sdf" and not on_up.mounted
    assert on_down.server is down and down.volumes() == [on_down]
    for name in ("elsewhere", "free"):
        other = reg.find_volume_by_name(name)
        assert other is not None and other.server is None and other.ec2_device is None
    assert reg.find_volume_by_name("gone") is None


def test_volume_state_changes_only_through_its_own_methods() -> None:
    owner = Owner()
    server = _server(owner, "i-0000000a", "alpha")
    v = owner.registry.add_volume(_volume("vol-0000000a", "data"))
    with pytest.raises(AttributeError):
        v.mounted = True  # type: ignore[misc]
    v._record_attach(server, "/dev/sdf", "/dev/xvdf")
    v._record_mount("/mnt/data")
    assert (v.server, v.mtdev, v.mtpt, v.mounted) == (server, "/dev/xvdf", "/mnt/data", True)
    assert v.fstab_line() == "/dev/xvdf\t/mnt/data\text4\tnosuid,nodev,nofail\t0\t2"
    owner.registry.record_stop(server)  # its mounted volumes are mounted again on start
    assert not v.mounted and v.server is server
    assert v._prepare_remount() and v.mtdev is None
    v._record_mount("/mnt/data")
    assert not v._prepare_remount()
    v._record_detach()
    assert (v.server, v.mtdev, v.ec2_device, v.mounted) == (None, None, None, False)
    assert v.mtpt == "/mnt/data"  # remembered for the next mount
    v._record_attach(server, "/dev/sdf", "/dev/xvdf")
    owner.registry.forget_server(server)  # terminated: its volumes are detached
    assert (v.server, v.mounted) == (None, False)
    assert owner.registry.find_server_by_name("alpha") is None


def test_connections_to_close_on_exit() -> None:
    owner = Owner()
    reg = owner.registry
    a, b = _server(owner, "i-0000000a", "a"), _server(owner, "i-0000000b", "b")
    first, second, other = object(), object(), object()
    reg.track_host(a, first)  # type: ignore[arg-type]
    reg.track_host(a, second)  # type: ignore[arg-type] - a new address: the first retires
    reg.track_host(b, other)  # type: ignore[arg-type]
    assert reg.hosts_to_close() == [second, other, first]
    # current connections are closed at every exit (a reopened manager reconnects)
    assert reg.hosts_to_close() == [second, other]
    reg.forget_server(b)
    assert reg.hosts_to_close() == [second, other]
    assert reg.hosts_to_close() == [second]
