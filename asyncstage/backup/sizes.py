"""How big a work volume must be."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence

from asyncstage.backup._common import GiB

__all__ = ["data_size", "size_for"]


def data_size(paths: Sequence[str | os.PathLike[str]]) -> int:
    """Bytes the files under local ``paths`` take (apparent sizes, 4 KiB at least each)."""
    total = 0
    for top in paths:
        for root, dirs, files in os.walk(top):
            for name in [*files, *dirs]:
                with contextlib.suppress(OSError):
                    total += max(4096, os.lstat(os.path.join(root, name)).st_size)
        with contextlib.suppress(OSError):
            if not os.path.isdir(top):
                total += max(4096, os.lstat(top).st_size)
    return total


def size_for(nbytes: int, headroom: float = 1.5) -> int:
    """GiB for a volume holding ``nbytes`` with headroom for growth and filesystem overhead."""
    return max(1, math.ceil(nbytes * headroom / GiB + 0.1))
