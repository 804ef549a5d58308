"""Launchers: one trainer, several ways to start its ranks.

    run_job(job)   the preflight, then the ranks: in this process under torchrun (or any
                   launcher that set RANK/WORLD_SIZE); as a Ray Train TorchTrainer when the job
                   selects Ray (distkd.launch.ray_train: `launch.launcher: ray`, or a Ray
                   address); else `job.nproc` local ranks through the elastic launcher
                   (distkd.launch.local), with `launch.max_restarts`.

Restarts come from the launcher; resuming from the last committed checkpoint is the
trainer's (it resumes by itself when the launcher says this is a restart).
"""

from __future__ import annotations

from typing import Any, Sequence

from distkd.dist import under_launcher
from distkd.train.job import TrainJob
from distkd.train.prepare import prepare, run_rank
from distkd.launch import ray_train
from distkd.launch.local import launch
from distkd import objectives
from distkd.config import load


def run_job(job: TrainJob, *, resume: bool = False, where: str = "config", callbacks: Sequence = ()) -> dict[str, Any]:
    """Preflight `job`, run its ranks, return rank 0's summary. `callbacks` (fn(trainer), after
    each step) go to every rank's trainer."""

    use_ray = not under_launcher() and ray_train.selected(job)
    if use_ray:
        job = ray_train.absolute(job)  # Ray workers do not start in this folder
    prepared = prepare(job, where)
    callbacks = list(callbacks)
    if under_launcher():
        return run_rank(prepared, resume, callbacks)
    if use_ray:
        return ray_train.launch(prepared, resume, callbacks)
    return launch(run_rank, job.nproc, prepared, resume, callbacks, max_restarts=job.launch.max_restarts,
                  timeout_s=job.launch.timeout_s)[0]


def run(args) -> int:
    """`distkd teacher train`, `distkd student train`, `distkd distill`."""

    where = args.config or "config"
    job = load(TrainJob, args.config, [f"role={args.role}"] + list(args.overrides))
    if getattr(args, "distill_required", False):
        objectives.require_distilling(job.objective, where)
    if args.nproc is not None:
        job.nproc = args.nproc
    if getattr(args, "max_restarts", None) is not None:
        job.launch.max_restarts = args.max_restarts
    if getattr(args, "ray_address", None):
        job.launch.ray_address = args.ray_address
    # `callbacks`: set by distkd.cli.main's caller (a program embedding the CLI, or the tests' fault
    # wrappers); the parser never sets it
    summary = run_job(job, resume=args.resume, where=where, callbacks=getattr(args, "callbacks", ()))
    return 0 if summary else 1
