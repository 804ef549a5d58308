"""`distkd cache build`: the teacher's logits for every row of every log shard, exactly once.

Read top to bottom: check the teacher export against the logs, take the directory's build
lock, remove temporary files of interrupted runs, reconcile the plan with an existing
manifest (another teacher, schema, layout or changed log shards: refuse; committed shards
whose fingerprints match: skip), write the plan, run the remaining shards on a Ray actor
pool, and commit each shard to the manifest as it arrives. Only this driver writes the
manifest, atomically; a shard not in it is recomputed by the next run.

On a cluster, workers open the teacher export and the log shards by the paths given here:
both (and the cache directory) must be on storage every node sees at the same path (a
shared filesystem, or object storage mounted at one path), and `distkd` must be installed
in the workers' image. Logs and cache may also be object-storage URIs (s3://bucket/logs,
see distkd.storage): workers are given the URIs and resolve them with their own
environment, so the endpoint and credentials (AWS_ENDPOINT_URL, …) must be set on every
node, in the image or the job's runtime_env; Ray workers this driver starts on this machine
inherit its environment. The teacher export stays a path.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from distkd import storage
from distkd.cache.content import codec_for
from distkd.cache.contract import (
    MANIFEST, BuildRun, CacheError, Content, Manifest, SchemaRef, ShardEntry, Teacher, Totals, to_json_value,
    write_manifest,
)
from distkd.cache.lock import writing
from distkd.cache.manifest import cache_file, input_fingerprint, remove_temp_files
from distkd.cache.reconcile import Plan, reconcile
from distkd.cache.topk import TopKFormat
from distkd.cache.worker import CacheWorker, ShardTask
from distkd.config import ConfigError, load, to_dict
from distkd.data.layout import PartitionRange, partition_values, split_files
from distkd.data.schema import SPLITS, load_schema
from distkd.models.teacher import TeacherRef, describe
from distkd.models.teacher_spec import EnsembleSpec, TeacherError, TeacherSpec, as_spec, ensemble, spec_from_args
from distkd.cache.pool import WorkerPool, connect, plan_pool

logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "runs/demo/teacher/export"
MANIFEST_EVERY_S = 2.0  # the manifest is rewritten at most this often while shards commit


@dataclass
class CacheJob:
    # An export directory (export.json + model.pt), or a TeacherSpec mapping (distkd.models.teacher):
    # {factory: pkg.mod:fn, weights: w.pt, input: dict, kwargs: {...}} or {program: t.pt2}.
    teacher: Union[TeacherSpec, str] = DEFAULT_TEACHER
    # An ensemble instead (distkd.models.ensemble): N teachers (export paths or specs) cached as one
    # combined target, `combine` stating how: the mean of their logits or of their probabilities.
    teachers: list[Union[TeacherSpec, str]] = field(default_factory=list)
    combine: Literal["mean_logit", "mean_prob"] = "mean_logit"  # mean_prob: the mean probability, as a logit
    logs: str = "runs/demo/logs"
    out: str = "runs/demo/cache"
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    # Partitioned logs: the partition range of each split named in `splits` (see
    # distkd.data.layout), e.g. {all: {key: dt}} with splits [all] caches every day there is.
    partitions: dict[str, PartitionRange] = field(default_factory=dict)
    # Write into out/<teacher sha256[:12]>/: one cache per teacher version under one root
    # (`distkd cache gc` keeps the newest); readers name the root and the teacher's sha256.
    by_teacher: bool = False
    ray_address: Optional[str] = None  # default: RAY_ADDRESS, else an embedded Ray on this machine
    workers: Optional[int] = None  # default: the cluster's CPUs less one (or one per GPU)
    threads_per_worker: Optional[int] = None  # torch threads = Ray CPUs per worker
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a GPU per worker where the cluster has them
    dtype: Literal["fp16", "fp32"] = "fp16"
    hidden: bool = False  # also cache the teacher's last hidden layer (fp16) for feature distillation
    batch_size: int = 8192
    prefetch: int = 2  # row groups decoded ahead of the teacher, per worker
    max_attempts: int = 3  # per shard, counting worker deaths
    # Ray actors one teacher copy is sharded over (a distkd export: file or sharded form), in a
    # placement group, joined by gloo (nccl on GPUs); `workers` then counts these groups.
    teacher_ranks: int = 1
    group_timeout_s: float = 300.0  # a group's rendezvous, each collective, and its placement
    # A next-item (multiclass) teacher: what each row keeps of its softmax over the catalog
    # (distkd.cache.topk); the default when the logs' task is multiclass.
    topk: Optional[TopKSpec] = None

    def validate(self) -> None:
        if not self.splits:
            raise ConfigError("splits: at least one split")
        for name in ("workers", "threads_per_worker"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        for name in ("batch_size", "prefetch", "max_attempts", "teacher_ranks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if isinstance(self.teacher, str) and storage.is_remote(self.teacher):
            raise ConfigError(f"teacher: {self.teacher}: the export must be a path every worker can open "
                              "(a shared file system); copy it there from object storage")
        if self.teachers and self.teacher != DEFAULT_TEACHER:
            raise ConfigError("give teacher (one) or teachers (an ensemble), not both")
        if self.teachers and self.hidden:
            raise ConfigError("hidden: an ensemble has no one hidden layer to cache")
        spec = self.spec()
        if self.teacher_ranks > 1 and not getattr(spec, "export", None):
            raise ConfigError(f"teacher_ranks: {self.teacher_ranks} shards the teacher over a group of actors, which "
                              f"needs a distkd export (file or sharded); a {spec.form} teacher loads on one process")
        if self.group_timeout_s <= 0:
            raise ConfigError(f"group_timeout_s: must be > 0, got {self.group_timeout_s}")

    def spec(self) -> "TeacherSpec | EnsembleSpec":
        """The teacher the cache is of: one, or the ensemble of `teachers`."""
        return ensemble(self.teachers, self.combine) if self.teachers else as_spec(self.teacher)


@dataclass
class TopKSpec:
    k: int = 64  # the teacher's top-k items and logits per row
    tail: int = 0  # s items sampled from the rest (RS-KD: an unbiased estimate of the tail)
    proposal: Literal["teacher", "uniform"] = "teacher"
    tau: float = 1.0  # temperature of the cached log-sum-exp (and of the proposal): train at this tau

    def validate(self) -> None:
        if self.k < 1 or self.tail < 0 or self.tau <= 0:
            raise ConfigError(f"topk: need k >= 1, tail >= 0, tau > 0; got {self}")


def content_for(job: "CacheJob", schema, hidden_dim: Optional[int]) -> Content:
    """What the cache files hold: per-task logits (CTR) or a top-k of the catalog (next item)."""
    if not schema.classes:
        if job.topk is not None:
            raise ConfigError(f"topk: is for a next-item teacher; the tasks of {job.logs} are binary")
        return Content(job.dtype, job.hidden, hidden_dim, schema.task_names)
    if schema.binary or len(schema.classes) != 1:
        raise ConfigError(f"{job.logs}: a cache of a next-item teacher needs logs with one multiclass task "
                          f"and no binary ones; these have {schema.task_names}")
    if job.hidden:
        raise ConfigError("hidden: caching a next-item teacher's hidden layer is not supported")
    spec = job.topk or TopKSpec()
    n = schema.classes[0].num_classes
    if spec.k > n or (spec.tail and spec.k >= n):
        raise ConfigError(f"topk: k={spec.k} (tail {spec.tail}) for a catalog of {n} items")
    return Content("fp16", False, None, schema.task_names, TopKFormat(num_items=n, **to_dict(spec)))


def _header(job: CacheJob) -> tuple[Manifest, Any]:
    """The manifest's identity part for this job (teacher, schema, content), and the schema."""
    schema = load_schema(job.logs)
    try:  # the fingerprint (distkd.models.teacher); an export's sha256 and schema are checked
        teacher = describe(job.spec(), schema)
    except TeacherError as e:
        raise CacheError(str(e)) from None
    hidden_dim = teacher.pop("hidden_dim", None) if job.hidden else None
    teacher.pop("hidden_dim", None)
    if job.hidden and not hidden_dim:
        raise ConfigError(f"teacher: hidden: true needs hidden_dim (the width of the {teacher['form']} "
                          "teacher's hidden layer) in the teacher spec, or --teacher-hidden-dim")
    header = Manifest(teacher=Teacher(teacher), schema=SchemaRef(schema.fingerprint(), to_dict(schema)),
                      content=content_for(job, schema, hidden_dim), logs=storage.absolute(job.logs))
    return header, schema


