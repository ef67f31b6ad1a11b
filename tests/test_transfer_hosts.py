"""The host-level transfer engine on real sshd processes (two hosts on 127.0.0.x).

The two sshd "hosts" share this machine's filesystem, so every test works in
directories of its own. Host → host transfers authorise their temporary key in
the fixture's own authorized_keys file (``server.dir / "authorized_keys"``).
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncstage import transfer
from asyncstage.errors import InvalidArgument, PathError, RsyncError, VerifyFailed
from asyncstage.paths import Endpoint, HostEndpoint, LocalEndpoint, UnmanagedEndpoint
from asyncstage.ssh import SSHHost
from asyncstage.transfer import Progress, dd_endpoints, rsync_endpoints
from tests import remote_faults
from tests.sshd import SSHServer

pytestmark = pytest.mark.anyio

HOSTILE = [
    "sp ace",
    "quo'te",
    'dq"uote',
    "dollar$HOME",
    "back`tick`",
    "semi;colon",
    "star*glob?[x]",
    "new\nline",
    "ünïcödé-名前",
    "-dash",
    "back\\slash",
    "col:on",
]


@pytest.fixture(scope="module")
def servers(sshd_factory: Callable[..., SSHServer]) -> tuple[SSHServer, SSHServer]:
    a = sshd_factory(address="127.0.0.21")
    b = sshd_factory(address="127.0.0.22")
    return a, b


@asynccontextmanager
async def hosts(a: SSHServer, b: SSHServer) -> AsyncIterator[tuple[SSHHost, SSHHost]]:
    async with a.host() as ha, b.host() as hb:
        yield ha, hb


def keys_file(server: SSHServer) -> str:
    return str(server.dir / "authorized_keys")


def make_tree(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(HOSTILE):
        (root / name).write_bytes(f"{i}:{name}\n".encode() * (i + 1))
    sub = root / "sub dir" / "deeper"
    sub.mkdir(parents=True)
    (sub / "data.bin").write_bytes(os.urandom(300_000))
    (root / "sub dir" / "ex.txt").write_text("x")
    (root / "sub dir" / "skip~").write_text("backup")
    os.chmod(root / "sub dir" / "ex.txt", 0o751)
    os.utime(root / "sub dir" / "ex.txt", (1_000_000_000, 1_000_000_000))


def snapshot(root: Path) -> dict[bytes, tuple[int, int, str]]:
    """Every entry below root: relative name (bytes) -> (mode, mtime, sha256 of content)."""
    out: dict[bytes, tuple[int, int, str]] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            digest = ""
            if os.path.isfile(full):
                digest = hashlib.sha256(Path(os.fsdecode(full)).read_bytes()).hexdigest()
            mtime = int(st.st_mtime) if not os.path.isdir(full) else 0
            out[os.path.relpath(full, broot)] = (st.st_mode, mtime, digest)
    return out


def transfer_keys(*servers: SSHServer) -> list[str]:
    lines = []
    for s in servers:
        text = (s.dir / "authorized_keys").read_text()
        lines += [ln for ln in text.splitlines() if "asyncstage-transfer-" in ln]
    return lines


def xfer_dirs() -> set[str]:
    return set(glob.glob("/tmp/asyncstage-xfer-*"))


async def new_xfer_dirs(before: set[str]) -> set[str]:
    """Work dirs that appeared since ``before`` and stay: the suite's other processes make
    and remove their own beside this test (theirs go within seconds, a leftover stays)."""
    with anyio.move_on_after(30):
        while xfer_dirs() - before:  # noqa: ASYNC110
            await anyio.sleep(0.1)
    return xfer_dirs() - before


async def test_round_trip_local_host_host_local(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path
) -> None:
    a, b = servers
    src = tmp_path / "src"
    make_tree(src)
    before = xfer_dirs()
    seen: list[Progress] = []
    async with hosts(a, b) as (ha, hb):
        s1 = await rsync_endpoints(
            [LocalEndpoint(f"{src}/")],
            HostEndpoint(ha, str(tmp_path / "on-a")),
            progress=seen.append,
        )
        assert s1.route == "local->host"
        assert s1.files == len(HOSTILE) + 3
        s2 = await rsync_endpoints(
            [HostEndpoint(ha, str(tmp_path / "on-a") + "/")],
            HostEndpoint(ha, str(tmp_path / "on-a-copy")),
        )
        assert s2.route == "same-host"
        s3 = await rsync_endpoints(
            [HostEndpoint(ha, str(tmp_path / "on-a-copy") + "/")],
            HostEndpoint(hb, str(tmp_path / "on-b")),
            compress=True,
            authorized_keys=keys_file(b),
        )
        assert s3.route == "host->host"
        s4 = await rsync_endpoints(
            [HostEndpoint(hb, str(tmp_path / "on-b") + "/")], LocalEndpoint(str(tmp_path / "back"))
        )
        assert s4.route == "host->local"
    want = snapshot(src)
    for copy in ("on-a", "on-a-copy", "on-b", "back"):
        assert snapshot(tmp_path / copy) == want, copy
    assert seen and seen[-1].bytes_done >= 300_000
    assert any(p.current for p in seen)
    assert transfer_keys(a, b) == []
    assert await new_xfer_dirs(before) == set()


@pytest.mark.parametrize("slash", ["", "/"])
async def test_trailing_slash_matches_plain_rsync(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path, slash: str
) -> None:
    a, b = servers
    src = tmp_path / "dir"
    make_tree(src)
    plain = tmp_path / "plain"
    plain.mkdir()
    await anyio.run_process(["rsync", "-a", f"{src}{slash}", str(plain)])
    async with hosts(a, b) as (ha, hb):
        pairs: list[tuple[str, Endpoint, Endpoint]] = [
            ("up", LocalEndpoint(f"{src}{slash}"), HostEndpoint(ha, str(tmp_path / "up"))),
            ("down", HostEndpoint(ha, f"{src}{slash}"), LocalEndpoint(str(tmp_path / "down"))),
        ]
        for name, source, ep in pairs:
            await rsync_endpoints([source], ep)
            assert snapshot(tmp_path / name) == snapshot(plain), name
        await rsync_endpoints(
            [HostEndpoint(ha, f"{src}{slash}")],
            HostEndpoint(hb, str(tmp_path / "across")),
            authorized_keys=keys_file(b),
        )
        assert snapshot(tmp_path / "across") == snapshot(plain)


async def test_hostile_top_level_source_names(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path
) -> None:
    a, b = servers
    src = tmp_path / "src"
    make_tree(src)
    decoy = src / "starXglobYx"  # would match the glob star*glob?[x] if it were expanded
    decoy.write_text("decoy")
    async with hosts(a, b) as (ha, hb):
        for name in HOSTILE:
            down = tmp_path / "down"
            await rsync_endpoints([HostEndpoint(ha, str(src / name))], LocalEndpoint(f"{down}/"))
            assert os.listdir(down) == [name]
            assert (down / name).read_bytes() == (src / name).read_bytes()
            across = tmp_path / "across"
            await rsync_endpoints(
                [HostEndpoint(ha, str(src / name))],
                HostEndpoint(hb, f"{across}/"),
                authorized_keys=keys_file(b),
            )
            assert os.listdir(across) == [name]
            for d in (down, across):
                (d / name).unlink()
                d.rmdir()


async def test_options_delete_and_several_sources(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path
) -> None:
    a, b = servers
    src = tmp_path / "src"
    make_tree(src)
    other = tmp_path / "other"
    other.mkdir()
    (other / "o.txt").write_text("other")
    dest = tmp_path / "dest"
    async with hosts(a, b) as (ha, hb):
        await rsync_endpoints(
            [HostEndpoint(ha, str(src / "sub dir")), HostEndpoint(ha, str(other) + "/")],
            HostEndpoint(hb, str(dest)),
            options=["--exclude", "*~"],
            authorized_keys=keys_file(b),
        )
        assert sorted(os.listdir(dest)) == ["o.txt", "sub dir"]
        assert not (dest / "sub dir" / "skip~").exists()
        (dest / "stale").write_text("old")
        await rsync_endpoints(
            [LocalEndpoint(str(other) + "/")], HostEndpoint(hb, str(dest)), delete=True
        )
        assert os.listdir(dest) == ["o.txt"]
        with pytest.raises(PathError, match="one host"):
            await rsync_endpoints(
                [HostEndpoint(ha, str(src)), HostEndpoint(hb, str(other))], LocalEndpoint("/x")
            )


async def test_rsync_errors_are_typed(servers: tuple[SSHServer, SSHServer], tmp_path: Path) -> None:
    a, b = servers
    async with hosts(a, b) as (ha, hb):
        with pytest.raises(RsyncError) as info:
            await rsync_endpoints(
                [HostEndpoint(ha, str(tmp_path / "missing"))], LocalEndpoint(str(tmp_path / "x"))
            )
        assert info.value.exit_code == 23
        assert "No such file" in str(info.value)
        with pytest.raises(RsyncError) as info:
            await rsync_endpoints(
                [HostEndpoint(ha, str(tmp_path / "missing"))],
                HostEndpoint(hb, str(tmp_path / "y")),
                authorized_keys=keys_file(b),
            )
        assert info.value.exit_code == 23
        with pytest.raises(RsyncError) as info:
            await rsync_endpoints(
                [LocalEndpoint(str(tmp_path))],
                HostEndpoint(ha, "/x"),
                options=["--no-such-option"],
            )
        assert info.value.exit_code == 1
    assert transfer_keys(a, b) == []


async def test_unmanaged_host_uses_rsync_rsh(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = servers
    async with a.host() as ha:
        await ha.host_public_key()  # pins the key in a.known_hosts
    rsh = (
        f"ssh -F /dev/null -i {a.client_key} -p {a.port} -o BatchMode=yes "
        f"-o UserKnownHostsFile={a.known_hosts} -o StrictHostKeyChecking=yes"
    )
    monkeypatch.setenv("RSYNC_RSH", rsh)
    src = tmp_path / "src"
    make_tree(src)
    await rsync_endpoints(
        [LocalEndpoint(f"{src}/")], UnmanagedEndpoint("root", a.address, str(tmp_path / "u"))
    )
    await rsync_endpoints(
        [UnmanagedEndpoint("root", a.address, str(tmp_path / "u") + "/")],
        LocalEndpoint(str(tmp_path / "back")),
    )
    assert snapshot(tmp_path / "back") == snapshot(src)


async def test_cancelled_direct_transfer_cleans_up(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path
) -> None:
    a, b = servers
    src = _big_tree(tmp_path)
    before = xfer_dirs()
    async with hosts(a, b) as (ha, hb):

        async def copy(on_progress: Callable[[Progress], None]) -> None:
            await rsync_endpoints(
                [HostEndpoint(ha, str(src))],
                HostEndpoint(hb, str(tmp_path / "dst")),
                options=["--bwlimit=1m"],
                progress=on_progress,
                authorized_keys=keys_file(b),
            )

        def during() -> None:
            assert transfer_keys(b), "the temporary key is authorised during the transfer"

        await _cancelled_mid_copy(copy, during)
    assert transfer_keys(a, b) == []
    await _nothing_left(before, src)


async def test_same_host_rsync_is_one_remote_command(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy, its work dir and the dir's removal are one command on the host (each
    command an interpreter's start there), and nothing is left."""
    a, _ = servers
    src = tmp_path / "src"
    make_tree(src)
    commands: list[str] = []
    for method in ("run", "scmd_read"):
        original = getattr(SSHHost, method)

        def counted(self: SSHHost, *cmd: Any, _o: Any = original, **kw: Any) -> Any:
            commands.append(" ".join(map(str, cmd))[:60])
            return _o(self, *cmd, **kw)

        monkeypatch.setattr(SSHHost, method, counted)
    before = xfer_dirs()
    async with a.host() as ha:
        stats = await rsync_endpoints(
            [HostEndpoint(ha, f"{src}/")], HostEndpoint(ha, str(tmp_path / "copy"))
        )
    assert stats.route == "same-host"
    assert len(commands) == 1, commands
    assert snapshot(tmp_path / "copy") == snapshot(src)
    assert await new_xfer_dirs(before) == set()


