"""PNG charts of a benchmark run, from the JSON in benchmarks/results/.

``python benchmarks/charts.py [--results DIR]`` (``run_all.py`` calls it after a full
run) writes into DIR:

- ``fleet.png``: wall time until N servers answer ssh, against N: asyncstage's
  ``provision_servers`` (fleet.json, perl.json, scale.json up to 200), asyncstage one after another
  (fleet.json) and the Perl module's ``get_server`` for each (perl.json);
- ``throughput.png``: MB/s of the transfers against their baselines in the same run
  (Perl's put, rsync and dd; Fabric's SFTP put);
- ``commands.png``: commands per second against the baselines (Perl's ssh per
  command, Fabric's Connection.run and ThreadingGroup.run);
- ``fleet_ec2.png``: fleets at EC2's pace (fleet_ec2.json): for each N, the cloud's
  time until the last instance ran with the library's share stacked on it, and the
  controller's CPU per server and per further server (beyond one server's launch);
- ``baselines.png``: asyncstage against pyinfra (pyinfra.json: a command, facts and
  a put on every server) and Fabric (fabric.json), as baseline time / asyncstage time
  with the rounds' spread, and the controller's CPU per server of the fleet command
  (baseline / asyncstage);
- ``backup.png``: fleet-backup throughput against the CPU limit (backup.json): the
  bare rsync of the same bytes on every server at once, the plan's copy phases and
  its whole run (MB/s); beside it, the fleet backups' times against the Perl module's;
  without backup.json, a chart that says "not run";
- ``network.png``: the local cloud's namespaced network against loopback and a jump host
  against direct (network.json): streaming MB/s with the rounds' spread, warm command
  latency, and instance boot with namespaces against without.

A missing file or a step a baseline did not run leaves its bar or line out (with a
note on the chart). Needs matplotlib (``pip install 'asyncstage[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OURS = "#1f77b4"
THEIRS = "#d62728"
OTHER = "#7f7f7f"
BASELINE_COLORS = {"Perl": THEIRS, "Fabric": "#ff7f0e"}


def _load(results: Path, name: str) -> dict[str, Any]:
    path = results / f"{name}.json"
    if not path.exists():
        return {}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _fleet_series(results: Path) -> dict[str, list[tuple[int, float, bool]]]:
    """label -> [(N, seconds, measured)]."""
    series: dict[str, list[tuple[int, float, bool]]] = {}
    fleet = _load(results, "fleet").get("results", {})
    if fleet:
        series["asyncstage provision_servers(N) (fleet.json)"] = [
            (c["n"], c["wall_s"], True) for c in fleet.get("concurrent", [])
        ]
        series["asyncstage provision_server() N times in turn"] = [
            (s["n"], s["wall_s"], bool(s.get("measured", True))) for s in fleet.get("serial", [])
        ]
    scale = _load(results, "scale").get("results", {}).get("fleet", [])
    if scale:
        series["asyncstage provision_servers(N) (scale.json)"] = [
            (r["n"], r["wall_s"], True) for r in scale
        ]
    perl = _load(results, "perl").get("results", {}).get("fleet", {})
    ours = [(int(n), f["asyncstage_s"], True) for n, f in perl.items() if f.get("asyncstage_s")]
    theirs = [(int(n), f["perl_s"], True) for n, f in perl.items() if f.get("perl_s")]
    if ours:
        series["asyncstage provision_servers(N) (perl.json)"] = sorted(ours)
    if theirs:
        series["Perl VM::EC2::Staging get_server × N"] = sorted(theirs)
    return series


def fleet_chart(results: Path, plt: Any) -> Path | None:
    series = _fleet_series(results)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    styles = {
        "asyncstage provision_servers(N) (fleet.json)": (OURS, "o", "-"),
        "asyncstage provision_servers(N) (perl.json)": (OURS, "s", ":"),
        "asyncstage provision_servers(N) (scale.json)": (OURS, "*", "-."),
        "asyncstage provision_server() N times in turn": (OTHER, "^", "--"),
        "Perl VM::EC2::Staging get_server × N": (THEIRS, "D", "-"),
    }
    for label, points in series.items():
        color, marker, line = styles.get(label, (OTHER, "x", "-"))
        points = sorted(points)
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=marker,
            linestyle=line,
            color=color,
            label=label,
        )
        if "(perl.json)" in label:
            continue  # the same library as fleet.json's line: its labels would overlap
        for n, s, measured in points:
            ax.annotate(
                f"{s:.0f} s" + ("" if measured else " (extrapolated)"),
                (n, s),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
                color=color,
            )
    perl_json = _load(results, "perl")
    delay = perl_json.get("params", {}).get("boot_delay_s")
    ax.set_xlabel("servers (N)" + _not_run_note(perl_json, ["fleet"]))
    ax.set_ylabel("seconds until all answer ssh")
    ax.set_ylim(bottom=0)
    if max(p[0] for points in series.values() for p in points) > 60:
        ax.set_xscale("log")  # 1 ... 200 servers: the small fleets stay readable
    ax.set_title(
        "Fleet: N servers up and answering ssh"
        + (f" (local cloud, boot delay {delay:g} s)" if delay is not None else "")
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, plt, results / "fleet.png")


def _bars(
    ax: Any, groups: list[tuple[str, float | None, float | None, str]], unit: str, log: bool
) -> None:
    """Pairs of bars per group: (label, asyncstage, baseline, baseline's name)."""
    width = 0.38
    for i, (_label, ours, theirs, name) in enumerate(groups):
        for offset, value, color, who in (
            (-width / 2, ours, OURS, "asyncstage"),
            (width / 2, theirs, BASELINE_COLORS.get(name, THEIRS), f"baseline ({name})"),
        ):
            x = i + offset
            if value is None:
                ax.text(x, 0, "not run", rotation=90, ha="center", va="bottom", fontsize=8)
                continue
            ax.bar(x, value, width, color=color, label=who)
            _annotate_bar(ax, x, value, f"{value:.3g}")
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    ax.set_ylabel(unit)
    if log:
        ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)
    _legend(ax, fontsize=8)


