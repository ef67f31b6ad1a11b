"""First use: commands that read change nothing, many starting at once on a fresh cloud all
succeed, the read-only credential pair of the local cloud, and a quiet command line.

The command-line tests run the real ``asyncstage`` command against a ``local up`` daemon of
their own (a fresh account: no key pair, no security group yet), the API tests use the
session's local cloud.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioboto3
import boto3
import pytest
from botocore.exceptions import ClientError

from asyncstage.errors import PermissionDenied
from asyncstage.localcloud import LocalCloud
from tests.fixtures.cloud import ManagerFactory
from tests.fixtures.daemon import EXE, ROOT, local_daemon, run

READS = (
    ["servers"],
    ["servers", "list", "--json"],
    ["volumes"],
    ["volumes", "list"],
    ["snapshots"],
    ["config", "show"],
    ["backup", "list"],
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root")


def _exports(text: str) -> dict[str, str]:
    return dict(line.removeprefix("export ").split("=", 1) for line in text.splitlines())


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A fresh local cloud of the module's own, run by ``asyncstage local up``."""
    with local_daemon(tmp_path_factory.mktemp("first-use")) as env:
        yield env


@pytest.fixture
def raw(daemon: dict[str, str]) -> Any:
    """A plain EC2 client of the daemon's cloud (its full credentials)."""
    state = json.loads(run(daemon, "local", "status", "--json").stdout)
    return boto3.client(
        "ec2",
        endpoint_url=state["endpoint_url"],
        region_name=state["region"],
        aws_access_key_id=state["aws_access_key_id"],
        aws_secret_access_key=state["aws_secret_access_key"],
    )


def test_the_command_line_shows_no_dependency_warnings(tmp_path: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    env.pop("PYTHONWARNINGS", None)
    for args in (["config", "show"], ["--help"], ["completion", "bash"]):
        done = run(env, *args)
        assert done.stderr == "", f"{args}: {done.stderr}"
    module = subprocess.run(
        [sys.executable, "-m", "asyncstage.cli", "config", "show"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert module.returncode == 0 and module.stderr == ""
    # the parser imports no dependency that warns: a command that loads the library does
    # (``backup forget`` loads the Manager, then refuses the option before any call)
    library = ["backup", "forget", "web", "--keep-daily", "many"]
    refused = "asyncstage: error: --keep-daily: a whole number, not 'many'\n"
    assert run(env, *library, ok=False).stderr == refused
    # a program that imports the library sees its dependencies' warnings as before
    plain = [sys.executable, "-c"]
    deps = subprocess.run([*plain, "import asyncssh"], capture_output=True, text=True, env=env)
    use = "from asyncstage import Manager"  # the Manager's modules import asyncssh
    lib = subprocess.run([*plain, use], capture_output=True, text=True, env=env)
    assert [w for w in deps.stderr.splitlines() if "Warning" in w] == [
        w for w in lib.stderr.splitlines() if "Warning" in w
    ]
    # and -W (or PYTHONWARNINGS) still wins over the command's own choice
    loud = subprocess.run(
        [sys.executable, "-W", "default", "-m", "asyncstage.cli", *library],
        capture_output=True,
        text=True,
        env=env,
    )
    warned = [w for w in deps.stderr.splitlines() if "Warning" in w]
    assert warned and all(w in loud.stderr for w in warned)


@needs_root
@pytest.mark.localcloud
def test_ten_commands_at_once_on_a_fresh_cloud(daemon: dict[str, str], raw: Any) -> None:
    assert (raw.describe_key_pairs())["KeyPairs"] == []
    commands = [["--local", *READS[i % len(READS)]] for i in range(9)]
    commands.insert(4, ["--local", "servers", "provision", "first-use"])
    procs = [
        subprocess.Popen(
            [str(EXE), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=daemon,
        )
        for args in commands
    ]
    outcomes = [(p.communicate(timeout=300), p.returncode) for p in procs]
    for args, ((_, err), code) in zip(commands, outcomes, strict=True):
        assert code == 0, f"{args}: {code}\n{err}"
        assert "Warning" not in err, f"{args}: {err}"
    pairs = (raw.describe_key_pairs())["KeyPairs"]
    groups = raw.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["asyncstage"]}]
    )
    assert len(pairs) == 1 and len(groups["SecurityGroups"]) == 1
    listed = json.loads(run(daemon, "--local", "servers", "--json").stdout)
    assert [(s["name"], s["state"]) for s in listed] == [("first-use", "running")]


@needs_root
@pytest.mark.localcloud
def test_the_read_only_pair_lists_and_cannot_launch(daemon: dict[str, str], raw: Any) -> None:
    exports = _exports(run(daemon, "local", "env", "--read-only").stdout)
    full = _exports(run(daemon, "local", "env").stdout)
    assert exports["AWS_ACCESS_KEY_ID"] != full["AWS_ACCESS_KEY_ID"]
    reader = daemon | exports
    before = _instance_ids(raw)
    for args in READS:
        run(reader, "--local", *args)
    listed = json.loads(run(reader, "--local", "servers", "--json").stdout)
    assert listed == json.loads(run(daemon, "--local", "servers", "--json").stdout)
    done = run(reader, "--local", "servers", "provision", "not-allowed", ok=False)
    # the first write the launch needs: RunInstances once the account is set up
    first = "RunInstances" if (raw.describe_key_pairs())["KeyPairs"] else "ImportKeyPair"
    assert done.returncode == 1 and f"lack the IAM permission ec2:{first}" in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("asyncstage: error")]
    assert len(errors) == 1 and "not authorized" in errors[0]  # one line, no traceback
    assert _instance_ids(raw) == before  # nothing launched
    if listed:  # the full pair ends what the module made
        run(daemon, "--local", "servers", "terminate", "--all")


