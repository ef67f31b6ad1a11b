"""What decides each target, and what the same run measured that shows it.

Every row of ``summary.json``/``summary.md`` carries ``bound``: ``library`` when the
library's own code decides the figure, else the machine or dependency limit that does;
and ``evidence``: figures of the same run that show it. A machine-bound row gives the
measured limit and the ratio to it; a dependency-bound row names the upstream behaviour.
A script may state both itself (:meth:`_common.Report.target`); otherwise
:func:`restate` derives them here from the script's own JSON, so that results written
before a script stated them are restated from their own figures, not guessed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

LIBRARY = "library"
Rule = Callable[[dict[str, Any], dict[str, Any]], tuple[str, str]]


def _f(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _fleet_machine(run: dict[str, Any], single: dict[str, Any], cores: int) -> tuple[str, str]:
    """A fleet whose hosts boot on this machine's cores before the boot delay starts."""
    n, limit = run["n"], run["cloud_last_running_s"]
    text = (
        f"limit: the local cloud had all {n} instances running (sshd listening) "
        f"{_f(limit)} s after the launch, one in {_f(single['cloud_last_running_s'])} s "
        f"({_f(limit / single['cloud_last_running_s'])}×: {n} hosts booted on {cores} cores, "
        f"then the boot delay); all {n} answered ssh at {_f(run['wall_s'])} s, "
        f"{_f(run['wall_s'] / limit)}× that limit"
    )
    if run.get("own_cpu_s") is not None:
        text += (
            f"; the run used {_f(run['own_cpu_s'])} CPU s (cloud, hosts, controller), "
            f"{_f(run['own_cpu_s'] / cores)} s of all {cores} cores"
        )
    bound = f"machine: the local cloud boots the {n} hosts on {cores} cores (instant boot)"
    return bound, text + ". At EC2's pace (hosts booting inside the pending time): fleet_ec2"


