"""The connection options prepared once and shared by a fleet's connections.

Every connection with the same user, key and settings starts from one prepared
asyncssh options object; only the host's own fields differ. These tests show that the
copy is what asyncssh itself would build, that other users, keys or settings never
share one, and (against real sshd) that host keys and client keys are still checked
for each connection and that a change to either takes effect at the next one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import anyio
import asyncssh
import pytest

from asyncstage import _sshwire, errors
from asyncstage.ssh import KnownHosts, SSHHost
from asyncstage.ssh.connection import _settings, client_keys, host_options, prepared_options
from tests.sshd import ClientKey, SSHServer


def _keygen(directory: Path) -> Path:
    return ClientKey(directory).path


def _host(tmp_path: Path, key: Path, address: str = "127.0.0.9", **options: Any) -> SSHHost:
    options.setdefault("port", 2222)
    options.setdefault("username", "alice")
    return SSHHost(address, client_keys=[key], known_hosts=tmp_path / "known_hosts", **options)


def _loaded(key: Path) -> list[asyncssh.SSHKeyPair]:
    keys = client_keys([key])
    assert all(isinstance(k, asyncssh.SSHKeyPair) for k in keys)
    return keys  # type: ignore[return-value]


def test_a_hosts_options_are_what_asyncssh_builds_for_it(tmp_path: Path) -> None:
    """Field by field, the shared options with the host's own set equal the ones
    asyncssh.connect() would prepare from the same arguments."""
    key = _keygen(tmp_path / "k")
    host = _host(tmp_path, key)
    keys = _loaded(key)
    trusted = [asyncssh.generate_private_key("ssh-ed25519").convert_to_public()]
    client = asyncssh.SSHClient()
    ours = host_options(prepared_options(host, keys), client, host, _sshwire.DIRECT, trusted)
    theirs = asyncssh.SSHClientConnectionOptions(
        host=host.address,
        port=host.port,
        tunnel=_sshwire.DIRECT,
        known_hosts=(trusted, [], []),
        client_factory=lambda: client,
        client_keys=keys,
        **_settings(host),
    )
    mine, fresh = vars(ours), vars(theirs)
    assert set(mine) == set(fresh)
    assert mine["protocol_factory"]() is fresh["protocol_factory"]() is client
    assert mine["host"] == "127.0.0.9" and mine["port"] == 2222
    assert mine["username"] == "alice" and mine["client_keys"] == keys
    for name in set(mine) - {"protocol_factory", "config", "kwargs"}:
        assert mine[name] == fresh[name], name


def test_options_are_shared_only_by_the_same_user_key_and_settings(tmp_path: Path) -> None:
    key1, key2 = _keygen(tmp_path / "k1"), _keygen(tmp_path / "k2")
    a1 = _host(tmp_path, key1, "127.0.0.11")
    a2 = _host(tmp_path, key1, "127.0.0.12", port=22)
    base = prepared_options(a1, _loaded(key1))
    assert prepared_options(a2, _loaded(key1)) is base  # another host, same everything else

    bob = _host(tmp_path, key1, username="bob")
    other_key = _host(tmp_path, key2)
    slower = _host(tmp_path, key1, keepalive_interval=5.0)
    impatient = _host(tmp_path, key1, connect_timeout=3.0)
    made = [
        prepared_options(bob, _loaded(key1)),
        prepared_options(other_key, _loaded(key2)),
        prepared_options(slower, _loaded(key1)),
        prepared_options(impatient, _loaded(key1)),
    ]
    assert len({id(base), *map(id, made)}) == 5
    assert made[0].username == "bob" and base.username == "alice"
    assert [k.public_data for k in made[1].client_keys] == [k.public_data for k in _loaded(key2)]
    assert made[2].keepalive_interval == 5.0 and made[3].login_timeout == 3.0

    # The host's own fields go on a copy: the shared options are left as they were.
    client = asyncssh.SSHClient()
    shared = dict(vars(base))
    first = host_options(base, client, a1, _sshwire.DIRECT, [])
    second = host_options(base, client, a2, _sshwire.DIRECT, [])
    assert (first.host, first.port, second.host, second.port) == (
        "127.0.0.11",
        2222,
        "127.0.0.12",
        22,
    )
    assert first.known_hosts is not second.known_hosts
    assert vars(base) == shared


def test_a_new_key_in_the_same_file_gets_new_options(tmp_path: Path) -> None:
    key = _keygen(tmp_path / "k")
    host = _host(tmp_path, key)
    before = prepared_options(host, _loaded(key))
    old_public = [k.public_data for k in before.client_keys]
    _keygen(tmp_path / "k")  # the file rewritten with another key
    after = prepared_options(host, _loaded(key))
    assert after is not before
    assert [k.public_data for k in after.client_keys] != old_public
    assert [k.public_data for k in before.client_keys] == old_public  # untouched


# -- against sshd -----------------------------------------------------------------


@pytest.mark.anyio
async def test_hosts_sharing_options_each_have_their_host_key_checked(
    sshd_server: SSHServer, fresh_sshd: SSHServer, tmp_path: Path
) -> None:
    """Two servers, one prepared options object: the one whose pinned key is another
    server's is refused, and correcting the pin takes effect at the next connection."""
    kh = tmp_path / "known_hosts"
    known = KnownHosts(kh)
    known.add(sshd_server.address, sshd_server.port, sshd_server.host_public_key)
    known.add(fresh_sshd.address, fresh_sshd.port, sshd_server.host_public_key)  # wrong
    right = sshd_server.host(known_hosts=kh, host_key_policy="strict")
    wrong = fresh_sshd.host(known_hosts=kh, host_key_policy="strict")
    keys = _loaded(sshd_server.client_key)
    assert prepared_options(right, keys) is prepared_options(wrong, keys)
    async with right, wrong:
        with anyio.fail_after(60):
            assert await right.scmd("echo", "ok") == "ok\n"
            with pytest.raises(errors.HostKeyMismatch, match="differs"):
                await wrong.scmd("true")
            known.remove(fresh_sshd.address, fresh_sshd.port)
            known.add(fresh_sshd.address, fresh_sshd.port, fresh_sshd.host_public_key)
            assert await wrong.scmd("echo", "ok") == "ok\n"
            fresh_sshd.rekey()  # a server with another host key now: refused again
            wrong.reset()
            with pytest.raises(errors.HostKeyMismatch):
                await wrong.scmd("true")


