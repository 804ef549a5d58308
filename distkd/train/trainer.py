"""One distributed trainer for the teacher and the student.

Read top to bottom: build the model from the schema, shard it with DMP, stream the
logs through the loader, step, evaluate, checkpoint, export. Only the objective
(and the aligned columns it needs, e.g. cached teacher logits) differs between
teacher training, hard-label student training and distillation.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch

from distkd import dist
from distkd.train import checkpoint
from distkd.config import ConfigError, to_dict
from distkd.models.export import gather_state_dict, write_export
from distkd.data.loader import LogLoader, split_files
from distkd.metrics import TaskMetrics, format_table
from distkd.models.ranking import ModelConfig, RankingModel, count_parameters
from distkd.data.schema import Schema, load_schema
from distkd.train.sharding import LRSchedule, OptimConfig, ShardingConfig, describe_plan, shard


@dataclass
class LoopConfig:
    batch_size: int = 4096
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many steps in total (across epochs)
    eval_every: Optional[int] = None  # steps between validation passes (default: once per epoch)
    early_stopping_patience: int = 0  # validation passes without improvement before stopping; 0: off
    shuffle: bool = True
    shuffle_window_row_groups: int = 4
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 20
    eval_batch_size: int = 16384
    task_weights: Optional[list[float]] = None


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
    tensorboard: bool = True
    # Set by `distkd distill`; a plain teacher/student run trains on hard labels.
    distill: Optional[dict[str, Any]] = None


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0  # optimizer steps taken in total
    best: float = float("-inf")
    stale: int = 0  # validation passes since the best one
    history: list[dict[str, Any]] = field(default_factory=list)


def make_objective(job: TrainJob, schema: Schema) -> tuple[Callable, list, ModelConfig]:
    """The loss, the aligned side columns it reads (e.g. cached teacher logits), and the
    model config extended with what the loss needs (an aux head, a hint projection)."""
    weights = job.train.task_weights or [1.0] * len(schema.tasks)
    if len(weights) != len(schema.tasks):
        raise ConfigError(f"train.task_weights: {len(weights)} weights for {len(schema.tasks)} tasks")
    if job.distill is None:
        from distkd.objectives.losses import HardLabel

        return HardLabel(weights), [], job.model
    from distkd.objectives.ctr_kd import make_distill_objective

    return make_distill_objective(job.distill, schema, job.model, weights, job.logs)


def make_loader(job: TrainJob, schema: Schema, env: dist.Env, split: str, aligned=(), train: bool = False) -> LogLoader:
    listwise = bool(job.distill and (job.distill.get("losses") or {}).get("listwise"))
    return LogLoader(
        split_files(job.logs, split),
        schema,
        job.train.batch_size if train else job.train.eval_batch_size,
        rank=env.rank,
        world_size=env.world_size,
        shuffle=train and job.train.shuffle,
        seed=job.train.seed,
        shuffle_window_row_groups=job.train.shuffle_window_row_groups,
        aligned=list(aligned),
        keep_requests=listwise,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: LogLoader, schema: Schema, device: torch.device) -> dict[str, dict[str, float]]:
    """Collective: metrics of `model` over the loader's whole split, aggregated over ranks."""
    was_training = model.training
    model.eval()
    metrics = TaskMetrics(schema.task_names)
    for batch in loader:
        batch = batch.to(device)
        metrics.update(model(batch.sparse, batch.dense).logits, batch.labels)
    model.train(was_training)
    return metrics.compute()


def mean_auc(result: dict[str, dict[str, float]]) -> float:
    return sum(m["auc"] for m in result.values()) / len(result)


def label_rates(schema: Schema, files: list[str], max_files: int = 8) -> list[float]:
    """Each task's positive rate in the first row group of up to `max_files` shards (cheap at
    any scale; labels that are null, unlabeled rows, are left out)."""
    import numpy as np

    from distkd import storage

    pos, n = np.zeros(len(schema.tasks)), np.zeros(len(schema.tasks))
    for path in files[:max_files]:
        with storage.open_parquet(path) as pf:
            table = pf.read_row_group(0, columns=schema.label_columns)
        for i, col in enumerate(schema.label_columns):
            y = table.column(col).drop_null().to_numpy().astype(np.float64)
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


