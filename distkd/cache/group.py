"""Teacher groups: one teacher copy sharded over K Ray actors (`teacher_ranks: K`), to the cache
build one worker.

    driver (pool.py)                   a group: K actors in one placement group (PACK)
    placement group of K bundles       rank 0, the leader, hosts the rendezvous store (a TCPStore
    K × join(the leader's address)       on a free port) and returns its node's address and port;
                                       every rank joins the group's gloo (nccl on GPUs) process
                                         group through it, every wait bounded (distkd.dist.join);
                                       every rank loads the teacher into DistributedModelParallel
                                         under a K-rank plan (table-/column-wise on CPU, the
                                         planner's choice on GPUs), each reading its own shards
                                         of the export through DCP, whatever world size wrote it
    K × build(one log shard)           every rank reads the shard's row groups and cuts the same
                                         batches; each batch's rows are split among the ranks
                                         (rows [r·c, (r+1)·c), c = ceil(B/K), the last ranks'
                                         shares padded by repeating the batch's last row: every
                                         rank runs the same number of rows, as TorchRec's
                                         all-to-alls need); each rank runs its share through the
                                         sharded teacher; the outputs are gathered to the leader
                                         in rank order (= row order) and the padding dropped
                                       the leader checks, encodes, writes and commits the file
                                         (worker.compute_shard): the same file, manifest entry
                                         and exactly-once protocol as a one-actor worker

Every rank reads the shard itself rather than the leader reading and broadcasting it: the shard
is on storage every node sees, and the leader decodes every row anyway (the row checks and the
example_id checksums of the file's footer), so a broadcast would not shorten the leader's path;
it would add K-1 copies of every batch to the network and a pickled broadcast per batch. Reading
in parallel costs K reads and decodes of each shard, small next to a large teacher's forward.

Faults. A member that dies (SIGKILL, OOM, a lost node) makes the others' next collective fail
(its connections close; at worst the group's timeout): they raise GroupBroken. The driver, on
whichever it sees first (the dead actor or a GroupBroken), kills every member, charges the shard
one attempt, starts K new actors in the same placement group and resubmits the shard. A group
that cannot be placed within `group_timeout_s` (more ranks than the cluster holds, a node lost
with no room left for its bundles) stops the build with one line naming K and the resources.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from typing import Any, Optional

import ray
import torch
import torch.distributed as dist
from ray.exceptions import RayError, RayTaskError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torchrec.distributed.planner.types import PlannerError
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from distkd.cache.content import codec_for
from distkd.cache.contract import CacheError, ShardEntry
from distkd.cache.worker import CacheWorker, ShardReader, ShardTask, check_unchanged, compute_shard
from distkd.data.schema import LogsError, Schema
from distkd.dist import Env, join, tcp_store
from distkd.models.sharding_plan import ShardingConfig, describe_plan, shard_for_inference
from distkd.models.teacher import Teacher, TeacherOutput, _unpack
from distkd.storage import StorageError

logger = logging.getLogger(__name__)

PLACEMENT_POLL_S = 2.0  # how often the driver asks the GCS whether a starting group is placed


class GroupBroken(RuntimeError):
    """A collective of a teacher group failed: a member died or stopped answering."""


def share(rows: int, ranks: int, rank: int) -> torch.Tensor:
    """The batch rows rank `rank` of `ranks` runs: ceil(rows/ranks) of them, in order, the
    shares past the batch's end padded with its last row."""
    c = -(-rows // ranks)
    return torch.arange(rank * c, (rank + 1) * c).clamp_(max=rows - 1)


def take_rows(kjt: KeyedJaggedTensor, rows: torch.Tensor) -> KeyedJaggedTensor:
    """The rows `rows` (batch indices, repeats allowed) of a key-major KeyedJaggedTensor."""
    b, keys = kjt.stride(), kjt.keys()
    lengths, offsets = kjt.lengths().long(), kjt.offsets().long()
    bags = (torch.arange(len(keys), device=rows.device)[:, None] * b + rows[None, :]).reshape(-1)
    new = lengths[bags]
    ends = new.cumsum(0)
    starts = offsets[bags]
    pos = (torch.arange(int(ends[-1]) if len(ends) else 0, device=rows.device)
           + (starts - (ends - new)).repeat_interleave(new))
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor(keys=keys, values=kjt.values()[pos], lengths=new.to(kjt.lengths().dtype),
                             weights=None if weights is None else weights[pos], stride=len(rows))


class GroupForward:
    """The teacher of one rank of a group, called by every rank on the same batch: this rank's
    share of the rows through the sharded teacher, the shares gathered to rank 0. Rank 0 gets
    the batch's output (checked as a one-process teacher's is), the other ranks None."""

    def __init__(self, teacher: Teacher, rank: int, ranks: int):
        self.teacher, self.rank, self.ranks = teacher, rank, ranks

    def __call__(self, sparse: KeyedJaggedTensor, dense: torch.Tensor, hidden: bool = False) -> Optional[TeacherOutput]:
        n = dense.shape[0]
        rows = share(n, self.ranks, self.rank).to(dense.device)
        # no_grad, not inference mode: fbgemm's CPU lookup behind a sharded table has no kernel there
        with torch.inference_mode(False), torch.no_grad():
            logits, hid = _unpack(self.teacher.module(take_rows(sparse, rows), dense[rows]))
        local = torch.cat([logits.float(), hid.float()] if hidden else [logits.float()], dim=1).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.ranks)] if self.rank == 0 else None
        dist.gather(local, parts, dst=0)
        if parts is None:
            return None
        out = torch.cat(parts)[:n]
        t = logits.shape[1]
        return self.teacher.check((out[:, :t], out[:, t:] if hidden else None), n, hidden)


