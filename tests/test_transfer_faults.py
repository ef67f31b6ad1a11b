"""Transfers under attack: each fault gives a clear typed error and loses nothing.

Two parts. On two real sshd "hosts" (127.0.0.x, sharing this machine's files):
a symlinked authorized_keys, a cleanup that fails while an error or a
cancellation is in flight, and the controller SIGKILLed in the middle of a
host → host transfer. On the local cloud: the destination instance stopped in
the middle of an rsync, a full destination volume, and dd onto a device
mounted behind the manager's back.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from asyncstage import transfer
from asyncstage.errors import RsyncError, TransferError, VolumeInUse, VolumeMounted
from asyncstage.paths import HostEndpoint
from asyncstage.server import Server
from asyncstage.transfer import Progress, link, rsync_endpoints, sweep_stale_keys
from tests.fixtures.cloud import Env
from tests.sshd import SSHServer
from tests.test_transfer_hosts import new_xfer_dirs

pytestmark = pytest.mark.anyio

MiB = 1 << 20
MARK = "asyncstage-transfer-"


@pytest.fixture(scope="module")
def servers(sshd_factory: Callable[..., SSHServer]) -> tuple[SSHServer, SSHServer]:
    return sshd_factory(address="127.0.0.31"), sshd_factory(address="127.0.0.32")


def keys_file(server: SSHServer) -> Path:
    return server.dir / "authorized_keys"


def transfer_keys(server: SSHServer) -> list[str]:
    return [ln for ln in keys_file(server).read_text().splitlines() if MARK in ln]


def xfer_dirs() -> set[str]:
    return set(glob.glob("/tmp/asyncstage-xfer-*"))


def data_dir(tmp_path: Path, size: int) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(size))
    return src


# -- on real sshd hosts -----------------------------------------------------------------


async def test_symlinked_authorized_keys_refused(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path
) -> None:
    a, b = servers
    src = data_dir(tmp_path, 1000)
    link = b.dir / "authorized_keys-link"
    link.unlink(missing_ok=True)
    link.symlink_to(keys_file(b))
    before_keys, before_dirs = keys_file(b).read_text(), xfer_dirs()
    async with a.host() as ha, b.host() as hb:
        with pytest.raises(TransferError, match="symlink"):
            await rsync_endpoints(
                [HostEndpoint(ha, f"{src}/")],
                HostEndpoint(hb, str(tmp_path / "dst")),
                authorized_keys=str(link),
            )
    assert keys_file(b).read_text() == before_keys  # not written through the link
    assert await new_xfer_dirs(before_dirs) == set()
    assert not (tmp_path / "dst").exists()


class Boom(Exception):
    pass


async def test_a_failing_cleanup_never_replaces_the_error_in_flight(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path
) -> None:
    a, b = servers
    src = data_dir(tmp_path, 4 * MiB)
    real = b.dir / "authorized_keys.real"

    def break_revocation() -> None:
        # authorized_keys becomes a symlink: the revocation refuses to write through it
        if not real.exists():
            os.rename(keys_file(b), real)
            keys_file(b).symlink_to(real)

    def restore() -> None:
        if real.exists():
            keys_file(b).unlink()
            os.rename(real, keys_file(b))

    def on_progress(p: Progress) -> None:
        if p.bytes_done > 0:
            break_revocation()
            raise Boom("the caller's own error")

    opts = {"options": ["--bwlimit=1m"], "authorized_keys": str(keys_file(b))}
    dirs = xfer_dirs()
    try:
        async with a.host() as ha, b.host() as hb:
            with pytest.raises(Boom) as info:
                await rsync_endpoints(
                    [HostEndpoint(ha, f"{src}/")],
                    HostEndpoint(hb, str(tmp_path / "d1")),
                    progress=on_progress,
                    **opts,  # type: ignore[arg-type]
                )
            notes = " ".join(getattr(info.value, "__notes__", []))
            assert "removing the temporary transfer key" in notes and "symlink" in notes
            assert await new_xfer_dirs(dirs) == set()  # the source's cleanup went on too
            restore()
            assert len(transfer_keys(b)) == 1  # the revocation did fail...
            keys_file(b).write_text(
                "".join(ln + "\n" for ln in keys_file(b).read_text().splitlines() if MARK not in ln)
            )
            # ... and so does a cancellation: it stays a cancellation
            with anyio.CancelScope() as scope:

                def later(p: Progress) -> None:
                    if p.bytes_done > 0:
                        break_revocation()
                        scope.cancel()

                await rsync_endpoints(
                    [HostEndpoint(ha, f"{src}/")],
                    HostEndpoint(hb, str(tmp_path / "d2")),
                    progress=later,
                    **opts,  # type: ignore[arg-type]
                )
            assert scope.cancelled_caught and await new_xfer_dirs(dirs) == set()
            restore()
            assert len(transfer_keys(b)) == 1  # its revocation failed, and was not raised
    finally:
        restore()
        keys_file(b).write_text(
            "".join(ln + "\n" for ln in keys_file(b).read_text().splitlines() if MARK not in ln)
        )


_CHILD = """
import json, sys
import anyio
from asyncstage.paths import HostEndpoint
from asyncstage.ssh import SSHHost
from asyncstage.transfer import rsync_endpoints

