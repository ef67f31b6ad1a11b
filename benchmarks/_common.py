"""Shared helpers of the benchmark scripts: arguments, the local cloud, OpenSSH argv, reports.

Every script measures asyncstage side by side with a baseline in the same run and
reports ratios (the machines these run on are shared and noisy: absolute times vary,
ratios much less). Each writes ``<results>/<name>.json`` and prints its tables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from asyncstage import Manager, shell  # noqa: E402
from asyncstage.localcloud import LocalCloud, Realism  # noqa: E402
from asyncstage.localcloud._disks import Store  # noqa: E402
from asyncstage.localcloud._network import NetworkMode  # noqa: E402
from asyncstage.ssh import SSHHost  # noqa: E402

RESULTS = HERE / "results"
QUICK_RESULTS = RESULTS / "quick"

# The cipher both sides use in the streaming benchmarks. asyncssh prefers it by default
# (and SSHHost offers no cipher option); OpenSSH is told explicitly with -c.
CIPHER = "chacha20-poly1305@openssh.com"

MiB = 1 << 20
GiB = 1 << 30


# -- arguments ---------------------------------------------------------------------------


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke test, figures meaningless"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"where the JSON goes (default {RESULTS}, or {QUICK_RESULTS} with --quick)",
    )
    args = parser.parse_args(argv)
    if args.results is None:
        args.results = QUICK_RESULTS if args.quick else RESULTS
    return args


# -- the machine -------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    out = (done.stdout or done.stderr).strip().splitlines()
    return out[0] if out else "?"


def machine_info() -> dict[str, Any]:
    """What the figures came from."""
    import asyncssh

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kb / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "asyncssh": asyncssh.__version__,
        "openssh": _version(["ssh", "-V"]),
        "rsync": _version(["rsync", "--version"]),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- statistics --------------------------------------------------------------------------


def summary(samples: Sequence[float]) -> dict[str, float]:
    """min, median, p90 and mean of samples (seconds), rounded to microseconds."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {
        "n": len(ordered),
        "min": round(ordered[0], 6),
        "median": round(statistics.median(ordered), 6),
        "p90": round(p90, 6),
        "mean": round(statistics.fmean(ordered), 6),
    }


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("inf")


def paired_spread(top: Sequence[float], bottom: Sequence[float]) -> list[float] | None:
    """[lowest, highest] of the ratios ``top[i] / bottom[i]`` of rounds run in turn
    (None with fewer than two pairs): how far one round's figure moved from another's."""
    pairs = [ratio(t, b) for t, b in zip(top, bottom, strict=False)]
    return [min(pairs), max(pairs)] if len(pairs) >= 2 else None


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    t = time.perf_counter()
    await fn()
    return time.perf_counter() - t


