"""The fleet benchmark's per-further-server CPU helpers (benchmarks/_cpu_flat.py)."""

from __future__ import annotations

import gc
import importlib.util
import threading
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
