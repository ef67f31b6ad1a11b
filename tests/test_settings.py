"""A Manager's settings objects, and the keyword arguments that still set them one by one."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from asyncstage import Manager
from asyncstage.settings import (
    TIMING_KEYWORDS,
    Access,
    Connection,
    Launch,
    ManagerKeywords,
    Storage,
)
from asyncstage.timeouts import Timeouts

# a value other than the default for every keyword a Manager takes one by one
SAMPLES: dict[str, Any] = {
    "endpoint_url": "http://127.0.0.1:9",
    "profile": "other",
    "aws_access_key_id": "AKIDEXAMPLE",
    "aws_secret_access_key": "secret",
    "aws_session_token": "token",
    "retry_mode": "standard",
    "request_rate": 2.0,
    "instance_type": "t3.large",
    "image": "ami-12345678",
    "image_owners": ["self"],
    "availability_zone": "us-east-1b",
    "username": "admin",
    "architecture": "arm64",
    "root_type": None,
    "ssh_cidr": ["10.0.0.0/8"],
    "security_group": "elsewhere",
    "reuse_key": False,
    "host_key_policy": "accept-new",
    "host_keys": "user-data",
    "checkip_url": "http://127.0.0.1:9/checkip",
    "reuse_volumes": False,
    "mount_options": "noatime",
    "install_packages": False,
    "server_timeout": 7.0,
    "volume_timeout": 8.0,
    "snapshot_timeout": 9.0,
    "exit_timeout": 10.0,
    "console_timeout": 11.0,
    "poll_interval": 0.5,
    "launch_window": 0.25,
}
OBJECTS = {"connection": Connection, "launch": Launch, "access": Access, "storage": Storage}


@pytest.fixture(autouse=True)
def _aws_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An AWS configuration of this test's own that has the sample's profile."""
    config = tmp_path / "aws-config"
    config.write_text("[profile other]\nregion = us-east-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))


def _manager(tmp_path: Path, **options: Any) -> Manager:
    return Manager(region="us-east-1", dotdir=tmp_path, scan=False, **options)


def _as_object(keyword: str, value: Any) -> dict[str, Any]:
    """The Manager argument that says what ``keyword=value`` says, as a settings object."""
    if keyword in TIMING_KEYWORDS:
        return {"timeouts": Timeouts(**{TIMING_KEYWORDS[keyword]: value})}
    for argument, cls in OBJECTS.items():
        if keyword in {f.name for f in fields(cls)}:
            return {argument: cls(**{keyword: value})}
    raise AssertionError(f"{keyword} belongs to no settings object")


def _settings(m: Manager) -> tuple[object, ...]:
    return (m.connection, m.launch, m.access, m.storage, m.timeouts)


def test_every_keyword_has_a_sample_and_a_settings_object() -> None:
    assert set(SAMPLES) == set(ManagerKeywords.__annotations__)
    for keyword, value in SAMPLES.items():
        assert _as_object(keyword, value)


@pytest.mark.parametrize("keyword", sorted(SAMPLES))
def test_a_keyword_sets_what_its_settings_object_sets(keyword: str, tmp_path: Path) -> None:
    value = SAMPLES[keyword]
    by_keyword = _manager(tmp_path, **{keyword: value})
    by_object = _manager(tmp_path, **_as_object(keyword, value))
    assert _settings(by_keyword) == _settings(by_object)
    assert _settings(by_keyword) != _settings(_manager(tmp_path))


def test_the_old_keywords_reach_the_manager_and_its_parts(tmp_path: Path) -> None:
    m = _manager(tmp_path, **SAMPLES)
    assert m.instance_type == "t3.large" and m.architecture == "arm64"
    assert m.availability_zone == "us-east-1b" and m.username == "admin"
    assert m.mount_options == "noatime" and not m.reuse_volumes and not m.install_packages
    assert m.host_key_policy == "accept-new" and m.endpoint_url == "http://127.0.0.1:9"
    assert m.timeouts == Timeouts(7.0, 8.0, 9.0, 10.0, 0.5, 0.25, 11.0, 60.0)
    assert m.account.ssh_cidrs == ["10.0.0.0/8"] and m.account.security_group == "elsewhere"
    assert m.ec2.endpoint_url == "http://127.0.0.1:9"
    ctx = m.context
    assert ctx.launch is m.launch and ctx.storage is m.storage
    assert ctx.timeouts is m.timeouts and ctx.host_key_policy == "accept-new"
    assert m.host_keys == "user-data" and ctx.host_keys == "user-data"


def test_a_keyword_overrides_its_field_of_the_object(tmp_path: Path) -> None:
    m = _manager(
        tmp_path,
        launch=Launch(instance_type="t3.small", image="ami-87654321"),
        timeouts=Timeouts(server=30.0, volume=40.0),
        instance_type="t3.large",
        server_timeout=5.0,
    )
    assert m.launch == Launch(instance_type="t3.large", image="ami-87654321")
    assert m.timeouts == Timeouts(server=5.0, volume=40.0)
    assert m.instance_type == "t3.large"
    # None where None is the default says "not given"; elsewhere it is a value
    kept = _manager(tmp_path, launch=Launch(image="ami-87654321"), image=None, root_type=None)
    assert kept.launch == Launch(image="ami-87654321", root_type=None)


def test_without_settings_the_defaults(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    assert _settings(m) == (Connection(), Launch(), Access(), Storage(), Timeouts())
    assert m.instance_type == "t3.micro" and m.mount_options == "nosuid,nodev"
    assert _manager(tmp_path, architecture="arm64").instance_type == "t4g.micro"


def test_an_unknown_keyword_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"instance_typ\b"):
        _manager(tmp_path, instance_typ="t3.large")


def test_settings_are_checked_as_before(tmp_path: Path) -> None:
    from asyncstage.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        _manager(tmp_path, access=Access(host_key_policy="trust-all"))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="host_keys must be one of console, user-data"):
        _manager(tmp_path, host_keys="userdata")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        _manager(tmp_path, launch=Launch(username="no such user"))
