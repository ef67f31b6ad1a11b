"""asyncstage.shell: command lines, sudo prefixes and OpenSSH argv (pure; no root, no ssh)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncstage import shell, ssh
from asyncstage.errors import InvalidArgument, InvalidName

# Any text a file name or an argument may hold, except NUL (no argv can carry it).
ARG = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40)


@given(st.lists(ARG, min_size=1, max_size=6))
def test_command_line_round_trips_through_shlex(args: list[str]) -> None:
    line = shell.command_line("printf", *args)
    assert shlex.split(line) == ["printf", *args]


@settings(max_examples=40, deadline=None)
@given(st.lists(ARG, min_size=1, max_size=4))
def test_command_line_round_trips_through_sh(args: list[str]) -> None:
    # What a real POSIX shell makes of the line: every argument back, byte for byte.
    line = shell.command_line("printf", r"%s\0", *args)
    done = subprocess.run(["sh", "-c", line], capture_output=True, check=True)
    assert done.stdout.split(b"\0")[:-1] == [a.encode() for a in args]


@settings(max_examples=40, deadline=None)
@given(st.lists(ARG, min_size=1, max_size=4))
def test_sudo_line_of_a_shell_line_keeps_it_whole(args: list[str]) -> None:
    inner = shell.command_line("printf", r"%s\0", *args)
    line = shell.sudo_line([inner], True)
    words = shlex.split(line)
    assert words[:5] == ["sudo", "-n", "--", "sh", "-c"] and words[5] == inner
    # run it without sudo: the part after "sudo -n --" is an ordinary command line
    done = subprocess.run(words[3:], capture_output=True, check=True)
    assert done.stdout.split(b"\0")[:-1] == [a.encode() for a in args]


def test_command_forms() -> None:
    assert shell.command_line("ls -l | wc") == "ls -l | wc"  # one str: a shell line
    assert shell.command_line(Path("/a b")) == "'/a b'"  # one path: quoted
    assert shell.command_line(b"echo x") == "echo x"
    assert shell.sudo_line(["rm", "-f", "a b"], False) == "rm -f 'a b'"
    assert shell.sudo_line(["rm", "-f", "a b"]) == "sudo -n -- rm -f 'a b'"
    assert shell.sudo_argv(["dd", "of=x"]) == ["sudo", "-n", "--", "dd", "of=x"]
    assert shell.sudo_argv(["dd"], False) == ["dd"]
    assert shell.rsync_path(True) == ["--rsync-path=sudo -n rsync"]
    assert shell.rsync_path(False) == []
    for bad in ((), ("",), ("  ",)):
        with pytest.raises(InvalidArgument):
            shell.command_line(*bad)
    # the ssh layer's names are these very functions
    assert ssh.quote is shell.quote and ssh.command_line is shell.command_line


LOGIN = st.from_regex(r"[a-z_][a-z0-9_.-]{0,31}", fullmatch=True)


@given(
    LOGIN,
    st.sampled_from(["10.0.0.1", "127.0.0.2", "fe80::1", "gw.example"]),
    st.lists(ARG, max_size=4),
)
def test_openssh_argv_shape(user: str, address: str, args: list[str]) -> None:
    cmd = ["echo", *args] if args else []
    opts = shell.openssh_options(port=2222, known_hosts="/k h", client_keys=["/id"])
    argv = (
        shell.openssh_argv(opts, user, address, *cmd)
        if cmd
        else shell.openssh_argv(opts, user, address)
    )
    i = argv.index("--")
    # the user is the value of -l, the host comes right after "--": neither is an option
    assert argv[i - 2 : i] == ["-l", user] and argv[i + 1] == address
    assert argv[:1] == ["ssh"] and argv[1 : i - 2] == opts
    if cmd:
        assert argv[i + 2 :] == [shell.command_line(*cmd)]
    else:
        assert len(argv) == i + 2


@given(st.text(max_size=40))
def test_login_user_never_an_option(name: str) -> None:
    try:
        checked = shell.check_login_user(name)
    except InvalidName as e:
        assert "login user name" in str(e)
        assert isinstance(e, ValueError)
        return
    assert checked == name and not name.startswith("-")
    assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in name)
    assert "@" not in name and ":" not in name and len(name) <= 32


@pytest.mark.parametrize(
    "name", ["-oProxyCommand=x", "root@h", "a b", "", "x" * 33, "ab\n", "$(id)", "é", ".x"]
)
def test_bad_login_users_refused(name: str) -> None:
    with pytest.raises(InvalidName):
        shell.check_login_user(name)
    with pytest.raises(InvalidName):
        shell.openssh_argv([], name, "10.0.0.1")
    with pytest.raises(InvalidName):
        shell.user_at_host(name, "10.0.0.1")


@pytest.mark.parametrize("address", ["-oProxyCommand=x", "", "a b", "u@h", "h;x"])
def test_bad_addresses_refused(address: str) -> None:
    with pytest.raises(InvalidArgument):
        shell.openssh_argv([], "admin", address)


def test_openssh_options_use_the_hosts_timeouts() -> None:
    opts = shell.openssh_options(
        port=22, known_hosts="/kh", connect_timeout=7.4, keepalive_interval=0.2, batch=False
    )
    assert "ConnectTimeout=7" in opts and "ServerAliveInterval=1" in opts
    assert "BatchMode=yes" not in opts and "StrictHostKeyChecking=yes" in opts
    assert opts[:4] == ["-F", "/dev/null", "-p", "22"]
    spaced = shell.openssh_options(port=22, known_hosts="/a b/kh", bind_address="10.0.0.9")
    assert 'UserKnownHostsFile="/a b/kh"' in spaced
    assert spaced[spaced.index("-b") + 1] == "10.0.0.9"
    assert "-i" not in spaced and "IdentitiesOnly=yes" not in spaced


def test_user_at_host_and_known_hosts_forms() -> None:
    assert shell.user_at_host("admin", "10.0.0.1") == "admin@10.0.0.1"
    assert shell.user_at_host("admin", "fe80::1") == "admin@[fe80::1]"
    assert shell.known_hosts_pattern("10.0.0.1", 22) == "10.0.0.1"
    assert shell.known_hosts_pattern("10.0.0.1", 2222) == "[10.0.0.1]:2222"