def train(job: TrainJob, resume: bool = False) -> dict[str, Any]:
    """The worker: runs on every rank. Returns the summary (on every rank)."""
    env = dist.init()
    out = Path(job.out)
    torch.manual_seed(job.train.seed)
    schema = load_schema(job.logs)
    objective, aligned, model_cfg = make_objective(job, schema)

    model = RankingModel(schema, model_cfg, device=env.device)
    set_prior(model, label_rates(schema, split_files(job.logs, "train")))
    dmp, optimizer = shard(model, env, job.sharding, job.optim)
    train_loader = make_loader(job, schema, env, "train", aligned, train=True)
    valid_loader = make_loader(job, schema, env, "valid")
    total = len(train_loader) * job.train.epochs
    if job.train.max_steps is not None:
        total = min(total, job.train.max_steps)
    schedule = LRSchedule(optimizer, job.optim, total)

    state = TrainState()
    if resume and (last := checkpoint.latest(out / "checkpoints")) is not None:
        state = restore(last, dmp, optimizer, train_loader, env)
        log(env, f"resumed from {last} at epoch {state.epoch}, step {state.step}")
    tb = _tensorboard(job, env)
    log(env, f"{job.role}: {count_parameters(schema, model_cfg)['total']:,} parameters on {env.world_size} "
             f"rank(s) ({env.backend}); plan {describe_plan(dmp)}")

    progress = Progress(env, total, state.step, job.train.batch_size * env.world_size)
    stop = state.step >= total
    while not stop and state.epoch < job.train.epochs:
        train_loader.set_epoch(state.epoch)
        for batch in train_loader:
            batch = batch.to(env.device)
            output = dmp(batch.sparse, batch.dense)
            loss, parts = objective(output, batch)
            optimizer.zero_grad()
            schedule.set(state.step)  # the fused tables take theirs at step(), for the next backward
            loss.backward()
            optimizer.step()
            state.step += 1
            progress.update(loss.item(), parts, tb)
            _maybe_crash(env, state.step)

            if job.train.eval_every and state.step % job.train.eval_every == 0:
                stop = validate(dmp, valid_loader, schema, env, state, job, tb)
            if stop or state.step >= total:
                break
            if state.step % job.train.checkpoint_every == 0:
                save(out, dmp, optimizer, train_loader, state, env)
        if train_loader.state_dict()["step"] >= len(train_loader):  # the epoch ran to its end
            state.epoch += 1
            if not job.train.eval_every:
                stop = validate(dmp, valid_loader, schema, env, state, job, tb) or stop
        stop = stop or state.step >= total
        save(out, dmp, optimizer, train_loader, state, env)
    progress.close()

    test = evaluate(dmp, make_loader(job, schema, env, "test"), schema, env.device)
    valid = state.history[-1]["metrics"] if state.history else evaluate(dmp, valid_loader, schema, env.device)
    summary = {
        "role": job.role,
        "steps": state.step,
        "epochs": state.epoch,
        "rows_per_s": progress.rate(),
        "loss_first": progress.first,
        "loss_last": progress.loss,
        "parts_first": progress.parts_first,
        "parts_last": progress.parts,
        "plan": describe_plan(dmp),
        "parameters": count_parameters(schema, model_cfg),
        "valid": valid,
        "test": test,
    }
    summary["replica_drift"] = replica_drift(dmp)
    state_dict = gather_state_dict(dmp, env.rank)
    if env.is_main:
        summary["export"] = write_export(out / "export", job.role, schema, model_cfg, state_dict,
                                         extra={"test": test, "job": to_dict(job)})
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"\n{job.role} finished: {state.step} steps, {progress.rate():,.0f} rows/s", file=sys.stderr)
        print(format_table({f"{job.role} (valid)": valid, f"{job.role} (test)": test}))
        print(f"export: {out / 'export'} sha256 {summary['export']['sha256'][:16]}…")
    if tb is not None:
        tb.close()
    dist.shutdown()
    return summary


def validate(dmp, loader, schema, env, state: TrainState, job: TrainJob, tb) -> bool:
    """Run a validation pass, record it, and say whether early stopping triggers."""
    result = evaluate(dmp, loader, schema, env.device)
    score = mean_auc(result)
    state.history.append({"step": state.step, "metrics": result})
    if tb is not None:
        for task, vals in result.items():
            for name, v in vals.items():
                tb.add_scalar(f"valid/{task}/{name}", v, state.step)
    log(env, f"step {state.step}: valid " + ", ".join(f"{t} AUC {m['auc']:.4f} logloss {m['logloss']:.4f}" for t, m in result.items()))
    if score > state.best:
        state.best, state.stale = score, 0
    else:
        state.stale += 1
    return bool(job.train.early_stopping_patience) and state.stale >= job.train.early_stopping_patience


