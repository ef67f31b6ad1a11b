"""Every source form of a backup, from the library and the command line's parsing: a local
path, ``SERVER:/path`` by name, ``VOLUME:/sub``, and ``user@host:/path`` (a pull backup
from a real sshd reached with the user's own ssh set-up)."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from asyncstage import Manager, Server, backup, remote
from asyncstage.backup.manifest import MANIFEST_NAME
from asyncstage.backup.sizes import size_for
from asyncstage.backup.sources import measure, plan_sources
from asyncstage.errors import InvalidArgument, NotFound, RsyncError
from asyncstage.localcloud import LocalCloud
from tests.backup_support import NOTHING, leftovers, manager_dropping
from tests.sshd import SSHServer

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]


manager = manager_dropping("mixed")


@pytest.fixture
def unmanaged(sshd_factory: Callable[..., SSHServer], monkeypatch: pytest.MonkeyPatch) -> SSHServer:
    """An sshd standing for any ssh host, reached through the user's own ``RSYNC_RSH``."""
    u = sshd_factory(address="127.0.0.43")
    u.known_hosts.write_text(f"[{u.address}]:{u.port} {u.host_public_key}\n")
    monkeypatch.setenv(
        "RSYNC_RSH",
        f"ssh -F /dev/null -i {u.client_key} -p {u.port} -o IdentitiesOnly=yes "
        f"-o BatchMode=yes -o UserKnownHostsFile={u.known_hosts} -o StrictHostKeyChecking=yes",
    )
    return u


async def test_server_volume_ssh_and_local_sources_in_one_backup(
    manager: Manager, unmanaged: SSHServer, tmp_path: Path
) -> None:
    web = await manager.provision_server("src-web")
    await web.scmd("sh", "-c", "mkdir -p /srv/app && echo served > /srv/app/index.html", sudo=True)
    data = await web.provision_volume("src-data", size=1)
    await web.scmd(
        "sh", "-c", f"mkdir -p {data.mtpt}/db && echo rows > {data.mtpt}/db/t", sudo=True
    )
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    (pulled / "far.txt").write_text("from afar\n")
    local = tmp_path / "local"
    local.mkdir()
    (local / "near.txt").write_text("near\n")

    sources = [
        "src-web:/srv/app",
        "src-data:/db",
        f"root@{unmanaged.address}:{pulled}",
        str(local),
    ]
    done = await backup.backup(manager, "mixed", sources, server=web)
    assert done.files == 4 and done.previous_snapshot_id is None

    async with backup.snapshot_volume(manager, "mixed", server=web) as vol:
        found = await web.scmd("sh", "-c", f"cd {vol.mtpt} && find . -type f | sort", sudo=True)
        far = f"./root@{unmanaged.address}{pulled}/far.txt"
        listed = [
            "./src-data/db/t",
            "./src-web/srv/app/index.html",
            far,
            f".{local}/near.txt",
            f"./{MANIFEST_NAME}",  # the backup's own list of its files
        ]
        assert found.split() == sorted(listed)  # no provisional manifest
        # whatever the route, the manifest is the one a plain pass writes, byte for byte
        plain = await remote.run_json(web.host, True, "manifest", "write", str(vol.mtpt))
        assert plain["sha256"] == done.manifest_sha256
    again = await backup.backup(manager, "mixed", sources, server=web)
    assert again.files == 0 and again.previous_snapshot_id == done.snapshot_id  # incremental
    assert manager.volumes() == [data]
    await data.delete()


async def test_a_whole_volume_rerun_hashes_only_what_changed(manager: Manager) -> None:
    # one whole volume is copied into the work volume's root, with --delete: the manifest
    # the previous snapshot left there must survive the copy for its digests to be reused
    host = await manager.provision_server("src-whole")
    data = await host.provision_volume("whole-data", size=1)
    fill = f"cd {data.mtpt} && for i in 1 2 3 4; do echo file $i > f$i; done"
    await host.scmd("sh", "-c", fill, sudo=True)
    first = await backup.backup(manager, "whole", ["whole-data:"], server=host)
    assert (first.files, first.manifest_reused) == (4, 0)
    await host.scmd("sh", "-c", f"echo changed > {data.mtpt}/f2", sudo=True)
    again = await backup.backup(manager, "whole", ["whole-data:"], server=host)
    assert again.previous_snapshot_id == first.snapshot_id
    assert again.manifest_reused == 3  # f1, f3, f4: their digests from the earlier manifest
    assert again.manifest_followed + again.manifest_reused <= 4
    assert again.manifest_hashed <= len("changed\n")
    async with backup.snapshot_volume(manager, "whole", server=host) as vol:
        top = (await host.scmd("ls", "-A", str(vol.mtpt), sudo=True)).split()
    assert sorted(top) == sorted(["f1", "f2", "f3", "f4", "lost+found", MANIFEST_NAME])
    await data.delete()


async def test_an_unreachable_ssh_host_fails_that_backup_cleanly(
    manager: Manager, unmanaged: SSHServer, cloud: LocalCloud
) -> None:
    server = await manager.get_server("backup-host")
    made = cloud.api_calls["CreateVolume"]
    # nothing listens on 127.0.0.44 at the sshd's port (RSYNC_RSH names the port)
    with pytest.raises(RsyncError, match="Connection refused"):
        await backup.backup(manager, "mixed", ["root@127.0.0.44:/srv"], server=server)
    assert cloud.api_calls["CreateVolume"] == made  # found while measuring: nothing made
    assert manager.volumes() == []
    assert await leftovers(manager, "mixed") == NOTHING
    assert await manager.snapshots("mixed") == []


async def test_an_ssh_hosts_data_is_measured_over_its_own_ssh(
    manager: Manager, unmanaged: SSHServer, tmp_path: Path
) -> None:
    # the work volume is sized from the data, as for a server's: a 3 GiB (sparse) file on
    # the host, whose apparent size rsync would copy, asks for more than the 1 GiB minimum
    far = tmp_path / "far"
    far.mkdir()
    (far / "big.img").write_bytes(b"")
    os.truncate(far / "big.img", 3 << 30)
    (far / "small.txt").write_text("x" * 1000)
    empty_dirs = os.path.join(tempfile.gettempdir(), "asyncstage-measure-*")
    before = set(glob.glob(empty_dirs))
    groups = plan_sources(manager, [f"root@{unmanaged.address}:{far}"])
    assert await measure(groups) == size_for((3 << 30) + 1000)
    with pytest.raises(RsyncError, match="No such file or directory"):
        await measure(plan_sources(manager, [f"root@{unmanaged.address}:{far}/missing"]))
    assert set(glob.glob(empty_dirs)) <= before  # the dry runs' empty directories removed


async def test_bad_sources_are_typed_errors_before_anything_is_made(
    manager: Manager, tmp_path: Path
) -> None:
    with pytest.raises(NotFound, match="no server or volume named 'nosuch'"):
        plan_sources(manager, ["nosuch:/srv"])
    with pytest.raises(InvalidArgument, match="does not exist"):
        plan_sources(manager, [tmp_path / "missing"])
    with pytest.raises(InvalidArgument, match="nothing to back up"):
        plan_sources(manager, [])
    server: Server = await manager.provision_server("src-empty")
    with pytest.raises(InvalidArgument, match="name a path"):
        plan_sources(manager, [server])
    with pytest.raises(InvalidArgument, match="missing or unreadable"):
        await backup.backup(manager, "mixed", ["src-empty:/no/such/dir"], server=server)
    assert manager.volumes() == []
    assert await manager.snapshots("mixed") == []
