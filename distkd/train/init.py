"""Warm start: a new run whose weights start from an export or a committed checkpoint.

    init:
      path: runs/yesterday/student   # an export dir, a checkpoint dir, or a run dir (its latest checkpoint)
      optimizer: false               # also the optimizer state (from a checkpoint only)
      schema_change: refuse          # refuse | adapt: what to do when sparse features changed

Unlike `--resume` (the same run continued: its step, its loader position), a warm start is a
new run: step 0, a fresh loader plan, its own out directory; only the weights (and with
`optimizer: true` the row-wise Adagrad accumulators and Adam's moments) come from PATH. They
are loaded into the freshly sharded model on every rank: DCP sources (checkpoints, sharded
exports) reshard to any world size, a file export is sliced into the plan.

`plan_init` compares the source with the job before any rank starts (the preflight) and says
what loads how; the model config must be the same (fields that only shape the initialisation
aside). Sparse features added, removed or resized are refused naming each one, unless
`schema_change: adapt`: an added feature's table keeps its fresh initialisation, a removed
one's is dropped, a resized table takes the source's first min(old, new) rows (the rest keep
theirs), and the layers that read the interaction (the cross layers, the first deep layer of
the ranking model) take the source's weights for the columns both models have, by feature,
and zero for new ones, so the adapted model starts computing what the source did from the
features it kept. Dense features, tasks and hashing define what the dense layers and rows
mean: a change there is refused even with adapt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from distkd.config import ConfigError, to_dict
from distkd.data.schema import Schema
from distkd.models import build_model
from distkd.models.sharded_export import fill_from_full, is_table
from distkd.errors import CheckpointError
from distkd.train.checkpoint import identity_diff, optimizer_tensors
from distkd.train.init_source import PREFIX, InitSource, open_source

logger = logging.getLogger(__name__)

# Model config fields that shape no weight (only the fresh initialisation or the gradient).
NOT_SHAPED = ("embedding_init", "aux_grad_scale", "output_init_std")


@dataclass
class InitConfig:
    # Start this new run (step 0) from these weights: an export directory (file or sharded form),
    # a checkpoint directory (step-N/) or a run directory (its latest committed checkpoint).
    path: Optional[str] = None
    optimizer: bool = False  # also the optimizer state (Adagrad accumulators, Adam moments): a checkpoint's only
    # Sparse features added, removed or resized since the source: refuse naming them, or adapt
    # (new tables fresh, removed ones dropped, resized ones keep their first rows; docs/training.md)
    schema_change: Literal["refuse", "adapt"] = "refuse"


@dataclass
class InitPlan:
    source: InitSource
    optimizer: bool
    copy: list[str]  # keys loaded as they are
    rows: list[str]  # resized tables: the first min(old, new) rows
    columns: dict[str, tuple[int, list[int]]]  # interaction readers: (dim, source column of each column; -1 new)
    fresh: list[str]  # added features' tables: their fresh initialisation
    notes: list[str]  # what was adapted, one line per feature or layer


def _meta_model(schema: Schema, cfg) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(schema, cfg, device=torch.device("meta"))


def _feature(key: str) -> str:
    table = key.split(".embedding_bags.")[-1].split(".embeddings.")[-1].rsplit(".", 1)[0]
    return table.removeprefix("t_")


def _check_fixed(old: Schema, new: Schema, where: str) -> None:
    """What adapt cannot follow: dense features (the dense layer's input), tasks (the heads),
    a feature's hashing (what its rows mean)."""
    a, b = [f.name for f in old.dense], [f.name for f in new.dense]
    if a != b:
        added, removed = [n for n in b if n not in a], [n for n in a if n not in b]
        what = "; ".join([*(f"dense feature '{n}' added" for n in added), *(f"dense feature '{n}' removed" for n in removed)])
        raise ConfigError(f"{where}: {what or f'dense features reordered {a} -> {b}'}: the dense layers' input follows "
                          "them, so a warm start refuses this even with init.schema_change: adapt")
    a, b = [(t.name, t.kind, t.num_classes) for t in old.tasks], [(t.name, t.kind, t.num_classes) for t in new.tasks]
    if a != b:
        raise ConfigError(f"{where}: tasks changed {[t[0] for t in a]} -> {[t[0] for t in b]}: the heads follow them, "
                          "so a warm start refuses this even with init.schema_change: adapt")
    hashes = {f.name: to_dict(f.hash) for f in old.sparse}
    for f in new.sparse:
        if f.name in hashes and hashes[f.name] != to_dict(f.hash):
            raise ConfigError(f"{where}: sparse feature '{f.name}': its hash changed ({hashes[f.name]} -> "
                              f"{to_dict(f.hash)}), so its rows mean other ids; a warm start refuses this")


def _table_changes(src: dict, dst: dict, where: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """(added, removed, resized) table keys and one line per changed feature."""
    added = [k for k in dst if is_table(k) and k not in src]
    removed = [k for k in src if is_table(k) and k not in dst]
    resized = [k for k in dst if is_table(k) and k in src and src[k] != dst[k]]
    for k in resized:
        if src[k][1:] != dst[k][1:]:
            raise ConfigError(f"{where}: table {k} has shape {list(src[k])} in the source, {list(dst[k])} here")
    lines = [f"sparse feature '{_feature(k)}' added ({dst[k][0]} rows)" for k in added]
    lines += [f"sparse feature '{_feature(k)}' removed ({src[k][0]} rows)" for k in removed]
    lines += [f"sparse feature '{_feature(k)}' resized {src[k][0]} -> {dst[k][0]} rows" for k in resized]
    return added, removed, resized, lines


def plan_init(cfg: InitConfig, schema: Schema, model_cfg) -> InitPlan:
    """What loads how from `cfg.path` into a model of `schema` and `model_cfg`, or a
    ConfigError naming what the weights cannot follow. Reads metadata and shapes only."""
    src = open_source(cfg.path)
    where = f"init.path: {src.path}"
    if cfg.optimizer and src.kind != "checkpoint":
        raise ConfigError(f"{where}: init.optimizer: true needs a checkpoint (a run or step-N directory); an export "
                          "holds no optimizer state")
    diff = [d for d in identity_diff(src.model, to_dict(model_cfg)) if d.split(":")[0] not in NOT_SHAPED]
    if diff:
        raise ConfigError(f"{where}: the model differs ({'; '.join(f'model.{d}' for d in diff)}); a warm start needs "
                          "the same model config")
    if src.schema is not None:
        _check_fixed(src.schema, schema, where)
    target = _meta_model(schema, model_cfg)
    dst = {PREFIX + k: tuple(v.shape) for k, v in target.state_dict().items()}
    added, removed, resized, lines = _table_changes(src.shapes, dst, where)
    if lines and cfg.schema_change != "adapt":
        raise ConfigError(f"{where}: the schema's sparse features differ from the source's: {'; '.join(lines)}; a warm "
                          "start needs the same tables, or init.schema_change: adapt")
    notes = [f"{line}: {what}" for line, what in zip(lines, [
        *("its table keeps its fresh initialisation" for _ in added), *("its table is dropped" for _ in removed),
        *(f"the first {min(src.shapes[k][0], dst[k][0])} rows copied, "
          f"{'the rest freshly initialised' if dst[k][0] > src.shapes[k][0] else 'the rest dropped'}" for k in resized)])]
    readers = getattr(target, "interaction_readers", dict)()
    old_columns = _meta_model(src.schema, model_cfg).interaction_columns() if readers and src.schema else None
    copy, columns = [], {}
    for key, shape in dst.items():
        if is_table(key):
            if key not in added and key not in resized:
                copy.append(key)
            continue
        if key not in src.shapes:
            raise ConfigError(f"{where}: the source has no {key}")
        reads = readers.get(key[len(PREFIX):])
        if reads is not None and old_columns is not None:  # by feature: features may have come, gone or moved
            at = {c: i for i, c in enumerate(old_columns)}
            index = [at.get(c, -1) for c in target.interaction_columns()]
            if index != list(range(len(old_columns))):
                columns[key] = (reads, index)
                kept = sum(i >= 0 for i in index)
                notes.append(f"{key}: the interaction's columns mapped by feature: {kept} kept, "
                             f"{len(index) - kept} new (zero), {len(old_columns) - kept} dropped")
                continue
        if src.shapes[key] == shape and not (reads is not None and lines):
            copy.append(key)
            continue
        if reads is not None and src.schema is None:
            raise ConfigError(f"{where}: the checkpoint records no schema (written before COMMITTED held one), so "
                              f"{key}'s columns cannot be mapped by feature; init from its run's export instead")
        raise ConfigError(f"{where}: {key} has shape {list(src.shapes[key])} in the source, {list(shape)} here")
    if cfg.optimizer:
        have = {k.rpartition("/")[0] for k in src.optim_shapes}
        missing = [k for k in copy + resized + list(columns) if k not in have]
        if missing:
            raise ConfigError(f"{where}: the checkpoint holds no optimizer state for {missing[:3]}")
    return InitPlan(src, cfg.optimizer, copy, resized, columns, added, notes)


def _copy_rows(target: Any, full: torch.Tensor) -> None:
    """The first min(rows) rows of `full` into `target` (a ShardedTensor's local shards or a
    plain tensor); the rest of `target` stays as it is."""
    n = min(full.size(0), target.size(0))
    shards = target.local_shards() if hasattr(target, "local_shards") else None
    parts = ([(s.tensor, s.metadata.shard_offsets, s.metadata.shard_sizes) for s in shards] if shards is not None
             else [(target.detach(), [0] * target.dim(), list(target.size()))])
    for tensor, offsets, sizes in parts:
        lo, hi = offsets[0], min(offsets[0] + sizes[0], n)
        if hi > lo:
            index = (slice(lo, hi), *(slice(o, o + s) for o, s in zip(offsets[1:], sizes[1:])))
            tensor[: hi - lo].copy_(full[index])


def _remap(full: torch.Tensor, shape: torch.Size, dim: int, index: list[int]) -> torch.Tensor:
    """A tensor of `shape` whose column j (along `dim`) is `full`'s column index[j], zero where -1."""
    out = torch.zeros(shape, dtype=full.dtype)
    kept = [j for j, i in enumerate(index) if i >= 0]
    out.index_copy_(dim, torch.tensor(kept, dtype=torch.long),
                    full.index_select(dim, torch.tensor([index[j] for j in kept], dtype=torch.long)))
    return out


def load_init(plan: InitPlan, dmp: torch.nn.Module, optimizer) -> None:
    """Collective: fill the freshly sharded `dmp` (and with plan.optimizer, `optimizer`) from
    the plan's source, on every rank, under this world's plan."""
    src = plan.source
    state = dmp.state_dict()
    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    after: list[tuple[Any, torch.Tensor, Optional[tuple[int, list[int]]]]] = []

    def request(into: dict, key: str, target: Any, shape: tuple[int, ...], param: str) -> None:
        if param in plan.rows or (param in plan.columns and target.dim() > 0):
            into[key] = buffer = torch.empty(shape, dtype=target.dtype)
            after.append((target, buffer, plan.columns.get(param)))
        else:
            into[key] = target

    for key in (*plan.copy, *plan.rows, *plan.columns):
        request(model, key, state[key], src.shapes[key], key)
    if plan.optimizer:
        # TorchRec's keyed optimizers load only into initialized state: create it (no step is
        # taken, the weights stay as they are), then fill it in place, as resume does.
        optimizer.init_state()
        optimizer.zero_grad()
        for key, target in optimizer_tensors(optimizer).items():
            param = key.rpartition("/")[0]
            if param in plan.fresh:
                continue
            if key not in src.optim_shapes:
                raise CheckpointError(f"{src.path}: holds no optimizer state {key}")
            request(optim, key, target, src.optim_shapes[key], param)
    src.read(model, optim)
    for target, full, mapping in after:
        if mapping is None:
            _copy_rows(target, full)
        else:
            fill_from_full(target, _remap(full, target.size(), *mapping))
    dmp.load_state_dict(state)
