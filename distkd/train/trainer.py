"""One distributed trainer for the teacher and the student, whatever they learn from.

`Trainer.train` reads top to bottom: resume if there is something to resume (else warm
start from `init:` if the job names one), then per
epoch stream the rank's share of the logs through `train_step`, validate, checkpoint;
finally evaluate on the test split and export. What the model learns from is the
objective (distkd.objectives), built before the trainer and handed to it: the trainer
knows its aligned columns, what it adds to the model and its train module, not its loss.

Components: `Checkpointer` (DCP, resharding), `Validator` (metrics, early stopping),
`MetricsLogger` (progress, TensorBoard, the loss log). Callbacks (`fn(trainer)` after each
step) are the seam tests use to inject faults; a callback may also have `on_valid(trainer,
metrics)` and `on_checkpoint(trainer, path)` (every rank, after each validation pass and each
committed checkpoint): the seam Ray Train and Ray Tune report through.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import torch.distributed as tdist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from distkd import dist, memory
from distkd.config import to_dict
from distkd.data.batch import transfer_for
from distkd.data.layout import window_of
from distkd.data.loader import LogLoader, split_files
from distkd.data.schema import Schema
from distkd.metrics import format_table
from distkd.models.export import export_form, gather_state_dict, write_export, write_sharded_export
from distkd.models import build_model, count as count_params, initialize
from distkd.objectives.base import Objective, StepOutput
from distkd.train.checkpoint import Checkpointer, latest, optimizer_tensors
from distkd.train.init import load_init, plan_init
from distkd.train.job import TrainJob
from distkd.train.metrics_logger import MetricsLogger
from distkd.models.sharding_plan import describe_plan
from distkd.train.sharding import LRSchedule, shard
from distkd.train.steps import steps_for
from distkd.train.validation import Validator, evaluate

logger = logging.getLogger(__name__)

Callback = Callable[["Trainer"], None]


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0  # optimizer steps taken in total
    rows: int = 0  # training rows read in total, over all ranks


def run_identity(job: TrainJob, schema: Schema, model_cfg) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it (world size excluded, and how an
    online teacher is laid out over the ranks: the same teacher, replicated or sharded)."""
    objective = {k: v for k, v in to_dict(job.objective).items() if k != "online"}
    return {"role": job.role, "schema": schema.fingerprint(), "model": to_dict(model_cfg),
            "objective": objective, "seed": job.train.seed, "batch_size": job.train.batch_size,
            "train": to_dict(job.partitions.get("train"))}