async def test_cancelled_same_host_rsync_is_stopped(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path
) -> None:
    a, _ = servers
    src = _big_tree(tmp_path)
    before = xfer_dirs()
    async with a.host() as ha:

        async def copy(on_progress: Callable[[Progress], None]) -> None:
            await rsync_endpoints(
                [HostEndpoint(ha, str(src))],
                HostEndpoint(ha, str(tmp_path / "dst")),
                options=["--bwlimit=1m"],
                progress=on_progress,
            )

        def during() -> None:
            assert xfer_dirs() - before, "the copy runs in a work dir of its own"

        await _cancelled_mid_copy(copy, during)
    await _nothing_left(before, src)


def _big_tree(tmp_path: Path) -> Path:
    src = tmp_path / "big"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(4 << 20))
    return src


async def _cancelled_mid_copy(
    copy: Callable[[Callable[[Progress], None]], Awaitable[None]], during: Callable[[], None]
) -> None:
    """Start ``copy``, and once bytes have moved check ``during`` and cancel it."""
    started = anyio.Event()

    def on_progress(p: Progress) -> None:
        if p.bytes_done > 0:
            started.set()

    with anyio.move_on_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(copy, on_progress)
            await started.wait()
            during()
            tg.cancel_scope.cancel()
    assert started.is_set()


