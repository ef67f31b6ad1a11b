"""Blocking helpers of the local cloud: running programs, checking the machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from asyncstage.errors import MissingDependency
from asyncstage.localcloud.errors import LocalCloudError, NeedsRoot

# program -> Debian package that provides it
_PROGRAMS = {
    "sshd": "openssh-server",
    "ssh-keygen": "openssh-client",
    "rsync": "rsync",
    "losetup": "mount",
    "unshare": "util-linux",
    "pivot_root": "util-linux",
    "cp": "coreutils",
    "sudo": "sudo",
}
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def which(program: str) -> str:
    """Absolute path of ``program`` (also looking in the sbin directories)."""
    path = os.pathsep.join([os.environ.get("PATH", "/usr/bin:/bin"), *_SBIN])
    found = shutil.which(program, path=path)
    if found is None:
        raise MissingDependency(program, _PROGRAMS.get(program, program))
    return found


def check_machine() -> None:
    """Refuse to start without root or without the programs instances need."""
    if os.geteuid() != 0:
        raise NeedsRoot(
            "the local cloud needs root: it makes namespaces, mounts and loop devices "
            "(run as root, e.g. with sudo)"
        )
    for program in _PROGRAMS:
        which(program)
    for module in ("overlay", "loop"):
        if not _kernel_has(module):
            raise LocalCloudError(f"the kernel has no {module} support (modprobe {module})")


def _kernel_has(module: str) -> bool:
    if module == "overlay":
        try:
            return "overlay" in Path("/proc/filesystems").read_text()
        except OSError:
            return False
    return Path("/dev/loop-control").exists() or Path(f"/sys/module/{module}").exists()


def run(*argv: str | os.PathLike[str], what: str | None = None) -> str:
    """Run a program (argv, no shell), return its stdout; LocalCloudError on failure."""
    args = [os.fspath(a) for a in argv]
    try:
        done = subprocess.run(
            args, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
    except OSError as e:
        raise LocalCloudError(f"{what or args[0]}: cannot run {args[0]}: {e}") from e
    if done.returncode != 0:
        err = subprocess.CalledProcessError(done.returncode, args, done.stdout, done.stderr)
        raise LocalCloudError(
            f"{what or args[0]} failed (exit {done.returncode}): {done.stderr.strip()}"
        ) from err
    return done.stdout


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), None if it does not exist.

    A pid together with its start time names one process even after pid reuse.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def mountinfo_devices(pid: int) -> dict[tuple[int, int], str]:
    """Block devices mounted in the mount namespace of ``pid``: (major, minor) -> mount point."""
    found: dict[tuple[int, int], str] = {}
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        major, minor = fields[2].split(":")
        found.setdefault((int(major), int(minor)), _unescape(fields[4]))
    return found


def _unescape(path: str) -> str:
    return path.encode().decode("unicode_escape") if "\\" in path else path