def _legend(ax: Any, **options: Any) -> None:
    """The axes' legend, each label once (bars of one side share theirs)."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), **options)


def _annotate_bar(ax: Any, x: float, value: float, text: str) -> None:
    """``text`` just above the bar at ``x``."""
    ax.annotate(
        text,
        (x, value),
        ha="center",
        va="bottom",
        fontsize=8,
        textcoords="offset points",
        xytext=(0, 2),
    )


def _mb_s(size: float | None, seconds: float | None) -> float | None:
    return size / 1e6 / seconds if size and seconds else None


def throughput_chart(results: Path, plt: Any) -> Path | None:
    perl = _load(results, "perl")
    fabric = _load(results, "fabric")
    groups: list[tuple[str, float | None, float | None, str]] = []
    pr = perl.get("results", {})
    for key, label in (
        ("put", "put tree\n(vs Perl rsync)"),
        ("rsync", "rsync vol→vol\n(vs Perl rsync)"),
        ("dd", "dd 1 GiB, mostly empty\n(vs Perl dd|gzip|ssh)"),
    ):
        f = pr.get(key)
        if f:
            size = f.get("bytes")
            groups.append(
                (
                    label,
                    _mb_s(size, f.get("asyncstage_s")),
                    _mb_s(size, f.get("perl_s")),
                    "Perl",
                )
            )
    put = fabric.get("results", {}).get("put")
    if put:
        groups.append(
            (
                "put one file\n(vs Fabric SFTP)",
                _mb_s(put.get("bytes"), put.get("asyncstage_s")),
                _mb_s(put.get("bytes"), put.get("fabric_s")),
                "Fabric",
            )
        )
    return _bar_chart(
        plt,
        groups,
        results / "throughput.png",
        "MB/s (higher is better)",
        "Transfers: throughput against the baselines, same run, same local cloud",
        note=_not_run_note(perl, ["put", "rsync", "dd"]),
    )


def commands_chart(results: Path, plt: Any) -> Path | None:
    perl = _load(results, "perl").get("results", {})
    fabric = _load(results, "fabric").get("results", {})
    groups: list[tuple[str, float | None, float | None, str]] = []

    def per_s(count: int | None, seconds: float | None) -> float | None:
        return count / seconds if count and seconds else None

    sources = ((perl, "perl_s", "Perl", "scmd"), (fabric, "fabric_s", "Fabric", "run"))
    for data, key, name, how in sources:
        c = data.get("commands")
        if c:
            groups.append(
                (
                    f"{c['n']} in turn\n(vs {name} {how})",
                    per_s(c["n"], c.get("asyncstage_s")),
                    per_s(c["n"], c.get(key)),
                    name,
                )
            )
    fleet = fabric.get("fleet")
    if fleet:
        n = fleet["n"]
        for key, what in (("cold", "connecting"), ("warm", "connected")):
            f = fleet[key]
            groups.append(
                (
                    f"hostname on {n}, {what}\n(vs ThreadingGroup)",
                    per_s(n, f.get("asyncstage_s")),
                    per_s(n, f.get("fabric_s")),
                    "Fabric",
                )
            )
    return _bar_chart(
        plt,
        groups,
        results / "commands.png",
        "commands per second (log scale, higher is better)",
        "Commands: rate against the baselines, same run, same servers",
        log=True,
    )


def _bar_chart(
    plt: Any,
    groups: list[tuple[str, float | None, float | None, str]],
    path: Path,
    unit: str,
    title: str,
    log: bool = False,
    note: str = "",
) -> Path | None:
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    _bars(ax, groups, unit, log=log)
    ax.set_title(title)
    if note:
        ax.set_xlabel(note.strip(), fontsize=7, color=THEIRS)
    return _save(fig, plt, path)


def _not_run_note(data: dict[str, Any], keys: list[str]) -> str:
    """Lines naming the baseline's steps that did not run, and why (empty: all ran)."""
    res = data.get("results", {})
    steps: dict[str, list[str]] = {}  # reason -> steps (one line per distinct reason)
    for key in keys:
        value = res.get(key, {})
        items = value.values() if key == "fleet" else [value]
        for f in items:
            if isinstance(f, dict) and f.get("not_run"):
                steps.setdefault(f["not_run"], []).append(key)
                break
    lines = []
    for reason, names in steps.items():
        text = f"Perl {', '.join(names)}: not run: {reason}"
        lines += textwrap.wrap(text, 110, max_lines=3, placeholder=" ...")
    return "".join("\n" + line for line in lines)


