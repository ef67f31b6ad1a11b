"""Running things for a transfer: local processes, work dirs and streamed commands on hosts.

Every work dir on a host carries an owner record: the controller process that
made it (:func:`controller_id`) and when it becomes stale, so that a later
transfer can sweep what a killed controller left behind
(:func:`asyncstage.transfer.link.sweep_stale_keys`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import Process

from asyncstage import remote
from asyncstage.errors import CommandFailed, MissingDependency
from asyncstage.transfer.base import cleanup

if TYPE_CHECKING:
    from asyncstage.ssh import SSHHost

_log = logging.getLogger("asyncstage.transfer")

STALE_AFTER = 6 * 3600
"""Seconds after which a temporary key expires (``expiry-time``) and an idle work dir
of a controller that cannot be checked is stale."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "-"


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@functools.cache
def controller_id() -> str:
    """This controller process: ``host/boot id/pid/start time`` (no spaces)."""
    return "/".join(
        (socket.gethostname(), _boot_id(), str(os.getpid()), _start_time(os.getpid()) or "-")
    )


def controller_alive(ident: str) -> bool | None:
    """Whether the controller ``ident`` still runs; None when it ran on another machine."""
    parts = ident.split("/")
    if len(parts) != 4 or parts[0] != socket.gethostname() or parts[1] != _boot_id():
        return None
    try:
        pid = int(parts[2])
    except ValueError:
        return None
    return _start_time(pid) == parts[3]


def owner_record() -> str:
    """The owner record of a new work dir (JSON)."""
    return json.dumps({"controller": controller_id(), "expires": time.time() + STALE_AFTER})


async def helper(host: SSHHost, sudo: bool, *args: str) -> dict[str, Any]:
    """Run the rsync helper on ``host`` and return its JSON answer."""
    return await remote.run_json(host, sudo, "rsynchelper", *args)


async def stream_solo(
    host: SSHHost,
    sudo: bool,
    argv: Sequence[str],
    on_data: Callable[[bytes], Awaitable[object]],
) -> None:
    """Run ``argv`` on ``host`` in a process group recorded in a work dir of its own,
    feeding its stdout to ``on_data``; raises CommandFailed.

    One remote command (the helper's ``solo``): it makes the work dir, runs ``argv``
    and removes the dir once ``argv`` has ended, where a work dir of its own, the
    command, and the dir's cleanup would take three, each an interpreter's start. The
    controller names the dir, so that when it stops waiting (cancelled, or the
    connection lost) a cleanup stops the group without an answer from the helper.
    """
    token = secrets.token_hex(16)
    command = remote.argv("rsynchelper", "solo", token, owner_record(), *argv)
    try:
        async with host.scmd_read(*command, encoding=None, sudo=sudo) as out:
            while chunk := await out.read(65536):
                await on_data(chunk)
    except CommandFailed:
        raise  # it ended: the helper removed its dir
    except BaseException as e:
        await cleanup(
            functools.partial(helper, host, sudo, "cleanup", token),
            f"removing work dir {token}",
            host.label,
            e,
            required=False,
        )
        raise


async def stream(
    host: SSHHost,
    sudo: bool,
    wd: str,
    argv: Sequence[str],
    on_data: Callable[[bytes], Awaitable[object]],
) -> None:
    """Run ``argv`` on ``host`` in a process group recorded in ``wd`` (so a cleanup
    can stop it), feeding its stdout to ``on_data``; raises CommandFailed."""
    pidfile = f"{wd}/{secrets.token_hex(4)}.pid"
    async with host.scmd_read(
        *remote.argv("rsynchelper", "run", pidfile, *argv), encoding=None, sudo=sudo
    ) as out:
        while chunk := await out.read(65536):
            await on_data(chunk)


async def run_local(
    argv: Sequence[str], on_data: Callable[[bytes], Awaitable[object]]
) -> tuple[int, str]:
    """Run a local command in its own process group; stop the group when cancelled."""
    _log.debug("running %s", argv)
    try:
        proc: Process = await anyio.open_process(
            list(argv), stdin=subprocess.DEVNULL, start_new_session=True
        )
    except OSError as e:
        raise MissingDependency(argv[0], argv[0]) from e
    errors: list[bytes] = []

    async def pump_out() -> None:
        assert proc.stdout is not None
        async for chunk in proc.stdout:
            await on_data(chunk)

    async def pump_err() -> None:
        assert proc.stderr is not None
        async for chunk in proc.stderr:
            errors.append(chunk)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump_out)
            tg.start_soon(pump_err)
        code = await proc.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _stop_local(proc)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await proc.aclose()
    return code, b"".join(errors).decode("utf-8", "replace")


async def _stop_local(proc: Process) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with anyio.move_on_after(3.0):
            await proc.wait()


class LineFeeder:
    """Splits a byte stream into lines for ``on_line``."""

    def __init__(self, on_line: Callable[[str], Awaitable[object]]) -> None:
        self.on_line = on_line
        self.buffer = b""

    async def feed(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            await self.on_line(line.decode("utf-8", "replace"))

    async def close(self) -> None:
        if self.buffer:
            await self.on_line(self.buffer.decode("utf-8", "replace"))
            self.buffer = b""
