"""Per-rank training checkpoints, committed atomically.

Layout: `<dir>/step-00001234/rank-00000.pt ... rank-0000N.pt` and `COMMITTED`.
Each rank writes its own shard of the state (its embedding shards, the dense
weights, the fused and dense optimizer state, the loader position and RNG states)
to a temporary name, fsyncs and renames it; after a barrier rank 0 writes the
`COMMITTED` marker the same way. A directory without the marker is ignored (and
cleaned up), so a crash mid-save never leaves a checkpoint a resume would trust.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distkd.storage import atomic_write_bytes

MARKER = "COMMITTED"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def save(root: str | Path, step: int, state: dict[str, Any], rank: int, world_size: int, keep: int = 2) -> Path:
    """Collective: every rank writes its state; rank 0 commits. Returns the step directory."""
    root = Path(root)
    d = step_dir(root, step)
    atomic_write_bytes(d / f"rank-{rank:05d}.pt", lambda fh: torch.save(state, fh))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        meta = {"step": step, "world_size": world_size}
        atomic_write_bytes(d / MARKER, lambda fh: fh.write(json.dumps(meta).encode()))
        for old in committed(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return d


def committed(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())


def latest(root: str | Path) -> Path | None:
    found = committed(root)
    return found[-1] if found else None


def load(step_path: Path, rank: int, world_size: int) -> dict[str, Any]:
    meta = json.loads((step_path / MARKER).read_text())
    if meta["world_size"] != world_size:
        raise ValueError(
            f"{step_path}: checkpoint was written by {meta['world_size']} ranks, this run has {world_size}; "
            "resume with the same number of processes"
        )
    # Our own files, written by this code: full unpickling is needed for sharded tensors.
    return torch.load(step_path / f"rank-{rank:05d}.pt", weights_only=False)
