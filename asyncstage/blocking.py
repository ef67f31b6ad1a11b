"""The blocking facade: the async API without ``async``, for scripts and shells.

::

    from asyncstage import blocking

    with blocking.LocalCloud() as cloud, cloud.manager() as m:
        s = m.get_server("a")
        print(s.scmd("whoami"))
        with s.scmd_read("ls -l /etc") as f:
            for line in f:
                print(line, end="")
        with s.scmd_write("cat > /tmp/x") as f:
            f.write("hello\\n")

``Manager``, ``Server``, ``Volume`` and ``LocalCloud`` have the names, arguments and
documentation of their async twins (:class:`asyncstage.Manager` ...); each call runs the
async method on one background event loop (an anyio :class:`~anyio.from_thread.BlockingPortal`
in a daemon thread, started on first use) and blocks until it is done. Async servers and
volumes that come back are handed out as their blocking twins (the same twin for the same
object), and blocking objects may be passed wherever the async API takes servers, volumes
or transfer paths. Calls may come from several threads at once; they run concurrently on
the loop.

A ``Manager`` is opened by its constructor and a ``LocalCloud`` started by its; both are
context managers, and whatever is still open when the interpreter exits is closed then
(managers first, applying their ``on_exit``). Ctrl-C during a call cancels the call.

No logic lives here: every method is a twin of an async one (:func:`_twin`), a test
(``tests/test_blocking.py``) fails when a public async method has none.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import io
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    AnyStr,
    Concatenate,
    Generic,
    ParamSpec,
    Self,
    TypedDict,
    TypeVar,
    Unpack,
    overload,
)

import anyio
from anyio.from_thread import BlockingPortal

from asyncstage.localcloud import LocalCloud as _AsyncLocalCloud
from asyncstage.manager import Manager as _AsyncManager
from asyncstage.manager import OnExit
from asyncstage.paths import RemotePath
from asyncstage.server import Server as _AsyncServer
from asyncstage.volume import Volume as _AsyncVolume

if TYPE_CHECKING:
    import collections

    from asyncstage.ec2 import Resource, RetryMode
    from asyncstage.ssh import Command
    from asyncstage.ssh import CommandReader as _AsyncReader
    from asyncstage.ssh import CommandWriter as _AsyncWriter
    from asyncstage.transfer import DdOptions, TransferStats

__all__ = [
    "CommandReader",
    "CommandWriter",
    "LocalCloud",
    "Manager",
    "ManagerOptions",
    "Server",
    "Volume",
    "call",
]

log = logging.getLogger("asyncstage.blocking")

_P = ParamSpec("_P")
_R = TypeVar("_R")
_A = TypeVar("_A")
_T = TypeVar("_T")

NOT_TWINNED: dict[str, dict[str, str]] = {
    "Manager": {
        "ec2": "the async EC2 client; use the Manager's methods",
        "server_class": "a constructor option, read it from the async manager",
        "volume_class": "a constructor option, read it from the async manager",
    },
    "Server": {
        "ec2": "the async EC2 client; use the Server's methods",
        "host": "the async SSHHost; the Server has its command methods",
        **dict.fromkeys(_AsyncServer.INTERNAL_METHODS, "internal: the Manager's parts call it"),
    },
    "Volume": dict.fromkeys(_AsyncVolume.INTERNAL_METHODS, "internal: its Server calls it"),
    "LocalCloud": {},
}
"""Public members of the async classes that deliberately have no blocking twin (and why)."""


# -- the one background event loop ------------------------------------------------------------


class _Loop:
    """A daemon thread running an asyncio loop with a BlockingPortal; started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._portal: BlockingPortal | None = None
        self._thread: threading.Thread | None = None
        self._closing: list[Manager | LocalCloud] = []
        self._exiting = False

    def portal(self) -> BlockingPortal:
        portal = self._portal
        if portal is not None:
            return portal
        with self._lock:
            if self._portal is None:
                if self._exiting:
                    raise RuntimeError("asyncstage.blocking: the interpreter is exiting")
                ready: Future[BlockingPortal] = Future()
                thread = threading.Thread(
                    target=self._run, args=(ready,), name="asyncstage-blocking", daemon=True
                )
                thread.start()
                self._portal = ready.result()
                self._thread = thread
                _at_exit(self.shutdown)
            return self._portal

    @staticmethod
    def _run(ready: Future[BlockingPortal]) -> None:
        async def serve() -> None:
            async with BlockingPortal() as portal:
                ready.set_result(portal)
                await portal.sleep_until_stopped()

        try:
            anyio.run(serve, backend="asyncio")
        except BaseException as e:  # pragma: no cover - the loop itself failed
            if not ready.done():
                ready.set_exception(e)
            raise

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def register(self, obj: Manager | LocalCloud) -> None:
        with self._lock:
            if obj not in self._closing:
                self._closing.append(obj)

    def unregister(self, obj: Manager | LocalCloud) -> None:
        with self._lock:
            if obj in self._closing:
                self._closing.remove(obj)

    def shutdown(self) -> None:
        """Close what is still open (newest first), then stop the loop. Runs at exit."""
        with self._lock:
            self._exiting = True
            still_open = list(reversed(self._closing))
        for obj in still_open:
            try:
                obj.close()
            except Exception as e:
                log.warning("closing %r at exit: %s", obj, e)
        with self._lock:
            portal, thread = self._portal, self._thread
            self._portal = self._thread = None
        if portal is not None and thread is not None:
            with contextlib.suppress(RuntimeError):  # already stopped
                portal.call(portal.stop, True)
            thread.join(timeout=30)


