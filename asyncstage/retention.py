"""Retention: which snapshots of a volume to keep, by restic's ``forget --keep-*`` rules.

:class:`Policy` holds the rules; :func:`plan` decides, for every snapshot, whether it is
kept and why; :func:`forget` applies a plan to a manager's snapshots of some volumes.

The rules are restic's: the snapshots are walked from the newest. ``last`` keeps the
newest N. ``hourly``, ``daily``, ``weekly``, ``monthly`` and ``yearly`` each keep the
newest snapshot of each of the last N calendar periods (hour, day, ISO week, month,
year, in UTC) that have one: a snapshot is kept by a rule when its period differs from
that of the previous snapshot the rule looked at, while the rule has periods left.
``within`` keeps every snapshot taken within that duration of the newest one (not of
now: a fleet whose backups stopped keeps its last ones). A snapshot kept by any rule is
kept; each decision carries its reasons.

Beyond restic, some snapshots are never deleted whatever the rules say: the newest
completed one, any not completed yet (a backup in the making), and any an image uses.
:func:`forget` deletes by id, and only ids that a second reading of the list, made just
before deleting, also marks for removal.

An entry of the list may stand for several snapshots taken at one instant (a set): its
description then carries ``Members``, every snapshot id of the set. The set is decided
as one snapshot (kept when an image uses any member) and removed whole.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from asyncstage.errors import InvalidArgument

if TYPE_CHECKING:
    from asyncstage.manager import Manager

log = logging.getLogger("asyncstage.retention")

MAX_KEEP = 1_000_000  # far beyond any fleet's snapshots; more is a typo or an attack
MAX_WITHIN = timedelta(days=366 * 1000)
_DURATION = re.compile(r"(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)d)?(?:(\d+)h)?")


class InvalidPolicy(InvalidArgument):
    """A retention policy that cannot be applied (bad numbers, no rule at all ...)."""


def parse_duration(text: str) -> timedelta:
    """restic's ``--keep-within`` duration: ``1y2m3d4h`` (years, months, days, hours).

    A year counts 365 days and a month 30, as a cut-off (restic subtracts calendar
    years and months; the difference is a day or two at the edges). Negative durations
    (a cut-off in the future) and empty or unknown ones are refused.
    """
    if not isinstance(text, str):
        raise InvalidPolicy(f"keep-within: a duration such as '7d' or '1y6m', not {text!r}")
    spec = text.strip()
    m = _DURATION.fullmatch(spec)
    if not spec or m is None or not any(m.groups()):
        raise InvalidPolicy(
            f"keep-within: {text!r} is not a duration such as '36h', '7d', '1y6m' "
            "(y, m, d, h; a duration into the future is refused)"
        )
    years, months, days, hours = (int(g or 0) for g in m.groups())
    try:
        span = timedelta(days=years * 365 + months * 30 + days, hours=hours)
    except OverflowError:
        raise InvalidPolicy(f"keep-within: {text!r} is too long") from None
    if span > MAX_WITHIN:
        raise InvalidPolicy(f"keep-within: {text!r} is longer than 1000 years")
    return span


def _count(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPolicy(f"keep-{name}: a whole number, not {value!r}")
    if not 0 <= value <= MAX_KEEP:
        raise InvalidPolicy(f"keep-{name}: between 0 and {MAX_KEEP}, not {value}")
    return value


@dataclass(frozen=True)
class Policy:
    """restic's ``--keep-*`` rules (None: the rule is not used). At least one must be."""

    last: int | None = None
    hourly: int | None = None
    daily: int | None = None
    weekly: int | None = None
    monthly: int | None = None
    yearly: int | None = None
    within: timedelta | None = None

    def __post_init__(self) -> None:
        for name in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
            _count(name, getattr(self, name))
        if self.within is not None:
            if not isinstance(self.within, timedelta):
                raise InvalidPolicy(f"keep-within: a timedelta, not {self.within!r}")
            if self.within < timedelta(0):
                raise InvalidPolicy("keep-within: a duration into the future is refused")
            if self.within > MAX_WITHIN:
                raise InvalidPolicy("keep-within: longer than 1000 years")
        if not any(self._rules()) and self.within is None:
            raise InvalidPolicy(
                "no keep rule given: nothing would be kept (give --keep-last and/or the others)"
            )

    @classmethod
    def from_options(cls, **options: Any) -> Policy:
        """A policy from ``keep_last=...``-style options (``keep_within`` a duration text)."""
        known = {"keep_" + n for n in ("last", "hourly", "daily", "weekly", "monthly", "yearly")}
        unknown = set(options) - known - {"keep_within"}
        if unknown:
            raise InvalidPolicy(f"unknown retention options: {', '.join(sorted(unknown))}")
        within = options.get("keep_within")
        return cls(
            **{k.removeprefix("keep_"): v for k, v in options.items() if k in known},
            within=None if within is None else parse_duration(str(within)),
        )

    def _rules(self) -> list[tuple[str, int, Callable[[datetime, int], object]]]:
        rules: list[tuple[str, int | None, Callable[[datetime, int], object]]] = [
            ("last snapshot", self.last, lambda t, n: n),
            ("hourly snapshot", self.hourly, lambda t, n: (t.year, t.month, t.day, t.hour)),
            ("daily snapshot", self.daily, lambda t, n: (t.year, t.month, t.day)),
            ("weekly snapshot", self.weekly, lambda t, n: t.isocalendar()[:2]),
            ("monthly snapshot", self.monthly, lambda t, n: (t.year, t.month)),
            ("yearly snapshot", self.yearly, lambda t, n: t.year),
        ]
        return [(reason, count, key) for reason, count, key in rules if count]


