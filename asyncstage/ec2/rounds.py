"""Describe rounds shared by concurrent callers: whoever comes first makes the call for
everybody who joins within a window, and hands each page of its answer on as it comes.

Listings by the values of one tag (the volumes or snapshots of one backup, of one
name) are shared the same way: one call asks for every value wanted meanwhile.

A snapshot wait also registers its id while it lasts: every DescribeSnapshots round
then asks for all the registered ids and keeps their answers, so that a wait whose
pause is half over takes another wait's answer instead of a call of its own.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import anyio

from asyncstage.ec2.tags import tags_of

Resource = dict[str, Any]
"""An EC2 resource's description, as botocore gives it."""
Fetch = Callable[[list[str], Callable[[list[Resource]], None]], Awaitable[None]]
"""``fetch(ids, add)``: describe ``ids``, each page of the answer given to ``add``."""


class _Round:
    """One shared describe round: whoever comes first makes it for everybody, and hands
    on its answer page by page (:attr:`pages`, :attr:`moved` set at each); ``key`` is
    the field that holds a resource's id."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.ids: set[str] = set()
        self.done = anyio.Event()
        self.pages: list[dict[str, Resource]] = []
        self.moved = anyio.Event()
        self.complete = False  # every page came
        self.error: BaseException | None = None

    def add(self, items: Iterable[Resource]) -> None:
        """A page of the answer: wakes those waiting for the next."""
        self.pages.append({str(i[self.key]): i for i in items})
        self.moved, moved = anyio.Event(), self.moved
        moved.set()

    async def lead(
        self,
        window: float,
        release: Callable[[], None],
        fetch: Callable[[Callable[[list[Resource]], None]], Awaitable[None]],
        take: Callable[[dict[str, Resource]], None],
    ) -> None:
        """Make the round for all its callers: after ``window`` (others may join until
        ``release`` closes it to them), ``fetch`` it, each page added and the leader's
        own part of it given to ``take``."""
        in_take = False  # an error of the leader's own ``take`` is not the round's

        def add(items: list[Resource]) -> None:
            nonlocal in_take
            self.add(items)
            in_take = True
            take(self.pages[-1])
            in_take = False

        try:
            await anyio.sleep(window)
            release()
            await fetch(add)
            self.complete = True
        except BaseException as e:
            if not in_take:
                self.error = e
            raise
        finally:
            release()
            self.finish()

    def finish(self) -> None:
        """The round is over (all its pages came, or it failed): wakes those waiting."""
        self.done.set()
        self.moved.set()

    async def follow(self, take: Callable[[dict[str, Resource]], None]) -> None:
        """``take`` each page of the round as it comes, until the round is over."""
        taken = 0
        while True:
            while taken < len(self.pages):
                taken += 1
                take(self.pages[taken - 1])
            if self.done.is_set():
                return
            await self.moved.wait()


class _Tagged:
    """One shared describe by the values of one tag: whoever comes first asks, after the
    window, for every value the callers want; each takes the resources of its own."""

    def __init__(self) -> None:
        self.values: set[str] = set()
        self.done = anyio.Event()
        self.found: list[Resource] = []
        self.error: BaseException | None = None


class Completed:
    """Snapshots seen ``completed`` lately (a final state: only a delete ends it), with
    their descriptions: for a minute, a wait for one needs no call."""

    FRESH = 60.0
    """Seconds a snapshot seen completed is taken as such."""
    KEPT = 1000
    """The most snapshots remembered (the oldest seen go first)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, Resource]] = {}

    def note(self, snapshots: Iterable[Resource]) -> None:
        """Remember the completed ones among these descriptions."""
        now = time.monotonic()
        for snap in snapshots:
            if snap.get("State") == "completed":
                self._seen.pop(str(snap["SnapshotId"]), None)  # the newest last
                self._seen[str(snap["SnapshotId"])] = (now, snap)
        while len(self._seen) > self.KEPT:
            del self._seen[next(iter(self._seen))]

    def get(self, snapshot_id: str) -> Resource | None:
        """Its description, when it was seen completed within :attr:`FRESH` seconds."""
        seen = self._seen.get(snapshot_id)
        return None if seen is None or time.monotonic() - seen[0] > self.FRESH else seen[1]

    def forget(self, snapshot_id: str) -> None:
        """It is being deleted."""
        self._seen.pop(snapshot_id, None)


