"""``asyncstage demo``: a fleet backup on the embedded local cloud, start to finish.

1. start a local cloud in this process (real hosts with sshd, real loop-device volumes);
2. launch a fleet of N servers and a backup server ("vault") with one RunInstances call;
3. give each server a data volume and fill it with generated files of varied sizes
   (and record how many files and bytes each has);
4. back every server up at once: a volume on the vault (from the newest snapshot of that
   server's backup name, when there is one), a direct server-to-server rsync, a snapshot,
   the volume deleted — with live progress;
5. change a few files everywhere and back up again (incremental: only the changes move);
6. check one backup as ``asyncstage backup check --read-data`` does (a scratch volume on
   the vault, every file's sha256 against the backup's manifest) and its files and bytes
   against the source's;
7. print a summary and clean everything up (servers, volumes, snapshots, the cloud).

Exits with 1 when a verification fails. ``--small`` makes a quick run; ``--servers N``
sizes the fleet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TextIO

import anyio

from asyncstage import backup
from asyncstage.errors import AsyncstageError
from asyncstage.localcloud import LocalCloud
from asyncstage.manager import Manager
from asyncstage.output import TransferDisplay, human_bytes, table
from asyncstage.server import Server
from asyncstage.transfer import Progress, ProgressCallback
from asyncstage.volume import Volume

__all__ = ["DemoConfig", "main_from_cli", "run_demo"]

_GENERATE = r"""
import os, random, sys
seed, root, count, smallest, largest = sys.argv[1:6]
rng = random.Random(int(seed))
count, smallest, largest = int(count), int(smallest), int(largest)
total = 0
for i in range(count):
    folder = os.path.join(root, f"dir{rng.randrange(6)}", f"sub{rng.randrange(3)}")
    os.makedirs(folder, exist_ok=True)
    # log-uniform sizes: many small files, a few large ones, some empty
    size = 0 if rng.random() < 0.05 else int(smallest * (largest / smallest) ** rng.random())
    with open(os.path.join(folder, f"file{i:04d}.bin"), "wb") as f:
        f.write(rng.randbytes(size))
    total += size
print(total)
"""

_CHANGE = r"""
import os, random, sys
seed, root = sys.argv[1:3]
rng = random.Random(int(seed))
files = sorted(os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns
               if not d.startswith(os.path.join(root, "lost+found")))
