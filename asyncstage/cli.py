"""The ``asyncstage`` command: servers, volumes, ssh, rsync, dd and backups from a shell.

Every command opens a :class:`asyncstage.blocking.Manager` (which adopts what earlier runs
made, by their tags), does its work and closes it, applying ``--on-exit`` to the servers it
started (``run`` by default: servers stay as you left them; ``stop`` for backup/restore).

``asyncstage local up`` runs the embedded local cloud as a daemon; ``--local`` (or the
``ASYNCSTAGE_ENDPOINT_URL`` it prints) points later commands at it. ``asyncstage demo`` runs
the fleet-backup demonstration (:mod:`asyncstage.demo`). ``backup``/``restore`` go through
:mod:`asyncstage.backup`; defaults may come from a config file (:mod:`asyncstage.userconfig`,
``config show``); ``completion bash|zsh`` prints a completion script. Output
(:mod:`asyncstage.output`) is drawn with rich on a terminal, plain when piped or ``--json``.

Exit codes: 0 success, 1 failure (one line on stderr; ``-v`` adds the traceback), 2 usage,
3 ``local status``: not running, 130 interrupted. A remote command run by ``ssh`` exits
with the command's own status.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from asyncstage import __version__, backup, blocking, completion, userconfig
from asyncstage import paths as paths_module
from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import (
    AsyncstageError,
    HostKeyMismatch,
    NeedsRoot,
    NotFound,
    UnknownServer,
    UnknownVolume,
)
from asyncstage.output import Output, TransferTask, human_bytes, human_duration
from asyncstage.transfer import TransferStats

__all__ = ["build_parser", "main"]

log = logging.getLogger("asyncstage.cli")

LOCAL_IMAGE_PATTERN = "asyncstage-local-*"
LOCAL_CREDENTIALS = {
    "aws_access_key_id": "asyncstage-local",
    "aws_secret_access_key": "asyncstage-local",
}
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
GiB = 1 << 30


class UsageError(Exception):
    """A command line that cannot work (exit status 2)."""


# -- the local cloud daemon -----------------------------------------------------------------


def local_dir(path: str | None = None) -> Path:
    """The local cloud daemon's directory: ``--dir``, ``$ASYNCSTAGE_LOCAL_DIR`` or
    ``~/.asyncstage/local``."""
    chosen = path or os.environ.get("ASYNCSTAGE_LOCAL_DIR") or "~/.asyncstage/local"
    return Path(chosen).expanduser().absolute()


def _pid_is_daemon(pid: int, directory: Path) -> bool:
    """True when ``pid`` is alive and is our ``local serve`` for this directory."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in cmdline]
    return "asyncstage.cli" in args and "serve" in args and str(directory) in args


def read_local_state(directory: Path) -> dict[str, Any] | None:
    """The running daemon's record (pid, endpoint_url, region, ...), or None."""
    try:
        state: dict[str, Any] = json.loads((directory / "cloud.json").read_text())
    except (OSError, ValueError):
        return None
    if not _pid_is_daemon(int(state.get("pid", 0)), directory):
        return None
    return state


def local_credentials(state: dict[str, Any]) -> dict[str, str]:
    """The local cloud's credentials: the random ones its record holds (the cloud checks
    every request's signature), else the fixed ones of records written before it did."""
    return {key: str(state.get(key, default)) for key, default in LOCAL_CREDENTIALS.items()}


def env_lines(state: dict[str, Any]) -> list[str]:
    """``export`` lines that point later commands (and aws-cli, boto3) at the cloud."""
    creds = local_credentials(state)
    return [
        f"export ASYNCSTAGE_ENDPOINT_URL={state['endpoint_url']}",
        f"export AWS_ENDPOINT_URL_EC2={state['endpoint_url']}",
        f"export AWS_DEFAULT_REGION={state['region']}",
        f"export AWS_ACCESS_KEY_ID={creds['aws_access_key_id']}",
        f"export AWS_SECRET_ACCESS_KEY={creds['aws_secret_access_key']}",
    ]


