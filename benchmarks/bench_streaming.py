"""Streaming: scmd_read and scmd_write throughput vs OpenSSH ``ssh host cat``, same cipher.

- read: the remote ``head -c SIZE /dev/zero``; asyncstage reads it with
  ``scmd_read(..., encoding=None)`` in 1 MiB reads; OpenSSH's ``ssh`` writes it
  to /dev/null.
- write: the remote ``cat > /dev/null``; asyncstage writes 1 MiB chunks with
  ``scmd_write(..., encoding=None)``; OpenSSH reads from a local ``head -c SIZE
  /dev/zero`` pipe.

The cipher is the same on both sides: SSHHost negotiates its preference
(``aes128-gcm`` on CPUs with AES instructions, else ``chacha20-poly1305``; read back
from the connection and recorded) and OpenSSH gets the same with ``-c``.
asyncstage streams over its warm connection; OpenSSH opens a new one, so the median
time of a bare ``ssh host true`` (connection set-up) measured in the same run is
subtracted from its times. References, not targets: raw asyncssh (no asyncstage code)
with the same cipher, OpenSSH and raw asyncssh with the other of the two ciphers
(OpenSSH's own default is chacha20-poly1305), and this process streaming through a
pipe to or from an OpenSSH ``ssh`` child (what an OpenSSH-backed scmd_read/scmd_write
would do). The client's CPU seconds per GiB are recorded too: this process's CPU
time for asyncstage/asyncssh, the waited-for children's (``ssh``, ``head``) for
OpenSSH, both for the pipes.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import time
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


def _openssh(argv: list[str], size: int, write: bool) -> float:
    t = time.perf_counter()
    if write:
        head = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        assert head.stdout is not None
        try:
            subprocess.run(argv, stdin=head.stdout, stdout=subprocess.DEVNULL, check=True)
        finally:
            head.stdout.close()
            head.wait()
    else:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def _cpu() -> tuple[float, float]:
    """CPU seconds of this process, and of its waited-for children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


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


