"""The local cloud's pure parts, without root: device names, signatures, the wire format."""

from __future__ import annotations

import io
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from asyncstage.localcloud._auth import AuthFailure, Credentials, check_host, check_request
from asyncstage.localcloud._devices import is_nitro, root_nodes, xen_node
from asyncstage.localcloud._disks import CopyStopped, copy_image
from asyncstage.localcloud._hosts import Host
from asyncstage.localcloud._isolation import scrubbed_shadow
from asyncstage.localcloud._query import renumber
from asyncstage.localcloud._wire import boolean_actions, fix_response, namespace
from asyncstage.localcloud.errors import LocalCloudError

CREDS = Credentials("AKIAEXAMPLEEXAMPLE00", "s" * 40)
ENDPOINT = "http://127.0.0.1:4566/"


@pytest.mark.parametrize(
    ("device", "node"),
    [
        ("/dev/sdf", "xvdf"),
        ("/dev/sdf1", "xvdf1"),
        ("/dev/sdp15", "xvdp15"),
        ("/dev/hdg", "xvdg"),
        ("/dev/xvdh", "xvdh"),
        ("/dev/xvdbc", "xvdbc"),
        ("xvdh", "xvdh"),
        ("/dev/sdf16", None),
        ("/dev/sda1", None),
        ("/dev/xvda", None),
        ("/dev/sda2", None),
        ("/dev/nvme1n1", None),
        ("/dev/foo", None),
    ],
)
def test_attach_names_as_ec2_takes_them(device: str, node: str | None) -> None:
    assert xen_node(device) == node


def test_instance_families() -> None:
    assert [is_nitro(t) for t in ("t3.micro", "m5.large", "m7g.xlarge", "t4g.nano")] == [True] * 4
    assert [is_nitro(t) for t in ("t2.micro", "m4.large", "c4.xlarge", "m1.small")] == [False] * 4
    assert root_nodes(True) == ("nvme0n1", "nvme0n1p1")
    assert root_nodes(False) == ("xvda", "xvda1")


def test_shadow_is_scrubbed() -> None:
    text = "root:$6$salt$hash:19000:0:99999:7:::\ndaemon:*:19000::::::\nx:!:1::::::"
    assert scrubbed_shadow(text, 1) == [
        "root:*:19000:0:99999:7:::",
        "daemon:*:19000::::::",
        "x:!:1::::::",
    ]


def test_wire_fixes() -> None:
    assert namespace("2014-10-01") == "http://ec2.amazonaws.com/doc/2014-10-01/"
    assert namespace("nonsense") == namespace(None) == "http://ec2.amazonaws.com/doc/2016-11-15/"
    assert {"CreateTags", "DeleteTags", "DeleteVolume", "DeleteKeyPair"} <= boolean_actions()
    assert {"DeleteSecurityGroup", "AuthorizeSecurityGroupIngress"} <= boolean_actions()
    assert "RunInstances" not in boolean_actions()
    moto = (
        b'<CreateTagsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15">'
        b"<requestId>request-id</requestId></CreateTagsResponse>"
    )
    fixed = fix_response("CreateTags", "2016-11-15", True, moto).decode()
    assert fixed.startswith('<CreateTagsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">')
    assert fixed.endswith("<return>true</return></CreateTagsResponse>")
    assert "request-id" not in fixed
    error = b'<Response xmlns="x"><Errors/><RequestID>request-id</RequestID></Response>'
    assert fix_response("X", None, False, error).startswith(b"<Response><Errors/><RequestID>")


def environ_of(request: Any, body: bytes) -> dict[str, Any]:
    """The WSGI environ the server sees for a prepared botocore request."""
    url = urlsplit(request.url)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "PATH_INFO": url.path or "/",
        "QUERY_STRING": url.query,
        "RAW_URI": (url.path or "/") + (f"?{url.query}" if url.query else ""),
        "wsgi.input": io.BytesIO(body),
        "CONTENT_LENGTH": str(len(body)),
    }
    for name, value in request.headers.items():
        key = name.upper().replace("-", "_")
        if key == "CONTENT_TYPE":
            environ["CONTENT_TYPE"] = value
        else:
            environ["HTTP_" + key] = value
    environ.setdefault("HTTP_HOST", url.netloc)
    return environ