def fleet_ec2_chart(results: Path, plt: Any) -> Path | None:
    data = _load(results, "fleet_ec2")
    runs = data.get("results", {}).get("runs", [])
    if not runs:
        return None
    by_n: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        by_n.setdefault(r["n"], []).append(r)
    sizes = sorted(by_n)
    # One server ran several times: the run nearest the median, as in the table.
    picked = [sorted(by_n[n], key=lambda r: r["wall_s"])[len(by_n[n]) // 2] for n in sizes]
    cloud = [r["cloud_last_running_s"] for r in picked]
    library = [r["library_share_s"] for r in picked]
    fig, (ax, cpu_ax) = plt.subplots(1, 2, figsize=(11, 5), dpi=110, width_ratios=[3, 2])
    x = range(len(sizes))
    ax.bar(x, cloud, color=OTHER, label="cloud: last instance running (pending, boot inside)")
    ax.bar(x, library, bottom=cloud, color=OURS, label="library: then all ready")
    for i, (c, lib) in enumerate(zip(cloud, library, strict=True)):
        ax.annotate(f"{lib:.2f} s", (i, c + lib), ha="center", va="bottom", fontsize=8, color=OURS)
    if all("share_floor_s" in r for r in picked):  # what EC2's API rate leaves to any client
        floors = [c + r["share_floor_s"] for c, r in zip(cloud, picked, strict=True)]
        ax.scatter(x, floors, marker="_", s=400, color="black", zorder=3, label="EC2-rate floor")
    ax.set_xticks(list(x), [str(n) for n in sizes])
    ax.set_xlabel("servers (N)")
    ax.set_ylabel("seconds until all answer ssh")
    pending = data.get("params", {}).get("pending_s")
    ax.set_title(f"Fleets at EC2's pace (pending {pending:g} s)" if pending else "Fleets")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="y", alpha=0.3)
    cpu_ax.plot(
        sizes,
        [r["controller_cpu_ms_per_server"] for r in picked],
        marker="o",
        color=OURS,
        label="per server",
    )
    further = data.get("results", {}).get("controller_cpu_ms_per_further_server") or {}
    if further:  # beyond one server's launch: what flat in N is judged on
        ns = sorted(int(n) for n in further)
        cpu_ax.plot(
            ns,
            [further[str(n)] for n in ns],
            marker="s",
            color=OTHER,
            label="per further server",
        )
        cpu_ax.legend(fontsize=8)
    cpu_ax.set_xscale("log")
    cpu_ax.set_xlabel("servers (N)")
    cpu_ax.set_ylabel("controller CPU ms per server")
    cpu_ax.set_ylim(bottom=0)
    cpu_ax.set_title("Controller CPU per server (flat in N)")
    cpu_ax.grid(True, alpha=0.3)
    return _save(fig, plt, results / "fleet_ec2.png")


def baselines_chart(results: Path, plt: Any) -> Path | None:
    """Baseline time / asyncstage time (above 1: asyncstage ahead), with the spread."""
    rows: list[tuple[str, dict[str, Any] | None, str]] = []
    pyinfra = _load(results, "pyinfra")
    p, n = pyinfra.get("results", {}), pyinfra.get("params", {}).get("servers")
    for key, label in (
        ("command", "hostname on {n}"),
        ("facts", "facts from {n}"),
        ("put", "put to {n}"),
    ):
        if key in p:
            rows.append((label.format(n=n) + "\n(vs pyinfra)", p[key], "pyinfra"))
    if "command_client_cpu" in p:
        rows.append(("controller CPU\nper server (vs pyinfra)", p["command_client_cpu"], "pyinfra"))
    fabric = _load(results, "fabric").get("results", {})
    fleet = fabric.get("fleet")
    if fleet:
        rows.append((f"hostname on {fleet['n']}\n(vs Fabric)", fleet.get("cold"), "Fabric"))
        if "client_cpu" in fleet:
            rows.append(("controller CPU\nper server (vs Fabric)", fleet["client_cpu"], "Fabric"))
    for key, label in (("commands", "commands in turn"), ("put", "put one file")):
        if key in fabric:
            rows.append((f"{label}\n(vs Fabric)", fabric[key], "Fabric"))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    for i, (_name, f, who) in enumerate(rows):
        value = (f or {}).get("ratio")
        if value is None:
            ax.text(i, 1, "not run", rotation=90, ha="center", va="bottom", fontsize=8)
            continue
        color = BASELINE_COLORS.get(who, THEIRS)
        spread = (f or {}).get("ratio_spread")
        err = None if not spread else [[value - spread[0]], [spread[1] - value]]
        ax.bar(i, value, 0.6, color=color, yerr=err, capsize=4, label=f"vs {who}")
        _annotate_bar(ax, i, value, f"{value:.2f}×")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("baseline / asyncstage, time or CPU (log; above 1: asyncstage ahead)")
    ax.set_title("asyncstage against pyinfra and Fabric (each pair: same servers, same run)")
    _legend(ax, fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, plt, results / "baselines.png")


def backup_chart(results: Path, plt: Any) -> Path | None:
    """Fleet-backup throughput against the CPU limit; the fleets against the Perl module."""
    res = _load(results, "backup").get("results", {})
    c, fleets = res.get("cpu_limit"), res.get("fleets", {})
    if not c:
        return _not_run(plt, results / "backup.png", "Backup throughput against the CPU limit")
    fig, (ax, fleet_ax) = plt.subplots(1, 2, figsize=(12, 5), dpi=110, width_ratios=[3, 3])
    sides = [("focus fleet, plain store", c, res.get("copy_first", {}))]
    if "large" in res:
        large = res["large"]
        sides.append(("large, reflink store", large["cpu_limit"], large["copy_first"]))
    ticks: list[tuple[float, str]] = []
    for k, (what, lim, first) in enumerate(sides):
        each = first.get("bytes", 0) / max(1, first.get("n", 1)) / 2**20
        x0 = k * 4.5
        bars = [
            ("bare\nrsync", lim["limit_mb_s"], OTHER, 1.0),
            ("rsync,\nmanifest", lim["limit_with_manifest_mb_s"], OTHER, 0.55),
            ("plan:\ncopy", lim["copy_phase_mb_s"], OURS, 1.0),
            ("plan:\nwhole", lim["whole_run_mb_s"], OURS, 0.55),
        ]
        for i, (label, value, color, alpha) in enumerate(bars):
            ax.bar(x0 + i, value, 0.8, color=color, alpha=alpha)
            share = f"\n{value / lim['limit_mb_s']:.2f}×" if i else ""
            _annotate_bar(ax, x0 + i, value, f"{value:.3g}{share}")
            ticks.append((x0 + i, label))
        target = 0.8 * lim["limit_mb_s"]
        ax.plot([x0 - 0.4, x0 + 3.4], [target] * 2, color=THEIRS, linewidth=0.8, ls="--")
        ax.text(
            x0 + 1.5,
            -0.14,
            f"{what}: {first.get('n', '?')} × {each:.0f} MiB",
            transform=ax.get_xaxis_transform(),
            ha="center",
            fontsize=8,
        )
    ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=7)
    ax.set_ylabel("MB/s, every server's data together (dashed: 0.8× the limit)")
    ax.set_title("Copy-mode backups against the CPU limit (each group: one run)")
    ax.grid(True, axis="y", alpha=0.3)
    groups = []
    for n, row in sorted(fleets.items(), key=lambda kv: int(kv[0])):
        label = f"{n} servers" + ("\n(Perl extrapolated)" if row.get("perl_extrapolated") else "")
        groups.append((label, row["asyncstage"]["wall_s"], row.get("perl_s"), "Perl"))
    _bars(fleet_ax, groups, "seconds until every backup's snapshot is completed", log=True)
    fleet_ax.set_title("Fleet backups: run_plan against the Perl module, one after another")
    return _save(fig, plt, results / "backup.png")


