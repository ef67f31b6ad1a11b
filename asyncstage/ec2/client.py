"""The EC2 API client for one region: calls with errors mapped, EC2's eventual
consistency and throttling absorbed, EC2's clock, and describes batched by id."""

from __future__ import annotations

import base64
import contextlib
import email.utils
import random
import re
import time
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Self

import aioboto3
import anyio
from aiobotocore.config import AioConfig
from botocore import xform_name
from botocore.exceptions import BotoCoreError, ClientError

from asyncstage.ec2.console import CONSOLE_READS
from asyncstage.ec2.rate import THROTTLED, RequestBuckets
from asyncstage.ec2.rounds import Resource, SharedRounds
from asyncstage.errors import (
    AsyncstageError,
    EC2Error,
    PermissionDenied,
    UnknownServer,
    UnknownSnapshot,
    UnknownVolume,
)
from asyncstage.timeouts import Timeouts

__all__ = ["Client", "Resource", "RetryMode"]

RetryMode = Literal["adaptive", "standard"]

FILTER_CHUNK = 200
"""Values per filter EC2 accepts."""
_PAGE = 100
"""Instances per page of a wait's steady rounds (EC2's ``MaxResults``: 5 to 1000 with
filters): a round that finds a fleet arrived hands on its first page while EC2 makes the
next, so that what follows an arrival (a console read, ssh) starts after one page's
answer rather than the whole fleet's. Not smaller: each further page is a call of its
own, made while the first pages' servers are being taken on, and where that work is
the controller's own (ssh handshakes) the calls slow it more than the early start
gains; a page of EC2's burst of GetConsoleOutput (100) lets every console read of it
start at once."""

_NOT_FOUND: dict[str, type[AsyncstageError]] = {
    "InvalidInstanceID.NotFound": UnknownServer,
    "InvalidInstanceID.Malformed": UnknownServer,
    "InvalidVolume.NotFound": UnknownVolume,
    "InvalidVolumeID.Malformed": UnknownVolume,
    "InvalidSnapshot.NotFound": UnknownSnapshot,
    "InvalidSnapshotID.Malformed": UnknownSnapshot,
}


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


def _denied(operation: str, message: str) -> PermissionDenied:
    """``UnauthorizedOperation`` as :class:`PermissionDenied`, naming the IAM permission."""
    permission = f"ec2:{operation}"
    return PermissionDenied(
        f"{message} (the credentials lack the IAM permission {permission})",
        permission=permission,
        operation=operation,
    )


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


