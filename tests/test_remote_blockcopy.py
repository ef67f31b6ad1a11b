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
