"""What every command shares: its manager (from the options, the environment, the config
file and a running local cloud), names resolved to servers and volumes, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import ipaddress
import os
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from asyncstage import completion, paths, userconfig
from asyncstage.cli import daemon
from asyncstage.cli.daemon import LOCAL_IMAGE_PATTERN, local_dir, no_cloud, read_local_state
from asyncstage.errors import (
    NotFound,
    UnknownServer,
    UnknownVolume,
)
from asyncstage.output import Output, TransferTask
from asyncstage.settings import LOCAL_CREDENTIALS

if TYPE_CHECKING:  # imported by the functions that open a manager (it is most of a second)
    from asyncstage import blocking

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_RUNNING",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "find_server",
    "find_volume",
    "ignored_options",
    "manager_options",
    "open_manager",
    "refuse_ignored",
    "resolve_names",
    "settings",
]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """A command line that cannot work (exit status 2)."""


def ignored_options(
    args: argparse.Namespace,
    form: str,
    used_by: dict[str, tuple[str, ...]],
    *,
    defaults: dict[str, object] | None = None,
    flags: dict[str, str] | None = None,
) -> list[str]:
    """The options given on the command line that ``form`` (an action) does not read, each
    with the forms that do (``used_by``: an option's dest and those forms; ``flags``: an
    option whose flag is not its dest's): one command's actions share a parser, so an
    option meant for another parses, and would be dropped in silence."""
    found = []
    for dest, forms in used_by.items():
        value = getattr(args, dest, None)
        if value in (None, False, [], 0) or value == (defaults or {}).get(dest) or form in forms:
            continue
        flag = (flags or {}).get(dest) or "--" + dest.replace("_", "-")
        found.append(f"{flag} (used by {', '.join(forms)})")
    return found


def refuse_ignored(found: list[str], form: str, hint: str = "") -> None:
    """:class:`UsageError` naming the options ``form`` would ignore (none: nothing)."""
    if found:
        raise UsageError(f"{form}: not its options: {'; '.join(found)}{hint}")


def is_loopback(url: str) -> bool:
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
        "host_keys": getattr(args, "host_keys", None),
    }
    return userconfig.effective(
        flags,
        path=userconfig.config_path(args.config),
        required=bool(args.config),
        defaults={"on_exit": getattr(args, "on_exit_default", "run")},
    )


# A local cloud's waits end in a fraction of a second: EC2's first pause of 1 s would be
# most of a command's time there (the pauses still grow while a wait lasts).
LOCAL_POLL_INTERVAL = 0.2


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
    directory = local_dir()
    state = read_local_state(directory)
    if args.local:
        if state is None:
            raise no_cloud(directory)
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
            "poll_interval": LOCAL_POLL_INTERVAL,
            # the read-only pair when the environment holds it (`local env --read-only`)
            **daemon.cloud_credentials(state, read_only=daemon.read_only_exported(state)),  # type: ignore[typeddict-item]
        }
    elif endpoint and is_loopback(endpoint):
        # another local cloud (a test's, say): its image by name, no real credentials needed
        opts |= {
            "image": LOCAL_IMAGE_PATTERN,
            "install_packages": False,
            "root_type": None,
            "poll_interval": LOCAL_POLL_INTERVAL,
        }
        if not os.environ.get("AWS_ACCESS_KEY_ID") and not value["profile"]:
            opts |= LOCAL_CREDENTIALS  # type: ignore[typeddict-item]
    for key in ("region", "image", "username", "profile", "instance_type"):
        # on the local cloud only a flag overrides what the cloud dictates
        if value[key] and (not local or found[key].source.startswith("--")):
            opts[key] = value[key]
    checkip = os.environ.get("ASYNCSTAGE_CHECKIP_URL") or (state or {}).get("checkip_url")
    if checkip and (local or os.environ.get("ASYNCSTAGE_CHECKIP_URL")):
        opts["checkip_url"] = str(checkip)  # a local cloud's router: this machine's address
    flagged_image = bool(value["image"]) and found["image"].source.startswith("--")
    if state is not None and local and opts.get("region") != state["region"] and not flagged_image:
        # an AMI id is a region's own: another region of the cloud has the image by name
        opts["image"] = LOCAL_IMAGE_PATTERN
    if value["host_keys"]:
        opts["host_keys"] = value["host_keys"]  # type: ignore[typeddict-item]
    if args.dotdir or os.environ.get("ASYNCSTAGE_DOTDIR"):
        opts["dotdir"] = args.dotdir or os.environ["ASYNCSTAGE_DOTDIR"]
    return opts


@contextlib.contextmanager
def open_manager(args: argparse.Namespace) -> Iterator[blocking.Manager]:
    """The command's manager, closed (``--on-exit`` applied) on the way out."""
    from asyncstage import blocking

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
    kind = _Kind("server", "i-", UnknownServer, lambda: [s.name for s in m.servers()])
    return _find(ref, kind, m.find_server_by_name, m.find_server_by_instance)


def find_volume(m: blocking.Manager, ref: str) -> blocking.Volume:
    """A managed volume by name or volume id (NotFound otherwise)."""
    kind = _Kind("volume", "vol-", UnknownVolume, lambda: [v.name for v in m.volumes()])
    return _find(ref, kind, m.find_volume_by_name, m.find_volume_by_volid)


_T = TypeVar("_T")


@dataclass(frozen=True)
class _Kind:
    name: str
    id_prefix: str
    unknown: type[NotFound]
    known_names: Callable[[], list[str]]


def _find(
    ref: str, kind: _Kind, by_name: Callable[[str], _T | None], by_id: Callable[[str], _T]
) -> _T:
    """What ``ref`` names, else what it is the id of; NotFound with the names it may mean."""
    found = by_name(ref)
    if found is None and ref.startswith(kind.id_prefix):
        with contextlib.suppress(NotFound):
            found = by_id(ref)
    if found is None:
        hint = _did_you_mean(ref, kind.known_names(), f"{kind.name}s")
        raise kind.unknown(f"no {kind.name} named {ref!r}{hint}")
    return found


def resolve_names(m: blocking.Manager, path: str) -> str:
    """``mydata:/sub`` → ``vol-…:/sub``, ``web:/etc`` → ``i-…:/etc``; other paths unchanged
    (:func:`asyncstage.paths.resolve_names`)."""
    return str(paths.resolve_names(m, path))


_PHASES = {
    "volume": "making its volume",
    "rsync": "copying",
    "snapshot": "snapshot pending",
    "cleanup": "deleting its volume",
}


def with_progress(
    out: Output, what: str, func: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any
) -> _T:
    """``func(*args, **kwargs)``, a backup or a restore, run on the facade's loop under a
    live row ``what`` that shows its progress and phases."""
    from asyncstage import blocking

    with out.transfer(what) as progress:
        phase = phase_notes(out, progress)
        return blocking.call(func, *args, progress=progress, phase=phase, **kwargs)


def phase_notes(out: Output, task: TransferTask) -> Callable[[str], None]:
    """Each phase of a backup or restore: on the live row, and as a note with -v."""

    def note(phase: str) -> None:
        task.phase(_PHASES.get(phase, phase))
        if out.verbose:
            out.note(f"{task.label}: {phase}")

    return note
