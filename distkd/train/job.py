"""A training job file (`jobs/*/teacher.yaml`, `student.yaml`, `distill.yaml`) as typed config.

    logs, out, role, nproc          what to train on, where to write, how many local ranks
    model / optim / sharding         the model, its optimizers, the embedding plan
    train                            the loop: batches, epochs, validation, checkpoints
    objective                        what the model learns from (`kind: hard | ctr_kd`)
    launch                           restarts and timeouts
    partitions                       partitioned logs: the partition range of each split
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from distkd.config import ConfigError
from distkd.data.layout import PartitionRange
from distkd.dist import DEFAULT_TIMEOUT_S
from distkd.models.ranking import ModelConfig
from distkd.objectives import ObjectiveConfig
from distkd.objectives.hard import HardConfig
from distkd.train.sharding import OptimConfig, ShardingConfig


@dataclass
class LoopConfig:
    batch_size: int = 4096  # per rank
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many steps in total (across epochs)
    eval_every: Optional[int] = None  # steps between validation passes (default: once per epoch)
    early_stopping_patience: int = 0  # validation passes without improvement before stopping; 0: off
    shuffle: bool = True
    shuffle_window_row_groups: int = 4
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # committed checkpoints kept; older ones go once a newer one is committed
    log_every: int = 20
    eval_batch_size: int = 16384
    task_weights: Optional[list[float]] = None

    def validate(self) -> None:
        for name in ("batch_size", "epochs", "checkpoint_every", "keep_checkpoints", "log_every", "eval_batch_size",
                     "shuffle_window_row_groups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1 (or null), got {getattr(self, name)}")
        if self.early_stopping_patience < 0:
            raise ConfigError(f"early_stopping_patience: must be >= 0, got {self.early_stopping_patience}")


@dataclass
class LaunchConfig:
    max_restarts: int = 0  # the local launcher (--nproc) restarts a failed rank group this often
    timeout_s: float = DEFAULT_TIMEOUT_S  # a rendezvous or collective that cannot complete fails after this

    def validate(self) -> None:
        if self.max_restarts < 0 or self.timeout_s <= 0:
            raise ConfigError("max_restarts must be >= 0 and timeout_s > 0")


@dataclass
class TrainJob:
    logs: str = "runs/demo/logs"
    out: str = "runs/demo/teacher"
    role: Literal["teacher", "student"] = "teacher"
    nproc: int = 2
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    objective: ObjectiveConfig = field(default_factory=HardConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    tensorboard: bool = True
    # Partitioned logs: which partitions make train/valid/test (split folders otherwise); see
    # distkd.data.layout.
    partitions: dict[str, PartitionRange] = field(default_factory=dict)

    def validate(self) -> None:
        if self.nproc < 1:
            raise ConfigError(f"nproc: must be >= 1, got {self.nproc}")
