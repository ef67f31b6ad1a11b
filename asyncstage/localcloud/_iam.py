"""A small stand-in for IAM: what each of a local cloud's two credential pairs may call.

Every local cloud makes two pairs (:mod:`._auth`). Its own pair may call everything. The
read-only pair may call only the read actions, as an IAM policy allowing
``ec2:Describe*`` and ``ec2:Get*`` would: anything else is answered with EC2's
``UnauthorizedOperation`` (HTTP 403) and changes nothing. ``DryRun=true`` is answered as
EC2 answers it: ``DryRunOperation`` (HTTP 412) when the call would have been allowed,
``UnauthorizedOperation`` when not; the call itself is not made.

It is not IAM: there are no policies to write, no resource-level conditions and no other
services, only these two fixed sets of permissions.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["READ_ONLY_PREFIXES", "allowed", "refusal"]

READ_ONLY_PREFIXES = ("Describe", "Get")
"""The actions the read-only pair may call: ``ec2:Describe*`` and ``ec2:Get*``."""

UNAUTHORIZED = ("UnauthorizedOperation", "You are not authorized to perform this operation.", 403)
DRY_RUN = ("DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)


def allowed(action: str, *, read_only: bool) -> bool:
    """Whether a pair (read-only or not) may call ``action``."""
    return not read_only or action.startswith(READ_ONLY_PREFIXES)


def refusal(
    action: str, params: Mapping[str, str], *, read_only: bool
) -> tuple[str, str, int] | None:
    """EC2's (code, message, HTTP status) for a call that is not made, else None."""
    if not allowed(action, read_only=read_only):
        return UNAUTHORIZED
    if params.get("DryRun", "").lower() == "true":
        return DRY_RUN
    return None