def _not_run(plt: Any, path: Path, title: str) -> Path:
    """A chart that says its benchmark has no figures in this directory."""
    fig, ax = plt.subplots(figsize=(8, 3), dpi=110)
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(
        0.5,
        0.5,
        f"not run: no {path.stem}.json in {path.parent.name or path.parent}/",
        ha="center",
        va="center",
        fontsize=12,
        color=THEIRS,
    )
    return _save(fig, plt, path)


# The network benchmark's sides: label and colour.
NETWORK_SIDES = {
    "loopback": ("loopback", OTHER),
    "vpc": ("vpc (namespaces)", OURS),
    "jump": ("jump host,\nin this process", "#2ca02c"),
    "jump-child": ("jump host,\nhop in a child", "#98df8a"),
    "jump-openssh": ("jump host,\nhop in ssh -W", "#17becf"),
}


def network_chart(results: Path, plt: Any) -> Path | None:
    """Streaming, command latency and boot: namespaced network against loopback, jump
    host against direct (network.json)."""
    data = _load(results, "network")
    r = data.get("results", {})
    if not r.get("mb_per_s_rounds"):
        return None
    fig, (stream_ax, lat_ax, boot_ax) = plt.subplots(
        1, 3, figsize=(13, 5), dpi=110, width_ratios=[3, 2, 2]
    )
    _stream_bars(stream_ax, data)
    latency = r.get("latency", {})
    for i, (side, (_label, color)) in enumerate(NETWORK_SIDES.items()):
        if side not in latency:
            continue
        median, p90 = 1000 * latency[side]["median"], 1000 * latency[side]["p90"]
        lat_ax.bar(i, median, 0.6, color=color)
        lat_ax.plot([i], [p90], marker="_", markersize=20, color="black")
        _inside_bar(lat_ax, i, median, f"{median:.2f}")
    ratio = _target_values(data).get("command_latency_vpc_vs_loopback")
    if ratio is not None:
        lat_ax.annotate(f"vpc / loopback\n{ratio:.2f}×", (1, 0), xytext=(0, -38),
                        textcoords="offset points", ha="center", fontsize=7)  # fmt: skip
    lat_ax.set_xticks(range(len(NETWORK_SIDES)), [v[0] for v in NETWORK_SIDES.values()], fontsize=7)
    lat_ax.set_ylabel("ms (median; the dash: p90)")
    lat_ax.set_title("Warm scmd('true') latency", fontsize=10)
    lat_ax.grid(True, axis="y", alpha=0.3)
    if r.get("boot"):
        _boot_bars(boot_ax, r["boot"], r.get("boot_vpc_vs_loopback", {}))
    fig.suptitle("The local cloud's namespaced network against loopback, same run")
    return _save(fig, plt, results / "network.png")


