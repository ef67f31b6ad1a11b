"""The ssh layer: run commands on a remote host over one shared asyncssh connection.

:class:`SSHHost` is the handle a :class:`~asyncstage.Server` delegates to. It opens
one connection per host on first use, shares it between every command, and opens
a new one when it dropped (a command that may have started is never re-run).
Channels are queued below the server's ``MaxSessions`` so that any number of
concurrent commands simply wait their turn.

Host keys are always verified against an OpenSSH-format ``known_hosts`` file of
our own (:class:`KnownHosts`), which OpenSSH's ``ssh`` (used by rsync and
:meth:`SSHHost.shell`) reads too:

* ``expected_fingerprints`` given: the key must match one of them; it is then
  pinned (replacing a stale pin for that address and port).
* otherwise a pinned key must match (:class:`~asyncstage.errors.HostKeyMismatch`);
* with no pin, policy ``"accept-new"`` pins the first key seen, ``"strict"``
  refuses it.

Command forms: one ``str`` (or ``bytes``) is a shell command line, run as is;
several arguments are an argv, each quoted with :func:`quote` so that the remote
(POSIX) shell interprets none of them. Command lines and OpenSSH argv are built
by :mod:`asyncstage.shell` (``quote`` and ``command_line`` are re-exported here).

The modules: :mod:`~asyncstage.ssh.host` (the handle),
:mod:`~asyncstage.ssh.connection` (the shared connection and its channels),
:mod:`~asyncstage.ssh.streams` and :mod:`~asyncstage.ssh.sinks` (a command's input
and output), :mod:`~asyncstage.ssh.known_hosts` (host keys),
:mod:`~asyncstage.ssh.openssh` (OpenSSH children and their options) and
:mod:`~asyncstage.ssh.ciphers`.
"""

from asyncstage.shell import Command, command_line, quote
from asyncstage.ssh.host import HopMode, SSHHost
from asyncstage.ssh.known_hosts import HostKeyPolicy, KnownHosts
from asyncstage.ssh.sinks import CommandResult
from asyncstage.ssh.streams import CommandReader, CommandWriter

__all__ = [
    "Command",
    "CommandReader",
    "CommandResult",
    "CommandWriter",
    "HopMode",
    "HostKeyPolicy",
    "KnownHosts",
    "SSHHost",
    "command_line",
    "quote",
]