def cpu_times_of(pids: Sequence[int]) -> float:
    """utime+stime (seconds) of these processes and their waited-for children."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / tick


# -- reports -----------------------------------------------------------------------------


@dataclass
class Report:
    """The figures of one benchmark script: tables for people, JSON for the record."""

    name: str
    quick: bool
    results_dir: Path
    params: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load: dict[str, list[float]] = field(default_factory=dict)
    started: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )
    _t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.load["start"] = loadavg()

    def mark_load(self, label: str) -> None:
        """Remember the load average now (other test runs may share the machine)."""
        self.load[label] = loadavg()

    def target(
        self,
        name: str,
        value: float,
        op: str,
        limit: float,
        what: str,
        unit: str = "×",
        *,
        bound: str | None = None,
        evidence: str | None = None,
        spread: Sequence[float] | None = None,
    ) -> None:
        """A target: ``value op limit`` (op is ``<=``, ``>=`` or ``<``), judged on ``value``
        (a median where there are rounds; ``spread``: [lowest, highest] round beside it).

        ``bound``: ``library``, or the machine or dependency limit that decides the figure;
        ``evidence``: what this run measured that shows it. Left out, the summary restates
        them from the run's own figures (``_bounds.py``).
        """
        met = {"<=": value <= limit, ">=": value >= limit, "<": value < limit}[op]
        row: dict[str, Any] = {
            "name": name,
            "value": value,
            "op": op,
            "limit": limit,
            "unit": unit,
            "what": what,
            "met": bool(met),
        }
        if spread is not None:
            row["spread"] = [round(x, 3) for x in spread]
        if bound is not None:
            row["bound"] = bound
        if evidence is not None:
            row["evidence"] = evidence
        self.targets.append(row)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}")

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Print a table (and keep it in the JSON)."""
        cells = [[_cell(c) for c in row] for row in rows]
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        print(f"\n{title}")
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for row in cells:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        self.results.setdefault("tables", []).append(
            {"title": title, "headers": list(headers), "rows": cells}
        )

    def save(self) -> Path:
        self.load["end"] = loadavg()
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"{self.name}.json"
        data = {
            "benchmark": self.name,
            "quick": self.quick,
            "started": self.started,
            "seconds": round(time.perf_counter() - self._t0, 1),
            "machine": machine_info(),
            "load": self.load,
            "params": self.params,
            "results": self.results,
            "targets": self.targets,
            "notes": self.notes,
        }
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        if self.targets:
            print()
            for t in self.targets:
                mark = "ok  " if t["met"] else "MISS"
                print(
                    f"[{mark}] {t['name']}: {t['value']:g}{t['unit']} (target {t['op']} "
                    f"{t['limit']:g}{t['unit']}) - {t['what']}"
                )
        print(f"\nwrote {path} (load {self.load['start']} -> {self.load['end']})")
        return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.2f}"
        return f"{value:.4f}"
    return str(value)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# -- the local cloud -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def local_cloud(
    boot_delay: float = 0.0,
    realism: Realism | None = None,
    network: NetworkMode = "auto",
    store: Store = "plain",
    **manager_options: Any,
) -> AsyncIterator[tuple[LocalCloud, Manager]]:
    """A running local cloud and an open Manager on it (terminates everything on exit).

    ``realism``: the cloud's profile (default: the realistic one, as in the tests);
    ``network``: where its instances live (the default: the VPC network where the machine
    can make it, as the local cloud); ``store``: where its images live (the default:
    files in its state dir, each snapshot a copy).
    """
    if os.geteuid() != 0:
        raise SystemExit("the benchmarks run on the local cloud, which needs root")
    dotdir = Path(tempfile.mkdtemp(prefix="asyncstage-bench-"))
    options: dict[str, Any] = {
        "dotdir": dotdir,
        "on_exit": "terminate",
        "scan": False,
        "verbosity": 0,
    }
    options.update(manager_options)
    try:
        cloud_options: dict[str, Any] = {"network": network, "store": store}
        if realism is not None:
            cloud_options["realism"] = realism
        async with (
            LocalCloud(boot_delay=boot_delay, **cloud_options) as cloud,
            cloud.manager(**options) as m,
        ):
            yield cloud, m
    finally:
        shutil.rmtree(dotdir, ignore_errors=True)


class CallWatcher:
    """Samples ``cloud.api_calls`` in a thread: when each call of one action arrived.

    Calls that arrive within ``gap`` seconds of each other form one poll round.
    """

    def __init__(self, cloud: LocalCloud, action: str, period: float = 0.005) -> None:
        self.cloud = cloud
        self.action = action
        self.period = period
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-calls")

    def _run(self) -> None:
        seen = self.cloud.api_calls[self.action]
        while not self._stop.is_set():
            now = self.cloud.api_calls[self.action]
            if now > seen:
                self.times += [time.perf_counter()] * (now - seen)
                seen = now
            self._stop.wait(self.period)

    def __enter__(self) -> CallWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def rounds(self, gap: float = 0.15) -> list[int]:
        """Calls per round: calls closer than ``gap`` to the previous one share its round."""
        sizes: list[int] = []
        last = -1e9
        for t in self.times:
            if t - last > gap or not sizes:
                sizes.append(0)
            sizes[-1] += 1
            last = t
        return sizes


