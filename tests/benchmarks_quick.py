"""What the quick-mode benchmark smoke tests share: the script groups, the run, the checks.

The benchmark scripts run in groups, one test module each (``test_benchmarks_quick*.py``):
with ``--dist loadscope`` a module goes whole to one worker, so the groups run in
parallel workers instead of one long module holding one worker for every script. Each
group's scripts run one at a time: the workers already share the machine's cores.
A script that no group names runs in the module of the rest, so a new benchmark is
covered the day it is registered in ``run_all.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "GROUPS",
    "SCRIPTS",
    "against_baseline",
    "check_group_results",
    "group",
    "load",
    "marks",
    "positive",
    "results_of",
]

ROOT = Path(__file__).resolve().parent.parent


def _scripts() -> list[str]:
    """run_all.py's list of benchmarks (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.SCRIPTS)


SCRIPTS = _scripts()

# Groups of about one minute each on an idle machine (quick mode); "rest" is every
# script not named here.
GROUPS: dict[str, list[str]] = {
    "baselines": ["perl", "fabric", "pyinfra"],
    "fleets": ["fleet", "fleet_ec2", "scale", "demo"],
    "backups": ["backup", "keep", "check"],
}


def group(name: str) -> list[str]:
    """The registered scripts of group ``name`` (``"rest"``: those of no other group)."""
    if name == "rest":
        named = {s for scripts in GROUPS.values() for s in scripts}
        return [s for s in SCRIPTS if s not in named]
    return [s for s in GROUPS[name] if s in SCRIPTS]


def marks(timeout: float = 420) -> list[pytest.MarkDecorator]:
    """A group module's marks: its first test waits for the whole group's quick runs."""
    return [
        pytest.mark.localcloud,
        pytest.mark.slow,
        pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
        pytest.mark.timeout(timeout),
    ]


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _failures(stdout: str) -> str:
    """The output of each script that failed (run_all prints a script's output before its
    '=== NAME: FAILED' line), its last lines."""
    shown, block = [], []
    for line in stdout.splitlines():
        block.append(line)
        if line.startswith("=== ") and ": starting" not in line:
            if "FAILED" in line:
                shown += block[-40:]
            block = []
    return "\n".join(shown) or stdout[-4000:]


def results_of(name: str) -> Callable[..., Path]:
    """A module fixture ``results``: the directory where group ``name``'s quick runs wrote."""

    @pytest.fixture(scope="module")
    def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
        out = tmp_path_factory.mktemp(f"bench-{name}")
        argv = [str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--jobs", "1"]
        done = subprocess.run(
            [sys.executable, *argv, "--only", ",".join(group(name)), "--results", str(out)],
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
        failed = done.stderr.rpartition("failed: ")[2]
        assert done.returncode == 0, f"failed: {failed}\n" + _failures(done.stdout)
        return out

    return results


def load(results: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((results / f"{name}.json").read_text())
    assert data["benchmark"] == name
    assert data["quick"] is True
    assert data["machine"]["cpus"] >= 1
    assert set(data["load"]) >= {"start", "end"}
    for t in data["targets"]:
        assert set(t) >= {"name", "value", "op", "limit", "met", "what"}
        assert isinstance(t["met"], bool)
        if t.get("spread") is not None:  # [lowest, highest] round beside the median
            lo, hi = t["spread"]
            assert lo <= hi
        if t["value"] is None:  # a baseline could not run the step: it says why
            assert t["met"] is False and t["not_run"]
    return data


def check_group_results(results: Path, name: str) -> None:
    """Every script of the group wrote sane JSON; the summary covers every registered
    script (those of other groups as rows without results) and says what decides each."""
    for script in group(name):
        load(results, script)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["failed"] == []
    assert {t["benchmark"] for t in summary["targets"]} == set(SCRIPTS)
    for t in summary["targets"]:  # every target says what decides it, and shows it
        assert isinstance(t["bound"], str) and t["bound"]
        assert isinstance(t["evidence"], str) and t["evidence"]
    missing = "no results in this directory"  # run_all's row for a script without JSON
    mine = [t for t in summary["targets"] if t["benchmark"] in group(name)]
    assert mine and not [t for t in mine if t.get("not_run") == missing]
    assert "| benchmark |" in (results / "summary.md").read_text()


def against_baseline(figures: dict[str, Any], baseline: str) -> None:
    """asyncstage's figure is sane; the baseline's too, or it says why it did not run."""
    assert positive(figures["asyncstage_s"])
    assert len(figures["asyncstage_runs_s"]) >= 1
    if figures[f"{baseline}_s"] is None:
        assert figures["ratio"] is None
        assert isinstance(figures["not_run"], str) and figures["not_run"]
    else:
        assert positive(figures[f"{baseline}_s"]) and positive(figures["ratio"])
