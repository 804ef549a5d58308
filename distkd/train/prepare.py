"""The preflight every entry point runs before any rank trains, and the rank's worker.

`prepare(job)` loads the schema and builds the objective: caches are opened and checked
against the logs here, once per process, so a wrong job file, cache or teacher is one line
naming the file (exit 2), not a traceback from every rank. The `Prepared` result is plain
data: launchers hand it to their ranks (pickled) instead of preparing again there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from distkd import dist, log, objectives, storage
from distkd.config import ConfigError
from distkd.data.roles import view
from distkd.data.schema import Schema, load_schema
from distkd.objectives.base import Objective, ObjectiveContext
from distkd.train.init import plan_init
from distkd.train.job import TrainJob
from distkd.train.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    job: TrainJob
    schema: Schema
    objective: Objective
    where: str = "config"


def prepare(job: TrainJob, where: str = "config") -> Prepared:
    logs_schema = load_schema(job.logs)
    try:  # the job's view: a student never reads teacher-only (privileged) features
        schema = view(logs_schema, job.features, job.role)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if left := [n for n in logs_schema.feature_names if n not in schema.feature_names]:
        logger.info(f"{job.role}: reads {len(schema.feature_names)} of the logs' features; not {left}")
    weights = job.train.task_weights or [1.0] * len(schema.binary)
    if len(weights) != len(schema.binary):
        raise ConfigError(f"{where}: train.task_weights: {len(weights)} weights for {len(schema.binary)} binary tasks")
    try:
        objective = objectives.build(job.objective, ObjectiveContext(schema, job.logs, weights, where, job.partitions))
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    if job.init.path:  # what the ranks will load, checked (and the adaptations logged) once, here
        try:
            plan = plan_init(job.init, schema, objective.model_config(job.model))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        for note in plan.notes:
            logger.info(f"init: {note}")
    storage.ensure_writable_dir(job.out, "run's output directory (out)")  # after every check that can refuse the job
    return Prepared(job, schema, objective, where)


def run_rank(prepared: Prepared, resume: bool = False, callbacks: Sequence = ()) -> dict[str, Any]:
    """One rank: join the process group, train, leave. Returns the summary."""

    job = prepared.job
    log.setup()  # a spawned rank starts with logging unconfigured; the level comes from the environment
    env = dist.init(timeout_s=job.launch.timeout_s)
    try:
        summary = Trainer(job, prepared.schema, prepared.objective, env, resume=resume, callbacks=callbacks).train()
    except BaseException:
        dist.abandon()  # no barrier: the other ranks may be stuck in a collective this rank left
        raise
    dist.shutdown()
    return summary
