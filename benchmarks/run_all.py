"""Run every benchmark (each in its own process), then summarise the targets.

``python benchmarks/run_all.py`` (``make bench``) writes ``benchmarks/results/*.json``,
``summary.json`` and ``summary.md`` (the table benchmarks/README.md links to).
``--quick`` (``make bench-quick``, and the CI smoke test) uses small sizes and writes
to ``benchmarks/results/quick/``: it keeps the scripts working, its figures mean little.
``--only fleet,commands`` runs some of them; the summary still covers every result
JSON in the directory (each with the date and machine it came from), so a partial run
updates its rows and keeps the others'.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "fleet",
    "fleet_ec2",
    "commands",
    "streaming",
    "network",
    "transfers",
    "controller",
    "scale",
    "perl",
    "fabric",
    "pyinfra",
    "demo",
    "check",
    "keep",
    "backup",
    "follow",
    "output",
]


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def summarise(results: Path, names: list[str]) -> dict[str, Any]:
    if str(HERE) not in sys.path:  # imported from elsewhere (the smoke test reads SCRIPTS)
        sys.path.insert(0, str(HERE))
    from _bounds import restate

    rows: list[dict[str, Any]] = []
    machine: dict[str, Any] = {}
    loads: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    for name in names:
        path = results / f"{name}.json"
        if not path.exists():  # shown, not dropped: the benchmark has no figures here
            rows.append(
                {
                    "benchmark": name,
                    "name": f"{name}_results",
                    "what": f"{name}.json",
                    "value": None,
                    "not_run": "no results in this directory",
                    "met": False,
                    "bound": "-",
                    "evidence": f"run `run_all.py --only {name}`",
                }
            )
            continue
        data = json.loads(path.read_text())
        machine = data.get("machine", machine)
        loads[name] = data.get("load", {})
        runs[name] = {"started": data.get("started"), "machine": data.get("machine", {})}
        # a benchmark run in parts, each at a time of its own: when the last one started
        latest = max((data.get("params") or {}).get("parts_started", {}).values(), default=None)
        if latest and latest != data.get("started"):
            runs[name]["last_part_started"] = latest
        for t in data.get("targets", []):
            rows.append({"benchmark": name, **restate(name, data, t)})
    return {"machine": machine, "load": loads, "runs": runs, "targets": rows}


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| benchmark | figure | value (spread) | target | met | bound | evidence (same run) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in summary["targets"]:
        if t["value"] is None:  # a baseline could not run the step
            value = f"not run: {t.get('not_run', '')}"
        else:
            value = f"{_fmt(t['value'])}{t['unit']}"
            if t.get("spread"):
                lo, hi = t["spread"]
                value += f" ({_fmt(lo)}–{_fmt(hi)})"
        cells = [
            t["benchmark"],
            t["what"],
            value,
            f"{t['op']} {_fmt(t['limit'])}{t['unit']}" if "limit" in t else "-",
            "yes" if t["met"] else "**no**",
            t.get("bound", ""),
            t.get("evidence", ""),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    # One line per machine the figures came from (a partial run keeps older rows).
    machines: dict[str, list[str]] = {}
    for name, run in summary.get("runs", {}).items():
        m = run.get("machine") or {}
        line = (
            f"{m.get('cpus')} × {m.get('cpu')}, {m.get('memory_gib')} GiB, "
            f"Linux {m.get('kernel')}, Python {m.get('python')}, asyncssh {m.get('asyncssh')}, "
            f"{m.get('openssh')}, {m.get('rsync')}"
        )
        when = run.get("started") or "?"
        if run.get("last_part_started"):
            when += f" to {run['last_part_started']} (parts)"
        machines.setdefault(line, []).append(f"{name} {when}")
    if machines:
        lines.append("")
    for line, runs in machines.items():
        lines.append(f"Machine ({'; '.join(runs)}): {line}.")
    loads = summary["load"]
    if loads:
        parts = [
            f"{name} {v.get('start', ['?'])[0]}→{v.get('end', ['?'])[0]}"
            for name, v in loads.items()
        ]
        lines.append(f"Load average (1 min) at start→end: {', '.join(parts)}.")
    return "\n".join(lines) + "\n"


# A running script: its name, process, start time and output file (None: the terminal).
Running = tuple[str, subprocess.Popen[str], float, Any]

# The longest quick runs (each compares with a baseline that takes its own time) start
# first, so that the short ones fill the other slots instead of one long run ending alone.
QUICK_FIRST = ["perl", "fabric", "transfers", "controller", "demo"]


def quick_order(names: list[str]) -> list[str]:
    """``names``, the longest quick runs first, the others in their order."""
    return sorted(names, key=lambda n: QUICK_FIRST.index(n) if n in QUICK_FIRST else len(names))


def run_scripts(names: list[str], results: Path, quick: bool, jobs: int) -> list[str]:
    """Run the scripts, ``jobs`` at a time; the names of those that failed.

    A slot is refilled as soon as any of its scripts ends; each script's output is
    printed in one piece when it ends.
    """
    failed: list[str] = []
    pending = quick_order(names) if quick else list(names)
    running: list[Running] = []
    with contextlib.ExitStack() as files:
        while pending or running:
            _refill(pending, running, results, quick, jobs, files)
            ended = [r for r in running if r[1].poll() is not None]
            if not ended:
                time.sleep(0.2)
                continue
            for entry in ended:
                running.remove(entry)
                if not _report(*entry):
                    failed.append(entry[0])
    return failed


def _refill(
    pending: list[str],
    running: list[Running],
    results: Path,
    quick: bool,
    jobs: int,
    files: contextlib.ExitStack,
) -> None:
    """Start pending scripts until ``jobs`` run."""
    while pending and len(running) < jobs:
        name = pending.pop(0)
        argv = [sys.executable, str(HERE / f"bench_{name}.py"), "--results", str(results)]
        if quick:
            argv.append("--quick")
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"=== {name}: starting (load {load}) ===", flush=True)
        # a file, not a pipe: a script is never blocked on output nobody reads yet
        capture = None
        if jobs > 1:
            # closed by the ExitStack: it outlives this function
            capture = files.enter_context(tempfile.TemporaryFile("w+"))  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=capture, stderr=subprocess.STDOUT, text=True)
        running.append((name, proc, time.perf_counter(), capture))


def _report(name: str, proc: subprocess.Popen[str], started: float, capture: Any) -> bool:
    """Print an ended script's output and its line; whether it succeeded."""
    if capture is not None:
        capture.seek(0)
        print(capture.read(), end="")
        capture.close()
    code = proc.returncode
    print(
        f"=== {name}: {'ok' if code == 0 else f'FAILED ({code})'}, "
        f"{time.perf_counter() - started:.0f} s ===",
        flush=True,
    )
    return code == 0


def _charts(results: Path) -> None:
    """PNG charts of the full run (benchmarks/charts.py); a note when matplotlib is missing."""
    from charts import write_charts

    try:
        written = write_charts(results)
    except ImportError as e:  # matplotlib: pip install 'asyncstage[bench]' (make bench does)
        print(f"no charts: {e}", file=sys.stderr)
        return
    for path in written:
        print(f"chart: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(SCRIPTS))
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="scripts run at once (default: all with --quick, where figures do not matter; "
        "else 1, so that they do not disturb each other)",
    )
    parser.add_argument(
        "--summarise",
        action="store_true",
        help="run nothing: the summary (and charts) of the result JSON already there",
    )
    args = parser.parse_args()
    results = args.results or (HERE / "results" / ("quick" if args.quick else ""))
    names = [n for n in args.only.split(",") if n] or SCRIPTS
    unknown = set(names) - set(SCRIPTS)
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    jobs = args.jobs or (len(names) if args.quick else 1)
    failed = [] if args.summarise else run_scripts(names, results, args.quick, jobs)
    summary = summarise(results, SCRIPTS)
    summary["failed"] = failed
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    (results / "summary.md").write_text(table)
    print("\n" + table)
    if not args.quick:
        _charts(results)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
