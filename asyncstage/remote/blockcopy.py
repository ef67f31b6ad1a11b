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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

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


def chunks(fd: int, size: int) -> Iterator[tuple[int, bytes]]:
    # Read READ bytes at a time (loop and network block devices are much faster
    # with large requests), hand them out in CHUNK-sized blocks.
    off = 0
    while off < size:
        buf = pread_full(fd, min(READ, size - off), off)
        for i in range(0, len(buf), CHUNK):
            yield off + i, buf[i : i + CHUNK]
        off += len(buf)


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


def cmd_copy(src: str, dst: str, verify: str, src_expect: str = "", dst_expect: str = "") -> None:
    sfd = open_device(src, False, src_expect)
    dfd = open_device(dst, True, dst_expect)
    size = devsize(sfd)
    if devsize(dfd) < size:
        raise Refused("small", f"destination {dst} is smaller than source {src}")
    progress = Progress(size)
    w = Writer(dfd, size)
    h = Digest()
    data_bytes = 0
    for off, data in chunks(sfd, size):
        zero = is_zero(data)
        h.add(data, zero)
        if not zero:
            w.put(off, data)
            data_bytes += len(data)
        progress(off + len(data))
    w.finish()
    progress(size, True)
    result: dict[str, Any] = {
        "size": size,
        "source_sha256": h.hexdigest(),
        "data_bytes": data_bytes,
        "sent_bytes": 0,
        "zeroed": w.zeroed,
        "punched": w.punched,
    }
    if verify == "1":
        _verify(result, dfd, size)
    say("R", json.dumps(result))


def _send_records(fd: int, size: int, out: IO[bytes], progress: Progress) -> tuple[Digest, int]:
    h = Digest()
    data_bytes = 0
    out.write(MAGIC + SIZE.pack(size))
    for off, data in chunks(fd, size):
        zero = is_zero(data)
        h.add(data, zero)
        if not zero:
            out.write(HDR.pack(off, len(data)))
            out.write(data)
            data_bytes += len(data)
        progress(off + len(data))
    out.write(HDR.pack(END, 0))
    out.write(h.digest())
    return h, data_bytes


def cmd_send(src: str, method: str, ssh_argv_json: str, src_expect: str = "") -> None:
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
    h, data_bytes = Digest(), 0
    try:
        h, data_bytes = _send_records(fd, size, out, progress)
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
    result: dict[str, Any] = {
        "size": size,
        "source_sha256": h.hexdigest(),
        "data_bytes": data_bytes,
    }
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
    sent, digest = receive(inp, w)
    w.finish()
    if dec is not None and dec.wait() != 0:
        sys.exit(f"decompressor {method} failed")
    result: dict[str, Any] = {
        "sent_bytes": sent,
        "zeroed": w.zeroed,
        "punched": w.punched,
        "stream_sha256": digest.hex(),
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
