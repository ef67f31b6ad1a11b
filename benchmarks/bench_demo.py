"""The demo at scale: ``asyncstage demo --servers N`` for N = 4, 16 and 50.

Each run is the command a new user types (a fresh process with its own local cloud),
``--json`` for its figures: the wall time, each step's seconds and bytes. Its wall
time should grow with the data backed up, not with waiting: the report gives the
seconds per GB moved for every N and the run's exit status (a run that fails is
reported with the tail of its output, and the next N still runs).
Quick mode: ``--servers 2 --small``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import anyio
from _common import ROOT, Report, parse_args, ratio, to_thread

_CLI = "import sys; from asyncstage.cli import main; sys.exit(main())"


def _demo(servers: int, small: bool, timeout: float) -> dict[str, Any]:
    argv = [sys.executable, "-c", _CLI, "demo", "--servers", str(servers), "--json", "-q"]
    if small:
        argv.append("--small")
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t = time.perf_counter()
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"servers": servers, "ok": False, "error": f"no end within {timeout:g} s"}
    wall = time.perf_counter() - t
    out: dict[str, Any] = {"servers": servers, "wall_s": round(wall, 2), "exit": done.returncode}
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return out | {"ok": False, "error": " | ".join(tail) or "no output"}
    steps = result.get("steps", [])
    moved = sum(s.get("bytes") or 0 for s in steps)
    out |= {
        "ok": bool(result.get("ok")) and done.returncode == 0,
        "elapsed_s": round(result.get("elapsed", wall), 2),
        "bytes_moved": moved,
        "s_per_gb": round(wall / (moved / 1e9), 2) if moved else None,
        "steps": steps,
    }
    return out


async def main() -> None:
    args = parse_args(__doc__ or "")
    sizes = [2] if args.quick else [4, 16, 50]
    timeout = 240.0 if args.quick else 1200.0
    report = Report("demo", args.quick, args.results)
    report.params = {"servers": sizes, "small": args.quick, "timeout_s": timeout}
    runs = []
    for n in sizes:
        runs.append(await to_thread(_demo, n, args.quick, timeout))
        print(f"demo --servers {n}: { {k: v for k, v in runs[-1].items() if k != 'steps'} }")
        report.mark_load(f"after_{n}")
    report.table(
        "asyncstage demo --servers N (a fresh process and local cloud each)",
        ["N", "wall s", "ok", "GB moved", "s per GB", "note"],
        [
            [
                r["servers"],
                r.get("wall_s", "-"),
                "yes" if r["ok"] else "no",
                round(r.get("bytes_moved", 0) / 1e9, 3),
                r.get("s_per_gb") or "-",
                r.get("error", "")[:100],
            ]
            for r in runs
        ],
    )
    report.results["runs"] = runs
    first, last = runs[0], runs[-1]
    if first.get("s_per_gb") and last.get("s_per_gb"):
        report.results["s_per_gb_largest_vs_smallest"] = ratio(last["s_per_gb"], first["s_per_gb"])
    report.target(
        f"demo_{last['servers']}_failed",
        sum(1 for r in runs if not r["ok"]),
        "<=",
        0,
        f"demo runs that failed, N = {', '.join(map(str, sizes))}",
        unit="",
    )
    report.save()


if __name__ == "__main__":
    anyio.run(main)
