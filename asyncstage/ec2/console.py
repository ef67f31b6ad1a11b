"""What cloud-init prints to an instance's console that we read."""

from __future__ import annotations

__all__ = ["CONSOLE_READS", "console_fingerprints"]

CONSOLE_READS = 24
"""GetConsoleOutput calls in flight at once per client: enough to spend EC2's burst of
the action's bucket (100) within a second at 0.2 s a call; the rate after it is the
bucket's (:mod:`~asyncstage.ec2.rate`). The client's connection pool has room for
them beside its other calls."""

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