def _serve_local(args: argparse.Namespace) -> int:
    """``local serve``: run the cloud in the foreground, record it, stop on TERM/INT."""
    import anyio

    from asyncstage.localcloud import LocalCloud

    directory = local_dir(args.dir)
    record = directory / "cloud.json"

    async def serve() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with LocalCloud(
                state_dir=directory / "state",
                port=args.port,
                region=args.cloud_region,
                boot_delay=args.boot_delay,
            ) as cloud:
                state = {
                    "pid": os.getpid(),
                    "endpoint_url": cloud.endpoint_url,
                    "region": cloud.region,
                    "image_id": cloud.image_id,
                    "image_name": cloud.image_name,
                    "username": cloud.default_username,
                    "state_dir": cloud.state_dir,
                    **{k: v for k, v in cloud.session_kwargs().items() if k.startswith("aws_")},
                    "dotdir": str(directory / "dot"),
                    "started": time.time(),
                }
                tmp = record.with_suffix(".tmp")
                tmp.unlink(missing_ok=True)
                # the record holds the cloud's secret key: readable by its owner only
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(state, indent=2))
                tmp.replace(record)
                print(f"local cloud serving at {cloud.endpoint_url}", flush=True)
                try:
                    async for signum in signals:
                        print(f"signal {signum}: stopping", flush=True)
                        break
                finally:
                    with contextlib.suppress(OSError):
                        record.unlink()

    anyio.run(serve)
    return EXIT_OK


def _local_serve(args: argparse.Namespace, out: Output) -> int:
    return _serve_local(args)


def _local_up(args: argparse.Namespace, out: Output) -> int:
    directory = local_dir(args.dir)
    state = read_local_state(directory)
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
            state = read_local_state(directory)
        out.note(f"local cloud running at {state['endpoint_url']} (state in {directory})")
    else:
        out.note(f"local cloud already running at {state['endpoint_url']} (pid {state['pid']})")
    out.note('point later commands at it with --local, or:  eval "$(asyncstage local env)"')
    out.result(state, "\n".join(env_lines(state)))
    return EXIT_OK


def _local_down(args: argparse.Namespace, out: Output) -> int:
    directory = local_dir(args.dir)
    state = read_local_state(directory)
    if state is None:
        out.note("no local cloud running")
    else:
        pid = int(state["pid"])
        out.note(f"stopping the local cloud (pid {pid}) ...")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while _pid_is_daemon(pid, directory):
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
    directory = local_dir(args.dir)
    state = read_local_state(directory)
    if state is None:
        out.result({"running": False}, "local cloud: not running")
        return EXIT_NOT_RUNNING
    up = human_duration(time.time() - float(state.get("started", time.time())))
    text = "\n".join(
        [
            f"local cloud: running (pid {state['pid']}, up {up})",
            f"endpoint:    {state['endpoint_url']}",
            f"region:      {state['region']}",
            f"image:       {state['image_id']} ({state['image_name']})",
            f"state:       {directory}",
        ]
    )
    out.result({"running": True, **state}, text)
    return EXIT_OK


def _local_env(args: argparse.Namespace, out: Output) -> int:
    state = read_local_state(local_dir(args.dir))
    if state is None:
        raise NotFound("no local cloud running: start one with `asyncstage local up`")
    out.result(state, "\n".join(env_lines(state)))
    return EXIT_OK


# -- the manager of a command ------------------------------------------------------------------


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings(args: argparse.Namespace) -> dict[str, userconfig.Setting]:
    """The effective settings: flags, then the environment, then the config file."""
    flags = {
        "region": args.region,
        "profile": args.profile,
        "instance_type": getattr(args, "instance_type", None),
        "image": getattr(args, "image", None),
        "username": args.username,
        "on_exit": getattr(args, "on_exit", None),
    }
    return userconfig.effective(
        flags,
        path=userconfig.config_path(args.config),
        required=bool(args.config),
        defaults={"on_exit": getattr(args, "on_exit_default", "run")},
    )


