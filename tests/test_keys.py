"""keys.py: a dot directory per non-AWS endpoint, and key files never written through a symlink.

Pure file-system tests (no root, no cloud).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from asyncstage import keys
from asyncstage.errors import AsyncstageError

ROOT = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize(
    "url",
    [
        None,
        "",
        "https://ec2.us-east-1.amazonaws.com",
        "https://ec2.cn-north-1.amazonaws.com.cn",
        "https://ec2.us-east-1.api.aws",
        "https://EC2.eu-west-1.AMAZONAWS.com.",
    ],
)
def test_aws_endpoints_share_the_dot_directory(tmp_path: Path, url: str | None) -> None:
    assert keys.is_aws_endpoint(url)
    assert keys.dotdir_for(url, tmp_path / "dot") == tmp_path / "dot"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5000",
        "http://localhost:41231/",
        "https://ec2.example.com",
        "http://amazonaws.com.evil.example:80",
        "http://[::1]:8080",
    ],
)
def test_other_endpoints_get_a_directory_of_their_own(tmp_path: Path, url: str) -> None:
    base = tmp_path / "dot"
    assert not keys.is_aws_endpoint(url)
    own = keys.dotdir_for(url, base)
    assert own.parent == base / "endpoints" and own.is_dir()
    assert stat.S_IMODE(own.stat().st_mode) == 0o700
    assert stat.S_IMODE((base / "endpoints").stat().st_mode) == 0o700
    assert keys.dotdir_for(url, base) == own  # stable
    assert keys.dotdir_for(url, own) == own  # a manager's dotdir passed on is kept
    # its key is not the region's key of the real AWS dot directory
    aws = keys.local_key(keys.dotdir_for(None, base), "us-east-1")
    local = keys.local_key(own, "us-east-1")
    assert aws.private_key.parent == base and local.private_key.parent == own
    assert aws.public_key != local.public_key and aws.name != local.name
    assert keys.known_hosts_path(own) != keys.known_hosts_path(base)


def test_endpoint_slugs_are_plain_and_distinct() -> None:
    a = keys.endpoint_slug("http://127.0.0.1:5000")
    b = keys.endpoint_slug("http://127.0.0.1:5001")
    c = keys.endpoint_slug("https://127.0.0.1:5000")
    assert len({a, b, c}) == 3
    assert a.startswith("127.0.0.1_5000-")
    hostile = keys.endpoint_slug("http://../../etc:1/")
    assert "/" not in hostile and not hostile.startswith(".")
    for slug in (a, b, c, hostile, keys.endpoint_slug("http://[::1]:8080")):
        assert all(ch.isalnum() or ch in "._-" for ch in slug), slug


def test_a_symlinked_dot_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(AsyncstageError, match="symbolic link"):
        keys.dotdir(link)
    with pytest.raises(AsyncstageError, match="symbolic link"):
        keys.dotdir_for("http://127.0.0.1:5000", link)
    # a symlinked endpoints directory or endpoint directory is refused too
    base = keys.dotdir(tmp_path / "dot")
    (base / "endpoints").symlink_to(real)
    with pytest.raises(AsyncstageError, match="symbolic link"):
        keys.dotdir_for("http://127.0.0.1:5000", base)
    assert list(real.iterdir()) == []


def test_a_symlinked_key_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    d = keys.dotdir(tmp_path / "dot")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    (d / "asyncstage-us-east-1.pem").symlink_to(victim)
    with pytest.raises(AsyncstageError, match="symbolic link"):
        keys.local_key(d, "us-east-1")
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644  # not chmod-ed through the link
    # keyfiles() skips it rather than reading through it
    assert keys.keyfiles(d, "us-east-1") == {}


def test_a_symlinked_public_key_is_refused(tmp_path: Path) -> None:
    d = keys.dotdir(tmp_path / "dot")
    pair = keys.local_key(d, "us-east-1")
    pub = pair.private_key.with_suffix(".pub")
    pub.unlink()
    other = tmp_path / "other.pub"
    other.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther x\n")
    pub.symlink_to(other)
    with pytest.raises(AsyncstageError, match="symbolic link"):
        keys.local_key(d, "us-east-1")


def test_new_key_files_never_follow_a_planted_symlink(tmp_path: Path) -> None:
    d = keys.dotdir(tmp_path / "dot")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    # a key made with reuse=False is written straight at its final name: a symlink
    # planted there would be refused by O_EXCL | O_NOFOLLOW rather than followed
    (d / "planted.pem").symlink_to(victim)
    with pytest.raises(FileExistsError):
        keys._write_private(d / "planted.pem", b"x")
    (tmp_path / "dangling").symlink_to(tmp_path / "made-through-the-link")
    with pytest.raises(FileExistsError):
        keys._write_private(tmp_path / "dangling", b"x")
    assert not (tmp_path / "made-through-the-link").exists()
    assert victim.read_text() == "precious\n"
    pair = keys.local_key(d, "us-east-1", reuse=False)
    mode = pair.private_key.lstat().st_mode
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600


def test_a_loose_private_key_is_tightened_in_place(tmp_path: Path) -> None:
    d = keys.dotdir(tmp_path / "dot")
    pair = keys.local_key(d, "us-east-1")
    os.chmod(pair.private_key, 0o644)
    assert keys.local_key(d, "us-east-1") == pair
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600


def test_a_loose_dot_directory_is_tightened(tmp_path: Path) -> None:
    d = tmp_path / "dot"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    assert keys.dotdir(d) == d
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_processes_making_the_key_at_once_all_end_with_one_key(tmp_path: Path) -> None:
    d = keys.dotdir(tmp_path / "dot")
    code = (
        "import sys; from pathlib import Path; from asyncstage import keys; "
        "print(keys.local_key(Path(sys.argv[1]), 'us-east-1').name)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True, env=ENV
        )
        for _ in range(8)
    ]
    names = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    pair = keys.local_key(d, "us-east-1")
    assert names == {pair.name}
    assert keys.key_name("us-east-1", pair.public_key) == pair.name  # .pub matches the key
    assert sorted(p.name for p in d.iterdir()) == [
        "asyncstage-us-east-1.pem",
        "asyncstage-us-east-1.pub",
    ]  # no temporary file left
