"""Runs where a backup's data is: writes the manifest of a tree, checks a tree against one.

Standard library only, no asyncstage import: the controller sends this file's text to
``python3 -c`` (see :mod:`asyncstage.remote`), followed by a call of :func:`main`; a
restore imports it to check the local copy the same way. Every command prints one JSON
object as its last line of output.

A manifest is a file of JSON lines: a header ``{"asyncstage-manifest": 1}``, then one
entry per file, directory, symlink or special file below the root (the root itself,
its ``lost+found`` and the manifest are not listed), in the order of a depth-first walk
whose directories are read in byte order of their names, so that writing and checking
are single streaming passes whatever the size of the tree:

    {"path": "etc/hosts", "type": "file", "size": 220, "mode": 420,
     "mtime_ns": 1700000000000000000, "ctime_ns": 1700000000000000000,
     "ino": 12, "sha256": "..."}

``mode`` is the permission bits (``st_mode & 0o7777``); symlinks carry ``target``
instead of ``sha256`` and no mode or time (both follow the link's own rules, not the
data's). Names that are not UTF-8 are kept byte for byte (surrogate escapes). A file's
``ino`` and ``ctime_ns`` are where it was listed (the backup's volume): a check never
compares them (a restored copy has its own); the next manifest of that volume does.

Writing over an earlier manifest of the same tree (a backup's volume made from the
previous snapshot) hashes only what changed, as restic does: a file whose size,
``mtime_ns``, ``ctime_ns`` and ``ino`` are all the earlier entry's keeps that entry's
digest. Anything that rewrites a file (rsync's rename into place, a write, a ``touch``
back to the old time) changes its ctime or inode, so it is read again. The earlier
manifest is used only when its own digest is the one the caller expects (its
snapshot's tag).

While a copy still writes into the tree, ``follow`` hashes what has landed, so that the
final ``write`` re-reads only what changed since: the follow pass keeps a file's digest
only when the file's ctime is older than the filesystem's own clock at the start of the
pass (an unnamed file's ctime, stamped then: as git treats "racily clean" index
entries, a change made later in the same timestamp tick would keep the file's size,
times and inode) and when the file's stat is the same after hashing as before. Once
the copy is done, the same process writes the manifest: the final pass, which takes a
digest of the follow pass only for a file whose size, times and inode are still those
it was hashed at, and reads every other file. The final pass stays the only
authority; what the follow pass hashed is a cache of it, in memory.

Commands:

* ``write ROOT [SHA256]``: write ``ROOT/.asyncstage-manifest`` (a temporary file
  renamed over it, synced), print its ``sha256``, the number of ``entries``, ``files``
  and ``bytes``, how many files were ``reused`` from the manifest already there (only
  when its digest is SHA256), and how many bytes were ``hashed``; then delete any
  leftover of ours at the root (the reserved ``.asyncstage-manifest.tmp-`` names, which
  walks skip);
* ``follow ROOT [SHA256]``: until its stdin ends, walk ROOT every
  :data:`FOLLOW_INTERVAL` seconds (no more often than its walks take when one hashed
  nothing) and hash each file that is neither hashed already nor unchanged since the
  manifest there (SHA256 as for ``write``), skipping rsync's temporary files
  (``.NAME.XXXXXX``) and reading again only the directories that changed since the
  last walk or held a file left for later; print one line per walk (``pass``,
  ``files`` and ``hashed`` bytes so far); then ``write`` as above, and print its
  answer with how many files were ``followed`` (their digest from the follow pass) and
  the follow pass's ``passes``;
* ``check ROOT MANIFEST SHA256 [read-data] [ignore-extra]``: compare the tree at ROOT
  with the manifest file MANIFEST, which is trusted only when its own digest is SHA256;
  print ``manifest`` (``ok``, ``missing``, ``mismatch`` or ``unreadable``) and the
  ``missing``, ``changed``, ``extra`` and ``damaged`` paths (the first
  :data:`LISTED` of each, and their ``counts``). With ``read-data`` every file's
  content is hashed, else only metadata is compared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import stat
import time
from collections.abc import Callable, Iterator, Sequence

# typing is for the type checker only: a server's python3 imports none of it (a
# start the less), and 3.8's cannot subscript builtin types at run time
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any

    Entry = dict[str, Any]
    Key = tuple[bytes, ...]
    Stamp = tuple[int, int, int, int]
    """A file's (size, mtime_ns, ctime_ns, ino): what a digest is kept for."""

