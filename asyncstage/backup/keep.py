"""Keeping backups: retention by name, and copies in other regions for disaster recovery.

- :func:`forget` applies a retention :class:`~asyncstage.retention.Policy` to backups by
  name. Only complete backups (:func:`~asyncstage.backup.snapshots.is_backup`) are subject
  to the rules; a snapshot of a run that has not marked it complete is never removed
  here (it is a backup in the making, or a dead run's leftover that ``sweep`` removes).
- :func:`copy_backup` copies a complete backup into another region's manager: the copy
  carries the source's tags, its owner there, and ``asyncstage:copy-of`` =
  ``REGION/snap-...``; it is marked ``pending`` until EC2 says it is completed, then
  ``complete``. A copy that fails or is cancelled is deleted; one whose controller died
  stays ``pending`` (never a backup) until ``sweep`` in that region removes it.
  :func:`copy_set` does the same for a ``snapshot``-mode set, whole: every copy is
  marked complete in one call once all are completed, and all are deleted when one fails.
- A ``snapshot``-mode set (:func:`~asyncstage.backup.snapshot_mode.set_of`) is one
  backup to retention: decided as one, kept when any member is in use, and removed whole
  (its members first marked ``forgetting`` in one call, so that a removal cut short
  leaves no partial set counted as a backup; the next ``forget`` finishes it).
- A volume a run kept (:mod:`asyncstage.backup.warm`) holds the newest complete backup,
  which retention never removes; after removing snapshots, :func:`forget` removes any
  kept volume of the backup that no longer holds its newest complete backup
  (:func:`~asyncstage.backup.sweep.drop_stale_kept`).
- :func:`keep_after` is what a plan does after each successful backup: the copies first
  (every key checked in its region before any copy starts), then retention in every
  region.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from asyncstage.adoption import OWNER_TAG
from asyncstage.backup._common import log
from asyncstage.backup.snapshot_mode import set_of, set_size
from asyncstage.backup.snapshots import STATE_TAG, is_backup
from asyncstage.backup.sweep import drop_stale_kept
from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import EC2Error, InvalidArgument, NotFound
from asyncstage.manager import Manager
from asyncstage.retention import Decision, InvalidPolicy, Policy, start_time
from asyncstage.retention import forget as forget_snapshots

__all__ = [
    "COPY_OF_TAG",
    "CopyTarget",
    "ForgetResult",
    "UnknownKmsKey",
    "check_keys",
    "copy_backup",
    "copy_of",
    "copy_set",
    "forget",
    "keep_after",
    "parse_copy_to",
    "parse_retention",
    "run_snapshots",
]

COPY_OF_TAG = tag("copy-of")
FORGETTING = "forgetting"
"""The state tag of a set's members that a ``forget`` is removing (never a backup)."""
_REGION = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d{1,2}$")
_COPY_OF = re.compile(r"^([a-z]{2}(?:-[a-z]+)+-\d{1,2})/(snap-[0-9a-f]{8,17})$")
_KEY = re.compile(
    r"^(?:arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(?:key|alias)/)?[A-Za-z0-9/_:-]{1,256}$"
)
_RETENTION_KEYS = {"keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly"} | {
    "keep_yearly",
    "keep_within",
}
_TARGET_KEYS = {"region", "kms_key_id", "retention"}


class UnknownKmsKey(NotFound):
    """A KMS key that the destination region of a copy does not have (keys never leave
    their region: an encrypted copy needs a key of its own region)."""


@dataclass(frozen=True)
class CopyTarget:
    """A region that receives a copy of each new backup, with its key and retention
    (None: the backup's own)."""

    region: str
    kms_key_id: str | None = None
    retention: Policy | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.region, str) and _REGION.match(self.region)):
            raise InvalidArgument(f"copy_to: {self.region!r} is not a region name (eu-west-1)")
        if self.kms_key_id is not None and not (
            isinstance(self.kms_key_id, str) and _KEY.match(self.kms_key_id)
        ):
            raise InvalidArgument(
                f"copy_to {self.region}: kms_key_id {self.kms_key_id!r} is not a key id, "
                "alias or ARN"
            )
        key = self.kms_key_id or ""
        if key.startswith("arn:") and key.split(":")[3] != self.region:
            raise UnknownKmsKey(
                f"copy_to {self.region}: key {key} is a key of another region; an "
                f"encrypted copy needs a key of {self.region}"
            )
        if self.retention is not None and not isinstance(self.retention, Policy):
            raise InvalidArgument(f"copy_to {self.region}: retention is a Policy")

    def as_dict(self) -> dict[str, Any]:
        """The target as a plain dict (reports)."""
        return {"region": self.region, "kms_key_id": self.kms_key_id}