def replica_drift(dmp) -> float:
    """Collective: the largest difference between ranks of any replicated (dense or
    data-parallel) parameter. DDP keeps it at 0; anything else is a bug worth failing on."""
    import torch.distributed as tdist
    from torch.distributed._shard.sharded_tensor import ShardedTensor

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


def save(out: Path, dmp, optimizer, loader: LogLoader, state: TrainState, env: dist.Env) -> None:
    checkpoint.save(
        out / "checkpoints",
        state.step,
        {
            "model": dmp.state_dict(),
            "optimizer": optimizer.state_dict(),
            "loader": loader.state_dict(),
            "rng": checkpoint.rng_state(),
            "trainer": to_dict(state),
        },
        env.rank,
        env.world_size,
    )


def restore(path: Path, dmp, optimizer, loader: LogLoader, env: dist.Env) -> TrainState:
    saved = checkpoint.load(path, env.rank, env.world_size)
    dmp.load_state_dict(saved["model"])
    # TorchRec's keyed optimizers load only into initialized state: take one zero-gradient
    # step first (it leaves the weights as they are), then copy the saved state in.
    optimizer.init_state()
    optimizer.zero_grad()
    optimizer.load_state_dict(saved["optimizer"])
    loader.load_state_dict(saved["loader"])
    checkpoint.set_rng_state(saved["rng"])
    return TrainState(**saved["trainer"])


def _maybe_crash(env: dist.Env, step: int) -> None:
    """Fault injection for the resume tests: DISTKD_CRASH_AT=rank:step kills that rank hard."""
    spec = os.environ.get("DISTKD_CRASH_AT")
    if spec and spec == f"{env.rank}:{step}":
        os._exit(13)


def log(env: dist.Env, msg: str) -> None:
    if env.is_main:
        print(msg, file=sys.stderr, flush=True)


def _tensorboard(job: TrainJob, env: dist.Env):
    if not (job.tensorboard and env.is_main):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(Path(job.out) / "tensorboard"))


class Progress:
    """A progress bar on rank 0: steps, rows/s (all ranks), smoothed loss, ETA."""

    def __init__(self, env: dist.Env, total: int, start: int, rows_per_step: int):
        self.env, self.rows_per_step, self.step0 = env, rows_per_step, start
        self.t0 = time.perf_counter()
        self.t1: Optional[float] = None
        self.steps = 0
        self.loss: Optional[float] = None  # exponentially smoothed
        self.first: Optional[float] = None
        self.parts_first: dict[str, float] = {}
        self.parts: dict[str, float] = {}  # each loss term, exponentially smoothed
        self.bar = None
        if env.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5 if sys.stderr.isatty() else 15,
                            disable=os.environ.get("DISTKD_NO_PROGRESS") == "1")

    def update(self, loss: float, parts: dict[str, float], tb) -> None:
        self.steps += 1
        self.loss = loss if self.loss is None else 0.95 * self.loss + 0.05 * loss
        if self.first is None:
            self.first, self.parts_first = loss, dict(parts)
        self.parts = {k: v if k not in self.parts else 0.95 * self.parts[k] + 0.05 * v for k, v in parts.items()}
        step = self.step0 + self.steps
        if tb is not None:
            tb.add_scalar("train/loss", loss, step)
            for k, v in parts.items():
                tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.update(1)
            if self.steps % 10 == 1:
                self.bar.set_postfix(loss=f"{self.loss:.4f}", rows_s=f"{self.rate():,.0f}")

    def rate(self) -> float:
        end = self.t1 if self.t1 is not None else time.perf_counter()
        return self.steps * self.rows_per_step / max(end - self.t0, 1e-9)

    def close(self) -> None:
        self.t1 = time.perf_counter()
        if self.bar is not None:
            self.bar.close()


def run(args) -> int:
    """`distkd teacher train` / `distkd student train`."""
    from distkd.config import load

    job = load(TrainJob, args.config, [f"role={args.role}"] + list(args.overrides))
    if getattr(args, "distill_required", False) or job.distill is not None:
        from distkd.objectives.ctr_kd import parse_section, preflight

        where = args.config or "config"  # fail here, naming the file, not inside every rank
        preflight(parse_section(job.distill, where), job.logs, where)
    if args.nproc is not None:
        job.nproc = args.nproc
    summary = dist.launch(train, job.nproc, job, args.resume)[0]
    return 0 if summary else 1
