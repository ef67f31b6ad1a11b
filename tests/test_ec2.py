"""asyncstage.ec2 and keys.py against a plain moto server (API only: no ssh to its addresses)."""

from __future__ import annotations

import functools
import itertools
import stat
import time
import types
from collections.abc import AsyncIterator, Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from botocore.exceptions import ReadTimeoutError

from asyncstage import keys
from asyncstage.ec2 import (
    CLIENT_TOKEN_TAG,
    EC2,
    console_fingerprints,
    new_client_token,
    tag,
    tag_filters,
    tags_of,
    waits,
)
from asyncstage.ec2 import client as client_module
from asyncstage.errors import (
    EC2Error,
    UnknownServer,
    UnknownSnapshot,
    UnknownVolume,
    WaitTimeout,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def ec2(moto_url: str) -> AsyncIterator[EC2]:
    async with EC2(
        region="us-east-1",
        endpoint_url=moto_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        poll_interval=0.05,
    ) as client:
        yield client


async def _image(ec2: EC2) -> str:
    return str((await ec2.find_image("*"))["ImageId"])


async def test_errors_are_mapped(ec2: EC2) -> None:
    with pytest.raises(UnknownVolume) as info:
        await ec2.call("DescribeVolumes", VolumeIds=["vol-0123456789abcdef0"])
    assert isinstance(info.value.__cause__, Exception)
    with pytest.raises(UnknownServer):
        await ec2.call("StopInstances", InstanceIds=["i-0123456789abcdef0"])
    with pytest.raises(EC2Error) as err:
        await ec2.call("DeleteSecurityGroup", GroupId="sg-0123456789abcdef0")
    assert err.value.operation == "DeleteSecurityGroup" and err.value.code


async def test_ec2s_clock_is_read_from_its_answers(ec2: EC2) -> None:
    assert ec2.clock_offset is None
    await ec2.availability_zones()  # a real answer of the moto server: its Date, our clock
    assert ec2.clock_offset is not None and abs(ec2.clock_offset) < 2
    assert abs((ec2.now() - datetime.now(UTC)).total_seconds()) < 2
    seen = ec2.clock_offset
    for headers in ({}, {"date": "not a date"}, {"date": "Mon, 30 Nov 2026 07:00:00"}):
        ec2._note_clock({"ResponseMetadata": {"HTTPHeaders": headers}})
        assert ec2.clock_offset == seen  # a missing or ill-formed Date changes nothing


async def test_unknown_ids_are_left_out_of_describes(ec2: EC2) -> None:
    assert await ec2.describe_instances(["i-0123456789abcdef0"]) == []
    assert await ec2.describe_volumes(["vol-0123456789abcdef0"]) == []


async def test_concurrent_waits_share_one_describe_per_round(ec2: EC2) -> None:
    insts = await ec2.run_instances(
        image_id=await _image(ec2),
        count=10,
        instance_type="t3.micro",
        tags={tag("role"): "test"},
    )
    ids = [i["InstanceId"] for i in insts]
    before = ec2.calls["DescribeInstances"]
    async with anyio.create_task_group() as tg:
        for iid in ids:
            tg.start_soon(functools.partial(ec2.wait_for_instance, iid, "running", timeout=60))
    assert ec2.calls["DescribeInstances"] - before == 1
    await ec2.stop_instances(ids)
    before = ec2.calls["DescribeInstances"]
    reached, failed = await ec2.wait_for_instances(ids, "stopped", timeout=60)
    assert set(reached) == set(ids) and not failed
    assert ec2.calls["DescribeInstances"] - before == 1
    # a wait that cannot succeed names the instance and its last state
    reached, failed = await ec2.wait_for_instances(
        ids[:2], "running", timeout=0.3, labels={ids[0]: "alpha"}
    )
    assert not reached and set(failed) == set(ids[:2])
    err = failed[ids[0]]
    assert isinstance(err, WaitTimeout)
    assert "alpha" in str(err) and ids[0] in str(err) and err.last_state == "stopped"
    await ec2.terminate_instances(ids)
    _, failed = await ec2.wait_for_instances(ids, "running", timeout=60)
    assert all(isinstance(e, EC2Error) and "terminated" in str(e) for e in failed.values())


async def test_concurrent_snapshot_waits_share_one_describe_per_round(ec2: EC2) -> None:
    vol = await ec2.create_volume(availability_zone="us-east-1a", size=1)
    snaps = [
        str((await ec2.create_snapshot(vol["VolumeId"], description=f"s{i}"))["SnapshotId"])
        for i in range(4)
    ]
    gone = "snap-0123456789abcdef0"
    found: dict[str, object] = {}

    async def wait(sid: str) -> None:
        try:
            found[sid] = (await ec2.wait_for_snapshot(sid, timeout=60))["State"]
        except UnknownSnapshot as e:
            found[sid] = e

    before = ec2.calls["DescribeSnapshots"]
    async with anyio.create_task_group() as tg:
        for sid in [*snaps, gone]:
            tg.start_soon(wait, sid)
    assert ec2.calls["DescribeSnapshots"] - before == 1  # moto's are completed at once
    assert all(found[sid] == "completed" for sid in snaps)
    assert isinstance(found[gone], UnknownSnapshot)  # the one missing fails alone


async def test_a_round_asks_for_every_watched_snapshot_and_serves_them_later(ec2: EC2) -> None:
    vol = await ec2.create_volume(availability_zone="us-east-1a", size=1)
    a, b = [str((await ec2.create_snapshot(vol["VolumeId"]))["SnapshotId"]) for _ in range(2)]
    gone = "snap-0123456789abcdef0"

    def calls() -> int:
        return ec2.calls["DescribeSnapshots"]

    with ec2.watching_snapshot(a), ec2.watching_snapshot(b), ec2.watching_snapshot(gone):
        start, before = time.monotonic(), calls()
        assert set(await ec2.describe_snapshots_shared([a], since=start)) == {a}
        assert calls() - before == 1  # nothing known yet: a round, b and the gone one in it
        found = await ec2.describe_snapshots_shared([b, gone], since=start)
        assert set(found) == {b} and calls() - before == 1  # that round's answer
        await ec2.describe_snapshots_shared([b], since=time.monotonic())
        assert calls() - before == 2  # newer than any round: a round of its own
    await ec2.describe_snapshots_shared([b], since=start)
    assert calls() - before == 3  # no longer watched: nothing kept


async def test_a_snapshot_seen_completed_is_waited_for_without_a_call(ec2: EC2) -> None:
    """Completed is a snapshot's last state: one this client saw so (in a listing) is
    returned by a wait at once; once this client deletes it, a wait asks again."""
    vol = await ec2.create_volume(availability_zone="us-east-1a", size=1)
    sid = str((await ec2.create_snapshot(vol["VolumeId"]))["SnapshotId"])
    assert ec2.rounds.completed.get(sid) is None
    listed = await ec2.describe_snapshots(filters=[{"Name": "snapshot-id", "Values": [sid]}])
    assert [s["State"] for s in listed] == ["completed"]
    before = ec2.calls["DescribeSnapshots"]
    assert (await ec2.wait_for_snapshot(sid, timeout=5))["SnapshotId"] == sid
    assert ec2.calls["DescribeSnapshots"] == before
    await ec2.delete_snapshot(sid)
    with pytest.raises(UnknownSnapshot):
        await ec2.wait_for_snapshot(sid, timeout=5)
    assert ec2.calls["DescribeSnapshots"] == before + 1


async def test_listings_by_a_tags_values_share_one_call(ec2: EC2) -> None:
    """Concurrent listings by one tag's values are one call asking for all of them; each
    caller gets exactly its own (a value that only starts like another's is not
    taken), the other filters hold, and a leader cancelled in its window leaves the
    others to ask again."""
    key = tag("backup-of")
    made: dict[str, str] = {}
    for name, role in (("web", "x"), ("web1", "x"), ("db", "x"), ("db", "other")):
        vol = await ec2.create_volume(
            availability_zone="us-east-1a", size=1, tags={key: name, tag("role"): role}
        )
        made[f"{name}/{role}"] = vol["VolumeId"]
    role = [{"Name": f"tag:{tag('role')}", "Values": ["x"]}]
    found: dict[str, list[str]] = {}
    await ec2.describe_volumes(list(made.values()))  # seen: a filtered describe needs no wait

    async def listing(name: str) -> None:
        vols = await ec2.describe_tagged_shared("volumes", key, name, filters=role)
        found[name] = sorted(v["VolumeId"] for v in vols)

    before = ec2.calls["DescribeVolumes"]
    async with anyio.create_task_group() as tg:
        for name in ("web", "web1", "db", "none"):
            tg.start_soon(listing, name)
    assert ec2.calls["DescribeVolumes"] - before == 1
    assert found == {
        "web": [made["web/x"]],
        "web1": [made["web1/x"]],
        "db": [made["db/x"]],
        "none": [],
    }

    found.clear()
    leader = anyio.CancelScope()

    async def lead() -> None:
        with leader:
            await ec2.describe_tagged_shared("volumes", key, "web", filters=role)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lead)
        await anyio.sleep(0.01)  # within the leader's window: joins its round
        tg.start_soon(listing, "db")
        await anyio.sleep(0.01)
        leader.cancel()
    assert found == {"db": [made["db/x"]]}


