"""Fleet backups: asyncstage's plans against the seed's Perl module, the CPU limit,
incremental reruns, and snapshot mode against copy mode, all in one run.

The fleet: N servers, each with a source directory ``/srv/app`` (a 1 GiB data volume of
its own mounted there) holding files of random bytes. One backup per server, as
``asyncstage backup --each 'src-*' /srv/app`` writes it: a :class:`~asyncstage.backup.Plan`
of copy-mode backups named after the servers, run by :func:`~asyncstage.backup.run_plan`.

1. **Against the seed's module** (N = 4, 16, 50; 2 in quick mode, without Perl): the
   plan, against Debian's ``libvm-ec2-perl`` (VM::EC2::Staging) backing the same amount
   of data up its way, one server after another: a volume on the server, ``rsync`` into
   it, a snapshot, the volume deleted; then the wait until every snapshot is completed
   (``perl/fleet_backup.pl``). Each side backs up a fleet of its own (Perl's servers are
   made by its ``get_server``), the same files on each. Ratio: Perl's time / asyncstage's.
2. **Against the CPU limit** (the fleet of 16): the aggregate rsync throughput of the
   plan's copy phases (all bytes over the span from the first backup's rsync start to the
   last one's end), against the same bytes copied by bare ``rsync -a`` on every server at
   once, the route the plan took (its work volume on the source server: ``rsync`` on
   that server, into a volume of the same kind), with the cores busy: the most this
   machine moves. The plan's whole run (volumes and snapshots included) is shown beside,
   and a second limit, measured in rounds between those: each bare copy followed by its
   manifest written by a plain command (the library's own script: a sha256 of every
   byte, which a plan cannot shed). Both limits are measured in each round right before
   the round's first run, so that each run is judged against the machine as it was
   then; the row is the round with the median ratio, every round's ratios beside it.
3. **Incremental** (the fleet of 16): 1 % of the files on every server rewritten with
   new bytes, then the same plan again: its time / the first run's. Twice: as a plan runs
   by default (each run makes its work volume from the previous snapshot), and with
   ``keep_volume`` (a first run that keeps its volumes, 1 % changed again, the rerun
   copying only the change into them; the kept volumes are deleted afterwards).
4. **Snapshot mode against copy mode** (the fleet of 16): a plan of snapshot-mode
   backups of the same servers (their ``/srv/app`` volumes, one ``CreateSnapshots``
   each), against the copy-mode plan's first run.

The run has four parts, each in a local cloud of its own (``--part perl``, ``--part
scale``, ``--part ebs``, ``--part large``; all without ``--part``): ``perl`` sets up the
fleets the Perl module backs up too (up to 16) and times both sides; ``scale`` times the
larger fleet (Perl's time there: its time per server in the ``perl`` part, times N) and
parts 2-4 on the fleet of 16 of its own; ``ebs`` makes the fleet of 16 again in a cloud
whose images share blocks (``store="reflink"``) and runs parts 2-4 there; ``large`` runs
parts 2-3 on 8 servers of 1 GiB each (2 of 4 MiB in quick mode), its images sharing
blocks too, so that each backup's fixed steps (its commands, the helpers' interpreters,
the mount) weigh little beside its bytes: in three rounds, each its limits, a first run,
1 % changed and the plan again, a run keeping its volumes (nothing changed), 1 % changed
and the plan again into them (both reruns against the same first run); a round's
snapshots and kept volumes are deleted after it. Parts 2-4 run in three
rounds on each store, each round its limits, a first run and its reruns, of backup
names its own (a row shows the round whose ratio is the median, with every round's
ratio). Each part keeps its figures in ``backup.part-NAME.json``; the report
(``backup.json``) is written once all are there (``--part report`` writes it again).
Measured plans start 10 s apart, so that each finds EC2's request buckets full.

Data: 64 MiB per server (200 files) for the fleets compared with Perl; the focus fleet
of parts 2-4 is topped up to 256 MiB per server (800 files of the same size) once the
larger fleets are backed up. 64 MiB is small for a server's backup: a run's fixed part
(volume, snapshot, EC2's calls) would dominate both the copy-mode throughput and the
rerun ratio, which would then measure EC2's pace, not the copy. 256 MiB keeps the
``scale`` part within about 9 minutes on two cores: the local cloud's volumes are sparse
loop files and each snapshot is a sparse copy of its volume, so the focus fleet's five
plans a round write about 20 GiB of snapshots, removed with the part's cloud.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from _baselines import HERE, BaselineReport, NotRun, PerlDriver, perl_driver, perl_module_missing
from _common import (
    CPUAccounting,
    CPUSample,
    GiB,
    MachineCPU,
    MiB,
    OwnCPU,
    cpu_split,
    loadavg,
    local_cloud,
    parse_args,
    ratio,
)
from bench_perl import PERL_REALISM, ZONE

from asyncstage import Manager, Server, Volume, remote
from asyncstage.backup import BackupOutcome, Plan, PlannedBackup, PlanReport, run_plan
from asyncstage.localcloud import LocalCloud

SRC = "/srv/app"
SCRATCH = "/mnt/bench-scratch"
PERL_BACKUP_DRIVER = HERE / "perl" / "fleet_backup.pl"
QUICK_NO_PERL = "quick mode: the Perl module's serial backup takes ~10 s per server"


def _fill_script(nbytes: int, files: int, first: int = 0) -> str:
    """Shell: ``files`` files of random bytes, ``nbytes`` in all, in 4 directories of SRC
    (numbered from ``first``: a top-up adds files beside those already there)."""
    each = max(1, nbytes // files)
    return (
        f"set -e; for d in 0 1 2 3; do mkdir -p {SRC}/d$d; done; i={first}; "
        f"while [ $i -lt {first + files} ]; do "
        f'head -c {each} /dev/urandom > "{SRC}/d$((i % 4))/f$i.bin"; '
        "i=$((i + 1)); done; sync"
    )


def _change_script(every: int) -> str:
    """Shell: every ``every``-th file of SRC (in name order) rewritten with new random bytes
    of the same size (1 % of the files with ``every`` = 100)."""
    return (
        f"set -e; find {SRC} -type f -name 'f*.bin' | sort | awk 'NR % {every} == 1' | "
        'while read -r f; do head -c "$(stat -c %s "$f")" /dev/urandom > "$f"; done; sync'
    )


_PAGE = os.sysconf("SC_PAGE_SIZE")
_KERNEL = ("instances_sys_cpu_s", "direct_reclaim_mib")
"""The figures of a :class:`KernelSample` span."""


def _direct_reclaim() -> int:
    """Pages the machine's processes reclaimed so far in their own time (``pgscan_direct``
    of /proc/vmstat: memory full, so each new page is taken from a cached one first)."""
    with open("/proc/vmstat") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("pgscan_direct "))


@dataclass(frozen=True)
class KernelSample:
    """The instances' CPU in the kernel so far (their cgroup's, this process's own taken
    away; None without the cgroup) and the machine's direct reclaim: what their writes
    cost the kernel, beside the commands' own work."""

    system: float | None
    reclaimed: int

    @classmethod
    def now(cls) -> KernelSample:
        group = CPUAccounting.active
        own = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        return cls(group.system() - own if group else None, _direct_reclaim())

    def since(self, start: KernelSample) -> dict[str, float]:
        """The instances' system CPU s and the MiB reclaimed directly from ``start`` on."""
        out = {"direct_reclaim_mib": round((self.reclaimed - start.reclaimed) * _PAGE / MiB)}
        if self.system is not None and start.system is not None:
            out["instances_sys_cpu_s"] = round(self.system - start.system, 3)
        return out


