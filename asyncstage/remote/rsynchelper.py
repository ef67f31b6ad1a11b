"""Runs on a server for rsync and the direct link: work dirs, temporary keys, process groups.

Standard library only, no asyncstage import: the controller sends this file's text
to ``python3 -c`` (see :mod:`asyncstage.remote`), followed by a call of :func:`main`.
Every command prints one JSON object as its last line of output.

Commands:

* ``workdir OWNER_JSON``: a private temporary directory, with an ``owner`` record
  (the controller that made it and when it is stale), printed as ``{"dir": ...}``;
* ``linkdir OWNER_JSON COMMENT KNOWN_HOSTS_LINE BIND_ADDRESS``: a work dir (as
  ``workdir``) holding a temporary ed25519 key and a known_hosts with the
  destination's pinned key; also the ``-o`` options that make this host's ``ssh``
  prefer the fast key exchange and cipher (:func:`openssh_preferences`);
* ``authorize USER FILE OPTIONS PUBLIC_KEY COMMENT TTL``: append a key line to USER's
  authorized_keys (FILE, or ``~USER/.ssh/authorized_keys``) with
  ``expiry-time`` TTL seconds from now (this host's clock);
* ``revoke USER FILE TAG``: remove the lines carrying TAG;
* ``cleanup DIR``: stop the process groups recorded in DIR and remove it (DIR may also
  be the TOKEN of a ``solo`` work dir);
* ``sweep USER FILE DEAD_JSON``: remove expired transfer keys and those of dead
  controllers (DEAD_JSON lists controller ids and key tags), and stale work dirs;
  print what is left for the controller to judge;
* ``run PIDFILE ARGV...``: run ARGV in a process group of its own, recorded in PIDFILE,
  and pass its output on in batches (:func:`relay`);
* ``solo TOKEN OWNER_JSON ARGV...``: ``workdir``, ``run`` and ``cleanup`` in one command
  (one interpreter and one round trip instead of three): makes the work dir named by
  TOKEN (random hex chosen by the controller, so that it can clean up without an
  answer), runs ARGV there as ``run`` does, and removes the dir once ARGV has ended.

Files written as root in a directory the login user can write (``~/.ssh``) are
opened with ``O_NOFOLLOW`` below the home directory: a symlinked ``.ssh`` or
``authorized_keys`` is refused, never followed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import re
import select
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

# typing is for the type checker only: a server's python3 imports none of it (a
# start the less), and 3.8's cannot subscript builtin types at run time
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# glob, socket and subprocess are imported by the few commands that use them: every
# rsync starts this script, and at the top they cost about a seventh of its start.

MARKER = "asyncstage-transfer-"
"""Start of the tag in the comment of every temporary key (and of work dir names)."""
WORKDIR_PREFIX = "asyncstage-xfer-"
_TOKEN = re.compile(r"^[0-9a-f]{32}$")
RELAY_EVERY = 0.1
"""Seconds a command's output is gathered before it is passed on (``run``, ``solo``)."""
RELAY_MOST = 1 << 16
"""Bytes of output passed on at once at most."""
_RELAY_NAP = 0.02
_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class Refused(Exception):
    """A request this helper will not carry out (printed as ``{"error": ...}``)."""


def say(answer: dict[str, Any]) -> None:
    print(json.dumps(answer), flush=True)


# -- authorized_keys, never through a symlink ------------------------------------------


