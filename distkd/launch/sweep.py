"""`distkd sweep --config jobs/demo/sweep.yaml`: many students from one cache, as Ray Tune trials.

A sweep file names a base job (a distill or student train job file), the fields to search
(any `key=value` path of the job: objective.temperature, objective.losses.*, optim.*, model.*,
train.*) and how: the metric to rank by (a validation metric, `valid/<task>/<metric>` or
`valid/mean/<metric>`), mode, num_samples, max_concurrent, the scheduler (ASHA: grace period
and reduction factor, in validation passes) and the search algorithm (random, grid, or optuna
where installed). A `kd:` study and an optional `hard:` study (the hard-label student, its
learning rates searched the same way) run one after the other; `final_seeds` then retrains each
study's best settings once per seed, and the best students are compared with the teacher in
the usual report (distkd.launch.sweep_report).

The trainable is a Tune function trainable running the one trainer on one rank (a one-rank
gloo group in the trial's process): on a 2-CPU machine that lets two trials run at once, and
each validation pass (`train.eval_every`) is a `tune.report`, which ASHA acts on. With
`ranks_per_trial > 1` the trial instead starts a Ray Train TorchTrainer of that many workers
(distkd.launch.ray_train) whose rank 0 reports through Ray Train to Tune.

Every trial reads the same logs and cache (absolute paths, nothing copied) and writes its own
run under `<out>/<study>/trials/<trial id>`. The driver draws every trial's parameters itself
(or, with optuna, records each as Tune's searcher proposes it) and keeps the trial list, each
trial's status and last result in distkd's own JSON, `<out>/<study>/state.json`
(distkd.launch.sweep_state). A rerun reads only that file: finished trials are kept, unfinished
ones run again as a fresh Tune experiment over their fixed parameters and continue from their
own last committed checkpoint. Tune writes each run's experiment under
`<out>/tune/<study>/run-*`, and nothing there is ever read back (no Tuner.restore: it unpickles).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from distkd import dist, log, storage
from distkd.config import ConfigError, apply_overrides, from_dict, load, read_yaml
from distkd.evaluate import HARD, KD, TEACHER, evaluate_models
from distkd.launch.sweep_report import Record, best_of_studies, exports, final, rows, write_table
from distkd.launch.sweep_state import StudyState, draw, fingerprint
from distkd.report import format_comparison, write_report
from distkd.train.job import TrainJob
from distkd.launch.ray_train import Report, connect, valid_scalars
from distkd.train.checkpoint import latest
from distkd.train.prepare import prepare
from distkd.train.trainer import Trainer
from distkd.launch import ray_train

# Ray Tune's schedulers/searchers and optuna (optional) are imported where trials run: a finished study needs neither.

logger = logging.getLogger(__name__)

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class Study:
    base: str = ""  # the job file every trial starts from
    overrides: list[str] = field(default_factory=list)  # fixed for every trial
    space: dict[str, dict[str, Any]] = field(default_factory=dict)  # path: {grid|choice|uniform|loguniform|randint: [...]}

    def validate(self) -> None:
        if not self.base:
            raise ConfigError("base: the job file to search over is required")
        for key, spec in self.space.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ConfigError(f"space.{key}: one of {{{'|'.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list) or not values:
                raise ConfigError(f"space.{key}.{kind}: a non-empty list, got {values!r}")
            if kind in ("uniform", "loguniform", "randint") and (len(values) != 2 or values[0] >= values[1]):
                raise ConfigError(f"space.{key}.{kind}: [low, high] with low < high, got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"space.{key}.loguniform: low must be > 0, got {values[0]}")


@dataclass
class SchedulerConfig:
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # validation passes a trial always gets
    reduction_factor: float = 2.0
    max_t: Optional[int] = None  # validation passes of a whole run (default: max_steps / eval_every of the base job)


@dataclass
class SweepConfig:
    out: str = "runs/demo/sweep"
    kd: Study = field(default_factory=Study)
    hard: Optional[Study] = None
    teacher: Optional[str] = None  # export compared with the best students in the report
    metric: str = "valid/mean/auc"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 4
    max_concurrent: int = 2
    search: Literal["random", "grid", "optuna"] = "random"
    seed: int = 0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    ranks_per_trial: int = 1
    cpus_per_rank: float = 1.0
    gpus_per_rank: float = 0.0
    max_failures: int = 1  # a trial that errors is retried this often (it resumes from its checkpoint)
    ray_address: Optional[str] = None  # null: RAY_ADDRESS, else an embedded Ray
    final_seeds: list[int] = field(default_factory=list)  # the best settings retrained once per seed
    report_split: str = "test"

    def validate(self) -> None:
        if not self.metric.startswith("valid/") or len(self.metric.split("/")) != 3:
            raise ConfigError(f"metric: valid/<task or mean>/<auc|logloss|ne|calibration>, got {self.metric!r}")
        if min(self.num_samples, self.max_concurrent, self.ranks_per_trial) < 1:
            raise ConfigError("num_samples, max_concurrent and ranks_per_trial must be >= 1")

    def studies(self) -> dict[str, Study]:
        return {"kd": self.kd, **({"hard": self.hard} if self.hard else {})}


# -- the job of one trial ---------------------------------------------------------------------


def _abs(path):

    return path if path is None or storage.is_remote(path) else str(Path(path).resolve())


def base_job(study: Study, extra: list[str] = (), teacher: Optional[str] = None) -> dict:
    """The study's base job as a dict with its overrides and absolute paths (trials run elsewhere).
    With `teacher`, a cache root laid out as the demo's (<cache>/<teacher sha256[:12]>/) resolves
    to that teacher's cache."""
    data = apply_overrides(read_yaml(study.base), list(study.overrides) + list(extra), where=study.base)
    data["logs"] = _abs(data.get("logs", "runs/demo/logs"))
    sha = None
    if teacher and (Path(teacher) / "export.json").is_file():
        sha = json.loads((Path(teacher) / "export.json").read_text())["sha256"]
    for t in (data.get("objective") or {}).get("teachers") or []:
        for k in ("cache", "export"):
            if t.get(k):
                t[k] = _abs(t[k])
        own = Path(t["cache"]) / sha[:12] if sha and t.get("cache") else None
        if own and not (Path(t["cache"]) / "manifest.json").is_file() and (own / "manifest.json").is_file():
            t["cache"], t["sha256"] = str(own), sha
    return data


