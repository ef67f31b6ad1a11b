"""Smoke test: the benchmarks of no other group (commands, streaming, transfers,
controller, follow, and any new one) run in quick mode and write sane JSON.

Never asserts timings or ratios against targets: the machines are shared and noisy. The
scripts run in groups (tests/benchmarks_quick.py), a module each, so that the suite's
workers run the groups side by side.
"""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks_quick import check_group_results, load, marks, positive, results_of

pytestmark = marks()

results = results_of("rest")


def test_every_script_wrote_its_results(results: Path) -> None:
    check_group_results(results, "rest")


def test_commands(results: Path) -> None:
    r = load(results, "commands")["results"]
    for method in ("asyncstage", "asyncssh", "controlmaster", "new_connection"):
        stats = r["latency"][method]
        assert stats["n"] >= 1 and positive(stats["median"])
        assert stats["min"] <= stats["median"] <= stats["p90"]
    throughput = dict(r["throughput"])
    cpu = throughput.pop("own_cpu_s")
    assert all(positive(v) for v in throughput.values())
    assert all(v >= 0 for v in cpu.values())


def test_streaming(results: Path) -> None:
    data = load(results, "streaming")
    assert data["params"]["cipher_asyncstage_negotiated"]
    for direction in ("read", "write"):
        assert positive(data["results"]["mb_per_s"][f"{direction} asyncstage"])
        assert positive(data["results"]["mb_per_s"][f"{direction} openssh"])


def test_network(results: Path) -> None:
    data = load(results, "network")
    r = data["results"]
    assert data["params"]["clouds_network"] == {"vpc": "vpc", "loopback": "loopback"}
    addresses = data["params"]["addresses"]
    assert addresses["loopback"].startswith("127.")
    assert not addresses["vpc"].startswith("127.")  # a public address inside the cloud's range
    for side in ("vpc", "loopback", "jump", "jump-child", "jump-openssh"):
        assert r["latency"][side]["n"] >= 1 and positive(r["latency"][side]["median"])
        for direction in ("read", "write"):
            assert positive(r["mb_per_s_median"][f"{direction} {side}"])
            assert (
                len(r["mb_per_s_rounds"][f"{direction} {side}"]) == data["params"]["stream_rounds"]
            )
    for side in ("vpc", "loopback"):
        boot = r["boot"][side]
        assert len(boot["answering_ssh_s"]) == data["params"]["boot_rounds"]
        assert all(positive(x) for x in (*boot["cloud_running_s"], *boot["answering_ssh_s"]))
    assert {t["name"] for t in data["targets"]} == {
        "command_latency_vpc_vs_loopback",
        "scmd_read_vpc_vs_loopback",
        "scmd_write_vpc_vs_loopback",
        "scmd_read_jump_vs_direct",
        "scmd_write_jump_vs_direct",
        "scmd_read_jump_child_vs_direct",
        "scmd_write_jump_child_vs_direct",
        "scmd_read_jump_openssh_vs_direct",
        "scmd_write_jump_openssh_vs_direct",
    }


def test_transfers(results: Path) -> None:
    r = load(results, "transfers")["results"]
    assert r["rsync"]["route"] == "host->host"
    for key in ("rsync", "dd_sparse"):
        assert positive(r[key]["asyncstage_s"]) and positive(r[key]["plain_s"])
    assert 0 < r["dd_sparse"]["bytes_sent"] < r["dd_sparse"]["volume_gib"] << 30
    p = r["parallel"]
    assert positive(p["serial_s"]) and positive(p["concurrent_s"])
    assert positive(p["cpu_floor_s"]) and positive(p["best_possible_speedup_on_these_cores"])
    assert positive(p["cpu_limit_mb_s"]) and positive(p["aggregate_mb_s"])
    assert positive(p["vs_cpu_limit"]) and 0 <= p["idle_concurrent"] <= 1


def test_controller(results: Path) -> None:
    r = load(results, "controller")["results"]
    for key in ("idle", "servers", "transfers"):
        assert positive(r[key]["peak_rss_mb"]) and positive(r[key]["cpu_s"])
    assert r["servers"]["connected"] == load(results, "controller")["params"]["servers"]
    assert positive(r["controlmaster_baseline"]["peak_rss_mb_sum"])


def test_follow(results: Path) -> None:
    data = load(results, "follow")
    r = data["results"]
    rounds = data["params"]["rounds"]
    assert r["entries"] > r["directories_changed"] >= 1
    assert len(r["follow_walk_cpu_s"]) == len(r["full_walk_cpu_s"]) == rounds
    assert all(positive(x) for x in r["full_walk_cpu_s"])


def test_output(results: Path) -> None:
    data = load(results, "output")
    rounds = data["params"]["rounds"]
    for side in ("asyncstage", "direct"):
        figures = data["results"]["rounds"][side]
        for key in ("seconds", "controller_cpu_s"):
            assert len(figures[key]) == rounds and all(positive(x) for x in figures[key])
        assert all(x >= 0 for x in figures["server_cpu_s"])
    assert {t["name"] for t in data["targets"]} == {
        "output_controller_cpu_s",
        "output_server_cpu_s",
        "output_seconds",
    }
