"""The local cloud's API as EC2 clients other than the library see it.

- a small raw Query-API client (urllib, signing by hand with SigV2 and with SigV4, as
  clients in other languages do) checks the wire format: EC2's namespace with its trailing
  slash, in the API version the client sent, ``<return>true</return>`` on boolean actions,
  EC2's error document, and the authentication: wrong secret, wrong key id, no signature,
  a foreign ``Host`` are refused;
- the AWS CLI (``awscli``, of the ``dev`` extra) drives a full cycle: key pair, security
  group, run, describe, volume create/attach/detach, snapshot, stop/start, terminate.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import hmac
import http.client
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aioboto3
import anyio
import pytest
from botocore.exceptions import ClientError
from botocore.loaders import create_loader

from asyncstage.account import caller_cidr
from asyncstage.localcloud import LocalCloud, Realism, StateDirInUse

pytestmark = [
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]

NS = "http://ec2.amazonaws.com/doc/2016-11-15/"


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    from anyio.from_thread import start_blocking_portal

    with start_blocking_portal("asyncio") as portal:
        # The wire format and the AWS CLI are under test here, on the realistic profile but
        # for the consistency window (tests/test_realism_consistency.py has its own tests):
        # the CLI's waiters would wait out a NotFound in 5 - 15 s steps.
        consistent = dataclasses.replace(Realism(), consistency=(0.0, 0.0))
        cm = portal.wrap_async_context_manager(LocalCloud(realism=consistent))
        running = cm.__enter__()
        try:
            yield running
        finally:
            cm.__exit__(None, None, None)


# -- a raw Query-API client ----------------------------------------------------------------


def _quote(text: str) -> str:
    return quote(text, safe="-_.~")


class RawClient:
    """EC2's Query API over http.client, signed by hand (no botocore)."""

    def __init__(
        self, endpoint: str, key: str, secret: str, region: str = "us-east-1", host: str = ""
    ) -> None:
        self.netloc = urlsplit(endpoint).netloc
        self.host = host or self.netloc
        self.key, self.secret, self.region = key, secret, region

    def call(
        self, action: str, version: str = "2016-11-15", sign: str = "v4", **params: str
    ) -> tuple[int, str]:
        """(HTTP status, body) of one POST."""
        params = {"Action": action, "Version": version, **params}
        headers = {"Host": self.host, "Content-Type": "application/x-www-form-urlencoded"}
        if sign == "v2":
            params |= self._sigv2(params)
        body = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(params.items()))
        if sign == "v4":
            headers |= self._sigv4(body.encode(), headers)
        conn = http.client.HTTPConnection(self.netloc, timeout=30)
        try:
            conn.request("POST", "/", body=body.encode(), headers=headers)
            reply = conn.getresponse()
            return reply.status, reply.read().decode()
        finally:
            conn.close()

    def _sigv2(self, params: dict[str, str]) -> dict[str, str]:
        extra = {
            "AWSAccessKeyId": self.key,
            "SignatureVersion": "2",
            "SignatureMethod": "HmacSHA256",
            "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        signed = params | extra
        query = "&".join(f"{_quote(k)}={_quote(signed[k])}" for k in sorted(signed))
        text = f"POST\n{self.host}\n/\n{query}"
        digest = hmac.new(self.secret.encode(), text.encode(), hashlib.sha256).digest()
        return extra | {"Signature": base64.b64encode(digest).decode()}

    def _sigv4(self, body: bytes, headers: dict[str, str]) -> dict[str, str]:
        now = datetime.now(UTC)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        signed = {"content-type": headers["Content-Type"], "host": self.host, "x-amz-date": stamp}
        names = ";".join(sorted(signed))
        canonical = "\n".join(
            [
                "POST",
                "/",
                "",
                "".join(f"{k}:{signed[k]}\n" for k in sorted(signed)),
                names,
                hashlib.sha256(body).hexdigest(),
            ]
        )
        scope = f"{day}/{self.region}/ec2/aws4_request"
        text = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key = ("AWS4" + self.secret).encode()
        for part in (day, self.region, "ec2", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
        return {
            "X-Amz-Date": stamp,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={self.key}/{scope}, "
            f"SignedHeaders={names}, Signature={signature}",
        }


def raw(cloud: LocalCloud, **changes: str) -> RawClient:
    kwargs = {
        "key": cloud.session_kwargs()["aws_access_key_id"],
        "secret": cloud.session_kwargs()["aws_secret_access_key"],
    }
    return RawClient(cloud.endpoint_url, **(kwargs | changes))


def find(body: str, tag: str, ns: str = NS) -> list[str]:
    root = ET.fromstring(body)
    return [e.text or "" for e in root.iter(f"{{{ns}}}{tag}" if ns else tag)]


def error_code(body: str) -> str:
    root = ET.fromstring(body)
    assert root.tag == "Response", body  # EC2's error document has no namespace
    assert root.find("RequestID") is not None, body
    code = root.find("Errors/Error/Code")
    assert code is not None and root.find("Errors/Error/Message") is not None, body
    return code.text or ""


# -- authentication ------------------------------------------------------------------------


def test_credentials_are_the_clouds_own(cloud: LocalCloud) -> None:
    creds = cloud.session_kwargs()
    assert creds["aws_access_key_id"].startswith("AKIA") and len(creds["aws_access_key_id"]) == 20
    assert len(creds["aws_secret_access_key"]) == 40
    assert cloud.session_kwargs()["aws_secret_access_key"] == creds["aws_secret_access_key"]
    path = Path(cloud.state_dir) / "credentials"
    assert path.stat().st_mode & 0o777 == 0o600
    assert creds["aws_secret_access_key"] in path.read_text()


@pytest.mark.parametrize("sign", ["v4", "v2"])
def test_signed_requests_are_answered_and_others_refused(cloud: LocalCloud, sign: str) -> None:
    status, body = raw(cloud).call("DescribeRegions", sign=sign)
    assert status == 200 and "us-east-1" in find(body, "regionName"), body
    for client in (raw(cloud, secret="x" * 40), raw(cloud, key="AKIAWRONGWRONGWRONG0")):
        status, body = client.call("DescribeRegions", sign=sign)
        assert status == 401 and error_code(body) == "AuthFailure", body
    status, body = raw(cloud).call("DescribeRegions", sign="none")
    assert status == 401 and error_code(body) == "AuthFailure", body
    # DNS rebinding: a page served from evil.example reaches 127.0.0.1 under its own name
    port = urlsplit(cloud.endpoint_url).port
    status, body = raw(cloud, host=f"evil.example:{port}").call("DescribeRegions", sign=sign)
    assert status == 403, body
    status, _ = raw(cloud, host=f"localhost:{port}").call("DescribeRegions", sign=sign)
    assert status == 200


@pytest.mark.anyio
async def test_botocore_with_other_credentials_gets_auth_failure(cloud: LocalCloud) -> None:
    kwargs = cloud.session_kwargs() | {"aws_secret_access_key": "not-the-secret"}
    async with aioboto3.Session().client("ec2", **kwargs) as ec2:
        with pytest.raises(ClientError) as failed:
            await ec2.describe_instances()
    assert failed.value.response["Error"]["Code"] == "AuthFailure"


# -- the wire format -----------------------------------------------------------------------


def test_namespace_return_and_errors_as_ec2_sends_them(cloud: LocalCloud) -> None:
    client = raw(cloud)
    status, body = client.call("CreateKeyPair", KeyName="wire")
    assert status == 200 and body.count(f'xmlns="{NS}"') == 1, body
    assert find(body, "keyName") == ["wire"]
    # an older client, speaking a 2014 API version and SigV2: answered in its version
    old = "http://ec2.amazonaws.com/doc/2014-10-01/"
    status, body = client.call("DescribeKeyPairs", version="2014-10-01", sign="v2")
    assert status == 200 and "wire" in find(body, "keyName", old), body
    status, body = client.call("CreateVolume", Size="1", AvailabilityZone="us-east-1a")
    (volume_id,) = find(body, "volumeId")
    tags = {"ResourceId.1": volume_id, "Tag.1.Key": "Name", "Tag.1.Value": "wire"}
    for action, params in (
        ("CreateTags", tags),
        ("DeleteTags", {"ResourceId.1": volume_id, "Tag.1.Key": "Name"}),
        ("DeleteVolume", {"VolumeId": volume_id}),
        ("DeleteKeyPair", {"KeyName": "wire"}),
    ):
        status, body = client.call(action, sign="v2", **params)
        assert status == 200 and find(body, "return") == ["true"], (action, body)
        assert len(find(body, "requestId")[0]) == 36, body  # a request id of its own
    status, body = client.call("DeleteVolume", VolumeId=volume_id)
    assert status == 400 and error_code(body) == "InvalidVolume.NotFound", body


def test_a_raw_client_runs_an_instance_and_attaches_partition_names(cloud: LocalCloud) -> None:
    client = raw(cloud)
    status, body = client.call(
        "RunInstances",
        version="2014-10-01",
        ImageId=cloud.image_id,
        MinCount="1",
        MaxCount="1",
        InstanceType="t2.micro",
    )
    old = "http://ec2.amazonaws.com/doc/2014-10-01/"
    assert status == 200, body
    (instance_id,) = find(body, "instanceId", old)
    status, body = client.call("CreateVolume", Size="1", AvailabilityZone="us-east-1a")
    (volume_id,) = find(body, "volumeId")
    try:
        for device in ("/dev/sdf1", "/dev/xvdbc", "/dev/hdg"):
            status, body = client.call(
                "AttachVolume", sign="v2", VolumeId=volume_id, InstanceId=instance_id, Device=device
            )
            assert status == 200 and find(body, "device") == [device], body
            status, body = client.call("DetachVolume", VolumeId=volume_id)
            assert status == 200, body
            _wait_raw(client, "DescribeVolumes", "status", "available", {"VolumeId.1": volume_id})
        status, body = client.call("DescribeInstances", **{"InstanceId.1": instance_id})
        assert find(body, "rootDeviceName") == ["/dev/xvda"], body
    finally:
        client.call("TerminateInstances", **{"InstanceId.1": instance_id})
        client.call("DeleteVolume", VolumeId=volume_id)


def test_describe_instances_pages_count_instances(cloud: LocalCloud) -> None:
    """The cloud's ``MaxResults`` counts instances, not reservations (moto's): one launch
    of 7 comes in pages of 5 and 2, its reservation on both, ``NextToken`` leading from
    one to the next; sizes outside 5 - 1000 and a token the cloud did not give are
    refused."""
    client = raw(cloud)
    status, body = client.call(
        "RunInstances", ImageId=cloud.image_id, MinCount="7", MaxCount="7", InstanceType="t2.micro"
    )
    assert status == 200, body
    ids = find(body, "instanceId")
    try:
        named = {f"Filter.1.Value.{n}": i for n, i in enumerate(ids, 1)}
        flt = {"Filter.1.Name": "instance-id", **named}
        status, body = client.call("DescribeInstances", MaxResults="5", **flt)
        assert status == 200, body
        first, reservation = find(body, "instanceId"), find(body, "reservationId")
        (token,) = find(body, "nextToken")
        status, body = client.call("DescribeInstances", MaxResults="5", NextToken=token, **flt)
        assert status == 200, body
        rest = find(body, "instanceId")
        assert len(first) == 5 and len(rest) == 2 and sorted(first + rest) == sorted(ids)
        assert find(body, "nextToken") == [] and find(body, "reservationId") == reservation
        for bad in ({"MaxResults": "4"}, {"MaxResults": "1001"}, {"NextToken": "not-ours"}):
            status, body = client.call("DescribeInstances", **bad, **flt)
            assert status == 400 and error_code(body) == "InvalidParameterValue", body
    finally:
        client.call("TerminateInstances", **{f"InstanceId.{n}": i for n, i in enumerate(ids, 1)})


def test_a_filter_with_one_value_is_read_as_ec2_reads_it(cloud: LocalCloud) -> None:
    """``Filter.N.Value`` without an index (the Perl VM::EC2 sends one value so) filters."""
    client = raw(cloud)
    name = "one-value-filter"
    status, body = client.call("CreateSecurityGroup", GroupName=name, GroupDescription="test")
    assert status == 200, body
    (group_id,) = find(body, "groupId")
    try:
        for value, expected in ((name, [group_id]), ("no-such-group", [])):
            status, body = client.call(
                "DescribeSecurityGroups",
                sign="v2",
                **{"Filter.1.Name": "group-name", "Filter.1.Value": value},
            )
            assert status == 200, body
            assert find(body, "groupId") == expected, body
    finally:
        client.call("DeleteSecurityGroup", GroupId=group_id)


def test_a_filter_of_more_than_200_values_is_refused(cloud: LocalCloud) -> None:
    """EC2 answers ``FilterLimitExceeded`` to a filter of more than 200 values; moto
    would take it, the cloud does not. Two filters of 200 each are taken."""
    client = raw(cloud)
    ids = [f"snap-{n:017x}" for n in range(201)]

    def values(n: int, taken: list[str]) -> dict[str, str]:
        named = {f"Filter.{n}.Value.{k}": i for k, i in enumerate(taken, 1)}
        return {f"Filter.{n}.Name": "snapshot-id", **named}

    status, body = client.call("DescribeSnapshots", **values(1, ids))
    assert status == 400 and error_code(body) == "FilterLimitExceeded", body
    status, body = client.call("DescribeSnapshots", **values(1, ids[:200]), **values(2, ids[1:]))
    assert status == 200 and find(body, "snapshotId") == [], body


def test_a_group_in_use_is_not_deleted(cloud: LocalCloud) -> None:
    """DeleteSecurityGroup of a group an instance is in, or another group's rule names,
    answers EC2's DependencyViolation; once the instance is terminated and the rule
    revoked, it is deleted."""
    client = raw(cloud)
    made = []
    for name in ("in-use", "naming-it"):
        status, body = client.call(
            "CreateSecurityGroup", GroupName=f"{name}-{os.getpid()}", GroupDescription=name
        )
        assert status == 200, body
        made += find(body, "groupId")
    used, naming = made
    reference = {
        "IpPermissions.1.IpProtocol": "tcp",
        "IpPermissions.1.FromPort": "80",
        "IpPermissions.1.ToPort": "80",
        "IpPermissions.1.Groups.1.GroupId": used,
    }
    status, body = client.call("AuthorizeSecurityGroupIngress", GroupId=naming, **reference)
    assert status == 200, body
    status, body = client.call(
        "RunInstances",
        ImageId=cloud.image_id,
        MinCount="1",
        MaxCount="1",
        InstanceType="t3.micro",
        **{"SecurityGroupId.1": used},
    )
    assert status == 200, body
    (instance_id,) = find(body, "instanceId")
    try:
        status, body = client.call("DeleteSecurityGroup", GroupId=used)
        assert status == 400 and error_code(body) == "DependencyViolation", body
        status, body = client.call("RevokeSecurityGroupIngress", GroupId=naming, **reference)
        assert status == 200, body
        status, body = client.call("DeleteSecurityGroup", GroupId=used)  # the instance still
        assert status == 400 and error_code(body) == "DependencyViolation", body
    finally:
        client.call("TerminateInstances", **{"InstanceId.1": instance_id})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, body = client.call("DeleteSecurityGroup", GroupId=used)
        if status == 200 or error_code(body) != "DependencyViolation":
            break
        time.sleep(0.2)  # terminating: the group is freed once the instance is gone
    assert status == 200, body
    _, body = client.call("DescribeInstances", **{"InstanceId.1": instance_id})
    assert "terminated" in find(body, "name"), body
    status, body = client.call("DeleteSecurityGroup", GroupId=naming)
    assert status == 200, body


def test_list_parameters_at_any_index_as_ec2_reads_them(cloud: LocalCloud) -> None:
    """Lists from index 0, with gaps, out of order: EC2 reads them sorted by index."""
    client = raw(cloud)
    volumes = []
    for _ in range(3):
        status, body = client.call("CreateVolume", Size="1", AvailabilityZone="us-east-1a")
        assert status == 200, body
        volumes += find(body, "volumeId")
    try:
        status, body = client.call(
            "CreateTags",
            **{
                "ResourceId.0": volumes[0],
                "ResourceId.7": volumes[2],
                "ResourceId.3": volumes[1],
                "Tag.0.Key": "Name",
                "Tag.0.Value": "zero",
                "Tag.5.Key": "kept",
                "Tag.5.Value": "",
            },
        )
        assert status == 200 and find(body, "return") == ["true"], body
        status, body = client.call(
            "DescribeVolumes",
            sign="v2",
            **{
                "Filter.0.Name": "tag:Name",
                "Filter.0.Value.0": "zero",
                "Filter.0.Value.4": "other",
                "Filter.9.Name": "volume-id",
                "Filter.9.Value.2": volumes[2],
                "Filter.9.Value.0": volumes[0],
            },
        )
        assert status == 200 and sorted(find(body, "volumeId")) == sorted(
            [volumes[0], volumes[2]]
        ), body
        by_id = {f"VolumeId.{n}": v for n, v in zip((0, 10, 2), volumes, strict=True)}
        status, body = client.call("DescribeVolumes", **by_id)
        assert status == 200 and sorted(find(body, "volumeId")) == sorted(volumes), body
        assert find(body, "key").count("kept") == 3, body
        status, body = client.call(
            "DescribeTags", **{"Filter.0.Name": "key", "Filter.0.Value": "kept"}
        )
        assert status == 200 and sorted(find(body, "resourceId")) == sorted(volumes), body
    finally:
        for volume_id in volumes:
            client.call("DeleteVolume", VolumeId=volume_id)


def _wait_raw(client: RawClient, action: str, tag: str, want: str, params: dict[str, str]) -> None:
    for _ in range(200):
        _, body = client.call(action, **params)
        if want in find(body, tag):
            return
        time.sleep(0.05)
    raise AssertionError(f"{action}: {tag} never {want}")


# -- the AWS CLI ---------------------------------------------------------------------------


def brisk_waiters(root: Path) -> Path:
    """A botocore data directory (for ``AWS_DATA_PATH``) whose EC2 waiters poll every second.

    The AWS CLI's waiters poll every 15 s, paced for EC2; the local cloud answers in
    about a second. Each waiter keeps its bound: fifteen times the attempts.
    """
    loader = create_loader()
    version = loader.determine_latest_version("ec2", "waiters-2")
    model = loader.load_service_model("ec2", "waiters-2", version)
    for waiter in model["waiters"].values():
        waiter["maxAttempts"] = waiter["maxAttempts"] * waiter["delay"]
        waiter["delay"] = 1
    target = root / "ec2" / version / "waiters-2.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(model))
    return root


def aws(cloud: LocalCloud, *args: str, data_path: Path | None = None) -> Any:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "AWS_ENDPOINT_URL_EC2": cloud.endpoint_url,
        "AWS_DEFAULT_REGION": cloud.region,
        "AWS_ACCESS_KEY_ID": cloud.session_kwargs()["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": cloud.session_kwargs()["aws_secret_access_key"],
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_PAGER": "",
    }
    if data_path is not None:
        env["AWS_DATA_PATH"] = str(data_path)
    done = subprocess.run(
        [sys.executable, "-m", "awscli", "ec2", *args, "--output", "json"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, f"aws ec2 {' '.join(args)}: {done.stderr}"
    return json.loads(done.stdout) if done.stdout.strip() else None


@pytest.mark.skipif(
    importlib.util.find_spec("awscli") is None, reason="awscli missing: pip install -e '.[dev]'"
)
def test_the_aws_cli_drives_a_full_cycle(cloud: LocalCloud, tmp_path: Path) -> None:
    cli = functools.partial(aws, data_path=brisk_waiters(tmp_path / "models"))

    key = cli(cloud, "create-key-pair", "--key-name", "cli")
    assert key["KeyMaterial"].startswith("-----BEGIN")
    group = cli(cloud, "create-security-group", "--group-name", "cli", "--description", "cli")
    gid = group["GroupId"]
    # ssh from this machine's address, as the cloud's checkip sees it (as on EC2)
    here = caller_cidr(None, cloud.checkip_url) if cloud.checkip_url else "127.0.0.1/32"
    cli(cloud, "authorize-security-group-ingress", "--group-id", gid, "--protocol", "tcp",
        "--port", "22", "--cidr", here)  # fmt: skip
    reservation = cli(cloud, "run-instances", "--image-id", cloud.image_id, "--count", "1",
                      "--instance-type", "t3.micro", "--key-name", "cli",
                      "--security-group-ids", gid)  # fmt: skip
    iid = reservation["Instances"][0]["InstanceId"]
    cli(cloud, "wait", "instance-running", "--instance-ids", iid)
    described = cli(cloud, "describe-instances", "--instance-ids", iid)
    instance = described["Reservations"][0]["Instances"][0]
    assert instance["State"]["Name"] == "running" and instance["KeyName"] == "cli"
    assert instance["RootDeviceName"] == "/dev/xvda"
    zone = instance["Placement"]["AvailabilityZone"]
    vol = cli(cloud, "create-volume", "--size", "1", "--availability-zone", zone)["VolumeId"]
    cli(cloud, "wait", "volume-available", "--volume-ids", vol)
    cli(cloud, "attach-volume", "--volume-id", vol, "--instance-id", iid, "--device", "/dev/sdf")
    cli(cloud, "wait", "volume-in-use", "--volume-ids", vol)
    snap = cli(cloud, "create-snapshot", "--volume-id", vol)["SnapshotId"]
    cli(cloud, "wait", "snapshot-completed", "--snapshot-ids", snap)
    cli(cloud, "detach-volume", "--volume-id", vol)
    cli(cloud, "wait", "volume-available", "--volume-ids", vol)
    cli(cloud, "stop-instances", "--instance-ids", iid)
    cli(cloud, "wait", "instance-stopped", "--instance-ids", iid)
    cli(cloud, "start-instances", "--instance-ids", iid)
    cli(cloud, "wait", "instance-running", "--instance-ids", iid)
    cli(cloud, "create-tags", "--resources", iid, "--tags", "Key=Name,Value=cli")
    tagged = cli(cloud, "describe-instances", "--filters", "Name=tag:Name,Values=cli")
    assert [i["InstanceId"] for r in tagged["Reservations"] for i in r["Instances"]] == [iid]
    cli(cloud, "terminate-instances", "--instance-ids", iid)
    cli(cloud, "wait", "instance-terminated", "--instance-ids", iid)
    cli(cloud, "delete-snapshot", "--snapshot-id", snap)
    cli(cloud, "delete-volume", "--volume-id", vol)
    cli(cloud, "delete-security-group", "--group-id", gid)
    cli(cloud, "delete-key-pair", "--key-name", "cli")


# -- one cloud per state dir ---------------------------------------------------------------


def test_a_second_cloud_on_a_state_dir_is_refused(cloud: LocalCloud) -> None:
    async def second() -> None:
        async with LocalCloud(state_dir=cloud.state_dir):
            pass

    with pytest.raises(StateDirInUse, match="in use by another local cloud"):
        anyio.run(second)
    assert Path(cloud.state_dir, "volumes").is_dir()  # the first one's state is untouched
    status, _ = raw(cloud).call("DescribeRegions")
    assert status == 200
