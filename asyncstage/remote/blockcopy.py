"""Runs on a server for dd: copies a block device block by block, sparse, with a hash list.

Standard library only, no asyncstage import: the controller sends this file's text
to ``python3 -c`` (see :mod:`asyncstage.remote`), followed by a call of :func:`main`.

Commands (``EXPECT`` is ``""`` or a JSON object ``{"serial": "vol…", "device": "/dev/sdf"}``
naming the volume the device must be):

* ``size DEV``: ``{"size": N}``;
* ``which NAME...``: which of the programs are installed;
* ``sha256 DEV SIZE``: the hash list of the first SIZE bytes;
* ``copy SRC DST VERIFY [SRC_EXPECT DST_EXPECT]``: both on this host;
* ``send SRC METHOD SSH_ARGV_JSON [SRC_EXPECT]``: stream SRC to a ``recv`` started by the
  given ssh argv;
* ``recv DST METHOD VERIFY [DST_EXPECT]``: write the stream read on stdin to DST.

Progress goes to stdout as ``P DONE TOTAL`` lines, the result as ``R {json}``, a refusal
as ``E {json}`` (exit status 3) with ``kind`` ``mounted`` (the device is mounted),
``busy`` (held by something else) or ``not-volume``. ``recv`` prints its result (or its
refusal) as plain JSON for ``send`` to pass on.

Checks before a byte is written: the destination is opened with ``O_EXCL`` (on Linux a
block device that is mounted or claimed fails with ``EBUSY``) and is not listed in
this host's mount table; the source is not mounted read-write (a read-only mount is
allowed); with ``EXPECT`` each device must be that volume (its NVMe serial, its
``/dev/disk/by-id`` link or its attachment device).

Blocks of zeros are not sent. The destination stays sparse: ranges that must be zero
are punched (``fallocate``), or written with zeros only where they are not zero yet.
On an ext2/3/4 filesystem only the blocks its bitmaps mark used are read; the others
count as zeros (:class:`ExtMap`, which declines anything it does not fully trust: then
the whole device is read). The hash lists are of the copy as made.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import mmap
import os
import queue
import re
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

# typing is for the type checker only: a server's python3 imports none of it (a
# start the less), and 3.8's cannot subscript builtin types at run time
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any

STARTED = time.monotonic()
CHUNK = 1 << 20
READ = 4 << 20
MAGIC = b"ASDD\x01"
SIZE = struct.Struct(">Q")
HDR = struct.Struct(">QI")
END = 0xFFFFFFFFFFFFFFFF
ZERO = bytes(CHUNK)
BLKFLSBUF = 0x1261
COMPRESS = {"zstd": ["zstd", "-q", "-c", "-T0"], "gzip": ["gzip", "-c", "-1"]}
DECOMPRESS = {"zstd": ["zstd", "-q", "-d", "-c"], "gzip": ["gzip", "-d", "-c"]}


class Refused(Exception):
    """A device this copier will not touch; ``kind`` says why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def say(*words: object) -> None:
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


