"""Streaming: scmd_read/scmd_write and the file forms vs OpenSSH ``ssh``, same cipher.

Read: the remote ``head -c SIZE /dev/zero``. Write: the remote ``cat > /dev/null``.
Every method moves the same SIZE bytes, in one run; each round runs every method once,
in turn, so that the machine's load hits them alike. A target is the median of the
rounds' ratios (ours / the baseline's, within one round), with the lowest and highest
round beside it:

- data that Python code consumes or produces: ``scmd_read(..., encoding=None)`` read
  in 1 MiB pieces and ``scmd_write`` fed 1 MiB pieces, against this process reading
  from / writing to an OpenSSH ``ssh`` child through a pipe (target >= 1.0x);
- data between a local file and a remote command: ``scmd_to_file`` /
  ``scmd_from_file`` against ``ssh host cmd > file`` / ``ssh host cmd < file``
  (target >= 0.9x); the local files are on tmpfs (/dev/shm), so that the disk is
  not what is measured;
- references: OpenSSH to /dev/null and from a ``head`` pipe (the issue's first
  baseline), and raw asyncssh (no asyncstage code, so none of its TCP shaping:
  asyncstage/_sshwire.py) with the same cipher.

The cipher is the same on both sides: SSHHost negotiates its preference
(``aes128-gcm`` on CPUs with AES instructions, else ``chacha20-poly1305``; read back
from the connection and recorded) and OpenSSH gets the same with ``-c``.
asyncstage streams over its warm connection; OpenSSH opens a new one, so the median
time of a bare ``ssh host true`` (connection set-up) measured in the same run is
subtracted from every OpenSSH time (pipes included). The client's CPU seconds per
GiB are recorded: this process's for asyncstage/asyncssh, the waited-for children's
(``ssh``, ``head``) for OpenSSH, both for the pipes. Peak RSS growth of this process
during each asyncstage/asyncssh run (sampled every 5 ms) shows the memory stays flat.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncssh
from _common import (
    CIPHER,
    GiB,
    MiB,
    Report,
    local_cloud,
    openssh_argv,
    parse_args,
    ratio,
    summary,
    to_thread,
)

from asyncstage import Server

AES = "aes128-gcm@openssh.com"
CHUNK = MiB
TMPFS = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


def _openssh(argv: list[str], size: int, stdin: Any = None, stdout: Any = None) -> float:
    """Run ``ssh``; with neither ``stdin`` nor ``stdout``, write: a ``head`` pipe as stdin."""
    t = time.perf_counter()
    if stdin is None and stdout is None:
        head = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        assert head.stdout is not None
        try:
            subprocess.run(argv, stdin=head.stdout, stdout=subprocess.DEVNULL, check=True)
        finally:
            head.stdout.close()
            head.wait()
    else:
        subprocess.run(
            argv,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.DEVNULL,
            check=True,
        )
    return time.perf_counter() - t


def _openssh_to_file(argv: list[str], size: int, path: Path) -> float:
    try:
        with path.open("wb") as f:
            return _openssh(argv, size, stdout=f)
    finally:
        assert path.stat().st_size == size
        path.unlink()


def _openssh_from_file(argv: list[str], size: int, path: Path) -> float:
    with path.open("rb") as f:
        return _openssh(argv, size, stdin=f)


def _live_children_cpu() -> float:
    """CPU seconds of this process's children still running (the file forms' OpenSSH
    master): counted in RUSAGE_CHILDREN only once they are reaped."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def _cpu() -> tuple[float, float]:
    """CPU seconds of this process, and of its children (waited-for and running)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime + _live_children_cpu()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _rss_peak() -> Iterator[list[int]]:
    """Yields ``[growth]``: this process's peak RSS growth (bytes) while inside, sampled."""
    base = _rss()
    out = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            out[0] = max(out[0], _rss() - base)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()
        out[0] = max(out[0], _rss() - base)


async def _read(server: Server, size: int) -> float:
    got = 0
    t = time.perf_counter()
    async with server.scmd_read("head", "-c", str(size), "/dev/zero", encoding=None) as f:
        while chunk := await f.read(CHUNK):
            got += len(chunk)
    elapsed = time.perf_counter() - t
    assert got == size, (got, size)
    return elapsed