def parse_retention(where: str, raw: object) -> Policy:
    """A :class:`Policy` from a plan's ``retention = {keep_daily = 7, ...}`` (checked)."""
    if isinstance(raw, Policy):
        return raw
    if not isinstance(raw, Mapping):
        raise InvalidPolicy(f"{where}: retention is a table such as {{keep_daily = 7}}")
    unknown = sorted(set(raw) - _RETENTION_KEYS)
    if unknown:
        raise InvalidPolicy(f"{where}: unknown retention keys {unknown}")
    try:
        return Policy.from_options(**{str(k): v for k, v in raw.items()})
    except InvalidPolicy as e:
        raise InvalidPolicy(f"{where}: {e}") from None


def parse_copy_to(where: str, raw: object) -> tuple[CopyTarget, ...]:
    """The targets of a plan's ``copy_to``: region names, or tables with ``region``,
    ``kms_key_id`` and ``retention`` (checked; a region named twice is refused)."""
    if not isinstance(raw, list | tuple):
        raise InvalidArgument(f"{where}: copy_to is a list of regions")
    targets: list[CopyTarget] = []
    for entry in raw:
        if isinstance(entry, CopyTarget):
            targets.append(entry)
        elif isinstance(entry, str):
            targets.append(CopyTarget(entry))
        elif isinstance(entry, Mapping):
            unknown = sorted(set(entry) - _TARGET_KEYS)
            if unknown or "region" not in entry:
                raise InvalidArgument(
                    f"{where}: a copy_to table has region, kms_key_id, retention "
                    f"(unknown: {unknown})"
                )
            retention = entry.get("retention")
            targets.append(
                CopyTarget(
                    entry["region"],
                    entry.get("kms_key_id"),
                    None if retention is None else parse_retention(where, retention),
                )
            )
        else:
            raise InvalidArgument(f"{where}: a copy_to entry is a region or a table")
    regions = [t.region for t in targets]
    if len(set(regions)) != len(regions):
        raise InvalidArgument(f"{where}: copy_to names a region twice")
    return tuple(targets)


def copy_of(snap: Mapping[str, Any]) -> tuple[str, str] | None:
    """(source region, source snapshot id) of a copy, or None (not a copy, or a tag that
    does not parse: anybody may write tags)."""
    found = _COPY_OF.match(tags_of(dict(snap)).get(COPY_OF_TAG, ""))
    return (found[1], found[2]) if found else None


# -- retention ----------------------------------------------------------------------------


def _backups_view(snaps: list[dict[str, Any]], leftovers: set[str]) -> list[dict[str, Any]]:
    """What the rules see: a completed snapshot that is not a complete backup counts as
    not completed (never removed, never the newest); a set is one entry with its
    ``Members``, completed only when every member is a complete backup and they are as
    many as the set was taken with. Snapshots that an earlier ``forget`` was removing
    are left out, and their ids added to ``leftovers``."""
    seen: list[dict[str, Any]] = []
    sets: dict[str, list[dict[str, Any]]] = {}
    for s in snaps:
        if tags_of(s).get(STATE_TAG) == FORGETTING and set_of(s) is not None:
            leftovers.add(str(s["SnapshotId"]))
        elif (run := set_of(s)) is not None:
            sets.setdefault(run, []).append(s)
        elif s.get("State") != "completed" or is_backup(s):
            seen.append(s)
        else:
            seen.append({**s, "State": "unfinished"})
    for members in sets.values():
        whole = all(is_backup(s) for s in members) and all(
            set_size(s) in (None, len(members)) for s in members
        )
        ids = sorted(str(s["SnapshotId"]) for s in members)
        seen.append(
            {
                "SnapshotId": ids[0],
                "StartTime": min(start_time(s) for s in members),
                "State": "completed" if whole else "unfinished",
                "Members": ids,
            }
        )
    return seen