# -- OpenSSH -----------------------------------------------------------------------------


def openssh_argv(host: SSHHost, *cmd: str, extra: Sequence[str] = ()) -> list[str]:
    """``ssh`` with the library's key and known_hosts (StrictHostKeyChecking=yes) and the
    ``extra`` options, running the shell line ``cmd`` (none: no command)."""
    return shell.openssh_argv([*host.openssh_options(), *extra], host.username, host.address, *cmd)


class ControlMaster:
    """An OpenSSH ControlMaster to one host, started and stopped by pid (ours only)."""

    def __init__(self, host: SSHHost, directory: Path, *extra: str) -> None:
        self.host = host
        self.socket = directory / f"cm-{host.address}-{host.port}"
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def client_argv(self, *cmd: str) -> list[str]:
        control = ["-o", "ControlMaster=no", "-o", f"ControlPath={self.socket}"]
        return openssh_argv(self.host, *cmd, extra=[*self.extra, *control])

    def spawn(self) -> None:
        """Start the master process (it connects in the background)."""
        control = ["-N", "-o", "ControlMaster=yes", "-o", f"ControlPath={self.socket}"]
        argv = openssh_argv(self.host, extra=[*self.extra, *control])
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    def ready(self) -> bool:
        """True once the master accepts clients (raises if it exited)."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"ControlMaster to {self.host.address} exited")
        control = ["-o", f"ControlPath={self.socket}", "-O", "check"]
        check = subprocess.run(
            openssh_argv(self.host, extra=control), capture_output=True, check=False
        )
        return check.returncode == 0

    def start(self, timeout: float = 20.0) -> None:
        self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            time.sleep(0.05)
        raise RuntimeError("ControlMaster did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def __enter__(self) -> ControlMaster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_sync(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), check=True, **kwargs)


async def to_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args)


def _busy_jiffies() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class MachineCPU:
    """How busy the whole machine's CPUs were during a block (1.0 = every core busy)."""

    def __init__(self) -> None:
        self.busy = 0.0

    def __enter__(self) -> MachineCPU:
        self._start = _busy_jiffies()
        return self

    def __exit__(self, *exc: object) -> None:
        end = _busy_jiffies()
        total = end[1] - self._start[1]
        self.busy = round((end[0] - self._start[0]) / total, 3) if total else 0.0


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds incl. waited-for children) of every process."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick)
    return table


def tree_cpu(root: int | None = None) -> float:
    """CPU seconds used so far by ``root`` (default: this process) and its descendants.

    Live descendants count with their own time, ended ones through the waited-for
    children time of whoever reaped them: the benchmark's own share of the machine
    (the local cloud's hosts, their sshd and commands, and this process), without
    other people's processes.
    """
    root = os.getpid() if root is None else root
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            total += table[pid][1]
        todo += children.get(pid, [])
    return total


