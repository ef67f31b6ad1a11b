"""Instance hosts: isolated namespaces with an overlay root and their own sshd.

A :class:`Host` is the machine behind one instance. Its upper and work dirs (under
the cloud's ``roots`` tmpfs) and its host keys persist across stop and start; its
processes and mounts do not. All methods block: the cloud calls them from its
worker threads.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from asyncstage.localcloud._isolation import (
    DROPPED_CAPS,
    InstanceCgroup,
    mask_upper,
    mkdir_as_machine,
    remove_cgroup_tree,
    scrubbed_shadow,
)
from asyncstage.localcloud._system import (
    children,
    mountinfo_devices,
    process_start_time,
    run,
    which,
)
from asyncstage.localcloud.errors import LocalCloudError

LOGIN_USER = "admin"
_HOST_KEY_TYPES = ("ecdsa", "ed25519")
_BY_ID = "dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_"
_INIT = Path(__file__).with_name("_hostinit.py")

_SSHD_CONFIG = """\
# sshd of a local-cloud instance (written by asyncstage.localcloud at every boot):
# its private address (for life) and its public one (new at every start)
{listen}
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
PidFile none
UsePAM no
PermitRootLogin no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
PrintMotd no
PrintLastLog no
MaxStartups 200:30:400
MaxSessions 100
ClientAliveInterval 0
X11Forwarding no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
# DSA keys, as the images of VM::EC2::Staging's era accepted (its server-to-server keys)
PubkeyAcceptedAlgorithms +ssh-dss
"""
# The instance's ssh client (Debian's defaults) offers DSA keys too, for the same reason.
_SSH_CONFIG = """\
# ssh client of a local-cloud instance (written by asyncstage.localcloud)
Include /etc/ssh/ssh_config.d/*.conf
Host *
    SendEnv LANG LC_*
    HashKnownHosts yes
    PubkeyAcceptedAlgorithms +ssh-dss
"""

# What a login user's shell reads: a clean start-up (no machine-specific rc files).
_BASHRC = """\
# ~/.bashrc of a local-cloud login user
case $- in *i*) ;; *) return ;; esac
HISTCONTROL=ignoreboth
PS1='\\u@\\h:\\w\\$ '
"""
_PROFILE = """\
# ~/.profile of a local-cloud login user
if [ -n "$BASH_VERSION" ] && [ -f "$HOME/.bashrc" ]; then . "$HOME/.bashrc"; fi
"""


@dataclass
class Host:
    """The isolated host behind one instance (blocking; used from worker threads)."""

    instance_id: str
    address: str  # the private address: the instance keeps it for life
    state_dir: Path  # <cloud state>/instances/<id>: logs, console
    root_dir: Path  # <cloud roots tmpfs>/<id>: upper, work, merged
    public_key: str | None
    on_pid: Callable[[int, bool], None] = lambda pid, alive: None  # registry callback
    cgroup: InstanceCgroup | None = None  # None: device_isolation="none"
    freezer: Path | None = None  # its cgroup v2 (cgroup.freeze); None: frozen by SIGSTOP
    masked: list[Path] = field(default_factory=list)  # more paths to hide (the state dir)
    public_address: str = ""  # changes at every start (EC2's public IP); "": none
    netns: str = ""  # the instance's network namespace (ip netns name); "": none
    fingerprints: list[str] = field(default_factory=list)
    host_public_keys: list[str] = field(default_factory=list)
    user_data: bytes | None = None  # its launch's, read at the first boot only
    notes: list[str] = field(default_factory=list)  # cloud-init's words for the next console
    proc: subprocess.Popen[bytes] | None = None
    init_pid: int | None = None
    init_start: int | None = None

    @property
    def addresses(self) -> list[str]:
        """Where its sshd listens: the private address, then the public one (which, in
        a namespace of its own, is NATed to the private one by the cloud's router)."""
        if self.netns:
            return [self.address]
        return [a for a in (self.address, self.public_address) if a]

    @property
    def hostname(self) -> str:
        return "ip-" + self.address.replace(".", "-")

    @property
    def upper(self) -> Path:
        return self.root_dir / "upper"

    @property
    def console_path(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def alive(self) -> bool:
        return self.init_pid is not None and process_start_time(self.init_pid) == self.init_start

    # -- first boot: the instance's own files in its upper dir ----------------------------

    def prepare(self) -> None:
        """Write the instance's identity into its upper dir (once, before the first boot)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("upper", "work", "merged"):
            (self.root_dir / sub).mkdir(parents=True, exist_ok=True)
        self._write("etc/hostname", self.hostname + "\n")
        self._write("etc/machine-id", secrets.token_hex(16) + "\n")
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
        self._write("etc/hosts", hosts + f"{self.address}\t{self.hostname}\n")
        self._write("etc/ssh/ssh_config", _SSH_CONFIG)
        self._host_keys()
        uid, gid = self._login_user()
        self._write(
            "etc/sudoers.d/90-cloud-init-users", f"{LOGIN_USER} ALL=(ALL) NOPASSWD:ALL\n", 0o440
        )
        home = f"home/{LOGIN_USER}"
        self._write(f"{home}/.bashrc", _BASHRC, 0o644, (uid, gid))
        self._write(f"{home}/.profile", _PROFILE, 0o644, (uid, gid))
        keys = (self.public_key.strip() + "\n") if self.public_key else ""
        self._write(f"{home}/.ssh/authorized_keys", keys, 0o600, (uid, gid))
        os.chown(self.upper / home, uid, gid)
        os.chmod(self.upper / home, 0o755)
        os.chown(self.upper / home / ".ssh", uid, gid)
        os.chmod(self.upper / home / ".ssh", 0o700)

    def _mkdirs(self, rel: str) -> Path:
        """Make ``upper/rel`` with the mode and owner of the machine's dir of that name."""
        path = self.upper
        for part in Path(rel).parts:
            path = path / part
            if path.is_symlink():  # the instance's root made it one: never followed as root
                raise LocalCloudError(f"{self.instance_id}: /{rel} is a symlink in the instance")
            if not path.exists():
                mkdir_as_machine(self.upper, path)
        return path

    def _write(
        self, rel: str, text: str, mode: int = 0o644, owner: tuple[int, int] = (0, 0)
    ) -> Path:
        path = self._mkdirs(str(Path(rel).parent)) / Path(rel).name
        # Written again at later boots, into a tree the instance's root controls: a symlink
        # planted there must not make this process (root on the machine) write elsewhere.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, mode)
            os.fchown(fd, *owner)
            f.write(text)
        return path

    def _host_keys(self) -> None:
        """Its host keys, as cloud-init's ssh module makes them at an instance's first
        boot: those of its user data's ``ssh_keys`` (cloud-config) when it gives any
        valid ones (and only those), else one of each type made here."""
        keygen = which("ssh-keygen")
        ssh_dir = self._mkdirs("etc/ssh")
        comment = f"root@{self.hostname}"
        given, self.notes = cloud_config_keys(self.user_data)
        self.user_data = None  # read once: a later boot is not the instance's first
        installed = self._given_keys(ssh_dir, given, keygen) if given else []
        for kind in installed or _HOST_KEY_TYPES:
            key = ssh_dir / f"ssh_host_{kind}_key"
            if not installed and not key.exists():
                run(keygen, "-q", "-t", kind, "-N", "", "-C", comment, "-f", key, what="ssh-keygen")
            pub = key.with_name(key.name + ".pub")
            self.host_public_keys.append(pub.read_text().strip())
            self.fingerprints.append(run(keygen, "-l", "-f", pub, what="ssh-keygen").strip())

    def _given_keys(
        self, ssh_dir: Path, given: dict[str, tuple[str, str | None]], keygen: str
    ) -> list[str]:
        """Install the key pairs of the user data (written by someone else: each private
        key must load, be of its type and match its public key, else it is ignored with
        a console line); the types installed."""
        installed: list[str] = []
        for kind, (private, public) in given.items():
            key = ssh_dir / f"ssh_host_{kind}_key"
            tmp = ssh_dir / f".ssh_host_{kind}_key.new"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(private if private.endswith("\n") else private + "\n")
            try:
                derived = run(keygen, "-y", "-f", tmp, what="ssh-keygen").split()
            except LocalCloudError:
                derived = []
            wanted = _KEY_ALGORITHMS[kind]
            problem = (
                "is not a valid private key"
                if len(derived) < 2 or not derived[0].startswith(wanted)
                else "does not match its public key"
                if public is not None and public.split()[:2] != derived[:2]
                else None
            )
            if problem is not None:
                tmp.unlink()
                self.notes.append(f"ssh_keys: {kind}_private {problem}: ignored")
                continue
            tmp.replace(key)
            comment = f"root@{self.hostname}"
            self._write(
                f"etc/ssh/ssh_host_{kind}_key.pub", f"{derived[0]} {derived[1]} {comment}\n"
            )
            installed.append(kind)
        if not installed:
            self.notes.append("ssh_keys: no valid key: generating host keys")
        return installed

    def _login_user(self) -> tuple[int, int]:
        """Add the login user to the overlay's passwd, shadow and group files."""
        taken_uids = {p.pw_uid for p in pwd.getpwall()}
        taken_gids = {g.gr_gid for g in grp.getgrall()}
        uid = next(i for i in range(1000, 60000) if i not in taken_uids and i not in taken_gids)
        gid = uid
        home = f"/home/{LOGIN_USER}"
        entries = {
            "passwd": f"{LOGIN_USER}:x:{uid}:{gid}:Debian:{home}:/bin/bash",
            "shadow": f"{LOGIN_USER}:*:19000:0:99999:7:::",
            "group": f"{LOGIN_USER}:x:{gid}:",
            "gshadow": f"{LOGIN_USER}:!::",
        }
        for name, entry in entries.items():
            machine = Path("/etc") / name
            lines = machine.read_text().splitlines() if machine.exists() else []
            if name in ("shadow", "gshadow"):  # the machine's password hashes stay here
                lines = scrubbed_shadow("\n".join(lines), 1)
            lines = [ln for ln in lines if not ln.startswith(LOGIN_USER + ":")] + [entry]
            mode = stat.S_IMODE(machine.stat().st_mode) if machine.exists() else 0o644
            path = self._write(f"etc/{name}", "\n".join(lines) + "\n", mode)
            if machine.exists():
                st = machine.stat()
                os.chown(path, st.st_uid, st.st_gid)
        return uid, gid

    # -- boot and kill -------------------------------------------------------------------

    def boot(self) -> None:
        """Start the host's namespaces and sshd; returns once the init process exists."""
        # its own keys (those its first boot installed or made): the machine's others
        # of those names are masked, never seen through the overlay
        own_keys = {
            name
            for k in _HOST_KEY_TYPES
            for name in (f"ssh_host_{k}_key", f"ssh_host_{k}_key.pub")
            if (self.upper / "etc/ssh" / name).is_file()
        }
        mask_upper(self.upper, self.masked, own_keys)
        listen = "\n".join(f"ListenAddress {a}:22" for a in self.addresses)
        self._write("etc/ssh/sshd_config", _SSHD_CONFIG.format(listen=listen))
        if self.cgroup is not None:
            self.cgroup.create()
        if self.freezer is not None:
            self.freezer.mkdir(exist_ok=True)
        config = {
            "cgroup": self.cgroup.procs if self.cgroup is not None else None,
            "freezer": str(self.freezer / "cgroup.procs") if self.freezer is not None else None,
            "drop_caps": sorted(DROPPED_CAPS.values()),
            "upper": str(self.upper),
            "work": str(self.root_dir / "work"),
            "merged": str(self.root_dir / "merged"),
            "hostname": self.hostname,
            "sshd": which("sshd"),
            "pivot_root": which("pivot_root"),
        }
        # in its own network namespace: nsenter joins it, then unshare makes the rest
        enter = [which("nsenter"), f"--net=/run/netns/{self.netns}"] if self.netns else []
        argv = [
            *enter,
            which("unshare"),
            "--mount",
            "--pid",
            "--uts",
            "--fork",
            "--propagation",
            "private",
            "--kill-child",
            sys.executable,
            "-I",
            "-S",
            str(_INIT),
            json.dumps(config),
        ]
        with open(self.state_dir / "sshd.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        self.on_pid(self.proc.pid, True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = children(self.proc.pid)
            if kids:
                self.init_pid = kids[0]
                self.init_start = process_start_time(kids[0])
                self.on_pid(kids[0], True)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.005)
        self.kill()
        raise LocalCloudError(f"{self.instance_id}: host did not start: {self.log_tail()}")

    def wait_for_sshd(self, timeout: float, cancelled: Callable[[], bool]) -> bool:
        """Wait until sshd answers with its banner; False if cancelled."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cancelled():
                return False
            if self.proc is None or self.proc.poll() is not None:
                raise LocalCloudError(f"{self.instance_id}: host stopped: {self.log_tail()}")
            if self._sshd_answers():
                return True
            time.sleep(0.05)
        raise LocalCloudError(f"{self.instance_id}: sshd did not answer within {timeout:g}s")

    def _sshd_answers(self) -> bool:
        if not self.netns:
            return all(_ssh_banner(a) for a in self.addresses)
        # its listening socket, read from its namespace's own table: the machine may have
        # no way in, by its security groups (a restarted instance keeps its table) or for
        # want of a public address, exactly as on EC2
        return self.init_pid is not None and _listens(self.init_pid, self.address, 22)

    def kill(self) -> None:
        """Kill every process of the host (its PID 1 first) and wait for them."""
        if self.init_pid is not None:
            if self.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
            self.on_pid(self.init_pid, False)
        if self.proc is not None:
            if self.proc.poll() is None:
                # unshare exits once its child (our init) is gone
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.on_pid(self.proc.pid, False)
        self.proc = None
        self.init_pid = self.init_start = None

    def remove(self) -> None:
        """Remove the host's root, state and cgroup (after kill, at terminate)."""
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.freezer is not None:
            remove_cgroup_tree(self.freezer)  # (gone already if it was the device cgroup)
        shutil.rmtree(self.root_dir, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.state_dir / "sshd.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    # -- block devices inside the host ---------------------------------------------------

    def add_device(
        self, name: str, rdev: int, serial: str | None, *, read_only: bool = False
    ) -> None:
        """Make ``/dev/<name>`` inside the running host, and let it open the device.

        ``serial``: the volume id of an NVMe device, linked from ``/dev/disk/by-id``.
        """
        if self.cgroup is not None:
            self.cgroup.allow(rdev, "r" if read_only else "rw")
        root = self._proc_root()
        node = root / "dev" / name
        with contextlib.suppress(FileNotFoundError):
            node.unlink()
        mode = 0o440 if read_only else 0o660
        os.mknod(node, stat.S_IFBLK | mode, rdev)
        os.chmod(node, mode)
        os.chown(node, 0, _disk_gid())
        if serial is not None:
            link = root / (_BY_ID + serial.replace("-", ""))
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            os.symlink(f"../../{name}", link)

    def remove_device(self, name: str, rdev: int | None, serial: str | None) -> None:
        """Remove the node (and link) of a device, and the host's right to open it."""
        if self.cgroup is not None and rdev is not None:
            self.cgroup.deny(rdev)
        if not self.alive:
            return
        root = self._proc_root()
        paths = [root / "dev" / name]
        if serial is not None:
            paths.insert(0, root / (_BY_ID + serial.replace("-", "")))
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def mounted_devices(self) -> dict[tuple[int, int], str]:
        """Block devices mounted inside the host: (major, minor) -> mount point."""
        return mountinfo_devices(self.init_pid) if self.alive and self.init_pid else {}

    def _proc_root(self) -> Path:
        if not self.alive:
            raise LocalCloudError(f"{self.instance_id}: host is not running")
        return Path(f"/proc/{self.init_pid}/root")

    # -- console -------------------------------------------------------------------------

    def write_console(self) -> None:
        """Append this boot's log, with the host key fingerprints as cloud-init prints them."""
        now = datetime.now(UTC)
        stamp = now.strftime("%b %d %H:%M:%S")
        ci = f"<14>{stamp} cloud-init: "
        lines = [
            f"[    0.000000] Linux version {os.uname().release} (asyncstage local cloud)",
            f"[    0.000000] Command line: root=overlay hostname={self.hostname}",
            f"Cloud-init v. 22.4.2 running 'init' at {now:%a, %d %b %Y %H:%M:%S +0000}.",
            f"ci-info: | {'eth0' if self.netns else 'lo'} | True | {self.address} | . | . | . |",
            *(f"{ci}{note}" for note in self.notes),
            f"{ci}#############################################################",
            f"{ci}-----BEGIN SSH HOST KEY FINGERPRINTS-----",
            *(f"{ci}{fp}" for fp in self.fingerprints),
            f"{ci}-----END SSH HOST KEY FINGERPRINTS-----",
            f"{ci}#############################################################",
            "-----BEGIN SSH HOST KEY KEYS-----",
            *self.host_public_keys,
            "-----END SSH HOST KEY KEYS-----",
            f"Cloud-init v. 22.4.2 finished at {now:%a, %d %b %Y %H:%M:%S +0000}. "
            "Datasource DataSourceEc2Local.",
        ]
        self.notes = []  # said at the first boot only
        with open(self.console_path, "a") as f:
            f.write("\n".join(lines) + "\n")

    def console(self, upto: int | None = None) -> str:
        """The console's last 64 KiB (of its first ``upto`` characters, if given)."""
        return self._console_text()[:upto][-65536:]

    def console_length(self) -> int:
        """How many characters the console holds."""
        return len(self._console_text())

    def _console_text(self) -> str:
        try:
            return self.console_path.read_text()
        except OSError:
            return ""


_KEY_ALGORITHMS = {"ed25519": "ssh-ed25519", "ecdsa": "ecdsa-sha2-"}


def cloud_config_keys(
    user_data: bytes | None,
) -> tuple[dict[str, tuple[str, str | None]], list[str]]:
    """The host key pairs (type -> private, public or None) that a ``#cloud-config``
    user data gives in ``ssh_keys``, as cloud-init's ssh module reads them, and what it
    says of what it ignores (user data is anyone's: nothing in it is trusted)."""
    if not user_data or not user_data.startswith(b"#cloud-config"):
        return {}, []
    # Here, not at the top: the library imports this module without the `local` extra.
    import yaml  # type: ignore[import-untyped]

    try:
        config = yaml.safe_load(user_data.decode())
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        return {}, [f"user data is not valid cloud-config: {str(e).splitlines()[0]}"]
    if not isinstance(config, dict) or "ssh_keys" not in config:
        return {}, []
    keys = config["ssh_keys"]
    if not isinstance(keys, dict):
        return {}, ["ssh_keys is not a mapping: ignored"]
    found: dict[str, tuple[str, str | None]] = {}
    notes: list[str] = []
    for name, value in keys.items():
        kind, _, part = str(name).rpartition("_")
        if kind not in _HOST_KEY_TYPES or part not in ("private", "public"):
            notes.append(f"ssh_keys: skipping unknown ssh key type {str(name)[:40]!r}")
            continue
        if not isinstance(value, str) or len(value) > 16384:
            notes.append(f"ssh_keys: {name} is not a key: ignored")
            continue
    for kind in _HOST_KEY_TYPES:
        private, public = keys.get(f"{kind}_private"), keys.get(f"{kind}_public")
        if isinstance(private, str) and len(private) <= 16384:
            ok_public = public if isinstance(public, str) and len(public) <= 16384 else None
            found[kind] = (private, ok_public)
    return found, notes


def _ssh_banner(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=1.0) as s:
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def _listens(pid: int, address: str, port: int) -> bool:
    """Whether a socket of ``pid``'s network namespace listens on ``address:port``."""
    want = f"{socket.htonl(int(ipaddress.IPv4Address(address))):08X}:{port:04X}"
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == want and line.split()[3] == "0A" for line in lines)


def _disk_gid() -> int:
    try:
        return grp.getgrnam("disk").gr_gid
    except KeyError:
        return 0
