"""KMS as EC2's encryption needs it: per-region keys on the cloud's one endpoint.

Requests signed for the ``kms`` service (SigV4's credential scope) go to moto's KMS app,
in the region of the scope: ``CreateKey``, ``DescribeKey``, ``CreateAlias``,
``ListAliases`` ... The keys are the ones moto's EC2 uses for ``alias/aws/ebs`` and
encrypted volumes, so a key made here can encrypt a copy in its region (and only there).
The read-only pair may call ``Describe*``, ``Get*`` and ``List*``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from moto.kms.exceptions import NotFoundException
from moto.kms.models import kms_backends
from moto.moto_server.werkzeug_app import create_backend_app

__all__ = ["READ_ONLY_PREFIXES", "action_of", "key_arn", "make_kms_app"]

READ_ONLY_PREFIXES = ("Describe", "Get", "List")
_TARGET = "TrentService."

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def make_kms_app() -> WSGIApp:
    """moto's KMS app (JSON protocol, ``X-Amz-Target: TrentService.Action``)."""
    app: WSGIApp = create_backend_app("kms")
    return app


def action_of(environ: dict[str, Any]) -> str:
    """The KMS action of a request (``CreateKey`` ...), or ``""``."""
    target = str(environ.get("HTTP_X_AMZ_TARGET", ""))
    return target.removeprefix(_TARGET) if target.startswith(_TARGET) else ""


def key_arn(account: str, region: str, key: str) -> str | None:
    """The ARN of ``key`` (an id, ARN, alias or alias ARN) in ``region``, or None when the
    region has no such key (a key of another region is not there)."""
    if key.startswith("arn:") and key.split(":")[3:4] != [region]:
        return None
    try:
        found = kms_backends[account][region].describe_key(key)
    except (NotFoundException, LookupError, AttributeError, TypeError):
        return None  # moto's lookups of an unknown id or alias fail in these ways
    return str(found.arn)