def _log_plan(job: CacheJob, out: str, plan: Plan) -> None:
    for split, new in plan.gained.items():
        logger.info(f"cache: split '{split}' gained {len(new)} shard(s) since the last build (first: {new[0]})")
    for rel in plan.gone:
        logger.info(f"cache: log shard {rel} is gone from {job.logs}; dropped its logits from the cache")
    for rel in plan.damaged:
        logger.info(f"cache: {cache_file(out, rel)} is missing or has the wrong size; recomputing that shard")


class Progress:
    def __init__(self, total_rows: int, shards: int):
        self.total, self.shards, self.rows, self.done = total_rows, shards, 0, 0
        self.start = time.perf_counter()

    def update(self, rel: str, entry: ShardEntry) -> None:
        self.rows += entry.output.rows
        self.done += 1
        el = max(time.perf_counter() - self.start, 1e-9)
        rate = self.rows / el
        eta = (self.total - self.rows) / rate if rate else float("inf")
        t = entry.timings
        logger.info(f"cache: {rel} {entry.output.rows:,} rows in {t.seconds:.2f}s "
                    f"(attempt {t.attempt}, {t.worker.get('host', '?')}:{t.worker.get('pid', '?')}) | "
                    f"{self.done}/{self.shards} shards, {self.rows:,}/{self.total:,} rows "
                    f"({100 * self.rows / max(self.total, 1):.0f}%) | {rate:,.0f} rows/s | ETA {eta:,.0f}s")