class Timeline:
    """When each backup of a plan entered each phase (``on_change`` of run_plan), and
    who used the CPU over the copy span (a :class:`CPUSample` at the first rsync's start
    and at each snapshot phase's: the last one ends the span)."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self.span_start: CPUSample | None = None
        self.span_end: CPUSample | None = None
        self.kernel: list[KernelSample] = []  # at the span's start, then at its end

    def __call__(self, o: BackupOutcome) -> None:
        phases = self.phases.setdefault(o.name, {})
        if o.phase in phases:
            return
        phases[o.phase] = time.perf_counter()
        if o.phase == "rsync" and self.span_start is None:
            self.span_start = CPUSample.now()
            self.kernel = [KernelSample.now()]
        elif o.phase == "snapshot" and "rsync" in phases:
            self.span_end = CPUSample.now()
            self.kernel[1:] = [KernelSample.now()]

    def span_cpu(self) -> dict[str, Any]:
        """Who used the CPU over the copy span (:func:`cpu_split`), and the machine's
        busy share."""
        if self.span_start is None or self.span_end is None:
            return {}
        start, end = self.kernel
        return cpu_split(self.span_start, self.span_end) | end.since(start)

    def copy_span(self) -> float:
        """From the first backup's rsync start to the last backup's snapshot start (its
        rsync, with its manifest's hashing beside it, then the rest of that hashing: both
        read the data)."""
        starts = [p["rsync"] for p in self.phases.values() if "rsync" in p]
        ends = [p["snapshot"] for p in self.phases.values() if "snapshot" in p]
        return max(ends) - min(starts)

    def start_spread(self) -> float:
        """From the first backup's rsync start to the last one's."""
        starts = [p["rsync"] for p in self.phases.values() if "rsync" in p]
        return max(starts) - min(starts)


def copy_plan(servers: list[Server], prefix: str, *, keep_volume: bool = False) -> Plan:
    """One copy-mode backup per server (as ``backup --each``), all at once."""
    planned = tuple(
        PlannedBackup(
            name=f"{prefix}-{s.name}", sources=(f"{s.name}:{SRC}",), keep_volume=keep_volume
        )
        for s in servers
    )
    return Plan(planned, concurrency=len(servers))


def snapshot_plan(servers: list[Server], prefix: str) -> Plan:
    planned = tuple(
        PlannedBackup(name=f"{prefix}-{s.name}", mode="snapshot", server=s.name) for s in servers
    )
    return Plan(planned, concurrency=len(servers))


def _checked(report: PlanReport) -> PlanReport:
    if not report.ok:
        failed = "; ".join(f"{o.name}: {o.error_type}: {o.error}" for o in report.failed)
        raise RuntimeError(f"backups failed: {failed}")
    return report


async def run_timed(m: Manager, plan: Plan, cloud: LocalCloud | None = None) -> dict[str, Any]:
    """Run a plan: its wall time, phase timeline, CPU and the backups' own figures (and
    the API calls the local cloud throttled meanwhile: EC2's request rates)."""
    timeline = Timeline()
    await anyio.sleep(REST_S)  # the account's request buckets refill, as between batches
    throttled = Counter(cloud.throttled) if cloud is not None else Counter()
    copies = _copy_totals(cloud)
    with MachineCPU() as busy, OwnCPU() as cpu:
        start = CPUSample.now()
        t = time.perf_counter()
        report = _checked(await run_plan(m, plan, on_change=timeline))
        wall = time.perf_counter() - t
        split = cpu_split(start, CPUSample.now())
    results = [o.result for o in report.outcomes]
    out: dict[str, Any] = {
        "n": len(plan.backups),
        "wall_s": round(wall, 3),
        "own_cpu_s": cpu.seconds,
        # who used it: the controller and, apart, the local cloud's threads (ended ones
        # too) in this process, and the instances' processes (mkfs, mount, rsync, sshd,
        # sudo)
        "cpu_split": {k: split[k] for k in ("controller_cpu_s", "cloud_cpu_s", "instances_cpu_s")},
        "machine_busy": busy.busy,
    }
    if cloud is not None:
        out["throttled"] = dict(Counter(cloud.throttled) - throttled)
        after = _copy_totals(cloud)
        made = int(after["copies"] - copies["copies"])
        volumes = int(after.get("volumes", 0) - copies.get("volumes", 0))
        volume_s = after.get("volume_seconds", 0.0) - copies.get("volume_seconds", 0.0)
        out["image_copies"] = {  # the local cloud's: snapshots, volumes from snapshots
            "copies": made,
            # of them, sharing their source's blocks (the reflink store)
            "cloned": int(after.get("cloned", 0) - copies.get("cloned", 0)),
            "mib": round((after["bytes"] - copies["bytes"]) / MiB, 1),
            "mean_s": round((after["seconds"] - copies["seconds"]) / made, 3) if made else 0.0,
            # of them, volumes from snapshots: creating from the call to the copy's end
            "volumes": volumes,
            "volume_mean_s": round(volume_s / volumes, 3) if volumes else 0.0,
        }
    if plan.backups[0].mode == "copy":
        nbytes = sum(int(r["bytes"]) for r in results)
        span = timeline.copy_span()
        out |= {
            "bytes": nbytes,
            "files": sum(int(r["files"]) for r in results),
            "routes": sorted({str(r["route"]) for r in results}),
            "copy_span_s": round(span, 3),
            "copy_span_cpu": timeline.span_cpu(),
            "rsync_start_spread_s": round(timeline.start_spread(), 3),
            "median_s": {
                k: round(statistics.median(float(r[k]) for r in results), 3)
                for k in ("volume_s", "rsync_s", "manifest_s", "snapshot_s", "elapsed")
            },
            # the backup that ended last, from its volume on, and the longest wait for a
            # snapshot (its pending time is the local cloud's realism)
            "slowest_s": {
                k: round(float(max(results, key=lambda r: float(r["elapsed"]))[k]), 3)
                for k in ("volume_s", "rsync_s", "manifest_s", "snapshot_s", "elapsed")
            },
            "snapshot_max_s": round(max(float(r["snapshot_s"]) for r in results), 3),
            "parents": sum(1 for r in results if r["previous_snapshot_id"]),
            "volumes_reused": sum(1 for r in results if r.get("volume_reused")),
            # files whose digest the previous snapshot's manifest gave, or the follow pass
            # (hashed while rsync ran); bytes read to hash once rsync was done
            "manifest_reused": sum(int(r["manifest_reused"]) for r in results),
            "manifest_followed": sum(int(r.get("manifest_followed", 0)) for r in results),
            "manifest_hashed_bytes": sum(int(r["manifest_hashed"]) for r in results),
        }
    else:
        out["snapshots"] = sum(len(r["snapshots"]) for r in results)
    return out


def _copy_totals(cloud: LocalCloud | None) -> dict[str, float]:
    """The local cloud's image copies so far (white box: its engine's totals)."""
    if cloud is None:
        return {"copies": 0, "bytes": 0, "seconds": 0.0}
    engine = cloud._engine
    with engine.lock:
        return dict(engine.copy_totals)


# -- the fleets ---------------------------------------------------------------------------


async def our_fleet(m: Manager, n: int, nbytes: int, files: int, gib: int = 1) -> list[Server]:
    """n servers, each with SRC on a data volume of its own (``gib`` GiB), filled."""
    servers = await m.provision_servers([f"src-{i:02d}" for i in range(n)])

    async def prepare(s: Server) -> None:
        await s.provision_volume(f"data-{s.name}", size=gib, mount=SRC)
        await s.scmd("sh", "-c", _fill_script(nbytes, files), sudo=True, timeout=600)

    async with anyio.create_task_group() as tg:
        for s in servers:
            tg.start_soon(prepare, s)
    return servers


class Perl:
    """The Perl side: its driver, or why it cannot run."""

    def __init__(self, driver: PerlDriver | None, missing: str | None, api: Any) -> None:
        self.driver, self.missing, self.api = driver, missing, api
        self.servers: list[str] = []
        self.measured_up_to = 0
        self.per_server_s: float | None = None  # at the largest fleet measured

    async def ask(self, timeout: float, op: str, **request: Any) -> dict[str, Any]:
        if self.driver is None:
            raise NotRun(self.missing or "no Perl driver")
        before = Counter(self.api())
        try:
            return await self.driver.ask(timeout, op, **request)
        except NotRun as e:
            made = (Counter(self.api()) - before).most_common(4)
            calls = ", ".join(f"{action} {k}" for action, k in made)
            self.missing = f"{op}: {e}; its EC2 calls meanwhile: {calls or 'none'}"
            raise NotRun(self.missing) from None

    async def fleet(self, n: int, nbytes: int, files: int) -> None:
        """get_server for n servers (one after another, the module's way), filled."""
        names = [f"perl-src-{i:02d}" for i in range(n)]
        await self.ask(60.0 * n, "fleet", names=names)
        fill = f"sudo sh -c {shlex.quote(_fill_script(nbytes, files))}"
        for name in names:
            await self.ask(300.0, "ssh", server=name, command=fill)
        self.servers = names

    async def backup(self, n: int, prefix: str) -> tuple[float, bool]:
        """Its time for a fleet backup of n, and whether that time is extrapolated."""
        if n > self.measured_up_to and self.per_server_s is not None:
            return self.per_server_s * n, True
        answer = await self.ask(
            120.0 * n + 120,
            "backup",
            servers=self.servers[:n],
            prefix=prefix,
            source=SRC,
            size=1,
        )
        seconds = float(answer["seconds"])
        self.per_server_s = seconds / n
        return seconds, False


# -- the CPU limit ----------------------------------------------------------------------------


async def bare_copies(
    servers: list[Server], scratch: dict[str, Volume], pairs: int = 2
) -> dict[str, Any]:
    """The same bytes copied by bare ``rsync -a`` on every server at once, each into a
    volume of its own (the plan's route), after the destinations were emptied; and, in
    rounds between those, each copy followed by its manifest written by a plain command
    (the library's own script: a sha256 of every byte), the work a plan cannot shed.
    ``pairs`` rounds of each; each limit is the median of its rounds."""

    async def clear(s: Server) -> None:
        await s.scmd("sh", "-c", f"rm -rf {SCRATCH}/copy && sync", sudo=True)

    async def one(s: Server, manifest: bool) -> None:
        await s.scmd(
            "rsync", "-a", "--numeric-ids", f"{SRC}/", f"{SCRATCH}/copy/", sudo=True, timeout=900
        )
        if manifest:
            await s.scmd(*remote.argv("manifest", "write", f"{SCRATCH}/copy"), sudo=True)

    rounds: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for manifest in (False, True) * pairs:  # interleaved: neither side gets the quiet
        async with anyio.create_task_group() as tg:
            for s in servers:
                tg.start_soon(clear, s)
        with MachineCPU() as busy, OwnCPU() as cpu:
            start, kernel, t = CPUSample.now(), KernelSample.now(), time.perf_counter()
            async with anyio.create_task_group() as tg:
                for s in servers:
                    tg.start_soon(one, s, manifest)
            wall = time.perf_counter() - t
            split = cpu_split(start, CPUSample.now()) | KernelSample.now().since(kernel)
        rounds[manifest].append(
            {
                "wall_s": round(wall, 3),
                "own_cpu_s": cpu.seconds,
                "busy": busy.busy,
                # as a plan's copy span counts them (:meth:`Timeline.span_cpu`)
                "instances_cpu_s": split["instances_cpu_s"],
                **{k: split[k] for k in _KERNEL if k in split},
            }
        )
    # the limits: the medians, as the plans' runs are judged (the machine's state moves
    # a round of 16 copies by a third from one round to the next)
    bare, hashed = (_median_round(rounds[k]) for k in (False, True))
    return {"rounds": rounds[False], **bare, "with_manifest": {"rounds": rounds[True], **hashed}}


