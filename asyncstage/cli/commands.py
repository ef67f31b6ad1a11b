"""The commands: servers, volumes, snapshots, transfers, backups, the demo, and the
local cloud's ``up``/``down``/``status``/``env``."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from asyncstage.cli import daemon
from asyncstage.cli.common import (
    EXIT_NOT_RUNNING,
    EXIT_OK,
    UsageError,
    find_server,
    find_volume,
    ignored_options,
    open_manager,
    refuse_ignored,
    resolve_names,
    settings,
    with_progress,
)
from asyncstage.errors import AsyncstageError
from asyncstage.names import Kind, check_mount_point, check_name
from asyncstage.output import Output, human_bytes, human_duration

# The library (aioboto3, asyncssh) and the local cloud are imported by the commands that
# use them: `local status`, `config show` or `--help` start in a fraction of the time.
if TYPE_CHECKING:
    from asyncstage import blocking
    from asyncstage.transfer import TransferStats

__all__ = [
    "config",
    "dd",
    "demo",
    "local",
    "make_backup",
    "restore",
    "rsync",
    "servers",
    "shell",
    "snapshot",
    "snapshots",
    "ssh",
    "volumes",
]


# -- the local cloud ---------------------------------------------------------------------


def _local_up(args: argparse.Namespace, out: Output) -> int:
    from asyncstage.localcloud.errors import NeedsRoot

    directory = daemon.local_dir(args.dir)
    state = daemon.read_local_state(directory)
    if state is None:
        if os.geteuid() != 0:
            raise NeedsRoot("the local cloud needs root (namespaces, mounts, loop devices)")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            (directory / "cloud.json").unlink()
        logfile = directory / "cloud.log"
        argv = [sys.executable, "-m", "asyncstage.cli", "local", "serve", "--dir", str(directory)]
        argv += ["--port", str(args.port), "--cloud-region", args.cloud_region]
        argv += ["--boot-delay", str(args.boot_delay)]
        argv += ["--device-isolation", args.device_isolation, "--network", args.network]
        argv += ["--store", args.store]
        with open(logfile, "ab") as log_out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd="/",
            )
        out.note(f"starting the local cloud (pid {proc.pid}, log {logfile}) ...")
        deadline = time.monotonic() + args.timeout
        while state is None:
            if proc.poll() is not None:
                tail = logfile.read_text(errors="replace").strip().splitlines()[-1:]
                raise AsyncstageError(
                    f"the local cloud did not start (exit {proc.returncode}): "
                    f"{tail[0] if tail else 'see ' + str(logfile)}"
                )
            if time.monotonic() > deadline:
                os.kill(proc.pid, signal.SIGTERM)
                raise AsyncstageError(f"the local cloud did not start within {args.timeout:g}s")
            time.sleep(0.1)
            state = daemon.read_local_state(directory)
        out.note(f"local cloud running at {state['endpoint_url']} (state in {directory})")
    else:
        out.note(f"local cloud already running at {state['endpoint_url']} (pid {state['pid']})")
    out.note('point later commands at it with --local, or:  eval "$(asyncstage local env)"')
    out.result(state, "\n".join(daemon.env_lines(state, directory)))
    return EXIT_OK


def _local_down(args: argparse.Namespace, out: Output) -> int:
    directory = daemon.local_dir(args.dir)
    state = daemon.read_local_state(directory)
    if state is None:
        out.note("no local cloud running")
    else:
        pid = int(state["pid"])
        out.note(f"stopping the local cloud (pid {pid}) ...")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while daemon.pid_is_daemon(pid, directory):
            if time.monotonic() > deadline:
                out.note(f"pid {pid} did not stop within {args.timeout:g}s: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)
    for leftover in ("cloud.json", "cloud.tmp"):
        with contextlib.suppress(OSError):
            (directory / leftover).unlink()
    # keys and pinned host keys of a cloud that is gone would only mislead the next one
    shutil.rmtree(directory / "dot", ignore_errors=True)
    out.result({"running": False}, None)
    return EXIT_OK


def _local_status(args: argparse.Namespace, out: Output) -> int:
    directory = daemon.local_dir(args.dir)
    state = daemon.read_local_state(directory)
    if state is None:
        out.result({"running": False}, f"local cloud: not running (looked in {directory})")
        return EXIT_NOT_RUNNING
    up = human_duration(time.time() - float(state.get("started", time.time())))
    text = "\n".join(
        [
            f"local cloud: running (pid {state['pid']}, up {up})",
            f"endpoint:    {state['endpoint_url']}",
            f"region:      {state['region']}",
            f"image:       {state['image_id']} ({state['image_name']})",
            f"isolation:   {_isolation_text(state.get('device_isolation'))}",
            f"network:     {_network_text(state)}",
            f"store:       {state.get('store', 'plain')}",
            f"state:       {directory}",
        ]
    )
    out.result({"running": True, **state}, text)
    return EXIT_OK


def _isolation_text(mechanism: Any) -> str:
    """How a running cloud keeps its instances off the machine's disks, in words."""
    from asyncstage.localcloud._isolation import MECHANISMS

    return MECHANISMS.get(str(mechanism), "unknown (a cloud started by an older asyncstage)")


