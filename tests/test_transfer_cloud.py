"""Transfers end to end on the local cloud: every path form, routes, dd of volumes.

One cloud, one manager and two servers (one zone) for the whole module.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
from pathlib import Path

import anyio
import pytest

from asyncstage import transfer
from asyncstage.errors import (
    PathError,
    UnknownServer,
    VerifyFailed,
    VolumeMounted,
)
from asyncstage.paths import RemotePath
from asyncstage.server import Server
from asyncstage.transfer import Progress
from asyncstage.volume import Volume
from tests import remote_faults
from tests.fixtures.cloud import Env

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud, pytest.mark.slow]

MiB = 1 << 20
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
]


def mounted(volume: Volume) -> bool:
    return volume.mounted


def make_tree(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(HOSTILE):
        (root / name).write_bytes(f"{i}:{name}\n".encode() * (i + 1))
    (root / "sub dir").mkdir()
    (root / "sub dir" / "data.bin").write_bytes(os.urandom(200_000))
    (root / "sub dir" / "ex").write_text("x")
    os.chmod(root / "sub dir" / "ex", 0o750)


def snapshot(root: Path) -> dict[bytes, tuple[int, str]]:
    out: dict[bytes, tuple[int, str]] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            digest = ""
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(full, broot)] = (os.lstat(full).st_mode, digest)
    return out


async def remote_listing(server: Server, path: str) -> list[str]:
    out = await server.scmd(
        "python3",
        "-c",
        "import os,sys,json;print(json.dumps(sorted(os.listdir(sys.argv[1]))))",
        path,
        sudo=True,
    )
    import json

    result: list[str] = json.loads(out)
    return result


async def leftovers(server: Server) -> tuple[list[str], list[str]]:
    """Temporary transfer keys in the login user's authorized_keys, and temporary dirs."""
    keys = await server.scmd("cat", ".ssh/authorized_keys")
    dirs = await server.scmd(
        "python3",
        "-c",
        "import glob;print('\\n'.join(glob.glob('/tmp/asyncstage-xfer-*')))",
        sudo=True,
    )
    return (
        [ln for ln in keys.splitlines() if "asyncstage-transfer-" in ln],
        [d for d in dirs.splitlines() if d],
    )


