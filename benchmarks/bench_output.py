"""rsync's output on its way to the controller: relayed in batches, or a write per line.

rsync prints a line or two per file it copies (``--info=progress2`` and the file's name,
which a transfer's progress reads). Written straight into the ssh session, each line is
an SSH packet of its own: the server's sshd encrypts it, the controller's asyncssh takes
it apart, thousands a second for small files. The helper that runs rsync on a server
(``asyncstage/remote/rsynchelper.py``, ``relay``) passes the output on in batches of
what came within ``RELAY_EVERY`` seconds.

Measured on one server of the local cloud: a directory of F small files copied by rsync
on that server (the route of a backup whose work volume is on its source server) into a
directory emptied before each copy, in rounds that alternate the two sides (a b, b a,
...):

- asyncstage: ``Manager.rsync`` (the helper's ``solo``, which relays rsync's output);
- baseline: the same rsync command line, started over the same connection without the
  helper (``scmd_read``), its output read by the same parser: how the helper ran rsync
  before it relayed (rsync writing into the session), less the helper's own start.

Per side: the controller's CPU (this process: its event loop and asyncssh; the local
cloud's API is idle meanwhile), the server's (its sshd, rsync and the helper: the
cgroup of this run's processes, less this process) and the time. Targets, on the median
of the rounds: the controller's CPU per copy, asyncstage / baseline <= 0.5; the server's
<= 1; the time <= 1.05. Quick mode: few files, one round.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import anyio
from _common import (
    CPUAccounting,
    Report,
    local_cloud,
    paired_spread,
    parse_args,
    process_cpu,
    ratio,
)

from asyncstage import Manager, Server
from asyncstage.transfer.base import Reporter
from asyncstage.transfer.rsync import _rsync_base
from asyncstage.transfer.rsyncout import RsyncOutput

SRC, DST = "/srv/many", "/srv/copy"


async def _ours(m: Manager, server: Server) -> int:
    stats = await m.rsync(f"{server}:{SRC}/", f"{server}:{DST}/")
    return stats.files


async def _direct(server: Server) -> int:
    parser = RsyncOutput(Reporter(None, "rsync"))
    argv = ["rsync", *_rsync_base((), False, False), "--", f"{SRC}/", f"{DST}/"]
    async with server.host.scmd_read(*argv, encoding=None, sudo=True) as out:
        while chunk := await out.read(65536):
            await parser.feed(chunk)
    await parser.close()
    return parser.files


async def _fill(server: Server, files: int) -> None:
    # files of 512 bytes, 1000 to a directory: a tree of small files, as a server's
    # configuration, code or mail spool is
    script = (
        'import os, sys\nn = int(sys.argv[1])\nfor i in range(n):\n    d = "%s/d%d" % '
        '(sys.argv[2], i // 1000)\n    os.makedirs(d, exist_ok=True)\n    with open("%s/f%d"'
        ' % (d, i), "wb") as f:\n        f.write(os.urandom(512))\n'
    )
    await server.scmd("python3", "-c", script, str(files), SRC, sudo=True)


async def _run(args: Any) -> Report:
    files, rounds = (300, 1) if args.quick else (20000, 7)
    report = Report("output", args.quick, args.results)
    report.params = {"files": files, "file_bytes": 512, "rounds": rounds}
    samples: dict[str, dict[str, list[float]]] = {
        side: {"controller_cpu_s": [], "server_cpu_s": [], "seconds": []}
        for side in ("asyncstage", "direct")
    }
    with CPUAccounting() as acct:
        report.params["server_cpu_from"] = acct.counted_by
        async with local_cloud() as (_, m):
            (server,) = await m.provision_servers(["out-0"])
            await _fill(server, files)
            for r in range(rounds):
                for side in ("asyncstage", "direct") if r % 2 == 0 else ("direct", "asyncstage"):
                    await server.scmd("rm", "-rf", "--", DST, sudo=True)
                    whole = acct.usage() if acct.path else 0.0
                    own, t = process_cpu(), time.monotonic()
                    copied = await (_ours(m, server) if side == "asyncstage" else _direct(server))
                    took = time.monotonic() - t
                    controller = process_cpu() - own
                    server_cpu = (acct.usage() - whole if acct.path else 0.0) - controller
                    assert copied == files, (side, copied, files)
                    samples[side]["seconds"].append(round(took, 4))
                    samples[side]["controller_cpu_s"].append(round(controller, 4))
                    samples[side]["server_cpu_s"].append(round(max(server_cpu, 0.0), 4))
    report.results = {"rounds": samples}
    medians = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in samples.items()}
    report.results["medians"] = medians
    report.table(
        f"rsync of {files} files of 512 bytes on one server, its output read by the "
        "controller (median of the rounds)",
        ["side", "seconds", "controller CPU s", "server CPU s"],
        [
            [side, m["seconds"], m["controller_cpu_s"], m["server_cpu_s"]]
            for side, m in medians.items()
        ],
    )
    ours, direct = medians["asyncstage"], medians["direct"]
    evidence = (
        f"medians, asyncstage against rsync writing into the session: controller "
        f"{ours['controller_cpu_s']} against {direct['controller_cpu_s']} CPU s, server "
        f"(sshd, rsync, the helper) {ours['server_cpu_s']} against {direct['server_cpu_s']}, "
        f"{ours['seconds']} against {direct['seconds']} s, for {files} files"
    )
    what = f"rsync of {files} small files on a server, asyncstage / its output written by rsync"
    for key, limit, label in (
        ("controller_cpu_s", 0.5, "the controller's CPU"),
        ("server_cpu_s", 1.0, "the server's CPU (sshd, rsync, the helper)"),
        ("seconds", 1.05, "time"),
    ):
        report.target(
            f"output_{key}",
            ratio(ours[key], direct[key]),
            "<=",
            limit,
            f"{what}: {label} (median of {rounds} rounds)",
            bound="library",
            evidence=evidence,
            spread=paired_spread(samples["asyncstage"][key], samples["direct"][key]),
        )
    return report


def main() -> None:
    args = parse_args(__doc__ or "")
    report = anyio.run(_run, args)
    report.save()


if __name__ == "__main__":
    main()
