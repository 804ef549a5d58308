"""`distkd eval`: the teacher, the distilled student and the hard-label student on a held-out split.

Every export is loaded once and the split streamed once through the real loader, in one
process; with `nproc: K` (`--nproc K`) the teacher is loaded sharded over K local ranks (its
tables never whole in one process), each scoring its share of the rows. Per export: per-task metrics (TaskMetrics), a subsample of its probabilities for
calibration curves, its parameter count and its CPU inference rate (forward passes only,
decode excluded, one torch thread). The seeds of one setup are reduced to mean, std and n.

    η = (m_KD − m_hard) / (m_teacher − m_hard)

is the share of the teacher–student gap that distillation recovers, from the seed means and,
where seeds line up, per seed. On synthetic logs the true probabilities (the schema's eval
columns) give an "oracle" row: the best any model can score against these labels.

With `serving: true` the report adds serving figures (distkd.serve.figures): the teacher,
the first distilled student and that student with int8 tables as TorchScript serving files,
their sizes and p50/p99 latency at batch 1, 64 and 1024 on one CPU thread, and the AUC the
int8 tables cost.
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from distkd import dist, log, storage
from distkd.config import ConfigError, load, to_dict
from distkd.models.export import load_export, read_meta, resolve_export
from distkd.models.sharding_plan import ShardingConfig, describe_plan, shard_for_inference
from distkd.data.layout import PartitionRange, split_files
from distkd.data.loader import LogLoader
from distkd.data.plan import range_of
from distkd.launch.local import launch
from distkd.metrics import SchemaMetrics, TaskMetrics
from distkd.report import format_comparison, write_report
from distkd.data import roles
from distkd.data.schema import LogsError, Schema, load_schema
from distkd.eval_stats import (CURVE_BINS, GAP_METRICS, HARD, KD, MIN_GAP, ORACLE, TEACHER,  # noqa: F401 (re-exported)
                               _by_seed, calibration_curve, gap_recovered, gap_report, paired_differences, seed_pairs,
                               spread, t_interval)
from distkd.metrics_retrieval import RetrievalMetrics
from distkd.serve.figures import serving_figures

logger = logging.getLogger(__name__)

CURVE_ROWS = 1_000_000  # at most this many rows per export kept for calibration curves
RESULT_FORMAT = 1


@dataclass
class EvalJob:
    logs: str = ""
    teacher: str = ""  # export directory, or a training run directory holding export/
    kd: list[str] = field(default_factory=list)  # one per seed
    hard: list[str] = field(default_factory=list)  # one per seed
    out: str = ""  # report directory
    split: str = "test"
    batch_size: int = 16384
    partitions: dict[str, PartitionRange] = field(default_factory=dict)  # partitioned logs (distkd.data.layout)
    serving: bool = False  # add file sizes, latency and the int8 AUC cost (distkd.serve.figures)
    nproc: int = 1  # local ranks the teacher's tables are sharded over for its metrics (students: one process)

    def check(self) -> None:
        missing = [n for n in ("logs", "teacher", "kd", "hard", "out") if not getattr(self, n)]
        if missing:
            raise ConfigError(f"eval: missing {', '.join(missing)} (give --{' --'.join(missing)} or a --config)")
        if self.batch_size < 1:
            raise ConfigError(f"eval: batch_size must be >= 1, got {self.batch_size}")
        if self.nproc < 1:
            raise ConfigError(f"eval: nproc must be >= 1, got {self.nproc}")
        for d in self.kd + self.hard:
            if "=" in d and not Path(d).exists():
                raise ConfigError(f"eval: '{d}' looks like a key=value override caught by --kd/--hard; "
                                  "put overrides before the options")


# -- inputs -----------------------------------------------------------------------------


def check_export(export_dir: Path, schema: Schema, logs: str | Path) -> Schema:
    """The view of the logs the export reads (a teacher: every feature; a student: the shared
    ones), checked against its fingerprint."""
    meta = read_meta(export_dir)
    got = meta.get("schema_fingerprint")
    try:
        view = roles.view(schema, meta.get("features"))
    except ConfigError as e:
        raise ConfigError(f"{export_dir}: exported for schema {got}, which reads features the logs {logs} lack: "
                          f"{e}") from None
    if got != view.fingerprint():
        raise ConfigError(f"{export_dir}: exported for schema {got}, but the logs {logs} have schema "
                          f"{view.fingerprint()}; evaluate a model on logs with the schema it was trained on")
    return view


# -- one export -------------------------------------------------------------------------


def _every(row0: int, n: int, stride: int) -> np.ndarray:
    """Indices of a batch's rows whose global row number is a multiple of `stride`."""
    return np.arange((-row0) % stride, n, stride)


