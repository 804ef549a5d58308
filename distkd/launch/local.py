"""N local ranks without torchrun: torch.distributed's elastic launcher, in process.

`launch(fn, nproc, *args)` starts `nproc` real processes (spawn) the way TorchRec's own
multi-rank tests do, with the same agent torchrun uses: a c10d rendezvous on a free port,
and with `max_restarts` a failed worker group (a rank that died, however it died) is
restarted whole, as under `torchrun --max-restarts`. The restarted ranks see
TORCHELASTIC_RESTART_COUNT > 0, and the trainer resumes from its last committed checkpoint.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable

from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from distkd.dist import DEFAULT_TIMEOUT_S, under_launcher
from distkd.errors import RankFailure


def launch(fn: Callable[..., Any], nproc: int, *args: Any, max_restarts: int = 0,
           timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Run `fn(*args)` in `nproc` local processes (ranks); return each rank's result.

    Already under a launcher, or with nproc == 1 and no restarts asked, `fn` runs in this
    process. `timeout_s` bounds the rendezvous (ranks that never arrive fail the launch).
    """
    if under_launcher() or (nproc <= 1 and max_restarts == 0):
        return [fn(*args)]

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"distkd-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # the c10d store picks a free port itself: no race
        rdzv_configs={"join_timeout": int(timeout_s)},
        max_restarts=max_restarts,
        monitor_interval=0.5,
        start_method="spawn",
    )
    # Ranks share the machine's cores: split them unless the user said otherwise. The children
    # inherit the environment, so set it for the launch only.
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))

    try:
        results = elastic_launch(config, entrypoint=fn)(*args)
    except ChildFailedError as e:
        raise RankFailure(describe_failure(e, max_restarts)) from None
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return [results[r] for r in sorted(results)]


def describe_failure(e, max_restarts: int) -> str:
    """One line per failed rank: how it ended, and its own error's last line where it raised one."""
    parts = []
    for rank, f in sorted(e.failures.items()):
        if f.exitcode < 0:
            parts.append(f"rank {rank} killed by {f.signal_name()}")
            continue
        msg = f.message if isinstance(f.message, str) else (f.message or {}).get("message", "")
        last = [line for line in str(msg).splitlines() if line.strip()]
        parts.append(f"rank {rank} exit {f.exitcode}" + (f": {last[-1].strip()[:300]}" if last else ""))
    return (f"{'; '.join(parts)} (after {max_restarts} restart(s)); what was committed is in the run's "
            "checkpoints: rerun with --resume")
