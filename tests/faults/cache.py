"""Faults for the cache build, through its seams: worker classes that SIGKILL themselves
mid-shard (the first attempts, once on every shard, or one rank of a teacher group), a worker
class that sleeps after each row group (a build slow enough to break in the middle), one that
waits for a file after each row group (a build that holds its lock until told), one whose
teacher returns NaN at one row of one shard, and a driver hook that SIGKILLs the driver after N
commits.

    python -m tests.faults.cache [--kill-driver-after N] [--slow-row-groups S] [--kill-each-shard MARKER_DIR] \
        [--hold-until FILE] [--nan-at SHARD:CALL:ROW] -- <distkd cache build arguments>
"""

from __future__ import annotations

import os
import signal
import sys
import time

from distkd.cache.worker import CacheWorker
from distkd.models.teacher import _unpack


class KillOnceWorker(CacheWorker):
    """Dies (SIGKILL) right after the first row group of a shard is in its temporary file,
    once per marker file: the first `kills` shard attempts that reach it die."""

    marker_dir = ""  # set per test (class attribute: Ray builds the actor from the class)
    kills = 1

    def on_row_group(self, g: int) -> None:
        if g != 0:
            return
        for i in range(self.kills):
            try:
                os.close(os.open(os.path.join(self.marker_dir, f"killed-{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            os.kill(os.getpid(), signal.SIGKILL)


class KillEachShardWorker(CacheWorker):
    """Dies (SIGKILL) after the first row group of every shard's first attempt: a build of N
    shards on one worker loses that worker N times."""

    marker_dir = ""

    def build(self, task):
        self.shard = task.log_path
        return super().build(task)

    def on_row_group(self, g: int) -> None:
        if g != 0:
            return
        marker = os.path.join(self.marker_dir, "killed-" + self.shard.replace("/", "_"))
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def kill_each_shard_class(marker_dir: str) -> type:
    return type("KillEachShard", (KillEachShardWorker,), {"marker_dir": str(marker_dir), "__module__": __name__})


def kill_worker_class(marker_dir: str, kills: int = 1) -> type:
    """A KillOnceWorker subclass bound to `marker_dir` (Ray ships the class by value)."""
    return type("KillingWorker", (KillOnceWorker,), {"marker_dir": str(marker_dir), "kills": kills,
                                                     "__module__": __name__})


class KillRankWorker(CacheWorker):
    """Rank `kill_rank` of a teacher group (distkd.cache.group) dies (SIGKILL) right after row
    group 0 of a shard is through it, once per marker file; the other ranks run on."""

    marker_dir = ""
    kill_rank = 1

    def on_row_group(self, g: int) -> None:
        if g != 0 or getattr(self, "rank", 0) != self.kill_rank:
            return
        try:
            os.close(os.open(os.path.join(self.marker_dir, f"killed-rank-{self.kill_rank}"),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def kill_rank_class(marker_dir: str, rank: int) -> type:
    """A KillRankWorker subclass bound to `marker_dir` and `rank` (Ray ships the class by value)."""
    return type("KillRankWorker", (KillRankWorker,), {"marker_dir": str(marker_dir), "kill_rank": rank,
                                                      "__module__": __name__})


class SlowWorker(CacheWorker):
    """Sleeps `seconds` after each row group is in its temporary file."""

    seconds = 0.0

    def on_row_group(self, g: int) -> None:
        time.sleep(self.seconds)


def slow_worker_class(seconds: float) -> type:
    return type("SlowRowGroupWorker", (SlowWorker,), {"seconds": float(seconds), "__module__": __name__})


class NanAtWorker(CacheWorker):
    """The teacher's logits turn NaN at row `row` of its `call`-th batch (from 0) of every shard
    whose path ends with `shard`; other shards see the real teacher."""

    shard, call, row = "", 0, 0

    def build(self, task):
        if not task.log_path.endswith(self.shard):
            return super().build(task)
        real, calls = self.teacher.module, [0]

        def poisoned(x, dense):
            out = real(x, dense)
            if calls[0] == self.call:
                _unpack(out)[0][self.row, 0] = float("nan")
            calls[0] += 1
            return out

        self.teacher.module = poisoned
        try:
            return super().build(task)
        finally:
            self.teacher.module = real


def nan_at_class(spec: str) -> type:
    """`SHARD:CALL:ROW`: a NanAtWorker subclass (Ray ships the class by value)."""
    shard, call, row = spec.rsplit(":", 2)
    return type("NanAtWorker", (NanAtWorker,), {"shard": shard, "call": int(call), "row": int(row),
                                                "__module__": __name__})


class HoldWorker(CacheWorker):
    """Waits after each row group until the file `gate` exists (at most `limit` seconds, then
    goes on): a build that holds its cache's lock until a test has done what it must meanwhile."""

    gate, limit = "", 300.0

    def on_row_group(self, g: int) -> None:
        deadline = time.monotonic() + self.limit
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.1)


def hold_worker_class(gate: str) -> type:
    return type("HoldWorker", (HoldWorker,), {"gate": str(gate), "__module__": __name__})


def kill_driver_after(n: int):
    def on_commit(rel: str, committed: int) -> None:
        if committed >= n:
            print(f"[fault] SIGKILL the driver after {committed} committed shard(s)", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return on_commit


def main(argv: list[str]) -> int:
    split = argv.index("--")
    opts = dict(zip(argv[:split:2], argv[1:split:2]))
    import distkd.cache.build as cache_build
    from distkd.cli import main as cli_main

    real, seams = cache_build.build, {}
    if "--kill-driver-after" in opts:
        seams["on_commit"] = kill_driver_after(int(opts["--kill-driver-after"]))
    if "--slow-row-groups" in opts:
        seams["worker"] = slow_worker_class(float(opts["--slow-row-groups"]))
    if "--kill-each-shard" in opts:
        seams["worker"] = kill_each_shard_class(opts["--kill-each-shard"])
    if "--hold-until" in opts:
        seams["worker"] = hold_worker_class(opts["--hold-until"])
    if "--nan-at" in opts:
        seams["worker"] = nan_at_class(opts["--nan-at"])
    cache_build.build = lambda job, **kw: real(job, **seams, **kw)
    return cli_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
