"""Shared parts of the baseline benchmarks (bench_perl.py, bench_fabric.py, bench_pyinfra.py).

- :class:`Alternate`: runs of asyncstage and a baseline taking turns (a b, b a, ...),
  where the baseline may be unable to run a step ("not run: <reason>").
- :class:`BaselineReport`: a :class:`_common.Report` whose targets may be "not run".
- :func:`raw_fleet`: a command on every server over raw asyncssh, the floor under the
  controller's CPU per server of asyncstage's fleet command; :class:`Phases` splits
  each phase's CPU, :func:`client_cpu` sets the sides' figures against it.
- :class:`PerlDriver`: the Perl VM::EC2::Staging driver (``perl/staging_bench.pl``),
  one request per line, with a deadline per step; started and stopped by its pid.
- :func:`make_tree`: a local tree of incompressible files.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import shutil
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncssh
from _common import (
    HERE,
    CPUSample,
    Report,
    cpu_split,
    paired_spread,
    ratio,
    settled_sample,
    to_thread,
)

from asyncstage import Server
from asyncstage.ssh.ciphers import encryption_algs

PERL_DRIVER = HERE / "perl" / "staging_bench.pl"
PERL_MODULE = "VM::EC2::Staging::Manager"


class NotRun(Exception):
    """A baseline could not do a step; the message says why."""


# -- taking turns --------------------------------------------------------------------------


@dataclass
class Alternate:
    """asyncstage (a) and a baseline (b) taking turns: a b, b a, a b ...

    A baseline run that raises :class:`NotRun` ends the baseline's runs of this step
    (``not_run`` keeps the reason); asyncstage's runs go on.
    """

    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    not_run: str | None = None

    async def run(
        self,
        reps: int,
        a: Callable[[], Awaitable[float | None]],
        b: Callable[[], Awaitable[float | None]],
        before: Callable[[str], Awaitable[Any]] | None = None,
    ) -> Alternate:
        """Each callable returns its own timed seconds, or None to be timed here.

        ``before("a")`` / ``before("b")`` runs untimed before each run of that side.
        """
        for rep in range(reps):
            order = [("a", a), ("b", b)] if rep % 2 == 0 else [("b", b), ("a", a)]
            for name, fn in order:
                if name == "b" and self.not_run is not None:
                    continue
                try:
                    if before is not None:
                        await before(name)
                    t = time.perf_counter()
                    seconds = await fn()
                    elapsed = time.perf_counter() - t if seconds is None else seconds
                except NotRun as e:
                    if name == "a":
                        raise
                    self.not_run = str(e)
                    print(f"  baseline not run: {e}")
                    continue
                getattr(self, name).append(elapsed)
                print(f"  {'asyncstage' if name == 'a' else 'baseline'}: {elapsed:.3f} s")
        return self

    def figures(self, baseline: str) -> dict[str, Any]:
        """Medians and runs; ``ratio`` = baseline time / asyncstage time (> 1: we are faster)."""
        a = statistics.median(self.a)
        out: dict[str, Any] = {
            "asyncstage_s": round(a, 4),
            "asyncstage_runs_s": [round(x, 4) for x in self.a],
        }
        if self.b:
            b = statistics.median(self.b)
            out |= {
                f"{baseline}_s": round(b, 4),
                f"{baseline}_runs_s": [round(x, 4) for x in self.b],
                "ratio": ratio(b, a),
                "ratio_spread": paired_spread(self.b, self.a),
            }
        else:
            out |= {f"{baseline}_s": None, "ratio": None}
        if self.not_run is not None:
            out["not_run"] = self.not_run
        return out


# -- reports with steps a baseline could not run --------------------------------------------


class BaselineReport(Report):
    """A report whose targets may be "not run: <reason>" (value None, met False)."""

    def target_of(
        self,
        name: str,
        figures: dict[str, Any],
        limit: float,
        what: str,
        op: str = ">=",
        **facts: Any,
    ) -> None:
        """The target ``figures["ratio"] op limit``, or "not run" when the baseline did not.

        ``facts``: :meth:`Report.target`'s ``bound``, ``evidence`` and ``spread`` (default:
        the spread of the paired rounds' ratios).
        """
        value = figures.get("ratio")
        if value is not None:
            facts.setdefault("spread", figures.get("ratio_spread"))
            self.target(name, value, op, limit, what, **facts)
            return
        reason = figures.get("not_run") or "the baseline did not run"
        self.targets.append(
            {
                "name": name,
                "value": None,
                "op": op,
                "limit": limit,
                "unit": "×",
                "what": what,
                "met": False,
                "not_run": reason,
                "bound": facts.get("bound", "library"),
                "evidence": f"not run: {reason}",
            }
        )

    def save(self) -> Path:
        # Report.save prints every target's value as a number: give it those that have
        # one, then put the "not run" ones back in their places in the JSON.
        every = list(self.targets)
        self.targets = [t for t in every if t["value"] is not None]
        try:
            path = super().save()
        finally:
            self.targets = every
        data = json.loads(path.read_text())
        data["targets"] = every
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        for t in every:
            if t["value"] is None:
                print(f"[MISS] {t['name']}: not run: {t['not_run']} - {t['what']}")
        return path


# -- the controller's CPU of a fleet command, raw asyncssh as its floor ---------------------


def set_cloud_aside() -> None:
    """Out of the garbage collector's way: the objects made so far.

    The local cloud (moto, botocore's models) lives in the benchmark's process: a few
    hundred thousand objects that a controller of its own would not have. Frozen once
    the fleet is up, so that no side's collections walk them.
    """
    gc.collect()
    gc.freeze()


class Phases:
    """Where the CPU went in each phase of one side's fleet run (see :func:`cpu_split`).

    Each phase ends with a sample, then waits for the instances' processes to finish
    (sessions that close, commands that exit) before the next phase starts.
    """

    def __init__(self) -> None:
        self.splits: dict[str, dict[str, Any]] = {}
        self._start = settled_sample()

    def end(self, phase: str, sample: CPUSample) -> None:
        """Blocking (it waits for the instances): call it in a thread from async code."""
        settled = settled_sample()
        self.splits[phase] = cpu_split(self._start, sample, settled)
        self._start = settled


@dataclass
class FleetRun:
    """One side's fleet command: connecting (cold), connected (warm), each phase's CPU."""

    cold: float
    warm: float
    splits: dict[str, dict[str, Any]]


async def raw_fleet(servers: Sequence[Server], expected: list[str]) -> FleetRun:
    """Raw asyncssh: connect and run ``hostname`` on every server at once, then again
    over the same connections, then close them (as asyncstage's fleet command does).

    No asyncstage code on the way: ``asyncssh.connect`` and ``conn.run`` with the same
    key, the same pinned host key (no other key is trusted), cipher order and default
    key exchange, no config files, no agent. The key is loaded and the pinned host keys
    parsed before the clock starts, once, as a script of its own would; the options
    are asyncssh.connect's to prepare, for every connection, as they are for such a
    script."""
    targets = []
    for server in servers:
        host = server.host
        keys = asyncssh.load_keypairs([str(k) for k in host.client_keys])
        trusted = [
            asyncssh.import_public_key(k) for k in host.known_hosts.lookup(host.address, host.port)
        ]
        if not trusted:
            raise RuntimeError(f"no pinned host key for {host.address}")
        targets.append((host, keys, trusted))
    conns: dict[int, asyncssh.SSHClientConnection] = {}
    out: dict[int, str] = {}

    async def connect(i: int) -> None:
        host, keys, trusted = targets[i]
        conns[i] = await asyncssh.connect(
            host.address,
            host.port,
            username=host.username,
            client_keys=keys,
            agent_path=None,
            preferred_auth="publickey",
            known_hosts=(trusted, [], []),
            config=[],
            encryption_algs=encryption_algs(),
        )
        await run(i)

    async def run(i: int) -> None:
        out[i] = str((await conns[i].run("hostname", check=True)).stdout).strip()

    async def all_of(fn: Callable[[int], Awaitable[None]]) -> float:
        out.clear()
        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(len(servers)):
                tg.start_soon(fn, i)
        wall = time.perf_counter() - t
        got = [out[i] for i in range(len(servers))]
        if got != expected:
            raise RuntimeError(f"raw asyncssh: {got[:3]}... expected {expected[:3]}...")
        return wall

    phases: Phases = await to_thread(Phases)
    try:
        cold = await all_of(connect)
        await to_thread(phases.end, "cold", CPUSample.now())
        warm = await all_of(run)
        await to_thread(phases.end, "warm", CPUSample.now())
    finally:
        for conn in conns.values():
            conn.close()
        for conn in conns.values():
            await conn.wait_closed()
    await to_thread(phases.end, "close", CPUSample.now())
    return FleetRun(cold, warm, phases.splits)


def median_splits(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per phase and figure, the median over the runs."""
    if not runs:
        return {}
    return {
        phase: {
            key: round(statistics.median(r[phase][key] for r in runs), 4)
            for key in runs[0][phase]
            if all(r[phase][key] is not None for r in runs)
        }
        for phase in runs[0]
    }


def client_cpu(n: int, runs: dict[str, list[float]], baseline: str) -> dict[str, Any]:
    """The controller's CPU per server of a fleet command on ``n`` servers, connecting.

    ``runs``: each round's controller CPU seconds of ``asyncstage``, ``raw_asyncssh``
    and ``baseline`` (a side that did not run: no rounds). Medians per server; ``ratio``
    = baseline / asyncstage (the target) with the spread of the paired rounds' ratios;
    baseline / raw asyncssh (the most any client on asyncssh, used as there, gets) and
    asyncstage / raw asyncssh (its own overhead).
    """
    ours = statistics.median(runs["asyncstage"])
    figures: dict[str, Any] = {"asyncstage_ms_per_server": round(1000 * ours / n, 3)}
    raw = statistics.median(runs["raw_asyncssh"]) if runs.get("raw_asyncssh") else None
    if raw is not None:
        figures |= {
            "raw_asyncssh_ms_per_server": round(1000 * raw / n, 3),
            "asyncstage_vs_raw_asyncssh": ratio(ours, raw),
        }
    if runs.get(baseline):
        theirs = statistics.median(runs[baseline])
        figures |= {
            f"{baseline}_ms_per_server": round(1000 * theirs / n, 3),
            "ratio": ratio(theirs, ours),
            "ratio_spread": paired_spread(runs[baseline], runs["asyncstage"]),
        }
        if raw is not None:
            figures[f"{baseline}_vs_raw_asyncssh"] = ratio(theirs, raw)
    else:
        figures["ratio"] = None
    return figures


# -- local data ------------------------------------------------------------------------------


def make_tree(root: Path, total: int, files: int, dirs: int = 4) -> Path:
    """``files`` files of random bytes, ``total`` bytes in all, spread over ``dirs`` dirs."""
    each = max(1, total // files)
    for i in range(files):
        sub = root / f"d{i % dirs}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:04d}.bin").write_bytes(os.urandom(each))
    return root


def make_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        left = size
        while left:
            chunk = min(left, 4 << 20)
            f.write(os.urandom(chunk))
            left -= chunk
    return path


# -- the Perl module -------------------------------------------------------------------------


def left_out(baseline: str) -> str | None:
    """The reason when ``ASYNCSTAGE_BENCH_WITHOUT`` (e.g. ``perl,fabric``) names a baseline.

    Plays a machine without it (CI has neither): every step must then say "not run".
    """
    if baseline in os.environ.get("ASYNCSTAGE_BENCH_WITHOUT", "").split(","):
        return f"{baseline} left out (ASYNCSTAGE_BENCH_WITHOUT)"
    return None


def perl_module_missing() -> str | None:
    """Why the Perl baseline cannot run here (None: it can)."""
    if (reason := left_out("perl")) is not None:
        return reason
    try:
        done = subprocess.run(
            ["perl", f"-M{PERL_MODULE}", "-e", "1"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"perl: {e}"
    if done.returncode != 0:
        return f"{PERL_MODULE} is not installed (apt-get install libvm-ec2-perl; `make bench` does)"
    return None


def perl_driver(cloud: Any, work: Path, zone: str, script: Path = PERL_DRIVER) -> PerlDriver:
    """A driver of ``script`` for this local cloud (not started): VM::EC2's own variables
    name its endpoint and credentials; the module's keys go to ``work/perl-dot``, what it
    prints to ``work/perl.log``."""
    creds = cloud.session_kwargs()
    (work / "perl-dot").mkdir()
    return PerlDriver(
        {
            "EC2_URL": creds["endpoint_url"],
            "EC2_ACCESS_KEY": creds["aws_access_key_id"],
            "EC2_SECRET_KEY": creds["aws_secret_access_key"],
        },
        [cloud.image_id, cloud.default_username, str(work / "perl-dot"), zone],
        work / "perl.log",
        script,
    )


class PerlDriver:
    """A Perl driver (default ``perl/staging_bench.pl``) answering requests; stopped when
    it hangs."""

    def __init__(
        self, env: dict[str, str], args: list[str], log: Path, script: Path = PERL_DRIVER
    ) -> None:
        self.env = {**os.environ, **env}
        self.script = script
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> subprocess.Popen[str]:
        """Start the driver unless it runs; call it from the main thread (see below)."""
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        # The driver dies with this process (SIGKILL on the death of the thread that
        # started it): VM::EC2's get_server retries CreateTags in a loop with no end, which
        # would otherwise go on after a crash here.
        guard = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [*guard, "perl", str(self.script), *self.args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                text=True,
                start_new_session=True,  # its ssh children go with it when it is stopped
            )
        return self.proc

    def _ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            raise NotRun(f"the Perl driver is not running ({self._last_error()})")
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            self.stop()
            raise NotRun(f"the Perl driver exited ({self._last_error()})") from None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not ready:
            self.stop(timeout=5)  # it hangs: it would not read "quit" either
            raise NotRun(f"no answer from VM::EC2 within {timeout:g} s ({self._last_error()})")
        if not line:
            self.stop()
            raise NotRun(f"the Perl driver exited ({self._last_error()})")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise NotRun(_one_line(str(answer.get("error", "failed"))))
        return answer

    async def ask(self, timeout: float, op: str, **request: Any) -> dict[str, Any]:
        """The driver's answer to one request; :class:`NotRun` with VM::EC2's reason."""
        answer: dict[str, Any] = await to_thread(self._ask, {"op": op, **request}, timeout)
        return answer

    def _last_error(self) -> str:
        """The last line the driver printed on stderr (VM::EC2 croaks there)."""
        with contextlib.suppress(OSError):
            lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
            if lines:
                return _one_line(lines[-1])
        return "nothing on stderr"

    async def stopped(self) -> list[str]:
        """:meth:`stop` in a thread; the last 40 lines of the driver's log."""
        await anyio.to_thread.run_sync(self.stop)
        return self.log.read_text(errors="replace").splitlines()[-40:]

    def stop(self, timeout: float = 120.0) -> None:
        """Ask the driver to quit (it terminates its servers), else kill its group."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write('{"op": "quit"}\n')
                proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)  # its own session: the driver and its ssh children
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
