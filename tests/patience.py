"""Raw botocore clients that wait out EC2's eventual consistency, as AWS's waiters do.

The realistic local cloud answers ``...NotFound`` for an id just created (for up to
``Realism.consistency``, up to 0.5 s by default). Tests that drive it with plain botocore clients
to check something else (hosts, disks, isolation) make their clients :func:`patient`:
such an answer is retried a few times, briefly, as ``aws ec2 wait instance-exists``
would. The library needs no such help (tests/test_realism_consistency.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aioboto3

NOT_FOUND = frozenset(
    {
        "InvalidInstanceID.NotFound",
        "InvalidVolume.NotFound",
        "InvalidSnapshot.NotFound",
        "InvalidGroup.NotFound",
        "InvalidAMIID.NotFound",
    }
)


def patient(client: Any, *, pause: float = 0.1, attempts: int = 20) -> Any:
    """``client`` (botocore/aioboto3 EC2), retrying ``...NotFound`` for ``pause * attempts`` s."""

    def retry(response: Any = None, attempts: int = 0, **_: Any) -> float | None:
        if response is None:
            return None
        code = response[1].get("Error", {}).get("Code")
        return pause if code in NOT_FOUND and attempts < limit else None

    limit = attempts
    client.meta.events.register("needs-retry.ec2", retry)
    return client


@contextlib.asynccontextmanager
async def patient_client(**session_kwargs: Any) -> AsyncIterator[Any]:
    """An aioboto3 EC2 client (``cloud.session_kwargs()``), :func:`patient`."""
    async with aioboto3.Session().client("ec2", **session_kwargs) as client:
        yield patient(client)