class Scored(NamedTuple):
    metrics: SchemaMetrics  # not yet computed (collective under a process group)
    probs: np.ndarray  # [N', T] float32: every `stride`-th row's probabilities (binary tasks)
    labels: np.ndarray  # [N', T], the same rows' labels
    seconds: float  # in forward passes
    rows: int


def score(model: torch.nn.Module, loader: LogLoader, stride: int = 1, row0: int = 0) -> Scored:
    """Stream the loader's rows through `model`, keeping the rows whose global number is a
    multiple of `stride` for calibration curves (`row0`: the global number of the loader's first
    row). The first batch runs twice (a warm-up, untimed: first-call setup is not inference);
    with a sharded model, every rank calls it as often (its loader has as many batches)."""
    metrics = SchemaMetrics(loader.schema)
    binary = bool(loader.schema.binary)  # calibration curves: probabilities of binary tasks only
    probs, labels = [], []
    seconds, n = 0.0, 0
    for batch in loader:
        if n == 0:
            model(batch.sparse, batch.dense)
        t0 = time.perf_counter()
        logits = model(batch.sparse, batch.dense).logits
        seconds += time.perf_counter() - t0
        metrics.update(logits, batch)
        if binary:
            keep = torch.from_numpy(_every(row0 + n, len(batch), stride))
            probs.append(torch.sigmoid(logits[keep].float()).numpy())
            labels.append(batch.labels[keep].numpy())
        n += len(batch)
    if not binary:
        return Scored(metrics, np.empty((0, 0), np.float32), np.empty((0, 0), np.float32), seconds, n)
    return Scored(metrics, np.concatenate(probs), np.concatenate(labels), seconds, n)


def export_entry(export_dir: Path, meta: dict[str, Any], rows: int, seconds: float, metrics: dict) -> dict[str, Any]:
    """A report's record of one export: what it is, its rate and its metrics."""
    return {
        "dir": str(export_dir),
        "sha256": meta["sha256"],
        "role": meta.get("role"),
        "seed": (meta.get("job") or {}).get("train", {}).get("seed"),
        "parameters": int(meta["parameters"]),
        "rows": rows,
        "forward_s": seconds,
        "rows_per_s": rows / seconds if seconds > 0 else float("nan"),
        "metrics": metrics,
    }


