"""What an instance may not reach: the machine's private files, its disks, its kernel.

Three mechanisms, each for what it does best (docs/local-cloud.md says why):

- **The root filesystem view.** An instance's root is an overlay of the machine's ``/``;
  :func:`mask_upper` writes overlay *opaque dirs* and *whiteouts* into the instance's
  upper dir before each boot, so that only the system tree (``/usr``, ``/etc``, ``/var``
  ...) shows through: ``/root``, ``/home`` (but the login user's own home), ``/opt``,
  ``/mnt``, the cloud's state dir and every top-level dir that is not part of a Debian
  system are empty or absent; the machine's ssh host keys, shadow backups, TLS private
  keys and logs are hidden, and ``/etc/shadow`` carries no password hash.
- **A device cgroup** (cgroup v1 ``devices`` controller): an instance's processes may open
  only the character devices every host has and the block devices the cloud gave it
  (its volumes' loop devices, its read-only root disk). Root inside can still mount a
  ``devtmpfs`` or guess a major:minor, but the kernel refuses to open the machine's disks.
  The instance's init joins the cgroup and then makes a cgroup namespace of its own, so
  that root inside never sees (or loosens) the rules above its own cgroup.
- **Capabilities** dropped from the bounding set of the instance's init (hence of
  everything in it, ``sudo`` included): no ``mknod``, no kernel modules, no raw I/O,
  no ``open_by_handle_at``, no network or clock administration of the machine.
  ``CAP_SYS_ADMIN`` stays: ``sudo mount /dev/xvdf /data`` must work, as on EC2.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from pathlib import Path

log = logging.getLogger("asyncstage.localcloud")

# Top-level entries of the machine's / that an instance sees (a Debian system's tree).
SYSTEM_TOP = frozenset(
    {"bin", "boot", "etc", "lib", "lib32", "lib64", "libx32", "sbin", "usr", "var"}
)
# Present in every instance but empty of the machine's files (mounted over, or opaque).
EMPTY_TOP = frozenset({"root", "home", "mnt", "media", "srv", "opt", "tmp", "run"})
_MOUNTED_TOP = frozenset({"proc", "sys", "dev", "tmp", "run"})
# Private corners of the system tree: shown as empty directories.
EMPTY_DIRS = (
    "etc/ssl/private",
    "var/backups",
    "var/log",
    "var/mail",
    "var/spool/mail",
    "var/spool/cron",
    "var/tmp",
    "var/lib/sudo",
)
# Private files of the system tree: absent.
HIDDEN_FILES = ("etc/shadow-", "etc/gshadow-", "etc/security/opasswd", "etc/.pwd.lock")

# Capabilities the instance's init drops from its bounding set (linux/capability.h).
DROPPED_CAPS = {
    "CAP_DAC_READ_SEARCH": 2,  # open_by_handle_at: files of the machine by handle
    "CAP_NET_ADMIN": 12,  # the machine's network (instances share it)
    "CAP_NET_RAW": 13,  # sniffing the loopback traffic of the machine
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_TIME": 25,
    "CAP_MKNOD": 27,  # device nodes: only the cloud makes them
    "CAP_AUDIT_CONTROL": 30,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}

_OPAQUE_XATTR = "trusted.overlay.opaque"


def mask_upper(upper: Path, extra: list[Path], own_host_keys: set[str]) -> None:
    """Write the masks into an instance's upper dir (the overlay is not mounted now).

    ``extra`` are more absolute paths to hide (the cloud's state dir, ...);
    ``own_host_keys`` the names of the instance's own files in ``/etc/ssh``.
    """
    for entry in os.listdir("/"):
        if entry in SYSTEM_TOP or entry in EMPTY_TOP or entry in _MOUNTED_TOP:
            continue
        _whiteout(upper, entry)
    for entry in EMPTY_TOP - _MOUNTED_TOP:
        if os.path.isdir(f"/{entry}"):
            _opaque_dir(upper, entry)
    for rel in EMPTY_DIRS:
        if os.path.isdir(f"/{rel}"):
            _opaque_dir(upper, rel)
    for rel in HIDDEN_FILES:
        if os.path.lexists(f"/{rel}"):
            _whiteout(upper, rel)
    with contextlib.suppress(OSError):
        for name in os.listdir("/etc/ssh"):
            if name.startswith("ssh_host_") and name not in own_host_keys:
                _whiteout(upper, f"etc/ssh/{name}")
    for path in extra:
        inside = path.resolve().relative_to("/")
        if not inside.parts or inside.parts[0] not in SYSTEM_TOP or not path.exists():
            continue  # outside the system tree: masked with its top-level dir already
        if path.is_dir():
            _opaque_dir(upper, str(inside))
        else:
            _whiteout(upper, str(inside))


def scrubbed_shadow(text: str, field: int) -> list[str]:
    """Lines of a shadow/gshadow file with every password field locked (``*``)."""
    lines = []
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) > field:
            parts[field] = "*" if parts[field] not in ("!", "!*", "*") else parts[field]
        lines.append(":".join(parts))
    return lines


def _parents(upper: Path, rel: Path) -> None:
    """Make the parent dirs of ``upper/rel`` with the machine's modes and owners."""
    path = upper
    for part in rel.parts[:-1]:
        path = path / part
        if path.is_symlink() or path.exists():
            continue
        lower = Path("/") / path.relative_to(upper)
        path.mkdir()
        try:
            st = lower.stat()
        except FileNotFoundError:
            os.chmod(path, 0o755)
        else:
            os.chmod(path, stat.S_IMODE(st.st_mode))
            os.chown(path, st.st_uid, st.st_gid)


def _whiteout(upper: Path, rel: str) -> None:
    """An overlay whiteout: the lower file or dir of that name is absent."""
    path = upper / rel
    if os.path.lexists(path):
        return  # hidden already, or the instance's own file
    _parents(upper, Path(rel))
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _opaque_dir(upper: Path, rel: str) -> None:
    """An overlay opaque dir: its lower contents are hidden, the upper's stay."""
    path = upper / rel
    _parents(upper, Path(rel))
    if not path.is_dir() or path.is_symlink():
        if os.path.lexists(path):
            return  # the instance made something of its own there: it keeps it
        lower = Path("/") / rel
        path.mkdir()
        st = lower.stat()
        os.chmod(path, stat.S_IMODE(st.st_mode))
        os.chown(path, st.st_uid, st.st_gid)
    os.setxattr(path, _OPAQUE_XATTR, b"y")


# -- the device cgroup ------------------------------------------------------------------------

_DEVICES_V1 = Path("/sys/fs/cgroup/devices")
# (type, major, minor): the character devices every host has, and its ptys
BASE_DEVICES = (
    ("c", 1, 3),  # null
    ("c", 1, 5),  # zero
    ("c", 1, 7),  # full
    ("c", 1, 8),  # random
    ("c", 1, 9),  # urandom
    ("c", 5, 0),  # tty
    ("c", 5, 2),  # ptmx
    ("c", 136, "*"),  # pts
)


def device_cgroups_available() -> bool:
    """True when the cgroup v1 ``devices`` controller is mounted and writable."""
    return (_DEVICES_V1 / "devices.allow").exists() and os.access(_DEVICES_V1, os.W_OK)


class DeviceCgroup:
    """``<run dir>/<instance>`` (the rules) and its child ``host`` (the processes).

    Processes live in the child; root inside (in its own cgroup namespace) may see the
    child as its cgroup root, but a child can never allow more than its parent.
    """

    def __init__(self, run_dir: Path, name: str) -> None:
        self.outer = run_dir / name
        self.inner = self.outer / "host"

    @property
    def procs(self) -> str:
        """The file the instance's init writes its pid into."""
        return str(self.inner / "cgroup.procs")

    def create(self) -> None:
        if self.inner.exists():
            return
        self.outer.mkdir(parents=True, exist_ok=True)
        _write(self.outer / "devices.deny", "a")
        for kind, major, minor in BASE_DEVICES:
            # "m": the init makes these nodes itself (before it drops CAP_MKNOD)
            _write(self.outer / "devices.allow", f"{kind} {major}:{minor} rwm")
        self.inner.mkdir(exist_ok=True)  # inherits the rules

    def allow(self, rdev: int, access: str = "rw") -> None:
        rule = f"b {os.major(rdev)}:{os.minor(rdev)} {access}"
        for group in (self.outer, self.inner):
            _write(group / "devices.allow", rule)

    def deny(self, rdev: int) -> None:
        rule = f"b {os.major(rdev)}:{os.minor(rdev)} rwm"
        for group in (self.inner, self.outer):
            with contextlib.suppress(OSError):
                _write(group / "devices.deny", rule)

    def remove(self) -> None:
        remove_cgroup_tree(self.outer)


def run_cgroup_dir(token: str) -> Path:
    """The devices cgroup of one local-cloud run (its instances' cgroups below it)."""
    return _DEVICES_V1 / f"asyncstage-localcloud-{token}"


def remove_cgroup_tree(path: Path) -> None:
    """rmdir a cgroup and its children, deepest first (they must have no processes)."""
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _rmdir(child)
    _rmdir(path)


def _rmdir(path: Path) -> None:
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                log.warning("local cloud: cannot remove cgroup %s: %s", path, e)
                return
            time.sleep(0.05)  # processes just killed leave their cgroup a moment later
    log.warning("local cloud: cgroup %s stays busy", path)


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
