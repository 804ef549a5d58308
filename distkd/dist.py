"""The process group a rank trains in, built from whatever launched it.

Launchers (torchrun, the in-process elastic launcher, Slurm's srun + torchrun, Kubeflow's
PyTorchJob) set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; Ray Train builds the group
itself. A process with no launcher gets a one-rank gloo group of its own, so every code
path is the distributed one.

Restarts. torchrun's agent keeps its TCPStore (the rendezvous store, shared with the
workers: TORCHELASTIC_USE_AGENT_STORE) across worker restarts. `init_process_group` on that
store under its default prefix makes a restarted generation read the keys the dead one
left (gloo's peer addresses): the new ranks dial ports of dead processes ("Connection
refused" in connectFullMesh) or wait for keys that never change. So the group is built on
that store under a prefix per run and restart generation (TORCHELASTIC_RUN_ID,
TORCHELASTIC_RESTART_COUNT). Every wait is bounded by `timeout_s`.
"""

from __future__ import annotations

import datetime
import os
import socket
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distkd.errors import ProcessGroupError
from distkd.log import quiet

DEFAULT_TIMEOUT_S = 600.0


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    restart: int = 0  # the launcher's restart generation (0: the first start)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def restart_generation() -> int:
    """How many times the launcher restarted this worker group (torchrun and the local launcher)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The launcher's store (agent-hosted under torchrun, else hosted by rank 0), prefixed by
    run and restart generation."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = tcp_store(addr, port, rank, world, timeout, is_master=not agent and rank == 0)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return dist.PrefixStore(f"distkd/{run}/gen{restart_generation()}/", store)


def tcp_store(addr: str, port: int, rank: int, world: int, timeout: datetime.timedelta,
              is_master: bool) -> dist.TCPStore:
    """A rendezvous store: hosted here (`is_master`; port 0 picks a free one, see `.port`) or
    reached at addr:port within `timeout`, else ProcessGroupError."""
    try:
        return dist.TCPStore(addr, port, world, is_master=is_master, timeout=timeout, wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        raise ProcessGroupError(
            f"rank {rank}/{world}: cannot reach the rendezvous store at {addr}:{port} within "
            f"{timeout.total_seconds():.0f}s ({' '.join(str(e).split())[:300]})"
        ) from None


def join(store: dist.Store, rank: int, world: int, backend: str, timeout_s: float) -> None:
    """Form the default process group over `store`. The rendezvous and every later collective
    are bounded by `timeout_s`: a group that cannot form is a ProcessGroupError, never a hang."""
    try:
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistBackendError) as e:
        raise ProcessGroupError(
            f"rank {rank}/{world} (restart {restart_generation()}): the {backend} process group did not form "
            f"within {timeout_s:.0f}s: {' '.join(str(e).split())[:400]}"
        ) from None


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Env:
    """Join (or create) the default process group; idempotent.

    nccl with one GPU per local rank where CUDA is available, gloo on CPU. A rendezvous or a
    collective that cannot complete fails after `timeout_s` with a message, never hangs.
    """
    quiet()
    launched = under_launcher()
    if dist.is_initialized():  # Ray Train (or a caller) built it
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
    else:
        rank = int(os.environ["RANK"]) if launched else 0
        world = int(os.environ["WORLD_SIZE"]) if launched else 1
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if launched:
            store = _store(rank, world, timeout)
        else:
            # A one-rank group of our own, leaving the environment as it was (a later
            # launch must not mistake this process for a launched rank).
            store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
        join(store, rank, world, backend, timeout_s)
    return Env(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
               restart=restart_generation())


def shutdown() -> None:
    """Leave the group together (a barrier first)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abandon() -> None:
    """Leave the group on an error, without waiting for ranks that may never come."""
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: all held open while they are drawn (free_port called n times
    may hand out one port twice, and a process given the same port for two servers fails)."""
    with ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def gather_objects(obj, world_size: int) -> list:
    """Collective: every rank's picklable `obj`, in rank order, on every rank ([obj] alone when
    there is no process group or one rank)."""
    if not dist.is_initialized() or world_size == 1:
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out