def _at_exit(func: Callable[[], None]) -> None:
    """Run ``func`` when the interpreter exits, early enough that thread pools (the local
    cloud's, asyncio's default executor) still take work: ``threading``'s exit hooks run
    before ``concurrent.futures`` shuts its pools, plain ``atexit`` runs after."""
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("no threading exit hooks")
        register(func)
    except RuntimeError:  # pragma: no cover - other Pythons, or already shutting down
        atexit.register(func)


_loop = _Loop()


@overload
def call(func: Callable[..., Awaitable[_R]], *args: Any, **kwargs: Any) -> _R: ...
@overload
def call(func: Callable[..., _R], *args: Any, **kwargs: Any) -> _R: ...
def call(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``func(*args, **kwargs)`` (a coroutine function, or a plain function) on the
    facade's event loop and wait for its result.

    Blocking twins among the arguments are replaced by their async objects. A
    KeyboardInterrupt (or any exception) while waiting cancels the call.
    """
    if _loop.in_loop_thread():
        raise RuntimeError(
            "asyncstage.blocking called from its own event loop thread (a progress callback?)"
        )
    portal = _loop.portal()
    args = tuple(_unwrap(a) for a in args)
    kwargs = {k: _unwrap(v) for k, v in kwargs.items()}

    async def run() -> Any:
        result = func(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    future = portal.start_task_soon(run)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


# -- wrapping and unwrapping ------------------------------------------------------------------

_twins: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_twins_lock = threading.Lock()


def _unwrap(value: Any) -> Any:
    """Blocking twins (also inside lists, tuples and RemotePaths) → their async objects."""
    if isinstance(value, _Twinned):
        return value._async
    if isinstance(value, RemotePath) and isinstance(value.target, _Twinned):
        return RemotePath(value.target._async, value.path, sudo=value.sudo)
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_unwrap(v) for v in value)
    return value


def _twin_of(obj: Any) -> Any:
    """The blocking twin of an async Manager, Server, Volume or LocalCloud (made once)."""
    for async_cls, blocking_cls in _CLASSES:
        if isinstance(obj, async_cls):
            with _twins_lock:
                twin = _twins.get(obj)
                if twin is None:
                    twin = blocking_cls._from_async(obj)
                    _twins[obj] = twin
            return twin
    raise TypeError(f"no blocking twin for {obj!r}")


def _server(obj: _AsyncServer) -> Server:
    return _twin_of(obj)  # type: ignore[no-any-return]


def _opt_server(obj: _AsyncServer | None) -> Server | None:
    return None if obj is None else _server(obj)


def _servers(objs: Iterable[_AsyncServer]) -> list[Server]:
    return [_server(o) for o in objs]


def _volume(obj: _AsyncVolume) -> Volume:
    return _twin_of(obj)  # type: ignore[no-any-return]


def _opt_volume(obj: _AsyncVolume | None) -> Volume | None:
    return None if obj is None else _volume(obj)


def _volumes(objs: Iterable[_AsyncVolume]) -> list[Volume]:
    return [_volume(o) for o in objs]


def _manager(obj: _AsyncManager) -> Manager:
    return _twin_of(obj)  # type: ignore[no-any-return]


class _Twin(Generic[_P, _R]):
    """A blocking method: the async method of the same name, run on the facade's loop."""

    def __init__(self, func: Callable[..., Any], convert: Callable[[Any], Any] | None) -> None:
        self.func = func
        """The async class's function this twin runs (for introspection and the tests)."""
        self.convert = convert
        self.name = func.__name__
        self.__doc__ = func.__doc__
        self.__wrapped__ = func

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name

    @functools.cached_property
    def __signature__(self) -> inspect.Signature:
        """The async method's signature (``self`` first), for ``help()`` and ``inspect``."""
        return inspect.signature(self.func)

    @functools.cached_property
    def _signature(self) -> inspect.Signature:
        sig = self.__signature__
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __call__(self, obj: _Twinned[Any], /, *args: Any, **kwargs: Any) -> Any:
        """``Class.method(obj, ...)``, as with a plain function."""
        return self.__get__(obj)(*args, **kwargs)

    @overload
    def __get__(self, obj: None, owner: type[Any] | None = None) -> _Twin[_P, _R]: ...
    @overload
    def __get__(self, obj: _Twinned[Any], owner: type[Any] | None = None) -> Callable[_P, _R]: ...
    def __get__(self, obj: _Twinned[Any] | None, owner: type[Any] | None = None) -> Any:
        if obj is None:
            return self
        method = getattr(obj._async, self.name)
        convert = self.convert

        def blocking_method(*args: Any, **kwargs: Any) -> Any:
            result = call(method, *args, **kwargs)
            return result if convert is None else convert(result)

        blocking_method.__name__ = blocking_method.__qualname__ = self.name
        blocking_method.__doc__ = self.__doc__
        blocking_method.__signature__ = self._signature  # type: ignore[attr-defined]
        return blocking_method


@overload
def _twin(func: Callable[Concatenate[Any, _P], Awaitable[_R]]) -> _Twin[_P, _R]: ...
@overload
def _twin(
    func: Callable[Concatenate[Any, _P], Awaitable[_A]], convert: Callable[[_A], _R]
) -> _Twin[_P, _R]: ...
def _twin(func: Callable[..., Any], convert: Callable[[Any], Any] | None = None) -> Any:
    """``name = _twin(AsyncClass.name[, convert])``: the blocking twin of an async method,
    with its exact parameters; ``convert`` turns the result into blocking twins."""
    return _Twin(func, convert)


@overload
def _plain(func: Callable[Concatenate[Any, _P], _R]) -> _Twin[_P, _R]: ...
@overload
def _plain(
    func: Callable[Concatenate[Any, _P], _A], convert: Callable[[_A], _R]
) -> _Twin[_P, _R]: ...
def _plain(func: Callable[..., Any], convert: Callable[[Any], Any] | None = None) -> Any:
    """Like :func:`_twin` for a plain (non-async) method: it too runs on the loop's thread,
    so that it never reads state the loop is changing."""
    return _Twin(func, convert)


class _Twinned(Generic[_T]):
    """Base of the blocking twins: holds the async object."""

    _async: _T

    @classmethod
    def _from_async(cls, obj: Any) -> Any:
        twin = cls.__new__(cls)
        twin._async = obj
        return twin

    @property
    def async_object(self) -> _T:
        """The async object behind this twin (for the few things only it offers)."""
        return self._async

    def __str__(self) -> str:
        return str(self._async)

    def __repr__(self) -> str:
        return f"blocking.{self._async!r}"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Twinned):
            return self._async is other._async
        return NotImplemented

    def __hash__(self) -> int:
        return hash(id(self._async))


