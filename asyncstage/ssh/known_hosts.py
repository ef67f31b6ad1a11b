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
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import ClassVar, Literal, cast

import asyncssh

from asyncstage.errors import InvalidArgument
from asyncstage.ssh._stamps import StampCache, file_stamp

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


class _Entries:
    """A known_hosts file as read: its entries in file order, with the plain names
    indexed (a lookup is then a dict access, not a pattern match per line: a fleet's
    connections each look their address up in a file of the whole fleet).

    Our own writes change it in place (:meth:`append`, :meth:`drop`) rather than have
    the file read and parsed again: a fleet's servers each pin their key in, and at
    termination drop it from, a file of the whole fleet."""

    def __init__(self, lines: list[str]) -> None:
        self.lines: list[str | None] = []  # None: a line dropped by one of our writes
        self.keys: list[tuple[str, str]] = []  # (host field, "type base64") per entry
        self.by_name: dict[str, list[int]] = {}  # plain name (lower case) -> entry numbers
        self.patterned: list[int] = []  # entries with hashed names or patterns
        self.line_of: list[int] = []  # per entry, its line's index in ``lines``
        self.gone: set[int] = set()  # entries dropped
        self.open_end = False  # the text read did not end its last line
        self.size = 0  # the file's size in bytes, as read or as we wrote it
        self.version = 0  # changes made by our writes
        for line in lines:
            self.append(line)

    @classmethod
    def parse(cls, text: str) -> _Entries:
        entries = cls(text.splitlines())
        entries.open_end = bool(text) and not text.endswith("\n")
        entries.size = len(text.encode())
        return entries

    def append(self, line: str) -> None:
        """Take in one more line of the file."""
        at = len(self.lines)
        self.lines.append(line)
        self.version += 1
        fields = line.split()
        if len(fields) < 3 or fields[0].startswith(("#", "@")):
            return
        number = len(self.keys)
        self.keys.append((fields[0], f"{fields[1]} {fields[2]}"))
        self.line_of.append(at)
        if _is_literal(fields[0]):
            for name in fields[0].lower().split(","):
                self.by_name.setdefault(name, []).append(number)
        else:
            self.patterned.append(number)

    def drop(self, numbers: Collection[int]) -> None:
        """Forget these entries and their lines."""
        self.version += 1
        for n in numbers:
            self.lines[self.line_of[n]] = None
        self.gone.update(numbers)
        for name in {name for n in numbers for name in self.keys[n][0].lower().split(",")}:
            kept = [n for n in self.by_name.get(name, ()) if n not in self.gone]
            if kept:
                self.by_name[name] = kept
            else:
                self.by_name.pop(name, None)
        if any(n in self.gone for n in self.patterned):
            self.patterned = [n for n in self.patterned if n not in self.gone]

    def text(self) -> str:
        """The file's text as these lines make it (each line ended)."""
        return "".join(f"{line}\n" for line in self.lines if line is not None)

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
    def _rewriting(self) -> Iterator[_Entries]:
        """The file's entries, for one write of ours (under the lock) to change in place
        as it changes the file: kept as the file's after it when nobody else wrote the
        file since it was read, else read again at the next use."""
        key = os.path.abspath(self.path)
        entries = self._entries()
        read = self._read.stamps(key) == (file_stamp(key),)
        try:
            yield entries
        except BaseException:
            self._forget()
            raise
        self._read.put(key, [key], entries)
        (after,) = self._read.stamps(key) or (None,)
        if not read or (0 if after is None else after[2]) != entries.size:
            self._forget()  # not the file as read (or not as we wrote it): read it again

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
        spec = _host_spec(address, port)
        if key in self._entries().lookup(spec):
            return  # pinned already: the file's lock is not taken
        with self._locked(), self._rewriting() as entries:
            if key in entries.lookup(spec):
                return
            existed = self.path.exists()
            with open(self.path, "a") as f:
                if not existed:
                    os.chmod(self.path, 0o600)
                line = f"{spec} {key}"
                # a last line left without its end (edited by hand) is ended first,
                # not joined to ours
                end = "\n" if entries.open_end else ""
                f.write(f"{end}{line}\n")
            entries.append(line)
            entries.open_end = False
            entries.size += len(f"{end}{line}\n".encode())

    def remove(self, address: str, port: int = 22) -> None:
        """Forget every key pinned for ``address``:``port``."""
        spec = _host_spec(address, port)
        read = self._entries()
        version, doomed = read.version, read.matching(spec)
        if not doomed:
            return  # none pinned (a new server's address): the file's lock is not taken
        with self._locked(), self._rewriting() as entries:
            # by the index: a fleet's servers each forget their address in a file of the
            # whole fleet, which is not matched line by line each time
            if entries is not read or entries.version != version:  # changed meanwhile
                doomed = entries.matching(spec)
            if not doomed:
                return
            entries.drop(doomed)
            text = entries.text().encode()
            entries.size = len(text)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(text)
            os.chmod(tmp, 0o600)
            tmp.replace(self.path)
