"""Running steps at once with plain errors: the first failure as itself, never an
exception group (used by the host key checks and the direct link's set-up and cleanups)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

__all__ = ["concurrently"]


async def concurrently(*steps: Callable[[], Awaitable[None]], cancel_others: bool = True) -> None:
    """Run the steps at once; the first that fails is raised as itself (not inside an
    exception group), whatever its type. It cancels the others, unless
    ``cancel_others=False`` (cleanups: each runs to its end whatever another does)."""
    failures: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def guarded(step: Callable[[], Awaitable[None]]) -> None:
            try:
                await step()
            except Exception as e:  # cancellation (BaseException) passes through
                failures.append(e)
                if cancel_others:
                    tg.cancel_scope.cancel()

        for step in steps:
            tg.start_soon(guarded, step)
    if failures:
        raise failures[0]
