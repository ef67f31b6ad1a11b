"""EC2's API throttling: per-account token buckets, as :data:`._realism.BUCKETS` sets them.

EC2 evaluates each API action on its own ("each API is evaluated individually"): every
action has a bucket of its own, sized by its category in :data:`BUCKETS`, so that a burst
of one action never throttles another. Each bucket holds ``burst * api_rate`` tokens and
gains ``refill * api_rate`` per second; a request takes one token from its bucket (a
resource bucket: one per instance it names, at most the whole bucket, so that a launch
larger than a small ``api_rate``'s bucket waits for a full one rather than failing for
ever) or, when the bucket has too few, is refused with ``RequestLimitExceeded`` and takes
nothing. ``api_rate=None`` never refuses.
Thread-safe: the API answers on several threads.
"""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Callable, Mapping

from asyncstage.localcloud._realism import BUCKETS, Bucket, bucket_of

THROTTLED_CODE = "RequestLimitExceeded"
THROTTLED_MESSAGE = "Request limit exceeded."
THROTTLED_STATUS = 503

# Parameters that narrow a describe: with none of them it is "unfiltered".
_NARROWING = re.compile(
    r"(Filter|InstanceId|VolumeId|SnapshotId|Owner|OwnerId|RestorableBy)\.\d+(\..+)?"
    r"|MaxResults|NextToken"
)
_INSTANCE_ID = re.compile(r"InstanceId\.\d+")


def unfiltered(params: Mapping[str, str]) -> bool:
    """Whether a describe names no filter, id, owner or page: EC2's costlier kind."""
    return not any(_NARROWING.fullmatch(key) for key in params)


def cost(action: str, params: Mapping[str, str], bucket: Bucket) -> int:
    """Tokens a request takes: 1, or the instances it names for a resource bucket."""
    if not bucket.per_instance:
        return 1
    if action == "RunInstances":
        try:
            return max(1, int(params.get("MaxCount") or 1))
        except ValueError:
            return 1
    return max(1, sum(1 for key in params if _INSTANCE_ID.fullmatch(key)))


class _Tokens:
    """One token bucket (not locked: :class:`Throttle` holds the lock)."""

    def __init__(self, burst: float, refill: float, now: float) -> None:
        self.burst = burst
        self.refill = refill
        self.level = burst  # a fresh account starts with full buckets
        self.stamp = now

    def take(self, amount: float, now: float) -> bool:
        self.level = min(self.burst, self.level + (now - self.stamp) * self.refill)
        self.stamp = now
        if self.level < amount:
            return False
        self.level -= amount
        return True


class Throttle:
    """The token buckets of one account; :meth:`admit` says whether a request passes."""

    def __init__(
        self,
        api_rate: float | None,
        *,
        buckets: Mapping[str, Bucket] = BUCKETS,
        clock: Callable[[], float] = time.monotonic,
        counter: collections.Counter[str] | None = None,
    ) -> None:
        self.api_rate = api_rate
        self._buckets = buckets
        self._clock = clock
        self._tokens: dict[tuple[str, str], _Tokens] = {}
        self._lock = threading.Lock()
        self.throttled: collections.Counter[str] = (
            collections.Counter() if counter is None else counter
        )
        """Requests refused, by Action."""

    def admit(self, action: str, params: Mapping[str, str]) -> bool:
        """Take the request's tokens; False (and counted) when its bucket has too few."""
        if self.api_rate is None:
            return True
        key = bucket_of(action, unfiltered=unfiltered(params))
        spec = self._buckets[key]
        amount = cost(action, params, spec)
        with self._lock:
            now = self._clock()
            tokens = self._tokens.get((key, action))
            if tokens is None:
                rate = self.api_rate
                tokens = _Tokens(spec.burst * rate, spec.refill * rate, now)
                self._tokens[key, action] = tokens
            if tokens.take(min(amount, tokens.burst), now):
                return True
            self.throttled[action] += 1
            return False
