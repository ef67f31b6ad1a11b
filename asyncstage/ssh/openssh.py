"""OpenSSH ``ssh`` children: the options that make ``ssh`` (rsync's, an interactive
shell's) connect as our asyncssh connections do, and commands whose stdin or stdout is
a local file, run by ``ssh`` over a master connection so that no Python code touches
the data (see asyncstage/_openssh_stream.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import cast

from asyncstage import _openssh_stream, shell
from asyncstage.errors import ConnectionLost, SSHError
from asyncstage.ssh.ciphers import openssh_preferences
from asyncstage.ssh.connection import KILL_GRACE, Connection, Jump, Target
from asyncstage.ssh.sinks import WRAPPER, CommandResult, Sink

__all__ = ["FileStreams", "openssh_options", "proxy_command", "terminal_emulator", "umask"]


def openssh_options(target: Target, *, batch: bool = True) -> list[str]:
    """Options for OpenSSH ``ssh`` reaching ``target``: its key, port and known_hosts,
    and the key exchange and cipher our asyncssh connections use first; through its
    jump host if it has one (:func:`proxy_command`)."""
    options = shell.openssh_options(
        port=target.port,
        known_hosts=str(target.known_hosts.path),
        client_keys=[str(k) for k in target.client_keys],
        connect_timeout=target.connect_timeout,
        keepalive_interval=target.keepalive_interval,
        batch=batch,
        algorithms=openssh_preferences(),
    )
    if target.jump is not None:
        options += ["-o", f"ProxyCommand={proxy_command(target.jump)}"]
    return options


def proxy_command(jump: Jump) -> str:
    """The ``ProxyCommand`` reaching a host through ``jump``: ``ssh -W %h:%p`` with the
    jump host's own options (its key, known_hosts checked strictly, its own jump host
    in turn), never the user's ssh config. OpenSSH's own ``ProxyJump`` would read the
    jump host's key and host key settings from a config file instead."""
    ssh = shell.command_line("ssh", *jump.openssh_options(), "-l", jump.username)
    # ssh expands %-tokens in the whole line: only ours may be expanded.
    address = shell.quote(shell.check_address(jump.address))
    return f"{ssh.replace('%', '%%')} -W %h:%p -- {address.replace('%', '%%')}"


def umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it too)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def terminal_emulator() -> list[str] | None:
    """The argv prefix that runs a command in a new terminal window, if one is installed."""
    candidates = [os.environ.get("TERMINAL", ""), "x-terminal-emulator", "xterm", "urxvt"]
    for name in candidates:
        if name and shutil.which(name):
            return [name, "-e"]
    for name in ("gnome-terminal", "konsole", "xfce4-terminal"):
        if shutil.which(name):
            return [name, "--wait", "--"] if name == "gnome-terminal" else [name, "-e"]
    return None


class FileStreams:
    """Commands run by OpenSSH ``ssh`` children on local file descriptors, over one
    master connection per host (a new one when what it connects to changed)."""

    def __init__(self, target: Target, conn: Connection) -> None:
        self._target = target
        self._conn = conn
        self.master: _openssh_stream.Master | None = None

    async def run(
        self, ssh: str, command: str, sudo: bool, stdin: int, stdout: int | None
    ) -> CommandResult:
        """Run ``command`` with an ``ssh`` child on these descriptors; ``stdout=None``:
        kept for the result."""
        t = self._target
        options = openssh_options(t)  # AES-GCM first where asyncssh prefers it too

        def argv(extra: list[str], line: str) -> list[str]:
            return shell.openssh_argv([*options, *extra], t.username, t.address, line, ssh=ssh)

        master = await self._master(ssh)
        async with master.sessions:
            mux = await master.options(argv, t.connect_timeout)
            line = _openssh_stream.remote_line(WRAPPER, command)
            return await self._run(argv(mux, line), command, sudo, stdin, stdout)

    async def _master(self, ssh: str) -> _openssh_stream.Master:
        t = self._target
        # The host key verified and pinned our way: ssh checks it strictly.
        host_key = (await self._conn.link()).host_key
        key = (ssh, t.address, t.port, t.username, *t.client_keys)
        key = (*key, str(t.known_hosts.path), host_key, *openssh_options(t))
        if self.master is None or self.master.key != key:
            self.close()
            self.master = _openssh_stream.Master(key, t.max_sessions - 1)
        return self.master

    def close(self) -> None:
        """Stop the master connection (a later command starts a new one)."""
        master, self.master = self.master, None
        if master is not None:
            master.close()

    async def _run(
        self, argv: list[str], command: str, sudo: bool, stdin: int, stdout: int | None
    ) -> CommandResult:
        """Run the ``ssh`` child ``argv`` (running ``command``) to its end: its result."""
        ssh = argv[0]
        label = self._target.label
        out, err = Sink(), Sink(marker=True)

        async def stop_remote(signal: str) -> None:
            if err.pgid is not None:
                with contextlib.suppress(SSHError):
                    await self._conn.kill_pgid(await self._conn.link(), err.pgid, sudo, signal)

        try:
            done = await _openssh_stream.run(
                argv,
                stdin=stdin,
                stdout=stdout,
                out=out,
                err=err,
                err_bytes=lambda: cast(bytes, err.value(None)),
                stop_remote=stop_remote,
                grace=KILL_GRACE,
            )
        except OSError as e:
            raise SSHError(f"could not run {ssh}: {e}", host=label) from e
        stderr = done.stderr.decode("utf-8", "replace")
        if done.status is None or (done.returncode != 0 and done.status == 0):
            why = stderr.strip() or f"ssh exited {done.returncode}"
            if done.started:
                raise ConnectionLost(
                    f"connection lost while running {command!r} ({why}); it may or may not "
                    "have completed",
                    host=label,
                )
            raise SSHError(f"ssh could not run {command!r}: {why}", host=label)
        return CommandResult(command, done.status, None, out.value("utf-8"), stderr)