def signed(secret: str = CREDS.secret_access_key, key: str = CREDS.access_key_id) -> Any:
    body = b"Action=DescribeRegions&Version=2016-11-15"
    request = AWSRequest(
        method="POST",
        url=ENDPOINT,
        data=body,
        headers={
            "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
            "Host": "127.0.0.1:4566",
        },
    )
    SigV4Auth(BotoCredentials(key, secret), "ec2", "us-east-1").add_auth(request)
    return environ_of(request, body), body


def test_sigv4_is_verified() -> None:
    params = {"Action": "DescribeRegions", "Version": "2016-11-15"}
    environ, body = signed()
    check_request(environ, body, params, CREDS)
    for bad in (signed(secret="x" * 40), signed(key="AKIAOTHEROTHEROTHER0")):
        with pytest.raises(AuthFailure, match="not able to validate"):
            check_request(*bad[:1], bad[1], params, CREDS)
    environ, body = signed()
    with pytest.raises(AuthFailure, match="signature does not match"):
        check_request(environ, body + b"&DryRun=true", params, CREDS)
    environ.pop("HTTP_AUTHORIZATION")
    with pytest.raises(AuthFailure, match="not signed"):
        check_request(environ, body, params, CREDS)


def test_sigv2_timestamps_and_hosts() -> None:
    from tests.test_localcloud_wire import RawClient

    client = RawClient("http://127.0.0.1:4566", CREDS.access_key_id, CREDS.secret_access_key)
    params = {"Action": "DescribeRegions", "Version": "2014-10-01"}
    params |= client._sigv2(params)
    environ = {"REQUEST_METHOD": "POST", "HTTP_HOST": "127.0.0.1:4566", "RAW_URI": "/"}
    check_request(environ, b"", params, CREDS)
    with pytest.raises(AuthFailure, match="not able to validate"):
        check_request(environ, b"", params | {"Version": "2015-01-01"}, CREDS)
    stale = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(AuthFailure) as expired:
        check_request(environ, b"", params | {"Timestamp": stale}, CREDS)
    assert expired.value.code == "RequestExpired"
    check_host({"HTTP_HOST": "localhost:4566"}, 4566)
    for host in ("evil.example:4566", "127.0.0.1:80", ""):
        with pytest.raises(AuthFailure) as refused:
            check_host({"HTTP_HOST": host}, 4566)
        assert refused.value.status == 403


def test_credentials_file(tmp_path: Any) -> None:
    creds = Credentials.generate()
    assert creds != Credentials.generate()
    creds.write(tmp_path / "credentials")
    assert (tmp_path / "credentials").stat().st_mode & 0o777 == 0o600
    assert (
        f"aws_secret_access_key = {creds.secret_access_key}"
        in (tmp_path / "credentials").read_text()
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="writes files owned by root")
@pytest.mark.parametrize("planted", ["etc/ssh/sshd_config", "etc/ssh"])
def test_boot_writes_never_follow_a_symlink_the_instance_planted(
    tmp_path: Path, planted: str
) -> None:
    """sshd_config is written again at every boot, as root on the machine, into the upper
    dir the instance's root controls: a symlink there is refused, its target untouched."""
    host = Host(
        instance_id="i-test",
        address="127.200.0.1",
        state_dir=tmp_path / "state",
        root_dir=tmp_path / "root",
        public_key=None,
    )
    (host.upper / "etc" / "ssh").mkdir(parents=True)
    target = tmp_path / "machine-file"
    target.write_text("the machine's\n")
    link = host.upper / planted
    if link.is_dir():
        link.rmdir()
    link.symlink_to(target if planted.endswith("config") else tmp_path)
    with pytest.raises((LocalCloudError, OSError)):
        host._write("etc/ssh/sshd_config", "ListenAddress 127.200.0.1:22\n")
    assert target.read_text() == "the machine's\n"
    assert not (tmp_path / "sshd_config").exists()


