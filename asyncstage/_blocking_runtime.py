"""The runtime of the blocking facade (hand-written; :mod:`asyncstage.blocking` is generated).

One background event loop (an anyio :class:`~anyio.from_thread.BlockingPortal` in a daemon
thread, started on first use) runs every call; :func:`call` submits a call and waits for it.
Blocking twins hold their async object; :func:`_wrap` / :func:`_unwrap` translate between the
two worlds (the same twin for the same async object). Remote command streams become ordinary
file objects (:class:`CommandReader`, :class:`CommandWriter`). What the generator cannot
derive from the async classes lives here too, as the bases of the generated classes: the
lifetime of a Manager and a LocalCloud (opened by the constructor, closed by ``with``, by
``close`` or at interpreter exit) and the typed ``scmd_read`` / ``scmd_write``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import io
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import (
    TYPE_CHECKING,
    Any,
    AnyStr,
    Concatenate,
    Generic,
    ParamSpec,
    Self,
    TypeVar,
    Unpack,
    cast,
    overload,
)

import anyio
from anyio.from_thread import BlockingPortal

from asyncstage.localcloud import LocalCloud as _AsyncLocalCloud
from asyncstage.manager import Manager as _AsyncManager
from asyncstage.paths import RemotePath
from asyncstage.server import Server as _AsyncServer

if TYPE_CHECKING:
    from asyncstage.blocking import Manager, ManagerOptions
    from asyncstage.ssh import Command
    from asyncstage.ssh import CommandReader as _AsyncReader
    from asyncstage.ssh import CommandWriter as _AsyncWriter

__all__ = ["NOT_TWINNED", "CommandReader", "CommandWriter", "call"]

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
        "registry": "the async manager's internal part; use the Manager's methods",
        "fleet": "the async manager's internal part; use the Manager's methods",
        "account": "the async manager's internal part; use the Manager's methods",
        "images": "the async manager's internal part; use the Manager's methods",
        "context": "what the async manager's parts share; use the Manager's methods",
    },
    "Server": {
        "ec2": "the async EC2 client; use the Server's methods",
        "host": "the async SSHHost; the Server has its command methods",
    },
    "Volume": {},
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
        self._closing: list[_Lifetime[Any]] = []
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

    def register(self, obj: _Lifetime[Any]) -> None:
        with self._lock:
            if obj not in self._closing:
                self._closing.append(obj)

    def unregister(self, obj: _Lifetime[Any]) -> None:
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


def _call_async(func: Callable[..., Awaitable[_R]], *args: Any, **kwargs: Any) -> _R:
    """:func:`call` for a coroutine function (typed even when the arguments are Any)."""
    return call(func, *args, **kwargs)


def _call_sync(func: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
    """:func:`call` for a plain function: it runs on the loop's thread too, so that it
    never reads state the loop is changing."""
    return call(func, *args, **kwargs)


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


_CLASSES: list[tuple[type[Any], type[_Twinned[Any]]]] = []
"""(async class, blocking class) pairs, filled by :func:`_register`."""


def _register(async_cls: type[Any], blocking_cls: type[_Twinned[Any]]) -> None:
    """Hand out ``blocking_cls`` twins for instances of ``async_cls``; its generated
    methods, written without docstrings, get those of their async twins."""
    _CLASSES.append((async_cls, blocking_cls))
    for name, member in vars(blocking_cls).items():
        if inspect.isfunction(member) and member.__doc__ is None:
            member.__doc__ = getattr(async_cls, name).__doc__


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


def _wrap(value: Any) -> Any:
    """Async objects (also inside lists, tuples and dict values) → their blocking twins."""
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _wrap(v) for k, v in value.items()}
    if any(isinstance(value, async_cls) for async_cls, _ in _CLASSES):
        return _twin_of(value)
    return value


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
        self._exit(None)

    def _exit(self, exc: BaseException | None) -> None:
        """Close: the command is stopped when ``exc`` (what ends a ``with`` block) is set."""
        if self.closed:
            return
        self.closed = True
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        self._exit(exc)

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
    for the command and raises :class:`~asyncstage.errors.CommandFailed` when it failed
    (its stdout is then :attr:`output`); leaving a ``with`` block by an exception stops
    the command instead.
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

    @property
    def output(self) -> AnyStr:
        """What the command wrote to its stdout so far (its last MiB): all of it once
        the file is closed."""
        return self._writer.output

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

    def _exit(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        try:
            if exc is None:
                self.flush()
        except BaseException as e:
            exc = e
            raise
        finally:
            super()._exit(exc)


# -- what the generated classes build on ------------------------------------------------------


class _Lifetime(_Twinned[_T]):
    """A twin that is opened by its constructor and closed by ``with``, :meth:`close` or
    the end of the program (newest first)."""

    def _adopt(self, obj: _T) -> None:
        """The constructor's second half: become the twin of ``obj``, open it."""
        self._async = obj
        with _twins_lock:
            _twins[obj] = self
        self._open()

    def _open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        self.close()


class _ManagerLifetime(_Lifetime[_AsyncManager]):
    """The hand-written part of :class:`asyncstage.blocking.Manager`: its lifetime."""

    @classmethod
    def from_async(cls, manager: _AsyncManager) -> Self:
        """The blocking twin of an async Manager made elsewhere (e.g. ``LocalCloud.manager``
        of an async cloud); it is opened now and closed like any blocking Manager."""
        twin = cast(Self, _twin_of(manager))
        twin._open()
        return twin

    def _open(self) -> None:
        call(self._async.open)
        _loop.register(self)

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        self.close(raise_errors=exc is None)

    def close(self, *, raise_errors: bool = True) -> None:
        """Apply ``on_exit`` to the servers this manager started, then close connections."""
        _loop.unregister(self)
        call(self._async.close, raise_errors=raise_errors)


class _LocalCloudLifetime(_Lifetime[_AsyncLocalCloud]):
    """The hand-written part of :class:`asyncstage.blocking.LocalCloud`: its lifetime, and
    managers that are open blocking Managers."""

    def _open(self) -> None:
        call(self._async.start)
        _loop.register(self)

    def close(self) -> None:
        """Stop the cloud and remove everything it made; idempotent."""
        _loop.unregister(self)
        call(self._async.close)

    def manager(self, *, read_only: bool = False, **options: Unpack[ManagerOptions]) -> Manager:
        """An open :class:`Manager` for this cloud: ``with cloud.manager() as m``
        (``read_only=True``: with the cloud's read-only credential pair)."""
        made = call(self._async.manager, read_only=read_only, **options)
        twin = cast("Manager", _twin_of(made))
        twin._open()
        return twin


class _ServerStreams(_Twinned[_AsyncServer]):
    """The hand-written part of :class:`asyncstage.blocking.Server`: ``scmd_read`` and
    ``scmd_write`` hand out ordinary file objects."""

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