def _network_text(state: dict[str, Any]) -> str:
    """Where a running cloud's instances live, in words."""
    network = state.get("network")
    if network == "vpc":
        return f"vpc (namespaces behind the cloud's router; checkip {state.get('checkip_url')})"
    if network == "loopback":
        return "loopback (instances on 127.x addresses of this machine)"
    return "unknown (a cloud started by an older asyncstage)"


def _local_env(args: argparse.Namespace, out: Output) -> int:
    directory = daemon.local_dir(args.dir)
    state = daemon.read_local_state(directory)
    if state is None:
        raise daemon.no_cloud(directory)
    read_only = bool(getattr(args, "read_only", False))
    out.result(state, "\n".join(daemon.env_lines(state, directory, read_only=read_only)))
    return EXIT_OK


# -- the manager of a command ------------------------------------------------------------------


def local(args: argparse.Namespace, out: Output) -> int:
    return {
        "up": _local_up,
        "down": _local_down,
        "status": _local_status,
        "env": _local_env,
        "serve": _local_serve,
    }[args.action](args, out)


def _local_serve(args: argparse.Namespace, out: Output) -> int:
    directory = daemon.local_dir(args.dir)
    daemon.serve(
        directory,
        port=args.port,
        region=args.cloud_region,
        boot_delay=args.boot_delay,
        device_isolation=args.device_isolation,
        network=args.network,
        store=args.store,
    )
    return EXIT_OK


def _stats_dict(stats: TransferStats) -> dict[str, Any]:
    return asdict(stats)


def _stats_text(stats: TransferStats) -> str:
    rate = stats.bytes / stats.elapsed if stats.elapsed > 0 else 0.0
    files = f", {stats.files} files" if stats.files else ""
    return (
        f"{human_bytes(stats.bytes)}{files} in {stats.elapsed:.1f}s "
        f"({human_bytes(rate)}/s, {stats.route})"
    )


# -- servers ------------------------------------------------------------------------------------


def _server_row(s: blocking.Server) -> dict[str, Any]:
    return {
        "name": s.name,
        "instance_id": s.instance_id,
        "state": s.state,
        "address": s.address,
        "zone": s.availability_zone,
        "type": s.instance.get("InstanceType"),
        "volumes": [v.name for v in s.volumes()],
    }


def _print_servers(out: Output, servers: Sequence[blocking.Server]) -> None:
    rows = [_server_row(s) for s in sorted(servers, key=lambda s: s.name)]
    headers = ["NAME", "INSTANCE", "STATE", "ADDRESS", "ZONE", "TYPE", "VOLUMES"]
    cells = [[*list(r.values())[:-1], ",".join(r["volumes"]) or "-"] for r in rows]
    out.table(rows, cells, headers, "no servers")


# which action of `servers` and of `volumes` reads each option (the rest never look at it)
_SERVER_OPTIONS: dict[str, tuple[str, ...]] = {
    "count": ("servers provision",),
    "instance_type": ("servers provision",),
    "image": ("servers provision",),
    "zone": ("servers provision",),
    "all": ("servers start", "servers stop", "servers terminate"),
}
_VOLUME_OPTIONS: dict[str, tuple[str, ...]] = {
    dest: ("volumes provision",) for dest in ("size", "fstype", "server", "mtpt", "zone")
}


