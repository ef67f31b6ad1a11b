"""What is mounted where on a server, checked right before a volume is read or written.

The manager's own record of a volume's mount can go stale behind its back: an
admin unmounts it, the server reboots, another filesystem is mounted in its
place, the volume is mounted somewhere else. Before anything reads from or
writes into a volume, one remote command (:func:`probe_argv`) reports

- the volume's device node (found by its EBS serial under ``/dev/disk/by-id``,
  else the device path recorded at attach time) and its device number;
- every mount of the server (``/proc/self/mountinfo``) and the device numbers
  of their source devices;
- the server-side ``realpath -m`` of the sub-paths about to be used;

and :func:`parse_probe` / :meth:`Probe.judge` decide, without further I/O, whether
the mount point holds this very volume now. Device numbers are compared, not
names: the filesystem's own ``st_dev`` (ext*, xfs, vfat) or its source device's
``rdev`` (btrfs, whose ``st_dev`` is anonymous).

The same module holds the remote checks run before mounting (:func:`realpath_argv`)
and before formatting a device (:func:`mkfs_probe_argv` / :func:`parse_mkfs_probe`).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from asyncstage.errors import PathError, VolumeInUse, VolumeNotMounted

__all__ = [
    "MkfsProbe",
    "Mount",
    "Probe",
    "inside",
    "mkfs_probe_argv",
    "parse_mkfs_probe",
    "parse_mountinfo",
    "parse_mounts",
    "parse_probe",
    "probe_argv",
    "realpath_argv",
    "resolved_inside",
    "serial_of",
    "unescape",
]

DevNum = tuple[int, int]

# Run as root with ``sh -c PROBE sh SERIAL DEVICE MTPT PATH...``: what the volume's device
# is, the device of the filesystem seen at the mount point and at its parent, every mount and
# the device numbers of their sources, the resolved paths.
_PROBE = r"""
serial=$1 dev=$2 mt=$3; shift 3
via=recorded
for l in /dev/disk/by-id/*"$serial"*; do
  case $l in *-part*) continue ;; esac
  if [ -n "$serial" ] && [ -e "$l" ]; then dev=$l via=serial; break; fi
done
real=$(readlink -e -- "$dev" 2>/dev/null)
if [ -n "$real" ] && [ -b "$real" ]; then
  printf 'D %s %s %s\n' "$(stat -L -c %t:%T -- "$real")" "$via" "$real"
else
  echo N
fi
printf 'T %s %s\n' "$(stat -c %d -- "$mt" 2>/dev/null || echo -)" \
  "$(stat -c %d -- "$mt/.." 2>/dev/null || echo -)"
sed 's/^/M /' /proc/self/mountinfo
sed -n 's/^.* - [^ ]* \(\/dev\/[^ ]*\) .*$/\1/p' /proc/self/mountinfo | sort -u |
while read -r s; do
  printf 'S %s %s\n' "$(stat -L -c %t:%T -- "$s" 2>/dev/null || echo -)" "$s"
done
for p in "$@"; do printf 'P %s\n' "$(realpath -m -- "$p")"; done
"""

_MKFS_PROBE = r"""
serial=$1 dev=$2
for l in /dev/disk/by-id/*"$serial"*; do
  case $l in *-part*) continue ;; esac
  if [ -n "$serial" ] && [ -e "$l" ]; then printf 'L %s\n' "$(readlink -e -- "$l")"; fi
done
real=$(readlink -e -- "$dev" 2>/dev/null)
printf 'R %s\n' "$real"
if [ -n "$real" ] && [ -b "$real" ]; then
  printf 'D %s\n' "$(stat -L -c %t:%T -- "$real")"
  blkid -p -o export -- "$real" | sed 's/^/B /'
fi
sed 's/^/M /' /proc/self/mountinfo
cat /proc/swaps | sed 's/^/W /'
"""


def serial_of(volume_id: str) -> str:
    """The serial an EBS volume shows as an NVMe device: its id without the dash."""
    return volume_id.replace("-", "")


def probe_argv(
    volume_id: str, device: str | None, mtpt: str, paths: Sequence[str] = ()
) -> list[str]:
    """The argv (run with sudo) of the probe of a volume's device, its mount point,
    the server's mounts and the resolved ``paths``."""
    for p in paths:
        if "\n" in p or "\0" in p:
            raise PathError(f"a path inside a volume may not hold a newline: {p!r}")
    return ["sh", "-c", _PROBE, "sh", serial_of(volume_id), device or "", mtpt, *paths]


def realpath_argv(path: str) -> list[str]:
    """The argv of ``realpath -m`` of one path (symlinks resolved on the server)."""
    return ["realpath", "-m", "--", path]


def realpath_and_mounts_argv(path: str) -> list[str]:
    """The argv of one command that prints ``realpath -m`` of ``path``, a NUL, then
    /proc/mounts (:func:`parse_realpath_and_mounts`)."""
    return ["sh", "-c", 'realpath -m -z -- "$1" && exec cat /proc/mounts', "sh", path]


def parse_realpath_and_mounts(text: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The resolved path and the mount table (:func:`parse_mounts`) of that command."""
    real, nul, table = text.partition("\0")
    if not nul:
        raise PathError(f"the server did not say where the mount point leads: {text[:200]!r}")
    return real, parse_mounts(table)


def mkdir_and_mount_argv(where: str, mount: Sequence[str]) -> list[str]:
    """The argv of one command that makes the directory ``where`` and runs ``mount``
    (an argv that mounts something there)."""
    return ["sh", "-c", 'mkdir -p -- "$1" && shift && exec "$@"', "sh", where, *mount]


UNMOUNTED_ELSEWHERE = 3
"""The exit status of :func:`umount_argv`'s command when ``device`` is not mounted at
``where`` (then nothing was done)."""

_UMOUNT = (
    'awk -v d="$1" -v m="$2" \'$1 == d && $2 == m { f = 1 } END { exit !f }\' /proc/mounts'
    f' || exit {UNMOUNTED_ELSEWHERE}; exec umount -- "$2"'
)


def umount_argv(device: str, where: str) -> list[str]:
    """The argv of one command that unmounts ``where`` only if /proc/mounts says
    ``device`` is mounted there (else it exits :data:`UNMOUNTED_ELSEWHERE`). ``where``
    is a valid mount point: no character /proc/mounts would escape."""
    return ["sh", "-c", _UMOUNT, "sh", device, where]


def mkfs_probe_argv(volume_id: str, device: str) -> list[str]:
    """The argv (run with sudo) of the checks before formatting ``device``."""
    return ["sh", "-c", _MKFS_PROBE, "sh", serial_of(volume_id), device]


def unescape(field_text: str) -> str:
    """A mount table field with its octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def parse_mounts(text: str) -> list[tuple[str, str, str]]:
    """(device, mount point, fstype) of each line of /proc/mounts, mount points unescaped."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            found.append((parts[0], unescape(parts[1]), parts[2]))
    return found


def _devnum(text: str, base: int) -> DevNum | None:
    try:
        major, minor = text.split(":")
        return int(major, base), int(minor, base)
    except ValueError:
        return None


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``."""

    target: str
    """The mount point."""
    devnum: DevNum | None
    """The filesystem's ``st_dev`` (major, minor)."""
    source: str
    """The mount source (``/dev/xvdf``, ``tmpfs`` ...)."""
    fstype: str


def parse_mountinfo(lines: list[str]) -> list[Mount]:
    """The mounts of ``/proc/self/mountinfo`` lines, in mount order."""
    mounts: list[Mount] = []
    for line in lines:
        before, sep, after = line.partition(" - ")
        head, tail = before.split(), after.split()
        if not sep or len(head) < 5 or len(tail) < 2:
            continue
        mounts.append(
            Mount(
                target=unescape(head[4]),
                devnum=_devnum(head[2], 10),
                source=unescape(tail[1]),
                fstype=tail[0],
            )
        )
    return mounts


def inside(root: str, path: str) -> bool:
    """Whether the normalised absolute ``path`` is ``root`` or below it."""
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/") or root == "/"


Verdict = Literal["mounted", "unmounted"]


@dataclass
class Probe:
    """What the probe found: the volume's device, its mount point, every mount, paths."""

    device: str | None
    """The volume's device node (resolved), None when it is not on the server."""
    devnum: DevNum | None
    """Its device number (major, minor)."""
    by_serial: bool = False
    """Whether the device was found by the volume's EBS serial (not the recorded path)."""
    seen: DevNum | None = None
    """The ``st_dev`` of the filesystem seen at the mount point now (None: no such path)."""
    parent: DevNum | None = None
    """The ``st_dev`` of the mount point's parent directory."""
    mounts: list[Mount] = field(default_factory=list)
    source_devnums: dict[str, DevNum] = field(default_factory=dict)
    resolved: list[str] = field(default_factory=list)

    def is_volume(self, mount: Mount) -> bool:
        """Whether a mount is of the volume's device (by device number)."""
        if self.devnum is None:
            return False
        return mount.devnum == self.devnum or self.source_devnums.get(mount.source) == self.devnum

    def volume_devnums(self) -> set[DevNum]:
        """The ``st_dev`` numbers the volume's filesystem shows (btrfs: anonymous ones too)."""
        found = {self.devnum} if self.devnum else set()
        return found | {m.devnum for m in self.mounts if m.devnum and self.is_volume(m)}

    def volume_mounts(self) -> list[str]:
        """Where the volume's device is mounted now."""
        return [m.target for m in self.mounts if self.is_volume(m)]

    def judge(self, name: str, mtpt: str) -> Verdict:
        """``"mounted"`` when ``mtpt`` shows the volume now, ``"unmounted"`` when the
        volume is mounted nowhere and nothing else is mounted at ``mtpt``.

        VolumeNotMounted when the device is missing or another filesystem is
        mounted at (or over) ``mtpt``; VolumeInUse when the volume is mounted
        somewhere else.
        """
        if self.devnum is None:
            raise VolumeNotMounted(f"volume {name}: its device is not on the server")
        # the kernel's own answer: the filesystem a path walk to mtpt reaches now, and
        # whether mtpt is the root of a mount (its st_dev differs from its parent's)
        is_root = self.seen is not None and (self.seen != self.parent or mtpt == "/")
        at = [m for m in self.mounts if m.target == mtpt]
        top = at[-1] if at else None  # mounts at one place stack in mount order
        if is_root and self.seen in self.volume_devnums():
            return "mounted"
        if is_root and top is not None and top.fstype == "btrfs" and self.is_volume(top):
            return "mounted"  # btrfs: stat() shows a subvolume's own anonymous st_dev
        elsewhere = [t for t in self.volume_mounts() if t != mtpt]
        if elsewhere:
            raise VolumeInUse(
                f"volume {name} is mounted at {', '.join(elsewhere)}, not at {mtpt}: "
                "refusing to use it (mounted behind the manager's back)"
            )
        if is_root:
            what = f"{top.fstype} {top.source}" if top is not None else "another filesystem"
            raise VolumeNotMounted(
                f"volume {name}: {what} is mounted at {mtpt}, not the volume: "
                "refusing to read or write there"
            )
        if any(m.target == mtpt for m in self.mounts):
            raise VolumeNotMounted(
                f"volume {name}: something mounted over a parent directory hides {mtpt}"
            )
        return "unmounted"


def _stat_dev(text: str) -> DevNum | None:
    """(major, minor) of a decimal ``st_dev`` as ``stat -c %d`` prints it."""
    if not text.isdigit():
        return None
    dev = int(text)
    return os.major(dev), os.minor(dev)


def parse_probe(text: str) -> Probe:
    """The :class:`Probe` of the probe command's output."""
    device: str | None = None
    devnum: DevNum | None = None
    by_serial = False
    seen: DevNum | None = None
    parent: DevNum | None = None
    info: list[str] = []
    sources: dict[str, DevNum] = {}
    resolved: list[str] = []
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "D":
            num, _, rest = rest.partition(" ")
            via, _, device = rest.partition(" ")
            devnum, by_serial = _devnum(num, 16), via == "serial"
        elif kind == "T":
            at, _, up = rest.partition(" ")
            seen, parent = _stat_dev(at), _stat_dev(up)
        elif kind == "M":
            info.append(rest)
        elif kind == "S":
            num, _, src = rest.partition(" ")
            got = _devnum(num, 16)
            if got is not None:
                sources[src] = got
        elif kind == "P":
            resolved.append(rest)
    return Probe(
        device=device or None,
        devnum=devnum,
        by_serial=by_serial,
        seen=seen,
        parent=parent,
        mounts=parse_mountinfo(info),
        source_devnums=sources,
        resolved=resolved,
    )


@dataclass
class MkfsProbe:
    """What the checks before formatting found."""

    by_id: list[str]
    """The devices the volume's serial links lead to (empty without NVMe serials)."""
    device: str
    """The device path resolved."""
    devnum: DevNum | None
    signature: dict[str, str]
    """``blkid -p`` of the device: TYPE, PTTYPE ... (empty: no signature)."""
    mounts: list[Mount]
    swaps: list[str]

    def refusal(self, volume: str) -> str | None:
        """Why ``device`` must not be formatted as ``volume``, or None when it may."""
        if not self.device or self.devnum is None:
            return f"the device of volume {volume} is not a block device on the server"
        if self.by_id and self.device not in self.by_id:
            return (
                f"{self.device} is not volume {volume} (its serial leads to "
                f"{', '.join(sorted(set(self.by_id)))})"
            )
        mounted = [
            m.target for m in self.mounts if m.devnum == self.devnum or m.source == self.device
        ]
        if mounted:
            return f"{self.device} is mounted at {', '.join(mounted)}"
        if self.device in self.swaps:
            return f"{self.device} is in use as swap"
        kind = self.signature.get("TYPE") or self.signature.get("PTTYPE")
        if kind:
            return (
                f"{self.device} already carries a {kind} signature: a volume created "
                "empty has none, so this is not it or it holds data"
            )
        return None


def parse_mkfs_probe(text: str) -> MkfsProbe:
    """The :class:`MkfsProbe` of the mkfs probe command's output."""
    by_id: list[str] = []
    device = ""
    devnum: DevNum | None = None
    signature: dict[str, str] = {}
    info: list[str] = []
    swaps: list[str] = []
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "L" and rest:
            by_id.append(rest)
        elif kind == "R":
            device = rest
        elif kind == "D":
            devnum = _devnum(rest, 16)
        elif kind == "B":
            key, _, value = rest.partition("=")
            signature[key] = value
        elif kind == "M":
            info.append(rest)
        elif kind == "W" and rest.startswith("/"):
            swaps.append(rest.split()[0])
    return MkfsProbe(by_id, device, devnum, signature, parse_mountinfo(info), swaps)


def resolved_inside(root: str, given: str, resolved: str, name: str) -> str:
    """``resolved`` (with ``given``'s trailing slash) when it stays inside ``root``, else
    PathError: a sub-path of a volume never leads out of it, not even by a symlink."""
    if not resolved.startswith("/") or not inside(root, posixpath.normpath(resolved)):
        raise PathError(
            f"path {given!r} leads out of volume {name} (to {resolved} on its server, "
            f"outside {root}): refused"
        )
    return resolved.rstrip("/") + "/" if given.endswith("/") and resolved != "/" else resolved
