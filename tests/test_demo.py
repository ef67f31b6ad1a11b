"""The fleet-backup demo: a small run through the real entry point, and a failed check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncstage import demo
from asyncstage.volume import Volume

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
    assert "every sha256 equal to the source's: OK" in done.stdout
    assert "verification: OK" in done.stdout
    for name in ("web1", "web12"):
        assert f"\n{name} " in done.stdout  # its row in the summary table


def test_a_failed_verification_fails_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    real_sums = demo._sums

    async def corrupted(volume: Volume) -> dict[str, str]:
        sums = await real_sums(volume)
        if volume.name == "restore-check":
            first = sorted(sums)[0]
            sums[first] = "0" * 64
        return sums

    monkeypatch.setattr(demo, "_sums", corrupted)

    async def main() -> dict[str, Any]:
        return await demo.run_demo(demo.DemoConfig.small(1), quiet=True)

    result = anyio.run(main)
    assert result["ok"] is False
    assert len(result["verify"]["different"]) == 1
    assert [s["step"].split()[0] for s in result["steps"]][-2:] == ["clean", "stop"]
