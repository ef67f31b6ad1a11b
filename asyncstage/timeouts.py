"""Timeouts: every timing knob of a Manager in one frozen object (like httpx's ``Timeout``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Timeouts", "timeouts_from"]


@dataclass(frozen=True)
class Timeouts:
    """How long a Manager waits, in seconds.

    ``Manager(server_timeout=...)`` and the other keyword arguments fill it in;
    read them back as ``manager.timeouts.server`` ...
    """

    server: float = 120.0
    """For servers to come up (running and answering ssh); stopping and terminating get 3x."""
    volume: float = 120.0
    """For volumes to become available, attach, detach and appear as block devices."""
    snapshot: float = 1800.0
    """For snapshots and image copies to complete."""
    exit: float = 600.0
    """For ``on_exit`` (stop or terminate) when the manager closes."""
    poll_interval: float = 1.0
    """The first pause between two polls of EC2 in a wait (pauses grow from there)."""
    launch_window: float = 0.05
    """How long a launch waits for concurrent equal launches to share its RunInstances call."""
    console: float = 600.0
    """For host key fingerprints on a new server's console (from its launch; EC2 takes
    minutes); then ``Manager(host_key_policy=...)`` decides. A bound of its own: it may
    outlast ``server``, because a server is up only once its host key is settled."""
    consistency: float = 60.0
    """How long after a create EC2 may still answer ``...NotFound`` for the new id (eventual
    consistency): such answers are retried within it, for the ids this client created."""

    @property
    def stop(self) -> float:
        """For servers to stop or terminate: three times ``server``."""
        return self.server * 3


def timeouts_from(base: Timeouts | None, **given: float | None) -> Timeouts:
    """``base`` (default: :class:`Timeouts`' defaults) with the timings ``given`` (those
    not None) put in: ``Manager(timeouts=..., server_timeout=...)``."""
    return replace(base or Timeouts(), **{k: v for k, v in given.items() if v is not None})
