"""The naming rules of asyncstage.names (pure: no root, no cloud)."""

from __future__ import annotations

import posixpath
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncstage import names
from asyncstage.errors import InvalidArgument, InvalidName, MountPointRefused

HOSTILE = [
    "../x",
    "a/b",
    "a\nb",
    "-rf",
    "two words",
    "it's",
    'say"hi"',
    "$(reboot)",
    "`id`",
    "ünïcode",
    "名前",
    "x" * 300,
    "",
    ".hidden",
    "_x",
    "..",
    "a\x00b",
    "tab\tname",
    "semi;colon",
]

_NAME_START = string.ascii_letters + string.digits
_NAME_REST = _NAME_START + "._-"
valid_names = st.builds(
    lambda a, b: a + b,
    st.sampled_from(_NAME_START),
    st.text(alphabet=_NAME_REST, max_size=names.MAX_NAME - 1),
)


@given(valid_names)
def test_every_name_following_the_rule_is_accepted(name: str) -> None:
    assert names.check_name(name, "volume") == name
    assert names.is_valid_name(name)
    assert names.default_mount_point(name) == f"/mnt/Staging/{name}"
    # the default mount point of a valid name is itself a valid mount point
    assert names.check_mount_point(names.default_mount_point(name)) == f"/mnt/Staging/{name}"


@given(st.text(max_size=200))
def test_a_name_is_accepted_only_when_it_follows_the_rule(name: str) -> None:
    ok = (
        0 < len(name) <= names.MAX_NAME
        and name[0] in _NAME_START
        and all(c in _NAME_REST for c in name)
    )
    assert names.is_valid_name(name) is ok
    if not ok:
        with pytest.raises(InvalidName):
            names.check_name(name)


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_hostile_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(InvalidName) as info:
        names.check_name(name, "volume")
    message = str(info.value)
    assert "invalid volume name" in message
    assert "starts with a letter or a digit" in message and "128" in message
    assert "\n" not in message  # a newline in a name never breaks the message
    assert len(message) < 400  # a 300-character name is shown cut
    assert isinstance(info.value, ValueError) and isinstance(info.value, InvalidArgument)
    with pytest.raises(InvalidName):
        names.default_mount_point(name)


@pytest.mark.parametrize("value", [None, 3, b"abc", ["a"]])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(InvalidName):
        names.check_name(value)
    with pytest.raises(InvalidName):
        names.check_user(value)
    with pytest.raises(MountPointRefused):
        names.check_mount_point(value)


def test_the_longest_name() -> None:
    assert names.check_name("a" * 128) == "a" * 128
    with pytest.raises(InvalidName):
        names.check_name("a" * 129)


@pytest.mark.parametrize("user", ["ubuntu", "ec2-user", "admin", "_svc", "a.b", "u" * 32])
def test_login_user_names_accepted(user: str) -> None:
    assert names.check_user(user) == user


@pytest.mark.parametrize(
    "user",
    [
        "",
        "-oProxyCommand=x",
        "root@evil",
        "a b",
        "1abc",
        "a/b",
        "x\ny",
        "ünï",
        "u" * 33,
        "$x",
        "machine$",
    ],
    ids=repr,
)
def test_login_user_names_refused(user: str) -> None:
    with pytest.raises(InvalidName) as info:
        names.check_user(user)
    assert "login user name" in str(info.value)


@given(st.text(max_size=40))
def test_a_valid_user_never_starts_an_option_nor_names_a_host(user: str) -> None:
    if names.is_valid_user(user):
        assert not user.startswith("-") and "@" not in user and user.isascii()
        assert not any(c.isspace() for c in user) and len(user) <= 32


@pytest.mark.parametrize(
    ("given_path", "expected"),
    [
        ("/mnt/x", "/mnt/x"),
        ("/mnt/x/", "/mnt/x"),
        ("//mnt///x/./", "/mnt/x"),
        ("/data", "/data"),
        ("/srv/www", "/srv/www"),
        ("/home/u/stage", "/home/u/stage"),
        ("/library", None),  # /lib* is a prefix
        ("/opt/v", "/opt/v"),
        ("/mnt/Staging/ok.1", "/mnt/Staging/ok.1"),
    ],
)
def test_mount_points_normalised(given_path: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(MountPointRefused):
            names.check_mount_point(given_path)
    else:
        assert names.check_mount_point(given_path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "//",
        "/.",
        "/bin",
        "/boot/efi",
        "/dev/shm",
        "/etc",
        "/etc/",
        "/lib",
        "/lib64/x",
        "/libx32",
        "/proc/1",
        "/root",
        "/run/user",
        "/sbin",
        "/sys/fs",
        "/usr",
        "/usr/local/sbin",
        "/var/lib/x",
        "//usr",
        "/./etc",
        "/mnt/Staging/../../usr/local/sbin",
        "/mnt/../mnt/x",
        "mnt/x",
        "relative",
        "",
        "/mnt/a b",
        "/mnt/a\nb",
        "/mnt/$(id)",
        "/mnt/ünï",
        "/mnt/`x`",
        "/mnt/a'b",
    ],
    ids=repr,
)
def test_mount_points_refused(path: str) -> None:
    with pytest.raises(MountPointRefused):
        names.check_mount_point(path)


_PATH_ALPHABET = st.sampled_from(["/", ".", "..", "a", "usr", "etc", "mnt", "lib64", "x"])


@given(st.lists(_PATH_ALPHABET, max_size=12).map("/".join))
def test_an_accepted_mount_point_is_normal_and_outside_the_system(path: str) -> None:
    try:
        got = names.check_mount_point(path)
    except MountPointRefused:
        return
    assert got.startswith("/") and got != "/"
    assert posixpath.normpath(got) == got and not got.startswith("//")
    assert ".." not in got.split("/")
    top = got.split("/")[1]
    assert top not in {"bin", "boot", "dev", "etc", "proc", "root", "run", "sbin", "sys", "usr"}
    assert top != "var" and not top.startswith("lib")


def test_refusal_names_the_system_directory() -> None:
    with pytest.raises(MountPointRefused, match="under /usr"):
        names.check_mount_point("/usr/local/sbin")
    with pytest.raises(MountPointRefused, match=r"'\.\.' component"):
        names.check_mount_point("/mnt/Staging/../../usr/local/sbin")


def test_is_valid_mount_point_wants_it_normalised_already() -> None:
    assert names.is_valid_mount_point("/mnt/x")
    assert not names.is_valid_mount_point("/mnt/x/")  # valid, but not as written
    assert not names.is_valid_mount_point("/usr/x") and not names.is_valid_mount_point(None)


@pytest.mark.parametrize(
    "argv",
    [
        ["volumes", "provision", "../x", "--server", "web"],
        ["volumes", "provision", "ok", "--server", "web", "--mtpt", "/etc"],
        ["servers", "provision", "two words"],
    ],
)
def test_the_command_refuses_bad_names_before_asking_ec2(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The endpoint is a closed port: the refusal names the rule, not a failed call."""
    from asyncstage.cli import main

    monkeypatch.setenv("ASYNCSTAGE_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "starts with a letter or a digit" in err or "refusing to mount" in err, err
    assert "127.0.0.1:9" not in err and "Could not connect" not in err