# -- command streams as ordinary files ----------------------------------------------------------

_CHUNK = 64 * 1024


class _CommandFile(Generic[AnyStr]):
    """What a remote command's stdout and stdin files share: the async stream they wrap,
    ``close`` (stops or waits for the command), ``with``, and closing when collected."""

    _verb = ""  # "output" or "input", for messages

    _empty: AnyStr

    def __init__(self, acm: AbstractAsyncContextManager[Any], mode: str) -> None:
        self._cm: AbstractContextManager[Any] | None = None
        self.closed = False
        cm = _loop.portal().wrap_async_context_manager(acm)
        self._stream: Any = cm.__enter__()
        self._cm = cm
        self.name: str = self._stream.command
        self.mode = mode

    def seekable(self) -> bool:
        return False

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise io.UnsupportedOperation(f"a remote command's {self._verb} has no file descriptor")

    def _check(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on a closed remote command stream")

    def close(self) -> None:
        """Stop or finish the command (see the class); CommandFailed if it failed."""
        self._exit(None, None, None)

    def _exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.closed:
            return
        self.closed = True
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(exc_type, exc, tb)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(exc_type, exc, tb)

    def __del__(self) -> None:
        if not getattr(self, "closed", True) and not _loop.in_loop_thread():
            try:
                self.close()
            except Exception as e:
                log.debug("closing %s when collected: %s", getattr(self, "name", "?"), e)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<blocking.{type(self).__name__} {self.name!r} mode={self.mode!r} {state}>"


class CommandReader(_CommandFile[AnyStr]):
    """The stdout of a remote command as an ordinary readable file (``str`` lines, or
    ``bytes`` when opened with ``encoding=None``). Iterate it for lines, or ``read`` /
    ``readline`` / ``readlines``. Closing it before the end of the output stops the
    command; reading to the end and closing raises
    :class:`~asyncstage.errors.CommandFailed` when the command failed.
    """

    _verb = "output"

    def __init__(
        self, acm: AbstractAsyncContextManager[_AsyncReader[AnyStr]], empty: AnyStr
    ) -> None:
        self._empty = empty
        super().__init__(acm, "r" if isinstance(empty, str) else "rb")
        self._reader: _AsyncReader[AnyStr] = self._stream
        self._newline: AnyStr = "\n" if isinstance(empty, str) else b"\n"
        self._buf: AnyStr = empty
        self._pos = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def _fill(self, size: int = _CHUNK) -> bool:
        """Fetch more output into the buffer; False at the end."""
        if self._eof:
            return False
        data = call(self._reader.read, size)
        if not data:
            self._eof = True
            return False
        self._buf = self._buf[self._pos :] + data
        self._pos = 0
        return True

    def _take(self, end: int) -> AnyStr:
        data = self._buf[self._pos : end]
        self._pos = end
        if self._pos >= len(self._buf):
            self._buf, self._pos = self._empty, 0
        return data

    def read(self, size: int = -1) -> AnyStr:
        """Up to ``size`` bytes/characters as soon as some are there; everything to the
        end when ``size`` is negative; empty at the end."""
        self._check()
        if size is None or size < 0:
            rest = self._take(len(self._buf))
            if self._eof:
                return rest
            data = call(self._reader.read, -1)
            self._eof = True
            return rest + data
        if size == 0:
            return self._empty
        if self._pos >= len(self._buf) and not self._fill(max(size, _CHUNK)):
            return self._empty
        return self._take(min(len(self._buf), self._pos + size))

    def readline(self, size: int = -1) -> AnyStr:
        """One line with its newline (the last one may lack it); empty at the end."""
        self._check()
        scanned = 0  # characters after self._pos searched already
        while True:
            found = self._buf.find(self._newline, self._pos + scanned)
            if found >= 0:
                end = found + 1
                break
            scanned = len(self._buf) - self._pos
            if 0 <= size <= scanned or not self._fill():
                end = len(self._buf)
                break
        if size >= 0:
            end = min(end, self._pos + size)
        return self._take(end)

    def readlines(self, hint: int = -1) -> list[AnyStr]:
        """The remaining lines (stops after ``hint`` bytes/characters when positive)."""
        lines: list[AnyStr] = []
        total = 0
        for line in self:
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[AnyStr]:
        return self

    def __next__(self) -> AnyStr:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class CommandWriter(_CommandFile[AnyStr]):
    """The stdin of a remote command as an ordinary writable file (``str``, or ``bytes``
    when opened with ``encoding=None``): ``write``, ``writelines``, ``flush``, ``close``.
    Writes are buffered (64 KiB) and wait for the remote side. Closing sends EOF, waits
    for the command and raises :class:`~asyncstage.errors.CommandFailed` when it failed;
    leaving a ``with`` block by an exception stops the command instead.
    """

    _verb = "input"

    def __init__(
        self, acm: AbstractAsyncContextManager[_AsyncWriter[AnyStr]], empty: AnyStr
    ) -> None:
        self._empty = empty
        super().__init__(acm, "w" if isinstance(empty, str) else "wb")
        self._writer: _AsyncWriter[AnyStr] = self._stream
        self._parts: list[AnyStr] = []
        self._size = 0

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, data: AnyStr) -> int:
        """Queue ``data`` (sent when 64 KiB are queued, or on flush/close); its length."""
        self._check()
        self._parts.append(data)
        self._size += len(data)
        if self._size >= _CHUNK:
            self.flush()
        return len(data)

    def writelines(self, lines: Iterable[AnyStr]) -> None:
        """Write each item (no newlines are added, as with ordinary files)."""
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Send what is queued; waits while the remote side is behind."""
        if self._parts:
            data = self._empty.join(self._parts)
            self._parts, self._size = [], 0
            call(self._writer.write, data)

    def _exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.closed:
            return
        try:
            if exc_type is None:
                self.flush()
        except BaseException as e:
            exc_type, exc, tb = type(e), e, e.__traceback__
            raise
        finally:
            super()._exit(exc_type, exc, tb)


# -- the twins ------------------------------------------------------------------------------


class ManagerOptions(TypedDict, total=False):
    """The keyword arguments of :class:`asyncstage.Manager` (a test keeps them in step)."""

    region: str | None
    endpoint_url: str | None
    profile: str | None
    aws_access_key_id: str | None
    aws_secret_access_key: str | None
    aws_session_token: str | None
    on_exit: OnExit
    instance_type: str | None
    image: str | None
    image_owners: Sequence[str] | None
    availability_zone: str | None
    username: str | None
    architecture: str
    root_type: str | None
    reuse_key: bool
    reuse_volumes: bool
    scan: bool
    dotdir: str | Path | None
    verbosity: int
    server_class: type[_AsyncServer]
    volume_class: type[_AsyncVolume]
    ssh_cidr: str | Sequence[str] | None
    security_group: str
    install_packages: bool
    retry_mode: RetryMode
    poll_interval: float
    launch_window: float
    server_timeout: float
    volume_timeout: float
    snapshot_timeout: float
    exit_timeout: float


class Manager(_Twinned[_AsyncManager]):
    """Blocking twin of :class:`asyncstage.Manager`; opened by the constructor.

    ``with blocking.Manager(region="eu-west-1") as m: s = m.get_server("a")``. Leaving the
    block, :meth:`close`, or the end of the program applies ``on_exit`` to the servers it
    started.
    """

    def __init__(self, **options: Unpack[ManagerOptions]) -> None:
        self._async = call(_AsyncManager, **options)
        with _twins_lock:
            _twins[self._async] = self
        self._open()

    @classmethod
    def from_async(cls, manager: _AsyncManager) -> Manager:
        """The blocking twin of an async Manager made elsewhere (e.g. ``LocalCloud.manager``
        of an async cloud); it is opened now and closed like any blocking Manager."""
        twin = _manager(manager)
        twin._open()
        return twin

    def _open(self) -> None:
        self.open()
        _loop.register(self)

    def __enter__(self) -> Manager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_errors=exc is None)

    def close(self, *, raise_errors: bool = True) -> None:
        """Apply ``on_exit`` to the servers this manager started, then close connections."""
        _loop.unregister(self)
        call(self._async.close, raise_errors=raise_errors)

    open = _twin(_AsyncManager.open, _manager)
    scan_region = _twin(_AsyncManager.scan_region)
    snapshots = _twin(_AsyncManager.snapshots)

    # servers
    provision_server = _twin(_AsyncManager.provision_server, _server)
    provision_servers = _twin(_AsyncManager.provision_servers, _servers)
    get_server = _twin(_AsyncManager.get_server, _server)
    get_server_in_zone = _twin(_AsyncManager.get_server_in_zone, _server)
    find_server_by_instance = _plain(_AsyncManager.find_server_by_instance, _server)
    find_server_by_name = _plain(_AsyncManager.find_server_by_name, _opt_server)
    servers = _plain(_AsyncManager.servers, _servers)
    new_server_name = _plain(_AsyncManager.new_server_name)
    start_all_servers = _twin(_AsyncManager.start_all_servers, _servers)
    stop_all_servers = _twin(_AsyncManager.stop_all_servers, _servers)
    terminate_all_servers = _twin(_AsyncManager.terminate_all_servers, _servers)
    force_terminate_all_servers = _twin(_AsyncManager.force_terminate_all_servers)

    def start_servers(
        self, servers: Iterable[Server], timeout: float | None = None
    ) -> list[Server]:
        """Start these servers at once and wait until they are up."""
        return _servers(call(self._async.start_servers, list(servers), timeout))

    def stop_servers(self, servers: Iterable[Server], timeout: float | None = None) -> list[Server]:
        """Stop these servers at once and wait until they are stopped."""
        return _servers(call(self._async.stop_servers, list(servers), timeout))

    def terminate_servers(
        self, servers: Iterable[Server], timeout: float | None = None
    ) -> list[Server]:
        """Terminate these servers at once, wait, and unregister them."""
        return _servers(call(self._async.terminate_servers, list(servers), timeout))

    def wait_for_servers(
        self, servers: Iterable[Server], timeout: float | None = None
    ) -> list[Server]:
        """Wait until every server is up; FleetError names those that are not."""
        return _servers(call(self._async.wait_for_servers, list(servers), timeout))

    # volumes
    provision_volume = _twin(_AsyncManager.provision_volume, _volume)
    get_volume = _twin(_AsyncManager.get_volume, _volume)
    find_volume_by_volid = _plain(_AsyncManager.find_volume_by_volid, _volume)
    find_volume_by_name = _plain(_AsyncManager.find_volume_by_name, _opt_volume)
    volumes = _plain(_AsyncManager.volumes, _volumes)
    new_volume_name = _plain(_AsyncManager.new_volume_name)

    # transfers
    rsync = _twin(_AsyncManager.rsync)

    def dd(
        self, source: Volume | str, dest: Volume | str, **options: Unpack[DdOptions]
    ) -> TransferStats:
        """Block-copy volume ``source`` onto volume ``dest`` (see :meth:`asyncstage.Manager.dd`)."""
        return call(self._async.dd, source, dest, **options)

    # snapshots and images
    def copy_snapshot(
        self,
        snapshot: str,
        region_or_manager: str | Manager,
        *,
        description: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Copy one of our snapshots to another region (or manager); the copy's id."""
        return call(
            self._async.copy_snapshot,
            snapshot,
            region_or_manager,
            description=description,
            timeout=timeout,
        )

    def copy_image(
        self,
        image: str,
        region_or_manager: str | Manager,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        **register_options: Any,
    ) -> str:
        """Copy an image to another region (or manager); the copy's id, once available."""
        new_id: str = call(
            self._async.copy_image,
            image,
            region_or_manager,
            name=name,
            description=description,
            timeout=timeout,
            **register_options,
        )
        return new_id

    # information
    @property
    def keyfile(self) -> Path:
        """The private key file servers of this manager are reached with."""
        return self._async.keyfile

    @property
    def region(self) -> str:
        """The manager's region."""
        return self._async.region

    @property
    def endpoint_url(self) -> str | None:
        """The EC2 endpoint (None: AWS's own)."""
        return self._async.endpoint_url

    @property
    def on_exit(self) -> OnExit:
        """What closing does to the servers it started: ``stop``, ``terminate`` or ``run``."""
        return self._async.on_exit

    @on_exit.setter
    def on_exit(self, value: OnExit) -> None:
        self._async.on_exit = value

    @property
    def dotdir(self) -> Path:
        """The directory of the key pair and known_hosts."""
        return self._async.dotdir

    @property
    def known_hosts(self) -> Any:
        """The :class:`asyncstage.ssh.KnownHosts` file servers' host keys are pinned in."""
        return self._async.known_hosts


