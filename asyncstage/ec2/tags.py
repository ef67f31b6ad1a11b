"""Our tags on EC2 resources: their names and how to read and filter by them."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CLIENT_TOKEN_TAG",
    "TAG_PREFIX",
    "new_client_token",
    "tag",
    "tag_filters",
    "tag_list",
    "tags_of",
]

TAG_PREFIX = "asyncstage:"
"""Prefix of every tag asyncstage writes (``asyncstage:role``, ``asyncstage:name`` ...)."""


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


def tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    """``TagSpecifications``' form of ``tags``."""
    return [{"Key": k, "Value": v} for k, v in tags.items()]