def _action(args: argparse.Namespace, kind: Kind) -> str:
    """The action asked for (``list`` by default). The command line is checked before the
    manager opens: an option or names the action would ignore, names and a mount point to
    provision (the library checks those again), so that bad input is refused before any
    call to EC2."""
    action = str(args.action or "list")
    command = "servers" if kind == "server" else "volumes"
    used_by = _SERVER_OPTIONS if kind == "server" else _VOLUME_OPTIONS
    form = f"{command} {action}"
    refuse_ignored(ignored_options(args, form, used_by, flags={"instance_type": "--type"}), form)
    if action == "list" and args.names:
        raise UsageError(f"{form} takes no names (it lists them all)")
    if action == "provision":
        for name in args.names:
            check_name(name, kind)
        if getattr(args, "mtpt", None):
            check_mount_point(args.mtpt)
        if kind == "server" and args.names and args.count:
            raise UsageError(f"{form}: names or --count, not both")
        if kind == "volume" and args.server and args.zone:
            raise UsageError(f"{form}: --server or --zone, not both (its server's zone)")
    return action


def servers(args: argparse.Namespace, out: Output) -> int:
    action = _action(args, "server")
    with open_manager(args) as m:
        if action == "list":
            _print_servers(out, m.servers())
            return EXIT_OK
        if action == "provision":
            names: list[str] = list(args.names)
            if not names and args.count < 1:
                raise UsageError("servers provision: give names or --count N")
            with out.waiting(f"provisioning {len(names) or args.count} server(s)"):
                servers = m.provision_servers(
                    names or args.count,
                    instance_type=args.instance_type,
                    availability_zone=args.zone,
                )
            _print_servers(out, servers)
            return EXIT_OK
        targets = m.servers() if args.all else [find_server(m, n) for n in args.names]
        if not targets:
            raise UsageError(f"servers {action}: name the servers, or --all")
        with out.waiting(f"{action}: {', '.join(s.name for s in targets)}"):
            if action == "start":
                m.start_servers(targets)
            elif action == "stop":
                m.stop_servers(targets)
            elif action == "terminate":
                m.terminate_servers(targets)
        _print_servers(out, targets if action != "terminate" else [])
        return EXIT_OK


def _running(m: blocking.Manager, name: str, out: Output) -> blocking.Server:
    """The managed server of that name, started first (with a note) when it is not running."""
    server = find_server(m, name)
    if server.state != "running":
        out.note(f"starting {server.name} ...")
        server.start()
    return server


def ssh(args: argparse.Namespace, out: Output) -> int:
    from asyncstage import blocking

    with open_manager(args) as m:
        server = _running(m, args.name, out)
        host = server.async_object.host
        blocking.call(host.host_public_key)  # verified and pinned before OpenSSH sees it
        argv = host.openssh_argv(*args.command) if args.command else None
        if argv is None:
            return server.shell()
        if sys.stdin.isatty():
            argv.insert(1, "-t")
        return subprocess.run(argv, check=False).returncode


def shell(args: argparse.Namespace, out: Output) -> int:
    with open_manager(args) as m:
        return _running(m, args.name, out).shell()


# -- volumes --------------------------------------------------------------------------------


def _volume_row(v: blocking.Volume) -> dict[str, Any]:
    server = v.server
    return {
        "name": v.name,
        "volume_id": v.volume_id,
        "size_gib": v.size,
        "fstype": v.fstype,
        "zone": v.availability_zone,
        "server": server.name if server else None,
        "mtpt": v.mtpt if v.mounted else None,
    }


def _print_volumes(out: Output, volumes: Sequence[blocking.Volume]) -> None:
    rows = [_volume_row(v) for v in sorted(volumes, key=lambda v: v.name)]
    headers = ["NAME", "VOLUME", "GIB", "FSTYPE", "ZONE", "SERVER", "MOUNTED AT"]
    cells = [[x if x is not None else "-" for x in r.values()] for r in rows]
    out.table(rows, cells, headers, "no volumes")


def volumes(args: argparse.Namespace, out: Output) -> int:
    from asyncstage.options import VolumeOptions

    action = _action(args, "volume")
    with open_manager(args) as m:
        if action == "list":
            _print_volumes(out, m.volumes())
        elif action == "provision":
            if not args.names:
                raise UsageError("volumes provision: give a volume name")
            made = []
            for name in args.names:
                options = VolumeOptions(size=args.size, fstype=args.fstype, mtpt=args.mtpt)
                with out.waiting(f"provisioning volume {name}"):
                    if args.server:
                        volume = find_server(m, args.server).provision_volume(name, **options)
                    else:
                        options["availability_zone"] = args.zone
                        volume = m.provision_volume(name, **options)
                made.append(volume)
            _print_volumes(out, made)
        elif action == "delete":
            if not args.names:
                raise UsageError("volumes delete: name the volumes")
            for volume in [find_volume(m, n) for n in args.names]:
                out.note(f"deleting volume {volume.name} ({volume.volume_id}) ...")
                volume.delete()
            out.result({"deleted": args.names}, None)
        return EXIT_OK


