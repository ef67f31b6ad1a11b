"""The fleet benchmark's per-further-server CPU helpers (benchmarks/_cpu_flat.py)."""

from __future__ import annotations

import gc
import importlib.util
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_cpu_flat", ROOT / "benchmarks" / "_cpu_flat.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_collectors_time_is_counted_in_the_thread_that_ran_it() -> None:
    flat = _module()
    here, other = threading.current_thread(), threading.Thread(target=gc.collect)
    enabled = gc.isenabled()
    gc.disable()  # only the collections asked for here
    try:
        with flat.GcMeter() as meter:
            gc.collect()
            gc.collect()
            seconds, full, collections = meter.of([here])
            other.start()
            other.join()
        assert collections == 2  # two full collections here; the other thread's apart
        assert 0.0 < full == seconds
        assert meter.of([other])[2] == 1
        assert all(getattr(c, "__self__", None) is not meter for c in gc.callbacks)
        gc.collect()
        assert meter.of([here])[2] == 2  # no longer counting
    finally:
        if enabled:
            gc.enable()


def test_the_first_single_server_run_is_no_baseline() -> None:
    flat = _module()
    singles = [
        {"n": 1, "controller_cpu_s": 0.35, "gc_s": 0.0},  # the run's one-time work
        {"n": 1, "controller_cpu_s": 0.20, "gc_s": 0.0},
        {"n": 1, "controller_cpu_s": 0.18, "gc_s": 0.0},
        {"n": 1, "controller_cpu_s": 0.22, "gc_s": 0.0},
    ]
    fleets = [
        {"n": 10, "controller_cpu_s": 0.38, "gc_s": 0.0},
        {"n": 101, "controller_cpu_s": 2.6, "gc_s": 0.4},
    ]
    assert flat.baseline(singles) == 0.20
    assert flat.baseline(singles[:1]) == 0.35  # alone, it is all there is
    assert flat.per_further_server(fleets, singles) == {10: 20.0, 101: 24.0}
    assert flat.per_further_server(fleets, singles, less=lambda r: r["gc_s"]) == {
        10: 20.0,
        101: 20.0,
    }


def test_a_size_run_several_times_is_judged_on_its_median() -> None:
    flat = _module()
    singles = [
        {"n": 1, "controller_cpu_s": 0.35},
        {"n": 1, "controller_cpu_s": 0.20},
        {"n": 1, "controller_cpu_s": 0.20},
    ]
    fleets = [
        {"n": 10, "controller_cpu_s": 0.47},  # a run the baseline's noise moved most
        {"n": 50, "controller_cpu_s": 0.69},
        {"n": 10, "controller_cpu_s": 0.29},
        {"n": 10, "controller_cpu_s": 0.32},
    ]
    assert flat.further_runs(fleets, singles) == {10: [30.0, 10.0, 13.33], 50: [10.0]}
    assert flat.per_further_server(fleets, singles) == {10: 13.33, 50: 10.0}


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_an_ended_threads_cpu_stays_with_its_side() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        name = "bench_common_under_test"
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "_common.py")
        assert spec is not None and spec.loader is not None
        common = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(common)  # counts threads from here on
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop(name, None)
    try:
        before = common.cloud_threads_cpu()
        mine = dict(common.EndedThreads.seconds)
        copy = threading.Thread(target=_burn, args=(0.05,), name="localcloud-copy-vol-1")
        worker = threading.Thread(target=_burn, args=(0.03,), name="asyncio_0")
        for thread in (copy, worker):
            thread.start()
            thread.join()
        assert common.cloud_threads_cpu() - before >= 0.05  # ended, still the cloud's
        ended = {k: v - mine[k] for k, v in common.EndedThreads.seconds.items()}
        assert ended["cloud"] >= 0.05 and 0.03 <= ended["controller"] < 0.05
        assert ended["bench"] == 0.0
    finally:
        common.EndedThreads.uninstall()
