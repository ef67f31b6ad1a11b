"""EC2's request rate, kept on this side: calls go out as fast as EC2 allows, no faster.

EC2 throttles each account's calls per region with a token bucket per API action
(AWS: "Request throttling for the Amazon EC2 API"): a non-mutating action
(``Describe*``, ``Get*``) has 100 tokens at once and 20 more a second; a call over
them is answered ``RequestLimitExceeded`` and costs a retry after a back-off. So the
client keeps a bucket of its own for each non-mutating action it calls and sends a
call when its bucket has a token, in the order the calls were made: a fleet's
console reads go out at EC2's rate rather than a fixed few at once. ``CreateTags``,
mutating but of a bucket of its own (100 at once, 10 a second), is paced the same
way: a fleet names each of its servers with one, and a fleet of more than the burst
would otherwise be throttled, each refusal a retry and each turning botocore's
adaptive limiter on for every later call of the client. Another process
on the same account draws from the same buckets unseen: a throttled answer empties
this side's bucket too, and the call backs off as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from asyncstage.errors import InvalidArgument

__all__ = [
    "MARGIN",
    "NON_MUTATING",
    "OWN_BUCKETS",
    "THROTTLED",
    "Rate",
    "RequestBuckets",
    "TokenBucket",
    "non_mutating",
]


@dataclass(frozen=True)
class Rate:
    """A bucket's size and its refill per second."""

    burst: float
    refill: float


NON_MUTATING = Rate(100, 20)
"""EC2's request bucket of each non-mutating action (account-level default)."""

OWN_BUCKETS: dict[str, Rate] = {"CreateTags": Rate(100, 10)}
"""The mutating actions this client paces, each with EC2's bucket of its own
(account-level default); other mutating actions are left to EC2's answers."""

THROTTLED = frozenset(
    {"RequestLimitExceeded", "Throttling", "ThrottlingException", "EC2ThrottledException"}
)
"""The error codes of a throttled answer (botocore's list of EC2's)."""


def non_mutating(operation: str) -> bool:
    """Whether an EC2 action reads only (its bucket is of the non-mutating class)."""
    return operation.startswith(("Describe", "Get"))


MARGIN = 0.25
"""Seconds of refill this side keeps in hand. EC2 counts a call when it arrives, and
its full bucket starts refilling at the first arrival of a burst, later than this side
sent it: a call that travels faster than the burst's first (a warm connection against
a new one) would find EC2's bucket a little lower than this side's. A throttled call
costs far more (a back-off of about half a second, then this pace again)."""


class TokenBucket:
    """One action's bucket: :meth:`take` waits for a token, first come first served.

    A taker that finds no token reserves the next one (the level goes below zero) and
    sleeps until it has been refilled, so takers go out at the bucket's refill rate and
    no faster; each also waits for the taker before it, so that they go out in the order
    they came even when the event loop runs late (a newcomer may find a token refilled
    while an earlier taker's sleep is over but it has not run yet). ``reserve`` tokens of
    the burst are never spent (see :data:`MARGIN`).
    """

    def __init__(
        self, rate: Rate, clock: Callable[[], float] = time.monotonic, reserve: float = 0.0
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._top = max(1.0, rate.burst - reserve)
        self._level = self._top
        self._stamp = clock()
        self._last: anyio.Event | None = None  # set once the latest waiting taker went

    def _refill(self) -> float:
        now = self._clock()
        self._level = min(self._top, self._level + (now - self._stamp) * self.rate.refill)
        self._stamp = now
        return self._level

    @property
    def level(self) -> float:
        """Tokens to spend now (below zero: reserved by waiting takers)."""
        return self._refill()

    async def take(self) -> None:
        """Take a token; wait for it, after those who came first, when there is none."""
        self._level = self._refill() - 1.0
        before = self._last
        if self._level >= 0 and (before is None or before.is_set()):
            return
        gone = self._last = anyio.Event()
        try:
            if self._level < 0:
                await anyio.sleep(-self._level / self.rate.refill)
            if before is not None:
                await before.wait()
        except BaseException:
            self._level += 1.0  # cancelled: the reserved token goes back
            raise
        finally:
            gone.set()  # the next taker's turn (also when this one was cancelled)

    def drain(self) -> None:
        """The account's bucket is empty (a throttled answer): so is this one."""
        self._level = min(self._refill(), 0.0)


class RequestBuckets:
    """The non-mutating actions' buckets of one client (and those of
    :data:`OWN_BUCKETS`), hooked to botocore's events:
    each request sent (retries too) takes a token of its action's bucket, and a
    throttled answer drains it. ``scale``: the account's rates relative to EC2's
    defaults (a raised limit, or a cloud that plays them scaled)."""

    def __init__(self, scale: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
            raise InvalidArgument(f"request_rate must be a number above 0 or None, not {scale!r}")
        self.rate = Rate(NON_MUTATING.burst * scale, NON_MUTATING.refill * scale)
        self._scale = scale
        self._clock = clock
        self.buckets: dict[str, TokenBucket] = {}
        self.throttled = 0
        """Throttled answers seen (each drained its action's bucket)."""

    def bucket(self, operation: str) -> TokenBucket | None:
        """The action's bucket (made at its first call); None: an action not paced here
        (mutating, not in :data:`OWN_BUCKETS`)."""
        found = self.buckets.get(operation)
        if found is not None:
            return found
        if non_mutating(operation):
            rate = self.rate
        elif (own := OWN_BUCKETS.get(operation)) is not None:
            rate = Rate(own.burst * self._scale, own.refill * self._scale)
        else:
            return None
        reserve = MARGIN * rate.refill
        found = self.buckets[operation] = TokenBucket(rate, self._clock, reserve)
        return found

    def register(self, events: Any) -> None:
        """Hook into a botocore client's event system (``client.meta.events``)."""
        events.register("before-send.ec2", self._before_send)
        events.register("needs-retry.ec2", self._needs_retry)

    async def _before_send(self, event_name: str = "", **kwargs: Any) -> None:
        bucket = self.bucket(event_name.rsplit(".", 1)[-1])
        if bucket is not None:
            await bucket.take()

    def _needs_retry(self, event_name: str = "", response: Any = None, **kwargs: Any) -> None:
        if not isinstance(response, tuple) or len(response) != 2:
            return
        parsed = response[1]
        code = parsed.get("Error", {}).get("Code") if isinstance(parsed, dict) else None
        bucket = self.bucket(event_name.rsplit(".", 1)[-1])
        if code in THROTTLED and bucket is not None:
            self.throttled += 1
            bucket.drain()