@dataclass
class ForgetResult:
    """What :func:`forget` decided for each backup, and what it deleted."""

    region: str
    decisions: dict[str, list[Decision]]
    removed: dict[str, list[str]]
    dry_run: bool
    volumes: dict[str, list[str]] = field(default_factory=dict)
    """Kept volumes removed after the snapshots (they no longer held the newest backup)."""

    def as_dict(self) -> dict[str, Any]:
        """The result as a plain dict (``--json``)."""
        return {
            "region": self.region,
            "dry_run": self.dry_run,
            "volumes": self.volumes,
            "backups": {
                name: [
                    {
                        "snapshot_id": d.snapshot_id,
                        "members": list(d.members),
                        "start_time": d.start_time.isoformat(),
                        "keep": d.keep,
                        "reasons": list(d.reasons),
                        "removed": d.snapshot_id in self.removed.get(name, []),
                    }
                    for d in decisions
                ]
                for name, decisions in self.decisions.items()
            },
        }


async def forget(
    m: Manager,
    names: Sequence[str],
    policy: Policy,
    *,
    dry_run: bool = False,
    report: Callable[[str], None] | None = None,
) -> ForgetResult:
    """Apply ``policy`` to backups ``names`` in ``m``'s region (see the module's rules and
    :func:`asyncstage.retention.forget`: every decision reported, deletions by id after
    reading the list again, never the newest complete backup, an unfinished one, or one
    an image uses)."""
    if isinstance(names, str) or not names:
        raise InvalidArgument("forget: name one or more backups")
    if not isinstance(policy, Policy):
        raise InvalidPolicy("forget: a retention Policy is needed")
    removed: dict[str, list[str]] = {}
    volumes: dict[str, list[str]] = {}
    leftovers: dict[str, set[str]] = {}
    say = report or log.info

    def view(name: str) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
        return lambda snaps: _backups_view(snaps, leftovers.setdefault(name, set()))

    async def remove(decision: Decision) -> None:
        if decision.members:  # a set: no longer a backup before its first member goes
            await m.ec2.create_tags(list(decision.members), {STATE_TAG: FORGETTING})
        for snapshot_id in decision.snapshot_ids:
            await m.ec2.delete_snapshot(snapshot_id)

    decisions: dict[str, list[Decision]] = {}
    for name in names:  # one at a time: each name's view gathers its own leftovers
        decisions |= await forget_snapshots(
            m,
            [name],
            policy,
            dry_run=dry_run,
            report=report,
            view=view(name),
            remove=remove,
            on_removed=lambda name, snap: removed.setdefault(name, []).append(snap),
        )
        for snapshot_id in sorted(leftovers.get(name, ())):
            if dry_run:
                say(f"{name}: remove {snapshot_id}: an earlier forget was removing its set")
                continue
            try:
                await m.ec2.delete_snapshot(snapshot_id)
            except NotFound:  # gone meanwhile (a sweep, another forget): as wanted
                continue
            say(f"{name}: removed {snapshot_id} (an earlier forget was removing its set)")
            removed.setdefault(name, []).append(snapshot_id)
        if not dry_run:
            swept = await drop_stale_kept(m, name)
            for volume_id in swept:
                say(f"{name}: removed kept volume {volume_id} (it no longer held the newest)")
            if swept:
                volumes[name] = swept
    return ForgetResult(m.region, decisions, removed, dry_run, volumes)


# -- copies -------------------------------------------------------------------------------


async def check_keys(regions: Mapping[str, Manager], targets: Sequence[CopyTarget]) -> None:
    """Raise :class:`UnknownKmsKey` unless every target's key exists in its region (KMS
    ``DescribeKey`` there): checked before any copy starts."""
    for target in targets:
        if target.kms_key_id is None:
            continue
        dest = _manager_for(regions, target.region)
        async with dest.ec2.service("kms") as kms:
            try:
                await kms.describe_key(KeyId=target.kms_key_id)
            except kms.exceptions.NotFoundException:
                raise UnknownKmsKey(
                    f"copy to {target.region}: KMS key {target.kms_key_id} does not exist "
                    f"in {target.region} (an encrypted copy needs a key of its own region)"
                ) from None
            except Exception as e:
                raise EC2Error(
                    f"copy to {target.region}: cannot check KMS key {target.kms_key_id}: {e}",
                    operation="DescribeKey",
                ) from e


def _manager_for(regions: Mapping[str, Manager], region: str) -> Manager:
    try:
        return regions[region]
    except KeyError:
        raise InvalidArgument(f"copy to {region}: no manager of that region was given") from None