def overrides_of(params: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in sorted(params.items())]


def trial_job(data: dict, params: dict[str, Any], out: Path, where: str):

    job = from_dict(TrainJob, apply_overrides(data, overrides_of(params) + [f"out={out}", "tensorboard=false"], where),
                    where)
    return job


def check(cfg: SweepConfig, where: str) -> None:
    """Every study's base job loads with the space's first values: a typo fails before any trial."""
    for name, study in cfg.studies().items():
        data = base_job(study, teacher=cfg.teacher)
        first = {k: next(iter(v.values()))[0] for k, v in study.space.items()}
        try:
            trial_job(data, first, Path(cfg.out) / "check", f"{where}: {name}")
        except ConfigError as e:
            raise ConfigError(f"{e} (base {study.base} with the space's first values)") from None


# -- the trainable ------------------------------------------------------------------------------


def flat(prefix: str, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{prefix}/{t}/{m}": float(v) for t, ms in metrics.items() for m, v in ms.items()
            if isinstance(v, (int, float)) and m != "rows"}


def trainable(config: dict, meta: dict) -> None:
    """One trial: the base job with this trial's parameters, trained and reported to Tune."""
    from ray import tune


    log.setup(meta["log_level"])  # a trial's Ray worker starts with logging unconfigured, perhaps on another node
    out = Path(meta["trials"]) / (config.get("__trial") or tune.get_context().get_trial_id())
    job = trial_job(meta["job"], {k: v for k, v in config.items() if not k.startswith("__")}, out, meta["where"])
    resume = latest(out / "checkpoints") is not None  # a restored or retried trial continues its own run
    t0 = time.time()
    if meta["ranks"] > 1:
        summary = _on_ray_train(job, resume, meta)
        last = {}
    else:
        prepared = prepare(job, meta["where"])
        env = dist.init(timeout_s=job.launch.timeout_s)
        report = Report(via="tune")
        summary = Trainer(job, prepared.schema, prepared.objective, env, resume=resume, callbacks=[report]).train()
        dist.shutdown()
        last = report.last
    tune.report({**last, **valid_scalars(summary["valid"]), **flat("test", summary["test"]),
                 "step": summary["steps"], "finished": 1, "train_seconds": time.time() - t0})