NAME = ".asyncstage-manifest"
"""The manifest's file name, at the root of the tree it lists."""
FORMAT = 1
LISTED = 200
"""Paths listed per kind of finding (all are counted)."""
KINDS = ("missing", "changed", "extra", "damaged")
_CHUNK = 1 << 20
_SKIP_AT_ROOT = (NAME.encode(), b"lost+found")
_TMP_PREFIX = (NAME + ".tmp-").encode()
FOLLOW_INTERVAL = 0.5
"""Seconds from the start of one follow walk to the next (at least)."""
_RSYNC_TEMP = re.compile(rb"\..+\.[0-9A-Za-z]{6}", re.DOTALL)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
}
_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class Unreadable(Exception):
    """A manifest whose text is not a manifest (trusted digest or not)."""


def say(answer: dict[str, Any]) -> None:
    print(json.dumps(answer), flush=True)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# -- the tree ---------------------------------------------------------------------


def walk(root: bytes) -> Iterator[tuple[Key, bytes, os.stat_result]]:
    """(key, path relative to root, lstat) of everything below ``root``, depth first,
    each directory's names in byte order (so keys come in increasing order)."""
    stack: list[tuple[Key, Iterator[bytes]]] = [((), iter(_names(root, top=True)))]
    while stack:
        prefix, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        key = (*prefix, name)
        rel = b"/".join(key)
        try:
            st = os.lstat(os.path.join(root, rel))
        except FileNotFoundError:
            continue  # gone since the directory was read
        yield key, rel, st
        if stat.S_ISDIR(st.st_mode):
            stack.append((key, iter(_names(os.path.join(root, rel), top=False))))


def _names(path: bytes, *, top: bool) -> list[bytes]:
    found = sorted(e.name for e in os.scandir(path))
    if top:
        found = [n for n in found if n not in _SKIP_AT_ROOT and not n.startswith(_TMP_PREFIX)]
    return found


def entry_of(rel: bytes, st: os.stat_result, root: bytes, digest: bool) -> Entry:
    """The manifest entry of one path (its content hashed when ``digest``)."""
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), "other")
    entry: Entry = {"path": _text(rel), "type": kind}
    if kind == "symlink":
        entry["target"] = _text(os.readlink(os.path.join(root, rel)))
        return entry
    entry["mode"] = stat.S_IMODE(st.st_mode)
    entry["mtime_ns"] = st.st_mtime_ns
    if kind == "file":
        entry["size"] = st.st_size
        entry["ctime_ns"] = st.st_ctime_ns
        entry["ino"] = st.st_ino
        if digest:
            entry["sha256"] = file_sha256(os.path.join(root, rel))
    return entry


_SAME_FILE = ("size", "mtime_ns", "ctime_ns", "ino")
"""What must all be unchanged for a file's earlier digest to be kept."""


class Earlier:
    """The digests of an earlier manifest of the tree, looked up in walk order (one
    streaming pass beside the walk; :meth:`restart` for another walk). Empty when there
    is none, or its digest is not the expected one, or it does not read as a manifest.
    The file stays open: what is read is what was verified, wherever it is moved."""

    def __init__(self, path: bytes, expected: str | None) -> None:
        self.entries: Iterator[tuple[Key, Entry]] = iter(())
        self.here: tuple[Key, Entry] | None = None
        self._file: IO[bytes] | None = None
        if expected is None or not _SHA256.match(expected):
            return
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            return
        f = open(fd, "rb")  # noqa: SIM115 (kept open for restart, closed by close)
        try:
            if sha256_of(fd) != expected:
                f.close()
                return
        except OSError:
            f.close()
            return
        self._file = f
        self.restart()

    def restart(self) -> None:
        """Read the manifest from its start again (for another walk of the tree)."""
        if self._file is None:
            return
        self._file.seek(0)
        self.entries = _entries(self._file)
        self._next()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Earlier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next(self) -> None:
        try:
            self.here = next(self.entries, None)
        except (Unreadable, OSError):
            self.here, self.entries = None, iter(())

    def digest(self, key: Key, entry: Entry) -> str | None:
        """The earlier digest of the file ``entry`` (at ``key``), if it is unchanged."""
        while self.here is not None and self.here[0] < key:
            self._next()
        if self.here is None or self.here[0] != key:
            return None
        old = self.here[1]
        if old["type"] != "file" or any(old.get(f) != entry.get(f) for f in _SAME_FILE):
            return None
        return str(old["sha256"])