def manager_options(args: argparse.Namespace) -> blocking.ManagerOptions:
    """Manager options from the global options, the environment, the config file and a
    running local cloud (whose region, image and user name win over the file's)."""
    found = settings(args)
    value = {k: s.value for k, s in found.items()}
    opts: blocking.ManagerOptions = {
        "on_exit": value["on_exit"] or "run",  # type: ignore[typeddict-item]
        "verbosity": 0 if args.quiet else 1 + args.verbose,
    }
    endpoint = args.endpoint_url or os.environ.get("ASYNCSTAGE_ENDPOINT_URL") or None
    state = read_local_state(local_dir())
    if args.local:
        if state is None:
            raise NotFound("no local cloud running: start one with `asyncstage local up`")
        endpoint = str(state["endpoint_url"])
    if endpoint:
        opts["endpoint_url"] = endpoint
    local = state is not None and endpoint == state["endpoint_url"]
    if state is not None and local:
        opts |= {
            "region": str(state["region"]),
            "image": str(state["image_id"]),
            "username": str(state["username"]),
            "dotdir": str(state["dotdir"]),
            "install_packages": False,
            "root_type": None,
            **local_credentials(state),  # type: ignore[typeddict-item]
        }
    elif endpoint and _is_loopback(endpoint):
        # another local cloud (a test's, say): its image by name, no real credentials needed
        opts |= {"image": LOCAL_IMAGE_PATTERN, "install_packages": False, "root_type": None}
        if not os.environ.get("AWS_ACCESS_KEY_ID") and not value["profile"]:
            opts |= LOCAL_CREDENTIALS  # type: ignore[typeddict-item]
    for key in ("region", "image", "username", "profile", "instance_type"):
        # on the local cloud only a flag overrides what the cloud dictates
        if value[key] and (not local or found[key].source.startswith("--")):
            opts[key] = value[key]
    if args.dotdir or os.environ.get("ASYNCSTAGE_DOTDIR"):
        opts["dotdir"] = args.dotdir or os.environ["ASYNCSTAGE_DOTDIR"]
    return opts


@contextlib.contextmanager
def open_manager(args: argparse.Namespace) -> Iterator[blocking.Manager]:
    """The command's manager, closed (``--on-exit`` applied) on the way out."""
    with blocking.Manager(**manager_options(args)) as m:
        yield m
        completion.write_names("servers", [s.name for s in m.servers()])
        completion.write_names("volumes", [v.name for v in m.volumes()])


def _did_you_mean(ref: str, known: Sequence[str], command: str) -> str:
    """`` (did you mean 'web1'?)`` from the closest known names, else where to look."""
    close = difflib.get_close_matches(ref, known, n=3, cutoff=0.6)
    if close:
        return f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    return f" (see `asyncstage {command} list`)"


def find_server(m: blocking.Manager, ref: str) -> blocking.Server:
    """A managed server by name or instance id (NotFound otherwise)."""
    server = m.find_server_by_name(ref)
    if server is None and ref.startswith("i-"):
        with contextlib.suppress(NotFound):
            server = m.find_server_by_instance(ref)
    if server is None:
        known = [s.name for s in m.servers()]
        raise UnknownServer(f"no server named {ref!r}{_did_you_mean(ref, known, 'servers')}")
    return server


def find_volume(m: blocking.Manager, ref: str) -> blocking.Volume:
    """A managed volume by name or volume id (NotFound otherwise)."""
    volume = m.find_volume_by_name(ref)
    if volume is None and ref.startswith("vol-"):
        with contextlib.suppress(NotFound):
            volume = m.find_volume_by_volid(ref)
    if volume is None:
        known = [v.name for v in m.volumes()]
        raise UnknownVolume(f"no volume named {ref!r}{_did_you_mean(ref, known, 'volumes')}")
    return volume


def resolve_names(m: blocking.Manager, path: str) -> str:
    """``mydata:/sub`` → ``vol-…:/sub``, ``web:/etc`` → ``i-…:/etc``; other paths unchanged
    (:func:`asyncstage.paths.resolve_names`)."""
    return str(paths_module.resolve_names(m, path))


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


def _servers(args: argparse.Namespace, out: Output) -> int:
    action = args.action or "list"
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


def _ssh(args: argparse.Namespace, out: Output) -> int:
    with open_manager(args) as m:
        server = find_server(m, args.name)
        if server.state != "running":
            out.note(f"starting {server.name} ...")
            server.start()
        host = server.async_object.host
        blocking.call(host.host_public_key)  # verified and pinned before OpenSSH sees it
        argv = host.openssh_argv(*args.command) if args.command else None
        if argv is None:
            return server.shell()
        if sys.stdin.isatty():
            argv.insert(1, "-t")
        return subprocess.run(argv, check=False).returncode


def _shell(args: argparse.Namespace, out: Output) -> int:
    with open_manager(args) as m:
        server = find_server(m, args.name)
        if server.state != "running":
            out.note(f"starting {server.name} ...")
            server.start()
        return server.shell()


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