def _open_dir(path: str, trusted: str) -> int:
    """A descriptor of directory ``path``: ``trusted`` (a prefix of it) is resolved as
    is, every component below it is opened with ``O_NOFOLLOW``."""
    fd = os.open(os.path.realpath(trusted), os.O_RDONLY | os.O_DIRECTORY)
    rest = os.path.relpath(path, trusted)
    try:
        for part in [] if rest == "." else rest.split(os.sep):
            if part in ("", ".", ".."):
                raise Refused(f"{path}: unexpected path component {part!r}")
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Refused(f"{path}: {part} is a symlink or not a directory") from e
                raise
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def keys_dir(user: str, path: str, create: bool) -> Iterator[tuple[int, str]]:
    """(descriptor of the directory, file name) of USER's authorized_keys, locked."""
    pw = pwd.getpwnam(user)
    if path:
        # A file the caller named: its directory is taken as given, the file itself
        # is still never followed through a symlink.
        directory, name = os.path.dirname(path), os.path.basename(path)
        trusted = directory
    else:
        directory = os.path.join(pw.pw_dir, ".ssh")
        name, trusted = "authorized_keys", pw.pw_dir
        if create:
            try:
                os.mkdir(directory, 0o700)
                os.chown(directory, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
            except FileExistsError:
                pass
    dfd = _open_dir(directory, trusted)
    try:
        lock = os.open(
            ".asyncstage-authorized_keys.lock",
            os.O_RDWR | os.O_CREAT | _NOFOLLOW,
            0o600,
            dir_fd=dfd,
        )
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield dfd, name
        finally:
            os.close(lock)
    finally:
        os.close(dfd)


def _read_lines(dfd: int, name: str) -> list[bytes] | None:
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Refused(f"{name} is a symlink: refused") from e
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise Refused(f"{name} is not a regular file: refused")
        return f.read().splitlines(True)


def _rewrite(dfd: int, name: str, lines: list[bytes]) -> None:
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    tmp = name + ".asyncstage-tmp"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, st.st_mode & 0o7777, dir_fd=dfd
    )
    try:
        os.write(fd, b"".join(lines))
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)


def authorize(user: str, path: str, options: str, public: str, comment: str, ttl: str) -> None:
    expires = int(time.time()) + int(ttl)
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(expires))
    line = f'{options},expiry-time="{stamp}" {public} {comment} expires={expires}'
    if "\n" in line or "\r" in line:
        raise Refused("a key line cannot hold a line break")
    pw = pwd.getpwnam(user)
    with keys_dir(user, path, create=True) as (dfd, name):
        old = _read_lines(dfd, name)
        fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            prefix = b"\n" if old and not old[-1].endswith(b"\n") else b""
            os.write(fd, prefix + line.encode() + b"\n")
            if old is None:
                os.fchown(fd, pw.pw_uid, pw.pw_gid)
        finally:
            os.close(fd)
    say({"file": path or os.path.join(pw.pw_dir, ".ssh", "authorized_keys"), "expires": expires})


def _remove_lines(user: str, path: str, doomed: Any) -> list[bytes]:
    """Remove the lines for which ``doomed(line)`` holds; returns the removed lines."""
    with keys_dir(user, path, create=False) as (dfd, name):
        lines = _read_lines(dfd, name)
        if not lines:
            return []
        gone = [ln for ln in lines if doomed(ln)]
        if gone:
            _rewrite(dfd, name, [ln for ln in lines if not doomed(ln)])
        return gone


def revoke(user: str, path: str, tag: str) -> None:
    try:
        removed = _remove_lines(user, path, lambda ln: tag.encode() in ln)
    except FileNotFoundError:  # no ~/.ssh: nothing to remove
        removed = []
    say({"removed": len(removed)})


# -- temporary keys and work dirs ----------------------------------------------------------


def _workdir(owner: str) -> str:
    d = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    with open(os.path.join(d, "owner"), "w") as f:
        f.write(owner)
    return d


def workdir(owner: str) -> None:
    say({"dir": _workdir(owner)})


def _bindable(address: str) -> bool:
    import socket  # only where used: see the imports

    if not address:
        return False
    try:
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
    except OSError:
        return False
    return True


# -- OpenSSH's algorithm order ----------------------------------------------------------