@needs_root
@pytest.mark.localcloud
@pytest.mark.anyio
async def test_a_read_only_manager_reads_and_names_the_permission_it_lacks(
    manager_factory: ManagerFactory, tmp_path: Path
) -> None:
    async with manager_factory(read_only=True, scan=True, dotdir=tmp_path) as m:
        await m.scan_region()
        await m.snapshots()
        with pytest.raises(PermissionDenied) as denied:
            await m.provision_server("read-only-launch")
        # a fresh dot directory: the first write a launch needs is the key pair's import
        assert denied.value.permission == "ec2:ImportKeyPair"
        assert denied.value.code == "UnauthorizedOperation"
        assert m.servers() == []


@needs_root
@pytest.mark.localcloud
@pytest.mark.anyio
async def test_dry_runs_answer_as_ec2_does(cloud: LocalCloud) -> None:
    session = aioboto3.Session()
    read_only = cloud.session_kwargs(read_only=True)
    async with (
        session.client("ec2", **cloud.session_kwargs()) as full,
        session.client("ec2", **read_only) as reader,
    ):
        launch = {"ImageId": cloud.image_id, "MinCount": 1, "MaxCount": 1, "DryRun": True}
        cases = [
            (full, "run_instances", launch, "DryRunOperation", 412),
            (reader, "run_instances", launch, "UnauthorizedOperation", 403),
            (reader, "describe_instances", {"DryRun": True}, "DryRunOperation", 412),
            (reader, "create_tags", _tags(), "UnauthorizedOperation", 403),
            (reader, "create_tags", _tags() | {"DryRun": True}, "UnauthorizedOperation", 403),
            (full, "create_tags", _tags() | {"DryRun": True}, "DryRunOperation", 412),
        ]
        for client, method, params, code, status in cases:
            with pytest.raises(ClientError) as info:
                await getattr(client, method)(**params)
            error = info.value.response
            assert (error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]) == (
                code,
                status,
            ), (method, params)
            if code == "UnauthorizedOperation":
                assert error["Error"]["Message"] == (
                    "You are not authorized to perform this operation."
                )
        # a dry run makes nothing; the read-only pair reads as the full one does
        runs = await full.describe_instances(Filters=[{"Name": "tag:dry-run", "Values": ["yes"]}])
        assert runs["Reservations"] == []
        assert (await reader.describe_images(ImageIds=[cloud.image_id]))["Images"]


def _instance_ids(raw: Any) -> set[str]:
    found = raw.describe_instances()["Reservations"]
    return {i["InstanceId"] for r in found for i in r["Instances"]}


def _tags() -> dict[str, Any]:
    return {"Resources": ["i-0123456789abcdef0"], "Tags": [{"Key": "dry-run", "Value": "yes"}]}