def _target_values(data: dict[str, Any]) -> dict[str, float]:
    """Target name -> value (the medians of the rounds' ratios that the summary judges)."""
    return {t["name"]: t["value"] for t in data.get("targets", []) if t.get("value") is not None}


def _inside_bar(ax: Any, x: float, value: float, text: str) -> None:
    """``text`` inside the bar at ``x``, near its foot (clear of the error bars)."""
    ax.text(x, value * 0.04, text, ha="center", va="bottom", fontsize=7, color="white")


def _stream_bars(ax: Any, data: dict[str, Any]) -> None:
    """MB/s of each side, read and write, with the rounds' spread and the targets' ratios."""
    r, width = data["results"], 0.8 / len(NETWORK_SIDES)
    ratios = _target_values(data)
    for d, direction in enumerate(("read", "write")):
        for i, (side, (label, color)) in enumerate(NETWORK_SIDES.items()):
            values = r["mb_per_s_rounds"].get(f"{direction} {side}")
            if not values:
                continue
            median = r["mb_per_s_median"][f"{direction} {side}"]
            x = d + (i - (len(NETWORK_SIDES) - 1) / 2) * width
            err = [[median - min(values)], [max(values) - median]]
            ax.bar(x, median, width, color=color, yerr=err, capsize=3, label=label)
            against = "vpc_vs_loopback" if side == "vpc" else None
            if side.startswith("jump"):
                against = f"{side.replace('-', '_')}_vs_direct"
            share = ratios.get(f"scmd_{direction}_{against}") if against else None
            text = f"{median:.0f}" + ("" if share is None else f"\n{share:.2f}×")
            _inside_bar(ax, x, median, text)
    ax.set_xticks([0, 1], ["scmd_read", "scmd_write"])
    ax.set_ylabel("MB/s (median; whiskers: lowest and highest round)")
    size = data.get("params", {}).get("stream_bytes", 0) >> 20
    ax.set_title(f"Streaming {size} MiB (× loopback; jump: × direct)", fontsize=10)
    _legend(ax, fontsize=7, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)