FAST_KEX = ("mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org")
"""Key exchanges asyncssh itself prefers (ML-KEM hybrid, then curve25519). OpenSSH 9.x
puts sntrup761x25519 first, whose key generation costs ~70 ms of a ~200 ms connection."""
GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def has_aes(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has AES instructions (x86 ``aes`` flag, arm64 ``aes`` feature)."""
    try:
        with open(cpuinfo) as f:
            flags = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return False
    return "aes" in flags.split(":", 1)[-1].split()


def openssh_preferences(
    ssh: str = "ssh", kex: Sequence[str] = FAST_KEX, ciphers: Sequence[str] | None = None
) -> list[str]:
    """``-o`` options that move ``kex`` and ``ciphers`` (default: AES-GCM where the CPU
    has AES instructions) to the front of this ``ssh``'s own defaults, read with
    ``ssh -G``: an order only, nothing enabled that it does not enable by default.
    Empty when ``ssh`` is missing, too old for ``-G``, or already prefers them."""
    import subprocess  # only where used: see the imports

    if ciphers is None:
        ciphers = GCM if has_aes() else ()
    try:
        out = subprocess.run(
            [ssh, "-G", "-F", "/dev/null", "localhost"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    defaults = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    wanted = {"KexAlgorithms": ("kexalgorithms", kex), "Ciphers": ("ciphers", ciphers)}
    options: list[str] = []
    for option, (key, first) in wanted.items():
        have = defaults.get(key, "").split(",")
        front = [a for a in first if a in have]
        if front and have[: len(front)] != front:
            options += ["-o", option + "=" + ",".join(front + [a for a in have if a not in front])]
    return options


# -- temporary keys ----------------------------------------------------------------------


def linkdir(owner: str, comment: str, known_hosts_line: str, bind_address: str) -> None:
    """A work dir (as :func:`workdir`) holding a new key (:func:`_keygen`): one run of
    this helper where a host -> host transfer used to make two."""
    d = _workdir(owner)
    try:
        made = _keygen(d, comment, known_hosts_line, bind_address)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)  # no answer, so nobody would remove it
        raise
    say({"dir": d, **made})


def _keygen(d: str, comment: str, known_hosts_line: str, bind_address: str) -> dict[str, Any]:
    import subprocess  # only where used: see the imports

    key = os.path.join(d, "id_ed25519")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    kh = os.path.join(d, "known_hosts")
    with open(kh, "w") as f:
        f.write(known_hosts_line + "\n")
    with open(key + ".pub") as f:
        pub = f.read().split()
    public = " ".join(pub[:2])
    answer = {"key": key, "known_hosts": kh, "public": public, "bindable": _bindable(bind_address)}
    return {**answer, "prefer": openssh_preferences()}  # this host's ssh, to the destination


def _kill_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except OSError as e:
            if e.errno == errno.ESRCH:
                return
            raise
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except OSError:
                return
            time.sleep(0.02)


def _groups(d: str) -> list[int]:
    found = []
    for name in os.listdir(d) if os.path.isdir(d) else []:
        if name.endswith(".pid"):
            try:
                with open(os.path.join(d, name)) as f:
                    pgid = int(f.read().strip() or "0")
            except (OSError, ValueError):
                continue
            if pgid > 1:
                found.append(pgid)
    return found


def _remove_workdir(d: str) -> list[int]:
    killed = _groups(d)
    for pgid in killed:
        _kill_group(pgid)
    shutil.rmtree(d, ignore_errors=True)
    return killed


def cleanup(d: str) -> None:
    say({"killed": _remove_workdir(_solo_dir(d) if _TOKEN.match(d) else d)})


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def _comment_fields(line: bytes) -> dict[str, str]:
    """The tag and the ``key=value`` words that follow it in a transfer key's comment."""
    words = line.decode("utf-8", "replace").split()
    tags = [i for i, w in enumerate(words) if w.startswith(MARKER)]
    if not tags:
        return {}
    fields = {"tag": words[tags[-1]]}
    for word in words[tags[-1] + 1 :]:
        key, _, value = word.partition("=")
        fields[key] = value
    return fields


def _stale(fields: dict[str, str], now: float, dead: Sequence[str]) -> bool:
    try:
        expired = int(fields.get("expires", "0")) <= now
    except ValueError:
        expired = True
    return expired or fields.get("controller") in dead or fields.get("tag") in dead


def sweep(user: str, path: str, dead_json: str) -> None:
    """Remove stale transfer keys and work dirs; report the live ones' controllers."""
    dead = list(json.loads(dead_json))
    now = time.time()
    keys: list[dict[str, str]] = []

    def doomed(line: bytes) -> bool:
        if MARKER.encode() not in line:
            return False
        fields = _comment_fields(line)
        if _stale(fields, now, dead):
            return True
        keys.append(fields)
        return False

    try:
        removed = [_comment_fields(ln).get("tag", "") for ln in _remove_lines(user, path, doomed)]
    except (FileNotFoundError, KeyError):  # no ~/.ssh, or no such user here
        removed = []
    import glob  # only where used: see the imports

    dirs, swept = [], []
    for d in glob.glob(os.path.join(tempfile.gettempdir(), WORKDIR_PREFIX + "*")):
        try:
            with open(os.path.join(d, "owner")) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue  # not ours to judge (no owner record)
        busy = any(_alive(g) for g in _groups(d))
        if owner.get("controller") in dead or (float(owner.get("expires", 0)) <= now and not busy):
            _remove_workdir(d)
            swept.append(d)
        else:
            dirs.append({"dir": d, "controller": str(owner.get("controller", ""))})
    say({"removed": removed, "swept": swept, "keys": keys, "dirs": dirs, "now": now})


# -- running a command in a process group -------------------------------------------------


def run(pidfile: str, argv: Sequence[str]) -> None:
    sys.exit(_run_group(pidfile, argv))


def _run_group(pidfile: str, argv: Sequence[str]) -> int:
    # The command runs in a process group of its own whose id is written to
    # pidfile, so that a cleanup can stop it and everything it started.
    out, into = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.dup2(into, 1)
            os.execvp(argv[0], list(argv))
        except OSError as e:
            os.write(2, f"{argv[0]}: {e.strerror}\n".encode(errors="replace"))
        finally:  # not started: the child never returns into this script
            os._exit(127)
    os.close(into)
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(pid))
    os.rename(pidfile + ".tmp", pidfile)

    def forward(signum: int, frame: object) -> None:
        with suppress(OSError):
            os.killpg(pid, signum)

    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, forward)
    try:
        relay(out)
    except OSError:  # no one reads the output any more (the session is gone)
        forward(signal.SIGTERM, None)
    os.close(out)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    with suppress(OSError):
        os.unlink(pidfile)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def relay(fd: int) -> None:
    """Pass what ``fd`` carries on to stdout until its end, in batches of what came
    within :data:`RELAY_EVERY` seconds: rsync writes a line or two per file, each of
    which would be an SSH packet of its own, for sshd to encrypt and the controller to
    take apart (thousands a second for small files)."""
    while chunk := os.read(fd, RELAY_MOST):
        batch = [chunk]
        size = len(chunk)
        deadline = time.monotonic() + RELAY_EVERY
        while size < RELAY_MOST and (left := deadline - time.monotonic()) > 0:
            # naps, not a wait for each write: the end of the output still ends a batch
            # within a nap, and a steady trickle costs a read a nap, not one per line
            time.sleep(min(left, _RELAY_NAP))
            if not select.select([fd], [], [], 0)[0]:
                continue
            chunk = os.read(fd, RELAY_MOST - size)
            if not chunk:
                break
            batch.append(chunk)
            size += len(chunk)
        _write_all(1, b"".join(batch))
        if not chunk:
            return


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, waiting while it is full (were it non-blocking)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])