def file_sha256(path: bytes) -> str:
    """sha256 of a file's content, read in chunks (never through a symlink)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    try:
        digest = sha256_of(fd)
    finally:
        os.close(fd)
    assert digest is not None
    return digest


def sha256_of(fd: int, stop: Callable[[], bool] | None = None) -> str | None:
    """sha256 of an open file's content from its current offset, read in chunks; None
    when ``stop`` (asked between chunks) says so."""
    h = hashlib.sha256()
    # One read buffer for many files: a new one per file would cost more than a small
    # file takes to hash. A thread that finds none free makes its own.
    buf, view = _BUFFERS.pop() if _BUFFERS else _new_buffer()
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
            if stop is not None and stop():
                return None
    finally:
        _BUFFERS.append((buf, view))
    return h.hexdigest()


_BUFFERS: list[tuple[bytearray, memoryview]] = []


def _new_buffer() -> tuple[bytearray, memoryview]:
    buf = bytearray(_CHUNK)
    return buf, memoryview(buf)


def _dump(entry: Entry) -> bytes:
    return (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode("ascii")


# -- writing ----------------------------------------------------------------------


def write(
    root_text: str, earlier: str | None = None, followed: Follow | None = None
) -> dict[str, Any]:
    """Write the manifest of ``root`` into it; its digest and counts. ``earlier``: the
    digest of the manifest there now, whose unchanged files are not hashed again;
    ``followed``: a follow pass over ``root``, likewise. Then any leftover of ours at
    the root is deleted."""
    root = _raw(root_text)
    final = os.path.join(root, NAME.encode())
    tmp = os.path.join(root, _TMP_PREFIX + str(os.getpid()).encode())
    h = hashlib.sha256()
    counts = dict.fromkeys(("entries", "files", "bytes", "reused", "followed", "hashed"), 0)
    before = Earlier(final, earlier)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o644)
    try:
        with open(fd, "wb", closefd=False) as out:

            def put(data: bytes) -> None:
                out.write(data)
                h.update(data)

            put(_dump({"asyncstage-manifest": FORMAT}))
            for key, rel, st in walk(root):
                entry = entry_of(rel, st, root, digest=False)
                if entry["type"] == "file":
                    entry["sha256"] = _digest(root, key, rel, entry, before, followed, counts)
                    counts["files"] += 1
                    counts["bytes"] += int(entry["size"])
                put(_dump(entry))
                counts["entries"] += 1
            out.flush()
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, final)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        before.close()
    _sweep(root)
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return {"sha256": h.hexdigest(), **counts}


def _digest(
    root: bytes,
    key: Key,
    rel: bytes,
    entry: Entry,
    before: Earlier,
    followed: Follow | None,
    counts: dict[str, int],
) -> str:
    """A file's digest for the manifest: the earlier manifest's, the follow pass's, or
    read now (counted as such)."""
    known = before.digest(key, entry)
    if known is not None:
        counts["reused"] += 1
        return known
    known = followed.digest(key, entry) if followed is not None else None
    if known is not None:
        counts["followed"] += 1
        return known
    counts["hashed"] += int(entry["size"])
    return file_sha256(os.path.join(root, rel))


def _sweep(root: bytes) -> None:
    """Delete the files of the reserved temporary names at the root: whatever a write
    that died left there."""
    with os.scandir(root) as found:
        for e in found:
            if e.name.startswith(_TMP_PREFIX) and e.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)


# -- following a copy -------------------------------------------------------------


def _stamp(st: os.stat_result) -> Stamp:
    """A file's stamp: its :data:`_SAME_FILE` fields, in that order."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class Input:
    """Whether the stdin of the follow pass has ended (the copy is done)."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.ended = False

    def __call__(self) -> bool:
        return self.wait(0.0)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the end; whether it came."""
        if not self.ended and select.select([self.fd], [], [], timeout)[0]:
            try:
                self.ended = not os.read(self.fd, 1 << 16)
            except OSError:
                self.ended = True
        return self.ended


