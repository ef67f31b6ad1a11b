"""EC2's request rate kept on the client's side: calls go out at the bucket's pace, first
come first served, and a throttled answer (another process on the account) still backs off.

The bucket arithmetic needs no root; the behaviour tests count calls and throttled answers
at a local cloud's endpoint, whose buckets are EC2's scaled down.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asyncstage import Manager
from asyncstage.ec2 import EC2
from asyncstage.ec2.rate import (
    MARGIN,
    NON_MUTATING,
    OWN_BUCKETS,
    Rate,
    RequestBuckets,
    TokenBucket,
    non_mutating,
)
from asyncstage.errors import InvalidArgument
from asyncstage.localcloud import LocalCloud, Realism
from tests.test_realism_consistency import Clock


def test_bucket_gives_its_burst_at_once_then_its_refill() -> None:
    clock = Clock()
    bucket = TokenBucket(Rate(3, 2), clock)
    assert bucket.level == 3
    bucket.drain()
    assert bucket.level == 0
    clock.now += 0.5  # 2 a second: one token
    assert bucket.level == 1
    clock.now += 100  # up to the burst, not beyond
    assert bucket.level == 3
    assert TokenBucket(Rate(3, 2), clock, reserve=1).level == 2  # kept in hand


@pytest.mark.anyio
async def test_bucket_serves_takers_in_the_order_they_came() -> None:
    bucket = TokenBucket(Rate(2, 500))
    served: list[int] = []

    async def take(n: int) -> None:
        await bucket.take()
        served.append(n)

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(take, n)
            await (
                anyio.lowlevel.checkpoint()
            )  # each taker reaches the bucket before the next starts
    assert served == list(range(8))
    assert bucket.level <= 2


@pytest.mark.anyio
async def test_a_newcomer_waits_for_a_taker_whose_token_came_while_the_loop_ran_late() -> None:
    # The second taker sleeps half a second for its token. Meanwhile the bucket's clock
    # jumps ahead (the event loop ran late): a third finds tokens, but goes after it.
    clock = Clock()
    bucket = TokenBucket(Rate(1, 2), clock)
    served: list[str] = []

    async def take(name: str) -> None:
        await bucket.take()
        served.append(name)

    async with anyio.create_task_group() as tg:
        for name in ("first", "second"):
            tg.start_soon(take, name)
            await anyio.lowlevel.checkpoint()
        clock.now += 100
        tg.start_soon(take, "third")
    assert served == ["first", "second", "third"]


@pytest.mark.anyio
async def test_a_cancelled_taker_gives_its_reserved_token_back() -> None:
    clock = Clock()
    bucket = TokenBucket(Rate(1, 0.001), clock)  # one token, then one in 1000 s
    await bucket.take()
    with anyio.move_on_after(0.05):
        await bucket.take()  # reserves the next token and waits for it: cancelled
    assert bucket.level == 0  # not -1: the next taker is not made to wait for it


def test_non_mutating_actions_have_a_bucket_each_and_throttling_drains_it() -> None:
    clock = Clock()
    buckets = RequestBuckets(0.5, clock)
    assert buckets.rate == Rate(NON_MUTATING.burst / 2, NON_MUTATING.refill / 2)
    assert non_mutating("GetConsoleOutput") and non_mutating("DescribeInstances")
    assert buckets.bucket("RunInstances") is None and buckets.bucket("DeleteTags") is None
    tags = buckets.bucket("CreateTags")  # mutating, but of a bucket of its own
    assert tags is not None and tags.rate == Rate(50, 5) == Rate(
        OWN_BUCKETS["CreateTags"].burst / 2, OWN_BUCKETS["CreateTags"].refill / 2
    )
    console = buckets.bucket("GetConsoleOutput")
    assert console is not None and console is buckets.bucket("GetConsoleOutput")
    assert buckets.bucket("DescribeInstances") is not console  # EC2 counts each API apart
    throttled = {"Error": {"Code": "RequestLimitExceeded", "Message": "slow down"}}
    buckets._needs_retry("needs-retry.ec2.GetConsoleOutput", response=(None, throttled))
    assert buckets.throttled == 1 and console.level == 0
    describe = buckets.bucket("DescribeInstances")
    # the other bucket stays full (less a quarter second of refill kept in hand)
    assert describe is not None and describe.level == 50 - 10 * MARGIN
    other = {"Error": {"Code": "InvalidInstanceID.NotFound", "Message": "gone"}}
    buckets._needs_retry("needs-retry.ec2.DescribeInstances", response=(None, other))
    buckets._needs_retry("needs-retry.ec2.RunInstances", response=(None, throttled))
    buckets._needs_retry("needs-retry.ec2.DescribeInstances", response=None)
    assert buckets.throttled == 1 and describe.level == 50 - 10 * MARGIN


# -- behaviour on a local cloud -----------------------------------------------------------

API_RATE = 0.2  # the cloud's buckets: 20 Describe/Get calls at once, then 4 a second
_CONTROL_ROUNDS = 4


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the local cloud needs root")


async def _console_reads(ec2: EC2, instance_id: str, count: int) -> None:
    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(ec2.console_output, instance_id)


@pytest.mark.localcloud
@pytest.mark.anyio
async def test_console_reads_go_out_at_the_accounts_rate_and_no_faster() -> None:
    _need_root()
    realism = dataclasses.replace(Realism.off(), api_rate=API_RATE)
    async with LocalCloud(realism=realism, seed=5) as cloud:
        kwargs = cloud.session_kwargs()
        region = kwargs.pop("region_name")

        def client(rate: float | None) -> EC2:
            return EC2(region=region, **kwargs, request_rate=rate, poll_interval=0.1)

        def console_calls() -> Callable[[], tuple[int, int]]:
            before = cloud.api_calls["GetConsoleOutput"], cloud.throttled["GetConsoleOutput"]
            return lambda: (
                cloud.api_calls["GetConsoleOutput"] - before[0],
                cloud.throttled["GetConsoleOutput"] - before[1],
            )

        async with client(API_RATE) as paced:
            made = await paced.run_instances(
                image_id=cloud.image_id, count=1, instance_type="t3.micro"
            )
            iid = str(made[0]["InstanceId"])
            try:
                # Twice the burst at once: half of them wait for the refill. The cloud counts
                # a call when it arrives, and a loaded machine can deliver the burst's first
                # call later than MARGIN after it left (then the cloud refuses one), so the
                # client is judged where it acts: when each call leaves. Its bucket is full
                # (less MARGIN) when the reads start; call k leaves no sooner than its token.
                sent: list[float] = []

                def leaves(event_name: str, **_: Any) -> None:
                    if event_name.endswith(".GetConsoleOutput"):
                        sent.append(time.monotonic())

                # after the bucket's own hook (botocore calls a more specific name's first)
                paced._client.meta.events.register_last("before-send.ec2", leaves)
                assert paced.requests is not None
                top = paced.requests.rate.burst - MARGIN * paced.requests.rate.refill
                counted = console_calls()
                start = time.monotonic()
                await _console_reads(paced, iid, 40)
                calls, refused = counted()
                assert calls == 40 + refused == len(sent)  # every read answered, retries sent
                assert paced.requests.throttled == refused
                early = [
                    k
                    for k, when in enumerate(sorted(sent), start=1)
                    if when - start < (k - top) / paced.requests.rate.refill
                ]
                assert not early, f"calls {early} left before the bucket had their tokens"

                # The controls: each is refused only if its burst outruns the cloud's refill,
                # and a loaded machine serves a burst slowly, so each goes again (a few
                # times at most) until the cloud has refused one; every read is answered.

                # the same without the client's pacing: EC2 refuses some
                async with client(None) as unpaced:
                    counted = console_calls()
                    rounds = await _until_refused(
                        lambda: _console_reads(unpaced, iid, 40), lambda: counted()[1]
                    )
                    calls, throttled = counted()
                    assert throttled > 0 and calls == 40 * rounds + throttled  # each retried

                # two processes on one account, each paced as if alone: the cloud refuses
                # some, each refusal empties that side's bucket, and every read is answered
                async with client(API_RATE) as other:
                    earlier = paced.requests.throttled
                    counted = console_calls()
                    rounds = await _until_refused(
                        lambda: _console_reads_of_both(paced, other, iid, 25),
                        lambda: counted()[1],
                    )
                    calls, throttled = counted()
                    assert throttled > 0 and calls == 50 * rounds + throttled
                    assert other.requests is not None
                    ours = paced.requests.throttled - earlier + other.requests.throttled
                    assert ours == throttled
            finally:
                await paced.terminate_instances([iid])


@pytest.mark.localcloud
@pytest.mark.anyio
async def test_a_burst_of_create_tags_goes_out_at_its_buckets_rate() -> None:
    """A fleet names each server with a CreateTags, an action of EC2's with a bucket of
    its own (100 at once, 10 a second): a fleet larger than that burst is paced by the
    client instead of refused by EC2 (each refusal a retry, and botocore's adaptive
    limiter switched on for the client's later calls)."""
    _need_root()
    realism = dataclasses.replace(Realism.off(), api_rate=API_RATE)  # CreateTags: 20, 2/s
    async with LocalCloud(realism=realism, seed=5) as cloud:
        kwargs: dict[str, Any] = cloud.session_kwargs()
        region = kwargs.pop("region_name")
        async with EC2(region=region, **kwargs, request_rate=API_RATE) as ec2:
            made = await ec2.run_instances(
                image_id=cloud.image_id, count=1, instance_type="t3.micro"
            )
            iid = str(made[0]["InstanceId"])
            try:
                sent: list[float] = []

                def leaves(event_name: str, **_: Any) -> None:
                    if event_name.endswith(".CreateTags"):
                        sent.append(time.monotonic())

                ec2._client.meta.events.register_last("before-send.ec2", leaves)
                assert ec2.requests is not None
                bucket = ec2.requests.bucket("CreateTags")
                assert bucket is not None
                top = bucket.rate.burst - MARGIN * bucket.rate.refill
                before = cloud.api_calls["CreateTags"], cloud.throttled["CreateTags"]
                start = time.monotonic()
                async with anyio.create_task_group() as tg:
                    for k in range(26):  # the burst and six more: three seconds of refill
                        tg.start_soon(ec2.create_tags, [iid], {"Name": f"n{k}"})
                calls = cloud.api_calls["CreateTags"] - before[0]
                refused = cloud.throttled["CreateTags"] - before[1]
                assert calls == 26 + refused == len(sent)
                assert ec2.requests.throttled == refused
                early = [
                    k
                    for k, when in enumerate(sorted(sent), start=1)
                    if when - start < (k - top) / bucket.rate.refill
                ]
                assert not early, f"calls {early} left before the bucket had their tokens"
            finally:
                await ec2.terminate_instances([iid])


async def _until_refused(reads: Callable[[], Awaitable[None]], refused: Callable[[], int]) -> int:
    """Rounds of ``reads`` until the cloud has refused a call, at most ``_CONTROL_ROUNDS``."""
    rounds = 0
    while rounds < _CONTROL_ROUNDS:
        await reads()
        rounds += 1
        if refused():
            break
    return rounds


async def _console_reads_of_both(one: EC2, other: EC2, instance_id: str, count: int) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_console_reads, one, instance_id, count)
        tg.start_soon(_console_reads, other, instance_id, count)


@pytest.mark.parametrize("rate", [0, -1, "fast", True, float("nan")])
def test_a_bad_request_rate_is_refused(rate: Any) -> None:
    with pytest.raises(InvalidArgument, match="request_rate"):
        RequestBuckets(rate)


def test_a_manager_passes_its_request_rate_to_its_client() -> None:
    # made, never entered: nothing is sent anywhere
    paced = Manager(region="us-east-1", endpoint_url="http://127.0.0.1:9", request_rate=2.5)
    assert paced.ec2.requests is not None
    assert paced.ec2.requests.rate.refill == 2.5 * NON_MUTATING.refill
    free = Manager(region="us-east-1", endpoint_url="http://127.0.0.1:9", request_rate=None)
    assert free.ec2.requests is None
    with pytest.raises(InvalidArgument, match="request_rate"):
        Manager(region="us-east-1", endpoint_url="http://127.0.0.1:9", request_rate=-1)
