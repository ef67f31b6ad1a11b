"""What a new connection reads: known_hosts and the client keys, read once per change;
and how long it waits for a server that never answers.

No root, no sshd: a fleet's connections each look their address up in a known_hosts
file of the whole fleet and load the same key; both are read again exactly when their
files change, by us or by another program.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path

import anyio
import asyncssh
import pytest

from asyncstage import errors
from asyncstage.ssh import KnownHosts, SSHHost, known_hosts
from asyncstage.ssh.connection import client_keys as _client_keys

KEY_A = "ssh-ed25519 AAAAkeyA"
KEY_B = "ssh-ed25519 AAAAkeyB"


def test_lookups_share_one_reading_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    lines = [f"127.0.0.{i} ssh-ed25519 AAAAkey{i}\n" for i in range(1, 60)]
    path.write_text("".join(lines))
    first, second = KnownHosts(path), KnownHosts(path)  # every server's host has its own
    assert first.lookup("127.0.0.7") == ["ssh-ed25519 AAAAkey7"]
    reading = KnownHosts._read[os.path.abspath(path)]
    assert second.lookup("127.0.0.59") == ["ssh-ed25519 AAAAkey59"]
    assert KnownHosts._read[os.path.abspath(path)] is reading  # not read again

    second.add("127.0.0.60", 22, KEY_A)  # a write of ours: the next lookup sees it
    assert first.lookup("127.0.0.60") == [KEY_A]
    second.remove("127.0.0.7")
    assert first.lookup("127.0.0.7") == []
    assert first.lookup("127.0.0.8") == ["ssh-ed25519 AAAAkey8"]


def test_a_fleets_own_writes_are_not_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each server of a fleet forgets any old entry of its address, has it looked up,
    pins its key and, at termination, forgets it: the file is read once, not again
    after each of our own writes (a fleet of N would parse up to N lines N times). A
    write by another program is still seen, and the file holds what was written."""
    path = tmp_path / "known_hosts"
    parsed: list[int] = []  # lines parsed, per reading
    real = known_hosts._Entries.parse

    def counted(text: str) -> known_hosts._Entries:
        parsed.append(len(text.splitlines()))
        return real(text)

    monkeypatch.setattr(known_hosts._Entries, "parse", staticmethod(counted))
    locked: list[str] = []  # the file's lock taken (a write)
    real_lock = KnownHosts._locked

    def lock(self: KnownHosts) -> contextlib.AbstractContextManager[None]:
        locked.append(str(self.path))
        return real_lock(self)

    monkeypatch.setattr(KnownHosts, "_locked", lock)
    kh = KnownHosts(path)
    fleet = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(200)]
    for n, address in enumerate(fleet):
        kh.remove(address)
        assert kh.lookup(address) == []
        kh.add(address, 22, f"ssh-ed25519 AAAAkey{n}")
        kh.add(address, 22, f"ssh-ed25519 AAAAkey{n}")  # pinned already: not written
        assert kh.lookup(address) == [f"ssh-ed25519 AAAAkey{n}"]
    assert parsed == [0]  # the file before the first server: none there yet
    assert len(locked) == len(fleet)  # a write each: nothing to forget, pinned already
    assert path.read_text() == "".join(f"{a} ssh-ed25519 AAAAkey{n}\n" for n, a in enumerate(fleet))

    with open(path, "a") as f:  # another program's write: read again
        f.write(f"10.9.9.* {KEY_B}\n")
    assert kh.lookup("10.9.9.1") == [KEY_B]
    assert parsed == [0, 201]
    for address in fleet[1:]:
        kh.remove(address)
        assert kh.lookup(address) == []
    assert parsed == [0, 201]
    assert len(locked) == 2 * len(fleet) - 1
    assert path.read_text() == f"{fleet[0]} ssh-ed25519 AAAAkey0\n10.9.9.* {KEY_B}\n"
    assert kh.lookup(fleet[0]) == ["ssh-ed25519 AAAAkey0"]
    kh._forget()  # read from the file: what the kept reading said
    assert (kh.lookup(fleet[0]), kh.lookup(fleet[1]), kh.lookup("10.9.9.1")) == (
        ["ssh-ed25519 AAAAkey0"],
        [],
        [KEY_B],
    )


def test_a_pin_after_a_last_line_without_its_end(tmp_path: Path) -> None:
    """A file whose last line has no newline (edited by hand) keeps that entry whole."""
    path = tmp_path / "known_hosts"
    path.write_text(f"127.0.0.1 {KEY_A}")
    kh = KnownHosts(path)
    kh.add("127.0.0.2", 22, KEY_B)
    assert path.read_text() == f"127.0.0.1 {KEY_A}\n127.0.0.2 {KEY_B}\n"
    assert (kh.lookup("127.0.0.1"), kh.lookup("127.0.0.2")) == ([KEY_A], [KEY_B])
    kh.remove("127.0.0.1")
    assert path.read_text() == f"127.0.0.2 {KEY_B}\n"
    assert KnownHosts(path).lookup("127.0.0.2") == [KEY_B]