def _totals(manifest: Manifest) -> Totals:
    shards = manifest.committed()
    rows = sum(s.output.rows for s in shards)
    size = sum(s.output.bytes for s in shards)
    per_row = codec_for(manifest.content).values_per_row
    return Totals(rows=rows, shards=len(shards), bytes=size, bytes_per_row=size / rows if rows else 0.0,
                  bytes_per_row_per_task=size / rows / per_row if rows else 0.0, values_per_row=per_row,
                  topk=manifest.content.topk)


def build(job: CacheJob, on_commit: Callable[[str, int], None] | None = None,
          worker: type = CacheWorker) -> dict[str, Any]:
    """Build (or finish) the cache of `job`; return the summary of this run.

    Seams for tests: `on_commit(rel, shards committed by this run)` runs in the driver after
    each shard is recorded; `worker` is the actor class (a CacheWorker subclass)."""
    started = time.perf_counter()
    header, schema = _header(job)
    out = storage.join(job.out, header.teacher.sha256[:12]) if job.by_teacher else job.out
    with writing(out, "cache", "build"):
        current = {s: [input_fingerprint(job.logs, p) for p in split_files(job.logs, s, job.partitions)]
                   for s in job.splits}
        plan = reconcile(out, job.logs, header, current)
        for rel in plan.gone:
            storage.delete(cache_file(out, rel))
        _log_plan(job, out, plan)
        manifest, todo = plan.manifest, plan.todo
        n_planned = len(manifest.planned())
        run = BuildRun(started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), computed=[], skipped=n_planned - len(todo),
                       rows_computed=0)
        manifest.builds.append(run)
        manifest.complete = not todo
        _record(out, manifest, failing=False)
        logger.info(f"cache: {out}: {n_planned} shards planned, {run.skipped} already committed (skipped), "
                    f"{len(todo)} to compute ({sum(fp.rows for fp in todo):,} rows)")
        ray_s = compute_s = 0.0
        try:
            if todo:
                ray_s, compute_s = _compute(job, out, manifest, run, todo, on_commit, worker)
        finally:  # what committed so far is recorded even when the build fails
            run.seconds = round(time.perf_counter() - started, 3)
            manifest.complete = not manifest.missing_shards()
            manifest.totals = _totals(manifest)
            _record(out, manifest, failing=sys.exc_info()[1] is not None)
        for p in remove_temp_files(out):  # from workers that died mid-shard
            logger.info(f"cache: removed {p} (left by a worker that died)")
    summary = {**to_json_value(manifest.totals), "cache": str(out), "complete": manifest.complete,
               "computed": len(run.computed), "skipped": run.skipped, "rows_computed": run.rows_computed,
               "seconds": run.seconds, "ray_start_s": ray_s, "compute_s": compute_s,
               "rows_per_s": run.rows_computed / compute_s if compute_s else 0.0, "pool": run.pool,
               "workers_start_s": run.workers_start_s, "workers": run.workers or []}
    logger.info(format_summary(summary, codec_for(manifest.content).describe(manifest.totals.bytes_per_row_per_task)))
    return summary


def _record(out: str, manifest: Manifest, failing: bool) -> None:
    """Write the manifest (atomically: on failure the one on disk is the last one written, still
    valid). While another error stops the build (a full disk, say), a failed write is logged, not
    raised over that error; otherwise it is a StorageError naming the manifest."""
    try:
        write_manifest(out, manifest)
    except OSError as e:
        msg = f"{storage.join(out, MANIFEST)}: cannot write the manifest: {e.strerror or e}"
        if not failing:
            raise storage.StorageError(f"{msg}; the manifest on disk is the last one written") from None
        logger.warning(f"cache: {msg}; the manifest on disk is the last one written (its shards are intact)")