@torch.inference_mode()
def follow(forward: GroupForward, schema: Schema, task: ShardTask, device: torch.device, on_row_group) -> None:
    """A rank other than the leader: the shard's batches, as the leader cuts them, through `forward`."""
    check_unchanged(task)
    hidden = codec_for(task.content).hidden
    reader = ShardReader(task.log_path, schema, task.batch_size, task.prefetch)
    try:
        for g, _, _, batches in reader:
            for batch in batches:
                forward(batch.sparse.to(device), batch.dense.to(device), hidden=hidden)
            on_row_group(g)
    finally:
        reader.close()


class GroupWorker(CacheWorker):
    """Ray actor: rank `rank` of a teacher group of `ranks`. Its teacher is loaded in `join`,
    together with the other ranks, under the group's plan."""

    def __init__(self, teacher: Any, device: str, threads: int, rank: int, ranks: int, timeout_s: float):
        if device == "cuda":  # Ray gives the actor one GPU (CUDA_VISIBLE_DEVICES): it is cuda:0 here
            device = "cuda:0"
            torch.cuda.set_device(0)
        self.setup(device, threads)
        self.ref, self.rank, self.ranks, self.timeout_s = teacher, rank, ranks, timeout_s
        self.store: Optional[dist.TCPStore] = None
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "rank": rank}

    def address(self) -> tuple[str, int]:
        """The leader: host the group's rendezvous store on a free port; (node address, port)."""
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self.store = tcp_store("0.0.0.0", 0, self.rank, self.ranks, timeout, is_master=True)
        return ray.util.get_node_ip_address(), self.store.port

    def join(self, address: tuple[str, int]) -> dict[str, Any]:
        """Collective: form the group through the leader's store, load the teacher sharded over it."""
        host, port = address
        timeout = datetime.timedelta(seconds=self.timeout_s)
        store = self.store if self.store is not None else tcp_store(host, port, self.rank, self.ranks, timeout, False)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        join(store, self.rank, self.ranks, backend, self.timeout_s)
        env = Env(rank=self.rank, world_size=self.ranks, local_rank=0, device=self.device, backend=backend)
        try:
            self.load(self.ref, parallel=lambda m: shard_for_inference(m, env, ShardingConfig(), model_parallel=True))
        except PlannerError as e:
            raise CacheError(f"teacher_ranks={self.ranks}: the teacher does not fit a {self.ranks}-rank plan on "
                             f"{self.device.type} ({' '.join(str(e).split())[:300]}); raise teacher_ranks") from None
        members: list[Any] = [None] * self.ranks
        me = {"host": self.info["host"], "pid": self.info["pid"], "node": ray.get_runtime_context().get_node_id()}
        dist.all_gather_object(members, me)
        self.forward = GroupForward(self.teacher, self.rank, self.ranks)
        self.info.update(rank=self.rank, ranks=self.ranks, members=members, plan=describe_plan(self.teacher.module))
        return self.info

    def build(self, task: ShardTask) -> Optional[ShardEntry]:
        """The leader writes and commits the shard (its entry); the other ranks return None."""
        self.check_teacher(task)
        try:
            if self.rank == 0:
                return compute_shard(self.forward, self.schema, task, self.device, self.info, self.on_row_group)
            follow(self.forward, self.schema, task, self.device, self.on_row_group)
            return None
        except (LogsError, StorageError):  # the shard's own (CacheError included): stops the build
            raise
        except Exception as e:  # a collective that failed: another member died, or the group timed out
            line = (str(e).strip().splitlines() or [""])[0][:300]
            raise GroupBroken(f"rank {self.rank}/{self.ranks} ({self.info['host']}:{self.info['pid']}): "
                              f"{type(e).__name__}: {line}") from None


