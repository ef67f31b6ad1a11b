"""PID 1 of a local-cloud instance: builds its root, then becomes its sshd.

Run by the local cloud as ``unshare --mount --pid --uts --fork --propagation private
python3 -I -S _hostinit.py CONFIG_JSON`` (standard library only, no asyncstage import:
it starts once per boot and must be quick). In the new namespaces it

0. joins its device cgroup (``cgroup`` in the config, when the machine has one) and the
   cgroup v2 that freezes it (``freezer``, when that is another one) and makes a cgroup
   namespace of its own, so that root inside never sees the rules;
1. mounts an overlay of the machine's ``/`` (lower) with the instance's own upper and
   work dirs, which the cloud keeps across stop and start;
2. mounts a fresh ``/proc``, ``/sys`` (read-only), a tmpfs ``/dev`` with the usual nodes
   and a new-instance ``/dev/pts``, tmpfs ``/dev/shm``, ``/tmp`` and ``/run``;
3. sets the hostname, makes the overlay the root (``pivot_root``; the machine's mounts
   are dropped from the instance's view) and
4. drops the capabilities ``drop_caps`` from its bounding set (so that nothing in the
   instance, ``sudo`` included, ever has them) and
5. execs ``sshd -D -e``, which stays PID 1: killing it ends every process of the
   instance, and its mounts vanish with its mount namespace.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import stat
import subprocess
import sys

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MNT_DETACH = 2
_CLONE_NEWCGROUP = 0x02000000
_PR_CAPBSET_DROP = 24

_libc = ctypes.CDLL(None, use_errno=True)

# name -> (major, minor) of the character devices every Linux host has
_NODES = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}


def _mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target} ({data}): {os.strerror(err)}")


def _umount(target: str) -> None:
    if _libc.umount2(target.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _join_cgroups(procs: list[str]) -> None:
    for path in procs:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    if _libc.unshare(_CLONE_NEWCGROUP) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWCGROUP): {os.strerror(err)}")


def _drop_caps(caps: list[int]) -> None:
    for cap in caps:
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: a capability this kernel does not know
                raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")


def _build_dev(dev: str) -> None:
    _mount("tmpfs", dev, "tmpfs", _MS_NOSUID, "mode=755,size=1m")
    for name, (major, minor) in _NODES.items():
        path = f"{dev}/{name}"
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(path, 0o666)
    for name in ("pts", "shm", "disk", "disk/by-id"):
        os.mkdir(f"{dev}/{name}", 0o755)
    _mount(
        "devpts",
        f"{dev}/pts",
        "devpts",
        _MS_NOSUID | _MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620,gid=5",
    )
    _mount("tmpfs", f"{dev}/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    os.symlink("/proc/self/fd", f"{dev}/fd")
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{fd}", f"{dev}/{name}")


def main() -> None:
    config = json.loads(sys.argv[1])
    root: str = config["merged"]
    joined = [p for p in (config.get("cgroup"), config.get("freezer")) if p]
    if joined:
        _join_cgroups(list(dict.fromkeys(joined)))
    _mount(
        "overlay",
        root,
        "overlay",
        0,
        f"lowerdir=/,upperdir={config['upper']},workdir={config['work']}",
    )
    _mount("proc", f"{root}/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _mount("sysfs", f"{root}/sys", "sysfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _build_dev(f"{root}/dev")
    _mount("tmpfs", f"{root}/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
    _mount("tmpfs", f"{root}/run", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755")
    os.mkdir(f"{root}/run/sshd", 0o755)
    os.mkdir(f"{root}/run/lock", 0o1777)
    os.chmod(f"{root}/run/lock", 0o1777)
    socket.sethostname(config["hostname"])

    # The overlay becomes "/"; the machine's own mount tree is then detached.
    os.chdir(root)
    subprocess.run([config["pivot_root"], ".", "."], check=True)
    _umount(".")
    os.chdir("/")
    # exec as root: sshd's permitted set becomes the bounding set without these
    _drop_caps(config.get("drop_caps", []))
    os.execv(config["sshd"], [config["sshd"], "-D", "-e", "-f", "/etc/ssh/sshd_config"])


if __name__ == "__main__":
    main()