def _volumes(args: argparse.Namespace, out: Output) -> int:
    action = args.action or "list"
    with open_manager(args) as m:
        if action == "list":
            _print_volumes(out, m.volumes())
        elif action == "provision":
            if not args.names:
                raise UsageError("volumes provision: give a volume name")
            made = []
            for name in args.names:
                with out.waiting(f"provisioning volume {name}"):
                    if args.server:
                        volume = find_server(m, args.server).provision_volume(
                            name, size=args.size, fstype=args.fstype, mtpt=args.mtpt
                        )
                    else:
                        volume = m.provision_volume(
                            name,
                            size=args.size,
                            fstype=args.fstype,
                            mtpt=args.mtpt,
                            availability_zone=args.zone,
                        )
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


def _snapshot(args: argparse.Namespace, out: Output) -> int:
    with open_manager(args) as m:
        volume = find_volume(m, args.volume)
        with out.waiting(f"snapshot of {volume.name} ({volume.volume_id}), pending"):
            snapshot_id = volume.create_snapshot(args.description or "", wait=not args.no_wait)
        out.result({"snapshot_id": snapshot_id, "volume": volume.name}, snapshot_id)
        return EXIT_OK


def _snapshots(args: argparse.Namespace, out: Output) -> int:
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


def _rsync(args: argparse.Namespace, out: Output) -> int:
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


def _dd(args: argparse.Namespace, out: Output) -> int:
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


def _backup(args: argparse.Namespace, out: Output) -> int:
    from asyncstage import _cli_backup

    return _cli_backup.backup_command(args, out)


def _restore(args: argparse.Namespace, out: Output) -> int:
    backup.check_destination(args.dest, overwrite=args.force)  # before any cloud call
    with open_manager(args) as m:
        with out.transfer(f"restore {args.name}") as progress:
            result = blocking.call(
                backup.restore,
                m,
                args.name,
                args.dest,
                snapshot_id=args.snapshot,
                overwrite=args.force,
                progress=progress,
                phase=_phase_notes(out, progress),
            )
        out.result(
            result.as_dict(),
            f"restore {result.name}: {result.snapshot_id} → {result.dest} "
            f"({human_bytes(result.bytes)}, {result.files} files, {result.elapsed:.1f}s)",
        )
        return EXIT_OK


_PHASES = {
    "volume": "making its volume",
    "rsync": "copying",
    "snapshot": "snapshot pending",
    "cleanup": "deleting its volume",
}


def _phase_notes(out: Output, task: TransferTask) -> Callable[[str], None]:
    """Each phase of a backup or restore: on the live row, and as a note with -v."""

    def note(phase: str) -> None:
        task.phase(_PHASES.get(phase, phase))
        if out.verbose:
            out.note(f"{task.label}: {phase}")

    return note


def _demo(args: argparse.Namespace, out: Output) -> int:
    from asyncstage import demo

    return demo.main_from_cli(args, quiet=out.quiet, json_output=out.json)