def group_class(worker: type) -> type:
    """A group member's actor class: GroupWorker, under a CacheWorker subclass's overrides (the
    build's test seam: its `on_row_group` runs on every rank)."""
    if worker is CacheWorker or issubclass(worker, GroupWorker):
        return GroupWorker if worker is CacheWorker else worker
    return type(worker.__name__, (worker, GroupWorker), {"__module__": worker.__module__})


class GroupSlot:
    """The driver's handle on one group (pool.WorkerPool's slot): its placement group, its K
    actors, rebuilt whole after a member is lost."""

    restarted_by_ray = False

    def __init__(self, index: int, worker: type, options: dict[str, Any], teacher: Any, plan: Any,
                 timeout_s: float, max_starts: int):
        self.index, self.plan, self.teacher, self.timeout_s, self.max_starts = index, plan, teacher, timeout_s, max_starts
        self.actor, self.options = ray.remote(group_class(worker)), options
        self.bundle = {"CPU": plan.num_cpus, **({"GPU": plan.num_gpus} if plan.num_gpus else {})}
        # PACK: the ranks on as few nodes as fit (the all-to-alls stay local), spread when they must
        self.pg = placement_group([dict(self.bundle)] * plan.ranks, strategy="PACK")
        self.members: list[Any] = []
        self.starts = 0  # failed starts in a row
        self.unplaced_since: Optional[float] = time.monotonic()
        self.checked = 0.0
        self.name = f"group {index} ({plan.ranks} ranks)"

    def wake(self) -> list[Any]:
        """Start K new actors in the placement group (the old ones killed); their join refs."""
        self.kill()
        self.members = [
            self.actor.options(**self.options, max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=r)).remote(
                self.teacher, self.plan.device, self.plan.threads, r, self.plan.ranks, self.timeout_s)
            for r in range(self.plan.ranks)]
        address = self.members[0].address.remote()  # Ray hands it to every join once the leader is up
        return [m.join.remote(address) for m in self.members]

    def submit(self, task: ShardTask) -> list[Any]:
        return [m.build.remote(task) for m in self.members]

    def actors(self) -> list[Any]:
        return list(self.members)

    def retry_start(self, e: RayError) -> bool:
        """After a start that failed: start again? Not after the group's own error (a teacher
        that does not fit the plan, a wrong fingerprint), nor after max_starts in a row."""
        if isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), LogsError):
            return False
        self.starts += 1
        return self.starts < self.max_starts

    def started(self) -> None:
        self.starts = 0

    def why_gone(self, error: str) -> str:
        """The line a group that will not start leaves: K, the resources, the last failure."""
        return (f"teacher_ranks={self.plan.ranks}: {self.name} did not start ({error}); the Ray cluster has "
                f"{_cluster()}")

    def lost(self, e: RayError) -> bool:
        """A member died, or raised GroupBroken: the group is rebuilt and the shard retried."""
        return not isinstance(e, RayTaskError) or isinstance(getattr(e, "cause", None), GroupBroken)

    def check_placed(self) -> None:
        """While starting: CacheError once the placement group has not been placed for timeout_s."""
        now = time.monotonic()
        if now - self.checked < PLACEMENT_POLL_S:
            return
        self.checked = now
        state = placement_group_table(self.pg).get("state")
        if state == "CREATED":
            self.unplaced_since = None
            return
        self.unplaced_since = self.unplaced_since or now
        if now - self.unplaced_since > self.timeout_s:
            k = self.plan.ranks
            raise CacheError(
                f"teacher_ranks={k}: a teacher group of {k} actors × {self.bundle} could not be placed within "
                f"{self.timeout_s:.0f}s (placement group {state}); the Ray cluster has {_cluster()}: more ranks "
                "than it holds, or a node lost; lower teacher_ranks or add nodes")

    def kill(self) -> None:
        for m in self.members:
            ray.kill(m, no_restart=True)
        self.members = []

    def close(self) -> None:
        self.kill()
        remove_placement_group(self.pg)


def _cluster() -> str:
    """The cluster's resources, in a message: totals, live nodes, what is free."""
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    total, free = ray.cluster_resources(), ray.available_resources()
    cut = lambda r: ", ".join(f"{r.get(k, 0):g} {k}" for k in ("CPU", "GPU"))  # noqa: E731
    return f"{cut(total)} on {nodes} live node(s) ({cut(free)} free)"