class OwnCPU:
    """CPU seconds this process tree used during a block (see :func:`tree_cpu`)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> OwnCPU:
        self._start = tree_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = round(tree_cpu() - self._start, 3)


# -- where the CPU went: the controller, the local cloud, the instances ---------------------

# Threads of the local cloud, which runs inside the benchmark process: its API server
# ("localcloud-api") and the threads answering requests, its engine's workers
# ("localcloud_N") and its timers (boot, device nodes, snapshots).
_CLOUD_THREAD_NAMES = ("localcloud", "process_request_thread")


def _is_cloud_thread(thread: threading.Thread) -> bool:
    return isinstance(thread, threading.Timer) or any(
        part in thread.name for part in _CLOUD_THREAD_NAMES
    )


class EndedThreads:
    """CPU seconds of this process's threads that have ended, by side (``cloud``,
    ``bench``, ``controller``).

    /proc lists live threads only, and ``getrusage`` keeps an ended thread's CPU in the
    process's total without saying whose it was: the local cloud's short-lived threads
    (an image copy, a timer, a request's thread) would count as the controller's once
    ended. Each thread started after :meth:`install` adds its own CPU here as it ends.
    """

    seconds: ClassVar[dict[str, float]] = {"cloud": 0.0, "bench": 0.0, "controller": 0.0}
    _lock = threading.Lock()
    _original: Callable[[threading.Thread], None] | None = None

    @classmethod
    def install(cls) -> None:
        """Count every thread started from now on as it ends (once per process)."""
        if cls._original is not None:
            return
        original = cls._original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

        def bootstrap_inner(thread: threading.Thread) -> None:
            try:
                original(thread)
            finally:  # still on the ended thread: its own clock
                with cls._lock:
                    cls.seconds[thread_side(thread)] += time.thread_time()

        threading.Thread._bootstrap_inner = bootstrap_inner  # type: ignore[attr-defined]

    @classmethod
    def uninstall(cls) -> None:
        """Stop counting (threads already running keep counting as they end)."""
        if cls._original is not None:
            threading.Thread._bootstrap_inner = cls._original  # type: ignore[attr-defined]
            cls._original = None


def thread_side(thread: threading.Thread) -> str:
    """Whose thread this is: the local cloud's, the benchmark's own samplers', or the
    controller's (the event loop and its worker threads)."""
    if _is_cloud_thread(thread):
        return "cloud"
    return "bench" if thread.name.startswith(BENCH_THREAD) else "controller"


BENCH_THREAD = "bench-"
"""Name prefix of the benchmark's own threads (samplers): neither controller nor cloud."""
EndedThreads.install()  # on import: before the local cloud starts a thread


def _thread_cpu(native_id: int, pid: int | str = "self") -> float:
    """CPU seconds of one thread (its scheduler run time, counted in ns: /proc's stat
    counts in clock ticks, and a process that lives for a few ms shows 0 there)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/task/{native_id}/schedstat").read_text().split()[0]) / 1e9
    return 0.0


def descendants_cpu(root: int | None = None) -> float:
    """CPU seconds used so far by the processes under ``root`` (default: this process).

    Like :func:`tree_cpu` without ``root``'s own time, but a live process counts with
    its threads' scheduler run time (ns) rather than /proc's clock ticks, which show 0
    for the short lives of sshd's sessions; ended ones count through the waited-for
    children time of whoever reaped them.
    """
    root = os.getpid() if root is None else root
    tick = os.sysconf("SC_CLK_TCK")
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total = 0.0
    with contextlib.suppress(OSError, IndexError, ValueError):  # what root reaped
        fields = Path(f"/proc/{root}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[13]) + int(fields[14])) / tick
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[13]) + int(fields[14])) / tick
            with contextlib.suppress(OSError):
                total += sum(_thread_cpu(int(t), pid) for t in os.listdir(f"/proc/{pid}/task"))
        todo += children.get(pid, [])
    return total


def cloud_threads_cpu() -> float:
    """CPU seconds used so far by the local cloud's threads in this process, the live
    ones and those that ended (:class:`EndedThreads`)."""
    return EndedThreads.seconds["cloud"] + sum(
        _thread_cpu(t.native_id)
        for t in threading.enumerate()
        if t.native_id is not None and _is_cloud_thread(t)
    )


def process_cpu() -> float:
    """CPU seconds of this process: every thread, ended ones too; no child processes."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CPUAccounting:
    """This process and every process it starts from now on (the local cloud's
    instances, their sshd, sessions and commands) in a cgroup v1 ``cpuacct`` group of
    their own, whose counter has every CPU nanosecond they used, ended processes' too.

    /proc counts a live process's children in clock ticks, and sshd's short-lived
    processes (each session's pre-auth child, the commands) in their parent's only once
    it has ended, so ``descendants`` from /proc lags and rounds. Without the cgroup (no
    cpuacct hierarchy, not root) :func:`descendants_cpu` is the fallback. Enter it before
    the local cloud starts; on exit this process moves back and the group is removed
    (once the instances are gone).
    """

    ROOT = Path("/sys/fs/cgroup/cpuacct")
    active: CPUAccounting | None = None

    def __init__(self) -> None:
        self.path: Path | None = None

    def __enter__(self) -> CPUAccounting:
        path = self.ROOT / f"asyncstage-bench-{os.getpid()}"
        try:
            path.mkdir()
        except OSError:
            return self
        try:
            (path / "cgroup.procs").write_text(f"{os.getpid()}\n")
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return self
        self.path = path
        CPUAccounting.active = self
        return self

    def usage(self) -> float:
        """CPU seconds used in the group so far."""
        assert self.path is not None
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    @property
    def counted_by(self) -> str:
        """Where the instances' CPU figures come from, for a report's parameters."""
        return "cgroup cpuacct" if self.path else "/proc (clock ticks)"

    def system(self) -> float:
        """Of :meth:`usage`, the seconds spent in the kernel."""
        assert self.path is not None
        return int((self.path / "cpuacct.usage_sys").read_text()) / 1e9

    def __exit__(self, *exc: object) -> None:
        if self.path is None:
            return
        CPUAccounting.active = None
        with contextlib.suppress(OSError):
            (self.ROOT / "cgroup.procs").write_text(f"{os.getpid()}\n")
        for _ in range(50):  # processes that are still ending keep it busy for a moment
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"note: {self.path} left behind (processes still in it)")


