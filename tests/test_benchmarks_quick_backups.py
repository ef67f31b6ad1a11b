"""Smoke test: the backup, keep and check benchmarks run in quick mode and write sane JSON.

Never asserts timings or ratios against targets: the machines are shared and noisy. The
scripts run in groups (tests/benchmarks_quick.py), a module each, so that the suite's
workers run the groups side by side.
"""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks_quick import check_group_results, load, marks, positive, results_of

pytestmark = marks()

results = results_of("backups")


def test_every_script_wrote_its_results(results: Path) -> None:
    check_group_results(results, "backups")


def test_backup(results: Path) -> None:
    data = load(results, "backup")
    r = data["results"]
    for n in data["params"]["fleet_sizes"]:
        ours = r["fleets"][str(n)]["asyncstage"]
        assert ours["n"] == n and positive(ours["wall_s"]) and ours["parents"] == 0
        assert ours["bytes"] >= n * data["params"]["bytes_per_server"] * 0.99
        assert ours["routes"] == ["same-host"]  # each copied on its own server
    c = r["cpu_limit"]
    assert positive(c["limit_mb_s"]) and positive(c["copy_phase_mb_s"])
    assert 0 <= c["bare"]["busy"] <= 1
    assert len(r["rounds"]) == len(r["reflink_store"]["rounds"]) == 1  # quick: one round each
    large, p = r["large"], data["params"]  # backups large enough for their fixed steps to fade
    assert len(large["rounds"]) == 1 and large["copy_first"]["n"] == p["large_fleet"]
    assert large["copy_first"]["bytes"] >= p["large_fleet"] * p["large_bytes_per_server"] * 0.99
    assert large["copy_first"]["routes"] == ["same-host"] and large["copy_first"]["parents"] == 0
    assert positive(large["cpu_limit"]["limit_with_manifest_mb_s"])
    assert positive(large["cpu_limit"]["copy_phase_mb_s"])
    # its reruns: each from its previous snapshot; then each into the volume a run kept
    assert large["rerun"]["parents"] == large["kept_rerun"]["volumes_reused"] == p["large_fleet"]
    assert 0 < large["kept_rerun"]["files"] < large["first"]["files"]
    for run in ("first", "rerun", "kept_rerun"):  # its images share blocks
        made = large[run]["image_copies"]
        assert made["cloned"] == made["copies"] > 0
    if set(data["params"]["instances_cpu_from"].values()) == {"cgroup cpuacct"}:
        # of the instances' CPU over the copy span and in the limit, the kernel's part
        span, hashed = c["span_cpu"], c["bare"]["with_manifest"]
        assert 0 < span["instances_sys_cpu_s"] <= span["instances_cpu_s"]
        assert 0 < hashed["instances_sys_cpu_s"] <= hashed["instances_cpu_s"]
        assert span["direct_reclaim_mib"] >= 0 and hashed["direct_reclaim_mib"] >= 0
        assert c["instances_user_vs_limit_with_manifest"] > 0
    rerun, n_focus = r["incremental"]["rerun"], data["params"]["focus_fleet"]
    assert rerun["parents"] == n_focus  # every one incremental
    # the local cloud's image copies: each backup's volume from its snapshot, its snapshot
    assert rerun["image_copies"]["copies"] == 2 * data["params"]["focus_fleet"]
    assert rerun["image_copies"]["volumes"] == data["params"]["focus_fleet"]
    assert positive(rerun["image_copies"]["volume_mean_s"])
    assert 0 < rerun["files"] < r["incremental"]["first"]["files"]
    first = r["incremental"]["first"]  # every file's digest: from the follow pass or read after
    assert 0 <= first["manifest_followed"] <= first["files"]
    assert first["manifest_hashed_bytes"] <= first["bytes"]
    kept = r["incremental_kept"]["rerun"]  # every one copied into the volume its first kept
    assert kept["volumes_reused"] == kept["parents"] == data["params"]["focus_fleet"]
    assert 0 < kept["files"] < r["incremental_kept"]["first"]["files"]
    assert r["snapshot_mode"]["snapshot"]["snapshots"] == data["params"]["focus_fleet"]
    assert rerun["image_copies"]["cloned"] == 0  # the plain store: each a copy of its data
    shared = r["reflink_store"]  # the same runs again, the images sharing blocks
    assert shared["rerun"]["parents"] == shared["kept_rerun"]["volumes_reused"] == n_focus
    for run in ("first", "rerun", "kept_first", "kept_rerun", "snapshot"):
        made = shared[run]["image_copies"]
        assert made["cloned"] == made["copies"] > 0
    assert {t["name"] for t in data["targets"]} >= {
        "copy_mode_vs_cpu_limit",
        "copy_mode_vs_cpu_limit_large",
        "incremental_rerun_large",
        "incremental_rerun_kept_volume_large",
        "incremental_rerun",
        "incremental_rerun_kept_volume",
        "snapshot_vs_copy_mode",
        "incremental_rerun_reflink_store",
        "incremental_rerun_kept_volume_reflink_store",
        "snapshot_vs_copy_mode_reflink_store",
    }


def test_check(results: Path) -> None:
    data = load(results, "check")
    r, p = data["results"], data["params"]
    assert r["files"] == p["big_files"] + p["small_files"]
    assert len(r["helper_runs_s"]) == len(r["sha256sum_runs_s"]) == p["repeats"]
    assert all(positive(x) for x in (*r["helper_runs_s"], *r["sha256sum_runs_s"]))
    assert positive(r["whole_check_s"]) and r["bytes"] > 0
    assert [t["name"] for t in data["targets"]] == ["check_read_data_vs_sha256sum"]
