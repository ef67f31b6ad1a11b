"""The seed as a baseline: asyncstage vs the original Perl VM::EC2::Staging, same jobs.

Debian's ``libvm-ec2-perl`` (VM::EC2 1.28 with VM::EC2::Staging) runs through the
driver ``benchmarks/perl/staging_bench.pl`` against the same local cloud as
asyncstage, in the same run, the two taking turns (a b, b a, ...):

- fleet: N named servers up and answering ssh. asyncstage ``provision_servers(names)``;
  Perl ``get_server(-name => ...)`` for each (its ``provision_server`` is serial).
- commands: ``echo ok`` N times on one server, one after another. asyncstage over its
  warm connection; Perl ``scmd`` (a new ``ssh`` per command).
- put: a local tree of random files onto a volume's root. asyncstage
  ``rsync(f"{tree}/", f"{volume}/")``; Perl ``$manager->rsync("$tree/", "$vol/")``.
- rsync: that tree from the volume on one server to a volume on another.
- dd: a 1 GiB volume (ext4 holding a file of random data) onto another server's
  volume. asyncstage ``dd(verify=False)``; Perl ``$manager->dd($v1 => $v2)``
  (``dd | gzip -1 | ssh ... gunzip | dd``). The source's page cache is dropped first.

A step the Perl module cannot do on the local cloud is reported as "not run: <what
VM::EC2 said>" (its target then counts as not met), and the run goes on.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from _baselines import (
    Alternate,
    BaselineReport,
    NotRun,
    PerlDriver,
    make_tree,
    perl_driver,
    perl_module_missing,
)
from _common import MiB, local_cloud, parse_args

from asyncstage import Manager, Server, Volume
from asyncstage.localcloud import Realism

# VM::EC2::Staging creates its security group and reads it back at once (``$sg->update or
# die``): on EC2 that read usually finds it, and so it does on the realistic local cloud,
# which hides a tenth of new ids for a moment; a run meeting one would die. So that the
# figures compare the same work, both sides run on the realistic profile without that
# window (asyncstage copes with it either way: tests/test_realism_consistency.py).
PERL_REALISM = dataclasses.replace(Realism(), consistency=(0.0, 0.0))

ZONE = "us-east-1a"


def _perl_versions() -> dict[str, str]:
    code = 'use VM::EC2; print "$^V $VM::EC2::VERSION"'
    try:
        out = subprocess.run(["perl", "-e", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    parts = out.stdout.split()
    return {"perl": parts[0], "vm_ec2": parts[1]} if len(parts) == 2 else {}


def _clear(mtpt: str) -> str:
    """A shell command that empties a mounted volume (keeping lost+found)."""
    return f"find {mtpt} -mindepth 1 -maxdepth 1 ! -name lost+found -exec rm -rf {{}} +"


def _drop(device: str) -> str:
    """A shell command that drops a device's page cache: the next read comes from its disk."""
    return f"dd if={device} iflag=nocache count=0 status=none"


class Perl:
    """The Perl side: its driver, or the reason it cannot run at all."""

    def __init__(
        self,
        driver: PerlDriver | None,
        missing: str | None,
        step_timeout: float,
        per_server: float,
        api_calls: Callable[[], Counter[str]],
    ) -> None:
        self.api_calls = api_calls  # the cloud's count of each Action, to say what VM::EC2 did
        self.driver = driver
        self.missing = missing
        self.timeout = step_timeout
        self.per_server = per_server  # get_server's deadline for each server
        self.volumes: dict[str, dict[str, Any]] = {}
        # Once get_server failed (or hung: it retries CreateTags until it gets "true"),
        # the steps that need a server are not tried again: the reason stands for them.
        self.no_servers: str | None = None

    async def ask(self, op: str, timeout: float | None = None, **request: Any) -> dict[str, Any]:
        if self.driver is None:
            raise NotRun(self.missing or "no Perl driver")
        if self.no_servers is not None and op != "terminate":
            raise NotRun(self.no_servers)
        before = self.api_calls()
        try:
            return await self.driver.ask(timeout or self.timeout, op, **request)
        except NotRun as e:
            made = (self.api_calls() - before).most_common(4)
            calls = ", ".join(f"{action} {n}" for action, n in made)
            reason = f"{e}; its EC2 calls meanwhile: {calls or 'none'}"
            if op == "fleet":
                self.no_servers = f"get_server: {reason}"
                raise NotRun(self.no_servers) from None
            raise NotRun(reason) from None

    async def servers(self, names: list[str]) -> float:
        """get_server for each name, in turn: the seconds it took."""
        return await self.timed("fleet", self.per_server * len(names), names=names)

    async def timed(self, op: str, timeout: float | None = None, **request: Any) -> float:
        seconds: float = (await self.ask(op, timeout, **request))["seconds"]
        return seconds