# -- the parser ------------------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The global options, on the main parser and (without defaults) on every subcommand,
    so that they may come before or after the command."""

    def d(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("global options")
    g.add_argument("--region", default=d(None), help="AWS region (default: the AWS config's)")
    g.add_argument("--profile", default=d(None), help="AWS profile of the shared config")
    g.add_argument(
        "--endpoint-url",
        default=d(None),
        help="EC2 endpoint (default: $ASYNCSTAGE_ENDPOINT_URL, else AWS)",
    )
    g.add_argument(
        "--local",
        action="store_true",
        default=d(False),
        help="use the local cloud started by `asyncstage local up`",
    )
    g.add_argument("--dotdir", default=d(None), help="keys and known_hosts (default ~/.asyncstage)")
    g.add_argument("--username", default=d(None), help="login user name on the servers")
    g.add_argument(
        "--config",
        default=d(None),
        metavar="PATH",
        help=f"config file (default: $ASYNCSTAGE_CONFIG or {userconfig.DEFAULT_PATH})",
    )
    g.add_argument("--json", action="store_true", default=d(False), help="JSON on stdout")
    g.add_argument("-v", "--verbose", action="count", default=d(0), help="more output; tracebacks")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False), help="only results")


def _on_exit_option(parser: argparse.ArgumentParser, default: str) -> None:
    # no argparse default: the config file and $ASYNCSTAGE_ON_EXIT come before this one
    parser.set_defaults(on_exit_default=default)
    parser.add_argument(
        "--on-exit",
        choices=["run", "stop", "terminate"],
        default=None,
        help=f"what to do with the servers this command started (default: {default})",
    )


_Command = Callable[[str, str, Callable[..., int]], argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    """The ``asyncstage`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="asyncstage",
        description="Staging servers and volumes on EC2 (or the embedded local cloud).",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage, 3 local cloud not running, 130 Ctrl-C.",
    )
    parser.add_argument("--version", action="version", version=f"asyncstage {__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, func: Callable[..., int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _global_options(p, suppress=True)
        p.set_defaults(func=func)
        return p

    _local_commands(command)
    _server_commands(command)
    _volume_commands(command)
    _transfer_commands(command)
    _backup_commands(command)
    _other_commands(command)
    return parser


def _local_commands(command: _Command) -> None:
    p = command("local", "run the embedded local cloud in the background", _local)
    p.add_argument("action", choices=["up", "down", "status", "env", "serve"], metavar="ACTION")
    p.add_argument(
        "--dir", help="daemon directory (default $ASYNCSTAGE_LOCAL_DIR or ~/.asyncstage/local)"
    )
    p.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    p.add_argument("--cloud-region", default="us-east-1", help="the cloud's region")
    p.add_argument("--boot-delay", type=float, default=0.0, help="extra seconds in pending")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for up/down")


def _server_commands(command: _Command) -> None:
    p = command("servers", "list, provision, start, stop or terminate servers", _servers)
    p.add_argument(
        "action",
        nargs="?",
        choices=["list", "provision", "start", "stop", "terminate"],
        metavar="ACTION",
        help="list (default), provision, start, stop, terminate",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="server names (or instance ids)")
    p.add_argument("--all", action="store_true", help="every managed server")
    p.add_argument("--count", type=int, default=0, help="provision N servers with new names")
    p.add_argument("--type", dest="instance_type", help="instance type")
    p.add_argument("--image", help="AMI id or name pattern")
    p.add_argument("--zone", help="availability zone")
    _on_exit_option(p, "run")

    p = command("ssh", "run a command on a server (a login shell without one)", _ssh)
    p.add_argument("name", metavar="NAME")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")
    _on_exit_option(p, "run")

    p = command("shell", "an interactive shell on a server", _shell)
    p.add_argument("name", metavar="NAME")
    _on_exit_option(p, "run")


def _volume_commands(command: _Command) -> None:
    p = command("volumes", "list, provision or delete volumes", _volumes)
    p.add_argument(
        "action",
        nargs="?",
        choices=["list", "provision", "delete"],
        metavar="ACTION",
        help="list (default), provision, delete",
    )
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--size", type=int, help="GiB (default 1)")
    p.add_argument("--fstype", help="ext4 (default), xfs, btrfs, ext2, ext3, vfat, raw")
    p.add_argument("--server", help="mount it on this server (default: one in its zone)")
    p.add_argument("--mtpt", help="mount point (default /mnt/Staging/NAME)")
    p.add_argument("--zone", help="availability zone")
    _on_exit_option(p, "run")

    p = command("snapshot", "snapshot a volume", _snapshot)
    p.add_argument("volume", metavar="VOLUME", help="volume name or id")
    p.add_argument("--description", help="snapshot description")
    p.add_argument("--no-wait", action="store_true", help="do not wait until it is completed")
    _on_exit_option(p, "run")

    p = command("snapshots", "list staging snapshots (backups), newest first", _snapshots)
    p.add_argument("name", nargs="?", metavar="NAME", help="only the snapshots of this name")


def _transfer_commands(command: _Command) -> None:
    p = command(
        "rsync",
        "copy files: local paths, NAME:/path on a server or volume, user@host:/path",
        _rsync,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="sources, then the destination")
    p.add_argument("--delete", action="store_true", help="delete what the sources lack")
    p.add_argument("-z", "--compress", action="store_true", help="compress on the wire")
    p.add_argument("--exclude", action="append", metavar="PATTERN", help="rsync --exclude")
    p.add_argument("-n", "--dry-run", action="store_true", help="show what would be copied")
    _on_exit_option(p, "run")

    p = command("dd", "block-copy a volume onto another", _dd)
    p.add_argument("source", metavar="SRC", help="volume name or id")
    p.add_argument("dest", metavar="DST", help="volume name or id")
    p.add_argument("--unmount", action="store_true", help="unmount mounted volumes first")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 comparison")
    p.add_argument("-z", "--compress", action="store_true", help="compress between hosts")
    p.add_argument(
        "--all-blocks",
        action="store_true",
        help="copy every block, a byte-for-byte image (default: of an ext filesystem, "
        "only the blocks it uses)",
    )
    _on_exit_option(p, "run")


def _backup_commands(command: _Command) -> None:
    from asyncstage import _cli_backup

    p = command("backup", _cli_backup.HELP, _backup)
    _cli_backup.add_arguments(p)
    _on_exit_option(p, "stop")

    p = command("restore", "restore the newest backup of a name into a directory", _restore)
    p.add_argument("--name", required=True, help="the backup's name")
    p.add_argument("dest", metavar="DEST", help="a new or empty directory")
    p.add_argument("--snapshot", help="this snapshot of the backup (default: the newest)")
    p.add_argument(
        "--force", action="store_true", help="restore into a non-empty directory (merge)"
    )
    _on_exit_option(p, "stop")


def _other_commands(command: _Command) -> None:
    p = command("config", "show the effective settings and where each came from", _config)
    p.add_argument("action", choices=["show"], metavar="ACTION", help="show")

    p = command("completion", "print a shell completion script (bash or zsh)", _completion)
    p.add_argument("shell", choices=["bash", "zsh"], metavar="SHELL", help="bash or zsh")

    p = command("demo", "fleet backup demonstration on the embedded local cloud", _demo)
    p.add_argument("--servers", type=int, default=4, help="servers in the fleet (default 4)")
    p.add_argument("--small", action="store_true", help="little data: a quick run")
    p.add_argument("--seed", type=int, default=1, help="seed of the generated files")


def _config(args: argparse.Namespace, out: Output) -> int:
    found = settings(args)
    rows = [[s.key, s.value or "-", s.source] for s in found.values()]
    out.table([vars(s) for s in found.values()], rows, ["SETTING", "VALUE", "FROM"], "")
    return EXIT_OK


def _completion(args: argparse.Namespace, out: Output) -> int:
    script = completion.bash_script if args.shell == "bash" else completion.zsh_script
    sys.stdout.write(script(build_parser()))
    return EXIT_OK


def _local(args: argparse.Namespace, out: Output) -> int:
    return {
        "up": _local_up,
        "down": _local_down,
        "status": _local_status,
        "env": _local_env,
        "serve": _local_serve,
    }[args.action](args, out)


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if quiet:
        level = logging.ERROR
    elif verbose >= 2:
        level = logging.DEBUG
    elif verbose == 1:
        level = logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 3:
        for noisy in ("botocore", "aiobotocore", "asyncssh", "urllib3", "werkzeug"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _one_line(e: BaseException) -> str:
    if isinstance(e, ExceptionGroup):
        inner = "; ".join(_one_line(x) for x in e.exceptions[:3])
        more = f" (+{len(e.exceptions) - 3} more)" if len(e.exceptions) > 3 else ""
        return f"{e.message}: {inner}{more}"
    text = " ".join(str(e).split()) or type(e).__name__
    text = text if len(text) < 400 else text[:400] + " …"
    hint = _hint(e)
    return f"{text}: {hint}" if hint and hint not in text else text


def _causes(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _hint(e: BaseException) -> str | None:
    """The next step for the errors people meet first, when one is known."""
    names = {type(c).__name__ for c in _causes(e)}
    text = " ".join(str(c) for c in _causes(e))
    if isinstance(e, NeedsRoot) or "needs root" in text:
        return "run it as root (sudo)"
    if "NoCredentialsError" in names or "Unable to locate credentials" in text:
        return (
            "no AWS credentials: run `aws configure`, set AWS_PROFILE (or --profile), "
            "or try the local cloud: `sudo asyncstage local up`, then --local"
        )
    if "NoRegionError" in names or "You must specify a region" in text:
        return f"give --region, or set region in {userconfig.DEFAULT_PATH}"
    if isinstance(e, HostKeyMismatch):
        return (
            "if the server was replaced, delete its line from known_hosts in the dot "
            "directory (--dotdir, default ~/.asyncstage); otherwise do not connect"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The ``asyncstage`` command; returns its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    out = Output(json_output=args.json, quiet=args.quiet, verbose=args.verbose)
    try:
        return int(args.func(args, out) or 0)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"asyncstage: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asyncstage: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (AsyncstageError, OSError, ValueError) as e:
        if args.verbose:
            traceback.print_exc()
        print(f"asyncstage: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
