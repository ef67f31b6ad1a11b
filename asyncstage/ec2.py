"""The only module that talks to EC2 (through aioboto3).

:class:`EC2` wraps one aioboto3 client for one region: botocore's adaptive
retry mode for throttling, every ``ClientError`` mapped to
:class:`~asyncstage.errors.EC2Error` (or a ``NotFound`` subclass), describes
batched by id, and waits that poll fast at first (about 1 s) and back off.
Concurrent waits on instances share their poll rounds: one DescribeInstances
call per round covers every instance anybody is waiting for.

Creating calls are idempotent: RunInstances and CreateVolume carry a
``ClientToken`` (one per logical create, :func:`new_client_token`), which is also
written as the ``asyncstage:client-token`` tag in the create call itself. A call
repeated with the same token returns what the first one made instead of making
it twice, also after a timeout or a cancellation left its outcome unknown (then
the token's tag finds it), and :meth:`EC2.created_with` finds what a token made
so that an owner can clean it up. Tags always go into the create call
(``TagSpecifications``), so nothing exists untagged even for a moment.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Self

import aioboto3
import anyio
from aiobotocore.config import AioConfig
from botocore import xform_name
from botocore.exceptions import BotoCoreError, ClientError

from asyncstage.errors import (
    AsyncstageError,
    EC2Error,
    InsufficientCapacity,
    PermissionDenied,
    UnknownServer,
    UnknownSnapshot,
    UnknownVolume,
    WaitTimeout,
)
from asyncstage.timeouts import Timeouts

__all__ = [
    "CLIENT_TOKEN_TAG",
    "EC2",
    "TAG_PREFIX",
    "Resource",
    "RetryMode",
    "console_fingerprints",
    "new_client_token",
    "tag",
    "tag_filters",
    "tags_of",
]

log = logging.getLogger("asyncstage")

TAG_PREFIX = "asyncstage:"
"""Prefix of every tag asyncstage writes (``asyncstage:role``, ``asyncstage:name`` ...)."""

Resource = dict[str, Any]
RetryMode = Literal["adaptive", "standard"]
CreatedKind = Literal["instance", "volume"]

_FILTER_CHUNK = 200  # values per filter EC2 accepts
_FP_BEGIN = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
_FP_END = "-----END SSH HOST KEY FINGERPRINTS-----"

_NOT_FOUND: dict[str, type[AsyncstageError]] = {
    "InvalidInstanceID.NotFound": UnknownServer,
    "InvalidInstanceID.Malformed": UnknownServer,
    "InvalidVolume.NotFound": UnknownVolume,
    "InvalidVolumeID.Malformed": UnknownVolume,
    "InvalidSnapshot.NotFound": UnknownSnapshot,
    "InvalidSnapshotID.Malformed": UnknownSnapshot,
}


def _denied(operation: str, message: str) -> PermissionDenied:
    """``UnauthorizedOperation`` as :class:`PermissionDenied`, naming the IAM permission."""
    permission = f"ec2:{operation}"
    return PermissionDenied(
        f"{message} (the credentials lack the IAM permission {permission})",
        permission=permission,
        operation=operation,
    )


_CAPACITY = re.compile(
    r"sufficient (\S+) capacity in the Availability Zone you requested \(([^)]+)\)"
)
_SNAPSHOT_RATE = "SnapshotCreationPerVolumeRateExceeded"


def _capacity_error(
    e: EC2Error, operation: str, zone: str | None, instance_type: str | None
) -> EC2Error:
    """``InsufficientInstanceCapacity`` as :class:`InsufficientCapacity` (zone and type from
    EC2's message, else those asked for); any other error as it is."""
    if e.code != "InsufficientInstanceCapacity":
        return e
    m = _CAPACITY.search(str(e))
    if m:
        instance_type, zone = m.group(1), m.group(2)
    return InsufficientCapacity(
        f"no {instance_type or 'instance'} capacity in {zone or 'the region'} ({e})",
        zone=zone,
        instance_type=instance_type,
        operation=operation,
    )


def _percent(snapshot: Mapping[str, Any]) -> float | None:
    """A snapshot's ``Progress`` (``"42%"``) as a number, if it has one."""
    try:
        return float(str(snapshot.get("Progress", "")).rstrip("%"))
    except ValueError:
        return None


# What botocore's retries may leave for us to absorb (its list of EC2's throttling codes).
_THROTTLED = frozenset({"RequestLimitExceeded", "Throttling", "EC2ThrottledException"})
_FIRST_PAUSE = 0.25  # the first pause before retrying a NotFound or throttled call
_MAX_PAUSE = 5.0
_ID = re.compile(r"\b(?:i|vol|snap|sg|ami)-[0-9a-z]+\b")
# The create calls and where their response names what they made.
_CREATED: Mapping[str, Callable[[Resource], list[str]]] = {
    "RunInstances": lambda r: [str(i["InstanceId"]) for i in r.get("Instances", [])],
    "CreateVolume": lambda r: [str(r["VolumeId"])],
    "CreateSnapshot": lambda r: [str(r["SnapshotId"])],
    "CopySnapshot": lambda r: [str(r["SnapshotId"])],
    "CreateSecurityGroup": lambda r: [str(r["GroupId"])],
    "CopyImage": lambda r: [str(r["ImageId"])],
    "CreateImage": lambda r: [str(r["ImageId"])],
    "RegisterImage": lambda r: [str(r["ImageId"])],
}


class _Fresh:
    """The ids this client created lately: EC2 may not know them yet (eventual consistency).

    EC2 answers a new id with ``...NotFound`` (and leaves it out of filtered describes)
    for seconds after the create call returned it; within ``window`` seconds of its
    creation such an answer means "not yet", after it "gone". An id some answer has
    shown (or a call naming it has succeeded) is settled and forgotten.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self._made: dict[str, float] = {}  # id -> monotonic time it was created

    def remember(self, operation: str, params: Mapping[str, Any], result: Resource) -> None:
        """Note what a successful call made, and that the fresh ids it named exist."""
        get = _CREATED.get(operation)
        if get is None:
            # a describe succeeds while leaving a new id out; any other call fails
            if self._made and not operation.startswith("Describe"):
                self.seen(_strings(params))
            return
        if self.window <= 0:
            return
        now = time.monotonic()
        try:
            ids = get(result)
        except KeyError:  # an answer without the id: nothing to remember
            return
        for old in [i for i, t in self._made.items() if t + self.window <= now]:
            del self._made[old]  # bounded: only ids of the last window stay
        self._made.update(dict.fromkeys(ids, now))

    def seen(self, ids: Iterable[str]) -> None:
        """These ids exist for EC2 now (an answer showed them)."""
        for resource_id in ids:
            self._made.pop(resource_id, None)

    def unseen(self, prefix: str) -> list[str]:
        """The fresh ids of one kind (``"vol-"``) no answer has shown yet."""
        now = time.monotonic()
        return [i for i, t in self._made.items() if i.startswith(prefix) and t + self.window > now]

    def left(self, ids: Iterable[str]) -> float:
        """Seconds until the newest of these ids is past its window (0: none is fresh)."""
        now = time.monotonic()
        return max((self._made[i] + self.window - now for i in ids if i in self._made), default=0.0)

    def wait(self, code: str | None, message: str, params: Mapping[str, Any]) -> float | None:
        """How long a ``...NotFound`` about fresh ids may still be retried (None: raise)."""
        if not code or not code.endswith(".NotFound") or not self._made:
            return None
        named = _ID.findall(message) or list(_strings(params))
        left = self.left(named)
        return left if left > 0 else None


def _strings(value: object) -> Iterable[str]:
    """Every string in a call's parameters (where the ids it names are)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def tag(key: str) -> str:
    """The full name of one of our tags: ``tag("name") == "asyncstage:name"``."""
    return TAG_PREFIX + key


CLIENT_TOKEN_TAG = tag("client-token")
"""The tag holding the ClientToken of the call that created an instance or volume."""


def new_client_token() -> str:
    """A fresh ClientToken for one logical create (32 hex digits; EC2 takes up to 64)."""
    return secrets.token_hex(16)


def tags_of(resource: Mapping[str, Any]) -> dict[str, str]:
    """The tags of an EC2 resource description as a plain dict."""
    return {t["Key"]: t.get("Value", "") for t in resource.get("Tags", []) or []}


def tag_filters(tags: Mapping[str, str | Sequence[str]]) -> list[dict[str, Any]]:
    """EC2 ``Filters`` matching resources carrying all these tags (values or lists of values)."""
    return [
        {"Name": f"tag:{k}", "Values": [v] if isinstance(v, str) else list(v)}
        for k, v in tags.items()
    ]


def _tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def console_fingerprints(console: str) -> list[str]:
    """The ``SHA256:...`` host key fingerprints cloud-init printed to an instance's console."""
    found: list[str] = []
    inside = False
    for line in console.splitlines():
        text = line.strip()
        if _FP_BEGIN in text:
            inside, found = True, []
            continue
        if _FP_END in text:
            inside = False
            continue
        if inside:
            found.extend(w for w in text.split() if w.startswith("SHA256:"))
    return found


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _Round:
    """One shared DescribeInstances call: whoever comes first makes it for everybody."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.done = anyio.Event()
        self.result: dict[str, Resource] | None = None
        self.error: BaseException | None = None


class _Client:
    """The core of :class:`EC2`: the aioboto3 client, its lifetime, calls and describes."""

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        retry_mode: RetryMode = "adaptive",
        max_attempts: int = 10,
        poll_interval: float = 1.0,
        poll_backoff: float = 1.5,
        poll_max_interval: float = 5.0,
        coalesce_window: float = 0.05,
        max_concurrency: int = 10,
        consistency: float = Timeouts.consistency,
        throttle_wait: float = 300.0,
    ) -> None:
        self._session = aioboto3.Session(
            profile_name=profile,
            region_name=region,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
        )
        resolved = region or self._session.region_name
        if not resolved:
            raise EC2Error("no AWS region given and none configured (AWS_DEFAULT_REGION)")
        self.region: str = resolved
        self.endpoint_url = endpoint_url
        self._config = AioConfig(
            retries={"mode": retry_mode, "max_attempts": max_attempts},
            max_pool_connections=max(10, max_concurrency),
        )
        self.poll_interval = poll_interval
        self.poll_backoff = poll_backoff
        self.poll_max_interval = poll_max_interval
        self.coalesce_window = coalesce_window
        self.limiter = anyio.CapacityLimiter(max_concurrency)
        self.throttle_wait = throttle_wait
        self.absorbed: Counter[str] = Counter()
        """Error answers retried here rather than raised, by code (NotFound of a new id,
        throttling that outlasted botocore's retries)."""
        self._fresh = _Fresh(consistency)
        self.calls: Counter[str] = Counter()
        """EC2 operations this client made, counted by name (retries not included)."""
        self.clock_offset: float | None = None
        """EC2's clock minus this machine's, in seconds (to about 1 s: the HTTP ``Date``
        of its last answer); None before the first answer."""
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._round: _Round | None = None
        self._made: dict[str, Any] = {}
        self._unsettled: dict[str, CreatedKind] = {}
        self._token_locks: dict[str, anyio.Lock] = {}

    # -- lifetime ---------------------------------------------------------------

    async def open(self) -> Self:
        """Open the underlying client (``async with`` does it for you)."""
        if self._client is None:
            stack = AsyncExitStack()
            try:
                self._client = await stack.enter_async_context(
                    self._session.client(
                        "ec2",
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        config=self._config,
                    )
                )
            except (BotoCoreError, ClientError) as e:
                await stack.aclose()
                raise EC2Error(f"cannot open an EC2 client for {self.region}: {e}") from e
            self._stack = stack
        return self

    async def close(self) -> None:
        """Close the underlying client."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()

    # -- calls ------------------------------------------------------------------

    async def call(self, operation: str, /, **params: Any) -> Resource:
        """Call one EC2 operation by its API name (``"DescribeInstances"``), errors mapped.

        EC2's eventual consistency and throttling are absorbed here: a ``...NotFound``
        naming an id this client created less than ``consistency`` seconds ago is
        retried until it is seen or the window has passed (an id that is really gone
        raises at once), and ``RequestLimitExceeded`` that outlasted botocore's own
        retries is retried with backoff for up to ``throttle_wait`` seconds.
        """
        if self._client is None:
            await self.open()
        method = getattr(self._client, xform_name(operation))
        self.calls[operation] += 1
        pause = _FIRST_PAUSE
        throttled_until: float | None = None
        while True:
            try:
                result: Resource = await method(**params)
            except ClientError as e:
                err = e.response.get("Error", {})
                code = str(err.get("Code", "")) or None
                message = f"{operation} failed: {err.get('Message') or e}"
                wait = self._fresh.wait(code, str(err.get("Message") or ""), params)
                if wait is None and code in _THROTTLED:
                    now = time.monotonic()
                    throttled_until = throttled_until or now + self.throttle_wait
                    wait = throttled_until - now if throttled_until > now else None
                if wait is not None:
                    self.absorbed[str(code)] += 1
                    await anyio.sleep(min(pause * (0.5 + random.random() / 2), wait))
                    pause = min(pause * 2, _MAX_PAUSE)
                    continue
                if code in _NOT_FOUND:
                    raise _NOT_FOUND[code](message) from e
                if code == "UnauthorizedOperation":
                    raise _denied(operation, message) from e
                raise EC2Error(message, code=code, operation=operation) from e
            except BotoCoreError as e:
                raise EC2Error(f"{operation} failed: {e}", operation=operation) from e
            self._fresh.remember(operation, params, result)
            self._note_clock(result)
            return result

    def _note_clock(self, result: Resource) -> None:
        """Keep EC2's clock against ours from the answer's ``Date`` header: EC2's
        timestamps (``LaunchTime``) are on its clock, and botocore itself corrects a
        skewed local clock when it signs, so a skewed machine would not notice."""
        headers = result.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        try:
            stamp = email.utils.parsedate_to_datetime(str(headers["date"]))
        except (KeyError, TypeError, ValueError):
            return
        if stamp.tzinfo is None:  # an ill-formed header; EC2 always says GMT
            return
        self.clock_offset = (stamp - datetime.now(UTC)).total_seconds()

    def now(self) -> datetime:
        """The time on EC2's clock (this machine's, moved by :attr:`clock_offset`)."""
        return datetime.now(UTC) + timedelta(seconds=self.clock_offset or 0.0)

    async def paginate(self, operation: str, key: str, /, **params: Any) -> list[Resource]:
        """All items under ``key`` of every page of a describe call."""
        items: list[Resource] = []
        token: str | None = None
        while True:
            page = await self.call(operation, **params, **({"NextToken": token} if token else {}))
            items.extend(page.get(key, []))
            token = page.get("NextToken")
            if not token:
                return items

    # -- describes ----------------------------------------------------------------

    async def describe_instances(
        self,
        ids: Sequence[str] | None = None,
        *,
        filters: Sequence[Mapping[str, Any]] = (),
    ) -> list[Resource]:
        """Instances by id (one call per 200 ids; unknown ids are left out) and/or filters."""
        filters = list(filters)
        if ids is None:
            await self._settle("i-", self.describe_instances)
            return self._flatten(
                await self.paginate("DescribeInstances", "Reservations", Filters=filters)
            )

        async def fetch() -> list[Resource]:
            found: list[Resource] = []
            for chunk in _chunks(sorted(set(ids)), _FILTER_CHUNK):
                flt = [*filters, {"Name": "instance-id", "Values": list(chunk)}]
                found += self._flatten(
                    await self.paginate("DescribeInstances", "Reservations", Filters=flt)
                )
            return found

        return await self._until_seen(ids, "InstanceId", fetch)

    async def _settle(
        self, prefix: str, describe: Callable[[list[str]], Awaitable[list[Resource]]]
    ) -> None:
        """Before a describe by filters: wait until EC2 shows the ids this client just made.

        A filtered describe leaves out what EC2 does not show yet, and nothing says so;
        asking by id (once per new id: shown, it is settled) waits until it does.
        """
        pending = self._fresh.unseen(prefix)
        if pending:
            await describe(pending)

    async def _until_seen(
        self, ids: Iterable[str], key: str, fetch: Callable[[], Awaitable[list[Resource]]]
    ) -> list[Resource]:
        """``fetch()``, again while it leaves out ids this client has just created.

        EC2 leaves a new id out of describes for a moment (eventual consistency); an
        id older than the ``consistency`` window that is missing is really gone.
        """
        pause = _FIRST_PAUSE
        while True:
            found = await fetch()
            shown = {str(r.get(key)) for r in found}
            self._fresh.seen(shown)
            left = self._fresh.left(set(ids) - shown)
            if left <= 0:
                return found
            await anyio.sleep(min(pause, left))
            pause = min(pause * 2, _MAX_PAUSE)

    @staticmethod
    def _flatten(reservations: list[Resource]) -> list[Resource]:
        return [i for r in reservations for i in r.get("Instances", [])]

    async def describe_instances_shared(self, ids: Iterable[str]) -> dict[str, Resource]:
        """Instances by id, sharing one DescribeInstances round with concurrent callers.

        Callers arriving within ``coalesce_window`` of each other are served by a
        single call for the union of their ids.
        """
        wanted = set(ids)
        while True:
            rnd = self._round
            leader = rnd is None
            if rnd is None:
                rnd = self._round = _Round()
            rnd.ids |= wanted
            if leader:
                try:
                    await anyio.sleep(self.coalesce_window)
                    self._round = None
                    found = await self.describe_instances(sorted(rnd.ids))
                    rnd.result = {i["InstanceId"]: i for i in found}
                except BaseException as e:
                    rnd.error = e
                    raise
                finally:
                    if self._round is rnd:
                        self._round = None
                    rnd.done.set()
            else:
                await rnd.done.wait()
            if rnd.result is not None:
                return {k: v for k, v in rnd.result.items() if k in wanted}
            if isinstance(rnd.error, Exception) and not isinstance(
                rnd.error, anyio.get_cancelled_exc_class()
            ):
                raise rnd.error
            # the leader was cancelled: try again, maybe as the leader

    async def describe_volumes(
        self, ids: Sequence[str] | None = None, *, filters: Sequence[Mapping[str, Any]] = ()
    ) -> list[Resource]:
        """Volumes by id (unknown ids are left out) and/or filters."""
        flt = list(filters)
        if ids is None:
            await self._settle("vol-", self.describe_volumes)
            return await self.paginate("DescribeVolumes", "Volumes", Filters=flt)

        async def fetch() -> list[Resource]:
            found: list[Resource] = []
            for chunk in _chunks(sorted(set(ids)), _FILTER_CHUNK):
                found += await self.paginate(
                    "DescribeVolumes",
                    "Volumes",
                    Filters=[*flt, {"Name": "volume-id", "Values": list(chunk)}],
                )
            return found

        return await self._until_seen(ids, "VolumeId", fetch)

    async def describe_snapshots(
        self, ids: Sequence[str] | None = None, *, filters: Sequence[Mapping[str, Any]] = ()
    ) -> list[Resource]:
        """Our own snapshots by id (unknown ids are left out) and/or filters."""
        flt = list(filters)
        if ids is not None:
            flt.append({"Name": "snapshot-id", "Values": list(ids)})
        else:
            await self._settle("snap-", self.describe_snapshots)

        async def fetch() -> list[Resource]:
            return await self.paginate(
                "DescribeSnapshots", "Snapshots", OwnerIds=["self"], Filters=flt
            )

        return await self._until_seen(ids or (), "SnapshotId", fetch)

    async def describe_images(
        self,
        ids: Sequence[str] | None = None,
        *,
        filters: Sequence[Mapping[str, Any]] = (),
        owners: Sequence[str] = (),
    ) -> list[Resource]:
        """Images by id and/or filters, optionally of some owners only."""
        params: dict[str, Any] = {"Filters": list(filters)}
        if ids is not None:
            params["ImageIds"] = list(ids)
        if owners:
            params["Owners"] = list(owners)

        async def fetch() -> list[Resource]:
            images: list[Resource] = (await self.call("DescribeImages", **params)).get("Images", [])
            return images

        return await self._until_seen(ids or (), "ImageId", fetch)

    async def find_image(
        self,
        pattern: str,
        *,
        owners: Sequence[str] = (),
        architecture: str | None = None,
        root_type: str | None = None,
    ) -> Resource:
        """The image with this id, or the newest whose name matches the pattern."""
        filters: list[dict[str, Any]] = [{"Name": "state", "Values": ["available"]}]
        if architecture:
            filters.append({"Name": "architecture", "Values": [architecture]})
        if root_type:
            filters.append({"Name": "root-device-type", "Values": [root_type]})
        if pattern.startswith("ami-"):
            images = await self.describe_images([pattern])
        else:
            filters.append({"Name": "name", "Values": [pattern]})
            images = await self.describe_images(filters=filters, owners=owners)
        if not images:
            raise EC2Error(
                f"no image matches {pattern!r} in {self.region}", code="InvalidAMIID.NotFound"
            )
        return max(images, key=lambda i: str(i.get("CreationDate", "")))

    async def availability_zones(self) -> list[str]:
        """The names of the region's available zones."""
        result = await self.call(
            "DescribeAvailabilityZones",
            Filters=[{"Name": "state", "Values": ["available"]}],
        )
        return sorted(z["ZoneName"] for z in result.get("AvailabilityZones", []))

    async def console_output(self, instance_id: str, *, latest: bool = False) -> str:
        """The instance's console output as text ('' when there is none yet); ``latest``:
        the current output (EC2 supports it on Nitro instance types only)."""
        extra = {"Latest": True} if latest else {}
        result = await self.call("GetConsoleOutput", InstanceId=instance_id, **extra)
        raw = result.get("Output") or ""
        try:
            return base64.b64decode(raw, validate=True).decode(errors="replace")
        except ValueError:
            return str(raw)


class _Waits(_Client):
    """The waits of :class:`EC2`: polls that start fast and back off, shared rounds."""

    # -- waiting -----------------------------------------------------------------------

    async def _poll(
        self,
        fetch: Callable[[], Awaitable[bool]],
        *,
        what: str,
        timeout: float,
        last_state: Callable[[], str | None],
        eta: Callable[[], float | None] | None = None,
        progress: Callable[[], int] | None = None,
    ) -> None:
        """Call ``fetch`` until it returns true, pausing 1 s, 1.5 s, 2.25 s ... in between
        (less when ``eta()`` expects the end sooner, never under half the first pause).

        A round in which ``progress()`` grew (a fleet's instances arriving one by one)
        starts the pauses over: the rest are likely close, and one call polls them all.
        """
        interval = self.poll_interval
        deadline = time.monotonic() + timeout
        seen = progress() if progress is not None else 0
        while True:
            if await fetch():
                return
            if progress is not None and progress() != seen:
                seen, interval = progress(), self.poll_interval
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(what, timeout=timeout, last_state=last_state())
            expected = eta() if eta is not None else None
            pause = interval if expected is None else max(self.poll_interval / 2, expected)
            await anyio.sleep(min(interval, pause, left))
            interval = min(interval * self.poll_backoff, self.poll_max_interval)

    async def wait_for_instances(
        self,
        ids: Sequence[str],
        state: str,
        *,
        timeout: float,
        labels: Mapping[str, str] = {},
        on_reached: Callable[[str, Resource], None] | None = None,
    ) -> tuple[dict[str, Resource], dict[str, Exception]]:
        """Wait until every instance is in ``state``; one DescribeInstances per poll round.

        Returns the instances that got there and, per instance that did not, the
        error: :class:`WaitTimeout` with its last state, or :class:`EC2Error` when it
        went somewhere it cannot come back from (terminated while waiting for running).
        ``labels`` name the instances in the errors; ``on_reached(id, instance)`` is
        called as soon as each one gets there.
        """
        reached: dict[str, Resource] = {}
        failed: dict[str, Exception] = {}
        last: dict[str, str] = {}
        waiting = set(ids)
        dead = {"running": {"shutting-down", "terminated"}, "stopped": {"terminated"}}.get(
            state, set()
        )

        def label(i: str) -> str:
            return f"{labels[i]} ({i})" if i in labels else i

        async def fetch() -> bool:
            found = await self.describe_instances_shared(waiting)
            for iid, inst in found.items():
                now = inst.get("State", {}).get("Name", "unknown")
                last[iid] = now
                if now == state:
                    reached[iid] = inst
                    waiting.discard(iid)
                    if on_reached is not None:
                        on_reached(iid, inst)
                elif now in dead:
                    why = inst.get("StateReason", {}).get("Message")
                    failed[iid] = EC2Error(
                        f"instance {label(iid)} went {now} while waiting for {state}"
                        + (f" ({why})" if why else ""),
                        code="IncorrectInstanceState",
                        operation="DescribeInstances",
                    )
                    waiting.discard(iid)
            return not waiting

        try:
            await self._poll(
                fetch,
                what=f"{len(waiting)} instance(s) to be {state}",
                timeout=timeout,
                last_state=lambda: None,
                progress=lambda: len(reached) + len(failed),
            )
        except WaitTimeout:
            for iid in waiting:
                failed[iid] = WaitTimeout(
                    f"instance {label(iid)} to be {state}",
                    timeout=timeout,
                    last_state=last.get(iid, "unknown"),
                )
        return reached, failed

    async def wait_for_instance(
        self,
        instance_id: str,
        state: str,
        *,
        timeout: float,
        label: str | None = None,
    ) -> Resource:
        """Wait for one instance (sharing poll rounds with others); raise on failure."""
        reached, failed = await self.wait_for_instances(
            [instance_id], state, timeout=timeout, labels={instance_id: label} if label else {}
        )
        if instance_id in failed:
            raise failed[instance_id]
        return reached[instance_id]

    async def wait_for_volume(
        self,
        volume_id: str,
        check: Callable[[Resource], bool],
        *,
        what: str,
        timeout: float,
    ) -> Resource:
        """Poll one volume until ``check`` accepts it."""
        seen: dict[str, Resource] = {}

        async def fetch() -> bool:
            found = await self.describe_volumes([volume_id])
            if not found:
                raise UnknownVolume(f"volume {volume_id} does not exist")
            seen["v"] = found[0]
            return check(found[0])

        def last() -> str | None:
            vol = seen.get("v")
            if vol is None:
                return None
            att = vol.get("Attachments") or []
            state = str(vol.get("State"))
            return f"{state}, attachment {att[0].get('State')}" if att else state

        await self._poll(fetch, what=what, timeout=timeout, last_state=last)
        return seen["v"]

    async def wait_for_snapshot(
        self,
        snapshot_id: str,
        *,
        timeout: float,
        on_progress: Callable[[Resource], object] | None = None,
    ) -> Resource:
        """Poll a snapshot until it is completed, following its ``Progress``.

        Each new Progress (``"0%"`` ... ``"100%"``) is logged and given to
        ``on_progress`` (the snapshot's description). A Progress that stands still is
        waited on: EC2's snapshots may pause for long, so only ``timeout`` ends the wait
        (:class:`WaitTimeout` with the last state and progress).
        """
        seen: dict[str, Resource] = {}
        first: list[tuple[float, float]] = []  # (when, percent) of the first progress seen

        async def fetch() -> bool:
            found = await self.describe_snapshots([snapshot_id])
            if not found:
                raise UnknownSnapshot(f"snapshot {snapshot_id} does not exist")
            before = seen.get("s", {}).get("Progress")
            seen["s"] = snap = found[0]
            if not first and (done := _percent(snap)) is not None:
                first.append((time.monotonic(), done))
            if snap.get("State") == "error":
                raise EC2Error(
                    f"snapshot {snapshot_id} failed: {snap.get('StateMessage', '')}",
                    code="SnapshotError",
                )
            if snap.get("Progress") != before:
                log.debug(
                    "snapshot %s: %s %s", snapshot_id, snap.get("State"), snap.get("Progress")
                )
                if on_progress is not None:
                    on_progress(snap)
            return bool(snap.get("State") == "completed")

        def last() -> str | None:
            snap = seen.get("s")
            return (
                None
                if snap is None
                else f"{snap.get('State')} {snap.get('Progress') or ''}".strip()
            )

        def eta() -> float | None:
            """Seconds left at the pace Progress has kept so far (None: no pace yet)."""
            done = _percent(seen["s"])
            if not first or done is None or done <= first[0][1]:
                return None
            since, start = first[0]
            return (time.monotonic() - since) * (100 - done) / (done - start)

        await self._poll(
            fetch,
            what=f"snapshot {snapshot_id} to complete",
            timeout=timeout,
            last_state=last,
            eta=eta,
        )
        return seen["s"]

    async def wait_for_image(
        self,
        image_id: str,
        *,
        timeout: float,
    ) -> Resource:
        """Poll an image until it is available."""
        seen: dict[str, Resource] = {}

        async def fetch() -> bool:
            found = await self.describe_images([image_id])
            if not found:
                return False
            seen["i"] = found[0]
            if found[0].get("State") in ("failed", "error", "invalid", "deregistered"):
                raise EC2Error(f"image {image_id} is {found[0].get('State')}")
            return bool(found[0].get("State") == "available")

        await self._poll(
            fetch,
            what=f"image {image_id} to be available",
            timeout=timeout,
            last_state=lambda: str(seen["i"].get("State")) if seen else None,
        )
        return seen["i"]


class EC2(_Waits):
    """An EC2 client for one region (``async with EC2(region=...) as ec2``).

    ``endpoint_url`` points it at another endpoint (the local cloud, moto).
    Credentials come from the standard AWS chain unless given.
    ``poll_interval`` is the first pause between two polls of a wait; pauses grow
    by ``poll_backoff`` up to ``poll_max_interval``.
    """

    # -- changes ----------------------------------------------------------------------

    async def create_tags(self, ids: Sequence[str], tags: Mapping[str, str]) -> None:
        """Set these tags on every resource listed (one call)."""
        if ids and tags:
            await self.call("CreateTags", Resources=list(ids), Tags=_tag_list(tags))

    async def delete_tags(self, ids: Sequence[str], keys: Sequence[str]) -> None:
        """Remove these tag keys from the resources."""
        if ids and keys:
            await self.call("DeleteTags", Resources=list(ids), Tags=[{"Key": k} for k in keys])

    async def run_instances(
        self,
        *,
        image_id: str,
        count: int,
        instance_type: str,
        key_name: str | None = None,
        security_group_ids: Sequence[str] = (),
        availability_zone: str | None = None,
        tags: Mapping[str, str] = {},
        block_device_mappings: Sequence[Mapping[str, Any]] = (),
        user_data: str | None = None,
        client_token: str | None = None,
        min_count: int | None = None,
    ) -> list[Resource]:
        """Launch ``count`` instances in one RunInstances call (MaxCount = count).

        ``min_count`` (default ``count``) is EC2's MinCount: with less, EC2 may launch
        fewer than ``count`` (as many as fit) rather than none; the list says how many.
        EC2's ``InsufficientInstanceCapacity`` is raised as :class:`InsufficientCapacity`.
        With a ``client_token`` the call is idempotent: repeated with the same token
        (after a timeout, an error or a cancellation) it returns the instances the
        first call made, if it made any, rather than launching more.
        """
        params: dict[str, Any] = {
            "ImageId": image_id,
            "MinCount": count if min_count is None else max(1, min(min_count, count)),
            "MaxCount": count,
            "InstanceType": instance_type,
        }
        if key_name:
            params["KeyName"] = key_name
        if security_group_ids:
            params["SecurityGroupIds"] = list(security_group_ids)
        if availability_zone:
            params["Placement"] = {"AvailabilityZone": availability_zone}
        if client_token:
            params["ClientToken"] = client_token
            tags = {**tags, CLIENT_TOKEN_TAG: client_token}
        if tags:
            params["TagSpecifications"] = [{"ResourceType": "instance", "Tags": _tag_list(tags)}]
        if block_device_mappings:
            params["BlockDeviceMappings"] = [dict(m) for m in block_device_mappings]
        if user_data is not None:
            params["UserData"] = user_data

        async def create() -> list[Resource]:
            try:
                result = await self.call("RunInstances", **params)
            except EC2Error as e:
                raise _capacity_error(e, "RunInstances", availability_zone, instance_type) from e
            instances: list[Resource] = result.get("Instances", [])
            return instances

        if not client_token:
            return await create()
        made: list[Resource] = await self._create_once("instance", client_token, create)
        return made

    async def start_instances(self, ids: Sequence[str]) -> None:
        """Start these instances (one call); no capacity: :class:`InsufficientCapacity`."""
        if ids:
            try:
                await self.call("StartInstances", InstanceIds=list(ids))
            except EC2Error as e:
                raise _capacity_error(e, "StartInstances", None, None) from e

    async def stop_instances(self, ids: Sequence[str], *, force: bool = False) -> None:
        """Stop these instances (one call)."""
        if ids:
            await self.call("StopInstances", InstanceIds=list(ids), Force=force)

    async def terminate_instances(self, ids: Sequence[str]) -> None:
        """Terminate these instances (one call)."""
        if ids:
            await self.call("TerminateInstances", InstanceIds=list(ids))

    # -- volumes, snapshots, images ------------------------------------------------------

    async def create_volume(
        self,
        *,
        availability_zone: str,
        size: int | None = None,
        snapshot_id: str | None = None,
        volume_type: str = "gp3",
        tags: Mapping[str, str] = {},
        client_token: str | None = None,
    ) -> Resource:
        """Create an EBS volume (from a snapshot when given), tagged.

        With a ``client_token`` the call is idempotent (see :meth:`run_instances`).
        """
        params: dict[str, Any] = {"AvailabilityZone": availability_zone, "VolumeType": volume_type}
        if size is not None:
            params["Size"] = size
        if snapshot_id:
            params["SnapshotId"] = snapshot_id
        if client_token:
            params["ClientToken"] = client_token
            tags = {**tags, CLIENT_TOKEN_TAG: client_token}
        if tags:
            params["TagSpecifications"] = [{"ResourceType": "volume", "Tags": _tag_list(tags)}]

        async def create() -> list[Resource]:
            return [await self.call("CreateVolume", **params)]

        if not client_token:
            return (await create())[0]
        made: list[Resource] = await self._create_once("volume", client_token, create)
        if not made:  # cannot happen: a volume call makes exactly one
            raise EC2Error("CreateVolume returned no volume", operation="CreateVolume")
        return made[0]

    # -- idempotent creates ------------------------------------------------------------

    async def _create_once(
        self,
        kind: CreatedKind,
        token: str,
        create: Callable[[], Awaitable[list[Resource]]],
    ) -> list[Resource]:
        """``create()`` once per token: a repeat returns what the token already made.

        EC2 itself returns the first call's result for a repeated ClientToken; this
        also covers endpoints that ignore the token (moto, the local cloud), and
        the call whose reply never came (a timeout, a cancellation): such a token
        stays *unsettled* and the next call with it looks for what it made by tag.
        """
        lock = self._token_locks.setdefault(token, anyio.Lock())
        async with lock:  # two concurrent calls with one token: the second waits
            return await self._create_locked(kind, token, create)

    async def _create_locked(
        self,
        kind: CreatedKind,
        token: str,
        create: Callable[[], Awaitable[list[Resource]]],
    ) -> list[Resource]:
        if token in self._made:
            made: list[Resource] = self._made[token]
            return made
        if token in self._unsettled:
            found = await self.created_with(kind, token)
            if found:
                self._made[token] = found
                del self._unsettled[token]
                return found
        self._unsettled[token] = kind
        made = await create()  # an error or a cancellation leaves the token unsettled
        self._made[token] = made
        del self._unsettled[token]
        return made

    @property
    def unsettled_tokens(self) -> dict[str, CreatedKind]:
        """ClientTokens of create calls whose outcome is unknown (failed, timed out, cancelled).

        Their owner looks them up with :meth:`created_with` to clean up what they made.
        """
        return dict(self._unsettled)

    def settle(self, token: str) -> None:
        """Forget a token whose resources the caller has found (and cleaned up)."""
        self._unsettled.pop(token, None)

    async def created_with(self, kind: CreatedKind, token: str) -> list[Resource]:
        """The instances or volumes a create call with this ClientToken made (by its tag).

        Terminated instances and deleted volumes are left out.
        """
        flt = tag_filters({CLIENT_TOKEN_TAG: token})
        if kind == "instance":
            found = await self.describe_instances(filters=flt)
            return [i for i in found if i.get("State", {}).get("Name") != "terminated"]
        volumes = await self.describe_volumes(filters=flt)
        return [v for v in volumes if v.get("State") not in ("deleting", "deleted")]

    async def attach_volume(self, volume_id: str, instance_id: str, device: str) -> None:
        """Attach a volume to an instance under an EC2 device name (``/dev/sdf``)."""
        await self.call("AttachVolume", VolumeId=volume_id, InstanceId=instance_id, Device=device)

    async def detach_volume(self, volume_id: str, *, force: bool = False) -> None:
        """Detach a volume from its instance."""
        await self.call("DetachVolume", VolumeId=volume_id, Force=force)

    async def delete_volume(self, volume_id: str) -> None:
        """Delete a volume."""
        await self.call("DeleteVolume", VolumeId=volume_id)

    async def create_snapshot(
        self,
        volume_id: str,
        *,
        description: str = "",
        tags: Mapping[str, str] = {},
        rate_wait: float = 120.0,
    ) -> Resource:
        """Snapshot a volume, tagged; the new snapshot (``pending``).

        EC2 refuses a snapshot of a volume snapshotted moments ago
        (``SnapshotCreationPerVolumeRateExceeded``): that is waited out and retried,
        pausing longer each time (x1.5, up to 15 s: AWS's advice), for up to ``rate_wait``
        seconds, after which the error is raised.
        """
        params: dict[str, Any] = {"VolumeId": volume_id, "Description": description}
        if tags:
            params["TagSpecifications"] = [{"ResourceType": "snapshot", "Tags": _tag_list(tags)}]
        deadline = time.monotonic() + rate_wait
        pause = self.poll_interval
        while True:
            try:
                return await self.call("CreateSnapshot", **params)
            except EC2Error as e:
                left = deadline - time.monotonic()
                if e.code != _SNAPSHOT_RATE or left <= 0:
                    raise
                log.info("snapshot of %s refused for now (%s): again in %.1fs", volume_id, e, pause)
                await anyio.sleep(min(pause, left))
                pause = min(pause * 1.5, 15.0)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot."""
        await self.call("DeleteSnapshot", SnapshotId=snapshot_id)

    async def copy_snapshot(
        self,
        snapshot_id: str,
        *,
        source_region: str,
        description: str = "",
        tags: Mapping[str, str] = {},
    ) -> str:
        """Copy a snapshot of ``source_region`` into this region, tagged; the new snapshot's id."""
        params: dict[str, Any] = {
            "SourceSnapshotId": snapshot_id,
            "SourceRegion": source_region,
            "Description": description,
        }
        if tags:
            params["TagSpecifications"] = [{"ResourceType": "snapshot", "Tags": _tag_list(tags)}]
        result = await self.call("CopySnapshot", **params)
        return str(result["SnapshotId"])

    async def copy_image(
        self,
        image_id: str,
        *,
        source_region: str,
        name: str,
        description: str = "",
        tags: Mapping[str, str] = {},
        **options: Any,
    ) -> str:
        """Copy an image of ``source_region`` into this region, tagged; the new image's id.

        The tags go on the image and its snapshots. ``options`` are more CopyImage
        parameters (``Encrypted``, ``KmsKeyId`` ...).
        """
        if tags:
            options["TagSpecifications"] = [
                {"ResourceType": kind, "Tags": _tag_list(tags)} for kind in ("image", "snapshot")
            ]
        result = await self.call(
            "CopyImage",
            SourceImageId=image_id,
            SourceRegion=source_region,
            Name=name,
            Description=description,
            **options,
        )
        return str(result["ImageId"])

    # -- key pairs and security groups ---------------------------------------------------

    async def key_pair_exists(self, name: str) -> bool:
        """Whether a key pair of this name exists."""
        result = await self.call(
            "DescribeKeyPairs", Filters=[{"Name": "key-name", "Values": [name]}]
        )
        return bool(result.get("KeyPairs"))

    async def import_key_pair(
        self,
        name: str,
        public_key: str,
        *,
        tags: Mapping[str, str] = {},
    ) -> None:
        """Import an OpenSSH public key as a key pair."""
        params: dict[str, Any] = {"KeyName": name, "PublicKeyMaterial": public_key.encode()}
        if tags:
            params["TagSpecifications"] = [{"ResourceType": "key-pair", "Tags": _tag_list(tags)}]
        await self.call("ImportKeyPair", **params)

    async def delete_key_pair(self, name: str) -> None:
        """Delete a key pair."""
        await self.call("DeleteKeyPair", KeyName=name)

    async def ensure_security_group(
        self,
        name: str,
        *,
        cidrs: Sequence[str],
        port: int = 22,
        description: str = "asyncstage staging servers",
        tags: Mapping[str, str] = {},
        patience: float = 60.0,
    ) -> str:
        """The id of the security group ``name``, made if needed, letting ssh in.

        ssh is allowed from each CIDR and from members of the group itself; rules
        already there are kept, missing ones are added, one call each. Safe to run from
        many processes at once: ``InvalidGroup.Duplicate`` (another made the group first)
        means looking it up again until EC2 shows it (within ``patience`` seconds), and
        ``InvalidPermission.Duplicate`` means the rule is there already.
        """
        group = await self._group_named(name)
        if group is None:
            params: dict[str, Any] = {"GroupName": name, "Description": description}
            if tags:
                params["TagSpecifications"] = [
                    {"ResourceType": "security-group", "Tags": _tag_list(tags)}
                ]
            try:
                made = await self.call("CreateSecurityGroup", **params)
                group = {"GroupId": str(made["GroupId"])}
            except EC2Error as e:
                if e.code != "InvalidGroup.Duplicate":
                    raise
                group = await self._group_named(name, patience=patience)
                if group is None:
                    raise EC2Error(
                        f"security group {name!r} exists (CreateSecurityGroup said so) but "
                        f"DescribeSecurityGroups did not show it within {patience:g}s",
                        code="InvalidGroup.NotFound",
                        operation="DescribeSecurityGroups",
                    ) from e
        group_id = str(group["GroupId"])
        have_cidrs: set[str] = set()
        have_self = False
        for perm in group.get("IpPermissions", []):
            if perm.get("FromPort") == port and perm.get("IpProtocol") == "tcp":
                have_cidrs |= {r["CidrIp"] for r in perm.get("IpRanges", [])}
                have_self |= any(
                    p.get("GroupId") == group_id for p in perm.get("UserIdGroupPairs", [])
                )
        rules: list[dict[str, Any]] = [
            {"IpRanges": [{"CidrIp": c}]} for c in dict.fromkeys(cidrs) if c not in have_cidrs
        ]
        if not have_self:
            rules.append({"UserIdGroupPairs": [{"GroupId": group_id}]})
        # one rule a call: EC2 refuses a whole call when one of its rules exists already
        for rule in rules:
            perm = {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, **rule}
            try:
                await self.call(
                    "AuthorizeSecurityGroupIngress", GroupId=group_id, IpPermissions=[perm]
                )
            except EC2Error as e:
                if e.code != "InvalidPermission.Duplicate":  # another process added it
                    raise
        return group_id

    async def _group_named(self, name: str, *, patience: float = 0.0) -> Resource | None:
        """The security group called ``name``, looked for again until ``patience`` is up."""
        deadline = time.monotonic() + patience
        pause = self.poll_interval
        while True:
            found = await self.call(
                "DescribeSecurityGroups", Filters=[{"Name": "group-name", "Values": [name]}]
            )
            groups: list[Resource] = found.get("SecurityGroups", [])
            if groups or time.monotonic() >= deadline:
                return groups[0] if groups else None
            await anyio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * self.poll_backoff, self.poll_max_interval)

    async def delete_security_group(self, group_id: str) -> None:
        """Delete a security group."""
        await self.call("DeleteSecurityGroup", GroupId=group_id)