def test_a_fleets_addresses_are_forgotten_without_matching_each_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forgetting an address looks its plain name up in the index: in a file of the
    whole fleet only hashed names and patterns are matched one by one, and an address
    that has no entry leaves the file as it was (not written again)."""
    path = tmp_path / "known_hosts"
    fleet = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(200)]
    path.write_text(
        "# pinned by hand\n"
        + "".join(f"{a} ssh-ed25519 AAAAkey{n}\n" for n, a in enumerate(fleet))
        + f"10.9.9.* {KEY_B}\n"
    )
    matched: list[str] = []
    real = known_hosts._hosts_match

    def counted(field: str, spec: str) -> bool:
        matched.append(field)
        return real(field, spec)

    monkeypatch.setattr(known_hosts, "_hosts_match", counted)
    kh = KnownHosts(path)
    inode = path.stat().st_ino
    for address in fleet:
        kh.remove("127.0.0.1" if address == fleet[0] else address)
        if address == fleet[0]:
            assert path.stat().st_ino == inode  # nothing to forget: not written
    assert matched == ["10.9.9.*"] * len(fleet)  # the pattern only, once per address
    assert (
        path.read_text() == f"# pinned by hand\n{fleet[0]} ssh-ed25519 AAAAkey0\n10.9.9.* {KEY_B}\n"
    )
    kh.remove("10.9.9.4")  # an address a pattern names: that entry goes
    assert path.read_text() == f"# pinned by hand\n{fleet[0]} ssh-ed25519 AAAAkey0\n"
    assert kh.lookup(fleet[0]) == ["ssh-ed25519 AAAAkey0"]


def test_another_programs_rewrite_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"127.0.0.5 {KEY_A}\n")
    kh = KnownHosts(path)
    assert kh.lookup("127.0.0.5") == [KEY_A]
    # The same size, written in place (same inode), its times put back as they were:
    # the change time still moves.
    st = path.stat()
    with open(path, "r+") as f:
        f.write(f"127.0.0.5 {KEY_B}\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_ino == st.st_ino
    assert kh.lookup("127.0.0.5") == [KEY_B]
    # Replaced by a rename, as ssh-keygen -R does.
    tmp = tmp_path / "known_hosts.new"
    tmp.write_text(f"127.0.0.6 {KEY_A}\n")
    tmp.replace(path)
    assert kh.lookup("127.0.0.5") == []
    assert kh.lookup("127.0.0.6") == [KEY_A]
    path.unlink()
    assert kh.lookup("127.0.0.6") == []


def test_names_patterns_and_hashes_keep_file_order(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(
        "# a comment line\n"
        "@cert-authority *.example ssh-ed25519 AAAAca\n"
        f"127.0.0.* {KEY_B}\n"
        f"host-a,127.0.0.9 {KEY_A}\n"
        f"127.0.0.9 {KEY_B}\n"  # again: listed once
        "[127.0.0.9]:2222 ssh-ed25519 AAAAport\n"
        "!127.0.0.3,127.0.0.? ssh-ed25519 AAAAneg\n"
        "HOST-C ssh-ed25519 AAAAupper\n"
    )
    kh = KnownHosts(path)
    assert kh.lookup("127.0.0.9") == [KEY_B, KEY_A, "ssh-ed25519 AAAAneg"]
    assert kh.lookup("host-a") == [KEY_A]
    assert kh.lookup("host-c") == ["ssh-ed25519 AAAAupper"]  # names match in any case
    assert kh.lookup("127.0.0.3") == [KEY_B]  # negated in the last entry
    assert kh.lookup("127.0.0.9", 2222) == ["ssh-ed25519 AAAAport"]
    assert kh.lookup("x.example") == []  # CA lines are not host keys

    plain = tmp_path / "plain"
    plain.write_text(f"[127.0.0.7]:2200 {KEY_A}\n127.0.0.8 {KEY_B}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(plain)], check=True, capture_output=True)
    hashed = KnownHosts(plain)
    assert hashed.lookup("127.0.0.7", 2200) == [KEY_A]
    assert hashed.lookup("127.0.0.8") == [KEY_B]
    assert hashed.lookup("127.0.0.7") == []


def _keygen(path: Path) -> None:
    for old in (path, path.with_name(path.name + ".pub")):
        old.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def test_client_keys_are_loaded_once_per_version_of_their_files(tmp_path: Path) -> None:
    key = tmp_path / "id"
    _keygen(key)
    loaded = _client_keys([key])
    assert len(loaded) == 1
    first = loaded[0]
    assert isinstance(first, asyncssh.SSHKeyPair)
    public = key.with_name("id.pub").read_text().split()[1]
    assert first.public_data == asyncssh.import_public_key(f"ssh-ed25519 {public}").public_data
    assert _client_keys([key]) is loaded  # the same files: not read again

    _keygen(key)  # a new key in the same file: read again
    again = _client_keys([key])
    assert again is not loaded
    assert isinstance(again[0], asyncssh.SSHKeyPair)
    assert again[0].public_data != first.public_data


@pytest.mark.parametrize("content", [None, "not a key\n"])
def test_unloadable_keys_are_left_to_asyncssh(tmp_path: Path, content: str | None) -> None:
    """A key that cannot be loaded goes to asyncssh as a path: the connection fails
    there, as it did before keys were loaded ahead."""
    key = tmp_path / "id"
    if content is not None:
        key.write_text(content)
    assert _client_keys([key]) == [str(key)]


@pytest.mark.anyio
async def test_a_server_that_never_answers_is_unreachable_within_the_timeout(
    tmp_path: Path,
) -> None:
    """A port that accepts the TCP connection but sends no SSH banner: the connection
    attempt ends after connect_timeout as ServerUnreachable, its socket closed."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        host = SSHHost(
            "127.0.0.1",
            port=port,
            username="nobody",
            known_hosts=tmp_path / "kh",
            connect_timeout=0.5,
        )
        with anyio.fail_after(30):  # a bound on the test, far beyond the timeout
            with pytest.raises(errors.ServerUnreachable, match="no ssh answer"):
                await host.scmd("true")
        accepted, _ = listener.accept()  # the attempt's connection, queued by the kernel
        with accepted, anyio.fail_after(30):
            accepted.setblocking(False)
            while True:  # our banner, then end of file: the client closed its socket
                try:
                    if not accepted.recv(4096):
                        break
                except BlockingIOError:
                    await anyio.sleep(0.01)  # the close is the event loop's to do
        await host.close()
