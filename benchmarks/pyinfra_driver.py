"""pyinfra's side of bench_pyinfra.py: one round of its jobs through pyinfra's Python API.

``python pyinfra_driver.py SPEC.json`` prints one JSON line: each job's seconds, timed
here (Python's and pyinfra's start-up left out), and what each server answered.

- command: connect to every server and run ``hostname`` on each (what
  ``pyinfra INVENTORY exec -- hostname`` does); with the CPU this process used for it
  (every thread, and any child processes it waited for), the controller's share;
- facts: ``uname -a`` and ``df -P /`` from every server (pyinfra's ``Command`` fact),
  over those connections, ``fact_repeats`` times (each time timed);
- put: ``files.put`` of one file to every server (SFTP, pyinfra's default), on a
  second state whose connections are opened before the clock starts.

Connections use the manager's key and each server's known_hosts with
``ssh_strict_host_key_checking=yes`` (an unknown or changed host key fails), no agent,
no other keys; the spec names only loopback addresses and the running local cloud's
public range (its instances' addresses, behind its router on this machine).
"""

from gevent import monkey

monkey.patch_all()  # as pyinfra's CLI does: its connections and its pool are gevent's

import ipaddress  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from pyinfra.api import Config, Inventory, State  # noqa: E402
from pyinfra.api.connect import connect_all, disconnect_all  # noqa: E402
from pyinfra.api.facts import get_facts  # noqa: E402
from pyinfra.api.operation import add_op  # noqa: E402
from pyinfra.api.operations import run_ops  # noqa: E402
from pyinfra.facts.server import Command  # noqa: E402
from pyinfra.operations import files, server  # noqa: E402


def _state(spec: dict[str, Any]) -> State:
    hosts = []
    cloud = [ipaddress.ip_network(r) for r in spec.get("cloud_ranges", [])]
    for h in spec["hosts"]:
        address = ipaddress.ip_address(h["address"])
        if not address.is_loopback and not any(address in r for r in cloud):  # nowhere else
            raise SystemExit(f"not a loopback or local cloud address: {h['address']}")
        hosts.append(
            (
                h["address"],
                {
                    "ssh_port": h["port"],
                    "ssh_user": spec["user"],
                    "ssh_key": spec["key"],
                    "ssh_known_hosts_file": h["known_hosts"],
                    "ssh_strict_host_key_checking": "yes",
                    "ssh_allow_agent": False,
                    "ssh_look_for_keys": False,
                },
            )
        )
    config = Config(PARALLEL=len(hosts), CONNECT_TIMEOUT=30)
    return State(Inventory((hosts, {})), config)


def _cpu() -> float:
    """CPU seconds of this process and the children it waited for, so far."""
    return sum(
        u.ru_utime + u.ru_stime
        for u in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )


def _check(state: State, n: int, what: str) -> None:
    active = len(list(state.inventory.get_active_hosts()))
    if state.failed_hosts or active != n:
        failed = sorted(h.name for h in state.failed_hosts)[:3]
        raise SystemExit(f"pyinfra {what}: {active} of {n} hosts active, failed {failed}")


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    n = len(spec["hosts"])
    out: dict[str, Any] = {}

    state = _state(spec)
    cpu, t = _cpu(), time.perf_counter()
    connect_all(state)
    add_op(state, server.shell, commands=["hostname"])
    run_ops(state)
    out["command_s"] = time.perf_counter() - t
    out["command_cpu_s"] = _cpu() - cpu
    _check(state, n, "command")

    out["facts_runs_s"] = []
    for _ in range(int(spec.get("fact_repeats", 1))):
        t = time.perf_counter()
        uname = get_facts(state, Command, ("uname -a",))
        df = get_facts(state, Command, ("df -P /",))
        out["facts_runs_s"].append(time.perf_counter() - t)
    out["facts"] = {h.name: [uname[h], df[h]] for h in state.inventory.get_active_hosts()}
    disconnect_all(state)

    if spec.get("put_src"):
        state = _state(spec)
        connect_all(state)
        t = time.perf_counter()
        add_op(state, files.put, src=spec["put_src"], dest=spec["put_dest"])
        run_ops(state)
        out["put_s"] = time.perf_counter() - t
        _check(state, n, "put")
        disconnect_all(state)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