async def test_a_round_can_ask_only_for_the_instances_that_changed(ec2: EC2) -> None:
    """A shared round with ``states`` names every instance and EC2 answers only those in
    these states: a wait's later rounds carry what changed, not the whole fleet; rounds
    asking for the same states are one call, other states a call of their own."""
    insts = await ec2.run_instances(
        image_id=await _image(ec2), count=3, instance_type="t3.micro", tags={tag("role"): "t"}
    )
    ids = [i["InstanceId"] for i in insts]
    await ec2.wait_for_instances(ids, "running", timeout=60)
    await ec2.stop_instances(ids[:1])
    await ec2.wait_for_instances(ids[:1], "stopped", timeout=60)
    before = ec2.calls["DescribeInstances"]
    results: dict[str, dict[str, object]] = {}

    async def ask(name: str, wanted: list[str], states: tuple[str, ...]) -> None:
        results[name] = await ec2.describe_instances_shared(wanted, states=states)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "stopped", ids[:2], ("stopped",))
        tg.start_soon(ask, "stopped too", ids[1:], ("stopped",))
        tg.start_soon(ask, "any", ids, ())
    assert set(results["stopped"]) == {ids[0]} and results["stopped too"] == {}
    assert set(results["any"]) == set(ids)
    assert ec2.calls["DescribeInstances"] - before == 2
    await ec2.terminate_instances(ids)


