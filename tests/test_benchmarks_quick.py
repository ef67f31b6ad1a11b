"""Smoke test: the benchmark scripts run in quick mode and write sane JSON.

Never asserts timings or ratios against targets: the machines are shared and noisy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _scripts() -> list[str]:
    """run_all.py's list of benchmarks (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.SCRIPTS)


SCRIPTS = _scripts()

pytestmark = [
    pytest.mark.localcloud,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
    pytest.mark.timeout(660),  # the first test waits for every quick run (below)
]


def _positive(value: Any) -> bool:
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


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    # two scripts at a time: the suite's other workers share the machine's cores
    argv = [str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--jobs", "2"]
    done = subprocess.run(
        [sys.executable, *argv, "--results", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    failed = done.stderr.rpartition("failed: ")[2]
    assert done.returncode == 0, f"failed: {failed}\n" + _failures(done.stdout)
    return out


def _load(results: Path, name: str) -> dict[str, Any]:
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


def _against_baseline(figures: dict[str, Any], baseline: str) -> None:
    """asyncstage's figure is sane; the baseline's too, or it says why it did not run."""
    assert _positive(figures["asyncstage_s"])
    assert len(figures["asyncstage_runs_s"]) >= 1
    if figures[f"{baseline}_s"] is None:
        assert figures["ratio"] is None
        assert isinstance(figures["not_run"], str) and figures["not_run"]
    else:
        assert _positive(figures[f"{baseline}_s"]) and _positive(figures["ratio"])


def test_every_script_wrote_its_results(results: Path) -> None:
    for name in SCRIPTS:
        _load(results, name)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["failed"] == []
    assert {t["benchmark"] for t in summary["targets"]} == set(SCRIPTS)
    for t in summary["targets"]:  # every target says what decides it, and shows it
        assert isinstance(t["bound"], str) and t["bound"]
        assert isinstance(t["evidence"], str) and t["evidence"]
    assert "| benchmark |" in (results / "summary.md").read_text()


def test_fleet(results: Path) -> None:
    r = _load(results, "fleet")["results"]
    sizes = [c["n"] for c in r["concurrent"]]
    assert sizes[0] == 1 and len(sizes) >= 2
    for c in r["concurrent"]:
        assert _positive(c["wall_s"])
        assert c["answered_ssh"] == c["n"]
        assert c["api_calls"]["RunInstances"] == 1
        assert c["describe_rounds"] >= 1 and c["describe_calls_per_round"] >= 1
    for s in r["serial"]:
        assert _positive(s["wall_s"])
    assert [f["n"] for f in r["fixed_poll_interval"]] == [sizes[0], sizes[-1]]


def test_fleet_ec2(results: Path) -> None:
    data = _load(results, "fleet_ec2")
    runs = data["results"]["runs"]
    assert [r["n"] for r in runs] == data["params"]["order"]
    for r in runs:
        assert r["answered_ssh"] == r["n"] and r["api_calls"]["RunInstances"] == 1
        # the pending time holds every instance at least that long from its launch
        assert r["cloud_last_running_s"] >= data["params"]["pending_s"]
        assert r["library_share_s"] == pytest.approx(
            r["wall_s"] - r["cloud_last_running_s"], abs=0.002
        )
        assert r["controller_cpu_s"] > 0
    assert {t["name"].rsplit("_", 1)[-1] for t in data["targets"]} >= {"single", "share", "flat"}


def test_pyinfra(results: Path) -> None:
    data = _load(results, "pyinfra")
    r = data["results"]
    for job in ("command", "facts", "put"):
        _against_baseline(r[job], "pyinfra")
    assert _positive(r["command"]["instances_cpu_s"])  # the sshd floor of the same run
    assert {t["name"] for t in data["targets"]} == {
        "fleet_command_vs_pyinfra",
        "facts_vs_pyinfra",
        "put_vs_pyinfra",
    }


def test_commands(results: Path) -> None:
    r = _load(results, "commands")["results"]
    for method in ("asyncstage", "asyncssh", "controlmaster", "new_connection"):
        stats = r["latency"][method]
        assert stats["n"] >= 1 and _positive(stats["median"])
        assert stats["min"] <= stats["median"] <= stats["p90"]
    throughput = dict(r["throughput"])
    cpu = throughput.pop("own_cpu_s")
    assert all(_positive(v) for v in throughput.values())
    assert all(v >= 0 for v in cpu.values())


def test_streaming(results: Path) -> None:
    data = _load(results, "streaming")
    assert data["params"]["cipher_asyncstage_negotiated"]
    for direction in ("read", "write"):
        assert _positive(data["results"]["mb_per_s"][f"{direction} asyncstage"])
        assert _positive(data["results"]["mb_per_s"][f"{direction} openssh"])


def test_network(results: Path) -> None:
    data = _load(results, "network")
    r = data["results"]
    assert data["params"]["clouds_network"] == {"vpc": "vpc", "loopback": "loopback"}
    addresses = data["params"]["addresses"]
    assert addresses["loopback"].startswith("127.")
    assert not addresses["vpc"].startswith("127.")  # a public address inside the cloud's range
    for side in ("vpc", "loopback", "jump"):
        assert r["latency"][side]["n"] >= 1 and _positive(r["latency"][side]["median"])
        for direction in ("read", "write"):
            assert _positive(r["mb_per_s_median"][f"{direction} {side}"])
            assert (
                len(r["mb_per_s_rounds"][f"{direction} {side}"]) == data["params"]["stream_rounds"]
            )
    for side in ("vpc", "loopback"):
        boot = r["boot"][side]
        assert len(boot["answering_ssh_s"]) == data["params"]["boot_rounds"]
        assert all(_positive(x) for x in (*boot["cloud_running_s"], *boot["answering_ssh_s"]))
    assert {t["name"] for t in data["targets"]} == {
        "command_latency_vpc_vs_loopback",
        "scmd_read_vpc_vs_loopback",
        "scmd_write_vpc_vs_loopback",
        "scmd_read_jump_vs_direct",
        "scmd_write_jump_vs_direct",
    }


def test_transfers(results: Path) -> None:
    r = _load(results, "transfers")["results"]
    assert r["rsync"]["route"] == "host->host"
    for key in ("rsync", "dd_sparse"):
        assert _positive(r[key]["asyncstage_s"]) and _positive(r[key]["plain_s"])
    assert 0 < r["dd_sparse"]["bytes_sent"] < r["dd_sparse"]["volume_gib"] << 30
    p = r["parallel"]
    assert _positive(p["serial_s"]) and _positive(p["concurrent_s"])
    assert _positive(p["cpu_floor_s"]) and _positive(p["best_possible_speedup_on_these_cores"])
    assert _positive(p["cpu_limit_mb_s"]) and _positive(p["aggregate_mb_s"])
    assert _positive(p["vs_cpu_limit"]) and 0 <= p["idle_concurrent"] <= 1


def test_backup(results: Path) -> None:
    data = _load(results, "backup")
    r = data["results"]
    for n in data["params"]["fleet_sizes"]:
        ours = r["fleets"][str(n)]["asyncstage"]
        assert ours["n"] == n and _positive(ours["wall_s"]) and ours["parents"] == 0
        assert ours["bytes"] >= n * data["params"]["bytes_per_server"] * 0.99
        assert ours["routes"] == ["same-host"]  # each copied on its own server
    c = r["cpu_limit"]
    assert _positive(c["limit_mb_s"]) and _positive(c["copy_phase_mb_s"])
    assert 0 <= c["bare"]["busy"] <= 1
    rerun = r["incremental"]["rerun"]
    assert rerun["parents"] == data["params"]["focus_fleet"]  # every one incremental
    assert 0 < rerun["files"] < r["incremental"]["first"]["files"]
    assert r["snapshot_mode"]["snapshot"]["snapshots"] == data["params"]["focus_fleet"]
    assert {t["name"] for t in data["targets"]} >= {
        "copy_mode_vs_cpu_limit",
        "incremental_rerun",
        "snapshot_vs_copy_mode",
    }


def test_controller(results: Path) -> None:
    r = _load(results, "controller")["results"]
    for key in ("idle", "servers", "transfers"):
        assert _positive(r[key]["peak_rss_mb"]) and _positive(r[key]["cpu_s"])
    assert r["servers"]["connected"] == _load(results, "controller")["params"]["servers"]
    assert _positive(r["controlmaster_baseline"]["peak_rss_mb_sum"])


def test_scale(results: Path) -> None:
    data = _load(results, "scale")
    r, params = data["results"], data["params"]
    assert [f["n"] for f in r["fleet"]] == params["fleet_sizes"]
    for f in r["fleet"]:
        assert _positive(f["wall_s"]) and f["answered_ssh"] == f["n"]
        assert f["api_calls"]["RunInstances"] == 1
    c = r["commands"]
    assert c["commands"] == params["commands"]
    assert c["succeeded"] + c["failed"] == c["commands"]
    assert r["controller"]["connected"] == params["controller_servers"]
    assert _positive(r["controller"]["peak_rss_mb"])
    assert len(data["targets"]) == 4


def test_demo(results: Path) -> None:
    data = _load(results, "demo")
    runs = data["results"]["runs"]
    assert [r["servers"] for r in runs] == data["params"]["servers"]
    for r in runs:  # a failed run says why; a run that ended has its figures
        assert isinstance(r["ok"], bool)
        assert r.get("error") or (_positive(r["wall_s"]) and r["steps"])
    assert len(data["targets"]) == 1


def test_perl(results: Path) -> None:
    data = _load(results, "perl")
    r = data["results"]
    assert set(r["fleet"]) == {"1"}
    for figures in (r["fleet"]["1"], r["commands"], r["put"], r["rsync"], r["dd"]):
        _against_baseline(figures, "perl")
    assert r["commands"]["n"] == data["params"]["commands"]
    assert {t["name"] for t in data["targets"]} == {
        "fleet_1_vs_perl",
        "commands_vs_perl",
        "put_vs_perl",
        "rsync_vs_perl",
        "dd_sparse_vs_perl",
    }


def test_fabric(results: Path) -> None:
    data = _load(results, "fabric")
    r = data["results"]
    assert r["fleet"]["n"] == data["params"]["servers"]
    for figures in (r["fleet"]["cold"], r["fleet"]["warm"], r["commands"], r["put"]):
        _against_baseline(figures, "fabric")
    assert r["put"]["bytes"] == data["params"]["put_bytes"]
    for phases in r["fleet"]["cpu"].values():  # where the time went, phase by phase
        assert all(p["wall_s"] >= 0 and p["controller_cpu_s"] >= 0 for p in phases.values())
    assert len(data["targets"]) == 5


def test_check(results: Path) -> None:
    data = _load(results, "check")
    r, p = data["results"], data["params"]
    assert r["files"] == p["big_files"] + p["small_files"]
    assert len(r["helper_runs_s"]) == len(r["sha256sum_runs_s"]) == p["repeats"]
    assert all(_positive(x) for x in (*r["helper_runs_s"], *r["sha256sum_runs_s"]))
    assert _positive(r["whole_check_s"]) and r["bytes"] > 0
    assert [t["name"] for t in data["targets"]] == ["check_read_data_vs_sha256sum"]