def _fleet(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    runs = data["results"]["concurrent"]
    return _fleet_machine(runs[-1], runs[0], _cores(data))


def _scale_fleet(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    runs = data["results"]["fleet"]
    return _fleet_machine(runs[-1], runs[0], _cores(data))


def _describe(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    runs = data["results"].get("concurrent") or data["results"].get("fleet") or []
    sizes = ", ".join(f"N={r['n']}: {r['describe_calls_per_round']}" for r in runs)
    return LIBRARY, f"counted at the cloud's endpoint, most calls in one round: {sizes}"


def _fabric_floor(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    """The fleet command's wall time against the instances' sshd CPU on these cores."""
    fleet, cores = data["results"]["fleet"], _cores(data)
    cpu = fleet["cpu"]
    ours = cpu["asyncstage"]["cold"]
    floor = ours["instances_cpu_s"] / cores
    text = (
        f"limit: the {fleet['n']} instances' sshd (fork, key exchange, auth, session, shell) "
        f"used {_f(ours['instances_cpu_s'])} CPU s, the same whoever connects: "
        f"{_f(floor)} s of {cores} cores, a floor under both sides; asyncstage "
        f"{_f(fleet['cold']['asyncstage_s'])} s = {_f(fleet['cold']['asyncstage_s'] / floor)}× "
        "the floor"
    )
    if cpu.get("fabric") and fleet["cold"].get("fabric_s"):
        theirs = fleet["cold"]["fabric_s"]
        text += (
            f", Fabric {_f(theirs)} s = {_f(theirs / floor)}× it: no client can be more than "
            f"{_f(theirs / floor)}× ahead of Fabric here"
        )
    return f"machine: {fleet['n']} servers' sshd on the controller's {cores} cores", text


# What asyncssh does for every new client connection, in Python on the event loop: the
# upstream behaviour that bounds any client built on it (asyncssh 2.x connection.py,
# auth.py, packet.py). asyncstage no longer pays asyncssh.connect()'s options, prepared
# for each connection in a worker thread (SSHClientConnectionOptions.construct): it
# prepares them once per user and key (asyncstage/ssh/connection.py); raw asyncssh,
# the floor measured beside it, still does.
_ASYNCSSH_CONNECT = (
    "asyncssh: each new connection runs the key exchange, user auth (a 'none' request, "
    "a public key query, then the signed request: three round trips) and the session "
    "channel packet by packet in Python, a debug line formatted for every packet"
)


def _client_cpu(baseline: str, label: str, where: Callable[[dict[str, Any]], Any]) -> Rule:
    """asyncstage and ``baseline`` against raw asyncssh's controller CPU in the same run
    (``where``: the client_cpu figures in the script's results)."""

    def rule(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
        c = where(data["results"]) or {}
        if c.get(f"{baseline}_ms_per_server") is None:
            return LIBRARY, "not run"
        text = (
            "controller CPU per server, connecting: asyncstage "
            f"{_f(c['asyncstage_ms_per_server'])} ms, {label} "
            f"{_f(c[f'{baseline}_ms_per_server'])} ms"
        )
        raw = c.get("raw_asyncssh_ms_per_server")
        if raw is None:  # an older run, without raw asyncssh
            return LIBRARY, text + " (asyncssh's key exchange, user auth and channel in Python)"
        most = c[f"{baseline}_vs_raw_asyncssh"]
        text += (
            f"; raw asyncssh (asyncssh.connect and conn.run, no asyncstage code; same key, "
            f"host key, ciphers) {_f(raw)} ms: {label} / raw asyncssh {_f(most)}×, "
            f"asyncstage {_f(c['asyncstage_vs_raw_asyncssh'])}× raw asyncssh"
        )
        if c["asyncstage_vs_raw_asyncssh"] < 1:
            text += (
                "; asyncstage below raw asyncssh because it prepares the connection options "
                "once for the fleet, which asyncssh.connect does for every connection (in "
                "a worker thread)"
            )
        if target.get("spread"):
            lo, hi = target["spread"]
            text += f"; rounds' ratios {lo}-{hi}"
        if target["met"] or most >= target["limit"]:
            return LIBRARY, text
        bound = _ASYNCSSH_CONNECT
        if c["asyncstage_vs_raw_asyncssh"] > 1.1:  # its own overhead counts as well
            bound = f"library and {bound}"
        return bound, text + (
            f": no client on asyncssh gets more than {_f(most)}× ahead of {label} here"
        )

    return rule


def _fabric_fleet_rounds(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    """The fleet command's rows have rounds of their own (``fleet_repeats``)."""
    return LIBRARY, _default(data, target, "fleet_repeats")


def _streaming_pipe(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    """scmd_read/scmd_write against raw asyncssh with the same cipher, same run."""
    direction = "read" if target["name"].startswith("scmd_read") else "write"
    r = data["results"]
    rates = r.get("mb_per_s_median") or r["mb_per_s"]
    cpu = r.get("client_cpu_s_per_gib", {})
    ours, raw = rates[f"{direction} asyncstage"], rates[f"{direction} raw asyncssh"]
    text = (
        f"raw asyncssh (no asyncstage code), same cipher, same run: {_f(raw)} MB/s, "
        f"asyncstage {_f(ours)} MB/s ({_f(ours / raw)}× raw asyncssh); client CPU "
        f"{cpu.get(f'{direction} raw asyncssh', '?')} vs "
        f"{cpu.get(f'{direction} asyncstage', '?')} s/GiB"
    )
    if target["met"]:
        return LIBRARY, text
    bound = (
        "asyncssh: its SSH packet layer runs in Python and sends an SSH_MSG_IGNORE packet "
        "before every data packet it encrypts (connection.py send_packet)"
    )
    return bound, text + (
        f"; asyncstage's own code is not the limit: it runs at {_f(ours / raw)}× raw asyncssh "
        "over the same packet layer"
    )


def _streaming_file(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    r = data["results"]
    spread = target.get("spread")
    text = "both sides run OpenSSH (the file forms go through the host's OpenSSH master)"
    if spread:
        text += f"; rounds' ratios from {spread[0]} to {spread[1]}"
    return LIBRARY, text + f"; OpenSSH set-up subtracted: {r.get('openssh_connection_setup_s')} s"


def _parallel(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    p, cores = data["results"]["parallel"], _cores(data)
    return (
        f"machine: {cores} cores (every transfer is CPU-bound)",
        f"limit: {_f(p['cpu_limit_mb_s'])} MB/s ({cores} cores over the CPU seconds per byte "
        f"of all processes involved, same run); 8 at once moved {_f(p['aggregate_mb_s'])} MB/s, "
        f"{_f(p['vs_cpu_limit'])}× that limit, idle share {p.get('idle_concurrent')}",
    )


def _latency(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    lat = data["results"]["latency"]
    return LIBRARY, "medians, samples interleaved in blocks: " + ", ".join(
        f"{k} {_f(1000 * v['median'])} ms (n={v['n']}, p90 {_f(1000 * v['p90'])})"
        for k, v in lat.items()
    )


def _controller(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    r = data["results"]
    cm = r["controlmaster_baseline"]
    return LIBRARY, (
        f"an idle Manager's peak RSS {_f(r['idle']['peak_rss_mb'])} MB of it; "
        f"{cm['masters']} OpenSSH ControlMasters to the same servers: "
        f"{_f(cm['peak_rss_mb_sum'])} MB"
    )


def _scale_rest(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    r = data["results"]
    c, ctl = r["commands"], r["controller"]
    if target["name"].startswith("commands_"):
        return LIBRARY, (
            f"{c['succeeded']} of {c['commands']} succeeded, each output checked, "
            f"{_f(c['wall_s'])} s ({_f(c['per_second'])}/s)"
        )
    return LIBRARY, (
        f"idle Manager {_f(ctl['idle_peak_rss_mb'])} MB, {ctl['connected']} connected; "
        f"{_f(ctl['rss_per_server_mb'])} MB per server"
    )


def _demo(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    runs = data["results"]["runs"]
    return LIBRARY, ", ".join(
        f"{r['servers']} servers: {'ok' if r['ok'] else 'failed'}"
        + (f" in {_f(r['wall_s'])} s" if r.get("wall_s") else "")
        for r in runs
    )


def _rss(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    growth = data["results"]["peak_rss_growth_mib"]
    return LIBRARY, "peak RSS growth per form (MiB): " + ", ".join(
        f"{k} {v}" for k, v in growth.items()
    )


def _ec2_runs(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], float]:
    """The largest fleet, the median single server's run, and the pending time."""
    runs = data["results"]["runs"]
    singles = sorted((r for r in runs if r["n"] == 1), key=lambda r: r["wall_s"])
    big = max(runs, key=lambda r: r["n"])
    return big, singles[len(singles) // 2], float(data["params"]["pending_s"])


def _ec2_fleet(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    big, one, pending = _ec2_runs(data)
    n, cloud = big["n"], big["cloud_last_running_s"]
    text = (
        f"the cloud had all {n} running (sshd listening) {_f(cloud)} s after the launch, "
        f"one in {_f(one['cloud_last_running_s'])} s; the library's share then "
        f"{_f(big['library_share_s'])} s, one server's {_f(one['library_share_s'])} s"
    )
    if cloud > pending + 1.0:
        over = cloud - pending
        return (
            f"library and machine: the {n} hosts' boot on {_cores(data)} cores outlasted "
            f"the {pending:g} s pending",
            text + f"; the boot ran {_f(over)} s past the pending time, so the cloud alone "
            f"is {_f(cloud / one['cloud_last_running_s'])}× one server's; all ready "
            f"{_f(big['wall_s'] / cloud)}× the cloud's time",
        )
    return LIBRARY, text + ": the boot hid inside the pending time"


def _ec2_share(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    big, one, _ = _ec2_runs(data)
    split = (
        f"{_f(big['poll_wait_s'])} s waiting for the next poll round, "
        f"{_f(big['after_poll_s'])} s after it (host keys from the console outputs, ssh)"
        if big.get("poll_wait_s") is not None
        else "no poll round after it (the library saw them at once)"
    )
    return LIBRARY, (
        f"of it {split}; the controller used {_f(big['controller_cpu_s'])} CPU s for the "
        f"{big['n']} ({_f(big['controller_cpu_ms_per_server'])} ms per server) on one event "
        f"loop; one server's share {_f(one['library_share_s'])} s"
    )


def _ec2_cpu(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    runs = [r for r in data["results"]["runs"] if r["n"] > 1]
    return LIBRARY, "controller CPU per server: " + ", ".join(
        f"N={r['n']} {_f(r['controller_cpu_ms_per_server'])} ms" for r in runs
    )


def _pyinfra_floor(data: dict[str, Any], target: dict[str, Any]) -> tuple[str, str]:
    """The fleet command against the instances' sshd CPU on these cores, as for Fabric."""
    c, cores = data["results"]["command"], _cores(data)
    rounds = _default(data, target)
    sshd = c.get("instances_cpu_s")
    if not sshd or not c.get("pyinfra_s"):  # not measured (an older run) or not run
        return LIBRARY, rounds
    floor = sshd / cores
    most = c["pyinfra_s"] / floor
    text = (
        f"{rounds}; limit: the instances' sshd used {_f(sshd)} CPU s for the command, the "
        f"same whoever connects: {_f(floor)} s of {cores} cores; asyncstage "
        f"{_f(c['asyncstage_s'])} s = {_f(c['asyncstage_s'] / floor)}× it, pyinfra "
        f"{_f(c['pyinfra_s'])} s = {_f(most)}× it"
    )
    if target["met"] or most >= target["limit"]:
        return LIBRARY, text
    return (
        f"machine: {data['params']['servers']} servers' sshd on the controller's {cores} cores",
        text + f": no client can be more than {_f(most)}× ahead of pyinfra here",
    )


RULES: dict[tuple[str, str], Rule] = {
    ("pyinfra", "fleet_command_vs_pyinfra"): _pyinfra_floor,
    ("pyinfra", "fleet_command_client_cpu_vs_pyinfra"): _client_cpu(
        "pyinfra", "pyinfra", lambda r: r.get("command_client_cpu")
    ),
    ("fleet_ec2", "fleet_ec2_*_vs_single"): _ec2_fleet,
    ("fleet_ec2", "fleet_ec2_*_library_share"): _ec2_share,
    ("fleet_ec2", "fleet_ec2_controller_cpu_flat"): _ec2_cpu,
    ("commands", "*"): _latency,
    ("controller", "*"): _controller,
    ("scale", "peak_rss_*"): _scale_rest,
    ("scale", "commands_*"): _scale_rest,
    ("demo", "*"): _demo,
    ("streaming", "streaming_peak_rss_growth"): _rss,
    ("fleet", "fleet_*_vs_single"): _fleet,
    ("fleet", "describe_calls_per_round_max"): _describe,
    ("scale", "fleet_*_vs_single"): _scale_fleet,
    ("scale", "fleet_*_describe_calls_per_round"): _describe,
    ("fabric", "fleet_command_vs_fabric"): _fabric_floor,
    ("fabric", "fleet_command_client_cpu_vs_fabric"): _client_cpu(
        "fabric", "Fabric", lambda r: r["fleet"].get("client_cpu")
    ),
    ("fabric", "fleet_command_warm_vs_fabric"): _fabric_fleet_rounds,
    ("streaming", "scmd_read_vs_*"): _streaming_pipe,
    ("streaming", "scmd_write_vs_*"): _streaming_pipe,
    ("streaming", "scmd_to_file_vs_*"): _streaming_file,
    ("streaming", "scmd_from_file_vs_*"): _streaming_file,
    ("transfers", "parallel_vs_cpu_limit"): _parallel,
}


def _cores(data: dict[str, Any]) -> int:
    return int(data.get("machine", {}).get("cpus") or os.cpu_count() or 1)


def _default(data: dict[str, Any], target: dict[str, Any], reps_key: str = "repeats") -> str:
    """What a library-bound row's figure is: the same run's sides, rounds and spread."""
    params = data.get("params", {})
    if target.get("not_run"):
        return f"not run: {target['not_run']}"
    parts = []
    reps = params.get(reps_key) or params.get("repeats")
    if reps:
        parts.append(f"{reps} rounds each side, taken in turn, medians")
    if target.get("spread"):
        lo, hi = target["spread"]
        parts.append(f"rounds' ratios {lo}-{hi}")
    return "; ".join(parts) or "measured in the same run (see the benchmark's JSON)"


def restate(benchmark: str, data: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """``target`` with ``bound`` and ``evidence`` (the script's own, else derived)."""
    if target.get("bound") and target.get("evidence"):
        return target
    from fnmatch import fnmatch

    for (bench, pattern), rule in RULES.items():
        if bench == benchmark and fnmatch(target["name"], pattern):
            try:
                bound, evidence = rule(data, target)
            except (KeyError, TypeError, ZeroDivisionError) as e:  # an older JSON's shape
                bound, evidence = LIBRARY, f"not derivable from this run's JSON ({e!r})"
            break
    else:
        bound, evidence = LIBRARY, _default(data, target)
    return {"bound": bound, "evidence": evidence} | target