async def _nothing_left(before: set[str], src: Path) -> None:
    """No work dir left, and the rsync processes of ``src`` end."""
    assert await new_xfer_dirs(before) == set()
    with anyio.fail_after(10):
        while _rsync_pids(str(src)):  # noqa: ASYNC110
            await anyio.sleep(0.05)


def _rsync_pids(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"rsync" in cmd and marker.encode() in cmd:
                found.append(int(pid))
    return found


async def test_concurrent_host_to_host(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path
) -> None:
    a, b = servers
    srcs = []
    for i in range(8):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / "data").write_bytes(os.urandom(200_000 + i))
        srcs.append(d)
    results: dict[int, transfer.TransferStats] = {}
    async with hosts(a, b) as (ha, hb):

        async def one(i: int) -> None:
            results[i] = await rsync_endpoints(
                [HostEndpoint(ha, f"{srcs[i]}/")],
                HostEndpoint(hb, str(tmp_path / f"d{i}")),
                authorized_keys=keys_file(b),
            )

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
    assert len(results) == 8
    for i in range(8):
        assert (tmp_path / f"d{i}" / "data").read_bytes() == (srcs[i] / "data").read_bytes()
    assert transfer_keys(a, b) == []


# -- dd on loop devices ---------------------------------------------------------------