def _on_ray_train(job, resume: bool, meta: dict) -> dict:
    from ray.tune.integration.ray_train import TuneReportCallback


    la = dataclasses.replace(job.launch, launcher="ray", workers=meta["ranks"], cpus_per_worker=meta["cpus"],
                             gpus_per_worker=meta["gpus"])
    job = ray_train.absolute(dataclasses.replace(job, launch=la))
    return ray_train.launch(prepare(job, meta["where"]), resume, (), run_callbacks=[TuneReportCallback()])


# -- the search ----------------------------------------------------------------------------------


def param_space(study: Study, search: str) -> dict[str, Any]:
    from ray import tune

    space = {}
    for key, spec in study.space.items():
        kind, v = next(iter(spec.items()))
        if kind == "grid" and search != "optuna":
            space[key] = tune.grid_search(v)
        elif kind in ("grid", "choice"):
            space[key] = tune.choice(v)
        elif kind == "uniform":
            space[key] = tune.uniform(*v)
        elif kind == "loguniform":
            space[key] = tune.loguniform(*v)
        else:
            space[key] = tune.randint(v[0], v[1] + 1)  # inclusive, as written
    return space


def max_validations(job) -> int:
    """Validation passes a whole run of `job` makes (ASHA's max_t), from its max_steps/eval_every."""
    loop = job.train
    if loop.eval_every and loop.max_steps:
        return max(1, loop.max_steps // loop.eval_every)
    return loop.epochs if not loop.eval_every else 100


def searcher(cfg: SweepConfig, done: list[dict] = ()):
    """Tune's OptunaSearch, seeded, told the results of `done` trials (kept from an earlier run)."""
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("search: optuna needs the optuna package (pip install optuna); or use random | grid") from None
    done = [t for t in done if (t.get("result") or {}).get(cfg.metric) is not None]
    if not done:
        return OptunaSearch(seed=cfg.seed)
    return OptunaSearch(seed=cfg.seed, points_to_evaluate=[dict(t["params"]) for t in done],
                        evaluated_rewards=[t["result"][cfg.metric] for t in done])


def scheduler(cfg: SweepConfig, job):
    if cfg.scheduler.kind == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.scheduler
    # ASHA stops a trial whose time reaches max_t: one past the last validation, so a trial that
    # survives every rung finishes its run (test split, export) and reports it
    max_t = (s.max_t or max_validations(job)) + 1
    return ASHAScheduler(time_attr="validations", max_t=max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def run_study(cfg: SweepConfig, name: str, study: Study, where: str, extra: list[str] = (),
              points: Optional[list[dict]] = None, asha: bool = True) -> StudyState:
    """One study, its trials in <out>/<name>/state.json: those not finished there run (all of
    them the first time), as a fresh Tune experiment; `points` fixes the trial list instead of
    drawing it from the space. Returns the study's state."""
    out = Path(cfg.out).resolve()
    data = base_job(study, extra, cfg.teacher)
    probe = trial_job(data, {}, out, where)
    model_based = points is None and cfg.search == "optuna"
    fp = fingerprint(study, "fixed" if points is not None else cfg.search, cfg.seed,
                     len(points) if points is not None else cfg.num_samples, extra, points)
    if points is None and not model_based:  # random | grid: every trial drawn here, up front
        points = draw(study.space, cfg.num_samples, cfg.seed, name)
    state, resumed = StudyState.open(out / name, name, fp, points)
    if resumed:
        logger.info(f"sweep {name}: resuming {state.path} ({len(state.finished())} finished trials are kept, "
                    f"{len(state.unfinished())} run again)")
    meta = {"job": data, "trials": str(out / name / "trials"), "where": f"{where}: {name}", "ranks": cfg.ranks_per_trial,
            "cpus": cfg.cpus_per_rank, "gpus": cfg.gpus_per_rank, "log_level": log.current_level()}
    # a TorchTrainer trial's own process only waits for its workers: no CPU (Tune needs a bundle: 1 byte)
    per_trial = ({"CPU": 0, "memory": 1} if cfg.ranks_per_trial > 1 else
                 {"CPU": cfg.cpus_per_rank, **({"GPU": cfg.gpus_per_rank} if cfg.gpus_per_rank else {})})
    todo = state.unfinished()
    if todo:  # the listed trials not finished yet, their parameters fixed
        from ray.tune.search.basic_variant import BasicVariantGenerator

        keys = sorted({k for t in todo for k in t["params"]})
        fixed = [{"__trial": t["id"], **t["params"]} for t in todo]
        _fit(cfg, state, per_trial, meta, {"__trial": None, **{k: None for k in keys}}, len(fixed),
             BasicVariantGenerator(points_to_evaluate=fixed, max_concurrent=cfg.max_concurrent),
             scheduler(cfg, probe) if asha else None)
    left = cfg.num_samples - len(state.trials) if model_based else 0
    if left > 0:  # optuna: the proposals not made yet, told the results so far
        _fit(cfg, state, per_trial, meta, param_space(study, cfg.search), left, searcher(cfg, state.finished()),
             scheduler(cfg, probe) if asha else None)
    final(state)
    return state


_RUNS = itertools.count()


def _fit(cfg: SweepConfig, state: StudyState, per_trial: dict, meta: dict, space: dict, num_samples: int, search_alg,
         asha) -> None:
    """One Tune run, a new experiment under <out>/tune/<study>/run-<time>-<pid> (written by Tune, never read)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator


    connect(cfg.ray_address or os.environ.get("RAY_ADDRESS"))  # only when trials run: a finished study needs no Ray
    run = f"run-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{next(_RUNS)}"
    fn = tune.with_resources(tune.with_parameters(trainable, meta=meta), per_trial)
    tuner = tune.Tuner(
        fn, param_space=space,
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, num_samples=num_samples,
                                    search_alg=search_alg, scheduler=asha,
                                    max_concurrent_trials=None if isinstance(search_alg, BasicVariantGenerator)
                                    else cfg.max_concurrent,
                                    trial_dirname_creator=lambda t: t.config.get("__trial") or t.trial_id),
        run_config=tune.RunConfig(name=run, storage_path=str(Path(cfg.out).resolve() / "tune" / state.study),
                                  callbacks=[Record(state, run, cfg.metric, cfg.mode)], verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures)))
    tuner.fit()


def finish(cfg: SweepConfig, states: dict[str, StudyState], where: str) -> int:
    """The studies' tables and best exports; then the winners retrained per final seed and the report."""
    best = best_of_studies(cfg, states)
    if best is None:
        return 1
    out = Path(cfg.out).resolve()
    students: dict[str, list[str]] = {n: [str(out / n / "best" / "export")] for n in best}
    if cfg.final_seeds:
        for name, row in best.items():
            study = cfg.studies()[name]
            points = [{**{k: row[k] for k in study.space}, "train.seed": seed} for seed in cfg.final_seeds]
            state = run_study(cfg, f"{name}-seeds", study, where, points=points, asha=False)
            students[name] = exports(state)
            write_table(rows(state, cfg.metric, cfg.mode), out / f"{name}-seeds")
    if not cfg.teacher:
        return 0
    logs = base_job(cfg.kd)["logs"]
    models = {TEACHER: [cfg.teacher], KD: students["kd"], **({HARD: students["hard"]} if "hard" in students else {})}
    result = evaluate_models(logs, models, split=cfg.report_split)
    result["command"] = f"distkd sweep --config {where}"
    path = write_report(result, out / "report")
    print(format_comparison(result))
    print(f"\nreport: {path}")
    return 0


def run(args) -> int:
    """`distkd sweep --config SWEEP.yaml [key=value ...]`."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # checkpoint-only reports carry no metric
    where = args.config
    cfg = load(SweepConfig, args.config, list(args.overrides or []))
    check(cfg, where)
    states = {name: run_study(cfg, name, study, where) for name, study in cfg.studies().items()}
    return finish(cfg, states, where)
