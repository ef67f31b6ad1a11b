"""Working inside the local cloud's network namespaces without a process per step.

Booting a fleet on the cloud's network loads many small nftables scripts (each
instance's security groups, again whenever a group's members change, and its NAT
entries). A process per script (``ip netns exec ... nft -f -``) costs milliseconds of
fork and exec each, which add up to seconds for fifty instances on a busy machine.
:func:`nft` loads a script with ``libnftables`` (the library ``nft`` itself is built
on) from a short-lived thread that entered the namespace, and falls back to the
``nft`` program where the library is missing.

All functions block; the engine calls them from its worker threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from asyncstage.errors import MissingDependency
from asyncstage.localcloud._system import which
from asyncstage.localcloud.errors import LocalCloudError

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_NFT_TIMEOUT = 30.0
_T = TypeVar("_T")


def in_netns(netns: str, job: Callable[[], _T]) -> _T:
    """Run ``job`` in a short-lived thread that entered ``netns``.

    A network namespace belongs to a thread (``setns``): sockets ``job`` makes stay in
    ``netns`` for their whole life, wherever they are used afterwards.
    """
    result: list[_T] = []
    failure: list[BaseException] = []

    def enter() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(job())
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)

    thread = threading.Thread(target=enter, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class _LibNft:
    """The few calls of ``libnftables`` a script needs (one context per script)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        # the library keeps some state of its own (its parser's, its caches'): one
        # script at a time in this process
        self.lock = threading.Lock()

    def run(self, script: str) -> str:
        """Load ``script`` in the calling thread's namespace; its error text ("": none)."""
        lib = self._lib
        with self.lock:
            ctx = lib.nft_ctx_new(0)
            if not ctx:
                return "nft_ctx_new failed"
            try:
                lib.nft_ctx_buffer_output(ctx)
                lib.nft_ctx_buffer_error(ctx)
                if lib.nft_run_cmd_from_buffer(ctx, script.encode()) == 0:
                    return ""
                error = lib.nft_ctx_get_error_buffer(ctx) or b""
                return error.decode(errors="replace").strip() or "nft failed"
            finally:
                lib.nft_ctx_free(ctx)


_lib_state: list[_LibNft | None] = []  # [] before the first look, [None]: no library


def _libnft() -> _LibNft | None:
    if not _lib_state:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            _lib_state.append(_LibNft(ctypes.CDLL(name)))
        except (OSError, AttributeError):
            _lib_state.append(None)
    return _lib_state[0]


def nft(netns: str, script: str, what: str) -> None:
    """Load an nftables ``script`` into network namespace ``netns`` (one transaction)."""
    lib = _libnft()
    if lib is not None:
        try:
            error = in_netns(netns, lambda: lib.run(script))
        except OSError as e:  # no such namespace (any more)
            raise LocalCloudError(f"{what} in {netns}: {e}") from e
        if error:
            raise LocalCloudError(f"{what} in {netns} failed: {error}")
        return
    try:
        program = which("nft")
    except MissingDependency:
        raise MissingDependency("nft", "nftables") from None
    argv = [which("ip"), "netns", "exec", netns, program, "-f", "-"]
    try:
        done = subprocess.run(
            argv,
            input=script,
            capture_output=True,
            text=True,
            check=False,
            timeout=_NFT_TIMEOUT,
            env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LocalCloudError(f"{what} in {netns}: {e}") from e
    if done.returncode != 0:
        raise LocalCloudError(f"{what} in {netns} failed: {done.stderr.strip()}")
