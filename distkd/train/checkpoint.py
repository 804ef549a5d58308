"""Training checkpoints through torch.distributed.checkpoint (DCP): sharded, resharding, safe.

    <out>/checkpoints/step-00001234/   .metadata, __R_0.distcp (DCP), rank-R.json, COMMITTED

What a checkpoint holds:
* tensors, through DCP: the model's state dict (TorchRec's sharded tables as ShardedTensors,
  data-parallel tables and dense layers once), and the optimizers' state: the fused tables'
  row-wise Adagrad accumulators (sharded), those of data-parallel tables (under the same
  name, `<table>/row_sum`, so a table may change plan between runs) and Adam's moments;
* JSON, never pickles: COMMITTED (step, world size, the run's identity, the trainer's and the
  loader's state, the schema a warm start compares with) and rank-R.json (each rank's RNG states).

DCP stores every tensor as chunks with their global offsets, so a checkpoint written by N
ranks loads on M: each rank reads the chunks overlapping the shards its own plan gives it
(tested 2 -> 1 and 1 -> 2 on gloo, table-wise, column-wise and data-parallel tables mixed).
The loader's position reshards too (see distkd.data.plan).

Commit: every rank writes into `.step-N.partial/` (DCP fsyncs its files), then rank 0 adds
COMMITTED and renames the folder to `step-N/` in one rename; a folder without the marker is
never trusted, and the last `keep` committed checkpoints are kept, older ones deleted only
after a newer one is committed. Loading reads DCP's `.metadata` with an unpickler that only
builds DCP's own metadata classes, and refuses checkpoints holding pickled objects, so
nothing in a checkpoint folder can run code (distkd.dcp_reader, shared with sharded exports).
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp


from distkd.dcp_reader import SafeReader
from distkd.dcp_writer import TensorAtATimeWriter
from distkd.errors import CheckpointError
from distkd.models.sharded_export import is_table
from distkd.storage import atomic_write_bytes, replace_dir

MARKER = "COMMITTED"
FORMAT = 2
PARTIAL = ".partial"


# -- what is saved ------------------------------------------------------------------------


def optimizer_tensors(optimizer) -> dict[str, Any]:
    """The optimizers' state as `{param}/{name}` tensors, table accumulators under one name
    whatever the plan (fused: `<table>.momentum1` [rows]; data-parallel: `sum` [rows, 1])."""
    out: dict[str, Any] = {}
    for param, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if is_table(param):
                if name == "step":  # row-wise Adagrad's step only feeds lr_decay, which is 0
                    continue
                if name == "sum" or name.endswith(".momentum1"):
                    name = "row_sum"
                    if len(value.size()) == 2:  # data-parallel [rows, 1]: a view, so loading fills the state
                        value = value.view(-1)
            if not isinstance(value, torch.Tensor):  # ShardedTensor is a Tensor subclass
                raise CheckpointError(f"optimizer state {param}/{name} is a {type(value).__name__}, not a tensor")
            out[f"{param}/{name}"] = value
    return out


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# -- the checkpoint folder --------------------------------------------------------------------


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def committed(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())


def latest(root: str | Path) -> Path | None:
    found = committed(root)
    return found[-1] if found else None


def read_marker(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {MARKER}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')}, this distkd reads {FORMAT}")
    return meta


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def identity_diff(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    a, b = _flat(saved), _flat(ours)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _reason(e: BaseException) -> str:
    """The OS error under a DCP failure (DCP wraps each rank's exception), else the message."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e).split())
    return "No space left on device" if "No space left on device" in text else text[:300]


class Checkpointer:
    """Collective save and load of a run's checkpoints under `root` (see the module docstring)."""

    def __init__(self, root: str | Path, rank: int, world_size: int, identity: dict[str, Any], keep: int = 2):
        self.root, self.rank, self.world = Path(root), rank, world_size
        self.identity, self.keep = identity, max(1, keep)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def save(self, step: int, tensors: dict[str, Any], state: dict[str, Any]) -> Path:
        """Collective: write `tensors` (DCP) and `state` (JSON); rank 0 commits. Returns the folder."""
        final = step_dir(self.root, step)
        partial = final.with_name(f".{final.name}{PARTIAL}")
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash mid-save
            partial.mkdir(parents=True)
        self._barrier()
        try:
            dcp.save(tensors, storage_writer=TensorAtATimeWriter(partial, sync_files=True))  # never the shards twice
            atomic_write_bytes(partial / f"rank-{self.rank:05d}.json",
                               lambda fh: fh.write(json.dumps(rng_state()).encode()))
            self._barrier()
            if self.rank == 0:
                meta = {"format": FORMAT, "step": step, "world_size": self.world, "identity": self.identity, **state}
                self._commit(partial, final, meta)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a full disk, a lost mount (DCP's CheckpointException is a BaseException):
            # nothing is published, the last commit stays
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)  # frees what was written; it was never trusted
            prev = committed(self.root)
            raise CheckpointError(
                f"{final}: cannot write the checkpoint: {_reason(e)}; nothing of it is published, the last committed "
                f"checkpoint ({prev[-1].name if prev else 'none'}) is the one `--resume` uses") from None
        if self.rank == 0:
            for old in committed(self.root)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def _commit(self, partial: Path, final: Path, meta: dict[str, Any]) -> None:
        """Rank 0: the marker, then one rename publishes the checkpoint."""
        atomic_write_bytes(partial / MARKER, lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
        replace_dir(partial, final)  # the same step again (a rerun of a finished run) is replaced

    def check(self, path: Path) -> dict[str, Any]:
        """The marker of checkpoint `path`, if it belongs to this run and its DCP metadata reads
        safely (else CheckpointError)."""
        meta = read_marker(path)
        if diff := identity_diff(meta.get("identity", {}), self.identity):
            raise CheckpointError(f"{path}: a checkpoint of another run ({'; '.join(diff[:4])}); resume from a "
                                  "checkpoint of this job, or train into a new out directory")
        SafeReader(path).read_metadata()  # here, so its error is ours, not wrapped by DCP's collectives
        return meta

    def load(self, path: Path, tensors: dict[str, Any]) -> dict[str, Any]:
        """Collective: fill `tensors` in place from `path` (any world size); restore this rank's
        RNG if it saved one; return the marker's state."""
        meta = self.check(path)
        try:
            dcp.load(tensors, storage_reader=SafeReader(path))
        except CheckpointError:
            raise
        except Exception as e:  # DCP wraps rank failures; say which checkpoint and what
            raise CheckpointError(f"{path}: cannot load: {' '.join(str(e).split())[:500]}") from None
        rng = path / f"rank-{self.rank:05d}.json"
        if rng.is_file():
            set_rng_state(json.loads(rng.read_text()))
        return meta