cfg = json.loads(sys.argv[1])


def host(h):
    return SSHHost(h["address"], port=h["port"], username="root", client_keys=[h["key"]],
                   known_hosts=h["known_hosts"])


async def main():
    async with host(cfg["a"]) as ha, host(cfg["b"]) as hb:
        await rsync_endpoints([HostEndpoint(ha, cfg["src"])], HostEndpoint(hb, cfg["dst"]),
                              options=["--bwlimit=200k"], authorized_keys=cfg["keys"])

anyio.run(main)
"""


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _start_and_kill_a_controller(cfg: dict[str, object], b: SSHServer, dst: Path) -> set[str]:
    """Run a controller process copying a → b, SIGKILL it mid-transfer; the work dirs then."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cfg)], env=env)
    try:
        _wait_for("the temporary key", lambda: bool(transfer_keys(b)))
        _wait_for("data arriving", lambda: dst.is_dir() and any(dst.rglob("*")))
        os.kill(child.pid, signal.SIGKILL)  # the controller dies without any cleanup
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
    return xfer_dirs()


def _private_half_in(workdir: str) -> bool:
    return Path(workdir, "id_ed25519").exists()


def _public_half(workdir: str) -> str:
    """The key of a work dir's key pair (type and base64), or a string no line holds."""
    try:
        return " ".join(Path(workdir, "id_ed25519.pub").read_text().split()[:2])
    except OSError:  # another process's dir, removed meanwhile
        return "\0"


async def test_controller_killed_mid_transfer_leaves_no_key_after_a_sweep(
    servers: tuple[SSHServer, SSHServer], tmp_path: Path
) -> None:
    a, b = servers
    src = data_dir(tmp_path, 8 * MiB)
    before = xfer_dirs()
    cfg = {
        s: {"address": h.address, "port": h.port, "key": str(h.client_key),
            "known_hosts": str(h.known_hosts)}
        for s, h in (("a", a), ("b", b))
    }  # fmt: skip
    cfg |= {"src": f"{src}/", "dst": str(tmp_path / "dst"), "keys": str(keys_file(b))}
    left = _start_and_kill_a_controller(cfg, b, tmp_path / "dst") - before
    assert transfer_keys(b), "the key is still authorised after the controller died"
    # the dead controller's work dir: the one whose key b authorises (other workers of the
    # suite make and remove dirs of their own beside it)
    ours = [d for d in left if _public_half(d) in "\n".join(transfer_keys(b))]
    assert len(ours) == 1 and _private_half_in(ours[0]), (left, transfer_keys(b))
    # a new transfer touching those servers sweeps what the dead controller left
    async with a.host() as ha, b.host() as hb:
        stats = await rsync_endpoints(
            [HostEndpoint(ha, f"{src}/")],
            HostEndpoint(hb, str(tmp_path / "again")),
            authorized_keys=str(keys_file(b)),
        )
        assert stats.route == "host->host"
        assert await sweep_stale_keys(hb, authorized_keys=str(keys_file(b))) == {
            "removed": [],
            "swept": [],
        }
    assert transfer_keys(b) == []
    assert await new_xfer_dirs(before) == set()  # no private half left on the source
    assert (tmp_path / "again" / "data").read_bytes() == (src / "data").read_bytes()

    # and the orphaned rsync of the dead controller was stopped with its work dir
    def no_orphan() -> bool:
        procs = subprocess.run(["pgrep", "-f", str(tmp_path / "dst")], capture_output=True)
        return procs.stdout.strip() == b""

    _wait_for("the orphaned rsync to end", no_orphan, timeout=10)


# -- on the local cloud ---------------------------------------------------------------------


async def sha(server: Server, path: str) -> str:
    return (await server.scmd("sha256sum", path, sudo=True)).split()[0]


