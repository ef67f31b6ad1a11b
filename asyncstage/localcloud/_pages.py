"""DescribeInstances in pages of instances.

EC2's ``MaxResults`` (5 to 1000; not with instance ids) bounds the items of a page and
``NextToken`` leads to the next (a page may hold fewer: callers follow the token). The
cloud counts instances, a reservation whose instances do not fit on one page going on
over the next ones, so that a fleet's answer comes in pages at all. moto counts
reservations instead (a fleet launched by one RunInstances call is one page,
whatever ``MaxResults`` asks) and takes a reservation's id for a token. So the cloud
pages itself: moto gets the request without its token and asks for the largest page
(:func:`page_asked` rewrites the parameters), the backend cuts its filtered
reservations down to the page's instances before moto renders them (:func:`cut`), and
the next page's token is added to moto's answer (:func:`with_token`). The instances go
in the order of their ids; a token names the last one of its page, so that the next
page starts after it even when that instance has left the filter's answer since.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

SIZES = (5, 1000)
"""The page sizes EC2 accepts in ``MaxResults``."""

_INSTANCE_ID = re.compile(r"InstanceId\.\d+")
_ID = re.compile(r"i-[0-9a-f]+")


class PageRefused(ValueError):
    """A ``MaxResults`` or ``NextToken`` EC2 refuses (``InvalidParameterValue``)."""


@dataclass(frozen=True)
class Page:
    """The page a DescribeInstances asks for: at most ``size`` instances after ``after``."""

    size: int
    after: str = ""


def page_asked(action: str, params: dict[str, str]) -> Page | None:
    """The page a request asks for (None: not a paged DescribeInstances), its token taken
    out of ``params`` and its size there made the largest (moto cuts nothing then)."""
    if action != "DescribeInstances" or not ({"MaxResults", "NextToken"} & params.keys()):
        return None
    if any(_INSTANCE_ID.fullmatch(key) for key in params):
        return None  # moto refuses MaxResults with ids, as EC2 does; a token alone is moot
    asked = params.get("MaxResults") or str(SIZES[1])
    try:
        size = int(asked)
    except ValueError:
        raise PageRefused(f"Invalid value for parameter maxResults: {asked}") from None
    if not SIZES[0] <= size <= SIZES[1]:
        raise PageRefused(
            f"Value ( {size} ) for parameter maxResults is invalid. "
            f"Expecting a value between {SIZES[0]} and {SIZES[1]}."
        )
    token = params.pop("NextToken", "")
    params["MaxResults"] = str(SIZES[1])
    return Page(size, _after(token) if token else "")


def _after(token: str) -> str:
    try:
        after = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError):
        after = ""
    if not _ID.fullmatch(after):
        raise PageRefused(f"Invalid NextToken: {token}")
    return after


def cut(reservations: Sequence[Any], page: Page) -> tuple[list[Any], str | None]:
    """moto's filtered reservations (its copies) cut down to the instances of ``page``,
    and the token of the next page (None: this was the last)."""
    ids = sorted(i.id for r in reservations for i in r.instances if i.id > page.after)
    kept = set(ids[: page.size])
    out = []
    for reservation in reservations:
        mine = [i for i in reservation.instances if i.id in kept]
        if mine:
            reservation.instances = mine
            out.append(reservation)
    if len(ids) <= page.size:
        return out, None
    return out, base64.urlsafe_b64encode(ids[page.size - 1].encode()).decode()


def with_token(body: bytes, token: str | None) -> bytes:
    """moto's DescribeInstances answer with the next page's token, as EC2 gives it."""
    if token is None:
        return body
    closing = b"</DescribeInstancesResponse>"
    return body.replace(closing, f"<nextToken>{escape(token)}</nextToken>".encode() + closing, 1)
