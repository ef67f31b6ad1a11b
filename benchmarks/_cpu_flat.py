"""The controller's CPU per further server of a fleet, measured so that it holds from
run to run (for ``bench_fleet_ec2.py``'s "flat in N" target).

Two things move that figure without any change in what the library does per server:

- **The single-server baseline.** Per further server is ``(C(N) - C(1)) / (N - 1)``: at
  N = 10 a change of 30 ms in ``C(1)`` moves it by 3 ms. The first fleet of a run pays
  the run's one-time work (the security group, the key pair, botocore's service models,
  first imports): a single server measured first is no baseline for the others.
  :func:`baseline` leaves it out and takes the median of the rest, which are spread
  through the run (interleaved with the fleets). For the same reason the smallest
  fleet, whose figure the baseline moves most, is run more than once (interleaved too)
  and judged on the median of its runs.
- **The garbage collector.** CPython's full collections (generation 2) come when the
  objects that survived since the last one reach a quarter of all long-lived ones;
  each scans every tracked object of the process, here the in-process local cloud's
  too. A small fleet leaves too few survivors to set one off (its share of the bill
  comes later, in whatever runs then), a large one sets off a few, each scanning the
  whole heap. :class:`GcMeter` counts the collections' CPU in the thread that ran
  them; the per-server figure is given with and without it, and flatness is judged
  without it: the rest is what the library's code does per server.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["GcMeter", "baseline", "further_runs", "per_further_server"]


class GcMeter:
    """CPU seconds the garbage collector took, per thread (native id) and generation,
    while installed (``with GcMeter() as gc_meter:``)."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self.seconds: defaultdict[int, float] = defaultdict(float)  # by native thread id
        self.full: defaultdict[int, float] = defaultdict(float)  # of it generation 2
        self.collections: defaultdict[int, int] = defaultdict(int)

    def _callback(self, phase: str, info: Mapping[str, Any]) -> None:
        me = threading.get_native_id()
        if phase == "start":
            self._started[me] = time.thread_time()
            return
        began = self._started.pop(me, None)
        if began is None:
            return
        took = time.thread_time() - began
        self.seconds[me] += took
        self.collections[me] += 1
        if info.get("generation") == 2:
            self.full[me] += took

    def __enter__(self) -> GcMeter:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def of(self, threads: Iterable[threading.Thread]) -> tuple[float, float, int]:
        """So far, of these threads: the collections' CPU seconds, of it the full
        collections', and how many collections."""
        ids = {t.native_id for t in threads if t.native_id is not None}
        return (
            sum(s for i, s in self.seconds.items() if i in ids),
            sum(s for i, s in self.full.items() if i in ids),
            sum(n for i, n in self.collections.items() if i in ids),
        )


def _none(run: dict[str, Any]) -> float:
    return 0.0


def baseline(
    singles: list[dict[str, Any]],
    key: str = "controller_cpu_s",
    less: Callable[[dict[str, Any]], float] = _none,
) -> float:
    """One server's figure (``key``, minus ``less`` of each run): the median of the
    single-server runs, the first left out when there are others (it pays the run's
    one-time work); ``singles`` in run order."""
    kept = singles[1:] if len(singles) > 1 else singles
    return float(statistics.median(float(r[key]) - less(r) for r in kept))


def per_further_server(
    fleets: list[dict[str, Any]],
    singles: list[dict[str, Any]],
    key: str = "controller_cpu_s",
    less: Callable[[dict[str, Any]], float] = _none,
) -> dict[int, float]:
    """CPU ms per server beyond one server's launch, by N: ``key`` of each fleet (minus
    ``less`` of it, e.g. its collections' CPU) against :func:`baseline` of the same; of
    several runs of one N, the median."""
    return {n: statistics.median(ms) for n, ms in further_runs(fleets, singles, key, less).items()}


def further_runs(
    fleets: list[dict[str, Any]],
    singles: list[dict[str, Any]],
    key: str = "controller_cpu_s",
    less: Callable[[dict[str, Any]], float] = _none,
) -> dict[int, list[float]]:
    """What :func:`per_further_server` takes the median of: each run's figure, by N, in
    run order (the spread of a size measured more than once)."""
    one = baseline(singles, key, less)
    runs: dict[int, list[float]] = defaultdict(list)
    for r in fleets:
        if (n := int(r["n"])) > 1:
            runs[n].append(round(1000 * (float(r[key]) - less(r) - one) / (n - 1), 2))
    return dict(sorted(runs.items()))