async def test_every_path_form(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, s1, s2 = env.manager, env.s1, env.s2
    src = tmp_path / "src"
    make_tree(src)
    want = snapshot(src)
    vol = await s1.provision_volume(size=1)
    try:
        # local -> server absolute, server relative (home), volume root, volume:/sub, volume/sub
        await transfer.rsync(m, f"{src}/", f"{s1}:/srv/abs")
        await transfer.rsync(m, f"{src}/", f"{s1}:reldir")
        await transfer.rsync(m, f"{src}/", f"{vol}")
        await transfer.rsync(m, f"{src}/", f"{vol}:/colon")
        await transfer.rsync(m, f"{src}/", f"{vol}/slash")
        await transfer.rsync(m, f"{src}/", RemotePath(vol, "typed"))
        await transfer.rsync(m, f"{src}/", RemotePath(s2, "/srv/typed"))
        assert "sp ace" in await remote_listing(s1, "/srv/abs")
        assert "sp ace" in await remote_listing(s1, "/home/admin/reldir")
        for sub in ("", "colon", "slash", "typed"):
            assert "sub dir" in await remote_listing(s1, f"{vol.mtpt}/{sub}")
        # back to local from each form, compared with the original tree
        for i, path in enumerate(
            [
                f"{s1}:/srv/abs/",
                f"{s1}:reldir/",
                f"{vol}:/colon/",
                f"{vol}/slash/",
                RemotePath(vol, "typed/"),
                RemotePath(s2, "/srv/typed/"),
            ]
        ):
            await transfer.rsync(m, path, str(tmp_path / f"back{i}"))
            assert snapshot(tmp_path / f"back{i}") == want, path
        # several sources and the ":/" shorthand
        await transfer.rsync(m, f"{vol}:/colon/sub dir", ":/slash/sp ace", str(tmp_path / "multi"))
        assert sorted(os.listdir(tmp_path / "multi")) == ["sp ace", "sub dir"]
        await transfer.rsync(m, f"{s1}:/srv/abs/sp ace", ":/srv/abs/-dash", f"{s2}:/srv/multi/")
        assert await remote_listing(s2, "/srv/multi") == ["-dash", "sp ace"]
        # an unmanaged user@host (the user's own ssh, here through RSYNC_RSH)
        rsh = (
            f"ssh -F /dev/null -i {m.keyfile} -o IdentitiesOnly=yes -o BatchMode=yes "
            f"-o UserKnownHostsFile={m.known_hosts.path} -o StrictHostKeyChecking=yes"
        )
        monkeypatch.setenv("RSYNC_RSH", rsh)
        await transfer.rsync(m, f"{src}/", f"admin@{s2.address}:unmanaged")
        await transfer.rsync(m, f"admin@{s2.address}:unmanaged/", str(tmp_path / "um"))
        assert snapshot(tmp_path / "um") == want
        # unmanaged -> server: relayed through this machine
        stats = await transfer.rsync(m, f"admin@{s2.address}:unmanaged/", f"{s1}:/srv/x")
        assert stats.route == "unmanaged->host"
        assert "sp ace" in await remote_listing(s1, "/srv/x")
    finally:
        await vol.delete()


async def test_sources_on_two_hosts_refused_before_copying(env: Env, tmp_path: Path) -> None:
    m, s1, s2 = env.manager, env.s1, env.s2
    with pytest.raises(PathError, match="one host"):
        await transfer.rsync(m, f"{s1}:/etc/hostname", f"{s2}:/etc/hostname", str(tmp_path / "x"))
    with pytest.raises(PathError, match="one host"):
        await transfer.rsync(m, str(tmp_path), f"{s2}:/etc/hostname", f"{s1}:/srv/x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UnknownServer):
        await transfer.rsync(m, "i-00000000000000000:/x", str(tmp_path / "y"))
    with pytest.raises(PathError):
        await transfer.rsync(m, str(tmp_path))


@pytest.mark.parametrize("slash", ["", "/"])
async def test_trailing_slash_like_plain_rsync(env: Env, tmp_path: Path, slash: str) -> None:
    m, s1 = env.manager, env.s1
    src = tmp_path / "dir"
    make_tree(src)
    plain = tmp_path / "plain"
    plain.mkdir()
    await anyio.run_process(["rsync", "-a", f"{src}{slash}", str(plain)])
    await transfer.rsync(m, f"{src}{slash}", f"{s1}:/srv/slash{len(slash)}")
    await transfer.rsync(m, f"{s1}:/srv/slash{len(slash)}/", str(tmp_path / "back"))
    assert snapshot(tmp_path / "back") == snapshot(plain)


async def test_round_trip_and_unmounted_volume(env: Env, tmp_path: Path) -> None:
    m, s1, s2 = env.manager, env.s1, env.s2
    src = tmp_path / "src"
    make_tree(src)
    vol = await s2.provision_volume(size=1)
    try:
        await vol.unmount()
        assert not vol.mounted
        await transfer.rsync(m, f"{src}/", f"{s1}:/srv/rt")
        stats = await transfer.rsync(m, f"{s1}:/srv/rt/", f"{vol}:/rt", compress=True)
        assert stats.route == "host->host"
        assert mounted(vol)  # mounted for the transfer
        await transfer.rsync(m, f"{vol}:/rt/", str(tmp_path / "back"))
        assert snapshot(tmp_path / "back") == snapshot(src)
        for server in (s1, s2):
            assert await leftovers(server) == ([], [])
    finally:
        await vol.delete()


async def test_killed_transfer_leaves_no_key(env: Env, tmp_path: Path) -> None:
    m, s1, s2 = env.manager, env.s1, env.s2
    await s1.run("mkdir", "-p", "/srv/big", sudo=True)
    for i in range(4):
        await s1.run(
            "dd",
            "if=/dev/urandom",
            f"of=/srv/big/f{i}",
            "bs=1M",
            "count=4",
            "status=none",
            sudo=True,
        )
    started = anyio.Event()

    def on_progress(p: Progress) -> None:
        if p.bytes_done > 0:
            started.set()

    with anyio.move_on_after(60):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await transfer.rsync(
                    m,
                    f"{s1}:/srv/big",
                    f"{s2}:/srv/big",
                    options=["--bwlimit=1m"],
                    progress=on_progress,
                )

            tg.start_soon(run)
            await started.wait()
            keys, _ = await leftovers(s2)
            assert keys, "the temporary key is authorised during the transfer"
            tg.cancel_scope.cancel()
    assert started.is_set()
    for server in (s1, s2):
        assert await leftovers(server) == ([], [])
    running = await s1.scmd(
        "python3",
        "-c",
        "import os\nfor p in os.listdir('/proc'):\n"
        "  try: c=open('/proc/%s/cmdline'%p,'rb').read()\n  except Exception: continue\n"
        "  if c.split(b'\\0')[0].endswith(b'rsync') and b'/srv/big' in c: print(p)",
        sudo=True,
    )
    assert running.strip() == ""


async def test_eight_concurrent_server_to_server(env: Env) -> None:
    m, s1, s2 = env.manager, env.s1, env.s2
    for i in range(8):
        await s1.run("mkdir", "-p", f"/srv/c{i}", sudo=True)
        await s1.run(
            "dd",
            "if=/dev/urandom",
            f"of=/srv/c{i}/data",
            "bs=64k",
            f"count={4 + i}",
            "status=none",
            sudo=True,
        )
    results: dict[int, transfer.TransferStats] = {}

    async def one(i: int) -> None:
        results[i] = await transfer.rsync(m, f"{s1}:/srv/c{i}/", f"{s2}:/srv/c{i}")

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(one, i)
    assert sorted(results) == list(range(8))
    for i in range(8):
        a = await s1.scmd("sha256sum", f"/srv/c{i}/data", sudo=True)
        b = await s2.scmd("sha256sum", f"/srv/c{i}/data", sudo=True)
        assert a.split()[0] == b.split()[0]
    for server in (s1, s2):
        assert await leftovers(server) == ([], [])


def image_blocks(env: Env, volume: Volume) -> int:
    return os.stat(Path(env.cloud.state_dir) / "volumes" / f"{volume}.img").st_blocks * 512


async def test_dd_volume_to_volume_across_servers(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, s1, s2 = env.manager, env.s1, env.s2
    src = await s1.provision_volume(size=2)
    dst = await s2.provision_volume(size=2, fstype="raw")
    try:
        assert src.mtpt is not None
        await s1.run(
            "dd",
            "if=/dev/urandom",
            f"of={src.mtpt}/data",
            "bs=1M",
            "count=100",
            "status=none",
            sudo=True,
        )
        want = await s1.scmd("sha256sum", f"{src.mtpt}/data", sudo=True)
        with pytest.raises(VolumeMounted):
            await transfer.dd(m, src, dst)
        seen: list[Progress] = []
        stats = await transfer.dd(m, src, dst, unmount=True, compress=True, progress=seen.append)
        assert not src.mounted
        assert stats.route == "dd-host->host"
        assert stats.size == 2 << 30
        assert 100 * MiB <= stats.bytes < 200 * MiB
        assert seen and seen[-1].bytes_done == 2 << 30
        # sparse: the destination holds the data, not 2 GiB
        assert image_blocks(env, dst) < 200 * MiB
        assert image_blocks(env, dst) <= image_blocks(env, src) + 8 * MiB
        # the copy is a working filesystem with the same data
        dst.fstype = "ext4"
        await dst.mount()
        assert dst.mtpt is not None
        got = await s2.scmd("sha256sum", f"{dst.mtpt}/data", sudo=True)
        assert got.split()[0] == want.split()[0]
        await dst.unmount()
        # a receiver that corrupts what it writes is caught by the verification
        remote_faults.inject(monkeypatch, "blockcopy", "flip_written_bit")
        with pytest.raises(VerifyFailed):
            await transfer.dd(m, src, dst)
        for server in (s1, s2):
            assert await leftovers(server) == ([], [])
    finally:
        for vol in (src, dst):
            await vol.delete()


async def test_dd_of_an_ext4_volume_reads_only_what_it_uses(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """The copier reads an ext4 volume's used blocks only (its block bitmaps): the copy
    is the same filesystem, clean for fsck, with the same files."""
    m, s1, s2 = env.manager, env.s1, env.s2
    src = await s1.provision_volume(size=1)
    dst = await s2.provision_volume(size=1, fstype="raw")
    try:
        assert src.mtpt is not None
        # files spread over the filesystem by the kernel, then some deleted: their
        # bytes stay in blocks the bitmaps call free
        fill = (
            "for i in $(seq 1 40); do mkdir -p d$((i % 8)); "
            "head -c $((i * 91237)) /dev/urandom > d$((i % 8))/f$i; done; "
            "yes DELETED-BYTES | head -c 40M > gone; sync; rm -r d1 gone; sync"
        )
        listing = "find . -type f | sort | xargs sha256sum"
        await s1.scmd("sh", "-c", f"cd {src.mtpt} && {fill}", sudo=True)
        want = await s1.scmd("sh", "-c", f"cd {src.mtpt} && {listing}", sudo=True)
        await src.unmount()
        caplog.set_level(logging.DEBUG, "asyncstage.transfer")
        stats = await m.dd(src, dst)  # verified
        details = [r.getMessage() for r in caplog.records if ": details " in r.getMessage()]
        result = ast.literal_eval(details[-1].split(": details ", 1)[1])
        assert result["layout"] == "ext"
        assert stats.bytes <= result["read_bytes"] < 400 * MiB  # not the whole 1 GiB
        assert result["dest_sha256"] == result["source_sha256"] == stats.digest
        # blocks="all": a byte-for-byte image, the deleted files' bytes included
        whole = await m.dd(src, dst, blocks="all", verify=False)
        details = [r.getMessage() for r in caplog.records if ": details " in r.getMessage()]
        result = ast.literal_eval(details[-1].split(": details ", 1)[1])
        assert result["layout"] == "device" and result["read_bytes"] == 1 << 30
        assert whole.bytes >= stats.bytes + 30 * MiB  # the 40 MiB deleted, nearly all
        await s2.scmd("e2fsck", "-fn", str(dst.mtdev), sudo=True)
        dst.fstype = "ext4"
        await dst.mount()
        assert dst.mtpt is not None
        assert await s2.scmd("sh", "-c", f"cd {dst.mtpt} && {listing}", sudo=True) == want
    finally:
        for vol in (src, dst):
            await vol.delete()


async def test_dd_same_server(env: Env) -> None:
    m, s1 = env.manager, env.s1
    src = await s1.provision_volume(size=1)
    dst = await s1.provision_volume(size=1, fstype="raw")
    try:
        assert src.mtpt is not None
        await s1.run("cp", "/etc/hostname", f"{src.mtpt}/h", sudo=True)
        await src.unmount()
        stats = await transfer.dd(m, src.volume_id, dst)
        assert stats.route == "dd-same-host"
        assert stats.digest
    finally:
        for vol in (src, dst):
            await vol.delete()


async def test_put_get_copy_methods(env: Env, tmp_path: Path) -> None:
    """Server.put/get, Volume.put/get/copy and Manager.rsync, with every kind of path."""
    s1, s2 = env.s1, env.s2
    src = tmp_path / "src"
    make_tree(src)
    want = snapshot(src)
    vol = await s2.provision_volume(size=1)
    try:
        await s1.put(f"{src}/", "/srv/put")
        await s1.get("/srv/put/", str(tmp_path / "got"))
        assert snapshot(tmp_path / "got") == want
        await s1.put(f"{src}/", f"{vol}:/from-put")  # a volume elsewhere
        await vol.put(f"{src}/sub dir", f"{src}/sp ace")
        await vol.put(f"{src}/", dest="deep/")
        assert sorted(await remote_listing(s2, str(vol.mtpt))) == [
            "deep",
            "from-put",
            "lost+found",
            "sp ace",
            "sub dir",
        ]
        await vol.get("deep/", ":/from-put/-dash", str(tmp_path / "vget"))
        assert set(os.listdir(tmp_path / "vget")) == set(os.listdir(src))
        await vol.copy(f"{s1}:/srv/vcopy")
        assert "lost+found" in await remote_listing(s1, "/srv/vcopy")
        await env.manager.rsync(vol / "deep", f"{s1}:/srv/typed")  # typed volume path
        assert sorted(await remote_listing(s1, "/srv/typed/deep")) == sorted(os.listdir(src))
        await s2.rsync(f"{s1}:/srv/typed/deep/", str(tmp_path / "srv-rsync"))
        assert snapshot(tmp_path / "srv-rsync") == want
        with pytest.raises(PathError):
            await s1.put("/only-one")
    finally:
        await vol.delete()


async def test_dd_methods(env: Env) -> None:
    """Volume.dd and Server.dd: verified block copies between unmounted volumes."""
    a = await env.s1.provision_volume(size=1)
    b = await env.s2.provision_volume(size=1)
    c = await env.s2.provision_volume(size=1, fstype="raw")
    try:
        await a.cmd("sh", "-c", "echo dd-method > marker")
        with pytest.raises(VolumeMounted):
            await a.dd(b)
        await a.unmount()
        stats = await a.dd(b, unmount=True)
        assert stats.digest and stats.size == 1 << 30
        again = await env.s1.dd(b, c)
        assert again.digest == stats.digest
        await b.mount()
        assert (await b.cmd("cat", "marker")).strip() == "dd-method"
    finally:
        for vol in (a, b, c):
            await vol.delete()
