"""``asyncstage demo``: a fleet backup on the embedded local cloud, start to finish.

1. start a local cloud in this process (real hosts with sshd, real loop-device volumes);
2. launch a fleet of N servers and a backup server ("vault") with one RunInstances call;
3. give each server a data volume and fill it with generated files of varied sizes
   (and record their sha256 sums);
4. back every server up at once: a volume on the vault (from the newest snapshot of that
   server's backup name, when there is one), a direct server-to-server rsync, a snapshot,
   the volume deleted — with live progress;
5. change a few files everywhere and back up again (incremental: only the changes move);
6. restore one backup onto a new volume and verify it file by file against the source;
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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

import anyio

from asyncstage import backup
from asyncstage.errors import AsyncstageError
from asyncstage.localcloud import LocalCloud
from asyncstage.manager import Manager
from asyncstage.output import human_bytes, table
from asyncstage.server import Server
from asyncstage.transfer import Progress
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

_SUMS = "find . -path ./lost+found -prune -o -type f -print0 | sort -z | xargs -0 -r sha256sum"


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
    """Live progress: one line per server, redrawn in place on a terminal; on anything
    else a line per phase change."""

    def __init__(self, names: list[str], stream: TextIO, *, live: bool, quiet: bool) -> None:
        self.rows = {n: _Row(n) for n in names}
        self.stream = stream
        self.live = live
        self.quiet = quiet
        self._drawn = 0

    def set(self, name: str, phase: str, detail: str = "") -> None:
        row = self.rows[name]
        changed = row.phase != phase
        row.phase, row.detail = phase, detail
        if changed and not self.live and not self.quiet:
            print(f"  {name:<10} {phase} {detail}".rstrip(), file=self.stream, flush=True)

    def progress(self, name: str, phase: str) -> Callable[[Progress], None]:
        def update(p: Progress) -> None:
            bar = ""
            if p.total:
                part = min(1.0, p.bytes_done / p.total)
                filled = round(part * 20)
                bar = f"[{'#' * filled}{'.' * (20 - filled)}] {100 * part:5.1f}%  "
            self.set(name, phase, f"{bar}{human_bytes(p.bytes_done)}  {human_bytes(p.rate)}/s")

        return update

    def draw(self) -> None:
        if not self.live or self.quiet:
            return
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F")
        for row in self.rows.values():
            line = f"  {row.name:<10} {row.phase:<12} {row.detail}"
            out.append("\x1b[2K" + line[:110] + "\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(self.rows)

    def stop(self) -> None:
        self.draw()
        self._drawn = 0

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Redraw five times a second while the block runs."""
        async with anyio.create_task_group() as tg:

            async def redraw() -> None:
                while True:
                    self.draw()
                    await anyio.sleep(0.2)

            tg.start_soon(redraw)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
        self.stop()


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


async def _sums(volume: Volume) -> dict[str, str]:
    """sha256 of every file on a volume, by path relative to its root."""
    out = await volume.cmd(_SUMS)
    sums = {}
    for line in out.splitlines():
        digest, _, path = line.partition("  ")
        sums[path] = digest
    return sums