async def _fleet(m: Manager, perl: Perl, n: int, reps: int) -> dict[str, Any]:
    runs = iter(range(1000))

    async def a() -> float:
        names = [f"as-{n}-{next(runs)}-{i}" for i in range(n)]
        t = anyio.current_time()
        servers = await m.provision_servers(names)
        wall = anyio.current_time() - t
        answered = sum([await s.ping() for s in servers])
        await m.terminate_servers(servers)
        if answered != n:
            raise RuntimeError(f"only {answered} of {n} servers answered ssh")
        return wall

    async def b() -> float:
        names = [f"perl-{n}-{next(runs)}-{i}" for i in range(n)]
        try:
            return await perl.servers(names)
        finally:
            if perl.driver is not None and perl.driver.proc is not None:
                await perl.ask("terminate", names=names)

    alt = await Alternate().run(reps, a, b)
    return alt.figures("perl") | {"n": n}


# Quick mode leaves out the Perl module's dd: it gzips every block of its 1 GiB volume
# (~14 s, the longest step of the benchmark smoke test in the suite).
QUICK_NO_PERL_DD = "quick mode: the Perl module's dd gzips all of its 1 GiB volume (~14 s)"


async def _setup_perl(perl: Perl, data_bytes: int, dd: bool = True) -> str | None:
    """Perl's two work servers and its volumes (the dd pair with ``dd``); the reason
    when it cannot make them."""
    try:
        await perl.servers(["perl-w1", "perl-w2"])
    except NotRun as e:
        return str(e)
    try:
        for name, server, fstype in (
            ("pput", "perl-w1", "ext4"),
            ("pcopy", "perl-w2", "ext4"),
            ("pddsrc", "perl-w1", "ext4"),
            ("pdddst", "perl-w2", "raw"),
        )[: 4 if dd else 2]:
            perl.volumes[name] = await perl.ask(
                "volume", server=server, name=name, size=1, fstype=fstype
            )
        if not dd:
            return None
        src = perl.volumes["pddsrc"]
        fill = f"head -c {data_bytes} /dev/urandom > {src['mtpt']}/data && sync"
        await perl.ask("ssh", server="perl-w1", command=f"sudo sh -c '{fill}'")
        await perl.ask("unmount", volume="pddsrc")
    except NotRun as e:
        return f"provision_volume: {e}"
    return None


async def _setup_ours(m: Manager, data_bytes: int) -> tuple[list[Server], dict[str, Volume]]:
    w1, w2 = await m.provision_servers(["as-w1", "as-w2"])
    vols = {
        "put": await w1.provision_volume("as-put", size=1),
        "copy": await w2.provision_volume("as-copy", size=1),
        "ddsrc": await w1.provision_volume("as-ddsrc", size=1),
        "dddst": await w2.provision_volume("as-dddst", size=1, fstype="raw"),
    }
    src = vols["ddsrc"]
    await w1.scmd(
        "sh", "-c", f"head -c {data_bytes} /dev/urandom > {src.mtpt}/data && sync", sudo=True
    )
    await src.unmount()
    return [w1, w2], vols