@dataclass(frozen=True)
class CPUSample:
    """Clocks at one moment, to split a stretch of time by who used the CPU.

    ``process``: this process (the controller, plus the local cloud's threads, counted
    apart in ``cloud``), read before and after the sample's own reading of /proc (that
    reading is then counted to neither side of it); ``descendants``: the processes under
    it — the local cloud's instances with their sshd, the sessions and the commands (see
    :func:`tree_cpu`); ``busy``/``jiffies``: the whole machine's busy and total CPU time.
    """

    wall: float
    process: float
    process_after: float
    cloud: float
    descendants: float
    busy: int
    jiffies: int

    @classmethod
    def now(cls) -> CPUSample:
        wall, process = time.perf_counter(), process_cpu()
        busy, jiffies = _busy_jiffies()
        cloud = cloud_threads_cpu()
        group = CPUAccounting.active  # every process of ours: take this one's away
        descendants = group.usage() - process_cpu() if group else descendants_cpu()
        return cls(wall, process, process_cpu(), cloud, descendants, busy, jiffies)


def cpu_split(start: CPUSample, end: CPUSample, settled: CPUSample | None = None) -> dict[str, Any]:
    """Wall time, the CPU of the controller, the cloud's threads and the instances, and the
    idle share of the machine's cores from ``start`` to ``end``.

    ``settled``: a later sample taken once the instances' processes have finished
    (:func:`settled_sample`); their CPU is counted up to it (a process that ends is
    counted again through whoever reaps it, a moment later). The rest ends at ``end``.
    """
    cloud = end.cloud - start.cloud
    jiffies = end.jiffies - start.jiffies
    return {
        "wall_s": round(end.wall - start.wall, 4),
        "controller_cpu_s": round(end.process - start.process_after - cloud, 4),
        "cloud_cpu_s": round(cloud, 4),
        "instances_cpu_s": round((settled or end).descendants - start.descendants, 4),
        "idle_share": round(1 - (end.busy - start.busy) / jiffies, 3) if jiffies else None,
    }


def settled_sample(quiet: float = 0.002, step: float = 0.05, limit: float = 3.0) -> CPUSample:
    """A :class:`CPUSample` taken once the instances' processes stopped using CPU (their
    CPU grew by less than ``quiet`` seconds over ``step``), or after ``limit`` seconds.

    Blocking: call it in a thread from async code (``await to_thread(settled_sample)``).
    """
    deadline = time.monotonic() + limit
    last = CPUSample.now()
    while time.monotonic() < deadline:
        time.sleep(step)
        sample = CPUSample.now()
        if sample.descendants - last.descendants < quiet:
            return sample
        last = sample
    return last