@pytest.mark.anyio
async def test_a_key_the_server_does_not_know_is_refused_after_one_it_knows(
    sshd_server: SSHServer, tmp_path: Path
) -> None:
    """A connection with the authorised key, then one with another key (another
    prepared options object) and one whose key file was replaced: both refused."""
    kh = tmp_path / "known_hosts"
    stranger = _keygen(tmp_path / "stranger")
    copy = tmp_path / "mine" / "id_ed25519"
    copy.parent.mkdir(mode=0o700)
    shutil.copy(sshd_server.client_key, copy)
    with anyio.fail_after(60):
        async with sshd_server.host(known_hosts=kh, client_keys=[copy]) as known_key:
            assert await known_key.scmd("echo", "ok") == "ok\n"
        async with sshd_server.host(known_hosts=kh, client_keys=[stranger]) as other:
            with pytest.raises(errors.ConnectError, match="authentication"):
                await other.scmd("true")
        shutil.copy(stranger, copy)  # the same path, another key
        async with sshd_server.host(known_hosts=kh, client_keys=[copy]) as replaced:
            with pytest.raises(errors.ConnectError, match="authentication"):
                await replaced.scmd("true")
        shutil.copy(sshd_server.client_key, copy)
        async with sshd_server.host(known_hosts=kh, client_keys=[copy]) as restored:
            assert await restored.scmd("echo", "ok") == "ok\n"