def chunks(items: Sequence[str], size: int) -> Iterable[list[str]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


class Client:
    """The aioboto3 client of one region, its lifetime, calls and describes."""

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
        request_rate: float | None = 1.0,
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
            max_pool_connections=max(10, max_concurrency) + CONSOLE_READS,
        )
        self.poll_interval = poll_interval
        self.poll_backoff = poll_backoff
        self.poll_max_interval = poll_max_interval
        self.coalesce_window = coalesce_window
        self.limiter = anyio.CapacityLimiter(max_concurrency)
        self.throttle_wait = throttle_wait
        self.requests = None if request_rate is None else RequestBuckets(request_rate)
        """This side's buckets of EC2's non-mutating actions (``request_rate``: the
        account's rates relative to EC2's defaults; None: calls are not paced here)."""
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
        self.rounds = SharedRounds()
        """The describe rounds shared by this client's callers, and what they saw."""

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
            if self.requests is not None:
                self.requests.register(self._client.meta.events)
        return self

    @contextlib.asynccontextmanager
    async def service(self, name: str) -> AsyncIterator[Any]:
        """A raw aioboto3 client of another AWS service (``"kms"``) of this region, with
        this client's credentials, endpoint and retries."""
        try:
            async with self._session.client(
                name, region_name=self.region, endpoint_url=self.endpoint_url, config=self._config
            ) as client:
                yield client
        except BotoCoreError as e:
            raise EC2Error(f"{name} in {self.region}: {e}") from e

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
                if wait is None and code in THROTTLED:
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

    async def paginate(
        self,
        operation: str,
        key: str,
        /,
        *,
        each: Callable[[list[Resource]], None] | None = None,
        **params: Any,
    ) -> list[Resource]:
        """All items under ``key`` of every page of a describe call; ``each(items)`` is
        called with a page's items as soon as that page is in, before the next is asked for."""
        items: list[Resource] = []
        token: str | None = None
        while True:
            page = await self.call(operation, **params, **({"NextToken": token} if token else {}))
            items.extend(page.get(key, []))
            if each is not None:
                each(page.get(key, []))
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
            for chunk in chunks(sorted(set(ids)), FILTER_CHUNK):
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

    async def describe_instances_shared(
        self,
        ids: Iterable[str],
        *,
        states: Collection[str] = (),
        on_page: Callable[[dict[str, Resource]], None] | None = None,
    ) -> dict[str, Resource]:
        """Instances by id, sharing one DescribeInstances round with concurrent callers.

        Callers arriving within ``coalesce_window`` of each other are served by a
        single call for the union of their ids. With ``states``, the call still names
        every id but EC2 answers only those in one of these states (the rest are left
        out, as is an id EC2 does not show yet): a wait's round costs what changed, not
        the whole fleet's descriptions; such rounds are shared with callers asking for
        the same states.

        Such a round comes in pages of ``_PAGE`` instances: ``on_page(found)`` is called,
        in each caller's own task, with that caller's instances of a page as soon as the
        page is in (the caller who makes the round: before it asks for the next page),
        each instance once; the return value holds them all. The pages are asked for one
        after another (each with the token the page before gave), not as parallel calls
        for parts of the ids: the endpoint would make those answers side by side, on
        threads sharing its cores (the in-process local cloud's also share the
        interpreter's lock with this event loop), and each would end about as late as
        the whole answer does now. A round that fails part-way raises its error after
        the pages that came.
        """
        wanted = frozenset(states)

        async def fetch(named: list[str], add: Callable[[list[Resource]], None]) -> None:
            if wanted:
                await self._describe_in_states(named, wanted, add)
            else:
                add(await self.describe_instances(named))

        kind = ("instances", wanted)
        return await self.rounds.shared(
            kind, "InstanceId", ids, fetch, self.coalesce_window, on_page
        )

    def watching_snapshot(self, snapshot_id: str) -> contextlib.AbstractContextManager[None]:
        """Within: every shared DescribeSnapshots round also asks for ``snapshot_id``,
        and keeps its description for :meth:`describe_snapshots_shared`."""
        return self.rounds.watching(snapshot_id)

    async def describe_snapshots_shared(
        self, ids: Iterable[str], *, since: float | None = None
    ) -> dict[str, Resource]:
        """Our own snapshots by id (unknown ids are left out), sharing one
        DescribeSnapshots round with the callers arriving within ``coalesce_window``;
        each round also asks for every snapshot watched (:meth:`watching_snapshot`).

        ``since`` (a ``time.monotonic()``): a watched snapshot's description from a
        round asked for at or after then is answer enough, without a call. A fleet's
        backups waiting for their snapshots then make one call every few of their polls,
        not one each: within EC2's request rate whatever the fleet's size.
        """
        return await self.rounds.snapshots(
            list(ids), since, self.describe_snapshots, self.coalesce_window
        )

    async def _describe_in_states(
        self, ids: Sequence[str], states: Collection[str], each: Callable[[list[Resource]], None]
    ) -> None:
        """``each`` page of the instances of these ids that are in one of these states
        (the others are left out of EC2's answer): up to ``_PAGE`` instances a page, one
        filter of up to 200 ids after another."""
        for chunk in chunks(ids, FILTER_CHUNK):
            flt = [
                {"Name": "instance-id", "Values": list(chunk)},
                {"Name": "instance-state-name", "Values": sorted(states)},
            ]
            await self.paginate(
                "DescribeInstances",
                "Reservations",
                each=lambda reservations: each(self._flatten(reservations)),
                Filters=flt,
                MaxResults=_PAGE,
            )

    async def describe_volumes(
        self, ids: Sequence[str] | None = None, *, filters: Sequence[Mapping[str, Any]] = ()
    ) -> list[Resource]:
        """Volumes by id (unknown ids are left out) and/or filters."""
        flt = list(filters)
        if ids is None:
            await self._settle("vol-", self.describe_volumes)
            return await self.paginate("DescribeVolumes", "Volumes", Filters=flt)

        return await self._by_ids("DescribeVolumes", "Volumes", "volume-id", ids, flt)

    async def describe_snapshots(
        self, ids: Sequence[str] | None = None, *, filters: Sequence[Mapping[str, Any]] = ()
    ) -> list[Resource]:
        """Our own snapshots by id (unknown ids are left out; 200 ids a call, EC2's most
        for a filter) and/or filters."""
        flt = list(filters)
        if ids is None:
            await self._settle("snap-", self.describe_snapshots)
            found = await self.paginate(
                "DescribeSnapshots", "Snapshots", OwnerIds=["self"], Filters=flt
            )
        else:
            found = await self._by_ids(
                "DescribeSnapshots", "Snapshots", "snapshot-id", ids, flt, OwnerIds=["self"]
            )
        self.rounds.completed.note(found)
        return found

    async def _by_ids(
        self,
        action: str,
        key: str,
        filter_name: str,
        ids: Sequence[str],
        filters: Sequence[Mapping[str, Any]],
        **params: Any,
    ) -> list[Resource]:
        """The ``key`` resources of ``ids`` (and ``filters``) by the ``filter_name``
        filter, 200 ids a call (EC2's most for a filter), again while it leaves out a
        fresh one (:meth:`_until_seen`)."""

        async def fetch() -> list[Resource]:
            found: list[Resource] = []
            for chunk in chunks(sorted(set(ids)), FILTER_CHUNK):
                flt = [*filters, {"Name": filter_name, "Values": list(chunk)}]
                found += await self.paginate(action, key, Filters=flt, **params)
            return found

        return await self._until_seen(ids, key[:-1] + "Id", fetch)  # Volumes: VolumeId

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
