"""``asyncstage backup forget`` and the other regions of ``backup run`` and ``backup list``.

``asyncstage backup forget NAME... --keep-daily 7 [--dry-run]`` applies a retention policy
to backups by name in the command's region (``--region``), printing every snapshot's
decision and reason; ``backup run PLAN`` opens a manager in each region a plan copies to;
``backup list --copy-region R`` lists that region's backups too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from asyncstage import blocking
from asyncstage.backup.keep import ForgetResult, forget
from asyncstage.backup.plans import BackupOutcome, Plan, PlanReport, run_plan
from asyncstage.cli.backup_options import KEEP_RULES
from asyncstage.cli.common import EXIT_OK, open_manager
from asyncstage.errors import InvalidArgument
from asyncstage.manager import Manager
from asyncstage.output import Output
from asyncstage.retention import InvalidPolicy, Policy

__all__ = [
    "forget_command",
    "plan_regions",
    "policy_of",
    "region_managers",
    "run_plan_in_regions",
]

_COUNT = re.compile(r"^[+-]?\d{1,12}$")


def _count(rule: str, text: str | None) -> int | None:
    """A --keep-N value: a whole number (the policy checks its range), else a typed error."""
    if text is None:
        return None
    if not _COUNT.match(text.strip()):
        raise InvalidPolicy(f"--keep-{rule}: a whole number, not {text!r}")
    return int(text)


def policy_of(args: argparse.Namespace) -> Policy:
    """The policy the --keep-* options give (checked: a typed error for bad values)."""
    options: dict[str, Any] = {
        f"keep_{rule}": _count(rule, getattr(args, f"keep_{rule}")) for rule in KEEP_RULES
    }
    options = {k: v for k, v in options.items() if v is not None}
    if args.keep_within is not None:
        options["keep_within"] = args.keep_within
    return Policy.from_options(**options)


def forget_command(args: argparse.Namespace, out: Output, names: Sequence[str]) -> int:
    """``backup forget NAME...``: every snapshot's decision and reason; deletions."""
    if not names:
        raise InvalidArgument("backup forget: name one or more backups")
    policy = policy_of(args)  # before any call: bad options touch nothing
    say = None if out.json or out.quiet else _print
    with open_manager(args) as m:
        result: ForgetResult = blocking.call(
            forget, m, list(names), policy, dry_run=args.dry_run, report=say
        )
    removed = sum(len(r) for r in result.removed.values())
    doomed = sum(not d.keep for ds in result.decisions.values() for d in ds)
    kept = sum(d.keep for ds in result.decisions.values() for d in ds)
    text = (
        f"forget ({result.region}, dry run): {kept} kept, {doomed} would be removed"
        if args.dry_run
        else f"forget ({result.region}): {kept} kept, {removed} removed"
    )
    out.result(result.as_dict(), text)
    return EXIT_OK


def _print(line: str) -> None:
    print(line, flush=True)  # as it is decided: an interrupted run shows how far it got


def plan_regions(plan: Plan) -> list[str]:
    """Every region the plan's backups copy to, in order."""
    found: list[str] = []
    for b in plan.backups:
        for target in b.copy_to:
            if target.region not in found:
                found.append(target.region)
    return found


@contextlib.contextmanager
def region_managers(
    args: argparse.Namespace, regions: Sequence[str]
) -> Iterator[list[blocking.Manager]]:
    """A manager of each region (the command's options, another region), closed after."""
    with contextlib.ExitStack() as stack:
        managers = []
        for region in regions:
            other = copy.copy(args)
            other.region = region
            managers.append(stack.enter_context(open_manager(other)))
        yield managers


async def run_plan_in_regions(
    m: Manager,
    plan: Plan,
    others: list[Manager],
    on_change: Callable[[BackupOutcome], object] | None = None,
) -> PlanReport:
    """:func:`~asyncstage.backup.run_plan` with ``others``' regions for its copies."""
    return await run_plan(m, plan, on_change=on_change, regions={o.region: o for o in others})