PAGE = 5
"""The page size of the paged rounds below: EC2's smallest ``MaxResults``."""


async def _reservations(ec2: EC2, count: int) -> list[str]:
    """``count`` instances, one RunInstances (one reservation) each: moto counts a page's
    reservations, the local cloud its instances; one instance a reservation, both count
    alike."""
    image = await _image(ec2)
    ids: list[str] = []
    for _ in range(count):  # one after another: moto lists reservations as launched
        (inst,) = await ec2.run_instances(
            image_id=image, count=1, instance_type="t3.micro", tags={tag("role"): "pages"}
        )
        ids.append(inst["InstanceId"])
    return ids


def _describes_sent(ec2: EC2) -> list[int]:
    """A list that counts the DescribeInstances requests as they are sent."""
    sent: list[int] = []
    ec2._client.meta.events.register(
        "before-send.ec2.DescribeInstances", lambda **_: sent.append(1)
    )
    return sent


async def test_a_wait_hands_on_each_page_before_it_asks_for_the_next(
    ec2: EC2, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once every instance was seen, a wait's round comes in pages: the instances of the
    first page reach ``on_reached`` before the last page is asked for, and the round
    follows NextToken to the end (12 instances at 5 a page: 3 calls)."""
    monkeypatch.setattr(client_module, "_PAGE", PAGE)
    ids = await _reservations(ec2, 12)
    await ec2.stop_instances(ids)
    real = ec2.describe_instances_shared

    async def start_after_the_first_round(
        wanted: Collection[str], *, states: Collection[str] = (), on_page: object = None
    ) -> dict[str, dict[str, object]]:
        found = await real(wanted, states=states, on_page=on_page)  # type: ignore[arg-type]
        if not states:  # the first round saw them all stopped: on their way now
            await ec2.start_instances(ids)
        return found

    monkeypatch.setattr(ec2, "describe_instances_shared", start_after_the_first_round)
    sent = _describes_sent(ec2)
    reached_at: dict[str, int] = {}  # instance -> DescribeInstances sent by then
    reached, failed = await ec2.wait_for_instances(
        ids, "running", timeout=60, on_reached=lambda i, _: reached_at.setdefault(i, len(sent))
    )
    assert set(reached) == set(ids) and not failed and set(reached_at) == set(ids)
    assert len(sent) == 1 + 3  # the first round, then the arrivals' three pages
    by_call = sorted(reached_at.values())
    assert by_call.count(2) == PAGE  # the first page's, before the second was sent
    assert by_call.count(3) == PAGE and by_call.count(4) == 12 - 2 * PAGE


@pytest.mark.parametrize("leader_ends", [None, "cancelled", "its own error"])
async def test_coalesced_callers_each_get_their_instances_page_by_page(
    ec2: EC2, monkeypatch: pytest.MonkeyPatch, leader_ends: str | None
) -> None:
    """Callers of one paged round each get their own instances, each once, page by page:
    a follower's first page before the round's last page is asked for. A leader cancelled
    or failing in its own ``on_page`` after the first page: the others still get all of
    theirs, each once (a round of their own for what no page gave)."""
    monkeypatch.setattr(client_module, "_PAGE", PAGE)
    ids = await _reservations(ec2, 12)
    sent = _describes_sent(ec2)
    parts = {"leader": ids[:6], "follower": ids[6:], "both": ids[3:9]}
    pages: dict[str, list[tuple[int, set[str]]]] = {name: [] for name in parts}
    results: dict[str, dict[str, object]] = {}

    async def ask(name: str, scope: anyio.CancelScope) -> None:
        def on_page(found: dict[str, object]) -> None:
            pages[name].append((len(sent), set(found)))
            if name == "leader" and leader_ends == "cancelled":
                scope.cancel()
            if name == "leader" and leader_ends == "its own error":
                raise LookupError("the leader's own")

        with scope:
            try:
                results[name] = await ec2.describe_instances_shared(
                    parts[name], states=("running",), on_page=on_page
                )
            except LookupError:
                assert name == "leader" and leader_ends == "its own error"

    async with anyio.create_task_group() as tg:
        for name in parts:  # in this order: the first to ask leads the round
            tg.start_soon(ask, name, anyio.CancelScope())
    for name in ("follower", "both") if leader_ends else parts:
        given = [i for _, page in pages[name] for i in page]
        assert sorted(given) == sorted(parts[name]) == sorted(results[name])
    # the first page: ids[0:5]; "both" (ids[3:9]) has two of them, before the page after
    assert pages["both"][0][1] == set(ids[3:5])
    if leader_ends:
        assert "leader" not in results and len(pages["leader"]) == 1
    else:
        assert pages["both"][0][0] == 2  # when the second page was sent, not the third
        assert len(sent) == 3  # one round for the three: 12 instances, 5 a page
        assert all(len(p) == 2 for p in pages.values())  # each on two of the three pages


async def test_tags_and_filters(ec2: EC2) -> None:
    vol = await ec2.create_volume(
        availability_zone="us-east-1a", size=1, tags={tag("name"): "tagged", "Name": "tagged"}
    )
    found = await ec2.describe_volumes(filters=tag_filters({tag("name"): "tagged"}))
    assert [v["VolumeId"] for v in found] == [vol["VolumeId"]]
    assert tags_of(found[0])[tag("name")] == "tagged"
    await ec2.delete_volume(vol["VolumeId"])


async def test_security_group_lets_in_the_caller_and_itself_only(ec2: EC2) -> None:
    gid = await ec2.ensure_security_group("asyncstage-test", cidrs=["127.0.0.1/32"])
    assert await ec2.ensure_security_group("asyncstage-test", cidrs=["127.0.0.1/32"]) == gid
    groups = await ec2.call("DescribeSecurityGroups", GroupIds=[gid])
    perms = groups["SecurityGroups"][0]["IpPermissions"]
    cidrs = {r["CidrIp"] for p in perms for r in p.get("IpRanges", [])}
    assert cidrs == {"127.0.0.1/32"}
    assert any(g["GroupId"] == gid for p in perms for g in p.get("UserIdGroupPairs", []))
    await ec2.delete_security_group(gid)


def test_console_fingerprints() -> None:
    console = (
        "boot noise\n"
        "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n"
        "256 SHA256:abcDEF012+/xyz root@host (ED25519)\n"
        "3072 SHA256:rsaKEY root@host (RSA)\n"
        "-----END SSH HOST KEY FINGERPRINTS-----\n"
        "more noise SHA256:notthis\n"
    )
    assert console_fingerprints(console) == ["SHA256:abcDEF012+/xyz", "SHA256:rsaKEY"]
    assert console_fingerprints("no markers") == []


def test_dotdir_and_local_key_permissions(tmp_path: Path) -> None:
    d = keys.dotdir(tmp_path / "dot")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    pair = keys.local_key(d, "us-east-1")
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    assert pair.public_key.startswith("ssh-ed25519 ")
    assert pair.name.startswith("asyncstage-us-east-1-")
    assert keys.local_key(d, "us-east-1") == pair  # reused
    other = keys.local_key(d, "us-east-1", reuse=False)
    assert other.name != pair.name and other.private_key.exists()
    assert set(keys.keyfiles(d, "us-east-1")) == {pair.name, other.name}
    assert keys.local_key(d, "eu-west-1").name != pair.name


async def test_key_pair_imported_once(ec2: EC2, tmp_path: Path) -> None:
    d = keys.dotdir(tmp_path / "dot")
    pair = await keys.ensure_key_pair(ec2, d)
    imports = ec2.calls["ImportKeyPair"]
    assert await keys.ensure_key_pair(ec2, d) == pair
    assert ec2.calls["ImportKeyPair"] == imports
    assert await ec2.key_pair_exists(pair.name)
    await ec2.delete_key_pair(pair.name)


async def test_snapshot_and_image_waits(ec2: EC2) -> None:
    vol = await ec2.create_volume(availability_zone="us-east-1a", size=1)
    snap = await ec2.create_snapshot(vol["VolumeId"], tags={tag("name"): "s"})
    done = await ec2.wait_for_snapshot(snap["SnapshotId"], timeout=60)
    assert done["State"] == "completed"
    copy = await ec2.copy_snapshot(snap["SnapshotId"], source_region="us-east-1")
    assert (await ec2.wait_for_snapshot(copy, timeout=60))["State"] == "completed"
    image = await ec2.find_image("*")
    new = await ec2.copy_image(image["ImageId"], source_region="us-east-1", name="copied")
    assert (await ec2.wait_for_image(new, timeout=60))["State"] == "available"


class _Clock:
    """A virtual clock for ``waits.poll``: its pauses pass at once and exactly as asked.

    The pacing is under test, not how late a loaded machine wakes a sleeper: measured
    gaps would round up under load.
    """

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += delay
        await anyio.lowlevel.checkpoint()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    virtual = _Clock()
    monkeypatch.setattr(waits, "time", types.SimpleNamespace(monotonic=virtual.monotonic))
    monkeypatch.setattr(waits, "anyio", types.SimpleNamespace(sleep=virtual.sleep))
    return virtual


def _gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


async def test_polls_start_fast_and_back_off(clock: _Clock) -> None:
    client = EC2(region="us-east-1", poll_interval=0.1, poll_backoff=2.0, poll_max_interval=0.4)
    assert client._config.retries == {"mode": "adaptive", "max_attempts": 10}
    times: list[float] = []

    async def fetch() -> bool:
        times.append(clock.now)
        return False

    with pytest.raises(WaitTimeout) as info:
        await client._poll(fetch, what="nothing", timeout=1.3, last_state=lambda: "still")
    # doubling up to the cap, the last pause cut short by the deadline, one last look there
    assert _gaps(times) == [0.1, 0.2, 0.4, 0.4, 0.2]
    assert "nothing" in str(info.value) and info.value.last_state == "still"


async def test_polls_start_over_while_a_fleet_arrives(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds in which more instances arrived keep the first pause, and so do those of
    the steady time after the last arrival; then the pauses back off again."""
    monkeypatch.setattr(waits, "_STEADY", 0.25)
    client = EC2(region="us-east-1", poll_interval=0.1, poll_backoff=2.0, poll_max_interval=0.4)
    times: list[float] = []
    arrived = [0]

    async def fetch() -> bool:
        times.append(clock.now)
        if 2 <= len(times) <= 4:  # three rounds each see one more instance
            arrived[0] += 1
        return len(times) == 9

    await client._poll(
        fetch, what="fleet", timeout=5, last_state=lambda: None, progress=lambda: arrived[0]
    )
    # the last arrival at 0.3: the rounds at 0.4 and 0.5 still within the steady 0.25 s
    assert _gaps(times) == [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.4]


async def test_a_snapshot_wait_asks_again_when_its_pace_says_it_is_done(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot's Progress gives its pace: from when each answer held (another wait's
    round, asked a moment before), not when it came. Once the pace says it is done, only
    a round asked from then on will do (an older one says pending still); the wait sees
    it completed a round after it is, not a back-off later."""
    client = EC2(region="us-east-1", poll_interval=0.5, poll_backoff=1.5, poll_max_interval=5)
    done_at, old = 3.0, 0.3  # the snapshot's pending time; how old the rounds' answers are
    asks: list[tuple[float, float | None]] = []
    held = [0.0]

    async def shared(ids: Collection[str], *, since: float | None = None) -> dict[str, Any]:
        asks.append((clock.now, since))
        # the latest round, asked ``old`` s ago, unless this wait wants a newer one
        held[0] = clock.now if since is not None and since > clock.now - old else clock.now - old
        held[0] = max(0.0, held[0])
        pct = min(100, int(100 * held[0] / done_at))
        state = "completed" if held[0] >= done_at else "pending"
        return {"snap-1": {"SnapshotId": "snap-1", "State": state, "Progress": f"{pct}%"}}

    monkeypatch.setattr(client, "describe_snapshots_shared", shared)
    monkeypatch.setattr(client.rounds, "seen_at", lambda _: held[0])
    assert (await client.wait_for_snapshot("snap-1", timeout=60))["State"] == "completed"
    last, since = asks[-1]
    assert since is not None and since >= done_at - 0.1  # no answer older than its due time
    assert done_at <= last <= done_at + 0.1


async def test_volume_waits_poll_at_the_pace_of_the_last_ones(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume wait of a kind the client has seen polls from three quarters of the
    shortest such wait on at the steady pace, not a back-off later; until twice the
    longest, then it backs off as usual. A wait of no kind polls as it always did."""
    client = EC2(region="us-east-1", poll_interval=0.5, poll_backoff=1.5, poll_max_interval=5)
    times: list[float] = []
    ready_at = [0.0]

    async def describe(ids: list[str], **_: Any) -> list[dict[str, Any]]:
        times.append(clock.now)
        return [{"VolumeId": ids[0], "State": "available" if clock.now >= ready_at[0] else "x"}]

    monkeypatch.setattr(client, "describe_volumes", describe)

    async def wait(ready: float, kind: str = "created") -> list[float]:
        times.clear()
        start, ready_at[0] = clock.now, clock.now + ready
        await client.wait_for_volume(
            "vol-1", lambda v: v["State"] == "available", what="v", timeout=60, kind=kind
        )
        return [round(t - start, 3) for t in times]

    assert await wait(0.3) == [0, 0.5]  # nothing seen yet: the first pause
    assert await wait(0.3) == [0, 0.375]  # due from 3/4 of 0.5 s
    assert await wait(0.3) == [0, 0.281, 0.531]  # due from 3/4 of 0.375 s, then steady
    assert await wait(0.3, kind="") == [0, 0.5]
    # a slow one: steady until twice the longest (1.062 s), then the usual back-off
    assert _gaps(await wait(4.0)) == [0.281, 0.25, 0.25, 0.25, 0.25, 0.75, 1.125, 1.688]


def test_pending_instances_are_polled_steadily_while_due() -> None:
    """New instances are due from three quarters of the shortest pending time the
    client saw (EC2's shortest, 10 s, before it saw any) until twice the longest (at
    least twice EC2's longest, 40 s): until then the pauses bring the next round to
    that time, while due they stay at the steady pace, and only after it do they back
    off as usual."""
    client = EC2(region="us-east-1", poll_interval=0.5)
    now = client.now()

    def eta(*seconds_ago: float) -> float | None:
        pending = {
            f"i-{n}": {"LaunchTime": now - timedelta(seconds=ago)}
            for n, ago in enumerate(seconds_ago)
        }
        return waits._pending_eta(client, pending)

    left = eta(5)  # nothing seen yet: EC2's shortest pending time
    assert left is not None and 2.0 < left <= 2.5  # 0.75 * 10 - 5
    assert eta(8) == eta(60) == 0.5  # due, and still within twice EC2's longest
    assert eta(81) is None  # overdue: back off
    waits._learn_pending(client, [20.0, 24.0])  # one launch's instances: one entry
    waits._learn_pending(client, [30.0, 50.0])
    left = eta(5, 3)
    assert left is not None and 9.5 < left <= 10  # 0.75 * 20 - 5, the oldest decides
    assert eta(15.5) == eta(99) == 0.5  # due until twice the longest seen
    assert eta(101) is None
    assert waits._pending_eta(client, {"i-1": {}}) is None  # no LaunchTime


def test_the_steady_pace_leaves_most_of_the_request_rate() -> None:
    """A steady poll takes at most a quarter of its action's refill (EC2's 20 a second:
    every 0.2 s at the most), whatever ``poll_interval`` asks; a client that keeps no
    buckets (``request_rate=None``) polls at ``poll_interval``."""
    assert waits.steady_interval(EC2(region="us-east-1", poll_interval=0.5)) == 0.5
    assert waits.steady_interval(EC2(region="us-east-1", poll_interval=0.05)) == 0.2
    doubled = EC2(region="us-east-1", poll_interval=0.05, request_rate=2.0)
    assert waits.steady_interval(doubled) == 0.1
    assert (
        waits.steady_interval(EC2(region="us-east-1", poll_interval=0.05, request_rate=None))
        == 0.05
    )


ANSWER = 0.2
"""Seconds each (virtual) DescribeInstances takes to answer."""


async def _late_fleet(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch, client: EC2, running_at: dict[str, float]
) -> tuple[list[float], dict[str, float]]:
    """Wait for instances launched at virtual time 0 that run at ``running_at``: when each
    round was sent and when each instance was seen running (virtual seconds)."""
    launched = client.now()
    monkeypatch.setattr(client, "now", lambda: launched + timedelta(seconds=clock.now))
    rounds: list[float] = []

    async def describe(
        ids: object, states: Collection[str] = (), on_page: object = None
    ) -> dict[str, object]:
        # the first round asks for every instance, the later ones for those not pending
        assert bool(states) == bool(rounds) and "pending" not in states
        rounds.append(clock.now)
        found = {
            i: {
                "InstanceId": i,
                "LaunchTime": launched,
                "State": {"Name": "running" if clock.now >= at else "pending"},
            }
            for i, at in running_at.items()
        }
        found = {i: d for i, d in found.items() if not states or d["State"]["Name"] in states}
        await clock.sleep(ANSWER)  # EC2 answers as it was when it got the call
        return found

    monkeypatch.setattr(client, "describe_instances_shared", describe)
    seen: dict[str, float] = {}
    reached, failed = await client.wait_for_instances(
        list(running_at),
        "running",
        timeout=600,
        on_reached=lambda i, _: seen.setdefault(i, clock.now),
    )
    assert set(reached) == set(running_at) and not failed
    return rounds, seen


@pytest.mark.parametrize("history", [None, (20.0, 22.0)])
async def test_a_fleet_running_late_is_seen_within_one_steady_pause(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch, history: tuple[float, float] | None
) -> None:
    """A fleet whose boot outlasts the pending time seen before (or EC2's, before any was
    seen), its instances running one by one over half a minute: each is seen running by
    the first round after it ran, at most one steady pause (and the answer) later: the
    rounds start one steady pause after each other, the answer's time included; no more
    often (one call for the whole fleet each), far inside EC2's rate for
    DescribeInstances."""
    client = EC2(region="us-east-1", poll_interval=0.5, poll_max_interval=5.0)
    if history is not None:
        waits._learn_pending(client, list(history))
    running_at = {f"i-{n}": 45.0 + 1.7 * n for n in range(20)}  # 45 s to 77.3 s
    rounds, seen = await _late_fleet(clock, monkeypatch, client, running_at)
    steady = waits.steady_interval(client)
    for instance, ran in running_at.items():
        assert ran <= seen[instance] <= ran + steady + ANSWER
    due = 0.75 * (history or (10.0, 40.0))[0]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(rounds)]
    assert {g for g, at in zip(gaps, rounds[1:], strict=True) if at > due + steady} == {steady}
    assert min(gaps) >= steady  # never faster than the steady pace
    # before they are due, the pauses back off: half the rounds of a steady pace at most
    assert sum(1 for at in rounds if at < due) <= due / steady / 2
    assert len(rounds) <= 1 + 77.3 / steady