@dataclass(frozen=True)
class Decision:
    """What :func:`plan` decided for one snapshot, and why."""

    snapshot_id: str
    start_time: datetime
    keep: bool
    reasons: tuple[str, ...]
    members: tuple[str, ...] = ()
    """Every snapshot of a set the decision stands for (empty: the one snapshot)."""

    @property
    def snapshot_ids(self) -> tuple[str, ...]:
        """The snapshots this decision keeps or removes."""
        return self.members or (self.snapshot_id,)

    def __str__(self) -> str:
        verb = "keep  " if self.keep else "remove"
        what = self.snapshot_id
        if len(self.members) > 1:
            what += f" (set of {len(self.members)}: {' '.join(self.members)})"
        return f"{verb} {what} {self.start_time:%Y-%m-%d %H:%M:%S}: " + "; ".join(self.reasons)


@dataclass
class _Bucket:
    """One rule as :func:`plan` walks the snapshots: periods left, the last one seen."""

    reason: str
    left: int
    key: Callable[[datetime, int], object]
    last: object = None


def start_time(snapshot: Mapping[str, Any]) -> datetime:
    """A snapshot description's ``StartTime`` as an aware UTC datetime."""
    when = snapshot.get("StartTime")
    if isinstance(when, str):
        when = datetime.fromisoformat(when.replace("Z", "+00:00"))
    if not isinstance(when, datetime):
        raise InvalidArgument(f"snapshot {snapshot.get('SnapshotId')}: no StartTime")
    return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)


def plan(
    snapshots: Iterable[Mapping[str, Any]],
    policy: Policy,
    *,
    used_by: Mapping[str, str] = {},
) -> list[Decision]:
    """A decision for every snapshot (EC2 descriptions), newest first.

    ``used_by`` maps snapshot ids to the image that uses them (those are kept, and so is
    a set when an image uses any of its ``Members``).
    """
    listed = sorted(
        (
            (start_time(s), str(s["SnapshotId"]), str(s.get("State", "completed")), _members(s))
            for s in snapshots
        ),
        key=lambda t: (t[0], t[1]),
        reverse=True,
    )
    completed = [(t, i) for t, i, state, _ in listed if state == "completed"]
    newest = completed[0] if completed else None
    rules = [_Bucket(reason, count, key) for reason, count, key in policy._rules()]
    decisions: list[Decision] = []
    n = 0
    for when, snapshot_id, state, members in listed:
        reasons: list[str] = []
        if state != "completed":
            reasons.append(f"{state}: not completed yet")
        for used in dict.fromkeys(used_by[i] for i in members or (snapshot_id,) if i in used_by):
            reasons.append(f"used by image {used}")
        if newest is not None and (when, snapshot_id) == newest:
            reasons.append("newest completed snapshot")
        if state == "completed":  # restic's rules look at completed snapshots only
            for rule in rules:
                if rule.left > 0:
                    bucket = rule.key(when, n)
                    if bucket != rule.last:
                        rule.last = bucket
                        rule.left -= 1
                        reasons.append(rule.reason)
            if (
                policy.within is not None
                and newest is not None
                and when >= newest[0] - policy.within
            ):
                reasons.append(f"within {policy.within} of the newest")
            n += 1
        keep = bool(reasons)
        why = tuple(reasons) if keep else ("no rule keeps it",)
        decisions.append(Decision(snapshot_id, when, keep, why, members))
    return decisions


