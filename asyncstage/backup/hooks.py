"""Consistency hooks: a ``pre`` command before a source is copied, a ``post`` after.

``pre`` quiesces an application (``fsfreeze -f /data``, a database's backup-start), ``post``
lets it go again. Each has a timeout and ``on_error``: ``"fail"`` fails the backup,
``"continue"`` goes on with a crash-consistent copy. Once ``pre`` has been started,
``post`` always runs: after success, failure, a timeout and cancellation (Ctrl-C), shielded
and within its own timeout. A backup is marked ``application-consistent`` only when every
source had a ``pre`` hook that succeeded.

Hooks run where their source lives: on a managed server (as root, over ssh), or on this
machine for local paths (``sh -c``, never with a shell's quoting of ours).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from asyncstage.errors import CommandFailed, CommandTimeout, HookFailed, InvalidArgument
from asyncstage.server import Server

__all__ = ["Hook", "HookFailed", "Hooked", "run_hook"]

log = logging.getLogger("asyncstage.backup")

OnError = Literal["fail", "continue"]


@dataclass(frozen=True)
class Hook:
    """One hook command (a shell command line) with its timeout and error policy."""

    command: str
    timeout: float = 60.0
    on_error: OnError = "fail"

    def __post_init__(self) -> None:
        if not isinstance(self.command, str) or not self.command.strip():
            raise InvalidArgument("hook: the command must be a non-empty string")
        if "\0" in self.command:
            raise InvalidArgument("hook: the command may not contain NUL")
        if not (isinstance(self.timeout, int | float) and 0 < self.timeout <= 86400):
            raise InvalidArgument(f"hook: timeout must be in (0, 86400] s, not {self.timeout!r}")
        if self.on_error not in ("fail", "continue"):
            raise InvalidArgument(
                f"hook: on_error must be 'fail' or 'continue', not {self.on_error!r}"
            )


@dataclass(frozen=True)
class Hooked:
    """A backup source with its ``pre`` and ``post`` hooks (either may be None):
    ``Hooked("db:/var/lib/pg", pre=Hook("pg-start"), post=Hook("pg-stop"))``."""

    source: Any
    pre: Hook | None = None
    post: Hook | None = None


async def _run_here(hook: Hook) -> None:
    """``sh -c`` on this machine in a session of its own, whose whole process group is
    killed on a timeout or a cancellation (a ``sleep`` under the shell too)."""
    with tempfile.TemporaryFile() as err:
        process = await anyio.open_process(
            ["sh", "-c", hook.command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        try:
            with anyio.fail_after(hook.timeout):
                status = await process.wait()
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with anyio.CancelScope(shield=True):
                    await process.wait()
        if status != 0:
            err.seek(0)
            text = err.read()[-500:].decode(errors="replace").strip()
            raise RuntimeError(f"exit status {status}: {text}")


async def run_hook(which: str, hook: Hook, server: Server | None) -> bool:
    """Run one hook on ``server`` (None: here); True when it succeeded.

    A failure or timeout raises :class:`HookFailed` with ``on_error="fail"``, else is logged.
    """
    where = server.name if server is not None else "this machine"
    try:
        if server is not None:
            await server.scmd("sh", "-c", hook.command, sudo=True, timeout=hook.timeout)
        else:
            await _run_here(hook)
    except (CommandFailed, CommandTimeout, RuntimeError, TimeoutError) as e:
        text = f"{which} hook on {where} failed: {hook.command!r}: {e}"
        if isinstance(e, TimeoutError):
            text = f"{which} hook on {where} timed out after {hook.timeout:g}s: {hook.command!r}"
        if hook.on_error == "fail":
            raise HookFailed(text) from e
        log.warning("%s (on_error=continue)", text)
        return False
    return True
