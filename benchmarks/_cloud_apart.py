"""The local cloud in a process of its own, for ``bench_fleet_ec2.py``'s fleets as the
controller meets EC2: its API on the other end of a connection, not in its process.

In the benchmark's own process the local cloud's threads (its API server, engine and
firewall workers) hold the interpreter's lock in turns with the controller's event loop:
each of the loop's system calls (a send, a connect, a close) lets the lock go and waits
to take it back, and the busier the cloud (the larger the fleet) the longer and the more
often. Run here, the same fleets at the same pace give the controller's CPU per server
without that, beside the in-process figure.

``python benchmarks/_cloud_apart.py STATE PENDING`` serves a cloud (the realistic
profile, ``pending`` added) and writes what a Manager needs of it to ``STATE`` (JSON);
it stops when its standard input closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import tempfile
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

HERE = Path(__file__).resolve().parent

__all__ = ["cloud_apart"]


async def _serve(state: Path, pending: float) -> None:
    from asyncstage.localcloud import LocalCloud, Realism

    realism = dataclasses.replace(Realism(), pending=pending)
    async with LocalCloud(boot_delay=0.0, realism=realism) as cloud:
        seen = {
            "endpoint_url": cloud.endpoint_url,
            "region": cloud.region,
            "session": cloud.session_kwargs(),
            "image_id": cloud.image_id,
            "default_username": cloud.default_username,
            "checkip_url": cloud.checkip_url,
        }
        partial = anyio.Path(f"{state}.partial")  # renamed: the benchmark never reads half
        await partial.write_text(json.dumps(seen))
        await partial.rename(state)
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the benchmark lets go


@contextlib.asynccontextmanager
async def cloud_apart(pending: float) -> AsyncIterator[Any]:
    """A local cloud serving from a child process: an object with what
    :func:`asyncstage.manager.local_manager` reads of a cloud."""
    with tempfile.TemporaryDirectory(prefix="asyncstage-bench-apart-") as where:
        state = anyio.Path(Path(where) / "cloud.json")
        child = await anyio.open_process(
            [sys.executable, str(HERE / "_cloud_apart.py"), str(state), str(pending)],
            stdin=subprocess.PIPE,
            stdout=None,
            stderr=None,
        )
        try:
            with anyio.fail_after(120):
                while not await state.exists() or not (await state.stat()).st_size:
                    if child.returncode is not None:
                        raise RuntimeError(f"the local cloud's process ended ({child.returncode})")
                    await anyio.sleep(0.2)
            seen = json.loads(await state.read_text())
            session = seen.pop("session")
            yield types.SimpleNamespace(session_kwargs=lambda: session, **seen)
        finally:
            with anyio.CancelScope(shield=True):
                if child.stdin is not None:
                    await child.stdin.aclose()
                with anyio.move_on_after(120):  # its stop: the cloud's instances, volumes
                    await child.wait()
                if child.returncode is None:
                    child.kill()  # the next local cloud to start sweeps what it left
                    await child.wait()


if __name__ == "__main__":
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))
    anyio.run(_serve, Path(sys.argv[1]), float(sys.argv[2]))
