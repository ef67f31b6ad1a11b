"""The one exception hierarchy of asyncstage.

Every error the library raises derives from :class:`AsyncstageError`.
Errors of the layers below (asyncssh, botocore, subprocesses) never reach the
caller raw: they are wrapped in one of these, with the original kept as
``__cause__`` and the server, volume or host they concern named in the message.

::

    AsyncstageError
    ├── InvalidArgument            bad input, found before anything was changed
    │   ├── BadSize
    │   ├── BadFstype
    │   ├── MountPointRefused
    │   ├── ZoneMismatch
    │   ├── NameTaken
    │   ├── InvalidName            a name or login user name that breaks the rules
    │   ├── PathError              a transfer path that cannot be resolved
    │   └── DestinationNotEmpty    a restore into a directory that has files
    ├── NotFound
    │   ├── UnknownServer
    │   ├── UnknownVolume
    │   ├── UnknownSnapshot
    │   ├── UnknownImage           also an EC2Error (code ``InvalidAMIID.NotFound``)
    │   └── NoLocalCloud           ``--local``, and no ``asyncstage local up`` daemon runs
    ├── BackupInProgress           another run of the backup holds its lease (named)
    ├── HookFailed                 a backup's pre/post hook failed or timed out (on_error="fail")
    ├── WaitTimeout                what was awaited, and its last state
    ├── EC2Error                   an EC2 API call failed (code, operation)
    │   ├── InsufficientCapacity   no capacity for an instance type in a zone (both named)
    │   └── PermissionDenied       IAM refused the call (``UnauthorizedOperation``); names
    │                              the missing permission (``ec2:RunInstances``)
    ├── FleetError                 an ExceptionGroup: some servers of a fleet failed;
    │                              ``succeeded`` keeps the others
    ├── ServerNotRunning           a server with no address (stopped): start it first
    ├── SSHError                   anything over ssh; names the host
    │   ├── ConnectError
    │   │   ├── ServerUnreachable  never answered ssh (state, console tail, port 22)
    │   │   ├── JumpHostError      the jump host failed, or refused the tunnel (both named)
    │   │   └── NoRoute            no network path as set up (no public address and no
    │   │                          jump host; a cross-VPC leg without public addresses)
    │   ├── HostKeyMismatch
    │   ├── HostKeyUnverified      no fingerprints on the console in time (policy strict)
    │   ├── CommandFailed          command, exit status, signal, stdout, stderr
    │   ├── CommandTimeout
    │   └── ConnectionLost         dropped while a command ran (it may have completed)
    ├── VolumeError
    │   ├── VolumeMounted          an operation that needs it unmounted
    │   ├── VolumeNotMounted
    │   └── VolumeInUse
    ├── TransferError
    │   ├── RsyncError             rsync's exit code and message
    │   ├── VerifyFailed           checksums of source and destination differ
    │   └── RestoreVerifyFailed    restored files differ from the backup's manifest
    └── MissingDependency          a program is missing here or on a server (transfers,
                                   local cloud); names the Debian package to install

The local cloud's own errors (it could not start, it needs root ...) form a tree of their
own in :mod:`asyncstage.localcloud.errors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict, Unpack

__all__ = [
    "AsyncstageError",
    "BackupInProgress",
    "BadFstype",
    "BadSize",
    "CommandFailed",
    "CommandTimeout",
    "ConnectError",
    "ConnectionLost",
    "DestinationNotEmpty",
    "EC2Error",
    "FleetError",
    "HookFailed",
    "HostKeyMismatch",
    "HostKeyUnverified",
    "InsufficientCapacity",
    "InvalidArgument",
    "InvalidName",
    "JumpHostError",
    "MissingDependency",
    "MountPointRefused",
    "NameTaken",
    "NoLocalCloud",
    "NoRoute",
    "NotFound",
    "PathError",
    "PermissionDenied",
    "RestoreVerifyFailed",
    "RsyncError",
    "SSHError",
    "ServerNotRunning",
    "ServerUnreachable",
    "TransferError",
    "UnknownImage",
    "UnknownServer",
    "UnknownSnapshot",
    "UnknownVolume",
    "VerifyFailed",
    "VolumeError",
    "VolumeInUse",
    "VolumeMounted",
    "VolumeNotMounted",
    "WaitTimeout",
    "ZoneMismatch",
]


class AsyncstageError(Exception):
    """Root of every error raised by asyncstage."""


# -- bad input ---------------------------------------------------------------


class InvalidArgument(AsyncstageError, ValueError):
    """An argument was rejected before anything was changed."""


class BadSize(InvalidArgument):
    """A volume size that is not a positive whole number of GiB, or too small."""


class BadFstype(InvalidArgument):
    """A filesystem type that asyncstage cannot make or mount."""


class MountPointRefused(InvalidArgument):
    """A mount point over an essential part of the system (``/``, ``/usr`` ...)."""


class ZoneMismatch(InvalidArgument):
    """A volume and a server in different availability zones."""


class NameTaken(InvalidArgument):
    """A new server or volume was asked for with a name already in use."""


class InvalidName(InvalidArgument):
    """A server, volume, backup or login user name breaks the naming rules."""


class PathError(InvalidArgument):
    """A transfer path that cannot be parsed or resolved."""


class DestinationNotEmpty(InvalidArgument):
    """A restore into a directory that already holds files (``overwrite`` not given)."""


# -- lookup ------------------------------------------------------------------


class NotFound(AsyncstageError, LookupError):
    """Something named or identified does not exist."""


class UnknownServer(NotFound):
    """No managed server with that name or instance id."""


class UnknownVolume(NotFound):
    """No managed volume with that name or volume id."""


class UnknownSnapshot(NotFound):
    """No snapshot with that id or name."""


class NoLocalCloud(NotFound):
    """No local cloud daemon (``asyncstage local up``) runs in the directory looked in."""


# -- waiting -----------------------------------------------------------------


class BackupInProgress(AsyncstageError):
    """Another run of the same backup holds its lease (or took it over from this one).

    ``run_id`` and ``controller`` (``host:pid:start``) name the other run when known."""

    def __init__(self, message: str, *, run_id: str = "", controller: str = "") -> None:
        super().__init__(message)
        self.run_id = run_id
        self.controller = controller


class HookFailed(AsyncstageError):
    """A backup's ``pre`` or ``post`` hook with ``on_error="fail"`` failed or timed out."""


