"""asyncstage.remote.blockcopy run locally on sparse temp files (no ssh, no root).

The module is imported for its pieces, and its shipped program (``python3 -c``,
exactly what a server runs) is run as a subprocess for whole commands; ``send``
streams to a local ``recv`` instead of one behind ssh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncstage import remote
from asyncstage.remote import blockcopy

MiB = 1 << 20


def sparse(path: Path, size: int, data: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, chunk in data.items():
            f.seek(off)
            f.write(chunk)
    return path


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(remote.argv("blockcopy", *args), capture_output=True, text=True)


def answer(done: subprocess.CompletedProcess[str], prefix: str = "R ") -> dict[str, object]:
    return remote.answer("local", done.stdout, prefix=prefix)


def hash_list(data: bytes) -> str:
    h = hashlib.sha256()
    for i in range(0, len(data), MiB):
        h.update(hashlib.sha256(data[i : i + MiB]).digest())
    return h.hexdigest()


def test_copy_skips_zero_blocks_and_punches_old_data(tmp_path: Path) -> None:
    size = 16 * MiB
    payload = {3 * MiB: os.urandom(MiB), 9 * MiB + 5: b"tail"}
    src = sparse(tmp_path / "src", size, payload)
    # the destination holds old data everywhere the source is zero: it must go
    dst = sparse(tmp_path / "dst", size, {0: os.urandom(2 * MiB), 12 * MiB: b"x" * MiB})
    done = run("copy", str(src), str(dst), "1")
    assert done.returncode == 0, done.stderr
    result = answer(done)
    assert dst.read_bytes() == src.read_bytes()
    assert result["size"] == size
    assert result["data_bytes"] == 2 * MiB  # the 1 MiB block and the one holding "tail"
    assert result["source_sha256"] == result["dest_sha256"] == hash_list(src.read_bytes())
    assert allocated(dst) <= 3 * MiB  # sparse: old data punched, zeros never written
    progress = [ln for ln in done.stdout.splitlines() if ln.startswith("P ")]
    assert progress and progress[-1] == f"P {size} {size}"


@pytest.mark.parametrize("method", ["none", "gzip", "zstd"])
def test_send_and_recv_round_trip(tmp_path: Path, method: str) -> None:
    if method == "zstd" and shutil.which("zstd") is None:
        pytest.skip("zstd is not installed")
    size = 8 * MiB
    src = sparse(tmp_path / "src", size, {MiB: os.urandom(MiB // 2), 7 * MiB: b"end"})
    dst = sparse(tmp_path / "dst", size, {})
    receiver = remote.argv("blockcopy", "recv", str(dst), method, "1")
    done = run("send", str(src), method, json.dumps(receiver))
    assert done.returncode == 0, done.stderr
    result = answer(done)
    assert dst.read_bytes() == src.read_bytes()
    assert result["sent_bytes"] == result["data_bytes"] == 2 * MiB
    assert result["stream_sha256"] == result["source_sha256"] == result["dest_sha256"]
    assert allocated(dst) <= 3 * MiB


def test_smaller_destination_refused_before_writing(tmp_path: Path) -> None:
    src = sparse(tmp_path / "src", 4 * MiB, {0: b"data"})
    dst = sparse(tmp_path / "dst", 2 * MiB, {0: b"keep"})
    done = run("copy", str(src), str(dst), "0")
    assert done.returncode == 3
    refusal = answer(done, prefix="E ")
    assert refusal["kind"] == "small" and "smaller" in str(refusal["error"])
    assert dst.read_bytes()[:4] == b"keep"
    receiver = remote.argv("blockcopy", "recv", str(dst), "none", "0")
    sent = run("send", str(src), "none", json.dumps(receiver))
    assert sent.returncode == 3 and answer(sent, prefix="E ")["kind"] == "small"
    assert dst.read_bytes()[:4] == b"keep"


def test_not_a_stream_refused(tmp_path: Path) -> None:
    dst = sparse(tmp_path / "dst", MiB, {0: b"keep"})
    done = subprocess.run(
        remote.argv("blockcopy", "recv", str(dst), "none", "0"), input=b"garbage!!", check=False
    )
    assert done.returncode != 0
    assert dst.read_bytes()[:4] == b"keep"


def test_expected_volume_refuses_what_is_not_a_block_device(tmp_path: Path) -> None:
    src = sparse(tmp_path / "src", MiB, {0: b"data"})
    dst = sparse(tmp_path / "dst", MiB, {0: b"keep"})
    expect = json.dumps({"serial": "vol0123456789abcdef0", "device": str(dst)})
    done = run("copy", str(src), str(dst), "0", "", expect)
    assert done.returncode == 3
    assert answer(done, prefix="E ")["kind"] == "not-volume"
    assert dst.read_bytes()[:4] == b"keep"


def test_hash_list_and_zero_blocks() -> None:
    data = os.urandom(MiB) + bytes(MiB) + b"abc"
    h = blockcopy.Digest()
    for i in range(0, len(data), MiB):
        block = data[i : i + MiB]
        h.add(block, blockcopy.is_zero(block))
    assert h.hexdigest() == hash_list(data)
    assert blockcopy.is_zero(bytes(10)) and not blockcopy.is_zero(b"\0\0\1")


def test_writer_zeroes_skipped_ranges(tmp_path: Path) -> None:
    path = sparse(tmp_path / "d", 4 * MiB, {0: b"\xff" * (4 * MiB)})
    fd = os.open(path, os.O_RDWR)
    try:
        w = blockcopy.Writer(fd, 4 * MiB)
        w.put(MiB, b"one")
        with pytest.raises(ValueError):
            w.put(0, b"back")  # records come in offset order
        w.finish()
    finally:
        os.close(fd)
    got = path.read_bytes()
    assert got == bytes(MiB) + b"one" + bytes(3 * MiB - 3)
    assert w.written == 3 and w.punched + w.zeroed == 4 * MiB - 3


def test_mount_table_parsing(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 25 7:3 / /mnt/a\\040b rw,relatime shared:1 - ext4 /dev/loop3 rw\n"
        "37 25 7:3 / /srv ro,relatime - ext4 /dev/loop3 ro\n"
        "38 25 7:4 / /other rw - ext4 /dev/loop4 rw\n"
    )
    assert blockcopy.mounts_of(os.makedev(7, 3), str(info)) == [("/mnt/a b", True), ("/srv", False)]
    assert blockcopy.mounts_of(os.makedev(7, 9), str(info)) == []


def test_size_and_which(tmp_path: Path) -> None:
    dev = sparse(tmp_path / "d", 3 * MiB, {})
    assert answer(run("size", str(dev)), prefix="")["size"] == 3 * MiB
    which = answer(run("which", "sh", "no-such-program-here"), prefix="")
    assert which == {"sh": True, "no-such-program-here": False}
    assert run("nonsense").returncode != 0


# -- ext2/3/4: only the blocks the filesystem uses are read ---------------------------------

E2FS = ("mke2fs", "debugfs", "e2fsck")
needs_e2fsprogs = pytest.mark.skipif(
    any(shutil.which(p) is None for p in E2FS), reason="e2fsprogs is not installed"
)
STALE = b"STALE-OLD-DATA!!" * 4096  # 64 KiB the filesystem does not own


def make_tree(root: Path, files: int = 30) -> Path:
    """Files of many sizes in a few directories (the allocator spreads directories)."""
    for i in range(files):
        d = root / f"d{i % 6}" / f"e{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom((i * 37_000) % 900_000 + i))
    (root / "empty").write_bytes(b"")
    return root


def ext_image(path: Path, size: int, tree: Path, *options: str) -> Path:
    """An ext filesystem made on top of old data (free blocks keep it) from ``tree``."""
    sparse(path, size, {off: STALE for off in range(0, size, 3 * MiB + 4096)})
    subprocess.run(
        ["mke2fs", "-q", "-F", "-E", "nodiscard", *options, "-d", str(tree), str(path)],
        check=True,
        capture_output=True,
    )
    return path


def debugfs(image: Path, *requests: str, write: bool = False) -> None:
    for request in requests:  # one -R each: debugfs runs only the last of several
        argv = ["debugfs", *(["-w"] if write else []), "-R", request, str(image)]
        subprocess.run(argv, check=True, capture_output=True)


def files_of(image: Path, where: Path) -> dict[str, bytes]:
    """Every regular file of the filesystem in ``image`` (read with debugfs, no mount)."""
    where.mkdir()
    subprocess.run(
        ["debugfs", "-R", f"rdump / {where}", str(image)], check=True, capture_output=True
    )
    return {
        str(p.relative_to(where)): p.read_bytes()
        for p in sorted(where.rglob("*"))
        if p.is_file() and "lost+found" not in p.parts
    }


def fsck_clean(image: Path) -> bool:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0


def used_map(image: Path) -> bytearray | None:
    fd = os.open(image, os.O_RDONLY)
    try:
        return blockcopy.ExtMap.read(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


EXT_KINDS = {
    "ext4": ["-t", "ext4", "-b", "4096"],
    "ext4-1k": ["-t", "ext4", "-b", "1024"],
    "no-flex_bg": ["-t", "ext4", "-b", "4096", "-O", "^flex_bg"],
    "32bit-gdt_csum": ["-t", "ext4", "-b", "4096", "-O", "^64bit,^metadata_csum,uninit_bg"],
    "no-csum": ["-t", "ext4", "-b", "4096", "-O", "^metadata_csum,^uninit_bg"],
    "ext3": ["-t", "ext3"],
    "ext2": ["-t", "ext2"],
}


@needs_e2fsprogs
@pytest.mark.parametrize(
    ("command", "kind"), [("copy", k) for k in EXT_KINDS] + [("send", "ext4"), ("send", "ext3")]
)
def test_ext_copy_reads_only_used_blocks(tmp_path: Path, command: str, kind: str) -> None:
    size = 96 * MiB
    tree = make_tree(tmp_path / "tree")
    src = ext_image(tmp_path / "src", size, tree, *EXT_KINDS[kind])
    # files written after a big one that is then deleted: used blocks on both sides
    # of a free run; and a file deleted before the copy: its blocks are free, its
    # bytes still there
    (tmp_path / "filler").write_bytes(os.urandom(8 * MiB))
    (tmp_path / "late").write_bytes(os.urandom(2 * MiB + 5))
    (tmp_path / "secret").write_bytes(b"SECRET-DELETED!!" * (3 * MiB // 16))
    debugfs(src, f"write {tmp_path}/filler filler", f"write {tmp_path}/late late", write=True)
    debugfs(src, "rm filler", f"write {tmp_path}/secret secret", "rm secret", write=True)
    assert b"SECRET-DELETED!!" in src.read_bytes() and fsck_clean(src)
    dst = sparse(tmp_path / "dst", size, {0: os.urandom(MiB), 50 * MiB: STALE * 16})
    if command == "copy":
        done = run("copy", str(src), str(dst), "1")
    else:
        done = run(
            "send",
            str(src),
            "none",
            json.dumps(remote.argv("blockcopy", "recv", str(dst), "none", "1")),
        )
    assert done.returncode == 0, done.stderr
    result = answer(done)
    used = used_map(src)
    assert result["layout"] == "ext" and used is not None
    assert result["read_bytes"] == sum(used) * MiB < size // 2
    assert b"\0\1" in used and b"\1\0" in used  # not one run at the start
    # the copy is the same filesystem with the same files
    assert fsck_clean(dst)
    assert files_of(dst, tmp_path / "got") == files_of(src, tmp_path / "want")
    # what the filesystem does not use was not copied: zeros (punched) at the destination
    got, old = dst.read_bytes(), src.read_bytes()
    for i in range(size // MiB):
        block = got[i * MiB : (i + 1) * MiB]
        assert block == (old[i * MiB : (i + 1) * MiB] if used[i] else bytes(MiB)), i
    assert got.count(b"SECRET-DELETED!!") < old.count(b"SECRET-DELETED!!")
    assert got.count(STALE) < old.count(STALE)
    # the hash lists are of the copy as made, and the destination read back matches
    assert result["source_sha256"] == result["dest_sha256"] == hash_list(got) != hash_list(old)
    assert allocated(dst) <= result["read_bytes"] + 64 * 1024  # sparse (+ the file system's own)


@needs_e2fsprogs
@pytest.mark.parametrize(
    "spoil",
    ["raw", "not-clean", "free-count", "needs-recovery", "bigalloc", "past-the-end"],
)
def test_anything_else_is_read_whole(tmp_path: Path, spoil: str) -> None:
    """Not an ext filesystem, or one the bitmaps cannot be trusted for: every byte copied."""
    size = 48 * MiB
    tree = make_tree(tmp_path / "tree", 8)
    src = tmp_path / "src"
    if spoil == "raw":
        sparse(src, size, {off: STALE for off in range(0, size, 5 * MiB)})
    elif spoil == "bigalloc":
        ext_image(src, size, tree, "-t", "ext4", "-O", "bigalloc", "-C", "65536")
    else:
        ext_image(src, size, tree, "-t", "ext4", "-b", "4096")
        assert used_map(src) is not None  # as made, it would be trusted
        requests = {
            "not-clean": "ssv state 0",
            "free-count": "set_bg 0 free_blocks_count 7",
            "needs-recovery": "feature needs_recovery",
            "past-the-end": f"ssv blocks_count {size // 1024 + 1}",
        }
        debugfs(src, requests[spoil], write=True)
    assert used_map(src) is None
    dst = sparse(tmp_path / "dst", size, {MiB: os.urandom(MiB)})
    done = run("copy", str(src), str(dst), "1")
    assert done.returncode == 0, done.stderr
    result = answer(done)
    assert result["layout"] == "device" and result["read_bytes"] == size
    assert dst.read_bytes() == src.read_bytes()
    assert result["source_sha256"] == result["dest_sha256"] == hash_list(src.read_bytes())


def test_bitmap_bit_helpers() -> None:
    bm = bytes([0b00000000, 0b00010000, 0, 0, 0b10000000, 0xFF])
    bits = [i for i in range(48) if bm[i // 8] >> (i % 8) & 1]
    for lo in range(48):
        for hi in range(lo, 49):
            assert blockcopy._bits_any(bm, lo, hi) == any(lo <= b < hi for b in bits), (lo, hi)
    for n in range(49):
        assert blockcopy._bits_set(bm, n) == sum(b < n for b in bits)


def test_read_ahead_keeps_order_errors_and_stops() -> None:
    items = [(i, bytes([i])) for i in range(50)]
    assert list(blockcopy.ahead(iter(items), depth=3)) == items

    def failing() -> Iterator[tuple[int, bytes]]:
        yield 0, b"a"
        raise OSError("unexpected end of device")

    got = blockcopy.ahead(failing())
    assert next(got) == (0, b"a")
    with pytest.raises(OSError, match="unexpected end"):
        next(got)
    made: list[int] = []

    def endless() -> Iterator[tuple[int, bytes]]:
        i = 0
        while True:
            made.append(i)
            yield i, b""
            i += 1

    reader = blockcopy.ahead(endless(), depth=2)
    assert next(reader) == (0, b"")
    reader.close()  # the consumer stops early (a broken pipe): the thread ends too
    assert len(made) <= 5


def test_direct_reads_match_plain_ones(tmp_path: Path) -> None:
    data = os.urandom(5 * MiB) + b"tail"
    (tmp_path / "d").write_bytes(data)
    fd = os.open(tmp_path / "d", os.O_RDONLY)
    try:
        reader = blockcopy.Direct(fd)  # O_DIRECT where the filesystem allows it
        assert reader.read(4 * MiB, 0) == data[: 4 * MiB]
        assert reader.read(4096, MiB) == data[MiB : MiB + 4096]
        assert reader.read(100, 5) == data[5:105]  # unaligned: a plain read
        assert reader.read(4096, 5 * MiB - 4096 + 4) == data[5 * MiB - 4092 :]  # short
        reader.close()
        assert b"".join(block for _, block in blockcopy.chunks(fd, len(data))) == data
    finally:
        os.close(fd)


@needs_e2fsprogs
@pytest.mark.parametrize("command", ["copy", "send"])
def test_all_blocks_copies_a_byte_for_byte_image(tmp_path: Path, command: str) -> None:
    """``blocks="all"``: free blocks of an ext filesystem too (a deleted file's bytes)."""
    size = 48 * MiB
    src = ext_image(tmp_path / "src", size, make_tree(tmp_path / "tree", 8), "-t", "ext4")
    (tmp_path / "secret").write_bytes(b"SECRET-DELETED!!" * (MiB // 16))
    debugfs(src, f"write {tmp_path}/secret secret", "rm secret", write=True)
    assert used_map(src) is not None  # "used" would skip the free blocks
    dst = sparse(tmp_path / "dst", size, {MiB: os.urandom(MiB)})
    if command == "copy":
        done = run("copy", str(src), str(dst), "1", "", "", "all")
    else:
        recv = json.dumps(remote.argv("blockcopy", "recv", str(dst), "none", "1"))
        done = run("send", str(src), "none", recv, "", "all")
    assert done.returncode == 0, done.stderr
    result = answer(done)
    assert result["layout"] == "device" and result["read_bytes"] == size
    assert dst.read_bytes() == src.read_bytes()
    assert b"SECRET-DELETED!!" in dst.read_bytes()
    assert result["source_sha256"] == result["dest_sha256"] == hash_list(src.read_bytes())
    assert run("copy", str(src), str(dst), "1", "", "", "some").returncode != 0