@pytest.mark.localcloud
@pytest.mark.slow
async def test_dd_onto_a_device_mounted_behind_its_back(env: Env) -> None:
    m, s1, s2 = env.manager, env.s1, env.s2
    src = await s1.provision_volume(size=1)
    dst = await s2.provision_volume(size=1)
    try:
        assert dst.mtpt is not None and dst.mtdev is not None
        await s2.run("sh", "-c", f"echo precious > {dst.mtpt}/keep", sudo=True)
        await src.unmount()
        await dst.unmount()
        # someone mounts it again, and the manager does not know
        await s2.scmd("mkdir", "-p", "/mnt/behind", sudo=True)
        await s2.scmd("mount", dst.mtdev, "/mnt/behind", sudo=True)
        assert not dst.mounted
        with pytest.raises((VolumeMounted, VolumeInUse), match="mounted"):
            await transfer.dd(m, src, dst)
        assert await s2.scmd("cat", "/mnt/behind/keep", sudo=True) == "precious\n"
        await s2.scmd("umount", "/mnt/behind", sudo=True)
        # and a source mounted read-write behind its back is refused as well
        await s1.scmd("mkdir", "-p", "/mnt/behind", sudo=True)
        await s1.scmd("mount", str(src.mtdev), "/mnt/behind", sudo=True)
        with pytest.raises(VolumeMounted, match="read-write"):
            await transfer.dd(m, src, dst)
        await s1.scmd("umount", "/mnt/behind", sudo=True)
        stats = await transfer.dd(m, src, dst)  # unmounted: copied
        assert stats.route == "dd-host->host" and stats.digest
    finally:
        for server in (s1, s2):
            await server.run("umount", "/mnt/behind", sudo=True, check=False)
        for vol in (src, dst):
            await vol.delete()


@pytest.mark.localcloud
@pytest.mark.slow
async def test_full_destination_volume(env: Env) -> None:
    m, s1, s2 = env.manager, env.s1, env.s2
    vol = await s2.provision_volume(size=1)
    try:
        await s1.scmd("mkdir", "-p", "/srv/full", sudo=True)
        await s1.scmd("truncate", "-s", "1200M", "/srv/full/big", sudo=True)
        await s1.run("sh", "-c", "echo small > /srv/full/small", sudo=True)
        want = await sha(s1, "/srv/full/small")
        with pytest.raises(RsyncError, match="No space left on device"):
            await m.rsync(f"{s1}:/srv/full/", f"{vol}/")
        assert await s1.scmd("stat", "-c", "%s", "/srv/full/big", sudo=True) == "1258291200\n"
        assert await sha(s1, "/srv/full/small") == want
    finally:
        await s1.scmd("rm", "-rf", "/srv/full", sudo=True)
        await vol.delete()


@pytest.mark.localcloud
@pytest.mark.slow
async def test_destination_stopped_in_the_middle_of_an_rsync(env: Env) -> None:
    m, s1, s2 = env.manager, env.s1, env.s2
    await s1.scmd("mkdir", "-p", "/srv/stop", sudo=True)
    await s1.run("sh", "-c", f"head -c {16 * MiB} /dev/urandom > /srv/stop/data", sudo=True)
    want = await sha(s1, "/srv/stop/data")
    started = anyio.Event()
    errors: list[Exception] = []

    def on_progress(p: Progress) -> None:
        if p.bytes_done > 0:
            started.set()

    async def copy() -> None:
        try:
            await m.rsync(
                f"{s1}:/srv/stop/data",
                f"{s2}:/srv/copy/",
                options=["--bwlimit=1m"],
                progress=on_progress,
            )
        except Exception as e:
            errors.append(e)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(copy)
            await started.wait()
            await s2.stop()
        assert len(errors) == 1 and isinstance(errors[0], TransferError), errors
        # the key could not be removed from the stopped server: said so, not raised over it
        notes = " ".join(getattr(errors[0], "__notes__", []))
        assert "removing the temporary transfer key" in notes
        assert await sha(s1, "/srv/stop/data") == want  # nothing lost at the source
    finally:
        if s2.state != "running":
            await s2.start()
        await s1.scmd("rm", "-rf", "/srv/stop", sudo=True)
    # the destination, back, keeps no key of the interrupted transfer once swept
    assert MARK in await s2.scmd("cat", ".ssh/authorized_keys")
    swept = await sweep_stale_keys(s2.host)
    assert len(swept["removed"]) == 1
    assert MARK not in await s2.scmd("cat", ".ssh/authorized_keys")


def test_a_hosts_ssh_preference_carries_algorithm_names_only() -> None:
    # keygen's answer comes from the source host: only an algorithm order is taken
    good = ["-o", "KexAlgorithms=curve25519-sha256,sntrup761x25519-sha512@openssh.com"]
    good += ["-o", "Ciphers=aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"]
    assert link._preferences({"prefer": good}) == good
    hostile = [
        ["-o", "ProxyCommand=sh -c 'touch /tmp/owned'"],
        ["-o", "KexAlgorithms=curve25519-sha256 -oProxyCommand=x"],
        ["-oKexAlgorithms=curve25519-sha256"],
        ["-o"],
        "-o KexAlgorithms=curve25519-sha256",
        ["-F", "/tmp/evil_config"],
        [*good, "-o", "LocalCommand=id"],
    ]
    for answer in hostile:
        assert link._preferences({"prefer": answer}) == [], answer
    assert link._preferences({}) == []  # an older helper says nothing: ssh's own order
