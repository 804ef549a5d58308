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

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from distkd import storage
from distkd.cache import manifest as mf
from distkd.cache.lock import BuildLock
from distkd.cache.manifest import CacheError
from distkd.cache.worker import CacheWorker, ShardTask
from distkd.config import ConfigError, to_dict
from distkd.data.layout import PartitionRange, split_files
from distkd.data.schema import SPLITS, load_schema
from distkd.models.teacher import TeacherRef
from distkd.models.teacher_spec import TeacherError, TeacherSpec, as_spec

MANIFEST_EVERY_S = 2.0  # the manifest is rewritten at most this often while shards commit


@dataclass
class CacheJob:
    # An export directory (export.json + model.pt), or a TeacherSpec mapping (distkd.models.teacher):
    # {factory: pkg.mod:fn, weights: w.pt, input: dict, kwargs: {...}} or {program: t.pt2}.
    teacher: Union[TeacherSpec, str] = "runs/demo/teacher/export"
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
    # A next-item (multiclass) teacher: what each row keeps of its softmax over the catalog
    # (distkd.cache.topk); the default when the logs' task is multiclass.
    topk: Optional[TopKSpec] = None

    def validate(self) -> None:
        if not self.splits:
            raise ConfigError("splits: at least one split")
        for name in ("workers", "threads_per_worker"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        for name in ("batch_size", "prefetch", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if isinstance(self.teacher, str) and storage.is_remote(self.teacher):
            raise ConfigError(f"teacher: {self.teacher}: the export must be a path every worker can open "
                              "(a shared file system); copy it there from object storage")
        as_spec(self.teacher)


@dataclass
class TopKSpec:
    k: int = 64  # the teacher's top-k items and logits per row
    tail: int = 0  # s items sampled from the rest (RS-KD: an unbiased estimate of the tail)
    proposal: Literal["teacher", "uniform"] = "teacher"
    tau: float = 1.0  # temperature of the cached log-sum-exp (and of the proposal): train at this tau

    def validate(self) -> None:
        if self.k < 1 or self.tail < 0 or self.tau <= 0:
            raise ConfigError(f"topk: need k >= 1, tail >= 0, tau > 0; got {self}")


def content_for(job: "CacheJob", schema) -> dict[str, Any]:
    """What the cache files hold: per-task logits (CTR) or a top-k of the catalog (next item)."""
    if schema.classes:
        if schema.binary or len(schema.classes) != 1:
            raise ConfigError(f"{job.logs}: a cache of a next-item teacher needs logs with one multiclass task "
                              f"and no binary ones; these have {schema.task_names}")
        if job.hidden:
            raise ConfigError("hidden: caching a next-item teacher's hidden layer is not supported")
        spec = job.topk or TopKSpec()
        n = schema.classes[0].num_classes
        if spec.k > n or (spec.tail and spec.k >= n):
            raise ConfigError(f"topk: k={spec.k} (tail {spec.tail}) for a catalog of {n} items")
        return {"dtype": "fp16", "hidden": False, "hidden_dim": None, "tasks": schema.task_names,
                "topk": {"num_items": n, **to_dict(spec)}}
    if job.topk is not None:
        raise ConfigError(f"topk: is for a next-item teacher; the tasks of {job.logs} are binary")
    return None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _header(job: CacheJob) -> tuple[dict[str, Any], Any]:
    """The manifest's identity part for this job (teacher, schema, content), and the schema."""
    from distkd.models.teacher import describe

    schema = load_schema(job.logs)
    try:  # the fingerprint (distkd.models.teacher); an export's sha256 and schema are checked
        teacher = describe(as_spec(job.teacher), schema)
    except TeacherError as e:
        raise CacheError(str(e)) from None
    hidden_dim = teacher.pop("hidden_dim") if job.hidden else None
    teacher.pop("hidden_dim", None)
    if job.hidden and not hidden_dim:
        raise ConfigError(f"teacher: hidden: true needs hidden_dim (the width of the {teacher['form']} "
                          "teacher's hidden layer) in the teacher spec, or --teacher-hidden-dim")
    header = {
        "format": mf.FORMAT,
        "kind": mf.KIND,
        "teacher": teacher,
        "schema": {"fingerprint": schema.fingerprint(), "spec": to_dict(schema)},
        "content": content_for(job, schema) or {"dtype": job.dtype, "hidden": job.hidden, "hidden_dim": hidden_dim,
                                                "tasks": schema.task_names},
        "logs": storage.absolute(job.logs),
        "splits": {},
        "shards": {},
        "builds": [],
        "complete": False,
    }
    return header, schema


def _reconcile(job: CacheJob, out: str, header: dict[str, Any],
               log: Callable[[str], None]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest to continue, input fingerprints of the shards still to compute).

    The cache grows with the logs: a shard the logs gained is planned and computed; a
    committed shard whose log shard is gone is dropped (its entry and file removed, and
    reported); a committed shard whose log shard changed is refused (CacheError)."""
    plan = {s: [mf.input_fingerprint(job.logs, p) for p in split_files(job.logs, s, job.partitions)]
            for s in job.splits}
    old = mf.read_manifest(out)
    if old is None:
        stray = [storage.relative(out, f) for f in storage.list_files(out, recursive=True)
                 if not storage.basename(f).startswith(".")]
        if stray:
            raise CacheError(f"{out}: exists, holds {sorted(stray)[:5]} but no {mf.MANIFEST}; not a cache directory "
                             "this build started, refusing to write into it")
        manifest = header
    else:
        mf.check_same_build(out, old, header)
        manifest = old
        manifest["logs"] = header["logs"]
    for split, fps in plan.items():
        mf.check_plan(out, manifest, split, fps)
        before = set(manifest["splits"].get(split, []))
        manifest["splits"][split] = [fp["path"] for fp in fps]
        new = [fp["path"] for fp in fps if fp["path"] not in before]
        if before and new:
            log(f"cache: split '{split}' gained {len(new)} shard(s) since the last build (first: {new[0]})")
    dropped = set()
    for rel in sorted(manifest["shards"]):
        if storage.size(storage.join(job.logs, rel)) is None:  # the log shard is gone: never use its logits
            storage.delete(mf.cache_file(out, rel))
            manifest.setdefault("dropped", {})[rel] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                       "rows": manifest["shards"].pop(rel)["output"]["rows"]}
            dropped.add(rel)
            log(f"cache: log shard {rel} is gone from {job.logs}; dropped its logits from the cache")
    for split, rels in manifest["splits"].items():  # splits this job did not list again
        manifest["splits"][split] = [r for r in rels if r not in dropped]
    todo, seen = [], set()
    for fps in plan.values():
        for fp in fps:
            if fp["path"] in seen:
                continue
            seen.add(fp["path"])
            entry = manifest["shards"].get(fp["path"])
            if entry is not None:
                f = mf.cache_file(out, fp["path"])
                if storage.size(f) == entry["output"]["bytes"]:
                    continue
                log(f"cache: {f} is missing or has the wrong size; recomputing that shard")
                del manifest["shards"][fp["path"]]
            todo.append(fp)
    return manifest, todo


class Progress:
    def __init__(self, total_rows: int, shards: int, log: Callable[[str], None] = _log):
        self.total, self.shards, self.rows, self.done, self.log = total_rows, shards, 0, 0, log
        self.start = time.perf_counter()

    def update(self, rel: str, result: dict[str, Any]) -> None:
        self.rows += result["output"]["rows"]
        self.done += 1
        el = max(time.perf_counter() - self.start, 1e-9)
        rate = self.rows / el
        eta = (self.total - self.rows) / rate if rate else float("inf")
        t = result["timings"]
        self.log(f"cache: {rel} {result['output']['rows']:,} rows in {t['seconds']:.2f}s "
             f"(attempt {t['attempt']}, {t['worker'].get('host', '?')}:{t['worker'].get('pid', '?')}) | "
             f"{self.done}/{self.shards} shards, {self.rows:,}/{self.total:,} rows "
             f"({100 * self.rows / max(self.total, 1):.0f}%) | {rate:,.0f} rows/s | ETA {eta:,.0f}s")


def _totals(out: str, manifest: dict[str, Any]) -> dict[str, Any]:
    shards = [manifest["shards"][r] for r in mf.planned(manifest) if r in manifest["shards"]]
    rows = sum(s["output"]["rows"] for s in shards)
    size = sum(s["output"]["bytes"] for s in shards)
    topk = manifest["content"].get("topk")
    # per cached value: a task's logit (CTR), or one of a row's top-k + tail items (next item)
    per_row = topk["k"] + topk["tail"] if topk else len(manifest["content"]["tasks"])
    return {"rows": rows, "shards": len(shards), "bytes": size,
            "bytes_per_row": size / rows if rows else 0.0,
            "bytes_per_row_per_task": size / rows / per_row if rows else 0.0,
            "values_per_row": per_row, "topk": topk}


def build(job: CacheJob, log: Callable[[str], None] = _log, on_commit: Callable[[str, int], None] | None = None,
          worker: type = CacheWorker) -> dict[str, Any]:
    """Build (or finish) the cache of `job`; return the summary of this run.

    Seams for tests: `on_commit(rel, shards committed by this run)` runs in the driver after
    each shard is recorded; `worker` is the actor class (a CacheWorker subclass)."""
    started = time.perf_counter()
    header, schema = _header(job)
    out = storage.join(job.out, header["teacher"]["sha256"][:12]) if job.by_teacher else job.out
    storage.ensure_writable_dir(out, "cache directory")
    if storage.is_remote(out):
        log(f"cache: {out}: object storage has no build lock; run one build of this cache at a time")
    with BuildLock(out):
        for p in mf.remove_temp_files(out):
            log(f"cache: removed {p} (left by an interrupted build)")
        manifest, todo = _reconcile(job, out, header, log)
        n_planned = len(mf.planned(manifest))
        run = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "computed": [], "skipped": n_planned - len(todo),
               "rows_computed": 0}
        manifest["builds"].append(run)
        manifest["complete"] = not todo
        _record(out, manifest, failing=False, log=log)
        todo_rows = sum(fp["rows"] for fp in todo)
        log(f"cache: {out}: {n_planned} shards planned, {run['skipped']} already committed (skipped), "
            f"{len(todo)} to compute ({todo_rows:,} rows)")
        ray_s = compute_s = 0.0
        try:
            if todo:
                ray_s, compute_s = _compute(job, out, manifest, run, todo, log, on_commit, worker)
        finally:  # what committed so far is recorded even when the build fails
            run["seconds"] = round(time.perf_counter() - started, 3)
            manifest["complete"] = not mf.missing_shards(manifest)
            manifest["totals"] = _totals(out, manifest)
            _record(out, manifest, failing=sys.exc_info()[1] is not None, log=log)
        for p in mf.remove_temp_files(out):  # from workers that died mid-shard
            log(f"cache: removed {p} (left by a worker that died)")
    summary = {**manifest["totals"], "cache": str(out), "complete": manifest["complete"],
               "computed": len(run["computed"]), "skipped": run["skipped"], "rows_computed": run["rows_computed"],
               "seconds": run["seconds"], "ray_start_s": ray_s, "compute_s": compute_s,
               "rows_per_s": run["rows_computed"] / compute_s if compute_s else 0.0, "pool": run.get("pool"),
               "workers_start_s": run.get("workers_start_s"), "workers": run.get("workers", [])}
    log(format_summary(summary, len(schema.tasks)))
    return summary


def _record(out: str, manifest: dict[str, Any], failing: bool, log: Callable[[str], None]) -> None:
    """Write the manifest (atomically: on failure the one on disk is the last one written, still
    valid). While another error stops the build (a full disk, say), a failed write is logged, not
    raised over that error; otherwise it is a StorageError naming the manifest."""
    try:
        mf.write_manifest(out, manifest)
    except OSError as e:
        msg = f"{storage.join(out, mf.MANIFEST)}: cannot write the manifest: {e.strerror or e}"
        if not failing:
            raise storage.StorageError(f"{msg}; the manifest on disk is the last one written") from None
        log(f"cache: {msg}; the manifest on disk is the last one written (its shards are intact)")


def _compute(job: CacheJob, out: str, manifest: dict[str, Any], run: dict[str, Any], todo: list[dict[str, Any]],
             log: Callable[[str], None], on_commit, worker: type) -> tuple[float, float]:
    """Run `todo` on the Ray pool, committing each shard to the manifest; (ray start s, compute s)."""
    import ray

    from distkd.cache.pool import WorkerPool, connect, plan_pool

    t0 = time.perf_counter()
    started_ray = connect(job.ray_address)
    ray_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool = None
    try:
        plan = plan_pool(ray.cluster_resources(), job.workers, job.threads_per_worker, job.device)
        run["pool"] = plan.describe()
        log(f"cache: Ray cluster {ray.cluster_resources().get('CPU', 0):.0f} CPU / "
            f"{ray.cluster_resources().get('GPU', 0):.0f} GPU; pool: {plan.describe()}")
        ref = TeacherRef(as_spec(job.teacher).resolved(), load_schema(job.logs), manifest["teacher"]["sha256"])
        pool = WorkerPool(plan, ref, job.max_attempts, log, worker)
        tasks = [
            ShardTask(storage.absolute(job.logs), storage.absolute(storage.join(job.logs, fp["path"])),
                      storage.absolute(mf.cache_file(out, fp["path"])), fp, manifest["teacher"]["sha256"],
                      job.dtype, job.hidden, job.batch_size, job.prefetch, topk=manifest["content"].get("topk"))
            for fp in todo
        ]
        progress = Progress(sum(fp["rows"] for fp in todo), len(todo), log)
        last_write = time.monotonic()

        def commit(task: ShardTask, result: dict[str, Any]) -> None:
            nonlocal last_write
            rel = task.expected["path"]
            result["input"] = {**task.expected, "ids": result["input"]["ids"]}
            manifest["shards"][rel] = result
            run["computed"].append(rel)
            run["rows_computed"] += result["output"]["rows"]
            progress.update(rel, result)
            if time.monotonic() - last_write >= MANIFEST_EVERY_S:
                _record(out, manifest, failing=False, log=log)
                last_write = time.monotonic()
            if on_commit is not None:
                on_commit(rel, len(run["computed"]))

        pool.run(tasks, commit)
        run["workers_start_s"] = round(pool.first_ready - pool.created, 3) if pool.first_ready else None
        run["workers"] = list(pool.info.values())
    finally:
        if pool is not None:
            pool.close()
        compute_s = time.perf_counter() - t0
        if started_ray:
            ray.shutdown()
    return ray_s, compute_s


def format_summary(s: dict[str, Any], n_tasks: int) -> str:
    state = "complete" if s["complete"] else "INCOMPLETE"
    lines = [
        f"cache {s['cache']}: {state}, {s['rows']:,} rows in {s['shards']} shards, "
        f"{s['bytes'] / 2**20:,.1f} MiB on disk = {s['bytes_per_row']:.2f} bytes/row = "
        + (f"{s['bytes_per_row_per_task']:.2f} bytes per cached entry (top-{s['topk']['k']}"
           f"{' + ' + str(s['topk']['tail']) + ' tail' if s['topk']['tail'] else ''} of {s['topk']['num_items']:,} items)"
           if s.get("topk") else f"{s['bytes_per_row_per_task']:.2f} bytes/row/task ({n_tasks} tasks)"),
        f"this run: computed {s['computed']} shards ({s['rows_computed']:,} rows), skipped {s['skipped']} committed; "
        f"{s['rows_per_s']:,.0f} rows/s over {s['compute_s']:.1f}s of compute"
        + (f" with {s['pool']}" if s.get("pool") else "")
        + (f" (workers up after {s['workers_start_s']:.1f}s)" if s.get("workers_start_s") else "")
        + f"; {s['seconds']:.1f}s in all",
    ]
    return "\n".join(lines)


def job_from_args(args) -> CacheJob:
    """The job YAML (`--config`) plus key=value overrides, then any flag given on the command line."""
    from distkd.config import load

    from distkd.models.teacher_spec import spec_from_args

    job = load(CacheJob, args.config, list(args.overrides))
    spec = spec_from_args(args)
    if spec is not None:
        job.teacher = spec.export if spec.form == "export" else spec
    for name in ("logs", "out", "ray_address", "workers", "threads_per_worker", "device", "dtype",
                 "hidden", "batch_size", "max_attempts"):
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