class Progress:
    def __init__(self, total: int) -> None:
        self.total = total
        self.last = 0.0

    def __call__(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= 0.25:
            self.last = now
            say("P", done, self.total)


def devsize(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def pread_full(fd: int, n: int, off: int) -> bytes:
    parts = []
    while n:
        b = os.pread(fd, n, off)
        if not b:
            raise OSError(f"unexpected end of device at offset {off}")
        parts.append(b)
        n -= len(b)
        off += len(b)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def pwrite_full(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view = view[n:]
        off += n


def read_exact(f: IO[bytes], n: int) -> bytes:
    parts = []
    while n:
        b = f.read(n)
        if not b:
            raise EOFError("the stream from the source ended early")
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


class Direct:
    """Reads of the device ``fd`` that bypass the page cache (``O_DIRECT``, into an
    aligned buffer): what the device holds, not a cached copy, and on loop devices
    several times faster than buffered reads of the same size. Plain reads where it
    is refused (tmpfs, files, unaligned sizes)."""

    ALIGN = 4096

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.dfd = -1
        self.buf: mmap.mmap | None = None
        try:  # the same open file again, with O_DIRECT (a second, shared open)
            self.dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            self.buf = mmap.mmap(-1, READ)
        except (OSError, AttributeError, ValueError):
            self.close()

    def read(self, n: int, off: int) -> bytes:
        if self.buf is not None and n <= READ and not (n % self.ALIGN or off % self.ALIGN):
            try:
                with memoryview(self.buf) as view:
                    got = os.preadv(self.dfd, [view[:n]], off)
                    data = bytes(view[:got])
                return data if got == n else data + pread_full(self.fd, n - got, off + got)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.close()  # not for this device: plain reads from now on
        return pread_full(self.fd, n, off)

    def close(self) -> None:
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        if self.buf is not None:
            self.buf.close()
            self.buf = None


def chunks(fd: int, size: int, used: bytearray | None = None) -> Iterator[tuple[int, bytes]]:
    """The device's CHUNK-sized blocks in order: (offset, data), where the data of a
    block ``used`` marks unused (0) is zeros that were not read."""
    reader = Direct(fd)
    try:
        yield from _chunks(reader, size, used)
    finally:
        reader.close()


def _chunks(reader: Direct, size: int, used: bytearray | None) -> Iterator[tuple[int, bytes]]:
    # Read up to READ bytes at a time (loop and network block devices are much faster
    # with large requests) within runs of used blocks.
    off = 0
    while off < size:
        if used is not None and not used[off // CHUNK]:
            n = min(CHUNK, size - off)
            yield off, ZERO[:n]
            off += n
            continue
        end = min(off + READ, size)
        if used is not None:
            stop = off // CHUNK + 1
            while stop * CHUNK < end and used[stop]:
                stop += 1
            end = min(end, stop * CHUNK)
        buf = reader.read(end - off, off)
        for i in range(0, len(buf), CHUNK):
            yield off + i, buf[i : i + CHUNK]
        off = end


def is_zero(data: bytes) -> bool:
    return data == ZERO[: len(data)]


_libc: Any = None


def punch(fd: int, off: int, n: int) -> bool:
    """Zero a range by unmapping it (a hole; on a block device a zeroout that may unmap)."""
    global _libc
    try:
        import ctypes
        import ctypes.util

        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
        return bool(_libc.fallocate(fd, 3, ctypes.c_long(off), ctypes.c_long(n)) == 0)
    except Exception:
        return False


class Writer:
    """Writes records in offset order; the ranges between them end up zero."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.pos = 0
        self.written = 0
        self.zeroed = 0
        self.punched = 0

    def zero_to(self, end: int) -> None:
        # Skipped ranges must read back as zero (a reused destination holds old
        # data). Punching does it without writing and the kernel guarantees zeros.
        # Where that is not supported, write zeros only where the destination is
        # not zero already, so that a sparse one stays sparse.
        if end > self.pos and punch(self.fd, self.pos, end - self.pos):
            self.punched += end - self.pos
            self.pos = end
            return
        while self.pos < end:
            n = min(CHUNK - self.pos % CHUNK, end - self.pos)
            if not is_zero(pread_full(self.fd, n, self.pos)):
                pwrite_full(self.fd, ZERO[:n], self.pos)
                self.zeroed += n
            self.pos += n

    def put(self, off: int, data: bytes) -> None:
        if off < self.pos:
            raise ValueError("records out of order")
        self.zero_to(off)
        pwrite_full(self.fd, data, off)
        self.pos = off + len(data)
        self.written += len(data)

    def finish(self) -> None:
        self.zero_to(self.size)
        os.fsync(self.fd)


def drop_cache(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class Digest:
    """A sha256 hash list: the sha256 of the sha256s of the 1 MiB blocks. Blocks of
    zeros (most of a sparse volume) cost a compare, not a hash."""

    ZERO_BLOCK = hashlib.sha256(ZERO).digest()

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def add(self, data: bytes, zero: bool) -> None:
        if zero and len(data) == CHUNK:
            self.h.update(self.ZERO_BLOCK)
        else:
            self.h.update(hashlib.sha256(data).digest())

    def digest(self) -> bytes:
        return self.h.digest()

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def sha256_of(fd: int, size: int) -> str:
    drop_cache(fd)
    h = Digest()
    for _, data in chunks(fd, size):
        h.add(data, is_zero(data))
    return h.hexdigest()


# -- which blocks an ext2/3/4 filesystem uses ---------------------------------------------

EXT_MAGIC = 0xEF53
# Features whose layout this reader knows (the group descriptors at the usual place,
# one bitmap bit per block); any other (meta_bg, bigalloc, mmp, journal needing
# recovery, a journal device, new ones) makes the copier read the whole device.
EXT_INCOMPAT = 0x0002 | 0x0040 | 0x0080 | 0x0200 | 0x0400 | 0x1000 | 0x2000 | 0x4000
EXT_INCOMPAT |= 0x8000 | 0x10000 | 0x20000
EXT_RO_COMPAT = 0x0001 | 0x0002 | 0x0004 | 0x0008 | 0x0010 | 0x0020 | 0x0040 | 0x0100
EXT_RO_COMPAT |= 0x0400 | 0x1000 | 0x2000 | 0x8000 | 0x10000
GROUP_CSUM = 0x0010 | 0x0400  # gdt_csum, metadata_csum: only then are *_UNINIT flags valid
BLOCK_UNINIT = 0x0002


def _bits_any(bm: bytes, lo: int, hi: int) -> bool:
    """Is any bit in [lo, hi) set (bit i: byte i // 8, bit i % 8, as ext bitmaps are)?"""
    while lo < hi and lo % 8:
        if bm[lo // 8] >> (lo % 8) & 1:
            return True
        lo += 1
    a, b = lo // 8, hi // 8
    if a < b and bm.count(0, a, b) != b - a:
        return True
    return any(bm[b] >> i & 1 for i in range(max(lo - 8 * b, 0), hi - 8 * b))


def _bits_set(bm: bytes, n: int) -> int:
    whole = bin(int.from_bytes(bm[: n // 8], "little")).count("1")
    return whole + sum(bm[n // 8] >> i & 1 for i in range(n % 8))


class ExtMap:
    """The 1 MiB blocks of a device that an ext2/3/4 filesystem on it uses: read from
    its superblock, group descriptors and block bitmaps. :meth:`read` returns None
    (read everything) for anything else or anything it does not fully understand: no
    ext magic, not cleanly unmounted, unknown features, numbers out of range, a group
    whose bitmap disagrees with its descriptor's free count."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.used = bytearray((size + CHUNK - 1) // CHUNK)
        self.bs = self.first = self.blocks = self.per_group = self.desc = 0
        self.base = self.itable_bytes = 0
        self.csum = False

    @classmethod
    def read(cls, fd: int, size: int) -> bytearray | None:
        """Which 1 MiB blocks of the device to read (1) or not (0); None: all of them."""
        try:
            m = cls(fd, size)
            return m.used if m.superblock() and m.groups() else None
        except (OSError, ValueError, IndexError, struct.error):
            return None

    def mark(self, start: int, end: int) -> None:
        """Mark the blocks [start, end) of the filesystem used."""
        bs = self.bs
        for c in range(start * bs // CHUNK, min((end * bs + CHUNK - 1) // CHUNK, len(self.used))):
            self.used[c] = 1

    def superblock(self) -> bool:
        sb = pread_full(self.fd, 1024, 1024)
        magic, state = struct.unpack_from("<HH", sb, 0x38)
        incompat, ro_compat = struct.unpack_from("<II", sb, 0x60)
        if magic != EXT_MAGIC or state & 7 != 1:  # valid (cleanly unmounted): no errors, orphans
            return False
        if incompat & ~EXT_INCOMPAT or ro_compat & ~EXT_RO_COMPAT:
            return False
        blocks, inodes_per_group = (
            struct.unpack_from("<I", sb, 4)[0],
            struct.unpack_from("<I", sb, 0x28)[0],
        )
        self.first, log_bs, _, self.per_group = struct.unpack_from("<4I", sb, 20)
        self.desc = 32
        if incompat & 0x80:  # 64bit
            blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
            (self.desc,) = struct.unpack_from("<H", sb, 0xFE)
        self.blocks, self.bs = blocks, 1024 << log_bs
        self.csum = bool(ro_compat & GROUP_CSUM)
        rev, inode_size = (
            struct.unpack_from("<I", sb, 0x4C)[0],
            struct.unpack_from("<H", sb, 0x58)[0],
        )
        self.itable_bytes = inodes_per_group * (inode_size if rev else 128)
        groups = (blocks - self.first + self.per_group - 1) // max(self.per_group, 1)
        # the superblock and the group descriptors (with their reserve), in group 0 and
        # in the groups that hold a backup
        self.base = 1 + (groups * self.desc + self.bs - 1) // self.bs
        self.base += struct.unpack_from("<H", sb, 0xCE)[0]
        return (
            1024 <= self.bs <= 65536
            and 0 < self.per_group <= 8 * self.bs
            and 32 <= self.desc <= 1024
            and self.first == (1 if self.bs == 1024 else 0)
            and self.first < blocks
            and blocks * self.bs <= self.size
        )

    def descriptors(self) -> list[tuple[int, int, int, int, int]]:
        """(block bitmap, inode bitmap, inode table, free blocks, flags) of each group."""
        desc, blocks = self.desc, self.blocks
        groups = (blocks - self.first + self.per_group - 1) // self.per_group
        gdt = pread_full(self.fd, groups * desc, (self.first + 1) * self.bs)
        found = []
        for g in range(groups):
            d = gdt[g * desc : (g + 1) * desc]
            bitmap, ibitmap, itable, free = struct.unpack_from("<3IH", d, 0)
            if desc >= 64:  # the high halves
                hb, hi, ht, hf = struct.unpack_from("<3IH", d, 0x20)
                bitmap, ibitmap, itable = bitmap | hb << 32, ibitmap | hi << 32, itable | ht << 32
                free |= hf << 16
            lo = (bitmap, ibitmap, itable, free, struct.unpack_from("<H", d, 0x12)[0])
            if not all(self.first <= b < blocks for b in lo[:3]):
                raise ValueError(f"group {g}: metadata outside the filesystem")
            found.append(lo)
        return found

    def groups(self) -> bool:
        bs, first, per_group = self.bs, self.first, self.per_group
        self.mark(0, first + self.base)
        self.mark(self.blocks, (self.size + bs - 1) // bs)  # past the filesystem: not its own
        groups = self.descriptors()
        for bitmap, ibitmap, itable, _, _ in groups:
            # every group's own metadata, wherever flex_bg put it (uninit groups' too)
            self.mark(bitmap, bitmap + 1)
            self.mark(ibitmap, ibitmap + 1)
            self.mark(itable, itable + (self.itable_bytes + bs - 1) // bs)
        bitmaps = self.bitmaps(
            [b for b, _, _, _, flags in groups if not (self.csum and flags & BLOCK_UNINIT)]
        )
        per_chunk = CHUNK // bs
        for g, (bitmap, _, _, free, flags) in enumerate(groups):
            start = first + g * per_group
            n = min(per_group, self.blocks - start)
            if self.csum and flags & BLOCK_UNINIT:
                # no bitmap on disk yet: nothing in the group but metadata (a backup
                # superblock and descriptors: counted whether or not it has one)
                self.mark(start, start + self.base)
                continue
            bm = bitmaps[bitmap]
            if n - _bits_set(bm, n) != free:
                return False
            lo = 0
            while lo < n:
                hi = min(n, ((start + lo) // per_chunk + 1) * per_chunk - start)
                if _bits_any(bm, lo, hi):
                    self.mark(start + lo, start + hi)
                lo = hi
        return True

    def bitmaps(self, where: list[int]) -> dict[int, bytes]:
        """The blocks ``where`` (block numbers), neighbours read together (flex_bg puts a
        flex group's bitmaps side by side)."""
        found: dict[int, bytes] = {}
        todo = sorted(set(where))
        i = 0
        while i < len(todo):
            j = i + 1
            while j < len(todo) and todo[j] == todo[j - 1] + 1 and j - i < 256:
                j += 1
            data = pread_full(self.fd, (j - i) * self.bs, todo[i] * self.bs)
            for k in range(i, j):
                found[todo[k]] = data[(k - i) * self.bs : (k - i + 1) * self.bs]
            i = j
        return found


# -- which device, and is it free ---------------------------------------------------------


def mounts_of(rdev: int, mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, bool]]:
    """(mount point, read-write) of every mount of the block device ``rdev`` here."""
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    found = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 5 and fields[2] == want:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                found.append((point, "rw" in fields[5].split(",")))
    return found


def check_volume(dev: str, expect: str) -> None:
    """Refuse ``dev`` unless it is the volume ``expect`` names (no check when empty)."""
    want = json.loads(expect) if expect else {}
    if not want:
        return
    st = os.stat(dev)
    if not stat.S_ISBLK(st.st_mode):
        raise Refused("not-volume", f"{dev} is not a block device: refused")
    rdev = st.st_rdev
    serial = str(want.get("serial", ""))
    candidates = []
    if serial:
        candidates += [p for p in glob.glob(f"/dev/disk/by-id/*{serial}*") if "-part" not in p]
        sysfs = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/device/serial"
        try:
            with open(sysfs) as f:
                if f.read().strip() == serial:
                    return
        except OSError:
            pass
    device = str(want.get("device", ""))
    if device:
        candidates += [device, device.replace("/dev/sd", "/dev/xvd", 1)]
    for path in candidates:
        try:
            if os.stat(path).st_rdev == rdev:
                return
        except OSError:
            continue
    raise Refused("not-volume", f"{dev} is not the volume {serial or device}: refused")


def open_device(dev: str, write: bool, expect: str = "") -> int:
    """Open ``dev`` for the copy after the checks in the module docstring."""
    check_volume(dev, expect)
    st = os.stat(dev)
    mounted = mounts_of(st.st_rdev) if stat.S_ISBLK(st.st_mode) else []
    if write and mounted:
        raise Refused("mounted", f"{dev} is mounted at {mounted[0][0]}: refused")
    if not write and any(rw for _, rw in mounted):
        where = next(p for p, rw in mounted if rw)
        raise Refused("mounted", f"{dev} is mounted read-write at {where}: refused")
    flags = (os.O_RDWR if write else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
    try:
        # O_EXCL on a block device: EBUSY while it is mounted or claimed (Linux).
        return os.open(dev, flags | (os.O_EXCL if write or not mounted else 0))
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise Refused("busy", f"{dev} is in use (mounted or held open exclusively)") from e
        raise


# -- the commands ---------------------------------------------------------------------------


def cmd_size(dev: str) -> None:
    fd = os.open(dev, os.O_RDONLY)
    try:
        say(json.dumps({"size": devsize(fd)}))
    finally:
        os.close(fd)


def _verify(result: dict[str, Any], fd: int, size: int) -> None:
    started = time.monotonic()
    result["dest_sha256"] = sha256_of(fd, size)
    result["verify_seconds"] = round(time.monotonic() - started, 3)


def ahead(items: Iterator[tuple[int, bytes]], depth: int = 8) -> Iterator[tuple[int, bytes]]:
    """``items``, made by a thread up to ``depth`` ahead of the consumer: the source's
    reads and hashes overlap the writes (all three release the GIL)."""
    q: queue.Queue[tuple[int, bytes] | BaseException | None] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: tuple[int, bytes] | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(None)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while True:
            got = q.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        thread.join()


class Source:
    """The source device's blocks: those an ext filesystem on it uses (:class:`ExtMap`),
    else all; the rest count as zeros (not read, not sent: punched at the destination).
    Every block goes into the hash list, so the hash is of the copy as made."""

    def __init__(self, fd: int, size: int, blocks: str = "used") -> None:
        if blocks not in ("used", "all"):
            raise ValueError(f"blocks must be 'used' or 'all', not {blocks!r}")
        self.fd = fd
        self.size = size
        self.used = ExtMap.read(fd, size) if blocks == "used" else None
        self.digest = Digest()
        self.data_bytes = 0

    def data(self, progress: Progress) -> Iterator[tuple[int, bytes]]:
        """(offset, data) of the blocks that are not zeros, in order (read ahead)."""
        return ahead(self._data(progress))

    def _data(self, progress: Progress) -> Iterator[tuple[int, bytes]]:
        for off, data in chunks(self.fd, self.size, self.used):
            zero = is_zero(data)
            self.digest.add(data, zero)
            if not zero:
                self.data_bytes += len(data)
                yield off, data
            progress(off + len(data))

    def info(self) -> dict[str, Any]:
        read = self.size
        if self.used is not None:
            read = sum(min(CHUNK, self.size - i * CHUNK) for i, u in enumerate(self.used) if u)
        return {
            "size": self.size,
            "source_sha256": self.digest.hexdigest(),
            "data_bytes": self.data_bytes,
            "layout": "device" if self.used is None else "ext",
            "read_bytes": read,
        }


def cmd_copy(
    src: str,
    dst: str,
    verify: str,
    src_expect: str = "",
    dst_expect: str = "",
    blocks: str = "used",
) -> None:
    sfd = open_device(src, False, src_expect)
    dfd = open_device(dst, True, dst_expect)
    size = devsize(sfd)
    if devsize(dfd) < size:
        raise Refused("small", f"destination {dst} is smaller than source {src}")
    progress = Progress(size)
    w = Writer(dfd, size)
    source = Source(sfd, size, blocks)
    for off, data in source.data(progress):
        w.put(off, data)
    w.finish()
    progress(size, True)
    result = source.info()
    result.update({"sent_bytes": 0, "zeroed": w.zeroed, "punched": w.punched})
    if verify == "1":
        _verify(result, dfd, size)
    say("R", json.dumps(result))


def _send_records(source: Source, out: IO[bytes], progress: Progress) -> None:
    out.write(MAGIC + SIZE.pack(source.size))
    for off, data in source.data(progress):
        out.write(HDR.pack(off, len(data)))
        out.write(data)
    out.write(HDR.pack(END, 0))
    out.write(source.digest.digest())


def cmd_send(
    src: str, method: str, ssh_argv_json: str, src_expect: str = "", blocks: str = "used"
) -> None:
    fd = open_device(src, False, src_expect)
    size = devsize(fd)
    ssh = subprocess.Popen(json.loads(ssh_argv_json), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert ssh.stdin is not None and ssh.stdout is not None
    comp = None
    out: IO[bytes] = ssh.stdin
    if method in COMPRESS:
        comp = subprocess.Popen(COMPRESS[method], stdin=subprocess.PIPE, stdout=ssh.stdin)
        ssh.stdin.close()
        assert comp.stdin is not None
        out = comp.stdin
    progress = Progress(size)
    source = Source(fd, size, blocks)
    t0 = time.monotonic()
    try:
        _send_records(source, out, progress)
        out.close()
    except BrokenPipeError:
        pass
    if comp is not None and comp.wait() != 0:
        ssh.kill()
        sys.exit(f"compressor {method} failed")
    reply = ssh.stdout.read().decode("utf-8", "replace").strip().splitlines()
    rc = ssh.wait()
    remote: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        remote = json.loads(reply[-1]) if reply else {}
    if "error" in remote:
        raise Refused(str(remote.get("kind", "")), str(remote["error"]))
    if rc != 0:
        sys.exit(f"the receiving side failed (exit status {rc})")
    progress(size, True)
    result = source.info()
    result["send_seconds"] = round(time.monotonic() - t0, 3)
    result["started_seconds"] = round(time.monotonic() - STARTED, 3)
    result.update(remote)
    say("R", json.dumps(result))


def receive(inp: IO[bytes], w: Writer) -> tuple[int, bytes]:
    """Write the records of a stream (after its header) with ``w``: (bytes, stream digest)."""
    sent = 0
    while True:
        off, n = HDR.unpack(read_exact(inp, HDR.size))
        if off == END:
            return sent, read_exact(inp, 32)
        data = read_exact(inp, n)
        sent += n
        w.put(off, data)


def cmd_recv(dst: str, method: str, verify: str, dst_expect: str = "") -> None:
    fd = open_device(dst, True, dst_expect)
    inp: IO[bytes] = sys.stdin.buffer
    dec = None
    if method in DECOMPRESS:
        dec = subprocess.Popen(DECOMPRESS[method], stdin=sys.stdin.buffer, stdout=subprocess.PIPE)
        assert dec.stdout is not None
        inp = dec.stdout
    if read_exact(inp, len(MAGIC)) != MAGIC:
        sys.exit("not an asyncstage dd stream")
    (size,) = SIZE.unpack(read_exact(inp, SIZE.size))
    if devsize(fd) < size:
        raise Refused(
            "small",
            f"destination {dst} ({devsize(fd)} bytes) is smaller than the source ({size} bytes)",
        )
    w = Writer(fd, size)
    t0 = time.monotonic()
    sent, digest = receive(inp, w)
    t1 = time.monotonic()
    w.finish()
    if dec is not None and dec.wait() != 0:
        sys.exit(f"decompressor {method} failed")
    result: dict[str, Any] = {
        "sent_bytes": sent,
        "zeroed": w.zeroed,
        "punched": w.punched,
        "stream_sha256": digest.hex(),
        "recv_seconds": round(t1 - t0, 3),
        "finish_seconds": round(time.monotonic() - t1, 3),
    }
    if verify == "1":
        _verify(result, fd, size)
    print(json.dumps(result), flush=True)


def cmd_sha256(dev: str, size: str) -> None:
    fd = os.open(dev, os.O_RDONLY)
    say(json.dumps({"sha256": sha256_of(fd, int(size))}))


def cmd_which(*names: str) -> None:
    say(json.dumps({n: shutil.which(n) is not None for n in names}))


COMMANDS: dict[str, Callable[..., None]] = {
    "size": cmd_size,
    "copy": cmd_copy,
    "send": cmd_send,
    "recv": cmd_recv,
    "sha256": cmd_sha256,
    "which": cmd_which,
}


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        sys.exit("usage: blockcopy {" + ",".join(COMMANDS) + "} ARGS...")
    try:
        COMMANDS[argv[0]](*argv[1:])
    except Refused as e:
        answer = json.dumps({"error": str(e), "kind": e.kind})
        # recv answers send (plain JSON); the others answer the controller (an E line)
        if argv[0] == "recv":
            say(answer)
        else:
            say("E", answer)
        return 3
    return 0