class Trainer:
    def __init__(self, job: TrainJob, schema: Schema, objective: Objective, env: dist.Env, resume: bool = False,
                 callbacks: Sequence[Callback] = ()):
        self.job, self.schema, self.env, self.callbacks = job, schema, env, list(callbacks)
        self.resume = resume
        self.out = Path(job.out)
        self.memory = memory.Stages()  # this rank's peak RSS per stage: build, train, evaluate, export
        torch.manual_seed(job.train.seed)
        self.transfer = transfer_for(env.device)  # CUDA: pinned batches, non_blocking copies
        self.model_cfg = objective.model_config(job.model)
        model = build_model(schema, self.model_cfg, device=env.device)
        initialize(model, schema, split_files(job.logs, "train", job.partitions))
        self.dmp, self.optimizer = shard(objective.train_module(model, env), env, job.sharding, job.optim)
        loop = job.train
        self.train_loader = self._loader("train", loop.batch_size, objective.aligned, objective.keep_requests)
        self.validator = Validator(self._loader("valid", loop.eval_batch_size), schema, env.device,
                                   loop.early_stopping_patience)
        self.checkpointer = Checkpointer(self.out / "checkpoints", env.rank, env.world_size,
                                         run_identity(job, schema, self.model_cfg), loop.keep_checkpoints)
        self.state = TrainState()
        self.metrics_log: MetricsLogger | None = None
        self.schedule = LRSchedule(self.optimizer, job.optim, self.total_steps())
        self.steps = steps_for(self, loop.pipeline)  # plain, or TorchRec's pipeline (distkd.train.steps)
        # Batches of this epoch's layout the optimizer has stepped on; the loader may be ahead
        # (the pipeline holds batches), so this is the position a checkpoint records.
        self.consumed: int | None = None
        self.memory.mark("build")

    def _loader(self, split: str, batch_size: int, aligned=(), keep_requests: bool = False) -> LogLoader:
        train = split == "train"
        return LogLoader(split_files(self.job.logs, split, self.job.partitions), self.schema, batch_size, rank=self.env.rank,
                         world_size=self.env.world_size, shuffle=train and self.job.train.shuffle,
                         seed=self.job.train.seed, shuffle_window_row_groups=self.job.train.shuffle_window_row_groups,
                         aligned=list(aligned), keep_requests=keep_requests, workers=self.job.loader.workers,
                         prefetch=self.job.loader.prefetch, pin_memory=self.transfer.pin_memory)

    @property
    def model(self) -> torch.nn.Module:
        """The sharded model itself (no loss, no DDP wrapper): what validation and export see."""
        return self.dmp.module.model

    def total_steps(self) -> int:
        """Steps of the whole run: this epoch's rest, then whole epochs at this world size."""
        ld, loop = self.train_loader, self.job.train
        total = self.state.step + (len(ld) - ld.step) + max(0, loop.epochs - self.state.epoch - 1) * ld.full_epoch_steps()
        return min(total, loop.max_steps) if loop.max_steps is not None else total

    # -- one step ---------------------------------------------------------------------------

    def train_step(self, batch) -> StepOutput:
        """Forward (model and loss, inside DDP), backward, one optimizer step."""
        out: StepOutput = self.dmp(batch.to(self.env.device, non_blocking=self.transfer.non_blocking))
        self.optimizer.zero_grad()
        self.schedule.set(self.state.step)  # the fused tables take theirs at step(), for the next backward
        out.loss.backward()
        self.optimizer.step()
        self.state.step += 1
        return out

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Collective: the whole run; returns the summary (on every rank)."""
        job, loop, env = self.job, self.job.train, self.env
        self.start()
        total = self.total_steps()
        self.schedule.total = max(total, 1)
        logger.info(f"{job.role}: {count_params(self.schema, self.model_cfg)['total']:,} parameters on "
                    f"{env.world_size} rank(s) ({env.backend}); plan {describe_plan(self.dmp)}")
        self.metrics_log = metrics_log = MetricsLogger(self.out, env.is_main, total, self.state.step,
                                                       loop.batch_size * env.world_size, loop.log_every, job.tensorboard)
        stop = self.state.step >= total
        ld = self.train_loader
        while not stop and self.state.epoch < loop.epochs:
            ld.set_epoch(self.state.epoch)
            self.consumed = ld.layout_step  # where this pass starts: 0, or a resumed step
            for out in self.steps.epoch(ld):
                self.consumed += 1
                self.state.rows += ld.global_batch_rows(self.consumed - 1)
                metrics_log.step(self.state.step, out.loss, out.parts)
                for callback in self.callbacks:
                    callback(self)
                if loop.eval_every and self.state.step % loop.eval_every == 0:
                    stop = self.validate(metrics_log)
                if stop or self.state.step >= total:
                    break
                if self.state.step % loop.checkpoint_every == 0:
                    self.save()
            if ld.epoch_step(self.consumed) >= len(ld):  # the epoch ran to its end
                self.state.epoch += 1
                if not loop.eval_every:
                    stop = self.validate(metrics_log) or stop
            stop = stop or self.state.step >= total
            self.save()
        self.steps.pause()  # the sharded modules' own forwards for the test pass and the export
        metrics_log.close()
        self.memory.mark("train")
        return self.finish(metrics_log)

    def validate(self, metrics_log: MetricsLogger) -> bool:
        self.steps.pause()
        result, stop = self.validator(self.model, self.state.step)
        metrics_log.valid(self.state.step, result)
        self._hook("on_valid", result)
        return stop

    def _hook(self, name: str, *args: Any) -> None:
        for callback in self.callbacks:
            if (fn := getattr(callback, name, None)) is not None:
                fn(self, *args)

    # -- checkpoints -----------------------------------------------------------------------------

    def _tensors(self) -> dict[str, Any]:
        return {"model": self.dmp.state_dict(), "optim": optimizer_tensors(self.optimizer)}

    def save(self) -> Path:
        if self.metrics_log is not None:
            self.metrics_log.flush()  # the loss log holds every step the checkpoint holds
        state = {"trainer": to_dict(self.state), "loader": self.train_loader.state_dict(self.consumed),
                 "validator": self.validator.state_dict(), "schema": to_dict(self.schema)}  # what a warm start compares
        path = self.checkpointer.save(self.state.step, self._tensors(), state)
        self._hook("on_checkpoint", path)
        return path

    def start(self) -> None:
        """Collective: where the run's weights start. Its own last checkpoint when resuming
        (a restarted warm-started run continues from there, never from `init:` again), else
        `init:`'s export or checkpoint at step 0, else the fresh initialisation."""
        if not self.resume_if_any() and self.job.init.path:
            self.warm_start()

    def warm_start(self) -> None:
        """Collective: load `init:`'s weights (and optimizer state) into this fresh run."""
        plan = plan_init(self.job.init, self.schema, self.model_cfg)
        load_init(plan, self.dmp, self.optimizer)
        adapted = f", schema adapted ({len(plan.notes)} change(s))" if plan.notes else ""
        logger.info(f"init: weights from {plan.source.describe()}"
                    f"{', with optimizer state' if plan.optimizer else ''}{adapted}; starting at step 0")

    def resume_if_any(self) -> bool:
        """Continue from the last committed checkpoint when asked to (--resume) or when the
        launcher restarted this worker group (torchrun, the local launcher, Ray Train).
        True if it did."""
        if not (self.resume or self.env.restart):
            return False
        path = latest(self.out / "checkpoints")
        if path is None:
            logger.info("resume: no committed checkpoint yet; starting from step 0")
            return False
        # TorchRec's keyed optimizers load only into initialized state: create it (no step
        # is taken, the weights stay as they are), then fill every tensor in place.
        self.optimizer.init_state()
        self.optimizer.zero_grad()
        tensors = self._tensors()
        meta = self.checkpointer.load(path, tensors)
        self.dmp.load_state_dict(tensors["model"])
        self.train_loader.load_state_dict(meta["loader"])
        self.validator.load_state_dict(meta["validator"])
        self.state = TrainState(**meta["trainer"])
        moved = "" if meta["world_size"] == self.env.world_size else f", resharded {meta['world_size']} -> {self.env.world_size} ranks"
        logger.info(f"resumed from {path} at epoch {self.state.epoch}, step {self.state.step}{moved}")
        return True


    # -- the end --------------------------------------------------------------------------------

    def finish(self, metrics_log: MetricsLogger) -> dict[str, Any]:
        """Collective: test metrics, the export (rank 0) and the summary."""
        job, env = self.job, self.env
        test = evaluate(self.model, self._loader("test", job.train.eval_batch_size), self.schema, env.device)
        history = self.validator.history
        valid = history[-1]["metrics"] if history else evaluate(self.model, self.validator.loader, self.schema, env.device)
        summary = {
            "role": job.role,
            "steps": self.state.step,
            "epochs": self.state.epoch,
            "rows": self.state.rows,
            "world_size": env.world_size,
            "rows_per_s": metrics_log.rate(),
            "loss": metrics_log.loss_summary(),
            "plan": describe_plan(self.dmp),
            "parameters": count_params(self.schema, self.model_cfg),
            "valid": valid,
            "test": test,
            "replica_drift": replica_drift(self.dmp),
        }
        self.memory.mark("evaluate")
        window = window_of(job.logs, "train", job.partitions)  # a cache of this export records it: teacher age
        export = self.export({"test": test, "job": to_dict(job), **({"window": window} if window else {})})
        self.memory.mark("export")
        summary["memory"] = dist.gather_objects(self.memory.record(), env.world_size)
        if env.is_main:
            summary["export"] = export
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            logger.info(f"\n{job.role} finished: {self.state.step} steps, {metrics_log.rate():,.0f} rows/s")
            logger.info(format_table({f"{job.role} (valid)": valid, f"{job.role} (test)": test}))
            logger.info(f"export: {self.out / 'export'} sha256 {summary['export']['sha256'][:16]}…")
        return summary

    def export(self, extra: dict[str, Any]) -> dict[str, Any] | None:
        """Collective: write <out>/export in the job's form; export.json's content on rank 0.
        A sharded teacher is written by every rank through DCP, never gathered."""
        job, env, out = self.job, self.env, self.out / "export"
        state = self.dmp.state_dict()
        if export_form(job.export, job.role, env.world_size, state, prefix="model.") == "sharded":
            return write_sharded_export(out, job.role, self.schema, self.model_cfg, state, env.rank, env.world_size,
                                        prefix="model.", extra=extra)
        state_dict = gather_state_dict(self.dmp, env.rank, prefix="model.")
        return write_export(out, job.role, self.schema, self.model_cfg, state_dict, extra) if env.is_main else None


def replica_drift(dmp) -> float:
    """Collective: the largest difference between ranks of any replicated (dense or
    data-parallel) parameter. DDP keeps it at 0; anything else is a bug worth failing on."""

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return 0.0
    drift = 0.0
    for _, p in sorted(dmp.state_dict().items()):
        if isinstance(p, ShardedTensor) or not torch.is_floating_point(p):
            continue
        lo, hi = p.detach().clone(), p.detach().clone()
        tdist.all_reduce(lo, op=tdist.ReduceOp.MIN)
        tdist.all_reduce(hi, op=tdist.ReduceOp.MAX)
        drift = max(drift, (hi - lo).abs().max().item())
    return drift
