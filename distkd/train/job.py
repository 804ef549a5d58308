"""A training job file (`jobs/*/teacher.yaml`, `student.yaml`, `distill.yaml`) as typed config.

    logs, out, role, nproc          what to train on, where to write, how many local ranks
    features                         the features the job reads (default: every one its role may read)
    model / optim / sharding         the model, its optimizers, the embedding plan
    train                            the loop: batches, epochs, validation, checkpoints
    loader                           decoding workers and prefetch (batches do not depend on them)
    objective                        what the model learns from (`kind: hard | ctr_kd`)
    export                           the export's form: one file, or a teacher's tables sharded (DCP)
    launch                           launcher (local | ray), restarts, timeouts, Ray Train resources
    partitions                       partitioned logs: the partition range of each split
    init                             warm start: a new run whose weights start from an export or checkpoint
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from distkd.config import ConfigError
from distkd.data.layout import PartitionRange
from distkd.dist import DEFAULT_TIMEOUT_S
from distkd.models import ModelConfig, ModelSpec
from distkd.models.export import ExportConfig
from distkd.objectives import ObjectiveConfig
from distkd.objectives.hard import HardConfig
from distkd.models.sharding_plan import ShardingConfig
from distkd.train.init import InitConfig
from distkd.train.sharding import OptimConfig


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
    # sparse_dist: TorchRec's TrainPipelineSparseDist drives the steps (the next batch's copy and
    # embedding input dist overlap this one's forward/backward; same losses as plain, see
    # docs/training.md); plain: one `Trainer.train_step` per batch, for comparison.
    pipeline: Literal["sparse_dist", "plain"] = "sparse_dist"

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
class LoaderConfig:
    workers: int = 1  # threads decoding row-group windows ahead; batches are the same at any number
    prefetch: int = 2  # batches assembled ahead by the loader's thread (0: inline)

    def validate(self) -> None:
        if self.workers < 1 or self.prefetch < 0:
            raise ConfigError(f"loader: workers must be >= 1 and prefetch >= 0, got {self.workers}, {self.prefetch}")


@dataclass
class LaunchConfig:
    max_restarts: int = 0  # the local launcher (--nproc) restarts a failed rank group this often
    timeout_s: float = DEFAULT_TIMEOUT_S  # a rendezvous or collective that cannot complete fails after this
    # auto: Ray Train when a Ray address is given (ray_address, --ray-address or RAY_ADDRESS), else local
    launcher: Literal["auto", "local", "ray"] = "auto"
    ray_address: Optional[str] = None  # an existing cluster (HOST:6379, auto); null: RAY_ADDRESS, else embedded Ray
    workers: Optional[int] = None  # Ray Train workers = ranks (default: nproc)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0: nccl, one GPU per rank
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # custom Ray resources per rank
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"  # Ray's placement of the workers over nodes
    max_failures: int = 0  # Ray Train restarts a failed worker group this often (FailureConfig)
    storage_path: Optional[str] = None  # Ray Train's run state (tiny); default <out>/ray-train, shared on a cluster

    def validate(self) -> None:
        if self.max_restarts < 0 or self.timeout_s <= 0:
            raise ConfigError("max_restarts must be >= 0 and timeout_s > 0")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers: must be >= 1 (or null), got {self.workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0 or self.max_failures < -1:
            raise ConfigError("cpus_per_worker and gpus_per_worker must be >= 0, max_failures >= -1")


@dataclass
class TrainJob:
    logs: str = "runs/demo/logs"
    out: str = "runs/demo/teacher"
    role: Literal["teacher", "student"] = "teacher"
    nproc: int = 2
    # The features the job reads, by name (default: all a teacher may read, or a student's shared
    # ones; see Schema.view). A student naming a teacher-only (privileged) feature is refused.
    features: Optional[list[str]] = None
    model: ModelSpec = field(default_factory=ModelConfig)  # kind: ranking | next_item
    optim: OptimConfig = field(default_factory=OptimConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    objective: ObjectiveConfig = field(default_factory=HardConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tensorboard: bool = True
    # Partitioned logs: which partitions make train/valid/test (split folders otherwise); see
    # distkd.data.layout.
    partitions: dict[str, PartitionRange] = field(default_factory=dict)
    # Warm start (docs/training.md): step 0 of a new run, its weights from an export or a checkpoint.
    init: InitConfig = field(default_factory=InitConfig)

    def validate(self) -> None:
        if self.nproc < 1:
            raise ConfigError(f"nproc: must be >= 1, got {self.nproc}")
        if self.role == "student" and self.export.format == "sharded":
            raise ConfigError("export.format: sharded is for teachers; a student is served from one file (file or auto)")
