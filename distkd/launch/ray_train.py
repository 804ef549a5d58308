"""Ray Train: the DDP stages as a `TorchTrainer` on a Ray cluster, the same trainer and job files.

    launch(prepared, resume, callbacks)   the preflight's `Prepared` travels to N Ray Train
                                          workers, one rank each; rank 0's summary comes back

Selected by `launch.launcher: ray`, or with `auto` (the default) whenever a Ray address is
given: `launch.ray_address`, `--ray-address`, or RAY_ADDRESS (which the Ray Jobs API sets, so
`distkd submit distill --to ray` spreads its ranks over the cluster). Without an address an
embedded Ray sized to this machine is started.

* ScalingConfig: `launch.workers` (default `nproc`) workers, each `cpus_per_worker` CPUs,
  `gpus_per_worker` GPUs (nccl when > 0, else gloo; Ray Train builds the process group and
  distkd.dist.init joins it) and `resources_per_worker` custom resources;
  `placement_strategy` PACK (Ray's default) or SPREAD.
* FailureConfig(max_failures=launch.max_failures): a lost worker (process or node) restarts
  the whole worker group. The trainer writes its own DCP checkpoints to `out` (shared storage
  on a cluster). Each worker group start is counted in the run's folder (rank 0 adds a file,
  then broadcasts the count): that count is `Env.restart`, as TORCHELASTIC_RESTART_COUNT is
  under torchrun, and a restarted group (> 0) resumes from the last committed checkpoint.
  Every launch has a fresh Ray Train run name, so an older run is never taken for a restart.
  Ray's own record of checkpoints lags (a report reaches the controller at its next poll, and
  one made just before a worker died was lost in testing), so it only gets a pointer: after
  each commit rank 0 reports a 1-file JSON naming the DCP folder (`Result.checkpoint` leads to
  it); Ray copies that file, never the checkpoint.
* RunConfig.storage_path: a local or shared path (default `<out>/ray-train`), holding only
  Ray Train's run state and the pointers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch.distributed as tdist

from distkd import dist, log, storage
from distkd.errors import RankFailure
from distkd.train.job import TrainJob
import distkd
from distkd.train.trainer import Trainer

# Ray (Train) is imported inside the functions that join or start a cluster: its import costs seconds and
# every other launcher never needs it.

POINTER = "distkd-checkpoint.json"
REPORTED = ("auc", "logloss", "ne", "calibration")

logger = logging.getLogger(__name__)


def address(job: TrainJob) -> str | None:
    return job.launch.ray_address or os.environ.get("RAY_ADDRESS") or None


def selected(job: TrainJob) -> bool:
    return job.launch.launcher == "ray" or (job.launch.launcher == "auto" and address(job) is not None)


def _abs(path: str | None) -> str | None:
    return path if path is None or storage.is_remote(path) else str(Path(path).resolve())


def absolute(job: TrainJob) -> TrainJob:
    """The job with its local paths absolute: Ray workers do not run in the driver's folder."""
    job = dataclasses.replace(job, logs=_abs(job.logs), out=_abs(job.out))
    if job.init.path:
        job = dataclasses.replace(job, init=dataclasses.replace(job.init, path=_abs(job.init.path)))
    teachers = getattr(job.objective, "teachers", None)
    if teachers:
        fixed = [dataclasses.replace(t, **{k: _abs(getattr(t, k)) for k in ("cache", "export", "weights", "program") if hasattr(t, k)})
                 for t in teachers]
        job = dataclasses.replace(job, objective=dataclasses.replace(job.objective, teachers=fixed))
    return job


def connect(ray_address: str | None) -> None:
    """Join the cluster at `ray_address` (or RAY_ADDRESS), else start an embedded Ray."""
    import ray

    if ray.is_initialized():
        return
    if ray_address:
        ray.init(address=ray_address, logging_level=logging.WARNING)
    else:  # address="local": a new instance, never the last `ray start` cluster Ray would pick up
        ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
                 logging_level=logging.WARNING)


