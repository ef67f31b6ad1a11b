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
import logging
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from asyncstage import __version__, completion, userconfig
from asyncstage.cli import backup_options
from asyncstage.cli import commands as c
from asyncstage.cli.common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
)
from asyncstage.errors import AsyncstageError, HostKeyMismatch, NoLocalCloud
from asyncstage.localcloud.errors import LocalCloudError, NeedsRoot
from asyncstage.output import Output
from asyncstage.settings import HOST_KEY_SOURCES, ON_EXIT

__all__ = ["build_parser", "main"]


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
        "--host-keys",
        choices=HOST_KEY_SOURCES,
        default=d(None),
        help="new servers' host keys from their console (default) or given in user-data",
    )
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
        choices=ON_EXIT,
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
    p = command("local", "run the embedded local cloud in the background", c.local)
    p.add_argument("action", choices=["up", "down", "status", "env", "serve"], metavar="ACTION")
    p.add_argument(
        "--dir", help="daemon directory (default $ASYNCSTAGE_LOCAL_DIR or ~/.asyncstage/local)"
    )
    p.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    p.add_argument("--cloud-region", default="us-east-1", help="the cloud's region")
    p.add_argument("--boot-delay", type=float, default=0.0, help="extra seconds in pending")
    p.add_argument(
        "--device-isolation",
        choices=["auto", "v1", "bpf", "none"],
        default="auto",
        help="how instances are kept off this machine's disks: auto (default), v1 (cgroup "
        "v1 devices), bpf (cgroup v2 device program), none (accept weaker isolation)",
    )
    p.add_argument(
        "--network",
        choices=["auto", "vpc", "loopback"],
        default="auto",
        help="where instances live: auto (default: vpc where the machine can), vpc (each "
        "in a network namespace behind the cloud's router, security groups enforced), "
        "loopback (127.x addresses, groups not enforced: for machines without nftables)",
    )
    p.add_argument(
        "--store",
        choices=["plain", "reflink"],
        default="plain",
        help="where volume and snapshot images live: plain (default: files in the state "
        "dir, each snapshot a copy) or reflink (an XFS of the cloud's own: snapshots and "
        "volumes from them share blocks, as EBS's do)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for up/down")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="env: export the cloud's read-only credentials (Describe*/Get* only)",
    )


def _server_commands(command: _Command) -> None:
    p = command("servers", "list, provision, start, stop or terminate servers", c.servers)
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

    p = command("ssh", "run a command on a server (a login shell without one)", c.ssh)
    p.add_argument("name", metavar="NAME")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")
    _on_exit_option(p, "run")

    p = command("shell", "an interactive shell on a server", c.shell)
    p.add_argument("name", metavar="NAME")
    _on_exit_option(p, "run")


def _volume_commands(command: _Command) -> None:
    p = command("volumes", "list, provision or delete volumes", c.volumes)
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

    p = command("snapshot", "snapshot a volume", c.snapshot)
    p.add_argument("volume", metavar="VOLUME", help="volume name or id")
    p.add_argument("--description", help="snapshot description")
    p.add_argument("--no-wait", action="store_true", help="do not wait until it is completed")
    _on_exit_option(p, "run")

    p = command("snapshots", "list staging snapshots (backups), newest first", c.snapshots)
    p.add_argument("name", nargs="?", metavar="NAME", help="only the snapshots of this name")


def _transfer_commands(command: _Command) -> None:
    p = command(
        "rsync",
        "copy files: local paths, NAME:/path on a server or volume, user@host:/path",
        c.rsync,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="sources, then the destination")
    p.add_argument("--delete", action="store_true", help="delete what the sources lack")
    p.add_argument("-z", "--compress", action="store_true", help="compress on the wire")
    p.add_argument("--exclude", action="append", metavar="PATTERN", help="rsync --exclude")
    p.add_argument("-n", "--dry-run", action="store_true", help="show what would be copied")
    _on_exit_option(p, "run")

    p = command("dd", "block-copy a volume onto another", c.dd)
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
    p = command("backup", backup_options.HELP, c.make_backup)
    backup_options.add_arguments(p)
    _on_exit_option(p, "stop")

    p = command("restore", "restore the newest backup of a name into a directory", c.restore)
    p.add_argument("--name", required=True, help="the backup's name")
    p.add_argument("dest", metavar="DEST", help="a new or empty directory")
    p.add_argument("--snapshot", help="this snapshot of the backup (default: the newest)")
    p.add_argument(
        "--force", action="store_true", help="restore into a non-empty directory (merge)"
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not check the restored files against the backup's manifest",
    )
    _on_exit_option(p, "stop")


def _other_commands(command: _Command) -> None:
    p = command("config", "show the effective settings and where each came from", c.config)
    p.add_argument("action", choices=["show"], metavar="ACTION", help="show")

    p = command("completion", "print a shell completion script (bash or zsh)", _completion)
    p.add_argument("shell", choices=["bash", "zsh"], metavar="SHELL", help="bash or zsh")

    p = command("demo", "fleet backup demonstration on the embedded local cloud", c.demo)
    p.add_argument("--servers", type=int, default=4, help="servers in the fleet (default 4)")
    p.add_argument("--small", action="store_true", help="little data: a quick run")
    p.add_argument("--seed", type=int, default=1, help="seed of the generated files")


def _completion(args: argparse.Namespace, out: Output) -> int:
    script = completion.bash_script if args.shell == "bash" else completion.zsh_script
    sys.stdout.write(script(build_parser()))
    return EXIT_OK


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
    except (AsyncstageError, LocalCloudError, OSError, ValueError) as e:
        if args.verbose:
            traceback.print_exc()
        print(f"asyncstage: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_NOT_RUNNING if isinstance(e, NoLocalCloud) else EXIT_FAILURE
