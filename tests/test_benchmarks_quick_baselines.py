"""Smoke test: the benchmarks against Perl, Fabric and pyinfra run in quick mode and
write sane JSON.

Never asserts timings or ratios against targets: the machines are shared and noisy. The
scripts run in groups (tests/benchmarks_quick.py), a module each, so that the suite's
workers run the groups side by side.
"""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks_quick import (
    against_baseline,
    check_group_results,
    load,
    marks,
    positive,
    results_of,
)

pytestmark = marks()

results = results_of("baselines")


def test_every_script_wrote_its_results(results: Path) -> None:
    check_group_results(results, "baselines")


def test_perl(results: Path) -> None:
    data = load(results, "perl")
    r = data["results"]
    assert set(r["fleet"]) == {"1"}
    for figures in (r["fleet"]["1"], r["commands"], r["put"], r["rsync"], r["dd"]):
        against_baseline(figures, "perl")
    assert r["commands"]["n"] == data["params"]["commands"]
    assert {t["name"] for t in data["targets"]} == {
        "fleet_1_vs_perl",
        "commands_vs_perl",
        "put_vs_perl",
        "rsync_vs_perl",
        "dd_sparse_vs_perl",
    }


def test_fabric(results: Path) -> None:
    data = load(results, "fabric")
    r = data["results"]
    assert r["fleet"]["n"] == data["params"]["servers"]
    for figures in (r["fleet"]["cold"], r["fleet"]["warm"], r["commands"], r["put"]):
        against_baseline(figures, "fabric")
    assert r["put"]["bytes"] == data["params"]["put_bytes"]
    for phases in r["fleet"]["cpu"].values():  # where the time went, phase by phase
        assert all(p["wall_s"] >= 0 and p["controller_cpu_s"] >= 0 for p in phases.values())
    # raw asyncssh ran the same fleet command beside them: the floor under the CPU row
    assert set(r["fleet"]["cpu"]["raw_asyncssh"]) == {"cold", "warm", "close"}
    client = r["fleet"]["client_cpu"]
    assert positive(client["asyncstage_ms_per_server"])
    assert positive(client["raw_asyncssh_ms_per_server"])
    assert positive(client["asyncstage_vs_raw_asyncssh"])
    assert len(data["targets"]) == 5


def test_pyinfra(results: Path) -> None:
    data = load(results, "pyinfra")
    r = data["results"]
    for job in ("command", "facts", "put"):
        against_baseline(r[job], "pyinfra")
    assert positive(r["command"]["instances_cpu_s"])  # the sshd floor of the same run
    # the controller's CPU per server of the command: asyncstage, pyinfra's process and
    # raw asyncssh, in the same rounds
    client = r["command_client_cpu"]
    assert positive(client["asyncstage_ms_per_server"])
    assert positive(client["raw_asyncssh_ms_per_server"])
    if r["command"]["pyinfra_s"] is None:
        assert client["ratio"] is None and client["not_run"]
    else:
        assert positive(client["pyinfra_ms_per_server"]) and positive(client["ratio"])
        assert positive(client["pyinfra_vs_raw_asyncssh"])
    assert {t["name"] for t in data["targets"]} == {
        "fleet_command_vs_pyinfra",
        "fleet_command_client_cpu_vs_pyinfra",
        "facts_vs_pyinfra",
        "put_vs_pyinfra",
    }
