"""asyncstage.remote.rsynchelper run locally (no ssh): keys, sweeps, symlinks, process groups.

Keys go into an authorized_keys file under tmp_path for the current user, and
work dirs into a private TMPDIR, so nothing of the machine's is touched.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyncstage import remote
from asyncstage.remote import rsynchelper

USER = getpass.getuser()
PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummyKeyForTestsOnlyDummyKeyForTestsOnly"


def helper(tmp: Path, *args: str) -> dict[str, object]:
    env = {**os.environ, "TMPDIR": str(tmp)}
    done = subprocess.run(
        remote.argv("rsynchelper", *args), capture_output=True, text=True, env=env, check=False
    )
    reply = remote.answer("local", done.stdout)
    assert (done.returncode == 0) == ("error" not in reply), done.stderr
    return reply


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "t").mkdir()
    (tmp_path / "ssh").mkdir()
    return tmp_path


def authorize(tmp: Path, keys: Path, tag: str, ttl: int, controller: str = "c") -> None:
    comment = f"{tag} controller={controller}"
    reply = helper(tmp / "t", "authorize", USER, str(keys), 'from="10.0.0.1",restrict', PUB,
                   comment, str(ttl))  # fmt: skip
    assert reply["file"] == str(keys)


def test_authorize_and_revoke(tmp: Path) -> None:
    keys = tmp / "ssh" / "authorized_keys"
    keys.write_text("ssh-ed25519 AAAA mine")  # no final newline: kept intact
    keys.chmod(0o640)
    authorize(tmp, keys, "asyncstage-transfer-aa", 3600)
    lines = keys.read_text().splitlines()
    assert lines[0] == "ssh-ed25519 AAAA mine"
    stamp = time.strftime("%Y%m%d%H", time.localtime(time.time() + 3600))
    assert lines[1].startswith(f'from="10.0.0.1",restrict,expiry-time="{stamp}')
    assert f"{PUB} asyncstage-transfer-aa controller=c expires=" in lines[1]
    assert helper(tmp / "t", "revoke", USER, str(keys), "asyncstage-transfer-aa") == {"removed": 1}
    assert keys.read_text() == "ssh-ed25519 AAAA mine\n"
    assert keys.stat().st_mode & 0o777 == 0o640  # rewritten with its own mode


def test_symlinked_authorized_keys_refused(tmp: Path) -> None:
    target = tmp / "elsewhere"
    target.write_text("precious\n")
    keys = tmp / "ssh" / "authorized_keys"
    keys.symlink_to(target)
    tag = "asyncstage-transfer-x"
    reply = helper(tmp / "t", "authorize", USER, str(keys), "restrict", PUB, tag, "60")
    assert "symlink" in str(reply["error"])
    assert target.read_text() == "precious\n"
    assert "symlink" in str(helper(tmp / "t", "revoke", USER, str(keys), "x")["error"])


def test_symlinked_parent_refused(tmp: Path) -> None:
    home = tmp / "home"
    home.mkdir()
    (tmp / "real-ssh").mkdir()
    (home / ".ssh").symlink_to(tmp / "real-ssh")
    with pytest.raises(rsynchelper.Refused, match="symlink"):
        rsynchelper._open_dir(str(home / ".ssh"), str(home))
    (home / "ok").mkdir()
    fd = rsynchelper._open_dir(str(home / "ok"), str(home))
    os.close(fd)


def test_sweep_removes_expired_and_dead_keeps_live(tmp: Path) -> None:
    keys = tmp / "ssh" / "authorized_keys"
    authorize(tmp, keys, "asyncstage-transfer-old", -10, "ctl-a")
    authorize(tmp, keys, "asyncstage-transfer-live", 3600, "ctl-a")
    authorize(tmp, keys, "asyncstage-transfer-dead", 3600, "ctl-dead")
    with keys.open("a") as f:
        f.write("ssh-ed25519 AAAA someone-else\n")
    first = helper(tmp / "t", "sweep", USER, str(keys), "[]")
    assert first["removed"] == ["asyncstage-transfer-old"]
    assert {k["controller"] for k in first["keys"]} == {"ctl-a", "ctl-dead"}  # type: ignore[union-attr,index]
    second = helper(tmp / "t", "sweep", USER, str(keys), json.dumps(["ctl-dead"]))
    assert second["removed"] == ["asyncstage-transfer-dead"]
    text = keys.read_text()
    assert "asyncstage-transfer-live" in text and "someone-else" in text
    assert "asyncstage-transfer-old" not in text and "asyncstage-transfer-dead" not in text


def test_sweep_work_dirs(tmp: Path) -> None:
    t = tmp / "t"
    owners = {
        "expired": {"controller": "ctl-a", "expires": time.time() - 5},
        "dead": {"controller": "ctl-dead", "expires": time.time() + 3600},
        "live": {"controller": "ctl-a", "expires": time.time() + 3600},
    }
    made = {k: str(helper(t, "workdir", json.dumps(v))["dir"]) for k, v in owners.items()}
    Path(made["dead"], "id_ed25519").write_text("private half")
    foreign = t / "asyncstage-xfer-noowner"
    foreign.mkdir()
    reply = helper(t, "sweep", USER, str(tmp / "ssh" / "none"), json.dumps(["ctl-dead"]))
    assert sorted(reply["swept"]) == sorted([made["expired"], made["dead"]])  # type: ignore[type-var]
    assert not Path(made["dead"]).exists() and not Path(made["expired"]).exists()
    assert Path(made["live"]).is_dir() and foreign.is_dir()  # no owner record: not judged


def test_run_records_the_group_and_passes_the_status(tmp: Path) -> None:
    pidfile = tmp / "t" / "x.pid"
    done = subprocess.run(
        remote.argv("rsynchelper", "run", str(pidfile), "sh", "-c", "echo $$; exit 7"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 7 and done.stdout.strip().isdigit()
    assert not pidfile.exists()  # removed once the command is done


def test_run_passes_the_output_on_whole_and_in_batches(tmp: Path) -> None:
    # 1000 lines, each a write of its own, 0.5 ms apart (as rsync writes a line per
    # file): the reader gets them whole, in a batch per RELAY_EVERY (0.1 s), not one by one
    script = (
        "import os, time\n"
        "for i in range(1000):\n os.write(1, b'line %d\\n' % i); time.sleep(5e-4)\n"
        "os.write(1, b'end')"
    )
    argv = remote.argv("rsynchelper", "run", str(tmp / "t" / "x.pid"), sys.executable, "-c", script)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    pieces: list[bytes] = []
    try:
        assert proc.stdout is not None
        started = time.monotonic()
        while piece := os.read(proc.stdout.fileno(), 1 << 20):
            pieces.append(piece)
        took = time.monotonic() - started
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"".join(pieces).decode() == "".join(f"line {i}\n" for i in range(1000)) + "end"
    assert len(pieces) <= took / rsynchelper.RELAY_EVERY + 2 < 1000


def test_a_full_non_blocking_stdout_is_waited_for_not_taken_for_a_reader_gone(
    tmp: Path,
) -> None:
    out, into = os.pipe()
    os.set_blocking(into, False)  # as a session's end might be: full means wait
    pidfile = str(tmp / "t" / "x.pid")
    argv = remote.argv("rsynchelper", "run", pidfile, "head", "-c", "1000000", "/dev/zero")
    proc = subprocess.Popen(argv, stdout=into, stdin=subprocess.DEVNULL)
    os.close(into)
    try:
        time.sleep(0.5)  # the pipe fills up (64 KiB) long before this
        got = b""
        while piece := os.read(out, 1 << 20):
            got += piece
        assert proc.wait(timeout=30) == 0 and got == bytes(1000000)
    finally:
        os.close(out)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_command_that_cannot_start_is_127_and_leaves_no_work_dir(tmp: Path) -> None:
    token = "12" * 16
    done = subprocess.run(
        remote.argv("rsynchelper", "solo", token, "{}", "/nonexistent/program", "x"),
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp / "t")},
        check=False,
    )
    assert done.returncode == 127 and done.stdout == ""
    assert "/nonexistent/program: No such file or directory" in done.stderr
    assert "Traceback" not in done.stderr  # the child never went on with the script
    assert list((tmp / "t").iterdir()) == []


def test_a_reader_gone_stops_the_command(tmp: Path) -> None:
    pidfile = tmp / "t" / "x.pid"
    argv = remote.argv("rsynchelper", "run", str(pidfile), "yes")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.read(2) == b"y\n"
        pgid = int(pidfile.read_text())
        proc.stdout.close()  # the session is gone: the next batch finds no reader
        assert proc.wait(timeout=30) == 128 + 15  # the group was sent SIGTERM
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cleanup_stops_the_recorded_groups(tmp: Path) -> None:
    d = str(helper(tmp / "t", "workdir", "{}")["dir"])
    proc = subprocess.Popen(
        remote.argv("rsynchelper", "run", f"{d}/s.pid", "sleep", "60"), stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not Path(d, "s.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pgid = int(Path(d, "s.pid").read_text())
        assert helper(tmp / "t", "cleanup", d) == {"killed": [pgid]}
        assert proc.wait(timeout=10) != 0
        assert not Path(d).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_solo_runs_in_a_work_dir_that_lives_as_long_as_the_command(tmp: Path) -> None:
    token = "ab" * 16
    d = tmp / "t" / (rsynchelper.WORKDIR_PREFIX + token)
    wait = f"i=0; while [ ! -e {d}/cmd.pid ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done"
    script = f"{wait}; cat {d}/owner; echo; cat {d}/cmd.pid; echo; echo $$; exit 5"
    done = subprocess.run(
        remote.argv("rsynchelper", "solo", token, '{"controller": "c"}', "sh", "-c", script),
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp / "t")},
        check=False,
    )
    owner, pgid, pid = done.stdout.split("\n")[:3]
    assert done.returncode == 5 and owner == '{"controller": "c"}' and pgid == pid
    assert not d.exists()  # removed once the command is done
    taken = tmp / "t" / (rsynchelper.WORKDIR_PREFIX + "cd" * 16)
    taken.mkdir()  # a dir of that name is never used, nor removed
    again = subprocess.run(
        remote.argv("rsynchelper", "solo", "cd" * 16, "{}", "true"),
        capture_output=True,
        env={**os.environ, "TMPDIR": str(tmp / "t")},
        check=False,
    )
    assert again.returncode != 0 and taken.is_dir()
    assert helper(tmp / "t", "solo", "../x", "{}", "true")["refused"] is True


def test_cleanup_of_a_solo_token_stops_its_group(tmp: Path) -> None:
    token = "ef" * 16
    d = tmp / "t" / (rsynchelper.WORKDIR_PREFIX + token)
    env = {**os.environ, "TMPDIR": str(tmp / "t")}
    argv = remote.argv("rsynchelper", "solo", token, "{}", "sleep", "60")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 10
        while not (d / "cmd.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pgid = int((d / "cmd.pid").read_text())
        assert helper(tmp / "t", "cleanup", token) == {"killed": [pgid]}
        assert proc.wait(timeout=10) != 0
        assert not d.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_scripts_run_isolated_from_the_environment_and_the_directory(tmp: Path) -> None:
    """Nothing planted in the current directory or named by ``PYTHON*`` variables runs
    beside a script (as root, on a server), and no site-packages start-up code either."""
    planted = tmp / "planted"
    planted.mkdir()
    for module in ("sitecustomize", "usercustomize", "json", "tempfile"):
        (planted / f"{module}.py").write_text(f"open({str(tmp / module)!r}, 'w').close()\n")
    env = {**os.environ, "TMPDIR": str(tmp / "t"), "PYTHONPATH": str(planted)}
    env["PYTHONSTARTUP"] = str(planted / "json.py")
    done = subprocess.run(
        remote.argv("rsynchelper", "workdir", "{}"),
        capture_output=True,
        text=True,
        env=env,
        cwd=planted,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert Path(str(remote.answer("local", done.stdout)["dir"])).parent == tmp / "t"
    assert sorted(p.name for p in tmp.iterdir()) == ["planted", "ssh", "t"]


def test_linkdir_makes_the_dir_the_key_and_this_hosts_ssh_preference(tmp: Path) -> None:
    owner = json.dumps({"controller": "c", "expires": time.time() + 60})
    made = helper(tmp / "t", "linkdir", owner, "asyncstage-transfer-x", "h k", "127.0.0.1")
    d = Path(str(made["dir"]))
    assert d.parent == tmp / "t" and d.name.startswith(rsynchelper.WORKDIR_PREFIX)
    assert (d / "owner").read_text() == owner and (d / "known_hosts").read_text() == "h k\n"
    assert made["key"] == str(d / "id_ed25519") and made["bindable"] is True
    assert str(made["public"]).startswith("ssh-ed25519 ")
    assert (d / "id_ed25519.pub").read_text().split()[2] == "asyncstage-transfer-x"
    assert made["prefer"] == rsynchelper.openssh_preferences()
    defaults = subprocess.run(
        ["ssh", "-G", "-F", "/dev/null", "localhost"], capture_output=True, text=True, check=True
    ).stdout
    default = dict(line.split(" ", 1) for line in defaults.splitlines() if " " in line)
    prefer = made["prefer"]
    assert isinstance(prefer, list)
    for option, value in zip(prefer[::2], prefer[1::2], strict=True):
        name, order = value.split("=", 1)
        assert option == "-o" and name in ("KexAlgorithms", "Ciphers")
        # an order of what this ssh enables by default, nothing more
        assert sorted(order.split(",")) == sorted(default[name.lower()].split(","))


def _old_ssh(tmp: Path, kex: str, ciphers: str) -> str:
    """An ``ssh`` whose ``-G`` prints the defaults of an older or newer OpenSSH."""
    script = tmp / "t" / f"ssh-{len(list((tmp / 't').iterdir()))}"
    lines = f"user root\\nkexalgorithms {kex}\\nciphers {ciphers}\\n"
    script.write_text(f"#!/bin/sh\nprintf '{lines}'\n")
    script.chmod(0o755)
    return str(script)


def test_openssh_preferences_reorder_only_what_that_ssh_has(tmp: Path) -> None:
    chacha, ctr, gcm = "chacha20-poly1305@openssh.com", "aes128-ctr", "aes128-gcm@openssh.com"
    # OpenSSH 9.x: sntrup first; ours moved to the front, the rest in its order
    ssh = _old_ssh(tmp, "sntrup761x25519-sha512@openssh.com,curve25519-sha256,ecdh-sha2-nistp256",
                   f"{chacha},{ctr},{gcm}")  # fmt: skip
    assert rsynchelper.openssh_preferences(ssh, ciphers=rsynchelper.GCM) == [
        "-o", "KexAlgorithms=curve25519-sha256,sntrup761x25519-sha512@openssh.com,"
        "ecdh-sha2-nistp256",
        "-o", f"Ciphers={gcm},{chacha},{ctr}",
    ]  # fmt: skip
    kex_only = rsynchelper.openssh_preferences(ssh, ciphers=())  # a CPU without AES
    assert [o.split("=")[0] for o in kex_only] == ["-o", "KexAlgorithms"]
    # an old OpenSSH (7.x) already puts curve25519 first and has no AES-GCM enabled
    old = _old_ssh(tmp, "curve25519-sha256,ecdh-sha2-nistp256", f"{chacha},{ctr}")
    assert rsynchelper.openssh_preferences(old, ciphers=rsynchelper.GCM) == []
    assert rsynchelper.openssh_preferences(str(tmp / "missing")) == []


def test_has_aes_reads_x86_flags_and_arm_features(tmp: Path) -> None:
    cpus = {
        "processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n": True,
        "processor\t: 0\nflags\t\t: fpu sse2 avx2 vaes_not\n": False,
        "processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n": True,
    }
    for text, expected in cpus.items():
        (tmp / "cpuinfo").write_text(text)
        assert rsynchelper.has_aes(str(tmp / "cpuinfo")) is expected
    assert rsynchelper.has_aes(str(tmp / "none")) is False


def test_linkdir_leaves_no_dir_when_the_key_cannot_be_made(tmp: Path) -> None:
    owner = json.dumps({"controller": "c", "expires": time.time() + 60})
    argv = remote.argv("rsynchelper", "linkdir", owner, "asyncstage-transfer-x", "h k", "")
    env = {"TMPDIR": str(tmp / "t"), "PATH": str(tmp / "ssh")}  # no ssh-keygen there
    done = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, check=False)
    assert done.returncode != 0 and b"ssh-keygen" in done.stderr
    assert list((tmp / "t").iterdir()) == []
