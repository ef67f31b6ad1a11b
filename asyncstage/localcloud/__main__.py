"""``python -m asyncstage.localcloud``: run a local cloud in the foreground."""

from __future__ import annotations

import argparse
import sys

import anyio

from asyncstage.localcloud._cloud import LocalCloud
from asyncstage.localcloud._disks import STORES
from asyncstage.localcloud._isolation import ISOLATION_MODES, MECHANISMS
from asyncstage.localcloud.errors import LocalCloudError


async def _serve(args: argparse.Namespace) -> None:
    async with LocalCloud(
        boot_delay=args.boot_delay,
        state_dir=args.state_dir,
        region=args.region,
        port=args.port,
        device_isolation=args.device_isolation,
        store=args.store,
    ) as cloud:
        print(f"endpoint_url: {cloud.endpoint_url}", flush=True)
        print(f"region:       {cloud.region}", flush=True)
        print(f"image:        {cloud.image_id} ({cloud.image_name})", flush=True)
        print(f"login user:   {cloud.default_username}", flush=True)
        print(f"state dir:    {cloud.state_dir}", flush=True)
        print(f"seed:         {cloud._engine.seed}", flush=True)
        print(f"isolation:    {MECHANISMS[cloud.device_isolation]}", flush=True)
        print(f"store:        {cloud.store}", flush=True)
        session = cloud.session_kwargs()
        print(f"export AWS_ENDPOINT_URL_EC2={cloud.endpoint_url}", flush=True)
        print(f"export AWS_DEFAULT_REGION={cloud.region}", flush=True)
        print(f"export AWS_ACCESS_KEY_ID={session['aws_access_key_id']}", flush=True)
        print(f"export AWS_SECRET_ACCESS_KEY={session['aws_secret_access_key']}", flush=True)
        print("serving; Ctrl-C stops the cloud and removes everything it made", flush=True)
        await anyio.sleep_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m asyncstage.localcloud",
        description="Run an EC2-compatible local cloud in the foreground (needs root).",
    )
    parser.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--boot-delay", type=float, default=0.0, help="extra seconds in pending")
    parser.add_argument("--state-dir", default=None, help="default: a temporary directory")
    parser.add_argument(
        "--device-isolation",
        choices=ISOLATION_MODES,
        default="auto",
        help="auto (default), v1, bpf, or none (accept weaker isolation)",
    )
    parser.add_argument(
        "--store",
        choices=STORES,
        default="plain",
        help="plain (default: image files in the state dir) or reflink (an XFS of the "
        "cloud's own, where snapshots share blocks)",
    )
    args = parser.parse_args(argv)
    try:
        anyio.run(_serve, args)
    except KeyboardInterrupt:
        return 0
    except LocalCloudError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
