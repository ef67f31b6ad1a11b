"""asyncstage.adoption: which resources a manager adopts from their tags (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from asyncstage.adoption import OWNER_TAG, ours, owner_tags, refusal
from asyncstage.ec2 import tag

KEYS = {"asyncstage-us-east-1-aaaa1111", "asyncstage-us-east-1-bbbb2222"}
FSTYPES = ("ext4", "xfs", "raw")


def _tags(**tags: str) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _instance(key: str = "asyncstage-us-east-1-aaaa1111", **tags: str) -> dict[str, Any]:
    base = {tag("role"): "server", tag("name"): "web", tag("user"): "admin"}
    return {"InstanceId": "i-0123456789abcdef0", "KeyName": key, "Tags": _tags(**(base | tags))}


def _volume(**tags: str) -> dict[str, Any]:
    base = {tag("role"): "volume", tag("name"): "data", OWNER_TAG: "asyncstage-us-east-1-bbbb2222"}
    return {"VolumeId": "vol-0123456789abcdef0", "Tags": _tags(**(base | tags))}


def test_our_own_resources_are_adopted() -> None:
    assert refusal("server", _instance(), keys=KEYS) is None
    assert refusal("volume", _volume(), keys=KEYS, fstypes=FSTYPES) is None
    assert refusal("volume", _volume(**{tag("mtpt"): "/srv/x/"}), keys=KEYS) is None
    snap = {
        "SnapshotId": "snap-1",
        "Tags": _tags(**{tag("role"): "snapshot", OWNER_TAG: "asyncstage-us-east-1-aaaa1111"}),
    }
    assert refusal("snapshot", snap, keys=KEYS) is None
    assert owner_tags("k") == {OWNER_TAG: "k"} and owner_tags(None) == {}


@pytest.mark.parametrize(
    ("kind", "resource", "why"),
    [
        ("server", _instance(key="someone-elses-key"), "is not ours"),
        ("server", {**_instance(), "KeyName": None}, "is not ours"),
        ("server", _instance(**{tag("role"): "volume"}), "does not carry"),
        ("server", _instance(**{tag("name"): "$(reboot)"}), "naming rules"),
        ("server", _instance(**{tag("name"): "../x"}), "naming rules"),
        ("server", _instance(**{tag("user"): "-oProxyCommand=x"}), "naming rules"),
        ("server", _instance(**{tag("user"): "root@evil"}), "naming rules"),
        ("volume", _volume(**{OWNER_TAG: ""}), "is not ours"),
        ("volume", _volume(**{OWNER_TAG: "other"}), "is not ours"),
        ("volume", _volume(**{tag("name"): "new\nline"}), "naming rules"),
        ("volume", _volume(**{tag("name"): "x" * 300}), "naming rules"),
        ("volume", _volume(**{tag("mtpt"): "/usr/local/sbin"}), "naming rules"),
        ("volume", _volume(**{tag("mtpt"): "/mnt/../etc"}), "naming rules"),
        ("volume", _volume(**{tag("fstype"): "ext4 -o exec"}), "filesystem type"),
    ],
)
def test_foreign_or_hostile_resources_are_refused(
    kind: Any, resource: dict[str, Any], why: str
) -> None:
    got = refusal(kind, resource, keys=KEYS, fstypes=FSTYPES)
    assert got is not None and why in got
    assert "\n" not in got  # a hostile tag never breaks the log line


def test_ours_keeps_the_adoptable_and_logs_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    good, foreign = _volume(), _volume(**{OWNER_TAG: "other"})
    hostile = _volume(**{tag("name"): "$(id)"})
    with caplog.at_level("WARNING", logger="asyncstage"):
        assert ours("volume", [good, foreign, hostile], keys=KEYS) == [good]
    text = caplog.text
    assert text.count("not adopted") == 2 and "is not ours" in text and "naming rules" in text
