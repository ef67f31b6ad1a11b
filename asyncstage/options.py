"""The keyword arguments that several calls share, each set declared once.

``get_server`` and ``provision_server(s)`` take :class:`ServerOptions` (the launch ones
also :class:`~asyncstage.capacity.LaunchChoices`); ``provision_volume`` and
``get_volume`` of a Manager take :class:`VolumeOptions` (the options of
:meth:`Server.provision_volume <asyncstage.Server.provision_volume>`) and
:class:`NewVolumeOptions`. A keyword that is not
one of them is a ``TypeError``, as for any function (:func:`check_keys`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypedDict

from asyncstage.capacity import LaunchChoices

if TYPE_CHECKING:
    from asyncstage.jumps import JumpSpec

__all__ = ["NewVolumeOptions", "ProvisionOptions", "ServerOptions", "VolumeOptions", "check_keys"]


class ServerOptions(TypedDict, total=False):
    """How a server is launched and reached, where it must be made (each None: the
    manager's setting)."""

    instance_type: str | None
    image: str | None
    """An image id or a name pattern."""
    availability_zone: str | None
    username: str | None
    """The login user (checked as a user name)."""
    architecture: str | None
    timeout: float | None
    """How long to wait until it is up (None: the manager's ``timeouts.server``)."""
    jump_host: JumpSpec | None
    """Reach it through this one (:attr:`Server.jump_host <asyncstage.Server.jump_host>`)."""


class ProvisionOptions(ServerOptions, LaunchChoices, total=False):
    """What ``provision_server(s)`` take: :class:`ServerOptions` and the fallbacks of
    :class:`~asyncstage.capacity.LaunchChoices`."""


class NewVolumeOptions(TypedDict, total=False):
    """What a volume is made as, and where it is mounted: ``get_volume`` of a Manager."""

    size: int | None
    fstype: str | None
    mtpt: str | None
    mount: str | None
    availability_zone: str | None


class VolumeOptions(NewVolumeOptions, total=False):
    """The options of :meth:`Server.provision_volume <asyncstage.Server.provision_volume>`
    (see there); a Manager also picks the server, in ``availability_zone``."""

    volume_id: str | None
    snapshot_id: str | None
    reuse: bool | None
    label: str | None
    uuid: str | None


def check_keys(options: Mapping[str, object], allowed: Any, call: str) -> None:
    """``TypeError`` for a keyword of ``options`` that the TypedDict ``allowed`` lacks."""
    unknown = sorted(set(options) - set(allowed.__optional_keys__ | allowed.__required_keys__))
    if unknown:
        raise TypeError(f"{call}() got an unexpected keyword argument {unknown[0]!r}")