def flat_metrics(trainer, result: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A validation pass as flat scalars: valid/<task>/<metric>, valid/mean/<metric>, step."""
    return {"step": trainer.state.step, "validations": len(trainer.validator.history), "rows": trainer.state.rows,
            "epoch": trainer.state.epoch, **valid_scalars(result)}


def valid_scalars(result: dict[str, dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in REPORTED:
        values = [m[name] for m in result.values() if name in m]
        for task, m in result.items():
            if name in m:
                out[f"valid/{task}/{name}"] = float(m[name])
        if values:
            out[f"valid/mean/{name}"] = float(sum(values) / len(values))
    return out


@dataclasses.dataclass
class Report:
    """Trainer callback: report each validation pass and each committed checkpoint.

    via "train": ray.train.report from every Ray Train worker (the calls must match across
    ranks, and do: both hooks run on every rank); via "tune": ray.tune.report from a Tune
    function trainable (one rank). Checkpoint reports carry a pointer, never the checkpoint.
    """

    via: str = "train"
    checkpoints: bool = True
    last: dict = dataclasses.field(default_factory=dict)

    def __call__(self, trainer) -> None:
        pass

    def on_valid(self, trainer, result) -> None:
        self.last = flat_metrics(trainer, result)
        if self.via == "tune":
            from ray import tune

            tune.report(dict(self.last))
        else:
            import ray.train

            ray.train.report(dict(self.last))

    def on_checkpoint(self, trainer, path: Path) -> None:
        if self.via != "train" or not self.checkpoints:
            return
        import ray.train

        metrics = {**self.last, "step": trainer.state.step, "checkpoint": str(path)}
        if trainer.env.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            pointer = {"dcp": str(path), "step": trainer.state.step, "restart": trainer.env.restart}
            (Path(d) / POINTER).write_text(json.dumps(pointer))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"pointer-{trainer.state.step:08d}")


def start_generation(run_dir: Path, is_main: bool) -> int:
    """Collective: how many worker groups of this run started before this one."""

    got = [0]
    if is_main:
        starts = run_dir / "starts"
        starts.mkdir(parents=True, exist_ok=True)
        got[0] = len(list(starts.iterdir()))
        (starts / f"{got[0]:04d}-{uuid.uuid4().hex[:8]}").touch()
    tdist.broadcast_object_list(got, src=0)
    return int(got[0])


def placement() -> dict[str, Any]:
    import ray


    return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
            "distkd": str(Path(distkd.__file__).resolve().parent)}


def worker(config: dict) -> None:
    """One Ray Train worker = one rank: `run_rank`, in a process group Ray Train built."""


    prepared, resume, callbacks = config["prepared"], config["resume"], list(config["callbacks"])
    # a Ray worker starts with logging unconfigured, perhaps on another node: the driver's level travels
    log.setup(config["log_level"])
    job = prepared.job
    env = dist.init(timeout_s=job.launch.timeout_s)
    os.environ.setdefault("RANK", str(env.rank))  # the rank filter reads it (Ray Train sets it; kept if not)
    env.restart = start_generation(Path(config["run_dir"]), env.is_main)
    if env.restart:
        logger.info(f"ray train: worker group restart {env.restart} of run {config['run']}: resuming from the last "
                    "committed checkpoint")
    trainer = Trainer(job, prepared.schema, prepared.objective, env, resume=resume or env.restart > 0,
                      callbacks=[*callbacks, Report(via="train")])
    summary = trainer.train()
    ranks = dist.gather_objects({"rank": env.rank, **placement()}, env.world_size)
    if env.is_main:
        summary["ray_train"] = {"ranks": ranks, "restart": env.restart, "run": config["run"]}
        storage.atomic_write_bytes(Path(job.out) / "summary.json",
                                   lambda fh: fh.write(json.dumps(summary, indent=2).encode()))


def configs(job: TrainJob, run: str):
    """ScalingConfig, RunConfig and TorchConfig of `job` (see the module docstring)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    la = job.launch
    gpus = la.gpus_per_worker
    resources = {"CPU": la.cpus_per_worker, **({"GPU": gpus} if gpus else {}), **la.resources_per_worker}
    scaling = ScalingConfig(num_workers=la.workers or job.nproc, use_gpu=gpus > 0, resources_per_worker=resources,
                            placement_strategy=la.placement_strategy)
    storage_path = _abs(la.storage_path) or str(Path(job.out) / "ray-train")
    run_config = RunConfig(name=run, storage_path=storage_path, failure_config=FailureConfig(max_failures=la.max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints))
    torch_config = TorchConfig(backend="nccl" if gpus else "gloo", timeout_s=int(la.timeout_s))
    return scaling, run_config, torch_config


def launch(prepared, resume: bool = False, callbacks: Sequence = (), run_callbacks: Sequence = ()) -> dict[str, Any]:
    """Run the prepared job as a TorchTrainer; return rank 0's summary. `callbacks` go to the
    trainer on every rank, `run_callbacks` to Ray Train's controller (e.g. Tune's reporter)."""
    from ray.train.torch import TorchTrainer

    job = prepared.job
    connect(address(job))
    run = f"{job.role}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    scaling, run_config, torch_config = configs(job, run)
    run_config.callbacks = list(run_callbacks) or None
    logger.info(f"ray train: {scaling.num_workers} worker(s) x {scaling.resources_per_worker} "
                f"({torch_config.backend}), max_failures {job.launch.max_failures}, run {run_config.storage_path}/{run}")
    config = {"prepared": prepared, "resume": resume, "callbacks": list(callbacks), "run": run,
              "run_dir": str(Path(run_config.storage_path) / run), "log_level": log.current_level()}
    trainer = TorchTrainer(worker, train_loop_config=config,
                           scaling_config=scaling, run_config=run_config, torch_config=torch_config)
    try:
        trainer.fit()
    except Exception as e:  # TrainingFailedError: the workers printed their tracebacks
        raise RankFailure(f"ray train: {' '.join(str(e).split())[:600]} (after {job.launch.max_failures} "
                          "restart(s)); what was committed is in the run's checkpoints: rerun with --resume") from None
    # rank 0 wrote it to `out`, which the driver sees (shared storage on a cluster, as for checkpoints)
    path = Path(job.out) / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if summary.get("ray_train", {}).get("run") != run:
        raise RankFailure(f"ray train: run {run} finished but {path} is not its summary (is `out` shared storage?)")
    return summary
