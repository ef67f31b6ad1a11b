"""Listings by the values of one tag, shared by concurrent callers (the rounds of
:meth:`SharedRounds.tagged <asyncstage.ec2.rounds.SharedRounds.tagged>`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from asyncstage.ec2.client import FILTER_CHUNK, Client, chunks
from asyncstage.ec2.rounds import Resource

__all__ = ["describe_tagged_shared"]


async def describe_tagged_shared(
    client: Client,
    kind: Literal["volumes", "snapshots"],
    key: str,
    value: str,
    *,
    filters: Sequence[Mapping[str, Any]] = (),
) -> list[Resource]:
    """Volumes or our own snapshots whose tag ``key`` is ``value`` (and ``filters``).

    Callers asking within the client's ``coalesce_window`` for the same kind, key and
    filters share one describe that asks for all their values (200 a call, EC2's most for
    a filter): a fleet's backups, listing each its own at the same moment, make one
    call, not one each.
    """
    describe = client.describe_volumes if kind == "volumes" else client.describe_snapshots

    async def fetch(values: list[str]) -> list[Resource]:
        found: list[Resource] = []
        for chunk in chunks(values, FILTER_CHUNK):
            found += await describe(filters=[*filters, {"Name": f"tag:{key}", "Values": chunk}])
        return found

    rest = tuple((str(f["Name"]), tuple(map(str, f["Values"]))) for f in filters)
    return await client.rounds.tagged((kind, key, rest), key, value, fetch, client.coalesce_window)
