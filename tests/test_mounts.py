"""asyncstage.mounts: the mount probe's parsing and judgement (no root, no cloud).

The probe script itself is also run here, locally, against this machine's own
mounts and a temporary tree of symlinks.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from asyncstage import mounts
from asyncstage.errors import PathError, VolumeInUse, VolumeNotMounted

VOL = "vol-0123456789abcdef0"


def _dev(major: int, minor: int) -> str:
    return str(os.makedev(major, minor))


def _probe(
    *,
    device: str | None = "/dev/xvdf",
    devnum: str = "ca:50",
    seen: str = "-",
    parent: str = "-",
    info: list[str] = (),  # type: ignore[assignment]
    sources: dict[str, str] | None = None,
    paths: list[str] = (),  # type: ignore[assignment]
) -> mounts.Probe:
    lines = [f"D {devnum} serial {device}" if device else "N", f"T {seen} {parent}"]
    lines += [f"M {line}" for line in info]
    lines += [f"S {num} {src}" for src, num in (sources or {}).items()]
    lines += [f"P {p}" for p in paths]
    return mounts.parse_probe("\n".join(lines) + "\n")


ROOT = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw"
VOLUME_AT = "40 27 202:80 / /mnt/Staging/v rw,nosuid,nodev - ext4 /dev/xvdf rw"
TMPFS_AT = "41 40 0:60 / /mnt/Staging/v rw - tmpfs tmpfs rw,size=4096k"
VOLUME_ELSEWHERE = "42 27 202:80 / /srv/moved rw - ext4 /dev/xvdf rw"
BTRFS_AT = "43 27 0:61 / /mnt/Staging/v rw - btrfs /dev/xvdf rw"
SPACE_AT = r"44 27 202:80 / /mnt/with\040space rw - ext4 /dev/xvdf rw"


def test_mountinfo_is_parsed_and_unescaped() -> None:
    found = mounts.parse_mountinfo([ROOT, SPACE_AT, "garbage", ""])
    assert found == [
        mounts.Mount("/", (254, 0), "/dev/vda", "ext4"),
        mounts.Mount("/mnt/with space", (202, 80), "/dev/xvdf", "ext4"),
    ]


def test_the_volume_at_its_mount_point_is_mounted() -> None:
    probe = _probe(seen=_dev(202, 80), parent=_dev(254, 0), info=[ROOT, VOLUME_AT])
    assert probe.devnum == (0xCA, 0x50) == (202, 80)
    assert probe.device == "/dev/xvdf" and probe.by_serial
    assert probe.judge("v", "/mnt/Staging/v") == "mounted"


def test_btrfs_is_recognised_by_its_source_device() -> None:
    # stat() of a btrfs mount root shows its subvolume's own anonymous device (0:70),
    # neither the block device nor mountinfo's 0:61: the source device decides
    subvolume = _probe(
        seen=_dev(0, 70),
        parent=_dev(254, 0),
        info=[ROOT, BTRFS_AT],
        sources={"/dev/xvdf": "ca:50", "/dev/vda": "fe:0"},
    )
    assert subvolume.judge("v", "/mnt/Staging/v") == "mounted"
    # a tmpfs stacked over it is what is seen, and is refused
    over = "47 43 0:71 / /mnt/Staging/v rw - tmpfs tmpfs rw"
    stacked = _probe(
        seen=_dev(0, 71),
        parent=_dev(254, 0),
        info=[ROOT, BTRFS_AT, over],
        sources={"/dev/xvdf": "ca:50"},
    )
    with pytest.raises(VolumeNotMounted, match="tmpfs"):
        stacked.judge("v", "/mnt/Staging/v")
    probe = _probe(
        seen=_dev(0, 61),
        parent=_dev(254, 0),
        info=[ROOT, BTRFS_AT],
        sources={"/dev/xvdf": "ca:50", "/dev/vda": "fe:0"},
    )
    assert probe.judge("v", "/mnt/Staging/v") == "mounted"


def test_unmounted_behind_its_back_is_mounted_again() -> None:
    # the mount point is a plain directory of the root filesystem now
    probe = _probe(seen=_dev(254, 0), parent=_dev(254, 0), info=[ROOT])
    assert probe.judge("v", "/mnt/Staging/v") == "unmounted"
    # a mount point that does not even exist any more
    assert _probe(info=[ROOT]).judge("v", "/mnt/Staging/v") == "unmounted"


def test_another_filesystem_at_the_mount_point_is_refused() -> None:
    probe = _probe(seen=_dev(0, 60), parent=_dev(254, 0), info=[ROOT, TMPFS_AT])
    with pytest.raises(VolumeNotMounted, match="tmpfs"):
        probe.judge("v", "/mnt/Staging/v")
    # stacked over the volume itself: what is seen is the tmpfs, not the volume
    stacked = _probe(seen=_dev(0, 60), parent=_dev(254, 0), info=[ROOT, VOLUME_AT, TMPFS_AT])
    with pytest.raises(VolumeNotMounted):
        stacked.judge("v", "/mnt/Staging/v")


def test_a_mount_over_a_parent_that_hides_the_volume_is_refused() -> None:
    over = "45 27 0:62 / /mnt/Staging rw - tmpfs tmpfs rw"
    probe = _probe(seen=_dev(0, 62), parent=_dev(0, 62), info=[ROOT, VOLUME_AT, over])
    with pytest.raises(VolumeNotMounted, match="hides"):
        probe.judge("v", "/mnt/Staging/v")


def test_the_volume_mounted_elsewhere_is_refused() -> None:
    probe = _probe(seen=_dev(254, 0), parent=_dev(254, 0), info=[ROOT, VOLUME_ELSEWHERE])
    with pytest.raises(VolumeInUse, match="/srv/moved"):
        probe.judge("v", "/mnt/Staging/v")


def test_a_missing_device_is_refused() -> None:
    probe = _probe(device=None, seen=_dev(254, 0), parent=_dev(254, 0), info=[ROOT])
    assert probe.devnum is None
    with pytest.raises(VolumeNotMounted, match="device"):
        probe.judge("v", "/mnt/Staging/v")


def test_a_subdirectory_of_the_volume_is_not_its_mount_point() -> None:
    # the volume is mounted at /mnt/Staging; /mnt/Staging/v is a directory inside it
    parent = "46 27 202:80 / /mnt/Staging rw - ext4 /dev/xvdf rw"
    probe = _probe(seen=_dev(202, 80), parent=_dev(202, 80), info=[ROOT, parent])
    with pytest.raises(VolumeInUse):
        probe.judge("v", "/mnt/Staging/v")


@pytest.mark.parametrize(
    ("given", "resolved", "expected"),
    [
        ("/mnt/v/a", "/mnt/v/a", "/mnt/v/a"),
        ("/mnt/v/a/", "/mnt/v/a", "/mnt/v/a/"),
        ("/mnt/v/", "/mnt/v", "/mnt/v/"),
        ("/mnt/v/link", "/etc", None),
        ("/mnt/v/../vx", "/mnt/vx", None),
        ("/mnt/v/in/x", "/mnt/v2/x", None),
        ("/mnt/v/rel", "relative", None),
    ],
)
def test_resolved_paths_stay_inside(given: str, resolved: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(PathError, match="leads out of volume v"):
            mounts.resolved_inside("/mnt/v", given, resolved, "v")
    else:
        assert mounts.resolved_inside("/mnt/v", given, resolved, "v") == expected


def test_a_newline_in_a_volume_path_is_refused() -> None:
    with pytest.raises(PathError):
        mounts.probe_argv(VOL, "/dev/xvdf", "/mnt/v", ["/mnt/v/a\nb"])


# -- mkfs ------------------------------------------------------------------------------------


def _mkfs(lines: list[str]) -> mounts.MkfsProbe:
    return mounts.parse_mkfs_probe("\n".join(lines) + "\n")


def test_a_fresh_device_may_be_formatted() -> None:
    got = _mkfs(["L /dev/nvme1n1", "R /dev/nvme1n1", "D 103:40", "M " + ROOT, "W Filename x"])
    assert got.refusal("v") is None
    assert _mkfs(["R /dev/xvdf", "D ca:50", "M " + ROOT]).refusal("v") is None


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        (["R ", "M " + ROOT], "not a block device"),
        (["L /dev/nvme2n1", "R /dev/nvme1n1", "D 103:40"], "is not volume v"),
        (["R /dev/xvdf", "D ca:50", "M " + VOLUME_ELSEWHERE], "mounted at /srv/moved"),
        (["R /dev/xvdf", "D ca:50", "W /dev/xvdf partition 1 0 -2"], "swap"),
        (["R /dev/xvdf", "D ca:50", "B TYPE=ext4", "B UUID=x"], "ext4 signature"),
        (["R /dev/xvdf", "D ca:50", "B PTTYPE=gpt"], "gpt signature"),
    ],
)
def test_mkfs_refuses(lines: list[str], why: str) -> None:
    refusal = _mkfs(lines).refusal("v")
    assert refusal is not None and why in refusal


# -- the scripts themselves, run here ----------------------------------------------------------


def _root_device() -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        found = mounts.parse_mountinfo([line])
        if found and found[0].target == "/":
            return found[0].source
    return ""


def test_the_probe_script_runs_against_this_machine(tmp_path: Path) -> None:
    device = _root_device()
    if not Path(device).is_block_device():
        pytest.skip(f"the root filesystem's source {device!r} is not a block device here")
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "out").symlink_to("/etc")
    argv = mounts.probe_argv(
        VOL, device, "/", [f"{tmp_path}/vol/out/passwd", f"{tmp_path}/vol/new/x/"]
    )
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    probe = mounts.parse_probe(done.stdout)
    assert probe.device == os.path.realpath(device) and not probe.by_serial
    assert probe.devnum == (
        os.major(os.stat(device).st_rdev),
        os.minor(os.stat(device).st_rdev),
    )
    assert "/" in probe.volume_mounts()
    assert probe.judge("root", "/") == "mounted"
    assert probe.resolved == ["/etc/passwd", f"{tmp_path}/vol/new/x"]
    with pytest.raises(PathError):
        mounts.resolved_inside(f"{tmp_path}/vol", "out/passwd", probe.resolved[0], "v")
    # the same device seen from a directory that is not its mount point: mounted elsewhere
    other = subprocess.run(
        mounts.probe_argv(VOL, device, str(tmp_path / "vol")),
        capture_output=True,
        text=True,
        check=True,
    )
    with pytest.raises(VolumeInUse):
        mounts.parse_probe(other.stdout).judge("root", str(tmp_path / "vol"))


def test_the_mkfs_probe_refuses_the_mounted_root_device() -> None:
    device = _root_device()
    if not Path(device).is_block_device():
        pytest.skip(f"the root filesystem's source {device!r} is not a block device here")
    done = subprocess.run(
        mounts.mkfs_probe_argv(VOL, device), capture_output=True, text=True, check=True
    )
    refusal = mounts.parse_mkfs_probe(done.stdout).refusal("v")
    assert refusal is not None and "mounted at /" in refusal
