"""Unmanaged ``user@host`` ↔ managed server or volume, relayed through this machine.

The "unmanaged host" is a real sshd on 127.0.0.x (root, high port) reached through
``RSYNC_RSH``, as a user's own ssh set-up would; it shares this machine's filesystem.
The managed side is a server of the session's shared local cloud.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from asyncstage.errors import RsyncError
from asyncstage.localcloud import LocalCloud
from asyncstage.server import Server
from asyncstage.transfer import Progress
from tests.sshd import SSHServer

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud, pytest.mark.slow]


@dataclass
class Env:
    server: Server
    unmanaged: SSHServer

    def at(self, path: Path | str) -> str:
        """``root@127.0.0.x:path`` on the unmanaged host."""
        return f"root@{self.unmanaged.address}:{path}"


@pytest.fixture(scope="module")
async def env(
    cloud: LocalCloud,
    sshd_factory: Callable[..., SSHServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Env]:
    """One managed server, and one sshd standing for an unmanaged host."""
    unmanaged = sshd_factory(address="127.0.0.41")
    async with cloud.manager(
        dotdir=tmp_path_factory.mktemp("unmanaged-dotdir"),
        on_exit="terminate",
        scan=False,
        poll_interval=0.1,
    ) as manager:
        (server,) = await manager.provision_servers(1)
        yield Env(server, unmanaged)


@pytest.fixture(autouse=True)
def rsync_rsh(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's own ssh set-up for the unmanaged host: its key, pinned host key, port."""
    u = env.unmanaged
    u.known_hosts.write_text(f"[{u.address}]:{u.port} {u.host_public_key}\n")
    monkeypatch.setenv(
        "RSYNC_RSH",
        f"ssh -F /dev/null -i {u.client_key} -p {u.port} -o IdentitiesOnly=yes "
        f"-o BatchMode=yes -o UserKnownHostsFile={u.known_hosts} -o StrictHostKeyChecking=yes",
    )


def relay_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "asyncstage-relay-*")))


@pytest.fixture(autouse=True)
def no_relay_dir_left() -> object:
    before = relay_dirs()
    yield
    assert relay_dirs() - before == set()


def make_tree(root: Path) -> None:
    (root / "sub dir").mkdir(parents=True)
    (root / "sp ace").write_text("space\n")
    (root / "-dash").write_text("dash\n")
    (root / "sub dir" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "sub dir" / "ex").write_text("x")
    os.chmod(root / "sub dir" / "ex", 0o751)
    os.utime(root / "sub dir" / "ex", (1_000_000_000, 1_000_000_000))


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Relative name -> (mode, mtime of files, sha256 of files)."""
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            digest, mtime = "", 0
            if os.path.isfile(full):
                digest = hashlib.sha256(Path(full).read_bytes()).hexdigest()
                mtime = int(st.st_mtime)
            out[os.path.relpath(full, root)] = (st.st_mode, mtime, digest)
    return out


async def listing(server: Server, path: str) -> list[str]:
    out = await server.scmd(
        "python3",
        "-c",
        "import os,sys,json;print(json.dumps(sorted(os.listdir(sys.argv[1]))))",
        path,
        sudo=True,
    )
    result: list[str] = json.loads(out)
    return result


async def test_unmanaged_to_server_and_back(env: Env, tmp_path: Path) -> None:
    server = env.server
    src = tmp_path / "src"
    make_tree(src)
    seen: list[Progress] = []
    stats = await server.put(env.at(f"{src}/"), "/srv/um", progress=seen.append)
    assert stats.route == "unmanaged->host"
    assert stats.files == 4 and stats.bytes >= 300_000
    assert sorted(await listing(server, "/srv/um")) == ["-dash", "sp ace", "sub dir"]
    assert seen and seen[-1].bytes_done >= 2 * 300_000  # both legs counted
    # without the trailing slash: the directory itself
    await server.put(env.at(src), "/srv/um2")
    assert await listing(server, "/srv/um2") == ["src"]
    # several sources
    await server.put(env.at(src / "sp ace"), env.at(src / "sub dir"), "/srv/um3/")
    assert await listing(server, "/srv/um3") == ["sp ace", "sub dir"]
    # back: server -> unmanaged, contents and not
    stats = await server.get("/srv/um/", env.at(tmp_path / "back"))
    assert stats.route == "host->unmanaged"
    assert snapshot(tmp_path / "back") == snapshot(src)
    await server.get("/srv/um2/src", env.at(tmp_path / "back2"))
    assert snapshot(tmp_path / "back2" / "src") == snapshot(src)
    # a single file to a new name stays a file
    await server.get("/srv/um/sp ace", env.at(tmp_path / "renamed"))
    assert (tmp_path / "renamed").read_text() == "space\n"
    # delete applies to the final leg: a mirror of the source
    (tmp_path / "back" / "extra").write_text("extra")
    await server.get("/srv/um/", env.at(tmp_path / "back"), delete=True)
    assert snapshot(tmp_path / "back") == snapshot(src)


async def test_unmanaged_to_volume_and_back(env: Env, tmp_path: Path) -> None:
    server = env.server
    src = tmp_path / "src"
    make_tree(src)
    vol = await server.provision_volume(size=1)
    try:
        await server.put(env.at(f"{src}/"), f"{vol}/sub")
        assert sorted(await listing(server, f"{vol.mtpt}/sub")) == ["-dash", "sp ace", "sub dir"]
        await server.get(f"{vol}/sub/", env.at(tmp_path / "back"))
        assert snapshot(tmp_path / "back") == snapshot(src)
        await vol.get("sub", env.at(tmp_path / "back2"))
        assert snapshot(tmp_path / "back2" / "sub") == snapshot(src)
    finally:
        await vol.delete()


async def test_failed_relay_raises_and_cleans_up(env: Env, tmp_path: Path) -> None:
    with pytest.raises(RsyncError):
        await env.server.put(env.at(tmp_path / "no-such-dir"), "/srv/never")
    with pytest.raises(RsyncError):
        await env.server.get("/no/such/path", env.at(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


async def test_cancelled_relay_cleans_up(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(8 << 20))
    with anyio.CancelScope() as scope:

        def on_progress(p: Progress) -> None:
            if p.bytes_done > (8 << 20):  # in the final leg
                scope.cancel()

        # the final leg slowed down (options apply to it) so that it is cancelled midway
        await env.server.put(
            env.at(f"{src}/"), "/srv/cancelled", options=["--bwlimit=1000"], progress=on_progress
        )
    assert scope.cancelled_caught
