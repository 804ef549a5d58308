"""What an objective is to the trainer: the contract every objective component meets.

An objective is built once per process from its typed config section (`objective:` in a
job file) and the logs it trains on. Building it is the preflight: caches are opened and
checked against the logs there, so a wrong cache fails before any rank trains. It then
says what the trainer needs and nothing more:

    objective.aligned            side columns joined to the train split (cached teacher logits)
    objective.keep_requests      whether the loader must keep a request's rows together
    objective.model_config(cfg)  the model config plus what the losses add (aux head, hint)
    objective.train_module(m, e) an nn.Module around the model: forward(batch) -> StepOutput;
                                 built on every rank once its process group exists (`e`, the
                                 rank's distkd.dist.Env), so an online teacher can be loaded
                                 collectively, its tables sharded over the training ranks

The train module is what DistributedModelParallel wraps (TorchRec's DLRMTrain pattern):
the loss runs inside DDP's forward, and the trainer never sees how it is made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, Sequence

import torch
from torch import nn

from distkd.config import ConfigError
from distkd.data.loader import Aligned
from distkd.data.schema import Schema
from distkd.dist import Env


@dataclass
class ObjectiveContext:
    schema: Schema
    logs: str
    task_weights: list[float]
    where: str = "objective"  # the job file, for messages
    partitions: dict = field(default_factory=dict)  # partitioned logs: the split ranges


class StepOutput(NamedTuple):
    """A NamedTuple so DDP finds the tensors it must hook (pytree)."""

    loss: torch.Tensor  # the scalar to backpropagate
    parts: dict[str, torch.Tensor]  # each weighted term, detached, for logging


class Objective(Protocol):
    aligned: Sequence[Aligned]
    keep_requests: bool

    def model_config(self, cfg): ...

    def train_module(self, model: nn.Module, env: Env) -> nn.Module: ...


def detached(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in terms.items()}


def check_loss_weights(weights) -> None:
    """A losses dataclass of float weights: none negative, not all zero."""
    names = [f.name for f in dataclasses.fields(weights)]
    bad = [n for n in names if getattr(weights, n) < 0]
    if bad:
        raise ConfigError(f"loss weights must be >= 0: {bad}")
    if not any(getattr(weights, n) for n in names):
        raise ConfigError("every loss weight is 0: nothing to train")