class Loop:
    def __init__(self, image: Path, size: int) -> None:
        self.image = image
        with image.open("wb") as f:
            f.truncate(size)
        self.device = subprocess.run(
            ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()

    def write(self, offset: int, data: bytes) -> None:
        fd = os.open(self.device, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, size: int) -> bytes:
        with open(self.device, "rb") as f:
            return f.read(size)

    def allocated(self) -> int:
        return os.stat(self.image).st_blocks * 512

    def close(self) -> None:
        subprocess.run(["losetup", "-d", self.device], check=False)
        self.image.unlink(missing_ok=True)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Callable[[int], Loop]]:
    made: list[Loop] = []

    def make(size: int) -> Loop:
        loop = Loop(tmp_path / f"disk{len(made)}.img", size)
        made.append(loop)
        return loop

    try:
        yield make
    finally:
        for loop in made:
            loop.close()


MiB = 1 << 20


@pytest.mark.parametrize("compress", [False, "zstd", "gzip"])
async def test_dd_between_hosts_stays_sparse(
    servers: tuple[SSHServer, SSHServer], loops: Callable[[int], Loop], compress: Any
) -> None:
    a, b = servers
    src, dst = loops(64 * MiB), loops(80 * MiB)
    data = os.urandom(3 * MiB)
    src.write(10 * MiB, data)
    src.write(40 * MiB + 123, b"tail")
    dst.write(20 * MiB, os.urandom(5 * MiB))  # old contents that must vanish
    seen: list[Progress] = []
    async with hosts(a, b) as (ha, hb):
        stats = await dd_endpoints(
            HostEndpoint(ha, src.device),
            HostEndpoint(hb, dst.device),
            compress=compress,
            progress=seen.append,
            authorized_keys=keys_file(b),
        )
    assert stats.route == "dd-host->host"
    assert stats.size == 64 * MiB
    assert stats.bytes == 4 * MiB  # three data chunks and the one holding "tail"
    assert dst.read(64 * MiB) == src.read(64 * MiB)
    assert dst.allocated() <= 5 * MiB  # sparse: the data, not the zeros nor the old data
    assert seen and seen[-1].bytes_done == 64 * MiB and seen[-1].total == 64 * MiB
    assert transfer_keys(a, b) == []