BOOT_STAGES = {
    "cloud_running_s": "cloud: running\n(sshd listening)",
    "answering_ssh_s": "library: answering ssh",
}


def _boot_bars(
    ax: Any, boot: dict[str, dict[str, list[float]]], ratios: dict[str, dict[str, Any]]
) -> None:
    """One server's boot from the launch, loopback beside namespaced, for each stage
    (``ratios``: vpc / loopback, the median of the rounds', per stage)."""
    for k, key in enumerate(BOOT_STAGES):
        for j, side in enumerate(("loopback", "vpc")):
            label, color = NETWORK_SIDES[side]
            value = statistics.median(boot[side][key])
            x = k + (j - 0.5) * 0.38
            ax.bar(x, value, 0.38, color=color, label=label)
            _annotate_bar(ax, x, value, f"{value:.2f}")
    labels = [
        text + (f"\nvpc / loopback {ratios[key]['ratio']:.2f}×" if key in ratios else "")
        for key, text in BOOT_STAGES.items()
    ]
    ax.set_xticks(range(len(BOOT_STAGES)), labels, fontsize=8)
    ax.set_ylabel("seconds from the launch (median)")
    ax.set_title("Instance boot, one server", fontsize=10)
    _legend(ax, fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_charts(results: Path) -> list[Path]:
    """The charts of the JSON files in ``results``; the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on these machines
    import matplotlib.pyplot as plt

    written = []
    charts = (
        fleet_chart,
        throughput_chart,
        commands_chart,
        fleet_ec2_chart,
        baselines_chart,
        backup_chart,
        network_chart,
    )
    for chart in charts:
        path = chart(results, plt)
        if path is not None:
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    for path in write_charts(args.results):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
