"""Real OpenSSH ``sshd`` processes for the tests, on 127.0.0.x and free high ports.

Each :class:`SSHServer` runs ``/usr/sbin/sshd -D -e -f <config>`` with its own
ed25519 host key, one authorised client key and a pid file, all in a temporary
directory. It listens on a loopback address 127.0.0.x and a free high port
(never port 22). It can be stopped, restarted on the same port (to test
reconnects) and re-keyed (a new host key, to test host key mismatches).

The login user is root. Root's ``~/.bashrc`` on these machines is slow (pyenv),
and bash reads it even for ``ssh host cmd``, so by default sshd runs in a
private mount namespace where ``/root/.bashrc`` is an empty file: commands start
in a few milliseconds. Everything else (``/tmp``, processes) is shared with
this machine, so tests can look at the files and processes a command made.

The fixtures that start them (``sshd_server``, ``fresh_sshd``, ``sshd_factory``,
``client_key``) live in :mod:`tests.fixtures.sshd`, registered once for the session
by tests/conftest.py: name them as test arguments, do not import them. Import from
here only the helpers (:class:`SSHServer`, :class:`ClientKey`, :func:`descendants`).
:meth:`SSHServer.stop` kills the whole process tree sshd made, found from its pid.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"

__all__ = ["ClientKey", "SSHServer", "descendants"]


def _keygen(path: Path, comment: str) -> None:
    for p in (path, path.with_suffix(".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    path.chmod(0o600)


def _fingerprint(pub: Path) -> str:
    out = subprocess.run(
        [SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(pub)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found, then theirs), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# Lazily unmounts, in the shell's mount namespace, each mount whose source is a loop
# device (mountinfo: the mount point is field 5, the source follows the "-" separator).
_DROP_LOOP_MOUNTS = (
    'awk \'{for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 2) ~ /^\\/dev\\/loop/)'
    " print $5; break }}' /proc/self/mountinfo"
    ' | while read -r m; do umount -l "$m" 2>/dev/null; done'
)


def in_private_mounts(setup: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a private mount namespace once the shell command ``setup`` ran
    there (a mount of its own): what it mounts ends with the namespace."""
    script = f'{setup} && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "-", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


class ClientKey:
    """An ed25519 client key pair, 0600 in a 0700 directory."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / "id_ed25519"
        _keygen(self.path, "asyncstage-test-client")
        self.public = self.path.with_suffix(".pub").read_text().strip()


class SSHServer:
    """One real OpenSSH sshd on ``address``:``port``; see the module docstring."""

    username = "root"

    def __init__(
        self,
        client: ClientKey,
        *,
        address: str | None = None,
        port: int | None = None,
        clean_login: bool = True,
        max_sessions: int | None = None,
        extra_config: str = "",
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="asyncstage-sshd-"))
        self.client = client
        self.client_key = client.path
        self.address = address or f"127.0.0.{random.randint(2, 254)}"
        self.port = port or _free_port(self.address)
        self.clean_login = clean_login
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.pid_file = self.dir / "sshd.pid"
        self.log_file = self.dir / "sshd.log"
        self.known_hosts = self.dir / "known_hosts"  # a fresh one for clients to use
        self._proc: subprocess.Popen[bytes] | None = None
        (self.dir / "authorized_keys").write_text(client.public + "\n")
        (self.dir / "empty").write_text("")
        _keygen(self.host_key, f"asyncstage-test-host-{self.address}")
        lines = [
            f"ListenAddress {self.address}:{self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "LogLevel ERROR",
            "Subsystem sftp internal-sftp",
        ]
        if max_sessions is not None:
            lines.append(f"MaxSessions {max_sessions}")
        self.config = self.dir / "sshd_config"
        self.config.write_text("\n".join(lines) + "\n" + extra_config)
        self.start()

    # -- facts for clients ---------------------------------------------------

    @property
    def host_public_key(self) -> str:
        """The current host key, ``ssh-ed25519 AAAA...`` (without comment)."""
        return " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])

    @property
    def host_fingerprint(self) -> str:
        """The current host key's fingerprint, ``SHA256:...``."""
        return _fingerprint(self.host_key.with_suffix(".pub"))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def host(self, **options: Any) -> Any:
        """An :class:`asyncstage.ssh.SSHHost` for this server (known_hosts of the server's dir)."""
        from asyncstage.ssh import SSHHost

        options.setdefault("known_hosts", self.known_hosts)
        options.setdefault("client_keys", [self.client_key])
        return SSHHost(self.address, port=self.port, username=self.username, **options)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start sshd and wait until it answers with its banner."""
        if self._proc is not None:
            raise RuntimeError("sshd already running")
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        argv = [SSHD, "-D", "-e", "-f", str(self.config)]
        if self.clean_login:
            # A private mount namespace where root's .bashrc is empty; `exec` keeps the pid.
            # Its copy of the machine's mounts lets go of every loop-backed one first: a
            # copy lives as long as this sshd and would keep a local cloud's image store
            # (or any test's loop mount) busy after the machine's own is unmounted.
            bashrc = f"mount --bind {self.dir / 'empty'} /root/.bashrc 2>/dev/null"
            script = f"{_DROP_LOOP_MOUNTS}; {bashrc}; " + shlex.join(["exec", *argv])
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + 10
        while True:
            if self._proc.poll() is not None:
                log_text = self.log_file.read_text(errors="replace")
                self._proc = None
                raise RuntimeError(f"sshd exited at start:\n{log_text}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd on {self.address}:{self.port} did not answer")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop sshd and every process under it (sessions, the commands they ran)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pids = [proc.pid, *descendants(proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.pid_file.unlink(missing_ok=True)

    def restart(self) -> None:
        """Stop and start again on the same address and port, same host key."""
        self.stop()
        self.start()

    def rekey(self) -> None:
        """Restart with a NEW host key (clients that pinned the old one must refuse it)."""
        self.stop()
        _keygen(self.host_key, f"asyncstage-test-host-{self.address}-rekeyed")
        self.start()

    def close(self) -> None:
        """Stop and remove the temporary directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<SSHServer {self.address}:{self.port} pid={self.pid}>"


def _free_port(address: str) -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind((address, 0))
            port: int = s.getsockname()[1]
        if port >= 10000:
            return port
    raise RuntimeError("no free high port")