async def copy_backup(src: Manager, dest: Manager, snapshot_id: str, target: CopyTarget) -> str:
    """Copy the complete backup ``snapshot_id`` of ``src``'s region into ``dest``'s; the
    copy's id once completed and marked complete (see the module's rules)."""
    (made,) = await copy_set(src, dest, [snapshot_id], target)
    return made


async def copy_set(
    src: Manager, dest: Manager, snapshot_ids: Sequence[str], target: CopyTarget
) -> list[str]:
    """Copy a backup of one run whole (one snapshot, or a ``snapshot``-mode set) from
    ``src``'s region into ``dest``'s; the copies' ids, in order, once every one is
    completed and all are marked complete in one call. On a failure or cancellation every
    copy started is deleted: no part of a set is ever counted as a backup."""
    if isinstance(snapshot_ids, str) or not snapshot_ids:
        raise InvalidArgument("copy: name the snapshots of one backup run")
    found = {str(s["SnapshotId"]): s for s in await src.ec2.describe_snapshots(snapshot_ids)}
    for snapshot_id in snapshot_ids:
        if snapshot_id not in found or not is_backup(found[snapshot_id]):
            raise InvalidArgument(f"copy: {snapshot_id} is not a complete backup")
    runs = {set_of(found[i]) for i in snapshot_ids}
    sizes = {set_size(found[i]) for i in snapshot_ids} - {None}
    if (len(snapshot_ids) > 1 and (len(runs) != 1 or None in runs)) or sizes - {len(snapshot_ids)}:
        raise InvalidArgument("copy: a set is copied whole, and only its own snapshots")
    options: dict[str, Any] = {}
    if target.kms_key_id is not None:
        options = {"Encrypted": True, "KmsKeyId": target.kms_key_id}
    made: list[str] = []
    try:
        for snapshot_id in snapshot_ids:
            snap = found[snapshot_id]
            tags = tags_of(snap) | {
                OWNER_TAG: dest.key_pair.name,
                STATE_TAG: "pending",
                COPY_OF_TAG: f"{src.region}/{snapshot_id}",
            }
            made.append(
                await dest.ec2.copy_snapshot(
                    snapshot_id,
                    source_region=src.region,
                    description=str(snap.get("Description", "")),
                    tags=tags,
                    **options,
                )
            )
        for new_id in made:
            await dest.ec2.wait_for_snapshot(new_id, timeout=dest.timeouts.snapshot)
        await dest.ec2.create_tags(made, {STATE_TAG: "complete"})
    except BaseException:
        with anyio.CancelScope(shield=True):
            for new_id in made:
                try:
                    await dest.ec2.delete_snapshot(new_id)
                except Exception as e:  # left pending: never a backup; sweep removes it
                    log.warning("copy: could not delete the unfinished copy %s: %s", new_id, e)
        raise
    return made


def run_snapshots(result: Mapping[str, Any]) -> list[str]:
    """The snapshots a backup run made, from its result (``as_dict``): a ``copy``-mode
    run's one, or every snapshot of a ``snapshot``-mode set."""
    found = result.get("snapshots")
    if isinstance(found, Mapping) and found:
        return [str(i) for i in found.values()]
    return [str(result["snapshot_id"])]


async def keep_after(
    m: Manager,
    name: str,
    snapshot_ids: Sequence[str],
    *,
    retention: Policy | None,
    copy_to: Sequence[CopyTarget] = (),
    regions: Mapping[str, Manager] = {},
    phase: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """After a successful backup: copy its new snapshots (one run's: one snapshot, or a
    set) whole to each target (every key checked first), then apply retention in ``m``'s
    region and each target's; what was done, as a plain dict (the run's report)."""
    done: dict[str, Any] = {}
    if copy_to:
        await check_keys(regions, copy_to)
        if phase:
            phase("copy")
        copies: dict[str, list[str]] = {}
        for target in copy_to:
            dest = _manager_for(regions, target.region)
            copies[target.region] = await copy_set(m, dest, snapshot_ids, target)
        done["copies"] = copies
    kept: dict[str, Any] = {}
    places = [(m, retention)] + [
        (_manager_for(regions, t.region), t.retention or retention) for t in copy_to
    ]
    for where, policy in places:
        if policy is None:
            continue
        if phase:
            phase("forget")
        result = await forget(where, [name], policy)
        kept[where.region] = {
            "kept": sum(d.keep for d in result.decisions[name]),
            "removed": result.removed.get(name, []),
        }
    if kept:
        done["retention"] = kept
    return done
