"""What an instance may not reach: the machine's private files, its disks, its kernel.

Three mechanisms, each for what it does best (docs/local-cloud.md says why):

- **The root filesystem view.** An instance's root is an overlay of the machine's ``/``;
  :func:`mask_upper` writes overlay *opaque dirs* and *whiteouts* into the instance's
  upper dir before each boot, so that only the system tree (``/usr``, ``/etc``, ``/var``
  ...) shows through: ``/root``, ``/home`` (but the login user's own home), ``/opt``,
  ``/mnt``, the cloud's state dir and every top-level dir that is not part of a Debian
  system are empty or absent; the machine's ssh host keys, shadow backups, TLS private
  keys and logs are hidden, and ``/etc/shadow`` carries no password hash.
- **A device cgroup**: an instance's processes may open only the character devices every
  host has and the block devices the cloud gave it (its volumes' loop devices, its
  read-only root disk). Root inside can still mount a ``devtmpfs`` or guess a
  major:minor, but the kernel refuses to open the machine's disks. The rules are the
  cgroup v1 ``devices`` controller's (:class:`DeviceCgroup`) or, on cgroup v2, a device
  BPF program (:class:`BpfDeviceCgroup`); the instance's init joins the cgroup and then
  makes a cgroup namespace of its own, so that root inside never sees (or loosens) the
  rules above its own cgroup.
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
import threading
import time
from pathlib import Path
from typing import Literal

from asyncstage.localcloud import _bpf

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
        mkdir_as_machine(upper, path)


def mkdir_as_machine(upper: Path, path: Path) -> None:
    """Make ``path`` (under ``upper``) with the mode and owner of the machine's dir of that
    name, or 0755 where the machine has none."""
    path.mkdir()
    try:
        st = (Path("/") / path.relative_to(upper)).stat()
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

DEVICES_V1 = Path("/sys/fs/cgroup/devices")
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
# What LocalCloud(device_isolation=...) takes: a mechanism, the best there is, or none.
DeviceIsolation = Literal["auto", "v1", "bpf", "none"]
ISOLATION_MODES: tuple[DeviceIsolation, ...] = ("auto", "v1", "bpf", "none")
# How each mechanism in force is named to users (status, logs, docs).
MECHANISMS = {
    "v1": "cgroup v1 devices controller",
    "bpf": "cgroup v2 device BPF program",
    "none": "none: capabilities only (device_isolation='none')",
}


def device_cgroups_available() -> bool:
    """True when the cgroup v1 ``devices`` controller is mounted and writable."""
    return (DEVICES_V1 / "devices.allow").exists() and os.access(DEVICES_V1, os.W_OK)


def cgroup2_mount() -> Path | None:
    """Where this process sees the cgroup v2 hierarchy mounted writable, None if nowhere.

    ``/sys/fs/cgroup`` on a cgroup-v2-only machine, ``/sys/fs/cgroup/unified`` on a hybrid
    one; the first read-write ``cgroup2`` mount of ``/proc/self/mountinfo``.
    """
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        after = fields[fields.index("-") + 1 :]
        if after[0] == "cgroup2" and "rw" in fields[5].split(","):
            path = Path(fields[4].replace("\\040", " "))
            if os.access(path, os.W_OK):
                return path
    return None


def bpf_probe(cgroup: Path) -> str | None:
    """None when device programs load and attach to ``cgroup`` (an empty one); else what
    is missing. The probe program is detached and closed again."""
    try:
        prog = _bpf.load(_bpf.device_program(_base_rules()))
    except OSError as e:
        return f"no cgroup device BPF programs (a kernel without CONFIG_CGROUP_BPF?): {e}"
    try:
        with _bpf.opened(cgroup) as fd:
            _bpf.attach(fd, prog)
            _bpf.detach(fd, prog)
    except OSError as e:
        return f"cannot attach a device program to cgroup {cgroup}: {e}"
    finally:
        os.close(prog)
    return None


def _base_rules() -> list[_bpf.DeviceRule]:
    return [
        # "m": the init makes these nodes itself (before it drops CAP_MKNOD)
        _bpf.DeviceRule(kind, major, None if minor == "*" else int(minor), "rwm")
        for kind, major, minor in BASE_DEVICES
    ]


class InstanceCgroup:
    """``<run dir>/<instance>`` (the rules) and its child ``host`` (the processes).

    Processes live in the child; root inside (in its own cgroup namespace) may see the
    child as its cgroup root, but a child can never allow more than its parent.
    """

    mechanism = ""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.outer = run_dir / name
        self.inner = self.outer / "host"

    @property
    def procs(self) -> str:
        """The file the instance's init writes its pid into."""
        return str(self.inner / "cgroup.procs")

    def create(self) -> None:
        """Make the cgroups with the base rules (again at each boot: a no-op then)."""
        raise NotImplementedError

    def allow(self, rdev: int, access: str = "rw") -> None:
        """Let the instance open block device ``rdev`` ("r" or "rw")."""
        raise NotImplementedError

    def deny(self, rdev: int) -> None:
        """Take back the instance's right to open block device ``rdev``."""
        raise NotImplementedError

    def remove(self) -> None:
        """Remove the cgroups (their processes are gone) and what holds their rules."""
        remove_cgroup_tree(self.outer)


