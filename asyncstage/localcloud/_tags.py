"""Tag look-ups of the local cloud's EC2 backend in time proportional to the answer.

moto finds the tags of one resource (``TaggedEC2Resource.get_tags``, which every tag
filter and every described resource goes through) by matching a pattern against every
tag of every resource in the region. A ``DescribeSnapshots`` with a tag filter then
costs snapshots × all tags, under the engine's lock: with a few hundred backup
snapshots each call took seconds and held every other API call up. EC2 answers such a
call from an index; so does :class:`TagLookups` for the one shape moto asks most,
a single resource id without wildcards, and leaves every other filter to moto.
"""

from __future__ import annotations

from typing import Any

from moto.ec2.models import EC2Backend
from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

__all__ = ["TagLookups"]

_WILDCARDS = frozenset("*?[\\")


class TagLookups(EC2Backend):
    """``describe_tags`` of one literal resource id straight from moto's tag table."""

    def describe_tags(self, filters: dict[str, list[str]] | None = None) -> list[dict[str, str]]:
        ids = (filters or {}).get("resource-id")
        if filters is None or set(filters) != {"resource-id"} or ids is None or len(ids) != 1:
            return list(super().describe_tags(filters))
        (resource_id,) = ids
        if _WILDCARDS.intersection(resource_id):
            return list(super().describe_tags(filters))
        tags: dict[str, Any] = self.tags.get(resource_id) or {}
        kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(resource_id), "")
        return [
            {"resource_id": resource_id, "key": key, "value": value, "resource_type": kind}
            for key, value in tags.items()
        ]