class Server(_Twinned[_AsyncServer]):
    """Blocking twin of :class:`asyncstage.Server` (``str(server)`` is its instance id)."""

    # information
    @property
    def name(self) -> str:
        """The symbolic name (tag ``asyncstage:name``), else the instance id."""
        return self._async.name

    @property
    def instance_id(self) -> str:
        """The EC2 instance id."""
        return self._async.instance_id

    @property
    def instance(self) -> Resource:
        """The latest EC2 description of the instance."""
        return self._async.instance

    @property
    def state(self) -> str:
        """The last known EC2 state: pending, running, stopping, stopped ..."""
        return self._async.state

    @property
    def address(self) -> str | None:
        """The address ssh connects to (None when stopped)."""
        return self._async.address

    @property
    def endpoint(self) -> str | None:
        """Alias of :attr:`address`."""
        return self._async.endpoint

    @property
    def availability_zone(self) -> str:
        """The instance's availability zone."""
        return self._async.availability_zone

    @property
    def tags(self) -> dict[str, str]:
        """The instance's tags."""
        return self._async.tags

    @property
    def username(self) -> str:
        """The login user."""
        return self._async.username

    @property
    def keyfile(self) -> Path | None:
        """The private key file ssh uses."""
        return self._async.keyfile

    @property
    def manager(self) -> Manager:
        """The server's manager."""
        return _manager(self._async.manager)

    refresh = _twin(_AsyncServer.refresh)
    volumes = _plain(_AsyncServer.volumes, _volumes)

    # lifecycle
    ping = _twin(_AsyncServer.ping)
    start = _twin(_AsyncServer.start)
    stop = _twin(_AsyncServer.stop)
    terminate = _twin(_AsyncServer.terminate)

    # commands
    run = _twin(_AsyncServer.run)
    scmd = _twin(_AsyncServer.scmd)
    ssh = _twin(_AsyncServer.ssh)
    shell = _twin(_AsyncServer.shell)

    @overload
    def scmd_read(
        self, *cmd: Command, encoding: None, sudo: bool = False
    ) -> CommandReader[bytes]: ...
    @overload
    def scmd_read(
        self, *cmd: Command, encoding: str = "utf-8", sudo: bool = False
    ) -> CommandReader[str]: ...
    def scmd_read(
        self, *cmd: Command, encoding: str | None = "utf-8", sudo: bool = False
    ) -> CommandReader[Any]:
        """The command's stdout as a readable file: ``with s.scmd_read("ls") as f:``."""
        acm = call(self._async.scmd_read, *cmd, encoding=encoding, sudo=sudo)
        return CommandReader(acm, "" if encoding else b"")

    @overload
    def scmd_write(
        self, *cmd: Command, encoding: None, sudo: bool = False
    ) -> CommandWriter[bytes]: ...
    @overload
    def scmd_write(
        self, *cmd: Command, encoding: str = "utf-8", sudo: bool = False
    ) -> CommandWriter[str]: ...
    def scmd_write(
        self, *cmd: Command, encoding: str | None = "utf-8", sudo: bool = False
    ) -> CommandWriter[Any]:
        """The command's stdin as a writable file: ``with s.scmd_write("cat >x") as f:``."""
        acm = call(self._async.scmd_write, *cmd, encoding=encoding, sudo=sudo)
        return CommandWriter(acm, "" if encoding else b"")

    # volumes
    provision_volume = _twin(_AsyncServer.provision_volume, _volume)
    add_volume = _twin(_AsyncServer.add_volume, _volume)
    unused_block_device = _twin(_AsyncServer.unused_block_device)

    def default_mtpt(self, volume: Volume | str) -> str:
        """The default mount point of a volume: ``/mnt/Staging/<name>``."""
        return call(self._async.default_mtpt, volume)

    def volume_description(self, volume: Volume | str) -> str:
        """The description given to a staging volume's snapshots."""
        return call(self._async.volume_description, volume)

    def mount_volume(self, volume: Volume, mtpt: str | None = None) -> None:
        """Mount a volume here (attaching it first if needed)."""
        call(self._async.mount_volume, volume, mtpt)

    def remount_volume(self, volume: Volume) -> None:
        """Mount again a volume unmounted from this server, at its old mount point."""
        call(self._async.remount_volume, volume)

    def unmount_volume(self, volume: Volume) -> None:
        """Unmount a volume (it stays attached)."""
        call(self._async.unmount_volume, volume)

    def detach_volume(self, volume: Volume) -> None:
        """Unmount and detach a volume."""
        call(self._async.detach_volume, volume)

    def delete_volume(self, volume: Volume) -> None:
        """Unmount, detach and delete a volume."""
        call(self._async.delete_volume, volume)

    def create_snapshot(self, volume: Volume, description: str = "") -> str:
        """Snapshot a volume cleanly; the snapshot's id."""
        return call(self._async.create_snapshot, volume, description)

    # transfers
    rsync = _twin(_AsyncServer.rsync)
    put = _twin(_AsyncServer.put)
    get = _twin(_AsyncServer.get)

    def dd(
        self, source: Volume | str, dest: Volume | str, **options: Unpack[DdOptions]
    ) -> TransferStats:
        """Block-copy volume ``source`` onto volume ``dest``."""
        return call(self._async.dd, source, dest, **options)


