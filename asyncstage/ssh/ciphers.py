"""The ciphers and key exchange our connections prefer, for asyncssh and OpenSSH alike."""

from __future__ import annotations

import functools
import shutil

import asyncssh

from asyncstage.remote import rsynchelper

__all__ = ["encryption_algs", "openssh_preferences"]


@functools.cache
def encryption_algs() -> list[str]:
    """asyncssh's ciphers, AES-GCM first where the CPU has AES instructions.

    asyncssh does ChaCha20-Poly1305 partly in Python per packet, AES-GCM in OpenSSL at
    once (benchmarks/README.md compares the two). Elsewhere asyncssh's own order stands.
    """
    algs = [a.decode() for a in asyncssh.encryption.get_encryption_algs()]
    if not rsynchelper.has_aes():
        return algs
    gcm = [a for a in rsynchelper.GCM if a in algs]
    return gcm + [a for a in algs if a not in gcm]


@functools.cache
def openssh_preferences() -> tuple[str, ...]:
    """``-o`` options that make the local OpenSSH ``ssh`` prefer what our asyncssh
    connections use: the key exchange (:data:`rsynchelper.FAST_KEX`) and, on CPUs with
    AES instructions, AES-GCM, moved to the front of its own defaults (read once with
    ``ssh -G``). Host -> host legs get the same from the source host's ``ssh``
    (``rsynchelper linkdir``)."""
    ssh = shutil.which("ssh")
    if ssh is None:
        return ()
    gcm = tuple(a for a in encryption_algs() if "-gcm@" in a)
    return tuple(rsynchelper.openssh_preferences(ssh, ciphers=gcm))