class WaitTimeout(AsyncstageError, TimeoutError):
    """A wait ran out of time; says what was awaited and its last state."""

    def __init__(self, what: str, *, timeout: float, last_state: str | None = None) -> None:
        self.what = what
        self.timeout = timeout
        self.last_state = last_state
        msg = f"timed out after {timeout:g}s waiting for {what}"
        if last_state is not None:
            msg += f" (last state: {last_state})"
        super().__init__(msg)


# -- EC2 ---------------------------------------------------------------------


class EC2Error(AsyncstageError):
    """An EC2 API call failed; ``code`` is EC2's error code (``InvalidVolume.NotFound`` ...)."""

    def __init__(self, message: str, *, code: str | None = None, operation: str | None = None):
        self.code = code
        self.operation = operation
        super().__init__(message)


class InsufficientCapacity(EC2Error):
    """EC2 has no capacity for ``instance_type`` in ``zone`` (``InsufficientInstanceCapacity``
    from RunInstances or StartInstances); ``zone`` is None when EC2 did not name one.

    A launch may try another zone or instance type; a stopped server cannot move (its
    volumes are in its zone): start it again later.
    """

    def __init__(
        self,
        message: str,
        *,
        zone: str | None,
        instance_type: str | None,
        operation: str | None = None,
    ) -> None:
        super().__init__(message, code="InsufficientInstanceCapacity", operation=operation)
        self.zone = zone
        self.instance_type = instance_type


class PermissionDenied(EC2Error):
    """IAM refused an EC2 call (``UnauthorizedOperation``): the credentials lack
    ``permission`` (``ec2:RunInstances`` ...). Nothing was changed by the refused call."""

    def __init__(self, message: str, *, permission: str, operation: str | None = None) -> None:
        super().__init__(message, code="UnauthorizedOperation", operation=operation)
        self.permission = permission