class Volume(_Twinned[_AsyncVolume]):
    """Blocking twin of :class:`asyncstage.Volume` (``str(volume)`` is its volume id)."""

    # information
    @property
    def name(self) -> str:
        """The symbolic name (tag ``asyncstage:name``), else the volume id."""
        return self._async.name

    @property
    def volume_id(self) -> str:
        """The EC2 volume id."""
        return self._async.volume_id

    @property
    def volume(self) -> Resource:
        """The latest EC2 description of the volume."""
        return self._async.volume

    @property
    def size(self) -> int:
        """Size in GiB."""
        return self._async.size

    @property
    def fstype(self) -> str:
        """The filesystem type (``raw``: none)."""
        return self._async.fstype

    @property
    def availability_zone(self) -> str:
        """The volume's availability zone."""
        return self._async.availability_zone

    @property
    def server(self) -> Server | None:
        """The server it is attached to, or None."""
        return _opt_server(self._async.server)

    @property
    def mtpt(self) -> str | None:
        """Its mount point (the last one when unmounted)."""
        return self._async.mtpt

    @property
    def mtdev(self) -> str | None:
        """Its device path on the server."""
        return self._async.mtdev

    @property
    def ec2_device(self) -> str | None:
        """The EC2 device name it is attached under (``/dev/sdf``)."""
        return self._async.ec2_device

    @property
    def mounted(self) -> bool:
        """Whether it is mounted now."""
        return self._async.mounted

    @property
    def manager(self) -> Manager:
        """The volume's manager."""
        return _manager(self._async.manager)

    fstab_line = _plain(_AsyncVolume.fstab_line)
    get_fstype = _twin(_AsyncVolume.get_fstype)
    refresh = _twin(_AsyncVolume.refresh)

    # lifecycle
    def mount(self, server: Server | None = None, mtpt: str | None = None) -> None:
        """Mount the volume: on its server, the given one, or one in its zone."""
        call(self._async.mount, server, mtpt)

    remount = _twin(_AsyncVolume.remount)
    unmount = _twin(_AsyncVolume.unmount)
    detach = _twin(_AsyncVolume.detach)
    delete = _twin(_AsyncVolume.delete)
    create_snapshot = _twin(_AsyncVolume.create_snapshot)
    snapshot = _twin(_AsyncVolume.snapshot)

    # file commands
    ls = _twin(_AsyncVolume.ls)
    df = _twin(_AsyncVolume.df)
    mkdir = _twin(_AsyncVolume.mkdir)
    chown = _twin(_AsyncVolume.chown)
    chgrp = _twin(_AsyncVolume.chgrp)
    chmod = _twin(_AsyncVolume.chmod)
    cp = _twin(_AsyncVolume.cp)
    mv = _twin(_AsyncVolume.mv)
    rm = _twin(_AsyncVolume.rm)
    rmdir = _twin(_AsyncVolume.rmdir)
    cmd = _twin(_AsyncVolume.cmd)
    ssh = _twin(_AsyncVolume.ssh)

    # transfers
    def __truediv__(self, sub: str | os.PathLike[str]) -> RemotePath:
        """``volume / "sub"``: a path inside the volume, for rsync, put and get."""
        return self._async / sub

    put = _twin(_AsyncVolume.put)
    get = _twin(_AsyncVolume.get)
    copy = _twin(_AsyncVolume.copy)

    def dd(self, dest: Volume | str, **options: Unpack[DdOptions]) -> TransferStats:
        """Block-copy this volume onto ``dest``."""
        return call(self._async.dd, dest, **options)