async def main() -> None:
    args = parse_args(__doc__ or "")
    size = 16 * MiB if args.quick else GiB
    repeats = 1 if args.quick else 5
    report = Report("streaming", args.quick, args.results)
    async with local_cloud(0.0) as (_cloud, m):
        server = await m.provision_server()
        await server.scmd("true")
        host = server.host
        link = host._link  # the negotiated cipher, read back for the record
        negotiated = link.conn.get_extra_info("send_cipher") if link else "?"
        same = negotiated if negotiated in (CIPHER, AES) else CIPHER
        alt = AES if same == CIPHER else CIPHER
        alt_name = alt.split("@")[0]
        report.params = {
            "size_bytes": size,
            "chunk_bytes": CHUNK,
            "repeats": repeats,
            "cipher_openssh": same,
            "cipher_asyncstage_negotiated": negotiated,
        }
        if negotiated != same:
            report.note(f"asyncstage negotiated {negotiated}, not {same}: ciphers differ")
        known = asyncssh.import_public_key(await host.host_public_key())
        raw = {
            alg: await asyncssh.connect(
                host.address,
                username=server.username,
                client_keys=[str(server.keyfile)],
                known_hosts=([known], [], []),
                config=[],
                agent_path=None,
                encryption_algs=[alg],
            )
            for alg in (same, alt)
        }
        read_cmd = f"head -c {size} /dev/zero"
        write_cmd = "cat > /dev/null"
        ssh_same = ("-c", same)
        ssh_alt = ("-c", alt)
        setup: list[float] = []
        times: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        try:
            for _ in range(3):
                setup.append(
                    await to_thread(_openssh, openssh_argv(host, "true", extra=ssh_same), 0, False)
                )
            await _read(server, min(size, 16 * MiB))  # warm
            for _ in range(repeats):
                runs: dict[str, Any] = {
                    "read asyncstage": lambda: _read(server, size),
                    "read openssh": lambda: to_thread(
                        _openssh, openssh_argv(host, read_cmd, extra=ssh_same), size, False
                    ),
                    "write asyncstage": lambda: _write(server, size),
                    "write openssh": lambda: to_thread(
                        _openssh, openssh_argv(host, write_cmd, extra=ssh_same), size, True
                    ),
                    f"read openssh {alt_name}": lambda: to_thread(
                        _openssh, openssh_argv(host, read_cmd, extra=ssh_alt), size, False
                    ),
                    f"write openssh {alt_name}": lambda: to_thread(
                        _openssh, openssh_argv(host, write_cmd, extra=ssh_alt), size, True
                    ),
                    "read raw asyncssh": lambda: _raw_read(raw[same], size),
                    "write raw asyncssh": lambda: _raw_write(raw[same], size),
                    f"read raw asyncssh {alt_name}": lambda: _raw_read(raw[alt], size),
                    f"write raw asyncssh {alt_name}": lambda: _raw_write(raw[alt], size),
                    "read python <- openssh pipe": lambda: _pipe_read(
                        openssh_argv(host, read_cmd, extra=ssh_same), size
                    ),
                    "write python -> openssh pipe": lambda: _pipe_write(
                        openssh_argv(host, write_cmd, extra=ssh_same), size
                    ),
                }
                for name, fn in runs.items():
                    c0 = _cpu()
                    times.setdefault(name, []).append(await fn())
                    c1 = _cpu()
                    if "pipe" in name:  # this process and its ssh child
                        spent = c1[0] - c0[0] + c1[1] - c0[1]
                    elif "openssh" in name:
                        spent = c1[1] - c0[1]
                    else:
                        spent = c1[0] - c0[0]
                    cpu.setdefault(name, []).append(spent / (size / GiB))
        finally:
            for conn in raw.values():
                conn.close()
        report.mark_load("after_runs")
    conn_setup = summary(setup)["median"]
    # Subtract OpenSSH's connection set-up, except with --quick's small sizes (where it
    # is most of the time, and the figures mean little anyway).
    subtract = not args.quick
    # Throughput from the best run of each (the same estimator for every method: what it
    # does when the shared machine lets it), with the median run's next to it.
    mbps: dict[str, float] = {}
    mbps_median: dict[str, float] = {}
    for name, samples in times.items():
        cut = conn_setup if "openssh" in name and subtract else 0.0
        mbps[name] = round(size / (min(samples) - cut) / 1e6, 1)
        mbps_median[name] = round(size / (summary(samples)["median"] - cut) / 1e6, 1)
    cpu_per_gib = {k: round(summary(v)["median"], 2) for k, v in cpu.items()}
    rows = []
    for direction in ("read", "write"):
        base = mbps[f"{direction} openssh"]
        base_cpu = cpu_per_gib[f"{direction} openssh"]
        for name, value in mbps.items():
            if name.startswith(direction):
                rows.append(
                    [
                        name,
                        value,
                        ratio(value, base),
                        mbps_median[name],
                        cpu_per_gib[name],
                        ratio(cpu_per_gib[name], base_cpu),
                    ]
                )
    report.table(
        f"Streaming {size // MiB} MiB (best of {repeats}; OpenSSH "
        + (f"minus {conn_setup * 1000:.0f} ms connection set-up)" if subtract else "as is)"),
        [
            "method",
            "MB/s",
            f"× OpenSSH {same.split('@')[0]}",
            "median MB/s",
            "client CPU s/GiB",
            "CPU × OpenSSH",
        ],
        rows,
    )
    report.results.update(
        {
            "mb_per_s": mbps,
            "mb_per_s_median": mbps_median,
            "client_cpu_s_per_gib": cpu_per_gib,
            "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "openssh_connection_setup_s": round(conn_setup, 4),
            "openssh_setup_subtracted": subtract,
        }
    )
    for direction in ("read", "write"):
        report.target(
            f"scmd_{direction}_vs_openssh",
            ratio(mbps[f"{direction} asyncstage"], mbps[f"{direction} openssh"]),
            ">=",
            0.9,
            f"scmd_{direction} MB/s / OpenSSH `ssh host cat` MB/s, same cipher",
        )
    report.save()


if __name__ == "__main__":
    anyio.run(main)
