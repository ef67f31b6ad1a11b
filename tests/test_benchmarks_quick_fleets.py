"""Smoke test: the fleet benchmarks (local pace, EC2 pace, scale, the fleet-backup demo)
run in quick mode and write sane JSON.

Never asserts timings or ratios against targets: the machines are shared and noisy. The
scripts run in groups (tests/benchmarks_quick.py), a module each, so that the suite's
workers run the groups side by side.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks_quick import check_group_results, load, marks, positive, results_of

pytestmark = marks()

results = results_of("fleets")


def test_every_script_wrote_its_results(results: Path) -> None:
    check_group_results(results, "fleets")


def test_fleet(results: Path) -> None:
    r = load(results, "fleet")["results"]
    sizes = [c["n"] for c in r["concurrent"]]
    assert sizes[0] == 1 and len(sizes) >= 2
    for c in r["concurrent"]:
        assert positive(c["wall_s"])
        assert c["answered_ssh"] == c["n"]
        assert c["api_calls"]["RunInstances"] == 1
        assert c["describe_rounds"] >= 1 and c["describe_calls_per_round"] >= 1
    for s in r["serial"]:
        assert positive(s["wall_s"])
    assert [f["n"] for f in r["fixed_poll_interval"]] == [sizes[0], sizes[-1]]


def test_fleet_ec2(results: Path) -> None:
    data = load(results, "fleet_ec2")
    runs, keyed = data["results"]["runs"], data["results"]["user_data_runs"]
    order = data["params"]["order"]  # "3u": a fleet of 3 with host keys from the user data
    assert [str(r["n"]) for r in runs] == [o for o in order if not o.endswith("u")]
    assert [f"{r['n']}u" for r in keyed] == [o for o in order if o.endswith("u")]
    for r in keyed:  # no console read: the keys came with the launch, then replaced
        assert r["answered_ssh"] == r["n"] and r["console_calls"] == 0
    for r in runs:
        assert r["answered_ssh"] == r["n"] and r["api_calls"]["RunInstances"] == 1
        # the pending time holds every instance at least that long from its launch
        assert r["cloud_last_running_s"] >= data["params"]["pending_s"]
        # from the cloud's own moment of the last instance up (its engine's hook) to the
        # fleet's return; the cloud's sampled clock agrees within its sampling
        assert r["library_share_s"] == r["timeline"]["share_s"]
        assert r["library_share_s"] == pytest.approx(
            r["wall_s"] - r["cloud_last_running_s"], abs=0.25
        )
        # the last server's way, traced on both sides, each step of it
        split, path = r["last_split"], r["timeline"]["last_ready_path"]
        assert split["pause_s"] >= 0 and split["ssh_s"] > 0 and path["console_reads"] >= 1
        assert r["controller_cpu_s"] > 0
        # what EC2's rate leaves of the share, and when the host keys and servers came
        assert r["share_floor_s"] >= 0 and r["running_spread_s"] >= 0
        assert r["timeline"]["console_calls_in_share"] <= r["console_calls"]
    assert {t["name"].rsplit("_", 1)[-1] for t in data["targets"]} >= {"single", "share", "flat"}


def test_scale(results: Path) -> None:
    data = load(results, "scale")
    r, params = data["results"], data["params"]
    assert [f["n"] for f in r["fleet"]] == params["fleet_sizes"]
    for f in r["fleet"]:
        assert positive(f["wall_s"]) and f["answered_ssh"] == f["n"]
        assert f["api_calls"]["RunInstances"] == 1
    c = r["commands"]
    assert c["commands"] == params["commands"]
    assert c["succeeded"] + c["failed"] == c["commands"]
    assert r["controller"]["connected"] == params["controller_servers"]
    assert positive(r["controller"]["peak_rss_mb"])
    assert len(data["targets"]) == 4


def test_demo(results: Path) -> None:
    data = load(results, "demo")
    runs = data["results"]["runs"]
    assert [r["servers"] for r in runs] == data["params"]["servers"]
    for r in runs:  # a failed run says why; a run that ended has its figures
        assert isinstance(r["ok"], bool)
        assert r.get("error") or (positive(r["wall_s"]) and r["steps"])
    assert len(data["targets"]) == 1
