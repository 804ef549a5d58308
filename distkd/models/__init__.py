"""Models built from the schema: the CTR ranking family and the next-item (retrieval) family.

    model:
      kind: ranking      # DLRM / DCN-v2, one logit per binary task (distkd.models.ranking)
      kind: next_item    # history pooling, a softmax over the catalog (distkd.models.next_item)

`build_model`, `count` and `initialize` dispatch on the config's kind, so the trainer, the
export and the teacher contract never name a model class.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

import pyarrow.compute as pc

from distkd.config import ConfigError
from distkd.data.schema import Schema
from distkd.models.next_item import NextItemConfig, NextItemModel, count_parameters as _count_next_item
from distkd.models.ranking import ModelConfig, RankingModel, count_parameters as _count_ranking
from distkd import storage
from distkd.data.rows import column_floats

ModelSpec = Union[ModelConfig, NextItemConfig]  # `kind:` picks one (ranking is the default)


def _item_task(schema: Schema):
    if len(schema.classes) != 1 or schema.binary:
        raise ConfigError("model.kind next_item needs logs with exactly one multiclass task (the next item) and "
                          f"no binary ones; these have {schema.task_names}")
    task = schema.classes[0]
    if not task.item_feature:
        raise ConfigError(f"task '{task.name}': model.kind next_item needs item_feature (the history feature)")
    return task


def _check_ranking(schema: Schema) -> None:
    if schema.classes:
        raise ConfigError(f"model.kind ranking scores binary tasks; task(s) {[t.name for t in schema.classes]} are "
                          "multiclass: use model: {kind: next_item}")


def build_model(schema: Schema, cfg: ModelSpec, device: Optional[torch.device] = None,
                sparse_device: Optional[torch.device] = None) -> torch.nn.Module:
    """The model of `cfg` for `schema`; its TorchRec tables on meta unless `sparse_device`."""
    if isinstance(cfg, NextItemConfig):
        task = _item_task(schema)
        model = NextItemModel(schema.sparse, task.num_classes, cfg, task.item_feature, len(schema.dense),
                              device=device, sparse_device=sparse_device)
        model.schema = schema  # as RankingModel: what the teacher contract and exports read
        return model
    _check_ranking(schema)
    return RankingModel(schema, cfg, device=device, sparse_device=sparse_device)


def count(schema: Schema, cfg: ModelSpec) -> dict[str, int]:
    """Parameter counts without materializing the tables (embedding, dense, total)."""
    if isinstance(cfg, NextItemConfig):
        task = _item_task(schema)
        return _count_next_item(schema.sparse, task.num_classes, cfg, len(schema.dense), task.item_feature)
    return _count_ranking(schema, cfg)


def _first_row_groups(schema: Schema, files: list[str], columns: list[str], max_files: int = 8):

    for path in files[:max_files]:
        with storage.open_parquet(path) as pf:
            yield pf.read_row_group(0, columns=columns)


def label_rates(schema: Schema, files: list[str], max_files: int = 8) -> list[float]:
    """Each binary task's positive rate in the first row group of up to `max_files` shards (cheap
    at any scale; labels that are null or NaN, unlabeled rows, are left out)."""

    pos, n = np.zeros(len(schema.binary)), np.zeros(len(schema.binary))
    for table in _first_row_groups(schema, files, schema.binary_labels, max_files):
        for i, col in enumerate(schema.binary_labels):
            y = column_floats(table, col)  # bool, any int or float labels; NaN (null) = no label
            y = y[~np.isnan(y)].astype(np.float64)
            pos[i], n[i] = pos[i] + y.sum(), n[i] + len(y)
    return [float(np.clip(p / max(k, 1.0), 1e-4, 1 - 1e-4)) if k else 0.5 for p, k in zip(pos, n)]


def set_prior(model: RankingModel, rates: list[float]) -> None:
    """Start the heads at the base rates' log-odds: from a zero bias (p = 0.5) Adam moves the
    bias at most ~lr a step, and a CTR model would spend its one pass still learning the base rate
    (it showed as over-prediction, calibration ~1.1)."""
    logit = torch.tensor([math.log(r / (1 - r)) for r in rates])
    with torch.no_grad():
        for head in (model.head, model.aux_head):
            if head is not None:
                head.bias.copy_(logit.to(head.bias.device))


def item_log_prior(schema: Schema, files: list[str], max_files: int = 8) -> torch.Tensor:
    """log of each item's (add-one smoothed) frequency as a label in the first row groups."""

    task = schema.classes[0]
    counts = np.ones(task.num_classes)
    for table in _first_row_groups(schema, files, [task.label], max_files):
        y = pc.drop_null(table.column(task.label)).to_numpy()
        counts += np.bincount(y.astype(np.int64), minlength=task.num_classes)[: task.num_classes]
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def initialize(model: torch.nn.Module, schema: Schema, train_files: list[str]) -> None:
    """Start the output layer at the labels' base rates (a cheap look at the train split): the
    CTR heads at each task's log-odds, the next-item bias at each item's log frequency."""
    if isinstance(model, NextItemModel):
        if model.item_bias is not None:
            with torch.no_grad():
                model.item_bias.copy_(item_log_prior(schema, train_files).to(model.item_bias.device))
        return
    set_prior(model, label_rates(schema, train_files))


__all__ = ["ModelConfig", "ModelSpec", "NextItemConfig", "build_model", "count", "initialize", "label_rates",
           "set_prior"]