def snapshot(args: argparse.Namespace, out: Output) -> int:
    with open_manager(args) as m:
        volume = find_volume(m, args.volume)
        with out.waiting(f"snapshot of {volume.name} ({volume.volume_id}), pending"):
            snapshot_id = volume.create_snapshot(args.description or "", wait=not args.no_wait)
        out.result({"snapshot_id": snapshot_id, "volume": volume.name}, snapshot_id)
        return EXIT_OK


def snapshots(args: argparse.Namespace, out: Output) -> int:
    from asyncstage.ec2 import tag, tags_of

    with open_manager(args) as m:
        rows = [
            {
                "name": tags_of(s).get(tag("name")),
                "snapshot_id": s["SnapshotId"],
                "size_gib": s.get("VolumeSize"),
                "state": s.get("State"),
                "started": s.get("StartTime"),
                "description": s.get("Description"),
            }
            for s in m.snapshots(args.name)
        ]
        headers = ["NAME", "SNAPSHOT", "GIB", "STATE", "STARTED", "DESCRIPTION"]
        cells = [[x if x is not None else "-" for x in r.values()] for r in rows]
        out.table(rows, cells, headers, "no snapshots")
        return EXIT_OK


# -- transfers -----------------------------------------------------------------------------


def rsync(args: argparse.Namespace, out: Output) -> int:
    if len(args.paths) < 2:
        raise UsageError("rsync needs at least one source and a destination")
    options: list[str] = []
    for pattern in args.exclude or ():
        options += ["--exclude", pattern]
    if args.dry_run:
        options.append("--dry-run")
    with open_manager(args) as m:
        paths = [resolve_names(m, p) for p in args.paths]
        with out.transfer("rsync") as progress:
            stats = m.rsync(
                *paths,
                options=options,
                compress=args.compress,
                delete=args.delete,
                progress=progress,
            )
        out.result(_stats_dict(stats), _stats_text(stats))
        return EXIT_OK


def dd(args: argparse.Namespace, out: Output) -> int:
    with open_manager(args) as m:
        source, dest = find_volume(m, args.source), find_volume(m, args.dest)
        with out.transfer(f"dd {source.name} → {dest.name}") as progress:
            stats = m.dd(
                source,
                dest,
                verify=not args.no_verify,
                compress=args.compress,
                unmount=args.unmount,
                blocks="all" if args.all_blocks else "used",
                progress=progress,
            )
        out.result(_stats_dict(stats), _stats_text(stats))
        return EXIT_OK


# -- backup and restore -----------------------------------------------------------------------


def make_backup(args: argparse.Namespace, out: Output) -> int:
    from asyncstage.cli import backup as backup_cli

    return backup_cli.backup_command(args, out)


def restore(args: argparse.Namespace, out: Output) -> int:
    from asyncstage import backup

    backup.check_destination(args.dest, overwrite=args.force)  # before any cloud call
    with open_manager(args) as m:
        result = with_progress(
            out,
            f"restore {args.name}",
            backup.restore,
            m,
            args.name,
            args.dest,
            snapshot_id=args.snapshot,
            overwrite=args.force,
            verify=args.verify,
        )
        shown = (
            f"a set of {len(result.snapshots)} ({', '.join(result.snapshots.values())})"
            if result.snapshots
            else result.snapshot_id
        )
        out.result(
            result.as_dict(),
            f"restore {result.name}: {shown} → {result.dest} "
            f"({human_bytes(result.bytes)}, {result.files} files, {result.elapsed:.1f}s; "
            f"{result.verified})",
        )
        return EXIT_OK


def demo(args: argparse.Namespace, out: Output) -> int:
    from asyncstage import demo

    return demo.main_from_cli(args, quiet=out.quiet, json_output=out.json)


# -- the parser ------------------------------------------------------------------------------


def config(args: argparse.Namespace, out: Output) -> int:
    found = settings(args)
    rows = [[s.key, s.value or "-", s.source] for s in found.values()]
    out.table([vars(s) for s in found.values()], rows, ["SETTING", "VALUE", "FROM"], "")
    return EXIT_OK