class LocalCloud(_Twinned[_AsyncLocalCloud]):
    """Blocking twin of :class:`asyncstage.localcloud.LocalCloud`; started by the constructor.

    ``with blocking.LocalCloud() as cloud, cloud.manager() as m: ...``. Needs root.
    """

    def __init__(
        self,
        *,
        boot_delay: float = 0.0,
        state_dir: str | os.PathLike[str] | None = None,
        region: str = "us-east-1",
        port: int = 0,
    ) -> None:
        self._async = call(
            _AsyncLocalCloud, boot_delay=boot_delay, state_dir=state_dir, region=region, port=port
        )
        with _twins_lock:
            _twins[self._async] = self
        self.start()
        _loop.register(self)

    start = _twin(_AsyncLocalCloud.start)

    def close(self) -> None:
        """Stop the cloud and remove everything it made; idempotent."""
        _loop.unregister(self)
        call(self._async.close)

    def __enter__(self) -> LocalCloud:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def manager(self, **options: Unpack[ManagerOptions]) -> Manager:
        """An open :class:`Manager` for this cloud: ``with cloud.manager() as m``."""
        return Manager.from_async(call(self._async.manager, **options))

    session_kwargs = _plain(_AsyncLocalCloud.session_kwargs)

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the EC2 API."""
        return self._async.endpoint_url

    @property
    def region(self) -> str:
        """The cloud's region."""
        return self._async.region

    @property
    def image_id(self) -> str:
        """The AMI id of the local image."""
        return self._async.image_id

    @property
    def image_name(self) -> str:
        """The local image's name."""
        return self._async.image_name

    @property
    def default_username(self) -> str:
        """The login user of the local image."""
        return self._async.default_username

    @property
    def account_id(self) -> str:
        """The cloud's own account id."""
        return self._async.account_id

    @property
    def api_calls(self) -> collections.Counter[str]:
        """How many times each EC2 Action reached the endpoint."""
        return self._async.api_calls

    @property
    def state_dir(self) -> str:
        """Where volumes, snapshots and instance state live while the cloud runs."""
        return self._async.state_dir


_CLASSES: list[tuple[type[Any], type[_Twinned[Any]]]] = [
    (_AsyncManager, Manager),
    (_AsyncServer, Server),
    (_AsyncVolume, Volume),
    (_AsyncLocalCloud, LocalCloud),
]