@torch.inference_mode()
def evaluate_export(export_dir: Path, loader: LogLoader, stride: int = 1) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics, CPU rate and parameter count of one export over the loader's split, on this process.

    Returns (entry, probabilities [N', T] float32, labels [N', T]) for every `stride`-th row.
    """
    model, meta = load_export(export_dir)
    s = score(model, loader, stride)
    return export_entry(export_dir, meta, s.rows, s.seconds, s.metrics.compute()), s.probs, s.labels


def evaluate_sharded(export_dir: Path, files: list[str], schema: Schema, batch_size: int, stride: int, nproc: int,
                     threads: int = 1) -> tuple[dict, np.ndarray, np.ndarray]:
    """`evaluate_export` with the export's tables sharded over `nproc` local ranks (the
    elastic launcher): each rank loads only its shards and scores its contiguous share of the
    split, the forward model-parallel; the metrics are reduced over the ranks, and the sampled
    probabilities gathered in global row order: the one-process result up to float rounding."""
    return launch(_sharded_rank, nproc, export_dir, files, schema, batch_size, stride, threads)[0]


def _sharded_rank(export_dir: Path, files: list[str], schema: Schema, batch_size: int, stride: int, threads: int):
    """One rank of `evaluate_sharded`; rank 0 returns the result, the others None."""
    log.setup()  # a spawned rank starts with logging unconfigured
    env = dist.init()
    torch.set_num_threads(threads)
    try:
        loader = LogLoader(files, schema, batch_size, rank=env.rank, world_size=env.world_size, prefetch=0)
        model, meta = load_export(export_dir, parallel=lambda m: shard_for_inference(m, env, ShardingConfig()))
        with torch.no_grad():
            s = score(model, loader, stride, row0=range_of(loader.total_rows, env.world_size, env.rank)[0])
        metrics = s.metrics.compute()  # collective: sums all-reduced, AUC states gathered
        parts = dist.gather_objects((s.probs, s.labels, s.seconds, s.rows), env.world_size)
        plan = describe_plan(model)
    except BaseException:
        dist.abandon()  # no barrier: another rank may be stuck in a collective this one left
        raise
    dist.shutdown()
    if not env.is_main:
        return None
    logger.info("%s: teacher metrics on %d ranks, plan %s", export_dir, env.world_size, plan)
    # the ranks ran side by side: the split took as long as the slowest rank's forward passes
    entry = export_entry(export_dir, meta, sum(p[3] for p in parts), max(p[2] for p in parts), metrics)
    entry.update(nproc=env.world_size, plan=plan)
    return entry, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def oracle_metrics(files: list[str], schema: Schema) -> Optional[dict[str, dict[str, float]]]:
    """Metrics of the true probabilities, or None where the logs have none.

    By convention the true probability of task T is the evaluation-only column `p_T`
    (synthetic logs have them); other evaluation columns (MovieLens keeps `rating`) are not
    probabilities and never make an oracle. A next-item task's oracle is the eval column
    `oracle_rank`: the label's rank under the true distribution (synthetic next-item logs)."""
    if schema.classes:
        return _next_item_oracle(files, schema)
    oracle = [f"p_{task}" for task in schema.task_names]
    if not set(oracle) <= set(schema.eval_columns):
        return None
    metrics = TaskMetrics(schema.task_names)
    for path in files:
        pf = storage.open_parquet(path)
        try:
            if any(pf.schema_arrow.get_field_index(c) < 0 for c in oracle):
                raise LogsError(f"{path}: missing eval column(s) {oracle} named by the schema")
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g, columns=schema.label_columns + oracle)
                y = np.stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
                              for c in schema.label_columns], 1)
                p = np.stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                              for c in oracle], 1).clip(1e-7, 1 - 1e-7)
                metrics.update(torch.from_numpy(np.log(p) - np.log1p(-p)), torch.from_numpy(y))
        finally:
            pf.close()
    return metrics.compute()


def _next_item_oracle(files: list[str], schema: Schema) -> Optional[dict[str, dict[str, float]]]:

    if "oracle_rank" not in schema.eval_columns or len(schema.classes) != 1:
        return None
    task = schema.classes[0]
    metrics = RetrievalMetrics(task.num_classes)
    for path in files:
        with storage.open_parquet(path) as pf:
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g, columns=[task.label, "oracle_rank"])
                keep = t.column(task.label).is_valid().to_numpy(zero_copy_only=False)
                ranks = t.column("oracle_rank").to_numpy(zero_copy_only=False)[keep]
                metrics.update_ranks(torch.from_numpy(np.asarray(ranks, np.float64)))
    return {task.name: metrics.compute()}


# -- the whole comparison -----------------------------------------------------------------


