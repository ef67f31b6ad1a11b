"""The local cloud's daemon (``asyncstage local serve``): its directory, its record
(``cloud.json``: pid, endpoint, region, credentials) and whether it still runs."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from asyncstage.errors import NoLocalCloud, NotFound
from asyncstage.settings import local_credentials

if TYPE_CHECKING:
    from asyncstage.blocking import LocalCloudOptions

__all__ = [
    "LOCAL_IMAGE_PATTERN",
    "env_lines",
    "local_dir",
    "no_cloud",
    "pid_is_daemon",
    "read_local_state",
    "serve",
]

LOCAL_IMAGE_PATTERN = "asyncstage-local-*"


def local_dir(path: str | None = None) -> Path:
    """The local cloud daemon's directory: ``--dir``, ``$ASYNCSTAGE_LOCAL_DIR`` or
    ``~/.asyncstage/local``."""
    chosen = path or os.environ.get("ASYNCSTAGE_LOCAL_DIR") or "~/.asyncstage/local"
    return Path(chosen).expanduser().absolute()


def no_cloud(directory: Path) -> NoLocalCloud:
    """The error of a command that needs the local cloud when none runs in ``directory``."""
    return NoLocalCloud(
        f"no local cloud running in {directory}: start one with `asyncstage local up` (one "
        "started with `--dir` elsewhere is found with ASYNCSTAGE_LOCAL_DIR set to that dir)"
    )


def pid_is_daemon(pid: int, directory: Path) -> bool:
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
    if not pid_is_daemon(int(state.get("pid", 0)), directory):
        return None
    return state


def cloud_credentials(state: dict[str, Any], *, read_only: bool = False) -> dict[str, str]:
    """The credentials of the cloud a record describes; ``read_only``: its read-only pair
    (``Describe*``/``Get*`` only)."""
    if not read_only:
        return local_credentials(state)
    if not state.get("read_only_key_id"):
        raise NotFound("this local cloud's record has no read-only credentials")
    return {
        "aws_access_key_id": str(state["read_only_key_id"]),
        "aws_secret_access_key": str(state["read_only_secret"]),
    }


def read_only_exported(state: dict[str, Any]) -> bool:
    """Whether the environment holds the local cloud's read-only pair."""
    key = state.get("read_only_key_id")
    return bool(key) and os.environ.get("AWS_ACCESS_KEY_ID") == key


def env_lines(state: dict[str, Any], directory: Path, *, read_only: bool = False) -> list[str]:
    """``export`` lines that point later commands (and aws-cli, boto3) at the cloud whose
    daemon keeps ``directory`` (``--local`` finds it there)."""
    creds = cloud_credentials(state, read_only=read_only)
    return [
        f"export ASYNCSTAGE_LOCAL_DIR={shlex.quote(str(directory))}",
        f"export ASYNCSTAGE_ENDPOINT_URL={state['endpoint_url']}",
        f"export AWS_ENDPOINT_URL_EC2={state['endpoint_url']}",
        f"export AWS_DEFAULT_REGION={state['region']}",
        f"export AWS_ACCESS_KEY_ID={creds['aws_access_key_id']}",
        f"export AWS_SECRET_ACCESS_KEY={creds['aws_secret_access_key']}",
        *([f"export ASYNCSTAGE_CHECKIP_URL={url}"] if (url := state.get("checkip_url")) else []),
    ]


def serve(directory: Path, **options: Unpack[LocalCloudOptions]) -> None:
    """``local serve``: run the cloud (made with ``options``) in the foreground, record it,
    stop on TERM/INT."""
    import anyio

    from asyncstage.localcloud import LocalCloud

    record = directory / "cloud.json"
    options["state_dir"] = directory / "state"

    async def run() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with LocalCloud(**options) as cloud:
                read_only = cloud.session_kwargs(read_only=True)
                state = {
                    "pid": os.getpid(),
                    "endpoint_url": cloud.endpoint_url,
                    "region": cloud.region,
                    "image_id": cloud.image_id,
                    "image_name": cloud.image_name,
                    "username": cloud.default_username,
                    "state_dir": cloud.state_dir,
                    **{k: v for k, v in cloud.session_kwargs().items() if k.startswith("aws_")},
                    "read_only_key_id": read_only["aws_access_key_id"],
                    "read_only_secret": read_only["aws_secret_access_key"],
                    "device_isolation": cloud.device_isolation,
                    "network": cloud.network,
                    "store": cloud.store,
                    "checkip_url": cloud.checkip_url,
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

    anyio.run(run)