def _median_round(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over ``rounds``."""
    return {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}


# -- the run ------------------------------------------------------------------------------------


REST_S = 10.0
"""Seconds between measured plans: EC2's mutating-request bucket (50 calls, 5 a second
refilled; the local cloud plays it) is full again, so that no plan pays for the calls of
the one before it. Quick mode: none."""

PARTS = ("perl", "scale", "ebs", "large")
"""The run's parts, each in a local cloud of its own (so that one holds the machine a
few minutes, not all of them): ``perl``, the fleets the Perl module backs up too, both
sides; ``scale``, the larger fleets, and parts 2-4 on a first run of the focus fleet of
its own; ``ebs``, the focus fleet's runs of parts 3-4 again in a local cloud whose
images share blocks (``store="reflink"``): its snapshots and volumes from snapshots cost
the machine nothing, as EBS's cost the instances' hosts nothing, where the other parts'
copy each image's data on the same two cores as the backups; ``large``, parts 2-3 on a
fleet of its own whose backups are large enough for their fixed steps to fade, its
images sharing blocks too.
``--part report`` writes the report of the parts' results on disk."""


async def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--part", choices=(*PARTS, "report"), default=None)
    known, rest = pre.parse_known_args()
    args = parse_args(__doc__ or "", rest)
    if args.quick:  # two servers, no Perl: a smoke test of every part
        setup = Setup(
            sizes=[2], focus=2, per_server=2 * MiB, files=100, perl_max=0, large_per_server=4 * MiB
        )
        await measure(args.results, True, setup, PARTS, perl_too=False)
    elif known.part == "report":
        report(args.results, False, FULL)
    else:
        await measure(args.results, False, FULL, (known.part,) if known.part else PARTS)


@dataclass(frozen=True)
class Setup:
    """The fleets: ``sizes`` (the Perl module backs up those up to ``perl_max``; beyond,
    its time is its time per server at the largest of those times N, one after another:
    linear by construction, marked extrapolated); ``focus``: the fleet of parts 2-4."""

    sizes: list[int]
    focus: int
    per_server: int
    files: int = 200
    perl_max: int = 16
    focus_per_server: int = 0
    """Bytes per server of the focus fleet (parts 2-4; 0: ``per_server``): topped up
    after the larger fleets' backups."""
    focus_rounds: int = 1
    """Rounds of the focus fleet's limits, first runs and reruns, in each store (their
    median is reported)."""
    large: int = 2
    """Servers of the ``large`` part: backups large enough for their fixed steps to fade."""
    large_per_server: int = 0
    """Bytes per server of the ``large`` part (0: ``focus_bytes``)."""

    @property
    def large_bytes(self) -> int:
        """Bytes per server of the ``large`` part."""
        return self.large_per_server or self.focus_bytes

    @property
    def large_files(self) -> int:
        """Files per server of the ``large`` part (files of the same size as the others')."""
        return self.files * self.large_bytes // self.per_server

    @property
    def focus_bytes(self) -> int:
        """Bytes per server of the focus fleet."""
        return max(self.focus_per_server, self.per_server)

    @property
    def focus_files(self) -> int:
        """Files per server of the focus fleet (files of the same size as the others')."""
        return self.files * self.focus_bytes // self.per_server

    def of(self, part: str) -> list[int]:
        """The fleet sizes part ``part`` backs up (``ebs``: only the focus fleet;
        ``large``: only its own)."""
        if part in ("ebs", "large"):
            return []
        return [n for n in self.sizes if (n <= self.perl_max) == (part == "perl")]


FULL = Setup(
    sizes=[4, 16, 50],
    focus=16,
    per_server=64 * MiB,
    focus_per_server=256 * MiB,
    focus_rounds=3,
    # 8 GiB in all: the data and a copy of it fit this machine's page cache, as the
    # focus fleet's do, so that the limit stays the cores' and not the disk's
    large=8,
    large_per_server=GiB,
)


def _part_path(results: Path, part: str) -> Path:
    return results / f"backup.part-{part}.json"


async def measure(
    results: Path,
    quick: bool,
    setup: Setup,
    parts: tuple[str, ...],
    *,
    perl_too: bool | None = None,
) -> None:
    """Run ``parts``, each in a local cloud of its own, keep each one's figures in
    ``backup.part-NAME.json``; once every part's are there, the report (``backup.json``)."""
    global REST_S
    REST_S = 0.0 if quick else REST_S
    perl_too = not quick if perl_too is None else perl_too
    for part in parts:
        sizes = setup.of(part)
        if part == "perl" and not sizes:
            continue
        missing = perl_module_missing() if perl_too else QUICK_NO_PERL
        res = await _part(part, setup, sizes, missing, results)
        _save_part(results, part, res)
    report(results, quick, setup)


