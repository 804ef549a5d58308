"""Serving latency: p50/p99 of one call, on one CPU thread, every model measured side by side.

    measure({"teacher": t, "student": s}, {1: inputs_1, 64: inputs_64, 1024: inputs_1024})

runs, for each of `rounds` rounds, for each model, for each batch size, `calls[batch]` calls
timed one by one (perf_counter_ns around each). Interleaving spreads whatever else the
machine does (another process, a frequency change) over every model and batch size instead
of charging it to whichever ran at that moment; percentiles pool the calls of all rounds.
Before timing, every (model, batch) pair is called `warmup` times untimed (TorchScript's
profiling executor optimizes a graph on its first calls for each input shape).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import numpy as np
import torch

BATCHES = (1, 64, 1024)
CALLS = {1: 100, 64: 30, 1024: 6}  # per round: a few seconds for the demo's three models
ROUNDS = 5
WARMUP = 3


def machine() -> str:
    """The CPU (from /proc/cpuinfo where there is one), cores, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores visible, torch {torch.__version__}"


@torch.inference_mode()
def measure(models: dict[str, Callable[..., Any]], inputs: dict[int, tuple], rounds: int = ROUNDS,
            calls: dict[int, int] | None = None, threads: int = 1, warmup: int = WARMUP) -> dict[str, Any]:
    """{"models": {name: {str(batch): {p50_ms, p99_ms, mean_ms, calls}}}, ...}: see the module docstring.
    `inputs[batch]` is the argument tuple of one call."""
    calls = {b: (calls or CALLS).get(b, 10) for b in inputs}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: dict[str, dict[int, list[int]]] = {m: {b: [] for b in inputs} for m in models}
    start = time.perf_counter()
    try:
        for name, fn in models.items():
            for b, args in inputs.items():
                for _ in range(warmup):
                    fn(*args)
        for _ in range(rounds):
            for name, fn in models.items():
                for b, args in inputs.items():
                    out = times[name][b]
                    for _ in range(calls[b]):
                        t0 = time.perf_counter_ns()
                        fn(*args)
                        out.append(time.perf_counter_ns() - t0)
    finally:
        torch.set_num_threads(before)
    result = {}
    for name, per_batch in times.items():
        result[name] = {}
        for b, ns in per_batch.items():
            ms = np.asarray(ns, np.float64) / 1e6
            result[name][str(b)] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                               "mean_ms": float(ms.mean()), "calls": int(ms.size)}
    return {"models": result, "rounds": rounds, "calls_per_round": {str(b): n for b, n in calls.items()},
            "batches": list(inputs), "threads": threads,
            "warmup": warmup, "seconds": round(time.perf_counter() - start, 2), "machine": machine()}