class DeviceCgroup(InstanceCgroup):
    """The rules as the cgroup v1 ``devices`` controller's text."""

    mechanism = "v1"

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


class BpfDeviceCgroup(InstanceCgroup):
    """The rules as a cgroup v2 device program attached to ``outer`` (see :mod:`._bpf`).

    The cloud keeps the fd of the program in force; a change of the rules loads a new
    program, attaches it and then detaches the old one. The kernel frees a program when
    it is neither attached nor open: at :meth:`remove`, or when a crashed cloud's fds
    are closed and the next cloud removes its cgroups.
    """

    mechanism = "bpf"

    def __init__(self, run_dir: Path, name: str) -> None:
        super().__init__(run_dir, name)
        self._blocks: dict[int, str] = {}  # rdev -> access, beside the base rules
        self._prog: int | None = None  # fd of the program attached to outer
        self._lock = threading.Lock()  # boots, attaches and detaches come from threads

    @property
    def program_id(self) -> int | None:
        """The kernel's id of the program in force (None before create, after remove)."""
        with self._lock:
            return None if self._prog is None else _bpf.program_id(self._prog)

    def create(self) -> None:
        with self._lock:
            if self._prog is not None:
                return
            self.outer.mkdir(parents=True, exist_ok=True)
            self.inner.mkdir(exist_ok=True)
            self._replace()

    def allow(self, rdev: int, access: str = "rw") -> None:
        with self._lock:
            before = self._blocks.get(rdev, "")
            self._blocks[rdev] = "".join(sorted(set(before) | set(access)))
            if self._prog is not None and self._blocks[rdev] != before:  # a boot adds again
                self._replace()

    def deny(self, rdev: int) -> None:
        with self._lock:
            if self._blocks.pop(rdev, None) is not None and self._prog is not None:
                self._replace()

    def remove(self) -> None:
        with self._lock:
            if self._prog is not None:
                with contextlib.suppress(OSError), _bpf.opened(self.outer) as fd:
                    _bpf.detach(fd, self._prog)
                os.close(self._prog)
                self._prog = None
            super().remove()

    def _replace(self) -> None:
        rules = _base_rules() + [
            _bpf.DeviceRule("b", os.major(rdev), os.minor(rdev), access)
            for rdev, access in sorted(self._blocks.items())
        ]
        new = _bpf.load(_bpf.device_program(rules))
        try:
            with _bpf.opened(self.outer) as fd:
                _bpf.attach(fd, new)
                if self._prog is not None:
                    # both ran until now: an access passed only if both allowed it
                    _bpf.detach(fd, self._prog)
        except BaseException:
            os.close(new)  # never attached, or attached beside the old one: both strict
            raise
        if self._prog is not None:
            os.close(self._prog)
        self._prog = new


def run_cgroup_dir(token: str, hierarchy: Path = DEVICES_V1) -> Path:
    """The cgroup of one local-cloud run (its instances' cgroups below it)."""
    return hierarchy / f"asyncstage-localcloud-{token}"


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
