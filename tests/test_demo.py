"""The fleet-backup demo: a small run through the real entry point, and a failed check."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncstage import backup, demo

EXE = Path(sys.executable).parent / "asyncstage"

pytestmark = [
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]


def test_small_demo_through_the_command() -> None:
    # 12 servers: more volumes on the vault at once than the 11 names of /dev/sd[f-p]
    done = subprocess.run(
        [str(EXE), "demo", "--servers", "12", "--small"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every sha256 equal to the backup's manifest" in done.stdout
    assert "verification: OK" in done.stdout
    for name in ("web1", "web12"):
        assert f"\n{name} " in done.stdout  # its row in the summary table


def test_a_failed_verification_fails_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    real_check = backup.check

    async def damaged(*args: Any, **kwargs: Any) -> list[backup.CheckResult]:
        """The real check, with its first file reported damaged."""
        (found,) = await real_check(*args, **kwargs)
        hurt = {"path": "file-0000", "error": "content differs"}
        counts = {**found.counts, "damaged": 1}
        return [dataclasses.replace(found, damaged=(hurt,), counts=counts)]

    monkeypatch.setattr(demo.backup, "check", damaged)

    async def main() -> dict[str, Any]:
        return await demo.run_demo(demo.DemoConfig.small(1), quiet=True)

    result = anyio.run(main)
    assert result["ok"] is False
    assert result["verify"]["check"]["counts"]["damaged"] == 1
    assert result["verify"]["check"]["files_read"] == result["verify"]["files"] > 0
    assert [s["step"].split()[0] for s in result["steps"]][-2:] == ["clean", "stop"]
