"""The Ray side of the cache build: connect, size the actor pool, run shards with retries.

A pool of `CacheWorker` actors (Ray Core), each holding the teacher, takes one shard at a
time. A worker that dies mid-shard (SIGKILL, OOM, a lost node) costs that shard only: Ray
restarts the actor (`max_restarts`) and the driver resubmits the shard to the next ready
worker, up to `max_attempts` times. An error raised by the shard itself (bad logs, a
changed file) is not retried: it stops the build with its message.
A lost cluster (the GCS of the head refusing or ignoring connections for CLUSTER_LOST_S, probed
every POLL_S while the driver waits) stops the build with ClusterLost naming its address; what
committed is in the manifest and a rerun on a live cluster computes the rest.

Sizing: the pool takes every CPU of the cluster (W workers × t threads = CPUs), at least one
worker. The actors need no spare CPU (they read and decode their own shards; the driver and a
Ray job's entrypoint hold none): on 2 cores two workers ran 1.62× one, every build complete.
Other Ray work on the same cluster waits until the pool closes; pass `workers` to leave it
room. Where the cluster has GPUs each worker takes one.

Teacher groups (`teacher_ranks` K > 1, distkd.cache.group): a worker is a group of K actors
sharing one teacher copy, each actor t threads (or a GPU); W groups × K × t = CPUs. The loop
below sees a slot either way (ActorSlot, GroupSlot): a start (its actors' refs), a shard (one
ref per actor, the first one's result the shard's entry), and what a failure means: a single
actor is restarted by Ray; a group that lost a member is killed and rebuilt whole.

Storage: tasks carry locations as strings (paths or s3://… URIs) and each worker resolves
them with its own environment (distkd.storage). An embedded Ray started by the driver
passes the driver's environment (AWS_ENDPOINT_URL, credentials) on to its workers; on a
cluster, set those in the nodes' image or the job's runtime_env (env_vars), since workers
there never see the submitting shell.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from distkd import log
from distkd.cache.contract import CacheError, ShardEntry
from distkd.cache.worker import CacheWorker, ShardTask
from distkd.data.schema import LogsError
from distkd.storage import StorageError

READY_TIMEOUT_S = 900.0
POLL_S = 2.0  # the longest the driver waits on Ray before it looks at the cluster again
CLUSTER_LOST_S = 6.0  # the GCS refusing or not answering this long: the cluster is gone
MEMORY_TIMEOUT_S = 30.0  # the end-of-build memory figures: asked of live actors, never a reason to wait long

logger = logging.getLogger(__name__)


class ClusterLost(CacheError):
    """The Ray cluster the build runs on stopped answering (its head died, the network went)."""


def connect(address: str | None) -> bool:
    """Connect to Ray: the running session, `address` / RAY_ADDRESS, or a new embedded one
    sized to this machine. Returns True when this call started the connection."""
    import ray  # deferred here and below: Ray's import costs seconds, and plan_pool's callers need none

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as e:
            raise ClusterLost(f"cannot connect to the Ray cluster at {address}: {_last_line(e)}") from None
    else:
        # address="local": a new instance, never the last `ray start` cluster Ray would otherwise pick up
        ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
                 logging_level=logging.WARNING)
    return True


@dataclass
class PoolPlan:
    workers: int  # teacher copies: actors, or groups of `ranks` actors
    threads: int  # torch threads per actor
    num_cpus: float  # Ray CPUs reserved per actor
    num_gpus: int
    device: str
    ranks: int = 1  # actors one teacher copy is sharded over (distkd.cache.group)

    def describe(self) -> str:
        unit = "GPU + " if self.num_gpus else ""
        if self.ranks > 1:
            return (f"{self.workers} group(s) of {self.ranks} ranks × ({unit}{self.threads} thread(s)) "
                    f"on {self.device}")
        return f"{self.workers} worker(s) × ({unit}{self.threads} thread(s)) on {self.device}"


def plan_pool(resources: dict[str, float], workers: int | None, threads: int | None, device: str = "auto",
              ranks: int = 1) -> PoolPlan:
    """Workers (teacher copies of `ranks` actors each) and threads from the cluster's resources
    (see the module docstring); CacheError when one copy does not fit the cluster."""
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    usable = max(1, cpus)  # every CPU: see the module docstring
    if device == "cuda" and not gpus:
        raise CacheError("device=cuda asked, but the Ray cluster has no GPU")
    if device != "cpu" and gpus:
        if gpus < ranks:
            raise CacheError(_too_small(ranks, "1 GPU", cpus, gpus))
        w = min(workers or gpus // ranks, gpus // ranks)
        t = threads or max(1, min(4, usable // (w * ranks)))
        return PoolPlan(w, t, min(float(t), usable / (w * ranks)), 1, "cuda", ranks)
    t = threads or (max(1, usable // (workers * ranks)) if workers else 1)
    if ranks > 1 and ranks * min(t, usable) > usable:
        raise CacheError(_too_small(ranks, f"{min(t, usable)} CPU", cpus, gpus))
    w = max(1, min(workers or usable // (t * ranks), usable // (t * ranks)))
    return PoolPlan(w, t, float(min(t, usable)), 0, "cpu", ranks)


def _too_small(ranks: int, each: str, cpus: int, gpus: int) -> str:
    return (f"teacher_ranks={ranks}: one teacher group is {ranks} actors of {each} each, the Ray cluster has "
            f"{cpus} CPU and {gpus} GPU; lower teacher_ranks (or threads_per_worker) or add nodes")


def _cause(e: BaseException) -> BaseException:
    return getattr(e, "cause", None) or e


def _last_line(e: BaseException) -> str:
    """The error itself, without Ray's traceback (its last non-empty line)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def actor_env() -> dict[str, str]:
    """Environment of the pool's actors. glibc gives each thread that allocates an arena of its
    own (up to 8 per core), and an actor's threads (Ray's, the decoder's, torch's) leave them
    fragmented: one worker's peak RSS grew 1.31-1.33x from 1 to 16 shards by default, 1.07-1.08x
    with MALLOC_ARENA_MAX=2 at the same speed (2 runs each; mallopt once the actor runs does not
    help, its threads have their arenas by then). The env costs ~0.7 s of actor start. The
    driver's own MALLOC_ARENA_MAX wins. DISTKD_LOG_LEVEL: the driver's level, for the actors'
    `distkd.log.setup()`."""
    level = os.environ.get(log.ENV) or logging.getLevelName(logging.getLogger(log.ROOT).getEffectiveLevel())
    return {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"), log.ENV: level}


class ActorSlot:
    """One actor holding the whole teacher (teacher_ranks 1). Ray restarts it after a death."""

    restarted_by_ray = True

    def __init__(self, index: int, actor: Any):
        self.actor, self.name = actor, f"worker {index}"

    def wake(self) -> list[Any]:
        return [self.actor.ready.remote()]

    def actors(self) -> list[Any]:
        return [self.actor]

    def submit(self, task: ShardTask) -> list[Any]:
        return [self.actor.build.remote(task)]

    def retry_start(self, e: BaseException) -> bool:
        """Still restarting (ask again shortly), or dead for good (constructor failed)?"""
        from ray.exceptions import ActorUnavailableError

        if isinstance(e, ActorUnavailableError):
            time.sleep(0.2)
            return True
        return False

    def started(self) -> None:
        pass

    def why_gone(self, error: str) -> str:
        return error

    def lost(self, e: BaseException) -> bool:
        """The actor died (SIGKILL, OOM, a lost node); an error it raised is not a loss."""
        from ray.exceptions import RayTaskError

        return not isinstance(e, RayTaskError)

    def check_placed(self) -> None:
        pass

    def close(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)


@dataclass
class _Work:
    """What a slot is waiting for: its start (task None) or a shard, one ref per actor."""

    refs: list[Any]
    task: ShardTask | None = None
    values: dict[Any, Any] = field(default_factory=dict)


class WorkerPool:
    def __init__(self, plan: PoolPlan, teacher: Any, max_attempts: int, worker: type = CacheWorker,
                 group_timeout_s: float = 300.0):
        """`teacher`: what each worker's constructor loads (a TeacherRef, see distkd.models.teacher).
        With plan.ranks > 1 each worker is a group of actors (distkd.cache.group) whose rendezvous,
        collectives and placement are each bounded by `group_timeout_s`."""
        import ray

        self.plan, self.max_attempts = plan, max_attempts
        options = dict(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_task_retries=0,
                       runtime_env={"env_vars": actor_env()})  # Ray merges env_vars with a job's
        if plan.ranks > 1:
            from distkd.cache.group import GroupSlot  # deferred with Ray: group.py imports it at the top

            self.slots = [GroupSlot(i, worker, options, teacher, plan, group_timeout_s, max_attempts)
                          for i in range(plan.workers)]
        else:
            # Restarts unbounded per worker: each death is charged to the shard it was running (at
            # most max_attempts per shard), and a worker that never gets ready is bounded by
            # READY_TIMEOUT_S; a budget per worker would end a long build after a few unrelated kills.
            actor = ray.remote(worker).options(max_restarts=-1, **options)
            self.slots = [ActorSlot(i, actor.remote(teacher, plan.device, plan.threads)) for i in range(plan.workers)]
        self.info: dict[int, dict[str, Any]] = {}
        self.created = time.perf_counter()
        self.first_ready: float | None = None  # perf_counter when the first worker had its teacher loaded
        self.gcs = ray.get_runtime_context().gcs_address
        self.checked, self.unreachable_since = 0.0, None

    def check_cluster(self, committed: int) -> None:
        """Raise ClusterLost once the cluster's GCS has refused or ignored connections for
        CLUSTER_LOST_S (probed at most every POLL_S): without its head, Ray would let the driver
        wait on workers that never come back, then end the process with its own log line."""
        now = time.monotonic()
        if now - self.checked < POLL_S and self.unreachable_since is None:
            return
        self.checked = now
        host, _, port = self.gcs.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=POLL_S).close()
            self.unreachable_since = None
            return
        except OSError as e:
            why = e.strerror or str(e) or type(e).__name__
        if self.unreachable_since is None:
            self.unreachable_since = now
            logger.warning(f"cache: the Ray cluster's GCS at {self.gcs} does not answer ({why}); "
                     f"giving it {CLUSTER_LOST_S:.0f}s")
        if now - self.unreachable_since >= CLUSTER_LOST_S:
            raise ClusterLost(
                f"lost the Ray cluster at {self.gcs}: its GCS has not answered for {CLUSTER_LOST_S:.0f}s "
                f"({why}; the head node died or cannot be reached); {committed} shard(s) of this run are "
                "committed in the manifest; start the cluster again and rerun the build to compute the rest")
        time.sleep(0.5)

    def run(self, tasks: list[ShardTask], on_result: Callable[[ShardTask, ShardEntry], None]) -> None:
        """Run every task once to success; call `on_result` (in the driver) as each finishes."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        pending = deque(tasks)
        self.work: dict[int, _Work] = {}
        self.owner: dict[Any, int] = {}  # outstanding ref -> its slot
        for i in range(len(self.slots)):
            self._wait_on(i, self.slots[i].wake())
        idle: list[int] = []
        alive = set(range(len(self.slots)))
        last_error = ""
        since = time.monotonic()
        committed = 0
        while pending or any(w.task is not None for w in self.work.values()):
            self.check_cluster(committed)
            while pending and idle:
                i = idle.pop()
                task = pending.popleft()
                self._wait_on(i, self.slots[i].submit(task), task)
            if not alive:
                raise CacheError(f"every cache worker died; last error: {last_error}")
            for i, w in self.work.items():
                if w.task is None:
                    self.slots[i].check_placed()
            done, _ = ray.wait(list(self.owner), num_returns=1, timeout=POLL_S)
            if not done:
                if not idle and time.monotonic() - since > READY_TIMEOUT_S and all(
                        w.task is None for w in self.work.values()):
                    raise CacheError(
                        f"no cache worker started within {READY_TIMEOUT_S:.0f}s; the pool asks "
                        f"{self.plan.num_cpus} CPU and {self.plan.num_gpus} GPU per actor, the cluster has "
                        f"{ray.cluster_resources()}"
                    )
                continue
            i = self.owner.pop(done[0])
            slot, w = self.slots[i], self.work[i]
            try:
                w.values[done[0]] = ray.get(done[0])
            except RayError as e:
                self._forget(i)
                if w.task is None:  # its start failed
                    if slot.retry_start(e):
                        self._wait_on(i, slot.wake())
                    else:
                        alive.discard(i)
                        last_error = slot.why_gone(_last_line(e))
                        logger.warning(f"cache: {slot.name} is gone: {last_error}")
                    continue
                task = w.task
                if isinstance(e, RayTaskError):
                    if isinstance(_cause(e), (LogsError, StorageError)):  # the user's to fix: one line
                        raise _cause(e) from None
                    if not slot.lost(e):
                        raise
                # the worker died (SIGKILL, OOM, lost node), or a member of its group: retry the shard
                why = "" if slot.restarted_by_ray else f": {_last_line(e)}; rebuilding the group"
                self._wait_on(i, slot.wake())  # back in the pool once restarted (a group: rebuilt)
                if w.refs[0] in w.values:  # its leader had committed the shard: done, nothing to retry
                    logger.warning(f"cache: {slot.name} died after committing {task.log_path}{why}")
                    on_result(task, w.values[w.refs[0]])
                    committed += 1
                    continue
                if task.attempt >= self.max_attempts:
                    raise CacheError(
                        f"{task.log_path}: a worker died on this shard {task.attempt} times; last: {_last_line(e)}"
                    ) from None
                logger.warning(f"cache: {slot.name} died on {task.log_path} (attempt {task.attempt}){why}; "
                               "retrying the shard")
                task.attempt += 1
                pending.appendleft(task)
                continue
            if any(r in self.owner for r in w.refs):
                continue  # the rest of its group
            del self.work[i]
            idle.append(i)
            if w.task is None:
                self.info[i] = w.values[w.refs[0]]  # the leader's record, for a group
                self.first_ready = self.first_ready or time.perf_counter()
                slot.started()
                since = time.monotonic()
                continue
            on_result(w.task, w.values[w.refs[0]])
            committed += 1

    def memory(self) -> dict[int, list[dict[str, Any]]]:
        """Each live slot's actors' peak RSS (distkd.memory), in rank order: a figure, so the slots
        that have not all answered within MEMORY_TIMEOUT_S (in all) are left out, never failed for."""
        import ray

        refs = {i: [a.memory.remote() for a in slot.actors()] for i, slot in enumerate(self.slots)}
        every = [r for rs in refs.values() for r in rs]
        ready = set(ray.wait(every, num_returns=len(every), timeout=MEMORY_TIMEOUT_S)[0]) if every else set()
        out = {}
        for i, rs in refs.items():
            try:
                if not all(r in ready for r in rs):
                    raise TimeoutError(f"no answer within {MEMORY_TIMEOUT_S:.0f}s")
                out[i] = ray.get(rs)
            except Exception as e:  # a figure only: the build's result stands
                logger.warning(f"cache: no memory figures from {self.slots[i].name}: {_last_line(e)}")
        return out

    def _wait_on(self, i: int, refs: list[Any], task: ShardTask | None = None) -> None:
        self.work[i] = _Work(refs, task)
        self.owner.update((r, i) for r in refs)

    def _forget(self, i: int) -> None:
        """Stop waiting on slot i (the rest of a group that failed: its actors are killed)."""
        for r in self.work.pop(i).refs:
            self.owner.pop(r, None)

    def close(self) -> None:
        for slot in self.slots:
            slot.close()