class UnknownImage(NotFound, EC2Error):
    """No image with that id, or none matching a name pattern (also an :class:`EC2Error`,
    code ``InvalidAMIID.NotFound``, as EC2 reports it)."""


# -- fleets ------------------------------------------------------------------


class FleetError(ExceptionGroup[Exception], AsyncstageError):
    """Some servers of a fleet operation failed (an ``ExceptionGroup``, use ``except*``).

    Each sub-exception names its server; ``succeeded`` lists the servers for which
    the operation worked (they are registered with the manager, never leaked).
    """

    succeeded: list[Any]

    def __new__(
        cls, message: str, exceptions: Sequence[Exception], *, succeeded: Sequence[Any] = ()
    ) -> FleetError:
        self = super().__new__(cls, message, exceptions)
        self.succeeded = list(succeeded)
        return self

    def __init__(
        self, message: str, exceptions: Sequence[Exception], *, succeeded: Sequence[Any] = ()
    ) -> None:
        super().__init__(message, exceptions)

    def derive(self, excs: Sequence[Exception]) -> FleetError:  # type: ignore[override]
        return FleetError(self.message, excs, succeeded=self.succeeded)


# -- servers -----------------------------------------------------------------


class ServerNotRunning(AsyncstageError):
    """A server has no address to reach it at (stopped or terminated): start it first."""


# -- ssh ---------------------------------------------------------------------


class SSHError(AsyncstageError):
    """A failure over ssh; ``host`` names the host it concerns."""

    def __init__(self, message: str, *, host: str) -> None:
        self.host = host
        super().__init__(f"{host}: {message}")


class ConnectError(SSHError):
    """The ssh connection could not be opened or authenticated."""


class _Unreachable(TypedDict, total=False):
    """What may be known of a server that never answered ssh (see ServerUnreachable)."""

    state: str | None
    state_reason: str | None
    console_tail: str | None
    port_open: bool | None


class ServerUnreachable(ConnectError):
    """A server that never answered ssh within its timeout.

    For a server (not a plain host) it says why it may be: its EC2 ``state`` and
    ``state_reason``, the tail of its console (``console_tail``) and whether anything
    answered on its ssh port (``port_open``); each None when unknown.
    """

    def __init__(self, message: str, *, host: str, **known: Unpack[_Unreachable]) -> None:
        self.state = state = known.get("state")
        self.state_reason = state_reason = known.get("state_reason")
        self.console_tail = console_tail = known.get("console_tail")
        self.port_open = port_open = known.get("port_open")
        facts = []
        if state is not None:
            facts.append(f"state {state}" + (f" ({state_reason})" if state_reason else ""))
        if port_open is not None:
            facts.append("port 22 answered" if port_open else "nothing answered on port 22")
        if facts:
            message += "; " + ", ".join(facts)
        if console_tail is not None:
            message += "; console: " + ("\n" + console_tail if console_tail.strip() else "(empty)")
        super().__init__(message, host=host)


class JumpHostError(ConnectError):
    """A host reached through a jump host (bastion) could not be: the jump host itself
    failed (``jump`` names it), or it could not open the tunnel to the host."""

    def __init__(self, message: str, *, host: str, jump: str) -> None:
        self.jump = jump
        super().__init__(message, host=host)


class NoRoute(ConnectError):
    """No network path to a host as things are set up, found before connecting: a server
    without a public address and no jump host, or a server -> server leg across VPCs or
    regions where one side has no public address. The message names the fix."""


class HostKeyMismatch(SSHError):
    """The host presented a key other than the pinned or expected one."""

    def __init__(
        self,
        message: str,
        *,
        host: str,
        presented: str | None = None,
        expected: Sequence[str] = (),
    ) -> None:
        self.presented = presented
        self.expected = tuple(expected)
        super().__init__(message, host=host)


