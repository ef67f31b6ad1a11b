"""An instance's machine: its host and what the engine knows about it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from asyncstage.localcloud._hosts import Host
from asyncstage.localcloud._network import Placement

__all__ = ["Machine"]


@dataclass
class Machine:
    """An instance's host and what the engine knows about it."""

    host: Host
    nitro: bool = True  # NVMe device names (else Xen's xvd names)
    wanted: str = "running"  # running | stopped | terminated
    ready: bool = False  # booted: its /dev takes device nodes
    prepared: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    op_lock: threading.Lock = field(default_factory=threading.Lock)
    boots: int = 0  # counts boots: a pending-time timer of an earlier boot does nothing
    # GetConsoleOutput shows this boot's output only from these (monotonic) times on;
    # before, what earlier boots wrote (``console_shown`` characters)
    console_at: float = 0.0
    console_latest_at: float = 0.0  # with Latest=True (Nitro types only)
    console_shown: int = 0
    launched: float = field(default_factory=time.monotonic)  # the last launch or start
    placement: Placement | None = None  # its VPC and subnet (network="vpc")
