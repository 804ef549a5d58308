"""Shard a train module with DistributedModelParallel and build its optimizers.

Embedding tables get rowwise Adagrad at `embedding_lr` whatever the plan: sharded tables
(table-, column-, row-wise) have it fused into the backward pass (FBGEMM's TBE updates rows
in place, no dense gradient is ever built); data-parallel tables are DDP replicas, which
TorchRec leaves to the dense optimizer, so they get the same rowwise Adagrad here, stepped
after DDP's all-reduce. The dense layers get Adam. All are combined into one keyed optimizer
so checkpointing, the LR schedule and the training loop see a single object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from distkd.config import ConfigError
from distkd.dist import Env
from distkd.models.sharded_export import is_table
from distkd.models.sharding_plan import ShardingConfig, embedding_modules, plan_for

@dataclass
class OptimConfig:
    embedding_lr: float = 0.05
    dense_lr: float = 1e-3
    weight_decay: float = 0.0
    eps: float = 1e-8
    # Both learning rates follow one schedule over the run's steps: a linear warmup, then
    # constant, or a linear/cosine decay to zero (a one-pass model ends on an annealed iterate
    # instead of a noisy one).
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0

    def validate(self) -> None:
        if self.embedding_lr < 0 or self.dense_lr < 0 or self.weight_decay < 0 or self.eps <= 0 or self.warmup_steps < 0:
            raise ConfigError("learning rates, weight_decay and warmup_steps must be >= 0, eps > 0")


class LRSchedule:
    """Sets every param group's lr (the fused tables read theirs at each step) from the step."""

    def __init__(self, optimizer, cfg: OptimConfig, total_steps: int):
        self.groups = list(optimizer.param_groups)
        self.base = [g["lr"] for g in self.groups]  # before any checkpoint restores scaled ones
        self.cfg, self.total = cfg, max(total_steps, 1)

    def factor(self, step: int) -> float:
        warm = self.cfg.warmup_steps
        if warm and step < warm:
            return (step + 1) / warm
        if self.cfg.schedule == "constant":
            return 1.0
        done = min(1.0, (step - warm) / max(self.total - warm, 1))
        return 1.0 - done if self.cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))

    def set(self, step: int) -> float:
        """Set the learning rates for the optimizer step that follows `step` steps taken."""
        f = self.factor(step)
        for g, base in zip(self.groups, self.base):
            g["lr"] = base * f
        return f


def shard(model: torch.nn.Module, env: Env, sharding: ShardingConfig, optim: OptimConfig) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """Wrap `model` (a train module; its tables on meta) in DMP and return it with its
    combined optimizer."""
    tables = [p for m in embedding_modules(model) for p in m.parameters()]
    _apply_optimizer_in_backward(RowWiseAdagrad, tables, {"lr": optim.embedding_lr, "eps": optim.eps})
    plan = plan_for(model, env, sharding)
    dmp = DistributedModelParallel(module=model, device=env.device, plan=plan)
    # What the fused optimizer does not step: the dense layers and any data-parallel table.
    rest = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    tables = {n: p for n, p in rest.items() if is_table(n)}
    dense = {n: p for n, p in rest.items() if n not in tables}
    optimizers = [dmp.fused_optimizer]
    if tables:
        optimizers.append(KeyedOptimizerWrapper(
            tables, lambda params: RowWiseAdagrad(params, lr=optim.embedding_lr, eps=optim.eps)))
    optimizers.append(KeyedOptimizerWrapper(
        dense, lambda params: torch.optim.Adam(params, lr=optim.dense_lr, weight_decay=optim.weight_decay)))
    return dmp, CombinedOptimizer(optimizers)