class SharedRounds:
    """The shared rounds of one client, by action and the states asked for; the
    snapshots being waited for (by how many waits), with the last description of each a
    round gave (None: not in its answer), when that round was asked and when answered;
    the snapshots seen completed lately (:attr:`completed`)."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, frozenset[str]], _Round] = {}
        self._watched: Counter[str] = Counter()
        self._latest: dict[str, tuple[float, float, Resource | None]] = {}
        self._tagged: dict[Hashable, _Tagged] = {}
        self.completed = Completed()

    @contextlib.contextmanager
    def watching(self, snapshot_id: str) -> Iterator[None]:
        """Within: every snapshot round also asks for ``snapshot_id`` and keeps its answer."""
        self._watched[snapshot_id] += 1
        try:
            yield
        finally:
            self._watched[snapshot_id] -= 1
            if self._watched[snapshot_id] <= 0:
                del self._watched[snapshot_id]
                self._latest.pop(snapshot_id, None)

    def seen_at(self, snapshot_id: str) -> float | None:
        """When the description a round last gave of a watched snapshot held: the middle
        of that call (its answer was made somewhere between asking and answering)."""
        latest = self._latest.get(snapshot_id)
        return None if latest is None else (latest[0] + latest[1]) / 2

    async def snapshots(
        self,
        ids: Sequence[str],
        since: float | None,
        describe: Callable[[list[str]], Awaitable[list[Resource]]],
        window: float,
    ) -> dict[str, Resource]:
        """The snapshots of ``ids``: from the rounds asked for at or after ``since`` when
        every one is watched and known so, else from a shared round of ``describe``."""
        if since is not None and all(
            i in self._watched and self._latest.get(i, (-1.0, -1.0, None))[0] >= since for i in ids
        ):
            return {i: d for i in ids if (d := self._latest[i][2]) is not None}

        async def fetch(named: list[str], add: Callable[[list[Resource]], None]) -> None:
            asked, named = time.monotonic(), sorted({*named, *self._watched})
            found = await describe(named)
            answered = time.monotonic()
            shown = {str(d["SnapshotId"]): d for d in found}
            for i in named:
                if i in self._watched:
                    self._latest[i] = (asked, answered, shown.get(i))
            add(found)

        return await self.shared(("snapshots", frozenset()), "SnapshotId", ids, fetch, window)

    async def tagged(
        self,
        kind: Hashable,
        key: str,
        value: str,
        fetch: Callable[[list[str]], Awaitable[list[Resource]]],
        window: float,
    ) -> list[Resource]:
        """The resources whose tag ``key`` is ``value``, from one ``fetch`` of every value
        the callers of ``kind`` (the same describe but for the values) want within
        ``window``. A round is closed to newcomers before its call: an answer is never
        older than the question."""
        while True:
            rnd = self._tagged.get(kind)
            if rnd is None:
                rnd = self._tagged[kind] = _Tagged()
                rnd.values.add(value)
                try:
                    await anyio.sleep(window)
                    if self._tagged.get(kind) is rnd:
                        del self._tagged[kind]
                    rnd.found = await fetch(sorted(rnd.values))
                except BaseException as e:
                    rnd.error = e
                    raise
                finally:
                    if self._tagged.get(kind) is rnd:
                        del self._tagged[kind]
                    rnd.done.set()
            else:
                rnd.values.add(value)
                await rnd.done.wait()
                if isinstance(rnd.error, anyio.get_cancelled_exc_class()):
                    continue  # its leader was cancelled, not this caller: ask again
                if rnd.error is not None:
                    raise rnd.error
            return [r for r in rnd.found if tags_of(r).get(key) == value]

    async def shared(
        self,
        kind: tuple[str, frozenset[str]],
        key: str,
        ids: Iterable[str],
        fetch: Fetch,
        window: float,
        on_page: Callable[[dict[str, Resource]], None] | None = None,
    ) -> dict[str, Resource]:
        """The resources of ``ids`` (``key``: the field of their id) from the round of
        ``kind`` that is open (joined) or a new one (made after ``window``: ``fetch`` of
        every caller's ids); ``on_page(found)`` in this caller's task with its resources
        of each page as it comes, each once."""
        wanted = set(ids)
        got: dict[str, Resource] = {}

        def take(page: dict[str, Resource]) -> None:
            mine = {i: d for i, d in page.items() if i in wanted and i not in got}
            got.update(mine)
            if mine and on_page is not None:
                on_page(mine)

        while True:
            rnd = self._open.get(kind)
            leader = rnd is None
            if rnd is None:
                rnd = self._open[kind] = _Round(key)
            rnd.ids |= wanted - got.keys()
            if leader:

                async def made(add: Callable[[list[Resource]], None], rnd: _Round = rnd) -> None:
                    await fetch(sorted(rnd.ids), add)

                def release(rnd: _Round = rnd) -> None:
                    if self._open.get(kind) is rnd:
                        del self._open[kind]

                await rnd.lead(window, release, made, take)
                return got
            await rnd.follow(take)
            if rnd.complete:
                return got
            if isinstance(rnd.error, Exception) and not isinstance(
                rnd.error, anyio.get_cancelled_exc_class()
            ):
                raise rnd.error
            # the round ended early (its leader cancelled): again, for what no page gave