async def test_dd_same_host_and_checks(
    servers: tuple[SSHServer, SSHServer],
    loops: Callable[[int], Loop],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = servers
    src, dst, small = loops(32 * MiB), loops(32 * MiB), loops(16 * MiB)
    src.write(5 * MiB, os.urandom(MiB))
    dst.write(0, os.urandom(2 * MiB))
    async with hosts(a, b) as (ha, hb):
        stats = await dd_endpoints(HostEndpoint(ha, src.device), HostEndpoint(ha, dst.device))
        assert stats.route == "dd-same-host"
        assert dst.read(32 * MiB) == src.read(32 * MiB)
        assert dst.allocated() <= 2 * MiB
        with pytest.raises(InvalidArgument, match="smaller"):
            await dd_endpoints(HostEndpoint(ha, src.device), HostEndpoint(hb, small.device))
        with pytest.raises(InvalidArgument, match="same device"):
            await dd_endpoints(HostEndpoint(ha, src.device), HostEndpoint(ha, src.device))
        # A receiver that flips a bit of what it writes: the verification must notice.
        remote_faults.inject(monkeypatch, "blockcopy", "flip_written_bit")
        with pytest.raises(VerifyFailed) as info:
            await dd_endpoints(
                HostEndpoint(ha, src.device),
                HostEndpoint(hb, dst.device),
                authorized_keys=keys_file(b),
            )
        assert info.value.source_digest != info.value.destination_digest
    assert transfer_keys(a, b) == []


async def test_host_limit_bounds_concurrency(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path
) -> None:
    a, _ = servers
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(2 << 20))
    async with a.host() as ha:
        transfer.set_host_limit(ha, 2)
        limiter = transfer.host_limiter(ha)
        peak = 0

        def on_progress(p: Progress) -> None:
            nonlocal peak
            peak = max(peak, limiter.borrowed_tokens)

        async def one(i: int) -> None:
            await rsync_endpoints(
                [LocalEndpoint(f"{src}/")],
                HostEndpoint(ha, str(tmp_path / f"d{i}")),
                options=["--bwlimit=20m"],
                progress=on_progress,
            )

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, i)
        assert 1 <= peak <= 2
        for i in range(6):
            assert (tmp_path / f"d{i}" / "data").read_bytes() == (src / "data").read_bytes()
        with pytest.raises(InvalidArgument):
            transfer.set_host_limit(ha, 0)