def test_list_parameters_are_renumbered_in_the_order_of_their_indexes() -> None:
    assert renumber(
        {"Action": "X", "ResourceId.0": "a", "ResourceId.7": "c", "ResourceId.3": "b"}
    ) == {
        "Action": "X",
        "ResourceId.1": "a",
        "ResourceId.2": "b",
        "ResourceId.3": "c",
    }
    nested = renumber(
        {
            "Filter.5.Name": "n",
            "Filter.5.Value": "x",  # one value, without an index
            "Filter.2.Name": "m",
            "Filter.2.Value.9": "z",
            "Filter.2.Value.0": "y",
            "TagSpecification.0.Tag.3.Key": "k",
            "TagSpecification.0.Tag.3.Value": "v",
            "TagSpecification.0.ResourceType": "volume",
        }
    )
    assert nested == {
        "Filter.2.Name": "n",
        "Filter.2.Value.1": "x",
        "Filter.1.Name": "m",
        "Filter.1.Value.2": "z",
        "Filter.1.Value.1": "y",
        "TagSpecification.1.Tag.1.Key": "k",
        "TagSpecification.1.Tag.1.Value": "v",
        "TagSpecification.1.ResourceType": "volume",
    }
    ordinary = {"InstanceId.1": "i-1", "InstanceId.2": "i-2", "MaxCount": "2"}
    assert renumber(ordinary) == ordinary
    many = {f"InstanceId.{n}": f"i-{n}" for n in range(0, 2000, 2)}
    assert list(renumber(many).values()) == list(many.values())
    assert set(renumber(many)) == {f"InstanceId.{n}" for n in range(1, 1001)}


def _sparse(path: Path, runs: list[tuple[int, bytes]], length: int) -> None:
    with open(path, "wb") as f:
        for offset, data in runs:
            f.seek(offset)
            f.write(data)
        f.truncate(length)


def test_image_copy_keeps_data_and_holes(tmp_path: Path) -> None:
    source, dest = tmp_path / "source.img", tmp_path / "dest.img"
    runs = [(0, os.urandom(5000)), (3 << 20, os.urandom(1 << 20)), ((40 << 20) - 7, b"end!!!!")]
    _sparse(source, runs, 40 << 20)
    src = os.open(source, os.O_RDONLY)
    dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copy_image(src, dst, threading.Event(), size=64 << 20)
    finally:
        os.close(src)
        os.close(dst)
    assert dest.stat().st_size == 64 << 20  # grown to the size asked for
    with open(source, "rb") as a, open(dest, "rb") as b:
        assert b.read(40 << 20) == a.read()
        assert b.read() == bytes(24 << 20)
    # the holes stay holes: far fewer blocks than the image's length
    assert dest.stat().st_blocks * 512 < 8 << 20


def test_image_copy_stops_when_asked(tmp_path: Path) -> None:
    source, dest = tmp_path / "source.img", tmp_path / "dest.img"
    _sparse(source, [(0, b"x" * 4096)], 1 << 20)
    stop = threading.Event()
    stop.set()
    src = os.open(source, os.O_RDONLY)
    dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(CopyStopped):
            copy_image(src, dst, stop)
    finally:
        os.close(src)
        os.close(dst)


def test_an_empty_image_copies_as_its_length(tmp_path: Path) -> None:
    source, dest = tmp_path / "source.img", tmp_path / "dest.img"
    _sparse(source, [], 8 << 20)
    src = os.open(source, os.O_RDONLY)
    dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copy_image(src, dst, threading.Event())
    finally:
        os.close(src)
        os.close(dst)
    assert (dest.stat().st_size, dest.stat().st_blocks) == (8 << 20, 0)