class _Committer:
    """The driver's side of each finished shard: into the manifest (rewritten at most every
    MANIFEST_EVERY_S), the run's record and the progress line."""

    def __init__(self, out: str, manifest: Manifest, run: BuildRun, progress: Progress, on_commit):
        self.out, self.manifest, self.run, self.progress, self.on_commit = out, manifest, run, progress, on_commit
        self.last_write = time.monotonic()

    def __call__(self, task: ShardTask, entry: ShardEntry) -> None:
        rel = task.expected.path
        entry = ShardEntry(task.expected.with_ids(entry.input.ids), entry.output, entry.timings,
                           partition_values(rel) or None)
        self.manifest.shards[rel] = entry
        self.run.computed.append(rel)
        self.run.rows_computed += entry.output.rows
        self.progress.update(rel, entry)
        if time.monotonic() - self.last_write >= MANIFEST_EVERY_S:
            _record(self.out, self.manifest, failing=False)
            self.last_write = time.monotonic()
        if self.on_commit is not None:
            self.on_commit(rel, len(self.run.computed))


def _compute(job: CacheJob, out: str, manifest: Manifest, run: BuildRun, todo: list, on_commit,
             worker: type) -> tuple[float, float]:
    """Run `todo` on the Ray pool, committing each shard to the manifest; (ray start s, compute s)."""
    import ray  # deferred: a build with nothing to compute, and every reader, never start Ray

    t0 = time.perf_counter()
    started_ray = connect(job.ray_address)
    ray_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool = None
    try:
        plan = plan_pool(ray.cluster_resources(), job.workers, job.threads_per_worker, job.device, job.teacher_ranks)
        run.pool = plan.describe()
        run.teacher_ranks = plan.ranks if plan.ranks > 1 else None  # absent at 1: the manifest as before
        logger.info(f"cache: Ray cluster {ray.cluster_resources().get('CPU', 0):.0f} CPU / "
                    f"{ray.cluster_resources().get('GPU', 0):.0f} GPU; pool: {plan.describe()}")
        ref = TeacherRef(job.spec().resolved(), load_schema(job.logs), manifest.teacher.sha256)
        pool = WorkerPool(plan, ref, job.max_attempts, worker, job.group_timeout_s)
        tasks = [ShardTask(storage.absolute(job.logs), storage.absolute(storage.join(job.logs, fp.path)),
                           storage.absolute(cache_file(out, fp.path)), fp, manifest.teacher.sha256, manifest.content,
                           job.batch_size, job.prefetch)
                 for fp in todo]
        progress = Progress(sum(fp.rows for fp in todo), len(todo))
        pool.run(tasks, _Committer(out, manifest, run, progress, on_commit))
        run.workers_start_s = round(pool.first_ready - pool.created, 3) if pool.first_ready else None
        memory = pool.memory()
        run.workers = [{**info, **({"memory": memory[i]} if i in memory else {})} for i, info in pool.info.items()]
    finally:
        if pool is not None:
            pool.close()
        compute_s = time.perf_counter() - t0
        if started_ray:
            ray.shutdown()
    return ray_s, compute_s


def format_summary(s: dict[str, Any], size: str) -> str:
    """The build's last lines; `size`: the content codec's bytes per cached value."""
    state = "complete" if s["complete"] else "INCOMPLETE"
    lines = [
        f"cache {s['cache']}: {state}, {s['rows']:,} rows in {s['shards']} shards, "
        f"{s['bytes'] / 2**20:,.1f} MiB on disk = {s['bytes_per_row']:.2f} bytes/row = {size}",
        f"this run: computed {s['computed']} shards ({s['rows_computed']:,} rows), skipped {s['skipped']} committed; "
        f"{s['rows_per_s']:,.0f} rows/s over {s['compute_s']:.1f}s of compute"
        + (f" with {s['pool']}" if s.get("pool") else "")
        + (f" (workers up after {s['workers_start_s']:.1f}s)" if s.get("workers_start_s") else "")
        + f"; {s['seconds']:.1f}s in all",
    ]
    return "\n".join(lines)


def job_from_args(args) -> CacheJob:
    """The job YAML (`--config`) plus key=value overrides, then any flag given on the command line."""
    job = load(CacheJob, args.config, list(args.overrides))
    spec = spec_from_args(args)
    if spec is not None:
        job.teacher = spec.export if spec.form == "export" else spec
    for name in ("logs", "out", "ray_address", "workers", "threads_per_worker", "device", "dtype",
                 "hidden", "batch_size", "max_attempts", "teacher_ranks"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(job, name, value)
    if getattr(args, "splits", None):
        job.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    job.validate()
    return job


def run(args) -> int:
    """`distkd cache build`."""
    summary = build(job_from_args(args))
    return 0 if summary["complete"] else 1