def _members(snapshot: Mapping[str, Any]) -> tuple[str, ...]:
    """A set's snapshot ids (sorted), or () for one snapshot."""
    members = snapshot.get("Members")
    if not members:
        return ()
    if isinstance(members, str) or not all(isinstance(i, str) for i in members):
        raise InvalidArgument(f"snapshot set {snapshot.get('SnapshotId')}: bad members")
    return tuple(sorted(members))


async def _used_by_images(manager: Manager) -> dict[str, str]:
    images = await manager.ec2.describe_images(owners=["self"])
    used: dict[str, str] = {}
    for image in images:
        for mapping in image.get("BlockDeviceMappings", []) or []:
            snapshot_id = (mapping.get("Ebs") or {}).get("SnapshotId")
            if snapshot_id:
                used[str(snapshot_id)] = str(image.get("ImageId"))
    return used


View = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
"""How :func:`forget` sees a listing (a backup's marks, say) before it decides."""
Remove = Callable[[Decision], Awaitable[object]]
"""How :func:`forget` removes what a decision stands for."""


async def _read(manager: Manager, name: str, policy: Policy, view: View) -> list[Decision]:
    snapshots = view(await manager.snapshots(name))
    return plan(snapshots, policy, used_by=await _used_by_images(manager))


async def forget(
    manager: Manager,
    names: Sequence[str],
    policy: Policy,
    *,
    dry_run: bool = False,
    report: Callable[[str], None] | None = None,
    view: View = list,
    on_removed: Callable[[str, str], object] | None = None,
    remove: Remove | None = None,
) -> dict[str, list[Decision]]:
    """Apply ``policy`` to the snapshots of the volumes ``names``; the decisions by name.

    Each decision is reported (``report``, else logged) as it is made. Without
    ``dry_run`` the snapshots to remove are deleted by id, oldest first, and only those
    that a second reading of the list, just before, also marks for removal: a snapshot
    that appeared or changed in between is never deleted on an old reading.
    ``view`` turns each listing into what the rules see (default: as listed);
    ``remove`` removes what one decision stands for (default: deletes each of its
    snapshots); ``on_removed`` is told (name, snapshot id) of each snapshot removed.
    """
    if isinstance(names, str) or not names:
        raise InvalidArgument("forget: name one or more volumes")
    say = report or log.info
    result: dict[str, list[Decision]] = {}
    for name in names:
        decisions = await _read(manager, name, policy, view)
        result[name] = decisions
        for decision in decisions:
            say(f"{name}: {decision}")
        doomed = {(d.snapshot_id, d.members) for d in decisions if not d.keep}
        if dry_run or not doomed:
            continue
        again = await _read(manager, name, policy, view)
        confirmed = [
            d for d in reversed(again) if not d.keep and (d.snapshot_id, d.members) in doomed
        ]
        for decision in confirmed:
            if remove is not None:
                await remove(decision)
            else:
                for snapshot_id in decision.snapshot_ids:
                    await manager.ec2.delete_snapshot(snapshot_id)
            for snapshot_id in decision.snapshot_ids:
                say(f"{name}: removed {snapshot_id}")
                if on_removed is not None:
                    on_removed(name, snapshot_id)
    return result
