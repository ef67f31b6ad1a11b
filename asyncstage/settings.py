"""Choices a Manager is configured with, each with its values and its check in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast, get_args

from asyncstage.errors import InvalidArgument

__all__ = ["LOCAL_CREDENTIALS", "ON_EXIT", "OnExit", "check_on_exit", "local_credentials"]

OnExit = Literal["stop", "terminate", "run"]
"""What a Manager does with the servers it started when it closes."""

ON_EXIT: tuple[str, ...] = get_args(OnExit)


def check_on_exit(value: str, where: str = "on_exit") -> OnExit:
    """``value`` if it is an :data:`OnExit`, else InvalidArgument naming ``where``."""
    if value in ON_EXIT:
        return cast(OnExit, value)
    raise InvalidArgument(f"{where} must be one of {', '.join(ON_EXIT)}, not {value!r}")


LOCAL_CREDENTIALS = {
    "aws_access_key_id": "asyncstage-local",
    "aws_secret_access_key": "asyncstage-local",
}
"""The fixed credentials of a local cloud that does not check signatures (a test's)."""


def local_credentials(found: Mapping[str, Any]) -> dict[str, str]:
    """A local cloud's credentials: those ``found`` in its session or record (the cloud
    checks every request's signature), else :data:`LOCAL_CREDENTIALS`."""
    return {key: str(found.get(key, default)) for key, default in LOCAL_CREDENTIALS.items()}