def evaluate_models(logs: str | Path, models: dict[str, list[str]], split: str = "test", batch_size: int = 16384,
                    *, threads: int = 1, curve_rows: int = CURVE_ROWS, gap=(TEACHER, KD, HARD),
                    partitions=None, serving_dir: Optional[str | Path] = None,
                    serving_calls: Optional[dict[int, int]] = None, teacher_nproc: int = 1) -> dict[str, Any]:
    """Evaluate every export of every named model on `split`; see the module docstring.
    With `serving_dir`, the serving figures too (files written there). With `teacher_nproc`
    > 1, the teacher's metrics come from its tables sharded over that many local ranks."""
    schema = load_schema(logs)
    files = split_files(str(logs), split, partitions)
    if ORACLE in models:
        raise ConfigError(f"'{ORACLE}' is reserved for the true-probability row; name the model otherwise")
    dirs: dict[str, list[Path]] = {}
    views: dict[Path, Schema] = {}  # what each export reads: a student never sees teacher-only features
    for name, given in models.items():
        if not given:
            raise ConfigError(f"{name}: no export directory given")
        dirs[name] = [resolve_export(d) for d in given]
        for d in dirs[name]:
            views[d] = check_export(d, schema, logs)  # every input checked before any work
    # one loader per view, decoding inline: nothing competes with the timing
    loaders = {fp: LogLoader(files, v, batch_size, prefetch=0) for fp, v in
               {v.fingerprint(): v for v in [schema, *views.values()]}.items()}
    loader = loaders[schema.fingerprint()]
    stride = max(1, math.ceil(loader.num_rows / curve_rows))

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[str, dict] = {}
    try:
        for name, exports in dirs.items():
            entries, probs, labels = [], [], None
            for d in exports:
                if name == TEACHER and teacher_nproc > 1:
                    entry, p, y = evaluate_sharded(d, files, views[d], batch_size, stride, teacher_nproc, threads)
                else:
                    entry, p, y = evaluate_export(d, loaders[views[d].fingerprint()], stride)
                entry["features"] = views[d].feature_names
                entries.append(entry)
                probs.append(p)
                labels = y
            pooled_p, pooled_y = np.concatenate(probs), np.tile(labels, (len(probs), 1))
            out[name] = {
                "n": len(entries),
                "exports": entries,
                "metrics": {t: {m: spread([e["metrics"][t][m] for e in entries]) for m in entries[0]["metrics"][t]}
                            for t in schema.task_names},
                "parameters": spread([e["parameters"] for e in entries]),
                "rows_per_s": spread([e["rows_per_s"] for e in entries]),
                "calibration": {t: calibration_curve(pooled_p[:, i], pooled_y[:, i])
                                for i, t in enumerate(schema.binary_names)},
            }
            del probs, pooled_p, pooled_y
        serving = None
        if serving_dir is not None and TEACHER in dirs and KD in dirs and not schema.classes:  # ranking models only
            serving = serving_figures({TEACHER: dirs[TEACHER][0], KD: dirs[KD][0]}, loader, files, serving_dir,
                                      {n: out[n]["exports"][0]["metrics"] for n in (TEACHER, KD)},
                                      calls=serving_calls)
    finally:
        torch.set_num_threads(old_threads)

    oracle = oracle_metrics(files, schema)
    if oracle is not None:
        out[ORACLE] = {"n": 1, "exports": [], "source": schema.eval_columns, "parameters": None,
                       "rows_per_s": None, "calibration": {},
                       "metrics": {t: {m: spread([v]) for m, v in ms.items()} for t, ms in oracle.items()}}
    return {
        "format": RESULT_FORMAT,
        "logs": str(logs),
        "split": split,
        "rows": loader.num_rows,
        "tasks": schema.task_names,
        "schema_fingerprint": schema.fingerprint(),
        "batch_size": batch_size,
        "threads": threads,
        "teacher_nproc": teacher_nproc,
        "torch": torch.__version__,
        "curve_every": stride,
        "models": out,
        "eta": {t: gap_report(out, t, gap) for t in schema.task_names} if set(gap) <= set(out) else {},
        "paired": paired_differences(out, schema.task_names, gap[1], gap[2]),
        "min_gap": MIN_GAP,
        **({"serving": serving} if serving is not None else {}),
    }


# -- command line -------------------------------------------------------------------------


def job_from_args(args) -> EvalJob:
    """The job YAML (`--config`) plus key=value overrides, then any flag given on the command line."""
    job = load(EvalJob, getattr(args, "config", None), list(getattr(args, "overrides", None) or []))
    for name in ("logs", "teacher", "kd", "hard", "out", "split", "batch_size", "serving", "nproc"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(job, name, list(value) if isinstance(value, (list, tuple)) else value)
    job.check()
    return job


def command_line(job: EvalJob) -> str:
    """The flags-only command that reproduces this evaluation."""
    return shlex.join(["distkd", "eval", "--logs", job.logs, "--teacher", job.teacher, "--kd", *job.kd,
                       "--hard", *job.hard, "--out", job.out, "--split", job.split,
                       "--batch-size", str(job.batch_size), *(["--serving"] if job.serving else []),
                       *(["--nproc", str(job.nproc)] if job.nproc > 1 else [])])


def run(args) -> int:
    """`distkd eval`."""
    job = job_from_args(args)
    result = evaluate_models(job.logs, {TEACHER: [job.teacher], KD: job.kd, HARD: job.hard},
                             job.split, job.batch_size, partitions=job.partitions,
                             serving_dir=Path(job.out) / "serving" if job.serving else None, teacher_nproc=job.nproc)
    result["command"] = command_line(job)
    result["job"] = to_dict(job)
    path = write_report(result, job.out)
    print(format_comparison(result))
    print(f"\nreport: {path}")
    return 0
