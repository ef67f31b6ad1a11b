"""The ssh layer against real OpenSSH sshd processes (tests/sshd.py); no mocks."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncstage import errors
from asyncstage.ssh import KnownHosts, SSHHost, command_line, connection, quote
from tests.sshd import SSHServer, descendants

pytestmark = pytest.mark.anyio


def _local_sh(line: str) -> bytes:
    return subprocess.run(["sh", "-c", line], check=True, capture_output=True).stdout


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _running(host: SSHHost, needle: str) -> list[str]:
    """Processes on the host whose command line starts with ``needle``."""
    out = await host.scmd("ps -eo pid=,args=")
    return [line for line in out.splitlines() if line.split(None, 1)[-1].startswith(needle)]


async def _gone(host: SSHHost, needle: str) -> list[str]:
    """The processes ``_running`` still finds once signalled ones have had up to 10 s to
    end (a loaded machine schedules a signalled process late): ``[]`` when all ended."""
    with anyio.move_on_after(10):
        while await _running(host, needle):  # noqa: ASYNC110
            await anyio.sleep(0.05)
    return await _running(host, needle)


# -- quoting (local /bin/sh, no network) -------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))),
        min_size=1,
    )
)
def test_quoted_argv_reaches_sh_unchanged(args: list[str]) -> None:
    line = command_line("printf", "%s\\0", *args)
    out = _local_sh(line)
    expected = b"".join(a.encode("utf-8", "surrogateescape") + b"\0" for a in args)
    assert out == expected


@settings(max_examples=80, deadline=None)
@given(st.lists(st.binary().filter(lambda b: b"\0" not in b), min_size=1))
def test_quoted_bytes_reach_sh_unchanged(args: list[bytes]) -> None:
    out = _local_sh(command_line("printf", "%s\\0", *args))
    assert out == b"".join(a + b"\0" for a in args)


def test_command_forms() -> None:
    assert command_line("echo $HOME; ls") == "echo $HOME; ls"  # one str: a shell line
    assert command_line(b"echo hi") == "echo hi"
    assert command_line("echo", "a b", "$(x)") == "echo 'a b' '$(x)'"
    assert command_line(Path("/opt/my tool")) == "'/opt/my tool'"  # a path is an argument
    assert quote("") == "''"
    assert quote("plain") == "plain"
    with pytest.raises(errors.InvalidArgument):
        command_line()
    with pytest.raises(errors.InvalidArgument):
        command_line("  ")


# -- known_hosts -----------------------------------------------------------------


def test_known_hosts_file(tmp_path: Path) -> None:
    kh = KnownHosts(tmp_path / "dot" / "known_hosts")
    assert kh.lookup("127.0.0.9") == []
    kh.add("127.0.0.9", 22, "ssh-ed25519 AAAAkey22 comment")
    kh.add("127.0.0.9", 2222, "ssh-ed25519 AAAAkey2222")
    kh.add("127.0.0.9", 2222, "ssh-ed25519 AAAAkey2222")  # idempotent
    text = kh.path.read_text()
    assert text == "127.0.0.9 ssh-ed25519 AAAAkey22\n[127.0.0.9]:2222 ssh-ed25519 AAAAkey2222\n"
    assert kh.lookup("127.0.0.9") == ["ssh-ed25519 AAAAkey22"]
    assert kh.lookup("127.0.0.9", 2222) == ["ssh-ed25519 AAAAkey2222"]  # no port-22 fallback
    assert kh.lookup("127.0.0.90", 22) == []
    kh.remove("127.0.0.9", 2222)
    assert kh.lookup("127.0.0.9", 2222) == []
    assert kh.lookup("127.0.0.9") == ["ssh-ed25519 AAAAkey22"]
    assert (kh.path.stat().st_mode & 0o777) == 0o600


def test_known_hosts_reads_openssh_hashed_entries(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text("[127.0.0.7]:2200 ssh-ed25519 AAAAhashed\n127.0.0.* ssh-rsa AAAAwild\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(path)], check=True, capture_output=True)
    kh = KnownHosts(path)
    assert kh.lookup("127.0.0.7", 2200) == ["ssh-ed25519 AAAAhashed"]
    assert kh.lookup("127.0.0.8") == ["ssh-rsa AAAAwild"]  # patterns are not hashed


# -- commands ----------------------------------------------------------------------


async def test_capture_and_exit_codes(sshd_server: SSHServer) -> None:
    async with sshd_server.host() as host:
        assert await host.scmd("echo out; echo err >&2") == "out\n"
        result = await host.run("echo out; echo err >&2; exit 3", check=False)
        assert (result.exit_status, result.signal, result.ok) == (3, None, False)
        assert (result.stdout, result.stderr) == ("out\n", "err\n")
        assert await host.scmd("echo partial; exit 1", check=False) == "partial\n"
        with pytest.raises(errors.CommandFailed) as failed:
            await host.scmd("echo so far; echo broken >&2; exit 7")
        e = failed.value
        assert (e.exit_status, e.stdout, e.stderr, e.host) == (
            7,
            "so far\n",
            "broken\n",
            host.label,
        )
        assert e.command == "echo so far; echo broken >&2; exit 7"
        assert "broken" in str(e) and host.label in str(e)
        killed = await host.run("kill -9 $$", check=False)
        assert (killed.exit_status, killed.signal) == (None, "KILL")
        binary = await host.run("printf '\\377\\000\\001'", encoding=None)
        assert binary.stdout == b"\xff\x00\x01"
        assert await host.scmd("cat", input="fed in\n") == "fed in\n"
        assert (await host.run("wc -c", input=b"\x00" * 100000)).stdout.strip() == "100000"


async def test_ssh_streams_to_local_output(
    sshd_server: SSHServer, capfd: pytest.CaptureFixture[str]
) -> None:
    async with sshd_server.host() as host:
        assert await host.ssh("echo to-out; echo to-err >&2") is True
        assert await host.ssh("exit 4") is False
    out, err = capfd.readouterr()
    assert "to-out\n" in out
    assert "to-err\n" in err
    assert "asyncstage-pgid" not in out + err


async def test_argv_is_quoted_for_the_remote_shell(sshd_server: SSHServer) -> None:
    marker = Path(f"/tmp/asyncstage-quote-{uuid.uuid4().hex}")
    tricky = [
        "two words",
        'it\'s "quoted"',
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"a; touch {marker}",
        "line1\nline2",
        "ünïcødé ✓ 日本",
        "",
        "*",
        "~",
        "-n",
        "\\back\\slash",
        b"raw \xff bytes",
        marker,
    ]
    async with sshd_server.host() as host:
        out = await host.run("printf", "%s\\0", *tricky, encoding=None)
        want = [os.fsencode(a) if not isinstance(a, bytes) else a for a in tricky]
        assert out.stdout.split(b"\0")[:-1] == want
        assert await host.scmd("echo", "a; touch /tmp/x") == "a; touch /tmp/x\n"
        assert await host.scmd("echo", f"a; touch {marker}") == f"a; touch {marker}\n"
    assert not await anyio.Path(marker).exists()


async def test_sudo(sshd_server: SSHServer) -> None:
    async with sshd_server.host() as host:
        assert await host.scmd("id -u; echo $0", sudo=True) == "0\nsh\n"
        assert await host.scmd("echo", "a b;", sudo=True) == "a b;\n"


async def test_streaming_before_completion(sshd_server: SSHServer) -> None:
    async with sshd_server.host() as host:
        # the command runs far longer than the bound, which a loaded machine meets too
        started = time.monotonic()
        async with host.scmd_read("echo first; sleep 120; echo second") as f:
            with anyio.fail_after(60):
                assert await f.readline() == "first\n"
        assert time.monotonic() - started < 60  # left early: not waiting for `sleep 120`
        async with host.scmd_read("printf 'a\\nb\\nc'") as f:
            assert [line async for line in f] == ["a\n", "b\n", "c"]
        async with host.scmd_read("printf abcdef", encoding=None) as f:
            assert await f.read(-1) == b"abcdef"
        with pytest.raises(errors.CommandFailed) as failed:
            async with host.scmd_read("echo x; echo bad >&2; exit 2") as f:
                assert await f.read() == "x\n"
        assert (failed.value.exit_status, failed.value.stderr) == (2, "bad\n")


async def test_scmd_write(sshd_server: SSHServer, tmp_path: Path) -> None:
    target = tmp_path / "written"
    async with sshd_server.host() as host:
        with pytest.raises(errors.CommandFailed, match="No such file"):
            async with host.scmd_write("cat", ">", target) as f:  # an argv: ">" is quoted
                await f.write("nothing")
        assert not target.exists()
        async with host.scmd_write(f"cat > {quote(target)}") as f:
            await f.write("héllo\n")
            await f.write("world\n")
        assert target.read_text() == "héllo\nworld\n"
        # what the command answers on stdout, once its input ended
        async with host.scmd_write("sha256sum", encoding=None) as f:
            await f.write(b"abc")
        assert f.output.split()[0] == hashlib.sha256(b"abc").hexdigest().encode()
        with pytest.raises(errors.CommandFailed) as failed:
            async with host.scmd_write("cat >/dev/null; echo nope >&2; exit 5") as f:
                await f.write("x")
        assert (failed.value.exit_status, failed.value.stderr) == (5, "nope\n")
        # The command stops reading early: the writer says so instead of hanging.
        with pytest.raises(errors.SSHError, match="before reading all its input"):
            async with host.scmd_write("head -c 1 >/dev/null", encoding=None) as f:
                for _ in range(64):
                    await f.write(bytes(1 << 20))
        with pytest.raises(errors.CommandFailed) as failed:
            async with host.scmd_write("head -c 1 >/dev/null; exit 3", encoding=None) as f:
                for _ in range(64):
                    await f.write(bytes(1 << 20))
        assert failed.value.exit_status == 3


@pytest.mark.slow
async def test_64mib_binary_round_trip(sshd_server: SSHServer, tmp_path: Path) -> None:
    remote = tmp_path / "blob"
    sent = hashlib.sha256()
    chunk_size = 1 << 20
    async with sshd_server.host() as host:
        async with host.scmd_write(f"cat > {quote(remote)}", encoding=None) as w:
            for i in range(64):
                chunk = os.urandom(chunk_size) if i % 2 else bytes(range(256)) * 4096
                sent.update(chunk)
                await w.write(chunk)
        received = hashlib.sha256()
        size = 0
        async with host.scmd_read("cat", remote, encoding=None) as r:
            while data := await r.read(chunk_size):
                received.update(data)
                size += len(data)
    assert size == 64 * chunk_size
    assert received.hexdigest() == sent.hexdigest()


async def test_500_concurrent_commands_on_one_host(sshd_server: SSHServer) -> None:
    results: dict[int, str] = {}
    async with sshd_server.host() as host:

        async def one(i: int) -> None:
            results[i] = await host.scmd("echo", str(i))

        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(one, i)
        conn = host._conn._link.conn if host._conn._link else None
    assert results == {i: f"{i}\n" for i in range(500)}
    assert conn is not None  # one connection served them all


# -- cancellation, timeouts, memory ------------------------------------------------------


async def test_cancelled_commands_stop_on_the_host(sshd_server: SSHServer) -> None:
    async with sshd_server.host() as host:
        tag = f"{time.time_ns() % 10**9}.5"  # a unique `sleep` argument to look for in ps
        with anyio.move_on_after(0.5):
            await host.scmd(f"sleep {tag}; echo never")
        assert await _gone(host, f"sleep {tag}") == []

        tag2 = f"{time.time_ns() % 10**9}.25"
        with pytest.raises(errors.CommandTimeout):
            await host.run("sleep", tag2, timeout=0.5)
        assert await _gone(host, f"sleep {tag2}") == []

        tag3 = f"{time.time_ns() % 10**9}.75"
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.ssh, f"sleep {tag3} & sleep {tag3}; wait")
            with anyio.fail_after(10):  # both started (a loaded machine may take a while)
                while len(await _running(host, f"sleep {tag3}")) < 2:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        assert await _gone(host, f"sleep {tag3}") == []

        tag4 = f"{time.time_ns() % 10**9}.125"
        async with host.scmd_read(f"while :; do echo y; done & sleep {tag4}") as f:
            assert await f.readline() == "y\n"  # left early, output still coming
        assert await _gone(host, f"sleep {tag4}") == []

        tag5 = f"{time.time_ns() % 10**9}.375"
        with anyio.move_on_after(0.5):
            await host.scmd(f"sleep {tag5}", sudo=True)
        assert await _gone(host, f"sleep {tag5}") == []
        assert await host.scmd("echo", "still fine") == "still fine\n"


async def test_a_stop_delivers_its_kill_however_slow_the_host(
    sshd_server: SSHServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The grace is the command's time to go once signalled, not the time the host takes to
    # run `kill`: with no grace at all (a host slower than any grace), the kill still goes.
    monkeypatch.setattr(connection, "KILL_GRACE", 0.0)
    async with sshd_server.host() as host:
        tag = f"{time.time_ns() % 10**9}.625"
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.ssh, f"sleep {tag} & sleep {tag}; wait")
            with anyio.fail_after(10):
                while len(await _running(host, f"sleep {tag}")) < 2:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        assert await _gone(host, f"sleep {tag}") == []


@pytest.mark.slow
async def test_memory_stays_flat_while_streaming(sshd_server: SSHServer) -> None:
    total = 256 << 20
    async with sshd_server.host() as host:
        await host.scmd("true")  # connect outside the measurement
        tracemalloc.start()
        try:
            size = 0
            async with host.scmd_read(f"head -c {total} /dev/zero", encoding=None) as r:
                while data := await r.read(1 << 20):
                    size += len(data)
            _, read_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            chunk = bytes(1 << 20)
            async with host.scmd_write("cat > /dev/null", encoding=None) as w:
                for _ in range(total >> 20):
                    await w.write(chunk)
            _, write_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert size == total
    assert read_peak < 24 << 20, f"reading 256 MiB peaked at {read_peak >> 20} MiB"
    assert write_peak < 24 << 20, f"writing 256 MiB peaked at {write_peak >> 20} MiB"


# -- connections and host keys ---------------------------------------------------------


async def test_reconnects_after_sshd_restart(fresh_sshd: SSHServer) -> None:
    async with fresh_sshd.host() as host:
        assert await host.ping() is True
        first = host._conn._link.conn if host._conn._link else None
        fresh_sshd.restart()
        await anyio.sleep(0.1)
        assert await host.scmd("echo", "again") == "again\n"
        assert host._conn._link is not None and host._conn._link.conn is not first
        assert await host.ping() is True


async def test_connection_lost_mid_command_is_not_rerun(
    fresh_sshd: SSHServer, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    async with fresh_sshd.host() as host:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, _stop_once_running, fresh_sshd, runs)
            with pytest.raises(errors.ConnectionLost):
                await host.scmd(f"echo run >> {runs}; sleep 30")
        fresh_sshd.start()
        assert await host.scmd("echo", "back") == "back\n"
    assert runs.read_text() == "run\n"  # not run a second time


def _stop_once_running(server: SSHServer, runs: Path) -> None:
    """Stop sshd once the command runs (however long the connection took to come up)."""
    deadline = time.monotonic() + 60
    while not runs.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop()


async def test_ping_and_unreachable(fresh_sshd: SSHServer) -> None:
    async with fresh_sshd.host(connect_timeout=5) as host:
        assert await host.ping() is True
        assert await host.ping() is True  # cached
        fresh_sshd.stop()
        await anyio.sleep(0.1)
        assert await host.ping(timeout=5) is False
        with pytest.raises(errors.ServerUnreachable) as e:
            await host.scmd("true")
        assert e.value.host == host.label and e.value.__cause__ is not None
        fresh_sshd.start()
        host.reset()
        assert await host.ping() is True


async def test_wrong_client_key_is_a_connect_error(sshd_server: SSHServer, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    await anyio.run_process(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)])
    async with sshd_server.host(client_keys=[other], label="srv-1") as host:
        with pytest.raises(errors.ConnectError, match="srv-1: ssh authentication") as e:
            await host.scmd("true")
        assert not isinstance(e.value, errors.ServerUnreachable)


async def test_changed_host_key_is_refused(fresh_sshd: SSHServer) -> None:
    async with fresh_sshd.host() as host:
        assert await host.host_public_key() == fresh_sshd.host_public_key  # pinned
        assert host.known_hosts.lookup(fresh_sshd.address, fresh_sshd.port) == [
            fresh_sshd.host_public_key
        ]
        old = fresh_sshd.host_fingerprint
        fresh_sshd.rekey()
        await anyio.sleep(0.1)
        with pytest.raises(errors.HostKeyMismatch) as e:
            await host.scmd("true")
        assert e.value.presented == fresh_sshd.host_fingerprint
        assert e.value.expected == (old,)
        assert isinstance(e.value.__cause__, Exception)
    async with fresh_sshd.host() as again:  # a new handle reads the same pin
        with pytest.raises(errors.HostKeyMismatch):
            await again.scmd("true")


async def test_expected_fingerprints(fresh_sshd: SSHServer, tmp_path: Path) -> None:
    fingerprint = fresh_sshd.host_fingerprint
    wrong = "SHA256:" + "A" * 43
    async with fresh_sshd.host(known_hosts=tmp_path / "kh1", expected_fingerprints=[wrong]) as h:
        with pytest.raises(errors.HostKeyMismatch) as e:
            await h.scmd("true")
        assert e.value.presented == fingerprint and e.value.expected == (wrong,)
    assert not (tmp_path / "kh1").exists() or (tmp_path / "kh1").read_text() == ""
    kh2 = tmp_path / "kh2"
    async with fresh_sshd.host(known_hosts=kh2, expected_fingerprints=[wrong, fingerprint]) as h:
        assert await h.scmd("echo", "ok") == "ok\n"
    assert KnownHosts(kh2).lookup(fresh_sshd.address, fresh_sshd.port) == [
        fresh_sshd.host_public_key
    ]
    # A stale pin (say, the address was reused) gives way to the expected fingerprint.
    fresh_sshd.rekey()
    async with fresh_sshd.host(known_hosts=kh2) as h:
        with pytest.raises(errors.HostKeyMismatch):
            await h.scmd("true")
    new = fresh_sshd.host_fingerprint
    async with fresh_sshd.host(known_hosts=kh2, expected_fingerprints=[new]) as h:
        assert await h.scmd("echo", "ok") == "ok\n"
    assert KnownHosts(kh2).lookup(fresh_sshd.address, fresh_sshd.port) == [
        fresh_sshd.host_public_key
    ]


async def test_expected_fingerprints_decide_over_a_pinned_key(
    fresh_sshd: SSHServer, tmp_path: Path
) -> None:
    kh = tmp_path / "kh"
    KnownHosts(kh).add(fresh_sshd.address, fresh_sshd.port, fresh_sshd.host_public_key)
    wrong = "SHA256:" + "A" * 43
    # The server's own key is pinned, but the fingerprints expected now are another's.
    async with fresh_sshd.host(known_hosts=kh, expected_fingerprints=[wrong]) as h:
        with pytest.raises(errors.HostKeyMismatch) as e:
            await h.scmd("true")
        assert e.value.presented == fresh_sshd.host_fingerprint
        assert e.value.expected == (wrong,)
    # Pinned and expected: every new connection accepts it (the pin is trusted as it is).
    expected = [fresh_sshd.host_fingerprint]
    async with fresh_sshd.host(known_hosts=kh, expected_fingerprints=expected) as h:
        for _ in range(2):
            assert await h.scmd("echo", "ok") == "ok\n"
            h.reset()
    # The same pin after the server changed its key: the new key is refused, not pinned.
    old_key = fresh_sshd.host_public_key
    fresh_sshd.rekey()
    async with fresh_sshd.host(known_hosts=kh, expected_fingerprints=expected) as h:
        with pytest.raises(errors.HostKeyMismatch) as e:
            await h.scmd("true")
        assert e.value.presented == fresh_sshd.host_fingerprint
    assert KnownHosts(kh).lookup(fresh_sshd.address, fresh_sshd.port) == [old_key]


async def test_strict_policy(sshd_server: SSHServer, tmp_path: Path) -> None:
    kh = tmp_path / "strict_known_hosts"
    async with sshd_server.host(known_hosts=kh, host_key_policy="strict") as host:
        with pytest.raises(errors.HostKeyMismatch, match="strict"):
            await host.scmd("true")
    KnownHosts(kh).add(sshd_server.address, sshd_server.port, sshd_server.host_public_key)
    async with sshd_server.host(known_hosts=kh, host_key_policy="strict") as host:
        assert await host.scmd("echo", "ok") == "ok\n"


async def test_openssh_uses_the_same_key_and_known_hosts(
    sshd_server: SSHServer, tmp_path: Path
) -> None:
    async with sshd_server.host(known_hosts=tmp_path / "kh") as host:
        await host.host_public_key()  # pins the key
        argv = host.openssh_argv("echo", "it's", "$(x)")
        done = await anyio.run_process(argv, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"it's $(x)\n"
        assert "StrictHostKeyChecking=yes" in host.openssh_options()
        (tmp_path / "kh").write_text("")  # without the pin, OpenSSH refuses
        refused = await anyio.run_process(argv, check=False)
        assert refused.returncode == 255


async def test_openssh_prefers_the_key_exchange_of_our_own_connections(
    sshd_server: SSHServer, tmp_path: Path
) -> None:
    # sntrup761x25519, OpenSSH 9's first choice, costs ~70 ms per connection; every
    # rsync and OpenSSH leg pays it. Ours goes first, and nothing beyond ssh's defaults.
    defaults = subprocess.run(  # noqa: ASYNC221 (a 3 ms ssh -G, before any I/O of the test)
        ["ssh", "-G", "-F", "/dev/null", "localhost"], capture_output=True, text=True, check=True
    ).stdout
    default = dict(line.split(" ", 1) for line in defaults.splitlines() if " " in line)
    async with sshd_server.host(known_hosts=tmp_path / "kh") as host:
        await host.host_public_key()
        opts = host.openssh_options()
        kex = next(o.split("=", 1)[1] for o in opts if o.startswith("KexAlgorithms="))
        assert kex.split(",")[0] in ("mlkem768x25519-sha256", "curve25519-sha256")
        assert sorted(kex.split(",")) == sorted(default["kexalgorithms"].split(","))
        argv = host.openssh_argv("true")
        done = await anyio.run_process([argv[0], "-v", *argv[1:]], check=False)
        assert done.returncode == 0, done.stderr
        chosen = re.search(rb"kex: algorithm: (\S+)", done.stderr)
        assert chosen is not None and chosen.group(1).decode() == kex.split(",")[0]


async def test_shell_in_this_terminal(
    sshd_server: SSHServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.isatty(0):
        pytest.skip("stdin is a terminal: an interactive shell would wait for input")
    monkeypatch.delenv("DISPLAY", raising=False)
    async with sshd_server.host() as host:
        assert await host.shell() == 0  # ssh runs a shell that reads EOF and exits


# -- the fixture ---------------------------------------------------------------------------


async def test_stop_leaves_no_sshd_or_session(sshd_factory: Callable[..., SSHServer]) -> None:
    server = sshd_factory()
    async with server.host() as host, anyio.create_task_group() as tg:
        tg.start_soon(host.ssh, "sleep 60")
        assert server.pid is not None
        with anyio.fail_after(10):  # sshd, its session process, the shell running sleep
            while len(tree := [server.pid, *descendants(server.pid)]) < 3:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        server.stop()
        tg.cancel_scope.cancel()
    assert [pid for pid in tree if _alive(pid)] == []
    with pytest.raises(OSError):
        socket.create_connection((server.address, server.port), timeout=1).close()
