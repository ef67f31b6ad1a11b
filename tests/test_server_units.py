"""Server's pure parts: the /proc/mounts parser and mkfs command lines (no root, no cloud)."""

from __future__ import annotations

import pytest

from asyncstage.disks import mkfs_argv
from asyncstage.errors import MountPointRefused
from asyncstage.mounts import parse_mounts
from asyncstage.names import check_mount_point


def test_mounts_are_parsed_and_unescaped() -> None:
    text = (
        "/dev/root / ext4 rw,relatime 0 0\n"
        "proc /proc proc rw 0 0\n"
        "/dev/xvdf /mnt/Staging/with\\040space ext4 rw 0 0\n"
        "/dev/xvdg /mnt/tab\\011and\\012newline xfs rw 0 0\n"
        "/dev/xvdh /mnt/back\\134040slash vfat rw 0 0\n"
        "short line\n"
        "\n"
    )
    assert parse_mounts(text) == [
        ("/dev/root", "/", "ext4"),
        ("proc", "/proc", "proc"),
        ("/dev/xvdf", "/mnt/Staging/with space", "ext4"),
        ("/dev/xvdg", "/mnt/tab\tand\nnewline", "xfs"),
        # an escaped backslash followed by "040" stays a backslash and "040"
        ("/dev/xvdh", "/mnt/back\\040slash", "vfat"),
    ]


@pytest.mark.parametrize(
    ("fstype", "label", "uuid", "argv"),
    [
        ("ext4", None, None, ["mkfs.ext4", "-F", "-q"]),
        ("ext3", "data", "u-1", ["mkfs.ext3", "-F", "-q", "-L", "data", "-U", "u-1"]),
        ("xfs", "data", "u-1", ["mkfs.xfs", "-f", "-q", "-L", "data", "-m", "uuid=u-1"]),
        ("btrfs", "d", "u-1", ["mkfs.btrfs", "-f", "-q", "-L", "d", "-U", "u-1"]),
        (
            "vfat",
            "data",
            "1234abcd-0000-1111-2222-333344445555",
            ["mkfs.vfat", "-I", "-n", "DATA", "-i", "1234abcd"],
        ),
    ],
)
def test_mkfs_argv(fstype: str, label: str | None, uuid: str | None, argv: list[str]) -> None:
    assert mkfs_argv(fstype, label, uuid) == argv


def test_mount_points() -> None:
    assert check_mount_point("/mnt//x/./y/") == "/mnt/x/y"
    assert check_mount_point("//srv") == "/srv"
    bad_ones = ("relative", "/", "/usr", "/lib64", "/dev/sda", "/proc/1", "/etc/../sys/x")
    for bad in (*bad_ones, "/mnt//x/../y/", "/usr/local/sbin", "/run/x", "/root"):
        with pytest.raises(MountPointRefused):
            check_mount_point(bad)
