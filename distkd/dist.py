"""Process groups and launching: torchrun-compatible, or N local ranks without torchrun.

Under torchrun (or any launcher that sets RANK/WORLD_SIZE/MASTER_ADDR) a stage's
worker runs directly. Locally, `launch(fn, nproc, ...)` starts `nproc` real
processes through torch.distributed's elastic launcher, the way TorchRec's own
multi-rank tests do.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def quiet() -> None:
    """Silence the planner's and DDP's routine warnings; errors still surface."""
    import logging
    import warnings

    for name in ("", "torchrec", "torch.distributed", "torch.fx", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def init(backend: str | None = None) -> Env:
    """Initialize the default process group from the launcher's environment (idempotent).

    nccl with one GPU per local rank where CUDA is available, gloo on CPU. A single
    process with no launcher still gets a (one-rank) gloo group, so every code path
    is the distributed one.
    """
    quiet()
    launched = under_launcher()
    rank = int(os.environ["RANK"]) if launched else 0
    world = int(os.environ["WORLD_SIZE"]) if launched else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
        else:
            # A one-rank group of our own, leaving the environment as it was (a later
            # launch() must not mistake this process for a launched rank).
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1)
    return Env(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn: Callable[..., Any], nproc: int, *args: Any) -> list[Any]:
    """Run `fn(*args)` in `nproc` local processes (ranks); return each rank's result.

    Already under a launcher, or with nproc == 1, `fn` runs in this process.
    """
    if under_launcher() or nproc <= 1:
        return [fn(*args)]
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"distkd-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # the c10d store picks a free port itself: no race
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    # Ranks share the machine's cores: split them unless the user said otherwise. The children
    # inherit the environment, so set it for the launch only.
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        results = elastic_launch(config, entrypoint=fn)(*args)
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return [results[r] for r in sorted(results)]