async def _write(server: Server, size: int) -> float:
    data = b"\0" * CHUNK
    t = time.perf_counter()
    async with server.scmd_write("cat > /dev/null", encoding=None) as f:
        for _ in range(size // CHUNK):
            await f.write(data)
    return time.perf_counter() - t


async def _to_file(server: Server, size: int, path: Path) -> float:
    t = time.perf_counter()
    try:
        got = await server.scmd_to_file("head", "-c", str(size), "/dev/zero", path=path)
        elapsed = time.perf_counter() - t
        assert got == size == os.stat(path).st_size, (got, size)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return elapsed


async def _from_file(server: Server, size: int, path: Path) -> float:
    t = time.perf_counter()
    sent = await server.scmd_from_file("cat > /dev/null", path=path)
    elapsed = time.perf_counter() - t
    assert sent == size, (sent, size)
    return elapsed


async def _pipe_read(argv: list[str], size: int) -> float:
    """This process reads OpenSSH's stdout through a pipe (an OpenSSH-backed scmd_read)."""
    got = 0
    t = time.perf_counter()
    async with await anyio.open_process(argv, stdin=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                got += len(await proc.stdout.receive(CHUNK))
    assert got == size, (got, size)
    return time.perf_counter() - t


async def _pipe_write(argv: list[str], size: int) -> float:
    """This process writes into OpenSSH's stdin through a pipe (an OpenSSH-backed scmd_write)."""
    data = b"\0" * CHUNK
    t = time.perf_counter()
    async with await anyio.open_process(argv, stdout=subprocess.DEVNULL) as proc:
        assert proc.stdin is not None
        for _ in range(size // CHUNK):
            await proc.stdin.send(data)
        await proc.stdin.aclose()
        await proc.wait()
    return time.perf_counter() - t


async def _raw_read(conn: asyncssh.SSHClientConnection, size: int) -> float:
    got = 0
    t = time.perf_counter()
    async with conn.create_process(f"head -c {size} /dev/zero", encoding=None) as proc:
        while chunk := await proc.stdout.read(CHUNK):
            got += len(chunk)
        await proc.wait()
    assert got == size
    return time.perf_counter() - t


async def _raw_write(conn: asyncssh.SSHClientConnection, size: int) -> float:
    data = b"\0" * CHUNK
    t = time.perf_counter()
    async with conn.create_process("cat > /dev/null", encoding=None) as proc:
        for _ in range(size // CHUNK):
            proc.stdin.write(data)
            await proc.stdin.drain()
        proc.stdin.write_eof()
        await proc.wait()
    return time.perf_counter() - t


# (direction, what, the baseline it is compared with, target ratio)
TARGETS = [
    ("read", "asyncstage", "python <- openssh pipe", 1.0),
    ("write", "asyncstage", "python -> openssh pipe", 1.0),
    ("read", "asyncstage to file", "openssh to file", 0.9),
    ("write", "asyncstage from file", "openssh from file", 0.9),
]
RSS_LIMIT_MIB = 64.0


async def _measure(
    runs: dict[str, Callable[[], Awaitable[float]]], repeats: int, size: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int]]:
    """Seconds and client CPU s/GiB of each run, repeated in turn; peak RSS growth."""
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    rss: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            c0 = _cpu()
            with _rss_peak() as peak:
                times.setdefault(name, []).append(await fn())
            c1 = _cpu()
            if "openssh" in name and "pipe" not in name:
                spent = c1[1] - c0[1]
            else:  # this process and its children (the file forms' and the pipes' ssh)
                spent = c1[0] - c0[0] + c1[1] - c0[1]
                if "pipe" not in name:
                    rss[name] = max(rss.get(name, 0), peak[0])
            cpu.setdefault(name, []).append(spent / (size / GiB))
    return times, cpu, rss


async def _raw_connections(server: Server, algs: list[str]) -> dict[str, Any]:
    host = server.host
    known = asyncssh.import_public_key(await host.host_public_key())
    return {
        alg: await asyncssh.connect(
            host.address,
            username=server.username,
            client_keys=[str(server.keyfile)],
            known_hosts=([known], [], []),
            config=[],
            agent_path=None,
            encryption_algs=[alg],
        )
        for alg in algs
    }


async def main() -> None:
    args = parse_args(__doc__ or "")
    # For a shorter run while working on it: ASYNCSTAGE_BENCH_STREAM="MIB,REPEATS[,name-regex]"
    # (the committed figures come from the default: 1 GiB, best of 5, every method).
    size = 4 * MiB if args.quick else GiB
    repeats = 1 if args.quick else 7
    only = ""
    if tune := os.environ.get("ASYNCSTAGE_BENCH_STREAM"):
        mib, repeats_text, *rest = tune.split(",", 2)
        size, repeats, only = int(mib) * MiB, int(repeats_text), (rest or [""])[0]
    report = Report("streaming", args.quick, args.results)
    source = TMPFS / f"asyncstage-bench-stream-{os.getpid()}.in"
    sink = TMPFS / f"asyncstage-bench-stream-{os.getpid()}.out"
    async with local_cloud(0.0) as (_cloud, m):
        server = await m.provision_server()
        await server.scmd("true")
        host = server.host
        link = host._conn.open_link()  # the negotiated cipher, read back for the record
        negotiated = link.conn.get_extra_info("send_cipher") if link else "?"
        same = negotiated if negotiated in (CIPHER, AES) else CIPHER
        report.params = {
            "size_bytes": size,
            "chunk_bytes": CHUNK,
            "repeats": repeats,
            "cipher_openssh": same,
            "cipher_asyncstage_negotiated": negotiated,
            "local_files_on": str(TMPFS),
        }
        if negotiated != same:
            report.note(f"asyncstage negotiated {negotiated}, not {same}: ciphers differ")
        raw = await _raw_connections(server, [same])
        read_cmd = f"head -c {size} /dev/zero"
        write_cmd = "cat > /dev/null"
        ssh = ("-c", same)
        setup: list[float] = []
        try:
            with source.open("wb") as f:
                f.truncate(0)
                for _ in range(size // CHUNK):
                    f.write(b"\0" * CHUNK)  # written, not sparse: real pages to read
            for _ in range(3):
                setup.append(
                    await to_thread(
                        _openssh, openssh_argv(host, "true", extra=ssh), 0, subprocess.DEVNULL
                    )
                )
            await _read(server, min(size, 16 * MiB))  # warm
            # The file forms' OpenSSH master belongs to the warm connection too (started
            # by the first file form on a host, 0.2 s).
            await _to_file(server, min(size, 16 * MiB), sink)
            runs: dict[str, Callable[[], Awaitable[float]]] = {
                "read asyncstage": lambda: _read(server, size),
                "read python <- openssh pipe": lambda: _pipe_read(
                    openssh_argv(host, read_cmd, extra=ssh), size
                ),
                "read asyncstage to file": lambda: _to_file(server, size, sink),
                "read openssh to file": lambda: to_thread(
                    _openssh_to_file, openssh_argv(host, read_cmd, extra=ssh), size, sink
                ),
                "read openssh": lambda: to_thread(
                    _openssh, openssh_argv(host, read_cmd, extra=ssh), size, subprocess.DEVNULL
                ),
                "read raw asyncssh": lambda: _raw_read(raw[same], size),
                "write asyncstage": lambda: _write(server, size),
                "write python -> openssh pipe": lambda: _pipe_write(
                    openssh_argv(host, write_cmd, extra=ssh), size
                ),
                "write asyncstage from file": lambda: _from_file(server, size, source),
                "write openssh from file": lambda: to_thread(
                    _openssh_from_file, openssh_argv(host, write_cmd, extra=ssh), size, source
                ),
                "write openssh": lambda: to_thread(
                    _openssh, openssh_argv(host, write_cmd, extra=ssh), size
                ),
                "write raw asyncssh": lambda: _raw_write(raw[same], size),
            }
            runs = {k: v for k, v in runs.items() if re.search(only, k)}
            times, cpu, rss = await _measure(runs, repeats, size)
        finally:
            for conn in raw.values():
                conn.close()
            source.unlink(missing_ok=True)
            sink.unlink(missing_ok=True)
        report.mark_load("after_runs")
    if only:  # a partial run: print it, keep the results file as it is
        cut = summary(setup)["median"]
        for name, samples in times.items():
            spent = min(samples) - (cut if "openssh" in name else 0.0)
            print(f"{name:32} {size / spent / 1e6:8.1f} MB/s  cpu {min(cpu[name]):.2f} s/GiB")
        print(f"openssh connection set-up {cut * 1000:.0f} ms (subtracted)")
        return
    _report(report, args.quick, size, repeats, same, summary(setup)["median"], times, cpu, rss)
    report.save()


def _report(
    report: Report,
    quick: bool,
    size: int,
    repeats: int,
    cipher: str,
    conn_setup: float,
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
    rss: dict[str, int],
) -> None:
    # Subtract OpenSSH's connection set-up, except with --quick's small sizes (where it
    # is most of the time, and the figures mean little anyway).
    subtract = not quick
    # Throughput of the median run of each, with the best run's next to it.
    mbps: dict[str, float] = {}
    mbps_best: dict[str, float] = {}
    rounds: dict[str, list[float]] = {}  # MB/s of each round
    for name, samples in times.items():
        cut = conn_setup if "openssh" in name and subtract else 0.0
        rounds[name] = [size / max(x - cut, 1e-6) / 1e6 for x in samples]
        mbps_best[name] = round(size / max(min(samples) - cut, 1e-6) / 1e6, 1)
        mbps[name] = round(size / max(summary(samples)["median"] - cut, 1e-6) / 1e6, 1)
    cpu_per_gib = {k: round(summary(v)["median"], 2) for k, v in cpu.items()}
    rss_mib = {k: round(v / MiB, 1) for k, v in rss.items()}
    rows = []
    for direction, _what, _base, _limit in TARGETS[:2]:
        base = mbps[f"{direction} openssh"]
        for name, value in mbps.items():
            if name.startswith(direction):
                rows.append(
                    [
                        name,
                        value,
                        ratio(value, base),
                        mbps_best[name],
                        cpu_per_gib[name],
                        rss_mib.get(name, "-"),
                    ]
                )
    report.table(
        f"Streaming {size // MiB} MiB (median of {repeats} rounds; OpenSSH "
        + (f"minus {conn_setup * 1000:.0f} ms connection set-up)" if subtract else "as is)"),
        [
            "method",
            "MB/s",
            f"× OpenSSH {cipher.split('@')[0]}",
            "best MB/s",
            "client CPU s/GiB",
            "peak RSS +MiB",
        ],
        rows,
    )
    report.results.update(
        {
            "mb_per_s": mbps,
            "mb_per_s_median": mbps,
            "mb_per_s_best": mbps_best,
            "client_cpu_s_per_gib": cpu_per_gib,
            "peak_rss_growth_mib": rss_mib,
            "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "openssh_connection_setup_s": round(conn_setup, 4),
            "openssh_setup_subtracted": subtract,
        }
    )
    for direction, what, base, limit in TARGETS:
        ours, theirs = f"{direction} {what}", f"{direction} {base}"
        api = {
            "asyncstage": f"scmd_{direction}",
            "asyncstage to file": "scmd_to_file",
            "asyncstage from file": "scmd_from_file",
        }[what]
        paired = [ratio(a, b) for a, b in zip(rounds[ours], rounds[theirs], strict=True)]
        report.target(
            f"{api}_vs_{base.replace(' ', '_').replace('<-', 'from').replace('->', 'to')}",
            round(statistics.median(paired), 3),
            ">=",
            limit,
            f"{api} MB/s / {base} MB/s, same cipher, same run (median of {len(paired)} rounds)",
            spread=[min(paired), max(paired)] if len(paired) > 1 else None,
        )
    report.target(
        "streaming_peak_rss_growth",
        max(rss_mib.values()),
        "<=",
        RSS_LIMIT_MIB,
        f"peak RSS growth of this process while moving {size // MiB} MiB (any asyncstage form)",
        unit=" MiB",
    )


if __name__ == "__main__":
    anyio.run(main)