for path in rng.sample(files, max(1, len(files) // 10)):
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(rng.randbytes(4096))
os.unlink(files[0])
with open(os.path.join(root, "added-later.txt"), "w") as f:
    f.write("written after the first backup\n" * 100)
"""

_SIZES = "find . -path ./lost+found -prune -o -type f -printf '%s\\n'"


@dataclass
class DemoConfig:
    """How big the demo is."""

    servers: int = 4
    files: int = 100
    smallest: int = 1024
    largest: int = 12 << 20
    seed: int = 1
    rounds: int = 2

    @classmethod
    def small(cls, servers: int = 2, seed: int = 1) -> DemoConfig:
        """A quick run (tests, slow machines)."""
        return cls(servers=servers, files=12, smallest=512, largest=256 << 10, seed=seed)


@dataclass
class _Row:
    """One server's line on the board, and its figures."""

    name: str
    phase: str = "waiting"
    detail: str = ""
    files: int = 0
    data_bytes: int = 0
    backups: list[dict[str, Any]] = field(default_factory=list)


class _Board:
    """Live progress (:class:`~asyncstage.output.TransferDisplay`, as the CLI's): one row
    per server, a bar while it transfers and a spinner with its phase while it waits; off
    a terminal a line per phase change."""

    def __init__(self, names: list[str], stream: TextIO, *, live: bool, quiet: bool) -> None:
        self.rows = {n: _Row(n) for n in names}
        self.display = TransferDisplay(stream, live=live and not quiet, phases=not quiet)
        self.tasks = {n: self.display.task(f"{n:<10}") for n in names}

    def set(self, name: str, phase: str, detail: str = "") -> None:
        row = self.rows[name]
        row.phase, row.detail = phase, detail
        self.tasks[name].phase(phase, detail)

    def progress(self, name: str, phase: str) -> Callable[[Progress], None]:
        """The progress callback of ``name``'s transfer (its bar)."""
        self.set(name, phase)
        return self.tasks[name]

    @contextmanager
    def running(self) -> Iterator[None]:
        """Draw the rows while the block runs (a terminal only)."""
        with self.display:
            yield


class _Steps:
    """Timing of the demo's steps, for the summary."""

    def __init__(self, stream: TextIO, quiet: bool) -> None:
        self.stream = stream
        self.quiet = quiet
        self.done: list[tuple[str, float, int]] = []

    @asynccontextmanager
    async def step(self, title: str) -> AsyncIterator[dict[str, int]]:
        if not self.quiet:
            print(f"\n▶ {title}", file=self.stream, flush=True)
        moved = {"bytes": 0}
        started = time.monotonic()
        yield moved
        elapsed = time.monotonic() - started
        self.done.append((title, elapsed, moved["bytes"]))
        if not self.quiet:
            print(f"  done in {elapsed:.1f}s", file=self.stream, flush=True)


async def _files(volume: Volume) -> tuple[int, int]:
    """How many files a volume has, and their bytes."""
    sizes = (await volume.cmd(_SIZES)).split()
    return len(sizes), sum(int(n) for n in sizes)


async def _backup(
    m: Manager,
    vault: Server,
    source: Volume,
    name: str,
    progress: ProgressCallback,
    phase: Callable[[str], None],
) -> dict[str, Any]:
    """One incremental backup of ``source`` into the newest snapshot named ``name``."""
    done = await backup.backup(
        m,
        name,
        [source],
        server=vault,
        size=source.size,
        description=f"asyncstage demo backup {name}",
        progress=progress,
        phase=lambda p: phase("vault volume" if p == "volume" else p),
    )
    return {
        "snapshot_id": done.snapshot_id,
        "bytes": done.bytes,
        "files": done.files,
        "wire_bytes": done.wire_bytes,
        "route": done.route,
        "volume_s": done.volume_s,
        "rsync_s": done.rsync_s,
        "snapshot_s": done.snapshot_s,
        "total_s": done.elapsed,
    }


async def run_demo(
    config: DemoConfig,
    *,
    stream: TextIO | None = None,
    live: bool | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the whole demo; its figures (``ok`` false when a verification failed)."""
    stream = stream or sys.stdout
    live = stream.isatty() if live is None else live
    steps = _Steps(stream, quiet)
    names = [f"web{i + 1}" for i in range(config.servers)]
    board = _Board(names, stream, live=live, quiet=quiet)
    result: dict[str, Any] = {"servers": config.servers, "ok": False}
    say: Callable[[str], None] = (
        (lambda _: None) if quiet else (lambda text: print(text, file=stream, flush=True))
    )
    say(
        f"asyncstage demo: a fleet of {config.servers} servers backed up at once to a vault "
        "server, on the embedded local cloud"
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="asyncstage-demo-") as dotdir:
        async with steps.step("start the local cloud (moto EC2 API, real hosts and disks)"):
            cloud = LocalCloud()
            await cloud.start()
        try:
            say(f"  endpoint {cloud.endpoint_url}, image {cloud.image_id}")
            manager = cloud.manager(
                dotdir=dotdir, on_exit="terminate", scan=False, poll_interval=0.2
            )
            await manager.open()
            try:
                await _fleet(manager, config, names, board, steps, result, say)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await manager.close(raise_errors=False)
                raise
            async with steps.step("clean up: snapshots deleted, servers terminated, volumes"):
                for row in board.rows.values():
                    for backup in row.backups:
                        await manager.ec2.delete_snapshot(backup["snapshot_id"])
                await manager.close()
        finally:
            async with steps.step("stop the local cloud (hosts, loop devices, snapshots gone)"):
                await cloud.close()
    result["elapsed"] = time.monotonic() - started
    result["steps"] = [
        {"step": title, "seconds": round(s, 2), "bytes": n} for title, s, n in steps.done
    ]
    if not quiet:
        _summary(stream, result, board)
    return result


async def _fleet(
    m: Manager,
    config: DemoConfig,
    names: list[str],
    board: _Board,
    steps: _Steps,
    result: dict[str, Any],
    say: Callable[[str], None],
) -> None:
    fleet = _Fleet(m, config, board, say)
    async with steps.step(f"launch {len(names)} servers and a vault (one RunInstances call)"):
        await fleet.launch(names)
    async with steps.step("a data volume per server, filled with generated files") as moved:
        await fleet.on_each(fleet.fill)
        moved["bytes"] = sum(r.data_bytes for r in board.rows.values())
    async with steps.step(
        f"back up all {len(names)} servers at once (server → vault rsync, then a snapshot)"
    ) as moved:
        moved["bytes"] = await fleet.backup_all(1)
    if config.rounds > 1:
        async with steps.step("change ~10% of the files, back up again (incremental)") as moved:
            await fleet.on_each(fleet.change, live=False)
            moved["bytes"] = await fleet.backup_all(2)
    first = names[0]
    snapshot_id = board.rows[first].backups[-1]["snapshot_id"]
    async with steps.step(f"check {snapshot_id} ({first}) from a new volume, read all") as moved:
        result["verify"] = await fleet.verify(first, snapshot_id)
        moved["bytes"] = board.rows[first].data_bytes
    result["ok"] = result["verify"]["ok"]
    result["fleet"] = [
        {"server": r.name, "files": r.files, "data_bytes": r.data_bytes, "backups": r.backups}
        for r in board.rows.values()
    ]


class _Fleet:
    """The demo's servers, their data volumes and file counts, and the vault."""

    def __init__(
        self, m: Manager, config: DemoConfig, board: _Board, say: Callable[[str], None]
    ) -> None:
        self.m = m
        self.config = config
        self.board = board
        self.say = say
        self.servers: list[Server] = []
        self.vault: Server | None = None
        self.volumes: dict[str, Volume] = {}
        self.files: dict[str, tuple[int, int]] = {}

    async def launch(self, names: list[str]) -> None:
        fleet = await self.m.provision_servers([*names, "vault"])
        self.servers, self.vault = fleet[:-1], fleet[-1]
        for s in fleet:
            self.say(f"  {s.name:<6} {s.instance_id}  {s.address}  ssh host key pinned")

    async def on_each(
        self, func: Callable[[int, Server], Coroutine[Any, Any, None]], *, live: bool = True
    ) -> None:
        """``func(i, server)`` on every server at once (drawn live on a terminal)."""
        with self.board.running() if live else nullcontext():
            async with anyio.create_task_group() as tg:
                for i, server in enumerate(self.servers):
                    tg.start_soon(func, i, server)

    async def fill(self, i: int, server: Server) -> None:
        self.board.set(server.name, "volume")
        volume = await server.provision_volume(f"data-{server.name}", size=1)
        self.volumes[server.name] = volume
        self.board.set(server.name, "generating")
        assert volume.mtpt
        c = self.config
        out = await server.scmd(
            "python3",
            "-c",
            _GENERATE,
            str(c.seed * 1000 + i),
            volume.mtpt,
            *(str(x) for x in (c.files, c.smallest, c.largest)),
            sudo=True,
        )
        row = self.board.rows[server.name]
        row.data_bytes = int(out.strip())
        self.files[server.name] = await _files(volume)
        row.files = self.files[server.name][0]
        self.board.set(server.name, "ready", f"{row.files} files, {human_bytes(row.data_bytes)}")

    async def change(self, i: int, server: Server) -> None:
        volume = self.volumes[server.name]
        assert volume.mtpt
        seed = str(self.config.seed * 7 + i)
        await server.scmd("python3", "-c", _CHANGE, seed, volume.mtpt, sudo=True)
        self.files[server.name] = await _files(volume)
        self.board.rows[server.name].files = self.files[server.name][0]

    async def backup_all(self, round_no: int) -> int:
        """Every server backed up at once; the bytes of files sent."""

        async def one(_: int, server: Server) -> None:
            assert self.vault is not None
            name = server.name
            figures = await _backup(
                self.m,
                self.vault,
                self.volumes[name],
                f"backup-{name}",
                self.board.progress(name, "rsync"),
                lambda phase: self.board.set(name, phase),
            )
            figures["round"] = round_no
            self.board.rows[name].backups.append(figures)
            self.board.set(
                name,
                "backed up",
                f"{figures['snapshot_id']}  {human_bytes(figures['bytes'])} of files in "
                f"{figures['rsync_s']:.1f}s, {human_bytes(figures['wire_bytes'])} on the wire",
            )

        await self.on_each(one)
        return sum(int(r.backups[-1]["bytes"]) for r in self.board.rows.values())

    async def verify(self, first: str, snapshot_id: str) -> dict[str, Any]:
        """Check ``first``'s backup with the library's check (every file's content against
        the manifest), then its files and bytes against the source's."""
        assert self.vault is not None
        (found,) = await backup.check(
            self.m, f"backup-{first}", snapshot_id=snapshot_id, read_data=True, server=self.vault
        )
        files, size = self.files[first]
        same = (found.files_read, found.bytes_read) == (files, size)
        ok = found.verified and same
        if ok:
            self.say(
                f"  {files} files, every sha256 equal to the backup's manifest, "
                f"as many files and bytes as the source: OK"
            )
        else:
            self.say(
                f"  VERIFICATION FAILED: {found.summary()}; {found.files_read} files of "
                f"{found.bytes_read} bytes, the source has {files} of {size}"
            )
        return {
            "server": first,
            "snapshot_id": snapshot_id,
            "files": files,
            "check": found.as_dict(),
            "ok": ok,
        }


def _summary(stream: TextIO, result: dict[str, Any], board: _Board) -> None:
    print("\nSummary", file=stream)
    rows = []
    for entry in result.get("fleet", []):
        backups = entry["backups"]
        first = backups[0] if backups else {}
        last = backups[-1] if len(backups) > 1 else {}
        rate = first.get("bytes", 0) / first["rsync_s"] if first.get("rsync_s") else 0.0
        rows.append(
            [
                entry["server"],
                entry["files"],
                human_bytes(entry["data_bytes"]),
                human_bytes(first.get("bytes", 0)),
                f"{first.get('rsync_s', 0):.1f}s",
                f"{human_bytes(rate)}/s",
                human_bytes(last.get("wire_bytes", 0)) if last else "-",
                f"{last.get('rsync_s', 0):.1f}s" if last else "-",
                (last or first).get("snapshot_id", "-"),
            ]
        )
    headers = ["SERVER", "FILES", "DATA", "FULL", "TIME", "RATE", "INCR.SENT", "TIME", "SNAPSHOT"]
    print(table(rows, headers), file=stream)
    print("", file=stream)
    step_rows = []
    for s in result["steps"]:
        rate = f"{human_bytes(s['bytes'] / s['seconds'])}/s" if s["bytes"] and s["seconds"] else ""
        step_rows.append([s["step"], f"{s['seconds']:.1f}s", rate])
    print(table(step_rows, ["STEP", "TIME", "THROUGHPUT"]), file=stream)
    verify = result.get("verify") or {}
    status = "OK" if result["ok"] else "FAILED"
    print(
        f"\nverification: {status} ({verify.get('files', 0)} files of {verify.get('server')} "
        f"checked in {verify.get('snapshot_id')})   total {result['elapsed']:.1f}s",
        file=stream,
    )


def main_from_cli(args: argparse.Namespace, *, quiet: bool, json_output: bool) -> int:
    """``asyncstage demo``: 0 when every verification passed, 1 otherwise."""
    if os.geteuid() != 0:
        raise AsyncstageError("the demo's local cloud needs root (namespaces, mounts, loop)")
    if args.servers < 1:
        raise AsyncstageError("--servers needs at least 1")
    config = (
        DemoConfig.small(args.servers, args.seed)
        if args.small
        else DemoConfig(servers=args.servers, seed=args.seed)
    )
    result = anyio.run(
        lambda: run_demo(config, stream=sys.stderr if json_output else sys.stdout, quiet=quiet)
    )
    if json_output:
        print(json.dumps(result, indent=2, default=str))
    return 0 if result["ok"] else 1
