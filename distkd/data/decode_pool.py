"""Decoding workers: row-group windows decoded by N threads ahead of the batches, in plan order.

The loader turns a list of jobs (pieces of its epoch plan) into decoded `Rows`; `ordered`
runs `fn` over them on `workers` threads with at most `workers + 1` results in flight and
yields the results in job order, so the batches cut from them are the same, row for row, at
any N: the epoch plan, exactly-once and resume do not know N exists.

Threads, not processes: reading Parquet and most of decode (Arrow's readers, numpy's copies,
reductions and casts on large arrays, torch's log1p) run with the GIL released, so threads
overlap them, and a decoded window reaches the batching thread by reference. A process would
send every decoded byte through a pipe or shared memory and would have to rebuild its own
file handles and footers; `python -m distkd.bench.loader` measures what threads give.

Each thread keeps its own open files (`handles`, passed to `fn`); all are closed when the
iteration ends, is abandoned, or fails (the first failure is raised in job order).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

J = TypeVar("J")
R = TypeVar("R")

__all__ = ["ordered"]


def close_all(handles: OrderedDict) -> None:
    for pf in handles.values():
        pf.close()
    handles.clear()


def ordered(fn: Callable[[OrderedDict, J], R], jobs: Sequence[J], workers: int) -> Iterator[R]:
    """`fn(handles, job)` for each job, on `workers` threads (inline for 1), yielded in order."""
    if workers <= 1:
        handles: OrderedDict = OrderedDict()
        try:
            for job in jobs:
                yield fn(handles, job)
        finally:
            close_all(handles)
        return

    local = threading.local()
    opened: list[OrderedDict] = []
    lock = threading.Lock()

    def run(job: J) -> R:
        h = getattr(local, "handles", None)
        if h is None:
            h = local.handles = OrderedDict()
            with lock:
                opened.append(h)
        return fn(h, job)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="distkd-decode")
    inflight: deque[Future] = deque()
    todo = iter(jobs)
    try:
        for job in todo:
            inflight.append(pool.submit(run, job))
            if len(inflight) > workers:
                break
        while inflight:
            result = inflight.popleft().result()
            job = next(todo, None) if len(inflight) <= workers else None
            if job is not None:
                inflight.append(pool.submit(run, job))
            yield result
    finally:
        for f in inflight:
            f.cancel()
        pool.shutdown(wait=True)
        for h in opened:
            close_all(h)
