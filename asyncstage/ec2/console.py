"""What cloud-init prints to an instance's console that we read."""

from __future__ import annotations

__all__ = ["console_fingerprints"]

_FP_BEGIN = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
_FP_END = "-----END SSH HOST KEY FINGERPRINTS-----"


def console_fingerprints(console: str) -> list[str]:
    """The ``SHA256:...`` host key fingerprints cloud-init printed to an instance's console."""
    found: list[str] = []
    inside = False
    for line in console.splitlines():
        text = line.strip()
        if _FP_BEGIN in text:
            inside, found = True, []
            continue
        if _FP_END in text:
            inside = False
            continue
        if inside:
            found.extend(w for w in text.split() if w.startswith("SHA256:"))
    return found
