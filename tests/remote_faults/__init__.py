"""Faults injected into the remote scripts, for the tests that prove they are caught.

A fault is a real Python file of this package, appended to a script's text
(after its definitions, before the call of its ``main``) by replacing
:func:`asyncstage.remote.source` for the test: the shipped script itself is never
edited, and the fault patches it at the Python level (``import __main__``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncstage import remote


def inject(monkeypatch: pytest.MonkeyPatch, script: str, fault: str) -> None:
    """Make ``script`` (``"blockcopy"``, ``"rsynchelper"``) run with fault file ``fault``."""
    text = (Path(__file__).parent / f"{fault}.py").read_text()
    original = remote.source

    def faulty(name: str) -> str:
        return original(name) + ("\n" + text if name == script else "")

    monkeypatch.setattr(remote, "source", faulty)
