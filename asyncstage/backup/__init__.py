"""Incremental backups into named snapshots, and restores from them.

A backup named ``NAME`` is a series of EBS snapshots tagged with that name, newest
first (``Manager.snapshots(NAME)``), of which only those marked complete count.

- :mod:`~asyncstage.backup.sources`: what may be backed up (local paths, ``SERVER:/path``,
  ``user@host:/path``, ``VOLUME:/sub``) and where each lands in the snapshot;
- :mod:`~asyncstage.backup.copy`: one run in ``copy`` mode (:func:`backup`);
- :mod:`~asyncstage.backup.snapshot_mode`: ``snapshot`` mode, a server's own volumes at
  one instant (:func:`snapshot_backup`);
- :mod:`~asyncstage.backup.runs`, :mod:`~asyncstage.backup.lease`,
  :mod:`~asyncstage.backup.sweep`: runs, the one-run-at-a-time lease on EC2, and the
  removal of what dead runs left;
- :mod:`~asyncstage.backup.hooks`: ``pre``/``post`` consistency hooks per source;
- :mod:`~asyncstage.backup.snapshots`: which snapshots are complete backups;
- :mod:`~asyncstage.backup.plans`: plans of many backups run at once (:func:`run_plan`);
- :mod:`~asyncstage.backup.restore`: restores (:func:`restore`, :func:`restore_volumes`,
  :func:`snapshot_volume`).
- :mod:`~asyncstage.backup.manifest`, :mod:`~asyncstage.backup.check`: each backup's
  manifest of every file, and checks of snapshots and restores against it (:func:`check`).
- :mod:`~asyncstage.backup.keep`: retention by name (:func:`forget`) and copies in other
  regions (:class:`CopyTarget`, :func:`copy_backup`).

Safety rules: see ``docs/backup.md``.
"""

from __future__ import annotations

from asyncstage.backup.check import CheckResult, check
from asyncstage.backup.copy import DEFAULT_TTL, BackupResult, backup
from asyncstage.backup.hooks import Hook, Hooked, HookFailed
from asyncstage.backup.keep import CopyTarget, ForgetResult, UnknownKmsKey, copy_backup, forget
from asyncstage.backup.plans import (
    BackupOutcome,
    Plan,
    PlannedBackup,
    PlanReport,
    load_plan,
    parse_plan,
    run_plan,
)
from asyncstage.backup.restore import (
    RestoreResult,
    check_destination,
    pick_set,
    restore,
    restore_volumes,
    snapshot_volume,
)
from asyncstage.backup.runs import RunInfo
from asyncstage.backup.sizes import data_size, size_for
from asyncstage.backup.snapshot_mode import SnapshotSetResult, snapshot_backup
from asyncstage.backup.sources import Source
from asyncstage.backup.sweep import SweepResult, sweep

__all__ = [
    "DEFAULT_TTL",
    "BackupOutcome",
    "BackupResult",
    "CheckResult",
    "CopyTarget",
    "ForgetResult",
    "Hook",
    "HookFailed",
    "Hooked",
    "Plan",
    "PlanReport",
    "PlannedBackup",
    "RestoreResult",
    "RunInfo",
    "SnapshotSetResult",
    "Source",
    "SweepResult",
    "UnknownKmsKey",
    "backup",
    "check",
    "check_destination",
    "copy_backup",
    "data_size",
    "forget",
    "load_plan",
    "parse_plan",
    "pick_set",
    "restore",
    "restore_volumes",
    "run_plan",
    "size_for",
    "snapshot_backup",
    "snapshot_volume",
    "sweep",
]
