"""The one place that builds command lines: quoting, ``sudo`` prefixes, OpenSSH argv.

Pure functions, no I/O: the ssh layer, the transfers and the benchmarks all
compose what they run on a remote shell or hand to OpenSSH ``ssh`` here.

* :func:`quote` / :func:`command_line`: one ``str`` (or ``bytes``) is a shell
  command line and is kept as is; several arguments are an argv, each quoted so
  that a POSIX shell interprets none of them.
* :func:`sudo_line` / :func:`sudo_argv`: ``sudo -n --`` (never prompts).
* :func:`openssh_options` / :func:`openssh_argv`: options for OpenSSH ``ssh``
  with strict host key checking against our own known_hosts and the host's own
  timeouts. The login user is passed as ``-l user`` and ``--`` ends the options
  before the host, so neither can be read as an option.
* :func:`check_login_user`: login user names are POSIX names
  (:class:`~asyncstage.errors.InvalidName` otherwise).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence

from asyncstage.errors import InvalidArgument, InvalidName

__all__ = [
    "Command",
    "check_address",
    "check_login_user",
    "command_line",
    "known_hosts_pattern",
    "openssh_argv",
    "openssh_options",
    "quote",
    "rsync_path",
    "sudo_argv",
    "sudo_line",
    "user_at_host",
]

Command = str | bytes | os.PathLike[str] | os.PathLike[bytes]

SUDO = ("sudo", "-n", "--")
"""Every privileged command: ``-n`` never prompts for a password (fails instead)."""

BATCH = ("-o", "BatchMode=yes")
"""The OpenSSH option of every non-interactive ``ssh`` (never prompts)."""

_LOGIN_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
LOGIN_USER_RULE = (
    "a login user name starts with a letter or '_', then up to 31 letters, digits, '_', '.' or '-'"
)


def _text(arg: Command) -> str:
    value = os.fspath(arg)
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def quote(arg: Command) -> str:
    """Quote one argument for a POSIX shell (str, bytes or os.PathLike)."""
    return shlex.quote(_text(arg))


def command_line(*cmd: Command) -> str:
    """The shell command line for ``cmd``.

    One ``str`` or ``bytes`` argument is a shell command line and is returned as
    is; otherwise (several arguments, or one path) each argument is quoted.
    """
    if not cmd:
        raise InvalidArgument("no command given")
    if len(cmd) == 1 and isinstance(cmd[0], str | bytes):
        line = _text(cmd[0])
    else:
        line = " ".join(quote(a) for a in cmd)
    if not line.strip():
        raise InvalidArgument("empty command line")
    return line


def sudo_line(cmd: Sequence[Command], sudo: bool = True) -> str:
    """The command line running ``cmd`` (an argv or one shell line), as root when ``sudo``.

    A shell line runs under ``sudo -n -- sh -c`` so that its redirections and
    pipes run as root too.
    """
    line = command_line(*cmd)
    if not sudo:
        return line
    if len(cmd) == 1 and isinstance(cmd[0], str | bytes):
        return command_line(*SUDO, "sh", "-c", line)
    return " ".join(SUDO) + " " + line


def sudo_argv(argv: Sequence[str], sudo: bool = True) -> list[str]:
    """``argv`` behind ``sudo -n --`` when ``sudo``."""
    return [*SUDO, *argv] if sudo else list(argv)


def rsync_path(sudo: bool) -> list[str]:
    """The ``--rsync-path`` option that runs the remote rsync as root (none otherwise)."""
    return ["--rsync-path=sudo -n rsync"] if sudo else []


def check_login_user(name: str) -> str:
    """``name`` when it is a valid POSIX login user name, else :class:`InvalidName`."""
    if not isinstance(name, str) or not _LOGIN_USER.fullmatch(name):
        raise InvalidName(f"{name!r} is not a valid login user name: {LOGIN_USER_RULE}")
    return name


def check_address(address: str) -> str:
    """``address`` when it can be handed to ssh as a host (no option, no space, no ``@``)."""
    if (
        not isinstance(address, str)
        or not address
        or address.startswith("-")
        or any(c.isspace() or c in "@/\\'\"`$;" or ord(c) < 32 for c in address)
    ):
        raise InvalidArgument(f"{address!r} is not a host address ssh can be given")
    return address


def user_at_host(user: str, address: str) -> str:
    """``user@address`` (``user@[v6]`` for an IPv6 address), as rsync takes it."""
    check_login_user(user)
    check_address(address)
    return f"{user}@[{address}]" if ":" in address else f"{user}@{address}"


def known_hosts_pattern(address: str, port: int) -> str:
    """How known_hosts names ``address`` at ``port``."""
    return address if port == 22 else f"[{address}]:{port}"


def _seconds(value: float) -> str:
    return str(max(1, round(value)))


def openssh_options(
    *,
    port: int,
    known_hosts: str,
    client_keys: Sequence[str] = (),
    connect_timeout: float = 30.0,
    keepalive_interval: float = 15.0,
    batch: bool = True,
    bind_address: str | None = None,
    algorithms: Sequence[str] = (),
) -> list[str]:
    """Options for OpenSSH ``ssh``: no config file, our keys only, strict host key
    checking against ``known_hosts`` alone, the given timeouts; ``algorithms`` are
    more ``-o`` options (algorithm preferences)."""
    if any(c.isspace() for c in known_hosts):
        known_hosts = '"' + known_hosts + '"'
    opts = ["-F", "/dev/null", "-p", str(int(port))]
    for key in client_keys:
        opts += ["-i", key]
    if client_keys:
        opts += ["-o", "IdentitiesOnly=yes"]
    if batch:
        opts += BATCH
    if bind_address:
        opts += ["-b", check_address(bind_address)]
    return [
        *opts,
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "CheckHostIP=no",
        "-o",
        f"ConnectTimeout={_seconds(connect_timeout)}",
        "-o",
        f"ServerAliveInterval={_seconds(keepalive_interval)}",
        "-o",
        "LogLevel=ERROR",
        *algorithms,
    ]


def openssh_argv(
    options: Sequence[str], user: str, address: str, *cmd: Command, ssh: str = "ssh"
) -> list[str]:
    """``[ssh, *options, "-l", user, "--", address, line]`` running ``cmd`` (a shell if none).

    ``--`` ends ssh's options before the host, so that nothing after it (the
    host, the command line) is read as an option.
    """
    argv = [ssh, *options, "-l", check_login_user(user), "--", check_address(address)]
    if cmd:
        argv.append(command_line(*cmd))
    return argv