async def _backup(
    m: Manager,
    vault: Server,
    source: Volume,
    name: str,
    progress: Callable[[Progress], None],
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
    async with steps.step(f"launch {len(names)} servers and a vault (one RunInstances call)"):
        fleet = await m.provision_servers([*names, "vault"])
        servers, vault = fleet[:-1], fleet[-1]
        for s in fleet:
            say(f"  {s.name:<6} {s.instance_id}  {s.address}  ssh host key pinned")

    volumes: dict[str, Volume] = {}
    sums: dict[str, dict[str, str]] = {}
    async with steps.step("a data volume per server, filled with generated files") as moved:

        async def fill(i: int, server: Server) -> None:
            board.set(server.name, "volume")
            volume = await server.provision_volume(f"data-{server.name}", size=1)
            volumes[server.name] = volume
            board.set(server.name, "generating")
            assert volume.mtpt
            out = await server.scmd(
                "python3",
                "-c",
                _GENERATE,
                str(config.seed * 1000 + i),
                volume.mtpt,
                str(config.files),
                str(config.smallest),
                str(config.largest),
                sudo=True,
            )
            row = board.rows[server.name]
            row.data_bytes = int(out.strip())
            sums[server.name] = await _sums(volume)
            row.files = len(sums[server.name])
            moved["bytes"] += row.data_bytes
            board.set(server.name, "ready", f"{row.files} files, {human_bytes(row.data_bytes)}")

        async with board.running(), anyio.create_task_group() as tg:
            for i, server in enumerate(servers):
                tg.start_soon(fill, i, server)

    async def backup_all(round_no: int) -> None:
        async def one(server: Server) -> None:
            name = f"backup-{server.name}"
            figures = await _backup(
                m,
                vault,
                volumes[server.name],
                name,
                board.progress(server.name, "rsync"),
                lambda phase: board.set(server.name, phase),
            )
            figures["round"] = round_no
            board.rows[server.name].backups.append(figures)
            board.set(
                server.name,
                "backed up",
                f"{figures['snapshot_id']}  {human_bytes(figures['bytes'])} of files in "
                f"{figures['rsync_s']:.1f}s, {human_bytes(figures['wire_bytes'])} on the wire",
            )

        async with board.running(), anyio.create_task_group() as tg:
            for server in servers:
                tg.start_soon(one, server)

    async with steps.step(
        f"back up all {len(servers)} servers at once (server → vault rsync, then a snapshot)"
    ) as moved:
        await backup_all(1)
        moved["bytes"] = sum(r.backups[-1]["bytes"] for r in board.rows.values())

    if config.rounds > 1:
        async with steps.step("change ~10% of the files, back up again (incremental)") as moved:

            async def change(i: int, server: Server) -> None:
                volume = volumes[server.name]
                assert volume.mtpt
                await server.scmd(
                    "python3", "-c", _CHANGE, str(config.seed * 7 + i), volume.mtpt, sudo=True
                )
                sums[server.name] = await _sums(volume)
                board.rows[server.name].files = len(sums[server.name])

            async with anyio.create_task_group() as tg:
                for i, server in enumerate(servers):
                    tg.start_soon(change, i, server)
            await backup_all(2)
            moved["bytes"] = sum(r.backups[-1]["bytes"] for r in board.rows.values())

    first = servers[0].name
    snapshot_id = board.rows[first].backups[-1]["snapshot_id"]
    async with steps.step(f"restore {snapshot_id} ({first}) onto a new volume, verify") as moved:
        async with backup.snapshot_volume(
            m, f"backup-{first}", snapshot_id=snapshot_id, server=vault, volume_name="restore-check"
        ) as restored:
            got = await _sums(restored)
        want = sums[first]
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        differ = sorted(p for p in set(want) & set(got) if want[p] != got[p])
        moved["bytes"] = board.rows[first].data_bytes
        ok = not (missing or extra or differ)
        result["verify"] = {
            "server": first,
            "snapshot_id": snapshot_id,
            "files": len(want),
            "missing": missing,
            "extra": extra,
            "different": differ,
            "ok": ok,
        }
        if ok:
            say(f"  {len(want)} files, every sha256 equal to the source's: OK")
        else:
            say(
                f"  VERIFICATION FAILED: {len(missing)} missing, {len(extra)} unexpected, "
                f"{len(differ)} different (e.g. {(missing + extra + differ)[:3]})"
            )
    result["ok"] = ok
    result["fleet"] = [
        {
            "server": r.name,
            "files": r.files,
            "data_bytes": r.data_bytes,
            "backups": r.backups,
        }
        for r in board.rows.values()
    ]


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
        f"restored from {verify.get('snapshot_id')})   total {result['elapsed']:.1f}s",
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
