"""Files read again only when they changed: a cache keyed by the files' stamps."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["StampCache", "file_stamp"]

T = TypeVar("T")

_MAX_ENTRIES = 64  # many files (tests): keep the cache small


def file_stamp(path: str) -> tuple[int, ...] | None:
    """Inode, device, size and times of ``path``; None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class StampCache(Generic[T]):
    """What was made of some files, made again only when one of their stamps changed
    (its inode, size or times)."""

    def __init__(self) -> None:
        self._entries: dict[object, tuple[tuple[tuple[int, ...] | None, ...], T]] = {}

    def get(self, key: object, files: Sequence[str], make: Callable[[], T]) -> T:
        """The value for ``key``, from ``make()`` when ``files`` changed since it was made."""
        stamps = tuple(file_stamp(name) for name in files)
        cached = self._entries.get(key)
        if cached is not None and cached[0] == stamps:
            return cached[1]
        value = make()
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = (stamps, value)
        return value

    def put(self, key: object, files: Sequence[str], value: T) -> None:
        """Keep ``value`` for ``key`` as made of ``files`` as they are now (what a write
        of ours made of them, kept without reading them again)."""
        if key not in self._entries and len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = (tuple(file_stamp(name) for name in files), value)

    def stamps(self, key: object) -> tuple[tuple[int, ...] | None, ...] | None:
        """The files' stamps when ``key``'s value was made (None: no value)."""
        cached = self._entries.get(key)
        return None if cached is None else cached[0]

    def __getitem__(self, key: object) -> T:
        """The value last made for ``key`` (KeyError when there is none)."""
        return self._entries[key][1]

    def forget(self, key: object) -> None:
        """Drop ``key``'s value (after a write of ours: a rewrite may keep the same
        inode, size and times on coarse clocks)."""
        self._entries.pop(key, None)