async def _transfers(
    m: Manager,
    perl: Perl,
    servers: list[Server],
    vols: dict[str, Volume],
    tree: Path,
    reps: int,
    perl_setup_failed: str | None,
    perl_dd: bool = True,
) -> dict[str, Any]:
    w1, w2 = servers
    res: dict[str, Any] = {}

    async def perl_ssh(server: str, command: str) -> None:
        await perl.ask("ssh", server=server, command=command)

    def perl_step(op: str, **request: Any) -> Any:
        async def b() -> float:
            if perl_setup_failed is not None:
                raise NotRun(perl_setup_failed)
            return await perl.timed(op, **request)

        return b

    # put: the local tree onto the root of a volume (emptied before every run)
    async def put_a() -> None:
        await m.rsync(f"{tree}/", f"{vols['put']}/")

    def emptied(server: Server, ours: str, perl_server: str, theirs: str) -> Any:
        """Empty both sides' destination volumes (before every run)."""

        async def before(side: str) -> None:
            if side == "a":
                await server.scmd("sh", "-c", _clear(str(vols[ours].mtpt)), sudo=True)
            elif perl_setup_failed is None:
                await perl_ssh(perl_server, "sudo " + _clear(perl.volumes[theirs]["mtpt"]))

        return before

    put_before = emptied(w1, "put", "perl-w1", "pput")

    print("put")
    alt = await Alternate().run(
        reps, put_a, perl_step("put", source=f"{tree}/", volume="pput"), put_before
    )
    res["put"] = alt.figures("perl")

    # rsync: that volume's tree to a volume on the other server
    async def rsync_a() -> None:
        await m.rsync(f"{vols['put']}/", f"{vols['copy']}/")

    rsync_before = emptied(w2, "copy", "perl-w2", "pcopy")

    print("rsync server to server")
    alt = await Alternate().run(
        reps, rsync_a, perl_step("rsync", **{"from": "pput", "to": "pcopy"}), rsync_before
    )
    res["rsync"] = alt.figures("perl")

    # dd: the mostly empty 1 GiB volume onto the other server's volume
    async def dd_a() -> None:
        await m.dd(vols["ddsrc"], vols["dddst"], verify=False, unmount=True)

    async def dd_before(side: str) -> None:
        if side == "a":
            await w1.scmd("sh", "-c", _drop(str(vols["ddsrc"].mtdev)), sudo=True)
        elif perl_setup_failed is None and perl_dd:
            await perl_ssh("perl-w1", "sudo " + _drop(perl.volumes["pddsrc"]["mtdev"]))

    print("dd")
    perl_dd_step = perl_step("dd", **{"from": "pddsrc", "to": "pdddst"})

    async def perl_dd_or_not() -> float:
        if not perl_dd:
            raise NotRun(QUICK_NO_PERL_DD)
        return float(await perl_dd_step())

    alt = await Alternate().run(reps, dd_a, perl_dd_or_not, dd_before)
    res["dd"] = alt.figures("perl")
    return res