class HostKeyUnverified(SSHError):
    """The host key could not be verified before the first contact: the console showed
    no host key fingerprints within ``waited`` seconds, and the host key policy is
    ``"strict"`` (``Manager(host_key_policy="accept-new")`` pins the first key instead)."""

    def __init__(self, message: str, *, host: str, waited: float) -> None:
        self.waited = waited
        super().__init__(message, host=host)


def _tail(text: str, lines: int = 10) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class CommandFailed(SSHError):
    """A remote command exited non-zero or was killed by a signal.

    Carries the command line, ``exit_status``, ``signal``, ``stdout`` and
    ``stderr`` (text, or bytes for binary commands).
    """

    def __init__(
        self,
        *,
        host: str,
        command: str,
        exit_status: int | None,
        signal: str | None = None,
        stdout: str | bytes = "",
        stderr: str | bytes = "",
    ) -> None:
        self.command = command
        self.exit_status = exit_status
        self.signal = signal
        self.stdout = stdout
        self.stderr = stderr
        how = f"signal {signal}" if signal else f"exit status {exit_status}"
        err = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        msg = f"command failed with {how}: {command}"
        if err.strip():
            msg += "\n" + _tail(err)
        super().__init__(msg, host=host)


class CommandTimeout(SSHError):
    """A remote command did not finish within its timeout (it was stopped)."""

    def __init__(self, *, host: str, command: str, timeout: float) -> None:
        self.command = command
        self.timeout = timeout
        super().__init__(f"command timed out after {timeout:g}s: {command}", host=host)


class ConnectionLost(SSHError):
    """The connection dropped while a command ran; it may or may not have completed.

    The command is never re-run automatically; the next command opens a new connection.
    """


# -- volumes -----------------------------------------------------------------


class VolumeError(AsyncstageError):
    """A volume is not in the state an operation needs."""


class VolumeMounted(VolumeError):
    """The volume is mounted, and the operation needs it unmounted (dd, detach)."""


class VolumeNotMounted(VolumeError):
    """The volume is not mounted where the operation needs it."""


class VolumeInUse(VolumeError):
    """The volume is attached or busy and cannot be detached or deleted now."""


# -- transfers ---------------------------------------------------------------


class TransferError(AsyncstageError):
    """An rsync or dd transfer failed; the destination may be partial."""


class RsyncError(TransferError):
    """rsync exited non-zero; ``exit_code`` and rsync's own ``message``."""

    def __init__(self, message: str, *, exit_code: int, stderr: str = "") -> None:
        self.exit_code = exit_code
        self.stderr = stderr
        super().__init__(message)


class VerifyFailed(TransferError):
    """The checksums of source and destination differ after a copy."""

    def __init__(self, message: str, *, source: str, destination: str) -> None:
        self.source_digest = source
        self.destination_digest = destination
        super().__init__(message)


class RestoreVerifyFailed(TransferError):
    """A restore wrote its files, and they differ from the backup's manifest (or the
    manifest could not be trusted). ``findings`` is the check's result as a dict:
    ``manifest``, ``missing``, ``changed``, ``extra``, ``damaged`` and ``counts``."""

    def __init__(self, message: str, *, findings: dict[str, Any]) -> None:
        self.findings = findings
        super().__init__(message)


# -- missing programs -------------------------------------------------------


class MissingDependency(AsyncstageError):
    """A program a transfer or the local cloud needs is missing (here or on a server);
    names the Debian package to install.

    Not a :class:`~asyncstage.localcloud.errors.LocalCloudError`: transfers on AWS raise it too.
    """

    def __init__(self, program: str, package: str) -> None:
        self.program = program
        self.package = package
        super().__init__(
            f"{program} is not installed: install the Debian package '{package}' "
            f"(apt-get install {package}), or run 'make deps'"
        )


_MOVED = {"LocalCloudError", "NeedsRoot", "StateDirInUse", "NoDeviceIsolation"}
"""The local cloud's errors, now in :mod:`asyncstage.localcloud.errors`; their old names
here still import (without loading the local cloud until one is asked for)."""


def __getattr__(name: str) -> type[Exception]:
    if name in _MOVED:
        import asyncstage.localcloud.errors as moved

        found: type[Exception] = getattr(moved, name)
        return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
