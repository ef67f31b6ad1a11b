"""Host keys: the OpenSSH-format ``known_hosts`` file we pin them in, and the policy
for a key that is not pinned yet."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import hashlib
import hmac
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, cast

import asyncssh

from asyncstage.errors import InvalidArgument
from asyncstage.ssh._stamps import StampCache

__all__ = ["HostKeyPolicy", "KnownHosts", "check_policy", "fingerprints", "openssh_key"]

HostKeyPolicy = Literal["strict", "accept-new"]
"""What happens to a host key that is neither pinned nor expected: ``"strict"`` refuses
it, ``"accept-new"`` pins the key first seen."""


def check_policy(policy: str) -> HostKeyPolicy:
    """``policy`` if it is a :data:`HostKeyPolicy`, else InvalidArgument."""
    if policy in ("strict", "accept-new"):
        return cast(HostKeyPolicy, policy)
    raise InvalidArgument(f"host_key_policy: 'strict' or 'accept-new', not {policy!r}")


def _host_spec(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


@functools.lru_cache(maxsize=1024)
def _pattern(pattern: str) -> re.Pattern[str]:
    """An OpenSSH host pattern (``*``, ``?``) as a regular expression, compiled once."""
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    )


def _pattern_matches(pattern: str, spec: str) -> bool:
    return _pattern(pattern).fullmatch(spec.lower()) is not None


def _hosts_match(field: str, spec: str) -> bool:
    """OpenSSH host-field matching: hashed ``|1|salt|hash``, or patterns with ``*``/``?``/``!``."""
    if field.startswith("|1|"):
        try:
            _, _, salt, digest = field.split("|", 3)
            mac = hmac.new(base64.b64decode(salt), spec.encode(), hashlib.sha1).digest()
        except (ValueError, TypeError):
            return False
        return hmac.compare_digest(base64.b64encode(mac).decode(), digest)
    matched = False
    for pattern in field.split(","):
        negated = pattern.startswith("!")
        if _pattern_matches(pattern[1:] if negated else pattern, spec):
            if negated:
                return False
            matched = True
    return matched


def _is_literal(field: str) -> bool:
    """A host field of plain names (``host`` or ``[host]:port``, comma-separated)."""
    return not field.startswith("|") and not any(c in field for c in "*?!")


@dataclass(frozen=True)
class _Entries:
    """A known_hosts file as read: its entries in file order, with the plain names
    indexed (a lookup is then a dict access, not a pattern match per line: a fleet's
    connections each look their address up in a file of the whole fleet)."""

    lines: tuple[str, ...]
    keys: tuple[tuple[str, str], ...]  # (host field, "type base64") per entry
    by_name: dict[str, tuple[int, ...]]  # plain name (lower case) -> entry numbers
    patterned: tuple[int, ...]  # entries with hashed names or patterns
    line_of: tuple[int, ...]  # per entry, its line's number

    @classmethod
    def parse(cls, text: str) -> _Entries:
        lines = tuple(text.splitlines())
        keys: list[tuple[str, str]] = []
        by_name: dict[str, list[int]] = {}
        patterned: list[int] = []
        line_of: list[int] = []
        for at, line in enumerate(lines):
            fields = line.split()
            if len(fields) < 3 or fields[0].startswith(("#", "@")):
                continue
            number = len(keys)
            keys.append((fields[0], f"{fields[1]} {fields[2]}"))
            line_of.append(at)
            if _is_literal(fields[0]):
                for name in fields[0].lower().split(","):
                    by_name.setdefault(name, []).append(number)
            else:
                patterned.append(number)
        return cls(
            lines,
            tuple(keys),
            {name: tuple(numbers) for name, numbers in by_name.items()},
            tuple(patterned),
            tuple(line_of),
        )

    def matching(self, spec: str) -> list[int]:
        """The numbers of the entries for ``spec``, in file order (the plain names from
        the index: only hashed names and patterns are matched one by one)."""
        return sorted(
            {
                *self.by_name.get(spec.lower(), ()),
                *(n for n in self.patterned if _hosts_match(self.keys[n][0], spec)),
            }
        )

    def lookup(self, spec: str) -> list[str]:
        numbers = self.matching(spec)
        found: list[str] = []
        for n in numbers:
            if self.keys[n][1] not in found:
                found.append(self.keys[n][1])
        return found


def key_line(key: str) -> str:
    """``type base64`` of an OpenSSH public key line (comment dropped)."""
    parts = key.split()
    if len(parts) < 2:
        raise InvalidArgument(f"not an OpenSSH public key: {key!r}")
    return f"{parts[0]} {parts[1]}"


def fingerprints(key: asyncssh.SSHKey) -> set[str]:
    """The key's SHA256 (unpadded) and MD5 fingerprints, as ``ssh-keygen -l`` prints them."""
    return {
        key.get_fingerprint("sha256").rstrip("="),
        key.get_fingerprint("md5"),
    }


def openssh_key(key: asyncssh.SSHKey) -> str:
    """``type base64`` of ``key``."""
    return key_line(key.export_public_key("openssh").decode())


class KnownHosts:
    """An OpenSSH-format known_hosts file (also read by the OpenSSH ``ssh`` rsync runs).

    Entries for port 22 are written ``address key``, others ``[address]:port key``,
    exactly as OpenSSH does; hashed entries and patterns are understood when read.
    """

    _locks: ClassVar[dict[Path, threading.Lock]] = {}
    # The file as last read, per path: every KnownHosts of one file shares it (a
    # server's host makes its own).
    _read: ClassVar[StampCache[_Entries]] = StampCache()

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"KnownHosts({str(self.path)!r})"

    def _entries(self) -> _Entries:
        key = os.path.abspath(self.path)
        return self._read.get(key, [key], lambda: _Entries.parse(self._text()))

    def _text(self) -> str:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return ""

    def _forget(self) -> None:
        self._read.forget(os.path.abspath(self.path))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self._locks.setdefault(self.path.resolve(), threading.Lock())
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock, open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            yield

    def lookup(self, address: str, port: int = 22) -> list[str]:
        """The keys pinned for ``address``:``port``, as ``"ssh-ed25519 AAAA..."`` lines."""
        return self._entries().lookup(_host_spec(address, port))

    def add(self, address: str, port: int, public_key: str) -> None:
        """Pin ``public_key`` (``"ssh-ed25519 AAAA..."``) for ``address``:``port``."""
        key = key_line(public_key)
        with self._locked():
            if key in self.lookup(address, port):
                return
            existed = self.path.exists()
            try:
                with open(self.path, "a") as f:
                    if not existed:
                        os.chmod(self.path, 0o600)
                    f.write(f"{_host_spec(address, port)} {key}\n")
            finally:
                self._forget()

    def remove(self, address: str, port: int = 22) -> None:
        """Forget every key pinned for ``address``:``port``."""
        spec = _host_spec(address, port)
        with self._locked():
            # by the index: a fleet's servers each forget their address in a file of the
            # whole fleet, which is not matched line by line each time
            entries = self._entries()
            doomed = {entries.line_of[n] for n in entries.matching(spec)}
            if not doomed:
                return
            keep = [line for at, line in enumerate(entries.lines) if at not in doomed]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(f"{line}\n" for line in keep))
            os.chmod(tmp, 0o600)
            try:
                tmp.replace(self.path)
            finally:
                self._forget()