async def test_an_overdue_fleet_backs_off_again(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instances still pending past twice the longest pending time seen (here 2 x 40 s)
    are polled with the usual back-off: a boot that went wrong is not polled at the
    steady pace for ever."""
    client = EC2(region="us-east-1", poll_interval=0.5, poll_max_interval=5.0)
    rounds, _ = await _late_fleet(clock, monkeypatch, client, {"i-1": 200.0})
    late = [round(b - a, 6) for a, b in itertools.pairwise(rounds) if a > 80]
    assert late and max(late) == 5.0 and late.count(5.0) >= len(late) - 5


@pytest.mark.parametrize(
    ("state", "way"), [("terminated", "shutting-down"), ("stopped", "stopping")]
)
async def test_a_fleet_on_its_way_out_is_described_once_more_each(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch, state: str, way: str
) -> None:
    """A wait for a fleet to stop or terminate asks, once each instance was seen, only for
    those that got there: every instance is described in the first round and once more
    as it arrives, whatever the number of rounds; not the whole fleet each round."""
    client = EC2(region="us-east-1", poll_interval=0.5, poll_max_interval=5.0)
    arrives = {f"i-{n}": 1.0 + 0.25 * n for n in range(120)}  # one by one over 30 s
    rounds: list[tuple[str, ...]] = []
    described = [0]

    async def describe(
        ids: Collection[str], states: Collection[str] = (), on_page: object = None
    ) -> dict[str, object]:
        rounds.append(tuple(states))
        found = {
            i: {"InstanceId": i, "State": {"Name": state if clock.now >= at else way}}
            for i, at in arrives.items()
            if i in ids
        }
        found = {i: d for i, d in found.items() if not states or d["State"]["Name"] in states}
        described[0] += len(found)
        await clock.sleep(ANSWER)
        return found

    monkeypatch.setattr(client, "describe_instances_shared", describe)
    reached, failed = await client.wait_for_instances(list(arrives), state, timeout=600)
    assert set(reached) == set(arrives) and not failed
    assert len(rounds) > 20 and not rounds[0] and all(state in r for r in rounds[1:])
    assert way not in {s for r in rounds for s in r}
    assert described[0] <= 2 * len(arrives)


# -- idempotent creates (ClientToken) ------------------------------------------------------


def _lose_replies(ec2: EC2, operation: str) -> list[int]:
    """Make the next reply of ``operation`` get lost after EC2 acted on the call.

    The request reaches the endpoint and its resource is made; then the reply is
    dropped as if the connection timed out (a botocore read timeout raised from
    the ``after-call`` event). Returns a list counting the replies lost.
    """
    lost: list[int] = []

    def drop(**_: object) -> None:
        if not lost:
            lost.append(1)
            raise ReadTimeoutError(endpoint_url="lost reply")

    ec2._client.meta.events.register(f"after-call.ec2.{operation}", drop)
    return lost


async def _ours(ec2: EC2, kind: str, token: str) -> list[str]:
    flt = tag_filters({CLIENT_TOKEN_TAG: token})
    if kind == "instance":
        return [
            i["InstanceId"]
            for i in await ec2.describe_instances(filters=flt)
            if i["State"]["Name"] != "terminated"
        ]
    return [v["VolumeId"] for v in await ec2.describe_volumes(filters=flt)]


async def test_a_repeated_create_volume_returns_the_same_volume(ec2: EC2) -> None:
    token = new_client_token()
    assert len(token) <= 64 and token != new_client_token()
    first = await ec2.create_volume(
        availability_zone="us-east-1a", size=1, tags={tag("name"): "tok"}, client_token=token
    )
    again = await ec2.create_volume(
        availability_zone="us-east-1a", size=1, tags={tag("name"): "tok"}, client_token=token
    )
    assert again["VolumeId"] == first["VolumeId"]
    assert ec2.calls["CreateVolume"] == 1
    assert await _ours(ec2, "volume", token) == [first["VolumeId"]]
    # the token and the tags went into the create call itself
    (desc,) = await ec2.describe_volumes([first["VolumeId"]])
    assert tags_of(desc) == {tag("name"): "tok", CLIENT_TOKEN_TAG: token}
    other = await ec2.create_volume(availability_zone="us-east-1a", size=1)
    assert other["VolumeId"] != first["VolumeId"]
    assert not ec2.unsettled_tokens
    for vid in (first["VolumeId"], other["VolumeId"]):
        await ec2.delete_volume(vid)


async def test_a_repeated_run_instances_returns_the_same_instances(ec2: EC2) -> None:
    token = new_client_token()
    image = await _image(ec2)
    first = await ec2.run_instances(
        image_id=image, count=2, instance_type="t3.micro", client_token=token
    )
    again = await ec2.run_instances(
        image_id=image, count=2, instance_type="t3.micro", client_token=token
    )
    ids = sorted(i["InstanceId"] for i in first)
    assert sorted(i["InstanceId"] for i in again) == ids
    assert ec2.calls["RunInstances"] == 1
    assert sorted(await _ours(ec2, "instance", token)) == ids
    assert sorted(i["InstanceId"] for i in await ec2.created_with("instance", token)) == ids
    await ec2.terminate_instances(ids)
    assert await ec2.created_with("instance", token) == []


async def test_a_lost_reply_leaves_the_token_unsettled_and_the_retry_finds_its_volume(
    ec2: EC2,
) -> None:
    token = new_client_token()
    lost = _lose_replies(ec2, "CreateVolume")
    with pytest.raises(EC2Error):
        await ec2.create_volume(availability_zone="us-east-1a", size=1, client_token=token)
    assert lost == [1]
    # EC2 made the volume although the caller never heard of it
    made = await _ours(ec2, "volume", token)
    assert len(made) == 1
    assert ec2.unsettled_tokens == {token: "volume"}
    # the retry with the same token returns it instead of making a second one
    again = await ec2.create_volume(availability_zone="us-east-1a", size=1, client_token=token)
    assert again["VolumeId"] == made[0]
    assert await _ours(ec2, "volume", token) == made
    assert not ec2.unsettled_tokens
    await ec2.delete_volume(made[0])


async def test_a_lost_run_instances_reply_is_found_by_its_owner(ec2: EC2) -> None:
    token = new_client_token()
    _lose_replies(ec2, "RunInstances")
    with pytest.raises(EC2Error):
        await ec2.run_instances(
            image_id=await _image(ec2), count=1, instance_type="t3.micro", client_token=token
        )
    assert ec2.unsettled_tokens == {token: "instance"}
    # the owner cleaning up finds what the unsettled token made, and settles it
    found = await ec2.created_with("instance", token)
    assert len(found) == 1
    await ec2.terminate_instances([found[0]["InstanceId"]])
    ec2.settle(token)
    assert not ec2.unsettled_tokens


async def test_a_create_cancelled_before_it_was_sent_makes_nothing(ec2: EC2) -> None:
    token = new_client_token()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await ec2.create_volume(availability_zone="us-east-1a", size=1, client_token=token)
    assert await ec2.created_with("volume", token) == []
    vol = await ec2.create_volume(availability_zone="us-east-1a", size=1, client_token=token)
    assert await _ours(ec2, "volume", token) == [vol["VolumeId"]]
    await ec2.delete_volume(vol["VolumeId"])


async def test_a_create_cancelled_in_flight_stays_unsettled_until_found(ec2: EC2) -> None:
    token = new_client_token()
    made = anyio.Event()

    async def slow_reply(**_: object) -> None:
        made.set()  # EC2 has made the volume (its answer is here) ...
        await anyio.sleep_forever()  # ... and the caller never hears of it

    async def cancel_once_made(scope: anyio.CancelScope) -> None:
        # cancelled when the volume exists, not after a delay: a loaded machine may not
        # even have sent the call by then
        await made.wait()
        scope.cancel()

    ec2._client.meta.events.register("after-call.ec2.CreateVolume", slow_reply)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_once_made, scope)
            await ec2.create_volume(availability_zone="us-east-1a", size=1, client_token=token)
    assert scope.cancelled_caught and made.is_set()
    ec2._client.meta.events.unregister("after-call.ec2.CreateVolume", slow_reply)
    assert ec2.unsettled_tokens == {token: "volume"}
    (found,) = await ec2.created_with("volume", token)
    await ec2.delete_volume(found["VolumeId"])
    ec2.settle(token)
    assert not ec2.unsettled_tokens


async def test_concurrent_creates_with_one_token_make_one_volume(ec2: EC2) -> None:
    token = new_client_token()
    got: list[str] = []

    async def create() -> None:
        vol = await ec2.create_volume(availability_zone="us-east-1a", size=1, client_token=token)
        got.append(vol["VolumeId"])

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(create)
    assert len(set(got)) == 1 and len(got) == 5
    assert await _ours(ec2, "volume", token) == got[:1]
    await ec2.delete_volume(got[0])


async def test_snapshot_copies_are_tagged_in_the_copy_call(ec2: EC2) -> None:
    vol = await ec2.create_volume(availability_zone="us-east-1a", size=1)
    snap = await ec2.create_snapshot(vol["VolumeId"], tags={tag("name"): "s"})
    copy = await ec2.copy_snapshot(
        snap["SnapshotId"], source_region="us-east-1", tags={tag("name"): "s"}
    )
    (desc,) = await ec2.describe_snapshots([copy])
    assert tags_of(desc) == {tag("name"): "s"}
    for sid in (copy, snap["SnapshotId"]):
        await ec2.delete_snapshot(sid)
    await ec2.delete_volume(vol["VolumeId"])