async def main() -> None:
    args = parse_args(__doc__ or "")
    quick = args.quick
    sizes = [1] if quick else [1, 10]
    fleet_reps = {1: 1} if quick else {1: 2, 10: 1}
    n_commands = 10 if quick else 100
    tree_bytes = (4 if quick else 100) * MiB
    tree_files = 16 if quick else 400
    dd_data = (8 if quick else 256) * MiB
    reps = 1 if quick else 2
    boot_delay = 0.3 if quick else 5.0
    # get_server's deadline per server: it polls every 3 s and sleeps 5 s after a failed
    # ssh, so a server takes boot_delay + up to ~10 s; a hang is cut off after this.
    per_server = 30.0 if quick else 60.0
    report = BaselineReport("perl", quick, args.results)
    missing = perl_module_missing()
    report.params = {
        "fleet_sizes": sizes,
        "fleet_repeats": fleet_reps,
        "commands": n_commands,
        "tree_bytes": tree_bytes,
        "tree_files": tree_files,
        "dd_volume_gib": 1,
        "dd_data_bytes": dd_data,
        "repeats": reps,
        "boot_delay_s": boot_delay,
        "poll_interval_s": 0.5,
        "perl_get_server_deadline_s": per_server,
        "realism": "aws, without the consistency window (see PERL_REALISM)",
        **_perl_versions(),
    }
    work = Path(tempfile.mkdtemp(prefix="asyncstage-bench-perl-"))
    results: dict[str, Any] = {"perl_module_missing": missing}
    try:
        tree = make_tree(work / "tree", tree_bytes, tree_files)
        async with local_cloud(boot_delay, PERL_REALISM, poll_interval=0.5) as (cloud, m):
            driver = None
            if missing is None:
                driver = perl_driver(cloud, work, ZONE)
                driver.start()
            perl = Perl(
                driver,
                missing,
                step_timeout=300.0,
                per_server=per_server,
                api_calls=lambda: Counter(cloud.api_calls),
            )
            try:
                results |= await _run(m, perl, report, sizes, fleet_reps, n_commands)
                servers, vols = await _setup_ours(m, dd_data)
                print("set-up of Perl's servers and volumes")
                perl_failed = None if missing is None else missing
                if perl_failed is None:
                    perl_failed = await _setup_perl(perl, dd_data, dd=not quick)
                    if perl_failed:
                        print(f"  Perl set-up failed: {perl_failed}")
                results |= await _transfers(
                    m, perl, servers, vols, tree, reps, perl_failed, perl_dd=not quick
                )
                report.mark_load("after_transfers")
            finally:
                if driver is not None:
                    results["perl_stderr_tail"] = await driver.stopped()
            results["api_calls"] = dict(sorted(cloud.api_calls.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for key, size in (("put", tree_bytes), ("rsync", tree_bytes), ("dd", 1 << 30)):
        results[key]["bytes"] = size
    report.results.update(results)
    _tables(report, results, sizes)
    _targets(report, results, sizes)
    report.save()


async def _run(
    m: Manager,
    perl: Perl,
    report: BaselineReport,
    sizes: list[int],
    fleet_reps: dict[int, int],
    n: int,
) -> dict[str, Any]:
    """The fleet and command steps."""
    res: dict[str, Any] = {"fleet": {}}
    for size in sizes:
        print(f"fleet of {size}")
        res["fleet"][str(size)] = await _fleet(m, perl, size, fleet_reps[size])
    report.mark_load("after_fleet")
    print(f"{n} commands on one server")
    (server,) = await m.provision_servers(["as-cmd"])
    perl_ready: str | None = None
    try:
        await perl.servers(["perl-cmd"])
    except NotRun as e:
        perl_ready = str(e)

    async def a() -> None:
        for _ in range(n):
            out = await server.scmd("echo", "ok")
            if out != "ok\n":
                raise RuntimeError(f"scmd gave {out!r}")

    async def b() -> float:
        if perl_ready is not None:
            raise NotRun(perl_ready)
        return await perl.timed("commands", server="perl-cmd", n=n)

    alt = await Alternate().run(2 if n >= 100 else 1, a, b)
    res["commands"] = alt.figures("perl") | {"n": n}
    await m.terminate_servers([server])
    if perl_ready is None:
        await perl.ask("terminate", names=["perl-cmd"])
    report.mark_load("after_commands")
    return res


def _cell(figures: dict[str, Any], key: str) -> Any:
    value = figures.get(key)
    if value is None:
        return "not run"
    return value


def _tables(report: BaselineReport, res: dict[str, Any], sizes: list[int]) -> None:
    rows: list[list[Any]] = []
    for n in sizes:
        f = res["fleet"][str(n)]
        rows.append([f"fleet of {n} up (ssh answers)", f["asyncstage_s"], _cell(f, "perl_s")])
        rows[-1].append(_cell(f, "ratio"))
    c = res["commands"]
    rows.append([f"{c['n']} commands, one server", c["asyncstage_s"], _cell(c, "perl_s")])
    rows[-1].append(_cell(c, "ratio"))
    for key, label in (
        ("put", "put tree onto a volume"),
        ("rsync", "rsync volume → volume, 2 servers"),
        ("dd", "dd 1 GiB volume (mostly empty)"),
    ):
        f = res[key]
        rows.append([label, _cell(f, "asyncstage_s"), _cell(f, "perl_s"), _cell(f, "ratio")])
    report.table(
        "asyncstage vs Perl VM::EC2::Staging on the same local cloud (medians, seconds; "
        "ratio = Perl / asyncstage)",
        ["job", "asyncstage s", "Perl s", "ratio"],
        rows,
    )
    reasons = {
        key: f["not_run"]
        for key, f in [*((f"fleet {n}", res["fleet"][str(n)]) for n in sizes)]
        + [(k, res[k]) for k in ("commands", "put", "rsync", "dd")]
        if f.get("not_run")
    }
    for key, reason in reasons.items():
        report.note(f"Perl {key}: not run: {reason}")


def _targets(report: BaselineReport, res: dict[str, Any], sizes: list[int]) -> None:
    largest = sizes[-1]
    report.target_of(
        f"fleet_{largest}_vs_perl",
        res["fleet"][str(largest)],
        5,
        f"Perl get_server × {largest} time / asyncstage provision_servers({largest}) time",
    )
    report.target_of(
        "commands_vs_perl",
        res["commands"],
        50,
        f"Perl scmd × {res['commands']['n']} time / asyncstage scmd × {res['commands']['n']}",
    )
    report.target_of("put_vs_perl", res["put"], 1, "Perl rsync put time / asyncstage's")
    report.target_of(
        "rsync_vs_perl", res["rsync"], 1, "Perl rsync volume→volume time / asyncstage's"
    )
    report.target_of(
        "dd_sparse_vs_perl", res["dd"], 5, "Perl dd time / asyncstage dd time, mostly empty volume"
    )


if __name__ == "__main__":
    anyio.run(main)