def _solo_dir(token: str) -> str:
    if not _TOKEN.match(token):
        raise Refused(f"bad work dir token {token[:40]!r}")
    return os.path.join(tempfile.gettempdir(), WORKDIR_PREFIX + token)


def solo(token: str, owner: str, argv: Sequence[str]) -> int:
    """Run ``argv`` as ``run`` does, in a work dir of its own (``TOKEN``) that exists
    only while it runs."""
    d = _solo_dir(token)
    os.mkdir(d, 0o700)  # as mkdtemp: a name taken (or a symlink) fails, never followed
    try:
        with open(os.path.join(d, "owner"), "w") as f:
            f.write(owner)
        return _run_group(os.path.join(d, "cmd.pid"), argv)
    finally:
        shutil.rmtree(d, ignore_errors=True)


COMMANDS: dict[str, Callable[..., None]] = {
    "workdir": workdir,
    "linkdir": linkdir,
    "authorize": authorize,
    "revoke": revoke,
    "cleanup": cleanup,
    "sweep": sweep,
}


def main(argv: Sequence[str]) -> int:
    if not argv:
        sys.exit("usage: rsynchelper COMMAND ARGS...")
    cmd, args = argv[0], list(argv[1:])
    if cmd == "run":
        run(args[0], args[1:])
    if cmd == "solo":
        try:
            sys.exit(solo(args[0], args[1], args[2:]))
        except Refused as e:
            say({"error": str(e), "refused": True})
            return 3
    if cmd not in COMMANDS:
        sys.exit("unknown helper command " + cmd)
    try:
        COMMANDS[cmd](*args)
    except Refused as e:
        say({"error": str(e), "refused": True})
        return 3
    return 0