def _save_part(results: Path, part: str, res: dict[str, Any]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    _part_path(results, part).write_text(json.dumps(res, indent=2, default=str) + "\n")


async def _part(
    part: str, setup: Setup, sizes: list[int], missing: str | None, results: Path
) -> dict[str, Any]:
    """One part in a local cloud of its own: its figures."""
    work = Path(tempfile.mkdtemp(prefix="asyncstage-bench-backup-"))
    res: dict[str, Any] = {"part": part, "fleets": {}, "load": {"start": loadavg()}}
    res["started"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    try:
        store = "reflink" if part in ("ebs", "large") else "plain"
        # before the cloud starts: its instances are then in the group with this process
        with CPUAccounting() as accounting:
            res["instances_cpu_from"] = accounting.counted_by
            async with local_cloud(0.0, PERL_REALISM, store=store, poll_interval=0.5) as (
                cloud,
                m,
            ):
                driver = None
                if part == "perl" and missing is None:
                    driver = perl_driver(cloud, work, ZONE, PERL_BACKUP_DRIVER)
                    driver.start()
                perl = Perl(driver, missing, lambda: cloud.api_calls)
                perl.measured_up_to = setup.perl_max
                if part != "perl":  # its time: the perl part's per server, times N (the report)
                    perl.missing = missing or "the perl part has not run: no time per server"
                try:
                    if part == "perl":
                        await _fleets(m, cloud, perl, res, sizes, setup, largest=max(sizes))
                    elif part == "scale":
                        await _scale(m, cloud, perl, res, sizes, setup)
                    elif part == "large":
                        await _large(m, cloud, res, setup)
                    else:
                        await _ebs(m, cloud, res, setup)
                finally:
                    if driver is not None:
                        res["perl_stderr_tail"] = await driver.stopped()
                res["api_calls"] = dict(sorted(cloud.api_calls.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["perl_module_missing"] = perl.missing
    res["perl_per_server_s"] = perl.per_server_s
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["load"]["end"] = loadavg()
    return res


async def _fleets(
    m: Manager,
    cloud: LocalCloud,
    perl: Perl,
    res: dict[str, Any],
    sizes: list[int],
    setup: Setup,
    *,
    largest: int,
    servers: list[Server] | None = None,
) -> list[Server]:
    """Set up (unless ``servers`` are given) and back up the fleets of ``sizes``, both
    sides: each size's row in ``res["fleets"]``."""
    if servers is None:
        print(f"set-up: {largest} servers with {setup.per_server // MiB} MiB each")
        t = time.perf_counter()
        servers = await our_fleet(m, largest, setup.per_server, setup.files)
        res["setup_s"] = {"asyncstage": round(time.perf_counter() - t, 1)}
        if perl.driver is not None:
            t = time.perf_counter()
            try:
                await perl.fleet(min(largest, perl.measured_up_to), setup.per_server, setup.files)
            except NotRun as e:
                print(f"  Perl set-up failed: {e}")
            res["setup_s"]["perl"] = round(time.perf_counter() - t, 1)
        res["load"]["after_setup"] = loadavg()
    for n in sizes:
        print(f"fleet backup of {n}")
        ours = await run_timed(m, copy_plan(servers[:n], f"bk{n}"), cloud)
        print(f"  asyncstage: {ours['wall_s']:.2f} s")
        row: dict[str, Any] = {"n": n, "asyncstage": ours}
        try:
            perl_s, row["perl_extrapolated"] = await perl.backup(n, f"pbk{n}")
            row["perl_s"] = round(perl_s, 3)
            row["ratio"] = ratio(row["perl_s"], ours["wall_s"])
            print(f"  Perl: {row['perl_s']:.2f} s{' (extrapolated)' * row['perl_extrapolated']}")
        except NotRun as e:
            row["perl_s"] = row["ratio"] = None
            row["not_run"] = str(e)
            print(f"  Perl not run: {e}")
        res["fleets"][str(n)] = row
        res["load"][f"after_fleet_{n}"] = loadavg()
    return servers


async def _scale(
    m: Manager, cloud: LocalCloud, perl: Perl, res: dict[str, Any], sizes: list[int], setup: Setup
) -> None:
    """The larger fleets, and parts 2-4 on the focus fleet (:func:`_focus_rounds`)."""
    focus = setup.focus
    servers = await _fleets(m, cloud, perl, res, [], setup, largest=max([*sizes, focus]))
    group = servers[:focus]
    await _fleets(m, cloud, perl, res, sizes, setup, largest=0, servers=servers)
    extra = setup.focus_bytes - setup.per_server
    if extra:
        print(f"top-up: {focus} servers to {setup.focus_bytes // MiB} MiB each")
        top_up = _fill_script(extra, setup.focus_files - setup.files, first=setup.files)
        async with anyio.create_task_group() as tg:
            for s in group:
                tg.start_soon(partial(s.scmd, "sh", "-c", top_up, sudo=True, timeout=600))
    res |= await _focus_rounds(m, cloud, group, setup, res["load"])


async def _limits(group: list[Server], res: dict[str, Any], gib: int = 1) -> None:
    """The CPU limits on ``group`` (:func:`bare_copies`, one round each), into
    scratch volumes of ``gib`` GiB made for them and deleted after (snapshot mode takes
    every data volume)."""
    print(f"CPU limit: bare rsync on {len(group)} servers at once")
    scratch: dict[str, Volume] = {}

    async def make_scratch(s: Server) -> None:
        scratch[s.name] = await s.provision_volume(f"scratch-{s.name}", size=gib, mount=SCRATCH)

    async with anyio.create_task_group() as tg:
        for s in group:
            tg.start_soon(make_scratch, s)
    res["bare"] = await bare_copies(group, scratch, pairs=1)
    async with anyio.create_task_group() as tg:
        for v in scratch.values():
            tg.start_soon(v.delete)
    res["load"]["after_cpu_limit"] = loadavg()


async def _ebs(m: Manager, cloud: LocalCloud, res: dict[str, Any], setup: Setup) -> None:
    """The focus fleet made again, its images sharing blocks, and parts 2-4 on it."""
    focus = setup.focus
    print(f"set-up ({cloud.store} store): {focus} servers with {setup.focus_bytes // MiB} MiB")
    t = time.perf_counter()
    group = await our_fleet(m, focus, setup.focus_bytes, setup.focus_files)
    res["setup_s"] = {"asyncstage": round(time.perf_counter() - t, 1)}
    res |= await _focus_rounds(m, cloud, group, setup, res["load"])


async def _large(m: Manager, cloud: LocalCloud, res: dict[str, Any], setup: Setup) -> None:
    """Copy-mode backups large enough that their fixed steps fade (a server's backup is
    seldom 256 MiB), against the CPU limits, and their reruns: in rounds, each its limits
    right before its first run; then 1 % changed and the plan again, as a plan runs by
    default; then once more keeping the work volumes (nothing changed), 1 % changed, and
    the plan copying only the change into them. A round's snapshots and kept volumes are
    deleted after it, so that each round starts as the first did."""
    n, nbytes = setup.large, setup.large_bytes
    gib = max(1, -(-nbytes * 5 // (4 * GiB)))  # room for the data, as on a server
    print(f"set-up ({cloud.store} store): {n} servers with {nbytes // MiB} MiB each")
    t = time.perf_counter()
    group = await our_fleet(m, n, nbytes, setup.large_files, gib=gib)
    res["setup_s"] = {"asyncstage": round(time.perf_counter() - t, 1)}
    rounds: list[dict[str, Any]] = []
    for i in range(setup.focus_rounds):
        done: dict[str, Any] = {"load": {}}
        await _limits(group, done, gib=gib)
        print(f"round {i + 1} of {setup.focus_rounds}: {n} backups of {nbytes // MiB} MiB")
        name, keeping = f"lg{i}", copy_plan(group, f"lg{i}", keep_volume=True)
        done["first"] = first = await run_timed(m, copy_plan(group, name), cloud)
        await _change_files(group)
        done["rerun"] = await run_timed(m, copy_plan(group, name), cloud)
        await run_timed(m, keeping, cloud)  # nothing changed: its volumes kept for the next
        await _change_files(group)
        done["kept_rerun"] = await run_timed(m, keeping, cloud)
        print(
            f"  asyncstage: first {first['wall_s']:.2f} s, rerun {done['rerun']['wall_s']:.2f}"
            f" s, into kept volumes {done['kept_rerun']['wall_s']:.2f} s"
        )
        async with anyio.create_task_group() as tg:
            for v in m.volumes():
                if v.name.startswith(f"{name}-"):
                    tg.start_soon(v.delete)
        for s in group:
            for snap in await m.snapshots(f"{name}-{s.name}"):
                await m.ec2.delete_snapshot(snap["SnapshotId"])
        res["load"] |= {f"round{i + 1}_{k}": v for k, v in done["load"].items()}
        rounds.append(done)
    copy, limits = _median_copy(rounds)
    mid, kept = _median_rerun(rounds, "rerun"), _median_rerun(rounds, "kept_rerun")
    res |= {
        "copy_first": copy["first"],
        "bare": copy["bare"],
        "first": mid["first"],
        "rerun": mid["rerun"],
        "kept_first": kept["first"],
        "kept_rerun": kept["kept_rerun"],
        "rounds": _round_ratios(rounds, limits, "first"),
    }


async def _change_files(group: list[Server]) -> None:
    """1 % of the files of every server's source rewritten with new bytes."""
    async with anyio.create_task_group() as tg:
        for s in group:
            tg.start_soon(partial(s.scmd, "sh", "-c", _change_script(100), sudo=True))


def _median_rerun(rounds: list[dict[str, Any]], rerun: str, first: str = "first") -> dict[str, Any]:
    """The round whose ``rerun`` against its ``first`` run is the median ratio."""
    by = sorted(rounds, key=lambda r: float(r[rerun]["wall_s"]) / float(r[first]["wall_s"]))
    return by[len(by) // 2]


def _round_ratios(
    rounds: list[dict[str, Any]], limits: list[dict[str, Any]], kept_first: str
) -> list[dict[str, float]]:
    """Each round's rerun ratios (into kept volumes: against its ``kept_first`` run)
    and its first run's against its limits."""
    return [
        {
            "ratio": ratio(r["rerun"]["wall_s"], r["first"]["wall_s"]),
            "kept_ratio": ratio(r["kept_rerun"]["wall_s"], r[kept_first]["wall_s"]),
            **c,
        }
        for r, c in zip(rounds, _copy_ratios(limits), strict=True)
    ]


def _median_copy(
    rounds: list[dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The round whose first run is the median against the limits of its own round, and
    every round's first run against its limits (:func:`_cpu_limit`)."""
    limits = [_cpu_limit(r["first"], r["bare"]) for r in rounds]
    by = sorted(zip(rounds, limits, strict=True), key=lambda rl: float(rl[1]["vs_limit"]))
    return by[len(by) // 2][0], limits


def _copy_ratios(limits: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Each round's first run against its limits, as a store's ``rounds`` keep them."""
    return [
        {"copy_vs_limit": c["vs_limit"], "copy_vs_limit_with_manifest": c["vs_limit_with_manifest"]}
        for c in limits
    ]


async def _focus_rounds(
    m: Manager,
    cloud: LocalCloud,
    group: list[Server],
    setup: Setup,
    load: dict[str, Any],
) -> dict[str, Any]:
    """Parts 2-4 on the focus fleet, ``setup.focus_rounds`` times, each round its limits,
    then its first run and reruns under names of its own (snapshot mode in the last): the
    figures of the median rounds (:func:`_median_rounds`); each round's load averages
    into ``load``."""
    focus = setup.focus
    rounds: list[dict[str, Any]] = []
    for i in range(setup.focus_rounds):
        done: dict[str, Any] = {"load": {}}
        # the limits of this round, right before its first run: each run is judged
        # against the machine as it was then
        await _limits(group, done)
        print(f"round {i + 1} of {setup.focus_rounds}: first run of the focus fleet")
        done["first"] = await run_timed(m, copy_plan(group, f"bk{focus}r{i}"), cloud)
        print(f"  asyncstage: {done['first']['wall_s']:.2f} s")
        last = i == setup.focus_rounds - 1
        await _reruns(m, cloud, done, group, done["first"], focus, f"r{i}", snapshot_mode=last)
        load |= {f"round{i + 1}_{k}": v for k, v in done["load"].items()}
        rounds.append(done)
    return _median_rounds(rounds)


def _median_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A store's figures: those of the round whose rerun ratio is the median (and of the
    round whose kept-volume ratio is, and whose copy-mode ratio is), with every round's
    ratios."""

    mid, kept = _median_rerun(rounds, "rerun"), _median_rerun(rounds, "kept_rerun", "kept_first")
    copy, limits = _median_copy(rounds)
    return {
        "first": mid["first"],
        "rerun": mid["rerun"],
        "kept_first": kept["kept_first"],
        "kept_rerun": kept["kept_rerun"],
        "snapshot": rounds[-1]["snapshot"],
        # the round whose first run is the median against the limits of its own round
        "copy_first": copy["first"],
        "bare": copy["bare"],
        "rounds": _round_ratios(rounds, limits, "kept_first"),
    }


async def _reruns(
    m: Manager,
    cloud: LocalCloud,
    res: dict[str, Any],
    group: list[Server],
    first: dict[str, Any],
    focus: int,
    tag: str = "",
    *,
    snapshot_mode: bool = True,
) -> None:
    """Parts 3-4 on the focus fleet after its ``first`` run (of backups named
    ``bk{focus}{tag}``): the rerun, the runs keeping their volumes, snapshot mode."""
    print(f"incremental: 1 % of the files changed on {focus} servers, the plan again")
    await _change_files(group)
    res["rerun"] = rerun = await run_timed(m, copy_plan(group, f"bk{focus}{tag}"), cloud)
    print(f"  rerun {rerun['wall_s']:.2f} s, first {first['wall_s']:.2f} s")
    res["load"]["after_incremental"] = loadavg()

    print("kept work volumes: a first run keeping them, 1 % changed, the plan again")
    kept_plan = copy_plan(group, f"bkw{focus}{tag}", keep_volume=True)
    res["kept_first"] = kept_first = await run_timed(m, kept_plan, cloud)
    await _change_files(group)
    res["kept_rerun"] = kept = await run_timed(m, kept_plan, cloud)
    print(f"  rerun {kept['wall_s']:.2f} s, first {kept_first['wall_s']:.2f} s")
    async with anyio.create_task_group() as tg:  # snapshot mode takes every attached volume
        for v in m.volumes():
            if v.name.startswith(f"bkw{focus}{tag}-"):
                tg.start_soon(v.delete)
    res["load"]["after_kept_volumes"] = loadavg()
    if not snapshot_mode:
        return

    print(f"snapshot mode on {focus} servers")
    res["snapshot"] = snap = await run_timed(m, snapshot_plan(group, f"snap{focus}"), cloud)
    print(f"  snapshot mode {snap['wall_s']:.2f} s, copy mode {first['wall_s']:.2f} s")
    res["load"]["after_snapshot_mode"] = loadavg()


def report(results: Path, quick: bool, setup: Setup) -> None:
    """``backup.json`` from the parts' figures on disk (nothing when one is missing)."""
    parts: dict[str, dict[str, Any]] = {}
    for part in PARTS:
        path = _part_path(results, part)
        if part == "perl" and not setup.of("perl"):
            continue
        if not path.exists():
            print(f"part {part} not run yet ({path}): no report")
            return
        parts[part] = json.loads(path.read_text())
    rep = BaselineReport("backup", quick, results)
    began = min(parts.values(), key=lambda r: str(r.get("started", "")))
    rep.started = began.get("started", rep.started)  # the runs', not the report's
    rep.load["start"] = began["load"]["start"]
    rep.params = {
        "fleet_sizes": setup.sizes,
        "focus_fleet": setup.focus,
        "bytes_per_server": setup.per_server,
        "files_per_server": setup.files,
        "focus_bytes_per_server": setup.focus_bytes,
        "focus_files_per_server": setup.focus_files,
        "large_fleet": setup.large,
        "large_bytes_per_server": setup.large_bytes,
        "large_files_per_server": setup.large_files,
        "changed_share": 0.01,
        "plan_concurrency": "N (every backup at once)",
        "perl_measured_up_to": setup.perl_max,
        "source": f"{SRC}: a 1 GiB ext4 data volume per server",
        "boot_delay_s": 0.0,
        "realism": "aws, without the consistency window (as bench_perl)",
        "instances_cpu_from": {
            p: r.get("instances_cpu_from", "/proc (clock ticks)") for p, r in parts.items()
        },
        "parts": {p: _part_text(p, setup) for p in parts},
        "parts_started": {p: r.get("started") for p, r in parts.items()},
    }
    scale = parts["scale"]
    res: dict[str, Any] = {
        "perl_module_missing": parts.get("perl", scale)["perl_module_missing"],
        "fleets": {},
        "parts": {
            p: {k: v for k, v in r.items() if k in ("seconds", "setup_s", "api_calls")}
            for p, r in parts.items()
        },
    }
    for r in parts.values():
        res["fleets"] |= r["fleets"]
        rep.load |= {f"{r['part']}_{k}": v for k, v in r["load"].items()}
        if r.get("perl_stderr_tail"):
            res["perl_stderr_tail"] = r["perl_stderr_tail"]
    res["fleets"] = {str(n): res["fleets"][str(n)] for n in setup.sizes}
    per_server = parts.get("perl", {}).get("perl_per_server_s")
    for n in setup.sizes:  # beyond what Perl backed up: its time per server, times N
        row = res["fleets"][str(n)]
        if n > setup.perl_max and per_server is not None:
            row.pop("not_run", None)
            row["perl_s"], row["perl_extrapolated"] = round(per_server * n, 3), True
            row["ratio"] = ratio(row["perl_s"], row["asyncstage"]["wall_s"])
    first = scale["first"]
    res["rounds"] = scale.get("rounds", [])
    res["copy_first"] = scale.get("copy_first", first)
    res["cpu_limit"] = _cpu_limit(res["copy_first"], scale["bare"])
    rerun, snap = scale["rerun"], scale["snapshot"]
    res["incremental"] = {
        "first": first,
        "rerun": rerun,
        "ratio": ratio(rerun["wall_s"], first["wall_s"]),
    }
    kept_first, kept_rerun = scale["kept_first"], scale["kept_rerun"]
    res["incremental_kept"] = {
        "first": kept_first,
        "rerun": kept_rerun,
        "ratio": ratio(kept_rerun["wall_s"], kept_first["wall_s"]),
    }
    res["snapshot_mode"] = {
        "copy": first,
        "snapshot": snap,
        "ratio": ratio(first["wall_s"], snap["wall_s"]),
    }
    ebs = parts["ebs"]
    res["reflink_store"] = {
        "rounds": ebs.get("rounds", []),
        **_reruns_of(ebs),
        "snapshot": ebs["snapshot"],
        "snapshot_ratio": ratio(ebs["first"]["wall_s"], ebs["snapshot"]["wall_s"]),
    }
    if "bare" in ebs:
        res["reflink_store"]["copy_first"] = ebs["copy_first"]
        res["reflink_store"]["cpu_limit"] = _cpu_limit(ebs["copy_first"], ebs["bare"])
    large = parts["large"]
    res["large"] = {
        "rounds": large["rounds"],
        "copy_first": large["copy_first"],
        "cpu_limit": _cpu_limit(large["copy_first"], large["bare"]),
    }
    if "rerun" in large:
        res["large"] |= _reruns_of(large)
    rep.results.update(res)
    _tables(rep, res, setup.sizes)
    _targets(rep, res, setup.sizes)
    rep.save()


def _reruns_of(part: dict[str, Any]) -> dict[str, Any]:
    """A part's reruns against their first runs, and their ratios."""
    first, rerun, kept_first, kept = (
        part[k] for k in ("first", "rerun", "kept_first", "kept_rerun")
    )
    return {
        "first": first,
        "rerun": rerun,
        "ratio": ratio(rerun["wall_s"], first["wall_s"]),
        "kept_first": kept_first,
        "kept_rerun": kept,
        "kept_ratio": ratio(kept["wall_s"], kept_first["wall_s"]),
    }


def _part_text(part: str, setup: Setup) -> str:
    """What part ``part`` runs, for the report's parameters."""
    if part == "ebs":
        return (
            f"local cloud of its own (store='reflink'), parts 3-4 on a first run of {setup.focus}"
        )
    if part == "large":
        return (
            f"local cloud of its own (store='reflink'), parts 2-3 on {setup.large} servers "
            f"of {setup.large_bytes // MiB} MiB each"
        )
    text = f"local cloud of its own, fleets {setup.of(part)}"
    return text + (f", parts 2-4 on a first run of {setup.focus}" if part == "scale" else "")


def _cpu_limit(first: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """A first run's copy phases against the CPU limits of the same cloud: bare rsync,
    and bare rsync with the manifest written after (the hashing a plan cannot shed)."""
    nbytes, hashed = first["bytes"], bare["with_manifest"]
    limit, with_manifest = nbytes / bare["wall_s"], nbytes / hashed["wall_s"]
    copy_phase = nbytes / first["copy_span_s"]
    span = first.get("copy_span_cpu", {})
    if span and "instances_cpu_s" in hashed:
        # the instances' work per GiB over the plan's copy span against the limit's
        # with the manifest, both as the instances' cgroup counts it: how lean the work
        # is, apart from who else shared the cores meanwhile
        ours = float(span["instances_cpu_s"]) / nbytes * GiB
        theirs = float(hashed["instances_cpu_s"]) / nbytes * GiB
        work = {
            "span_cpu": span,
            "span_instances_cpu_s_per_gib": round(ours, 2),
            "with_manifest_instances_cpu_s_per_gib": round(theirs, 2),
            "instances_work_vs_limit_with_manifest": ratio(theirs, ours),
        }
        if "instances_sys_cpu_s" in span and "instances_sys_cpu_s" in hashed:
            # of it, the kernel's (page cache, the volumes' loop devices, memory taken
            # back) and the commands' own (rsync, the helpers, the shells)
            sys_ours = float(span["instances_sys_cpu_s"]) / nbytes * GiB
            sys_theirs = float(hashed["instances_sys_cpu_s"]) / nbytes * GiB
            work |= {
                "span_instances_sys_cpu_s_per_gib": round(sys_ours, 2),
                "with_manifest_instances_sys_cpu_s_per_gib": round(sys_theirs, 2),
                "instances_user_vs_limit_with_manifest": ratio(
                    theirs - sys_theirs, ours - sys_ours
                ),
                "span_direct_reclaim_mib": span["direct_reclaim_mib"],
                "with_manifest_direct_reclaim_mib": hashed["direct_reclaim_mib"],
            }
    else:
        work = {}
    return work | {
        "bare": bare,
        "limit_mb_s": round(limit / 1e6, 1),
        "limit_with_manifest_mb_s": round(with_manifest / 1e6, 1),
        "copy_phase_mb_s": round(copy_phase / 1e6, 1),
        "whole_run_mb_s": round(nbytes / first["wall_s"] / 1e6, 1),
        "bare_cpu_s_per_gib": round(bare["own_cpu_s"] / nbytes * GiB, 2),
        "with_manifest_cpu_s_per_gib": round(hashed["own_cpu_s"] / nbytes * GiB, 2),
        "plan_cpu_s_per_gib": round(first["own_cpu_s"] / nbytes * GiB, 2),
        "vs_limit": ratio(copy_phase, limit),
        "vs_limit_with_manifest": ratio(copy_phase, with_manifest),
        "whole_run_vs_limit": ratio(nbytes / first["wall_s"], limit),
    }


def _f(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _phases(run: dict[str, Any]) -> str:
    """A run's median phases per backup, as text."""
    p = run["median_s"]
    return (
        f"volume {_f(p['volume_s'])} s, rsync {_f(p['rsync_s'])} s, "
        f"snapshot {_f(p['snapshot_s'])} s"
    )


def _rounds(rounds: list[dict[str, Any]], key: str) -> str:
    """The rounds a row is the median of, as text (nothing for one round)."""
    if len(rounds) < 2:
        return ""
    found = ", ".join(_f(r[key]) for r in rounds)
    return f"the median of {len(rounds)} rounds, each a first run and its rerun ({found}); "


def _slowest(run: dict[str, Any]) -> str:
    """The backup of a run that ended last, and its longest snapshot phase, as text."""
    if "slowest_s" not in run:
        return ""
    p = run["slowest_s"]
    return (
        f"the last backup {_f(p['elapsed'])} s from its volume on (volume "
        f"{_f(p['volume_s'])} s, rsync {_f(p['rsync_s'])} s, manifest {_f(p['manifest_s'])} s, "
        f"snapshot {_f(p['snapshot_s'])} s); the longest snapshot phase "
        f"{_f(run['snapshot_max_s'])} s (the snapshot pending {_pending()} s in it); "
    )


def _cpu(run: dict[str, Any]) -> str:
    """Where a run's CPU went, as text."""
    c = run["cpu_split"]
    return (
        f"{_f(run['own_cpu_s'])} CPU s of ours in {_f(run['wall_s'])} s ("
        f"{_f(_own_share(run) * 100)} % of the cores: the controller "
        f"{_f(c['controller_cpu_s'])}, the local cloud's threads (its API, its image copies) "
        f"{_f(c['cloud_cpu_s'])}, the instances {_f(c['instances_cpu_s'])}), cores "
        f"{_f(run['machine_busy'] * 100)} % busy in all"
    )


def _copy_mode_target(
    report: BaselineReport,
    key: str,
    first: dict[str, Any],
    c: dict[str, Any],
    store: str,
    rerun: dict[str, Any] | None,
) -> None:
    """The copy mode's throughput against the CPU limit of the same cloud; below 0.8 of
    it, bound by the machine when the plan keeps 0.8 of the limit with the manifest
    (``rerun``: a rerun of the same store, whose work is the backups' fixed steps)."""
    focus, bare, hashed = first["n"], c["bare"], c["bare"]["with_manifest"]
    manifest = (
        f"{first.get('manifest_followed', 0)} of {first['files']} digests from the follow "
        f"pass beside rsync, the rest once rsync was done (median "
        f"{_f(first['median_s']['manifest_s'])} s after rsync's "
        f"{_f(first['median_s']['rsync_s'])} s)"
    )
    span = _span_work(c)
    if c["vs_limit"] >= 0.8:  # met
        bound = "library"
    # below it, how lean the instances' work is decides first: cores kept busy by a plan
    # that does more per byte than its limit are not the machine's doing
    elif c.get("instances_work_vs_limit_with_manifest", 0.0) >= 0.8:
        bound = (
            "machine and design: a plan writes each backup's manifest, a sha256 of every "
            "byte read where the data is (what a later check verifies): bare rsync followed "
            f"by the same manifest written by a plain command moves "
            f"{_f(c['limit_with_manifest_mb_s'])} MB/s, and the plan's copy phases "
            f"{_f(c['vs_limit_with_manifest'])}× that; the instances' own work over the "
            f"plan's copy span is {_f(c['instances_work_vs_limit_with_manifest'])}× as lean "
            f"as that limit's ({span}): the rest of the span went to what shares the "
            f"{os.cpu_count() or 1} cores with the instances here, the controller and the "
            f"local cloud, which run on machines of their own on EC2 ({manifest})"
        )
    elif _own_share(first) >= 0.8:
        bound = _bound(first)
    elif c["vs_limit_with_manifest"] >= 0.8:
        bound = (
            "machine: a plan writes each backup's manifest, a sha256 of every byte read "
            f"where the data is (what a later check verifies), and here the {focus} "
            f"instances hash on the {os.cpu_count() or 1} cores their copies keep busy; "
            "bare rsync followed by the same "
            f"manifest written by a plain command moves {_f(c['limit_with_manifest_mb_s'])} "
            f"MB/s ({_f(c['with_manifest_cpu_s_per_gib'])} CPU s/GiB against rsync's "
            f"{_f(c['bare_cpu_s_per_gib'])}), and the plan's copy phases "
            f"{_f(c['vs_limit_with_manifest'])}× that; on EC2 each instance hashes on cores "
            f"of its own while its copy waits on the disk and the network ({manifest})"
        )
    else:
        bound = (
            "library: the manifest, a sha256 of every byte, is part of the gap (bare rsync "
            f"followed by the same manifest written by a plain command moves "
            f"{_f(c['limit_with_manifest_mb_s'])} MB/s, "
            f"{_f(c['with_manifest_cpu_s_per_gib'])} CPU s/GiB against rsync's "
            f"{_f(c['bare_cpu_s_per_gib'])}), but the plan's copy phases move only "
            f"{_f(c['vs_limit_with_manifest'])}× that: the rest is the plan's own work "
            "in the span on the same cores (the follow pass's walks, the later backups' "
            "volumes made, formatted and mounted, the earlier ones' unmounts and "
            f"snapshots; {manifest}){'; ' + span if span else ''}{_fixed_work(c, first, rerun)}"
            "; the copies start within "
            f"{_f(first.get('rsync_start_spread_s', float('nan')))} s of each other; "
            f"{_copies(first)}"
        )
    report.target(
        key,
        c["vs_limit"],
        ">=",
        0.8,
        f"copy mode, {focus} backups of {_f(first['bytes'] / focus / MiB)} MiB at once"
        f"{store}: aggregate throughput of the copy "
        "phases / the CPU-bound limit (bare rsync of the same bytes on every server at "
        "once, same run)",
        bound=bound,
        evidence=(
            f"limit: bare rsync -a of the same {_f(first['bytes'] / MiB)} MiB on all {focus} "
            f"servers at once: {_f(c['limit_mb_s'])} MB/s (cores {_f(bare['busy'] * 100)} % "
            f"busy, {_f(c['bare_cpu_s_per_gib'])} CPU s/GiB; {_rounds_s(bare['rounds'])}); "
            f"with the manifest after it: {_f(c['limit_with_manifest_mb_s'])} MB/s "
            f"({_rounds_s(hashed['rounds'])}); the plan's copy phases "
            f"{_f(c['copy_phase_mb_s'])} MB/s (route {', '.join(first['routes'])}); its whole "
            f"run, volumes and snapshots included, {_f(c['whole_run_mb_s'])} MB/s "
            f"({_f(c['whole_run_vs_limit'])}× the limit, {_f(c['plan_cpu_s_per_gib'])} CPU "
            f"s/GiB): {_cpu(first)}"
        ),
    )


def _span_work(c: dict[str, Any]) -> str:
    """Who used the CPU over a plan's copy span, against the limit's work, as text."""
    if "span_cpu" not in c:
        return ""
    cpu = c["span_cpu"]
    return (
        f"over the span the instances used {_f(cpu['instances_cpu_s'])} CPU s, "
        f"{_f(c['span_instances_cpu_s_per_gib'])} s/GiB against "
        f"{_f(c['with_manifest_instances_cpu_s_per_gib'])} in the limit with the manifest"
        f"{_kernel_work(c)}; the controller {_f(cpu['controller_cpu_s'])} CPU s, the local "
        f"cloud's threads {_f(cpu['cloud_cpu_s'])}; the cores "
        f"{_f((1 - float(cpu['idle_share'] or 0)) * 100)} % busy"
    )


def _fixed_work(c: dict[str, Any], first: dict[str, Any], rerun: dict[str, Any] | None) -> str:
    """The plan's instance work over its limit's, per backup, beside a rerun's whole
    instance work per backup (its fixed steps), as text."""
    if "span_instances_cpu_s_per_gib" not in c or rerun is None:
        return ""
    n = first["n"]
    gib = first["bytes"] / GiB
    extra = c["span_instances_cpu_s_per_gib"] - c["with_manifest_instances_cpu_s_per_gib"]
    return (
        f"; that extra work is {_f(extra * gib / n)} CPU s per backup, about a rerun's "
        f"backup's whole work ({_f(rerun['cpu_split']['instances_cpu_s'] / rerun['n'])} "
        "CPU s): "
        "each backup's fixed steps (its commands, each under sudo; the helpers' "
        "interpreters; the mount and the unmount), not its bytes"
    )


def _kernel_work(c: dict[str, Any]) -> str:
    """The kernel's part of the instances' work over the span and in the limit, as text."""
    if "span_instances_sys_cpu_s_per_gib" not in c:
        return ""
    return (
        f" (of it in the kernel {_f(c['span_instances_sys_cpu_s_per_gib'])} s/GiB against "
        f"{_f(c['with_manifest_instances_sys_cpu_s_per_gib'])}, the rest, the commands' own "
        f"work, {_f(c['instances_user_vs_limit_with_manifest'])}× as lean as the limit's; "
        f"memory the machine took back in the allocating processes' time: "
        f"{_f(c['span_direct_reclaim_mib'])} MiB against "
        f"{_f(c['with_manifest_direct_reclaim_mib'])})"
    )


def _rounds_s(rounds: list[dict[str, Any]]) -> str:
    """The walls of a limit's rounds, as text."""
    if len(rounds) == 1:
        return f"one round, right before the run: {_f(rounds[0]['wall_s'])} s"
    return f"median of {len(rounds)}: " + " / ".join(f"{_f(r['wall_s'])} s" for r in rounds)


def _own_share(run: dict[str, Any]) -> float:
    """The share of the machine's cores the run's own processes used."""
    return float(run["own_cpu_s"]) / ((os.cpu_count() or 1) * float(run["wall_s"]))


def _bound(run: dict[str, Any]) -> str:
    """``library``, unless the run's own processes (controller, local cloud, instances)
    kept the cores busy: then the machine."""
    if _own_share(run) >= 0.8:
        return (
            "machine: the cores, busy with the run's own work: the copies, and the local "
            "cloud's and the instances' for every backup (volumes, mounts, snapshots)"
        )
    return "library"


def _data_s(run: dict[str, Any]) -> float:
    """A copy run's median seconds per backup that read data (rsync, manifest)."""
    p = run["median_s"]
    return float(p["rsync_s"]) + float(p.get("manifest_s", 0.0))


def _pending() -> str:
    """The span a local-cloud snapshot stays pending (the realism's), as text."""
    low, high = PERL_REALISM.snapshot
    return f"{_f(low)}-{_f(high)}"


def _copies(run: dict[str, Any]) -> str:
    """The local cloud's image copies during a run, as text."""
    c = run.get("image_copies")
    if not c:
        return "image copies not counted"
    volumes = (
        f"; {c['volumes']} of them volumes from snapshots, creating {_f(c['volume_mean_s'])} s "
        "each on average"
        if c.get("volumes")
        else ""
    )
    shared = (
        f", {c['cloned']} of them clones sharing their source's blocks" if c.get("cloned") else ""
    )
    return (
        f"the local cloud copied {c['copies']} images ({_f(c['mib'])} MiB of data; snapshots "
        f"and volumes from snapshots{shared}), {_f(c['mean_s'])} s each on average from the "
        f"call to the end of the copy, against a snapshot's pending {_pending()} s{volumes}"
    )


def _volume_creating(run: dict[str, Any]) -> float:
    """Seconds a run's volumes from snapshots stayed creating (the cloud's copy), mean."""
    return float((run.get("image_copies") or {}).get("volume_mean_s", 0.0))


def _throttled(run: dict[str, Any]) -> str:
    """The calls the local cloud throttled during a run (EC2's rates), as text."""
    if "throttled" not in run:
        return ""
    calls = run["throttled"]
    shown = ", ".join(f"{k} {v}" for k, v in sorted(calls.items())) or "none"
    return f"API calls throttled (RequestLimitExceeded, retried): {shown}; "


def _perl_cell(row: dict[str, Any], key: str) -> Any:
    if row[key] is None:
        return "not run"
    return f"{_f(row[key])} (extrapolated)" if row.get("perl_extrapolated") else row[key]


def _tables(report: BaselineReport, res: dict[str, Any], sizes: list[int]) -> None:
    rows: list[list[Any]] = []
    for n in sizes:
        row = res["fleets"][str(n)]
        ours = row["asyncstage"]
        p = ours["median_s"]
        rows.append(
            [
                n,
                round(ours["bytes"] / MiB, 1),
                ours["wall_s"],
                _perl_cell(row, "perl_s"),
                _perl_cell(row, "ratio"),
                p["volume_s"],
                p["rsync_s"],
                p["snapshot_s"],
            ]
        )
    report.table(
        "Fleet backup: asyncstage run_plan (all at once) vs Perl VM::EC2::Staging one server "
        "after another (seconds; ratio = Perl / asyncstage; asyncstage's median phases)",
        ["servers", "MiB", "asyncstage s", "Perl s", "ratio", "volume s", "rsync s", "snapshot s"],
        rows,
    )
    c, inc, snap = res["cpu_limit"], res["incremental"], res["snapshot_mode"]
    first = inc["first"]["wall_s"]
    copy_phase = [c["copy_phase_mb_s"], c["vs_limit"]]
    report.table(
        "Copy mode against the CPU limit, the incremental rerun and snapshot mode (same fleet)",
        ["figure", "value", "ratio"],
        [
            ["bare rsync on every server at once (the limit), MB/s", c["limit_mb_s"], 1.0],
            [
                "bare rsync, then the manifest by a plain command (limit with it), MB/s",
                c["limit_with_manifest_mb_s"],
                ratio(c["limit_with_manifest_mb_s"], c["limit_mb_s"]),
            ],
            ["plan, copy phases (first rsync start to last end), MB/s", *copy_phase],
            ["plan, whole run, MB/s", c["whole_run_mb_s"], c["whole_run_vs_limit"]],
            ["copy mode, first run, s", first, 1.0],
            ["copy mode, rerun with 1 % changed, s", inc["rerun"]["wall_s"], inc["ratio"]],
            [
                "copy mode keeping its volume, first run, s",
                res["incremental_kept"]["first"]["wall_s"],
                1.0,
            ],
            [
                "copy mode keeping its volume, rerun with 1 % changed, s",
                res["incremental_kept"]["rerun"]["wall_s"],
                res["incremental_kept"]["ratio"],
            ],
            [
                "snapshot mode, s",
                snap["snapshot"]["wall_s"],
                ratio(snap["snapshot"]["wall_s"], first),
            ],
        ],
    )
    large = res["large"]["cpu_limit"]
    each = res["large"]["copy_first"]["bytes"] / res["large"]["copy_first"]["n"] / MiB
    report.table(
        f"Copy mode against the CPU limit, backups of {_f(each)} MiB (their fixed steps fade)",
        ["figure", "value", "ratio"],
        [
            ["bare rsync on every server at once (the limit), MB/s", large["limit_mb_s"], 1.0],
            [
                "bare rsync, then the manifest by a plain command (limit with it), MB/s",
                large["limit_with_manifest_mb_s"],
                ratio(large["limit_with_manifest_mb_s"], large["limit_mb_s"]),
            ],
            ["plan, copy phases, MB/s", large["copy_phase_mb_s"], large["vs_limit"]],
            ["plan, whole run, MB/s", large["whole_run_mb_s"], large["whole_run_vs_limit"]],
        ],
    )
    ebs, kept = res["reflink_store"], res["incremental_kept"]
    sides = [
        ("first run", inc["first"], ebs["first"], 1.0, 1.0),
        ("rerun, 1 % changed", inc["rerun"], ebs["rerun"], inc["ratio"], ebs["ratio"]),
        ("keeping its volume, first run", kept["first"], ebs["kept_first"], 1.0, 1.0),
        (
            "keeping its volume, rerun",
            kept["rerun"],
            ebs["kept_rerun"],
            kept["ratio"],
            ebs["kept_ratio"],
        ),
        ("snapshot mode", snap["snapshot"], ebs["snapshot"], None, None),
    ]
    report.table(
        "The focus fleet's runs, the local cloud's images as files (each snapshot and volume "
        "from a snapshot a copy of its data) and sharing blocks (store='reflink', as EBS: "
        "they cost the machine nothing); s, ratio to the first run of the same copy mode; "
        "the local cloud's CPU s (its API, image copies)",
        ["run", "files s", "ratio", "cloud CPU s", "reflink s", "ratio", "cloud CPU s"],
        [
            [
                name,
                plain["wall_s"],
                plain_ratio if plain_ratio is not None else "",
                plain["cpu_split"]["cloud_cpu_s"],
                shared["wall_s"],
                shared_ratio if shared_ratio is not None else "",
                shared["cpu_split"]["cloud_cpu_s"],
            ]
            for name, plain, shared, plain_ratio, shared_ratio in sides
        ],
    )
    for n in sizes:
        if res["fleets"][str(n)].get("not_run"):
            report.note(f"Perl fleet of {n}: not run: {res['fleets'][str(n)]['not_run']}")


def _targets(report: BaselineReport, res: dict[str, Any], sizes: list[int]) -> None:
    measured = report.params["perl_measured_up_to"]
    for n in sizes:
        row = res["fleets"][str(n)]
        ours = row["asyncstage"]
        extrapolated = bool(row.get("perl_extrapolated"))
        evidence = (
            f"one run each side, same local cloud: asyncstage {_f(ours['wall_s'])} s for {n} "
            f"backups of {_f(ours['bytes'] / n / MiB)} MiB at once (median per backup: "
            f"{_phases(ours)})"
        )
        if row["perl_s"] is not None:
            evidence += f", Perl {_f(row['perl_s'])} s ({_f(row['perl_s'] / n)} s per server"
            evidence += (
                f"; extrapolated: its time per server at {measured} servers, times {n})"
                if extrapolated
                else ")"
            )
        what = f"Perl one server after another / asyncstage run_plan, fleet backup of {n}"
        report.target_of(
            f"fleet_backup_{n}_vs_perl",
            {"ratio": row["ratio"], "not_run": row.get("not_run")},
            5,
            what + (" (Perl extrapolated)" if extrapolated else ""),
            bound="library",
            evidence=evidence,
        )
    first, rerun = res["incremental"]["first"], res["incremental"]["rerun"]
    focus = first["n"]
    _copy_mode_target(
        report,
        "copy_mode_vs_cpu_limit",
        res["copy_first"],
        res["cpu_limit"],
        f" ({_copy_rounds(res['rounds'])})",
        rerun,
    )
    _large_targets(report, res["large"])
    report.target(
        "incremental_rerun",
        res["incremental"]["ratio"],
        "<=",
        0.2,
        f"rerun with 1 % of the files changed / first run, copy mode, {focus} servers, "
        "a new work volume from the previous snapshot each run",
        bound="library"
        if res["incremental"]["ratio"] <= 0.2
        else _rerun_bound(rerun, first, focus, copies=True),
        evidence=(
            f"{_rounds(res['rounds'], 'ratio')}the run's fixed part: every backup makes a "
            "volume from the previous snapshot (median "
            f"{_f(rerun['median_s']['volume_s'])} s with the attach and the mount, against "
            f"{_f(first['median_s']['volume_s'])} s for the first run's blank volume; of it, "
            "the volume is creating while the local cloud copies the snapshot's whole "
            f"image, {_f(_volume_creating(rerun))} s on average, as many copies at a time as "
            "cores, where EBS makes it available at once and loads its blocks later), "
            "unmounts it, takes a snapshot and waits until it is completed, marks it "
            "complete, detaches and deletes the volume, each step a call or an ssh command "
            f"of its own; rerun: {_copies(rerun)}; "
            f"rerun median per backup: data {_f(_data_s(rerun))} s (rsync + manifest) of "
            f"{_f(rerun['median_s']['elapsed'])} s; manifest: {rerun.get('manifest_reused', 0)} "
            f"digests kept, {rerun.get('manifest_followed', 0)} from the follow pass, "
            f"{_f(rerun.get('manifest_hashed_bytes', 0) / MiB)} MiB hashed after rsync "
            f"(first run {_f(first.get('manifest_hashed_bytes', 0) / MiB)} MiB); "
            f"{_throttled(rerun)}first {_f(first['wall_s'])} s "
            f"({_f(first['bytes'] / MiB)} MiB), rerun "
            f"{_f(rerun['wall_s'])} s ({_f(rerun['bytes'] / MiB)} MiB sent, {rerun['parents']} "
            f"of {focus} from their previous snapshot); median per backup: first "
            f"{_phases(first)}; rerun {_phases(rerun)}; first run {_cpu(first)}; rerun "
            f"{_cpu(rerun)}"
        ),
    )
    kept = res["incremental_kept"]
    k_first, k_rerun = kept["first"], kept["rerun"]
    report.target(
        "incremental_rerun_kept_volume",
        kept["ratio"],
        "<=",
        0.2,
        f"rerun with 1 % of the files changed / first run, copy mode keeping its work "
        f"volume (keep_volume), {focus} servers",
        bound="library"
        if kept["ratio"] <= 0.2
        else _rerun_bound(k_rerun, k_first, focus, copies=True),
        evidence=(
            f"{_rounds(res['rounds'], 'kept_ratio')}a rerun into its kept volume makes no "
            "volume, but still unmounts it, takes a snapshot and waits until it is "
            "completed, then marks it complete, each step a call or an ssh command of its "
            f"own; rerun: {_copies(k_rerun)}; "
            f"rerun median per backup: data {_f(_data_s(k_rerun))} s (rsync + manifest), "
            f"volume {_f(k_rerun['median_s']['volume_s'])} s, snapshot "
            f"{_f(k_rerun['median_s']['snapshot_s'])} s of {_f(k_rerun['median_s']['elapsed'])}"
            f" s; {k_rerun.get('volumes_reused', 0)} of {focus} into their kept volume; "
            f"{_throttled(k_rerun)}first {_f(k_first['wall_s'])} s "
            f"({_f(k_first['bytes'] / MiB)} MiB), rerun {_f(k_rerun['wall_s'])} s "
            f"({_f(k_rerun['bytes'] / MiB)} MiB sent); the same rerun making a volume from "
            f"the snapshot: {_f(rerun['wall_s'])} s ({_f(res['incremental']['ratio'])}× its "
            f"first run); rerun {_cpu(k_rerun)}"
        ),
    )
    snap = res["snapshot_mode"]
    report.target(
        "snapshot_vs_copy_mode",
        snap["ratio"],
        ">=",
        1,
        f"copy mode first run / snapshot mode, same {focus} servers",
        bound=_bound(snap["snapshot"])
        if _own_share(snap["snapshot"]) >= 0.8
        else (
            "ec2: snapshot mode copies nothing; its time is EC2's: the calls of each backup "
            "(lease, CreateSnapshots, tags) within the account's request rates, and the "
            "snapshots pending until completed (0.5-1.5 s in the local cloud)"
        ),
        evidence=(
            f"copy mode {_f(snap['copy']['wall_s'])} s, snapshot mode "
            f"{_f(snap['snapshot']['wall_s'])} s ({snap['snapshot']['snapshots']} snapshots, one "
            f"CreateSnapshots per server; {_copies(snap['snapshot'])}): "
            f"{_throttled(snap['snapshot'])}"
            f"{_cpu(snap['snapshot'])}"
        ),
    )
    _reflink_targets(report, res, focus)
    _beside_large(report, res["large"])


def _beside_large(report: BaselineReport, large: dict[str, Any]) -> None:
    """The focus fleet's missed copy-mode and rerun rows name the large backups' figures
    beside theirs: the same plans, with backups whose fixed steps weigh little."""
    if "rerun" not in large:
        return
    first = large["copy_first"]
    each = _f(first["bytes"] / first["n"] / MiB)
    figures = {
        "copy_mode_vs_cpu_limit": f"its copy phases {_f(large['cpu_limit']['vs_limit'])}× "
        "the limit (copy_mode_vs_cpu_limit_large)",
        "incremental_rerun": f"a rerun {_f(large['ratio'])}× its first run "
        "(incremental_rerun_large)",
        "incremental_rerun_kept_volume": f"a rerun into kept volumes {_f(large['kept_ratio'])}× "
        "its first run (incremental_rerun_kept_volume_large)",
    }
    for row in report.targets:
        name = str(row["name"]).removesuffix("_reflink_store")
        if name in figures and not row["met"]:
            row["evidence"] += (
                f"; the same plan with {first['n']} backups of {each} MiB each, whose fixed "
                f"steps weigh little beside their bytes (the local cloud's images sharing "
                f"blocks): {figures[name]}"
            )


def _floor(rerun: dict[str, Any], first: dict[str, Any]) -> float:
    """The least a rerun can take against its first run on these cores: its own CPU
    (controller, local cloud, instances) spread over every core, all the time."""
    return float(rerun["own_cpu_s"]) / ((os.cpu_count() or 1) * float(first["wall_s"]))


def _rerun_bound(
    rerun: dict[str, Any], first: dict[str, Any], focus: int, *, copies: bool = False
) -> str:
    """Why a rerun is over its target: its fixed work per backup on the shared cores when
    that alone is over it (``copies``: with the local cloud's copies of the images, as in
    the plain store), else each backup's steps at EC2's pace."""
    c, floor = rerun["cpu_split"], _floor(rerun, first)
    cloud = "the cloud's API for their calls" + (
        " and its copies of the images, which EBS makes away from the instances' hosts"
        if copies
        else ""
    )
    work = (
        f"the instances {_f(c['instances_cpu_s'])} CPU s, the local cloud "
        f"{_f(c['cloud_cpu_s'])}, the controller {_f(c['controller_cpu_s'])} for {focus} "
        "backups' fixed work (commands over ssh, each under sudo; the helpers' "
        "interpreters; rsync's scan of every file; the mount and the unmount; "
        f"{cloud}): {_f(floor)}× the first run's time at full use of the "
        f"{os.cpu_count() or 1} cores (they were {_f(rerun['machine_busy'] * 100)} % busy)"
    )
    pace = (
        "each backup's steps one after another at EC2's pace: the volume's calls and "
        f"polls, rsync, the manifest, the snapshot pending {_pending()} s before it can be "
        "marked complete"
    )
    if floor >= 0.2:
        return f"machine and library: {work}; then {pace}"
    return f"library and ec2: {pace}; the work itself leaves room: {work}"


def _copy_rounds(rounds: list[dict[str, Any]]) -> str:
    """Which of a store's rounds its copy-mode row shows, as text."""
    pairs = [(r["copy_vs_limit"], r["copy_vs_limit_with_manifest"]) for r in rounds]
    if len(pairs) < 2:
        return "its first run against the limits measured right before it"
    return (
        f"the round of median ratio of {len(pairs)}, each a first run against the limits "
        f"measured right before it: {', '.join(_f(a) for a, _ in pairs)} (against the "
        f"limit with the manifest {', '.join(_f(b) for _, b in pairs)})"
    )


def _large_targets(report: BaselineReport, large: dict[str, Any]) -> None:
    """The copy mode against the CPU limit with backups large enough that their fixed
    steps fade, and their reruns."""
    where = "backups large enough that their fixed steps fade" + (
        f"; {_REFLINK}" if "rerun" in large else ""
    )
    _copy_mode_target(
        report,
        "copy_mode_vs_cpu_limit_large",
        large["copy_first"],
        large["cpu_limit"],
        f" ({where}; {_copy_rounds(large['rounds'])})",
        large.get("rerun"),
    )
    if "rerun" not in large:
        return
    first = large["first"]
    each = _f(first["bytes"] / first["n"] / MiB)
    _rerun_targets(
        report,
        large["rounds"],
        f"{first['n']} backups of {each} MiB",
        where,
        (
            (
                "incremental_rerun_large",
                first,
                large["rerun"],
                large["ratio"],
                "a new work volume from the previous snapshot each run",
            ),
            (
                "incremental_rerun_kept_volume_large",
                large["kept_first"],
                large["kept_rerun"],
                large["kept_ratio"],
                "into the work volumes a run before it kept (keep_volume)",
            ),
        ),
    )


def _rerun_targets(
    report: BaselineReport,
    rounds: list[dict[str, Any]],
    fleet: str,
    where: str,
    rows: tuple[tuple[str, dict[str, Any], dict[str, Any], float, str], ...],
) -> None:
    """The rerun rows of one part's rounds: (name, first run, rerun, ratio, how) each."""
    for name, first, rerun, value, how in rows:
        n = first["n"]
        report.target(
            name,
            value,
            "<=",
            0.2,
            f"rerun with 1 % of the files changed / first run, copy mode, {fleet}, {how}; {where}",
            bound="library" if value <= 0.2 else _rerun_bound(rerun, first, n),
            evidence=(
                f"{_rounds(rounds, 'ratio' if 'kept' not in name else 'kept_ratio')}"
                f"first {_f(first['wall_s'])} s, rerun {_f(rerun['wall_s'])} s "
                f"({_f(rerun['bytes'] / MiB)} MiB sent; {rerun.get('volumes_reused', 0)} of "
                f"{n} into a kept volume); rerun: {_copies(rerun)}; median per backup: first "
                f"{_phases(first)}; rerun {_phases(rerun)} of "
                f"{_f(rerun['median_s']['elapsed'])} s; {_slowest(rerun)}{_throttled(rerun)}"
                f"first run {_cpu(first)}; rerun {_cpu(rerun)}"
            ),
        )


_REFLINK = (
    "the local cloud's images sharing blocks (store='reflink'): its snapshots and "
    "volumes from snapshots cost the machine nothing, as EBS's cost the instances' hosts "
    "nothing"
)


def _reflink_targets(report: BaselineReport, res: dict[str, Any], focus: int) -> None:
    """The reruns and snapshot mode with the local cloud's images sharing blocks."""
    ebs = res["reflink_store"]
    where = _REFLINK
    if "cpu_limit" in ebs:
        _copy_mode_target(
            report,
            "copy_mode_vs_cpu_limit_reflink_store",
            ebs["copy_first"],
            ebs["cpu_limit"],
            f" ({where}; {_copy_rounds(ebs['rounds'])})",
            ebs["rerun"],
        )
    _rerun_targets(
        report,
        ebs["rounds"],
        f"{focus} servers",
        where,
        (
            (
                "incremental_rerun_reflink_store",
                ebs["first"],
                ebs["rerun"],
                ebs["ratio"],
                "a new work volume from the previous snapshot each run",
            ),
            (
                "incremental_rerun_kept_volume_reflink_store",
                ebs["kept_first"],
                ebs["kept_rerun"],
                ebs["kept_ratio"],
                "keeping its work volume (keep_volume)",
            ),
        ),
    )
    snap = ebs["snapshot"]
    report.target(
        "snapshot_vs_copy_mode_reflink_store",
        ebs["snapshot_ratio"],
        ">=",
        1,
        f"copy mode first run / snapshot mode, same {focus} servers; {where}",
        bound=_bound(snap) if ebs["snapshot_ratio"] < 1 else "library",
        evidence=(
            f"copy mode {_f(ebs['first']['wall_s'])} s, snapshot mode {_f(snap['wall_s'])} s "
            f"({snap['snapshots']} snapshots; {_copies(snap)}): {_throttled(snap)}{_cpu(snap)}"
        ),
    )


if __name__ == "__main__":
    anyio.run(main)