class Follow:
    """The digests of a tree's files hashed while a copy still writes into it: an index
    of what was hashed, kept only for files whose ctime was older than the start of the
    walk that hashed them and whose stat did not change meanwhile."""

    def __init__(self, root: bytes, earlier: str | None, stop: Callable[[], bool]) -> None:
        self.root = root
        self.stop = stop
        self.dev = os.lstat(root).st_dev
        self.index: dict[Key, tuple[Stamp, str]] = {}
        self.passes = 0
        self.hashed = 0
        self._earlier = Earlier(os.path.join(root, NAME.encode()), earlier)
        self._clock = _clock_file(root)
        # per directory settled at the last walk: its stamp, its subdirectories' names
        self._dirs: dict[Key, tuple[tuple[int, int, int], list[bytes]]] = {}
        self._unsettled: set[Key] = set()

    def close(self) -> None:
        self._earlier.close()
        os.close(self._clock)

    def now(self) -> int:
        """The filesystem's clock: the ctime a change made now gets (same granularity,
        same source as the files' own)."""
        os.utime(self._clock)
        return os.fstat(self._clock).st_ctime_ns

    def step(self) -> int:
        """One walk of the tree; the number of files it hashed."""
        self.passes += 1
        clock = self.now()
        self._earlier.restart()
        self._unsettled.clear()
        hashed = 0
        try:
            for n, (key, rel, st) in enumerate(self._walk(clock)):
                if n % 256 == 0 and self.stop():
                    break
                state = self._state(key, st, clock)
                if state == "hash" and self._hash(key, rel, st):
                    hashed += 1
                    if self.stop():
                        break
                elif state != "settled":
                    self._unsettled.add(key[:-1])
        except OSError:
            pass  # a directory went away under the walk (rsync --delete): the next one
        return hashed

    def _walk(self, clock: int) -> Iterator[tuple[Key, bytes, os.stat_result]]:
        """The files a walk looks at, in key order: those of each directory that changed
        since the last walk or held a file not settled then (one still to hash, or in
        the making), except those hashed already; of the other directories, only their
        subdirectories are looked into. A directory is skipped only when its ctime is
        older than the walk's clock (as for files: a name added later in the same tick
        would keep its times)."""
        # per directory entered: its key, the names to look at, its stamp, its
        # subdirectories' names, and whether it is skipped (its names: those subdirectories)
        stack: list[tuple[Key, Iterator[bytes], tuple[int, int, int], list[bytes], bool]] = []

        def enter(key: Key, st: os.stat_result) -> None:
            dstamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            known = self._dirs.get(key)
            if known is not None and known[0] == dstamp:
                stack.append((key, iter(known[1]), dstamp, [], True))
                return
            path = os.path.join(self.root, b"/".join(key)) if key else self.root
            stack.append((key, iter(_names(path, top=not key)), dstamp, [], False))

        enter((), os.lstat(self.root))
        while stack:
            prefix, names, dstamp, subdirs, skipped = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                if not skipped:  # a skipped one stays as the last walk that read it left it
                    if prefix not in self._unsettled and dstamp[1] < clock:
                        self._dirs[prefix] = (dstamp, subdirs)
                    else:
                        self._dirs.pop(prefix, None)
                continue
            key = (*prefix, name)
            if not skipped and key in self.index:
                # hashed by an earlier walk: its digest holds for the stamp it was hashed
                # at, which the final pass compares (a change since stamps it anew)
                continue
            rel = b"/".join(key)
            try:
                st = os.lstat(os.path.join(self.root, rel))
            except FileNotFoundError:
                continue  # gone since the directory was read
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev == self.dev:
                    subdirs.append(name)
                    enter(key, st)
            elif not skipped:
                yield key, rel, st

    def _state(self, key: Key, st: os.stat_result, clock: int) -> str:
        """``hash`` (now), ``settled`` (unchanged since the earlier manifest, or never
        the follow pass's) or ``later`` (to look at again), for a file not hashed yet."""
        if not stat.S_ISREG(st.st_mode) or st.st_dev != self.dev:
            return "settled"  # another filesystem may keep coarser times than the clock's
        if _RSYNC_TEMP.fullmatch(key[-1]):
            return "later"  # rsync's file in the making, renamed once written
        # not hashed yet (walks skip those); zip has no strict= before 3.10
        same = dict(zip(_SAME_FILE, _stamp(st)))  # noqa: B905
        if self._earlier.digest(key, {"type": "file", **same}) is not None:
            return "settled"  # unchanged since the earlier manifest: the final pass has it
        return "hash" if st.st_ctime_ns < clock else "later"

    def _hash(self, key: Key, rel: bytes, st: os.stat_result) -> bool:
        stamp = _stamp(st)
        try:
            fd = os.open(os.path.join(self.root, rel), os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or _stamp(now) != stamp:
                return False
            digest = sha256_of(fd, self.stop)
            if digest is None or _stamp(os.fstat(fd)) != stamp:
                return False
        except OSError:
            return False
        finally:
            os.close(fd)
        self.index[key] = (stamp, digest)
        self.hashed += st.st_size
        return True

    def digest(self, key: Key, entry: Entry) -> str | None:
        """The digest this pass hashed for the file ``entry`` (at ``key``), if the file's
        size, times and inode are still those it was hashed at."""
        known = self.index.get(key)
        if known is None:
            return None
        now = tuple(entry.get(f) for f in _SAME_FILE)
        return known[1] if now == known[0] else None


def _clock_file(root: bytes) -> int:
    """An open file without a name on the filesystem of ``root``, for its ctime."""
    if unnamed := getattr(os, "O_TMPFILE", 0):
        try:
            return os.open(root, unnamed | os.O_RDWR, 0o600)
        except OSError:
            pass  # a filesystem without unnamed files: a named one, unlinked at once
    path = os.path.join(root, _TMP_PREFIX + b"clock-" + str(os.getpid()).encode())
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    os.unlink(path)
    return fd


def follow(
    root_text: str, earlier: str | None = None, stdin: Input | None = None
) -> dict[str, Any]:
    """Hash the files landing in ``root`` until ``stdin`` ends (a line per walk on
    stdout), then write the manifest (:func:`write`, with what was hashed); its answer
    and the walks' count."""
    done = stdin or Input()
    f = Follow(_raw(root_text), earlier, done)
    try:
        while not done():
            started = time.monotonic()
            hashed = f.step()
            took = time.monotonic() - started
            say({"pass": f.passes, "files": len(f.index), "hashed": f.hashed})
            # walks that find nothing to hash take at most half of a core
            done.wait(max(FOLLOW_INTERVAL - took, 0.0 if hashed else took))
        return {**write(root_text, earlier, followed=f), "passes": f.passes}
    finally:
        f.close()


# -- checking ---------------------------------------------------------------------


def digest_of(path: str) -> str | None:
    """sha256 of a file, or None when there is none."""
    try:
        return file_sha256(_raw(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _key_of(path: object) -> Key:
    if not isinstance(path, str) or not path:
        raise Unreadable(f"bad path {path!r}")
    parts = tuple(_raw(path).split(b"/"))
    if any(p in (b"", b".", b"..") or b"\0" in p for p in parts):
        raise Unreadable(f"bad path {path!r}")
    return parts


def _check_entry(entry: object) -> Entry:
    if not isinstance(entry, dict):
        raise Unreadable("an entry is not an object")
    kind = entry.get("type")
    if kind not in (*_TYPES.values(), "other"):
        raise Unreadable(f"bad type {kind!r}")
    ints: tuple[str, ...] = ("size", "mode", "mtime_ns") if kind == "file" else ("mode", "mtime_ns")
    if kind == "symlink":
        ints = ()
        if not isinstance(entry.get("target"), str):
            raise Unreadable(f"symlink {entry.get('path')!r} has no target")
    for field in ints:
        value = entry.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise Unreadable(f"{entry.get('path')!r}: bad {field} {value!r}")
    if kind == "file" and not _SHA256.match(str(entry.get("sha256", ""))):
        raise Unreadable(f"{entry.get('path')!r}: bad sha256")
    return entry


def read_manifest(path: str) -> Iterator[tuple[Key, Entry]]:
    """The entries of a manifest file with their keys; :class:`Unreadable` when it is not
    one (bad header, bad entry, or entries out of order)."""
    with open(_raw(path), "rb") as f:
        yield from _entries(f)


def _entries(f: IO[bytes]) -> Iterator[tuple[Key, Entry]]:
    try:
        header = json.loads(f.readline())
    except ValueError as e:
        raise Unreadable("no header") from e
    if not isinstance(header, dict) or header.get("asyncstage-manifest") != FORMAT:
        raise Unreadable(f"unknown header {header!r}")
    last: Key | None = None
    for line in f:
        try:
            entry = _check_entry(json.loads(line))
        except ValueError as e:
            raise Unreadable(f"bad line {line[:80]!r}") from e
        key = _key_of(entry.get("path"))
        if last is not None and key <= last:
            raise Unreadable(f"entries out of order at {entry['path']!r}")
        last = key
        yield key, entry


def _differences(want: Entry, got: Entry) -> list[str]:
    if want["type"] != got["type"]:
        return ["type"]
    fields = ("target",) if want["type"] == "symlink" else ("size", "mode", "mtime_ns")
    return [f for f in fields if want.get(f) != got.get(f)]


class Findings:
    """What a check found, the first :data:`LISTED` of each kind and their counts."""

    def __init__(self) -> None:
        self.lists: dict[str, list[Any]] = {k: [] for k in KINDS}
        self.counts = dict.fromkeys(KINDS, 0)

    def add(self, kind: str, item: Any) -> None:
        self.counts[kind] += 1
        if len(self.lists[kind]) < LISTED:
            self.lists[kind].append(item)


def check(
    root_text: str,
    manifest: str,
    expected: str,
    *,
    read_data: bool,
    ignore_extra: bool = False,
    cancelled: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Compare the tree at ``root_text`` with ``manifest`` once its digest is ``expected``
    (the answer described in the module's docstring). ``cancelled`` is asked between
    files; when it says so the check stops with :class:`InterruptedError`."""
    if not _SHA256.match(expected):
        return {"manifest": "unreadable", "detail": "the expected digest is not a sha256"}
    actual = digest_of(manifest)
    if actual is None:
        return {"manifest": "missing"}
    if actual != expected:
        return {"manifest": "mismatch", "sha256": actual}
    root = _raw(root_text)
    found = Findings()
    totals = {"entries": 0, "files_read": 0, "bytes_read": 0}
    tree = walk(root)
    here = next(tree, None)
    try:
        for key, want in read_manifest(manifest):
            totals["entries"] += 1
            while here is not None and here[0] < key:
                if not ignore_extra:
                    found.add("extra", _text(here[1]))
                here = next(tree, None)
            if cancelled():
                raise InterruptedError("check cancelled")
            if here is None or here[0] != key:
                found.add("missing", want["path"])
                continue
            _, rel, st = here
            here = next(tree, None)
            got = entry_of(rel, st, root, digest=False)
            if differs := _differences(want, got):
                found.add("changed", {"path": want["path"], "fields": differs})
                continue
            if read_data and want["type"] == "file":
                try:
                    digest = file_sha256(os.path.join(root, rel))
                except OSError as e:
                    found.add("damaged", {"path": want["path"], "error": str(e)})
                    continue
                totals["files_read"] += 1
                totals["bytes_read"] += int(want["size"])
                if digest != want["sha256"]:
                    found.add("damaged", {"path": want["path"], "error": "content differs"})
    except Unreadable as e:
        return {"manifest": "unreadable", "detail": str(e)}
    while here is not None:
        if not ignore_extra:
            found.add("extra", _text(here[1]))
        here = next(tree, None)
    return {"manifest": "ok", **totals, **found.lists, "counts": found.counts}


def main(argv: Sequence[str]) -> int:
    if len(argv) in (2, 3) and argv[0] in ("write", "follow"):
        writer = write if argv[0] == "write" else follow
        say(writer(argv[1], argv[2] if len(argv) == 3 else None))
        return 0
    if len(argv) >= 4 and argv[0] == "check" and set(argv[4:]) <= {"read-data", "ignore-extra"}:
        flags = set(argv[4:])
        say(
            check(
                argv[1],
                argv[2],
                argv[3],
                read_data="read-data" in flags,
                ignore_extra="ignore-extra" in flags,
            )
        )
        return 0
    say(
        {
            "error": "usage: manifest write ROOT [SHA256] | follow ROOT [SHA256] | check ROOT "
            "MANIFEST SHA256 [read-data] [ignore-extra]"
        }
    )
    return 2
