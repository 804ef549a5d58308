"""`distkd` command line. Each subcommand is a thin shim over one module's `run(args)`.

Errors a user can fix (bad config, bad logs, bad cache, unreachable storage) print one line
naming the file and problem and exit with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import os
import importlib
import logging
import sys
from typing import Sequence

from distkd import log
from distkd.config import ConfigError
from distkd.log import quiet
from distkd.errors import CheckpointError, ProcessGroupError, RankFailure
from distkd.data.schema import LogsError
from distkd.storage import StorageError

logger = logging.getLogger(__name__)


def _cmd(sub, name: str, target: str, help: str):
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(_target=target)
    return p


def _overrides(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override fields of the job config")


def _launch_flags(p) -> None:
    p.add_argument("--nproc", type=int, default=None, help="local ranks (ignored under torchrun)")
    p.add_argument("--max-restarts", dest="max_restarts", type=int, default=None,
                   help="local ranks: restart a failed rank group this often, resuming from the last checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the latest committed checkpoint")
    p.add_argument("--ray-address", dest="ray_address", default=None,
                   help="run the ranks as a Ray Train TorchTrainer on this Ray cluster (HOST:6379 or auto; "
                        "default: $RAY_ADDRESS, or launch.launcher: ray for an embedded Ray)")


def _teacher_flags(p, export_help: str) -> None:
    """--teacher (an export) and the other teacher forms (distkd.models.teacher)."""
    p.add_argument("--teacher", default=None, help=export_help)
    p.add_argument("--teacher-factory", dest="teacher_factory", default=None, metavar="PKG.MOD:FN",
                   help="a teacher of your own: the function that builds the module (with --teacher-weights)")
    p.add_argument("--teacher-weights", dest="teacher_weights", default=None, metavar="FILE",
                   help="the factory module's state dict (loaded with torch.load(weights_only=True))")
    p.add_argument("--teacher-program", dest="teacher_program", default=None, metavar="FILE.pt2",
                   help="a torch.export program as the teacher")
    p.add_argument("--teacher-input", dest="teacher_input", default=None, choices=["kjt", "dict"],
                   help="the batch form the factory module or program takes (default kjt)")
    p.add_argument("--teacher-kwargs", dest="teacher_kwargs", default=None, metavar="YAML",
                   help="keyword arguments of the factory, a YAML/JSON mapping")
    p.add_argument("--teacher-hidden-dim", dest="teacher_hidden_dim", type=int, default=None,
                   help="width of a factory/program teacher's hidden layer (for --hidden)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distkd", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", dest="log_level", default=None, type=str.upper, choices=log.LEVELS,
                        help=f"how much distkd logs to stderr (default: ${log.ENV}, else INFO); "
                             "below WARNING only rank 0 logs")
    top = parser.add_subparsers(dest="command", required=True)

    data = top.add_parser("data", help="create, convert and check interaction logs").add_subparsers(
        dest="data_command", required=True
    )
    p = _cmd(data, "synth", "distkd.data.synth:run", "write synthetic Criteo-like logs as sharded Parquet")
    p.add_argument("--out", required=True, help="logs directory to write")
    p.add_argument("--rows", type=int, default=1_000_000, help="total rows over all splits")
    p.add_argument("--shards", type=int, default=8, help="train shards (valid and test get a quarter each, at least 1)")
    p.add_argument("--row-group-rows", type=int, default=65_536)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="criteo", choices=["criteo", "small"], help="feature set and cardinalities")
    p.add_argument("--max-cardinality", type=int, default=None, help="cap every feature's number of ids")
    p.add_argument("--unlabeled-fraction", type=float, default=0.1, help="share of train rows logged without labels")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes writing shards")
    p.add_argument("--force", action="store_true", help="overwrite an existing logs directory")
    p.add_argument("--days", type=int, default=None,
                   help="write daily partitions dt=YYYY-MM-DD (--rows over all days, --shards per day) "
                        "instead of train/valid/test folders")
    p.add_argument("--start", default="2026-11-01", help="--days: the first day (YYYY-MM-DD)")
    p.add_argument("--drift", type=float, default=0.0, metavar="RADIANS",
                   help="--days: the truth's drift a day; day t's label-model weights have correlation "
                        "cos(drift * t) with day 0's (default 0: one truth)")

    p = _cmd(data, "movielens", "distkd.data.movielens:run", "convert a MovieLens CSV release to sharded Parquet")
    p.add_argument("path", help="directory with ratings.csv and movies.csv")
    p.add_argument("--out", required=True, help="logs directory to write")
    p.add_argument("--shards", type=int, default=4, help="train shards")
    p.add_argument("--row-group-rows", type=int, default=65_536)
    p.add_argument("--privileged", action="store_true",
                   help="also the teacher-only hindsight features (later like rates, the user's tags on the movie)")
    p.add_argument("--force", action="store_true", help="overwrite an existing logs directory")

    p = _cmd(data, "instacart", "distkd.data.instacart:run",
             "convert Instacart order lines (the sample's CSV) to sharded Parquet, split by each user's time")
    p.add_argument("path", help="order_products_sample.csv, or the directory holding it")
    p.add_argument("--out", required=True, help="logs directory to write")
    p.add_argument("--shards", type=int, default=4, help="train shards")
    p.add_argument("--row-group-rows", type=int, default=16_384)
    p.add_argument("--holdout", type=int, default=2, help="each user's last N orders are test, the N before valid")
    p.add_argument("--force", action="store_true", help="overwrite an existing logs directory")

    p = _cmd(data, "synth-next-item", "distkd.data.synth_next_item:run",
             "write synthetic next-item logs (a known true next-item distribution) as sharded Parquet")
    p.add_argument("--out", required=True, help="logs directory to write")
    p.add_argument("--rows", type=int, default=1_250_000, help="total rows over all splits")
    p.add_argument("--shards", type=int, default=4, help="train shards")
    p.add_argument("--row-group-rows", type=int, default=16_384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="default", choices=["default", "small"])
    p.add_argument("--num-items", type=int, default=None, help="catalog size (default: the preset's)")
    p.add_argument("--unlabeled-fraction", type=float, default=0.1, help="share of train rows logged without a next item")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes writing shards")
    p.add_argument("--force", action="store_true", help="overwrite an existing logs directory")

    p = _cmd(data, "movielens-next", "distkd.data.movielens_next:run",
             "convert a MovieLens CSV release to next-movie logs (history -> next movie rated), split by time")
    p.add_argument("path", help="directory with ratings.csv and movies.csv")
    p.add_argument("--out", required=True, help="logs directory to write")
    p.add_argument("--history", type=int, default=20, help="movies of history per row (the most recent)")
    p.add_argument("--min-history", dest="min_history", type=int, default=1)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--row-group-rows", type=int, default=65_536)
    p.add_argument("--force", action="store_true", help="overwrite an existing logs directory")

    p = _cmd(data, "validate", "distkd.data.validate:run", "check every shard of a logs directory against its schema")
    p.add_argument("logs", help="logs directory (with schema.yaml)")

    p = _cmd(data, "stats", "distkd.data.stats:run",
             "one pass over the train split: per-feature statistics into LOGS/stats.json (for transforms)")
    p.add_argument("logs", help="logs directory (with schema.yaml)")
    p.add_argument("--partition", default=None, metavar="KEY=START..END",
                   help="partitioned logs: the train window (inclusive), e.g. dt=2026-11-02..2026-11-29")

    p = _cmd(data, "drift", "distkd.data.drift:run",
             "compare a day of partitioned logs with the days before it (PSI, unseen and out-of-range ids, "
             "label rates, rows); exit 3 naming the first failing feature and figure")
    p.add_argument("logs", help="logs directory (with schema.yaml) in date partitions")
    p.add_argument("--partition", required=True, metavar="KEY=DAY", help="the day to check, e.g. dt=2026-11-08")
    p.add_argument("--config", default=None,
                   help="thresholds: a job YAML with a drift: section, or a drift YAML (default: DriftConfig's)")
    p.add_argument("--window", type=int, default=None, help="days before DAY to compare with (default: the job's, 7)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON here")

    p = _cmd(data, "inspect", "distkd.data.inspect:run", "stream the loader over a split and print a summary")
    p.add_argument("logs", help="logs directory (with schema.yaml)")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=8192)

    cache = top.add_parser("cache", help="build and verify the teacher logit cache (Ray)").add_subparsers(
        dest="cache_command", required=True
    )
    p = _cmd(cache, "build", "distkd.cache.build:run", "run the teacher over every log shard once, on Ray, into a logit cache")
    p.add_argument("--config", default=None, help="job YAML (e.g. jobs/demo/cache.yaml); flags below override it")
    _teacher_flags(p, "teacher export directory (export.json + model.pt)")
    p.add_argument("--logs", default=None, help="logs directory (with schema.yaml)")
    p.add_argument("--out", default=None, help="cache directory (created, or resumed)")
    p.add_argument("--splits", default=None, help="comma-separated splits (default train,valid,test)")
    p.add_argument("--ray-address", dest="ray_address", default=None,
                   help="existing Ray cluster (default: $RAY_ADDRESS, else an embedded Ray sized to this machine)")
    p.add_argument("--workers", type=int, default=None, help="actors (default: cluster CPUs less one, or one per GPU)")
    p.add_argument("--threads-per-worker", dest="threads_per_worker", type=int, default=None, help="torch threads (= Ray CPUs) per actor")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp16", "fp32"], help="logit precision on disk (default fp16)")
    p.add_argument("--hidden", default=None, action=argparse.BooleanOptionalAction,
                   help="also cache the teacher's last hidden layer (fp16) for feature distillation")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--max-attempts", dest="max_attempts", type=int, default=None, help="per shard, counting worker deaths")
    p.add_argument("--teacher-ranks", dest="teacher_ranks", type=int, default=None, metavar="K",
                   help="shard each teacher copy over K actors (a placement group joined by gloo/nccl); default 1")
    _overrides(p)

    p = _cmd(cache, "verify", "distkd.cache.verify:run", "check a logit cache: complete, intact and aligned with the logs")
    p.add_argument("--cache", required=True, help="cache directory")
    p.add_argument("--logs", required=True, help="logs directory it was built from")
    _teacher_flags(p, "also require this teacher's fingerprint (an export directory; or the flags below)")
    p.add_argument("--recompute", type=float, default=None, metavar="FRACTION",
                   help="run the teacher again on this fraction of the row groups (a seeded random sample) and "
                        "compare with the cached logits (the manifest's teacher unless a teacher flag is given)")
    p.add_argument("--seed", type=int, default=None, help="--recompute's sample (default: random, reported)")
    p.add_argument("--tolerance", type=int, default=0, metavar="ULP",
                   help="largest difference accepted, in ulps of the cache's dtype (default 0: bit-identical, "
                        "as the same build on the same hardware gives; another BLAS or CPU may need 1)")

    p = _cmd(cache, "import", "distkd.cache.importer:run",
             "a teacher's predictions computed elsewhere (Parquet: example_id + logits) joined to the logs by id, "
             "as a logit cache")
    p.add_argument("--predictions", required=True, action="append", metavar="PATH_OR_GLOB_OR_URI",
                   help="Parquet files of example_id plus a 'logits' list column or one float column per task: "
                        "a file, a directory, a glob or a URI (repeat the flag for more)")
    p.add_argument("--logs", required=True, help="logs directory (with schema.yaml)")
    p.add_argument("--out", required=True, help="cache directory (created, or grown by the shards it lacks)")
    p.add_argument("--teacher-name", dest="teacher_name", required=True, help="the teacher that computed them")
    p.add_argument("--fingerprint", required=True, metavar="HEX",
                   help="the teacher's version, 16 to 128 hex digits: the cache's key (another is another cache)")
    p.add_argument("--splits", default=None, help="comma-separated splits (default train,valid,test)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"], help="logit precision on disk (default fp16)")
    p.add_argument("--memory-budget", dest="memory_budget", type=float, default=1024.0, metavar="MIB",
                   help="the join's working memory; sizes its partitions (default 1024)")
    p.add_argument("--partitions", type=int, default=None, help="hash partitions of the join (default: from the budget)")
    p.add_argument("--spill-dir", dest="spill_dir", default=None,
                   help="where the join spills (default: inside --out; a local temp folder when --out is a URI)")

    p = _cmd(cache, "status", "distkd.cache.status:run",
             "per split or partition: shards cached, missing (to build) or stale (their logs changed)")
    p.add_argument("--cache", required=True, help="cache directory (or a root of caches by teacher)")
    p.add_argument("--logs", required=True, help="logs directory")
    p.add_argument("--teacher-sha256", dest="teacher_sha256", default=None, help="pick the teacher's cache under a root")
    p.add_argument("--key", default=None, help="partitioned logs: the partition key to group by (default: the first)")

    p = _cmd(cache, "gc", "distkd.cache.gc:run",
             "remove the oldest caches of a root of caches by teacher, never one in use")
    p.add_argument("--root", required=True, help="a root of caches by teacher (cache build with by_teacher: true)")
    p.add_argument("--keep", type=int, required=True, help="how many of the newest caches to keep")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="say what would be removed")

    for role in ("teacher", "student"):
        group = top.add_parser(role, help=f"train the {role} model").add_subparsers(dest=f"{role}_command", required=True)
        p = _cmd(group, "train", "distkd.launch:run", f"train the {role} (DDP + TorchRec; hard labels by default)")
        p.set_defaults(role=role)
        p.add_argument("--config", default=None, help=f"job YAML (e.g. jobs/demo/{role}.yaml); defaults if omitted")
        _launch_flags(p)
        _overrides(p)

    p = _cmd(top, "demo", "distkd.demo:run", "the whole pipeline on this machine: logs, teacher, cache, distill, eval")
    p.add_argument("--jobs", default="jobs", help="folder holding demo/ and movielens/ job files")
    p.add_argument("--seeds", type=int, default=3, help="students trained per setup (the report shows their spread)")
    p.add_argument("--skip-movielens", action="store_true", help="only the synthetic suite")
    p.add_argument("--next-item", dest="next_item", action="store_true",
                   help="instead: the next-item suites (jobs/next-item, synthetic; jobs/movielens-next, "
                        "ml-latest-small): a top-k cache, next-item distillation")

    submit = top.add_parser(
        "submit", help="run a stage on a cluster: Ray Jobs API, or render the Slurm script / Kubernetes manifest"
    ).add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in ("data", "teacher", "student", "cache", "distill", "eval", "daily"):
        p = _cmd(submit, stage, "distkd.submit:run", f"submit the {stage} stage's job file to a cluster")
        if stage == "daily":
            p.add_argument("--date", required=True, metavar="YYYY-MM-DD", help="the day to run (--to ray only)")
        p.add_argument("--to", required=True, choices=["ray", "slurm", "k8s"], help="where the stage runs")
        p.add_argument("--config", required=True, help=f"the stage's job YAML (e.g. jobs/demo/{stage}.yaml)")
        p.add_argument("--dry-run", dest="dry_run", action="store_true",
                       help="print the rendered script/manifest (or the Ray entrypoint) and submit nothing")
        p.add_argument("--ray-address", "--address", dest="ray_address", default=None,
                       help="Ray Jobs API address, http://HOST:8265 (default: $RAY_ADDRESS)")
        p.add_argument("--wait", action="store_true",
                       help="--to ray: stream the job's logs until it ends; exit with its status")
        p.add_argument("--nodes", type=int, default=2,
                       help="nodes (DDP stages: one pod/task each; cache: Ray workers on k8s, one node under Slurm)")
        p.add_argument("--gpus-per-node", dest="gpus_per_node", type=int, default=1,
                       help="GPUs (= torchrun ranks) per node; 0 for CPU nodes (one gloo rank each)")
        p.add_argument("--image", default=None,
                       help="container image (default registry.example.com/distkd:0.1.0-gpu, or -cpu with 0 GPUs)")
        p.add_argument("--launcher", default="torchrun", choices=["torchrun", "ray"],
                       help="DDP stages on k8s: torchrun in a PyTorchJob (default) or Ray Train in a KubeRay RayJob")
        _overrides(p)

    p = _cmd(top, "eval", "distkd.evaluate:run",
             "compare teacher, student-KD and student-hard on a held-out split; write a report")
    p.add_argument("--config", default=None, help="eval job YAML (fields logs, teacher, kd, hard, out, split, batch_size)")
    p.add_argument("--logs", default=None, help="logs directory (with schema.yaml)")
    p.add_argument("--teacher", default=None, help="teacher export directory (or its training run directory)")
    p.add_argument("--kd", nargs="+", default=None, metavar="DIR", help="distilled student export(s), one per seed")
    p.add_argument("--hard", nargs="+", default=None, metavar="DIR", help="hard-label student export(s), one per seed")
    p.add_argument("--out", default=None, help="report directory (report.md, result.json, PNG plots)")
    p.add_argument("--split", default=None, help="split to evaluate on (default test)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="rows per forward pass (default 16384)")
    p.add_argument("--serving", default=None, action=argparse.BooleanOptionalAction,
                   help="add serving figures: file size and p50/p99 latency (batch 1, 64, 1024; one thread) of the "
                        "teacher, the student and the int8 student, and the AUC int8 costs")
    p.add_argument("--nproc", type=int, default=None,
                   help="compute the teacher's metrics with its tables sharded over this many local ranks "
                        "(default 1: one process); the students are evaluated on one process")
    _overrides(p)

    p = _cmd(top, "export", "distkd.serve.export:run",
             "write a model export as one self-contained serving file (TorchScript, torch.export, ONNX) "
             "plus its input contract")
    p.add_argument("export", help="a distkd export directory (e.g. runs/demo/student-kd/seed-0/export)")
    p.add_argument("--out", required=True, help="directory for the serving file(s) and contract.json")
    p.add_argument("--format", default="torchscript",
                   help="comma-separated: torchscript, pt2, onnx (default torchscript)")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8 row-wise embedding tables (uint8 + float32 scale/bias per row)")

    p = _cmd(top, "sweep", "distkd.launch.sweep:run",
             "many students from one cache: a Ray Tune search over a distill/student job's fields, then the report")
    p.add_argument("--config", required=True, help="sweep YAML (e.g. jobs/demo/sweep.yaml)")
    _overrides(p)

    p = _cmd(top, "daily", "distkd.daily:run",
             "one day of a rolling student: validate and drift-check day D, extend the cache by it, distill "
             "warm-started from the promoted student, evaluate on D+1, promote; resumable (exit 3: drift)")
    p.add_argument("--config", required=True, help="daily job YAML (e.g. jobs/daily/daily.yaml)")
    p.add_argument("--date", required=True, metavar="YYYY-MM-DD", help="the day D to run (its partition KEY=D)")
    p.add_argument("--nproc", type=int, default=None, help="the student's local ranks (default: the job's)")
    _overrides(p)

    p = _cmd(top, "distill", "distkd.launch:run", "distill the student from cached teacher logits (DDP + TorchRec)")
    p.set_defaults(role="student", distill_required=True)
    p.add_argument("--config", default=None, help="job YAML with a distilling objective (e.g. jobs/demo/distill.yaml)")
    _launch_flags(p)
    _overrides(p)

    return parser


def main(argv: list[str] | None = None, *, callbacks: Sequence = ()) -> int:
    """The CLI on `argv`. `callbacks` (fn(trainer), after each optimizer step) go to every rank of
    the train stages (teacher/student train, distill): how a caller hooks the real entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.callbacks = list(callbacks)
    try:
        log.setup(args.log_level)
    except ValueError as e:  # a bad DISTKD_LOG_LEVEL (the flag's choices are checked by argparse)
        parser.error(str(e))
    quiet()  # before torchrec is imported: its import logs warnings nobody can act on
    module, func = args._target.split(":")
    try:
        rc = getattr(importlib.import_module(module), func)(args)
    except (ConfigError, LogsError, StorageError, CheckpointError, ProcessGroupError) as e:
        logger.error(f"distkd: error: {e}")
        return 2
    except RankFailure as e:  # the ranks printed their own tracebacks; say what ended the launch
        logger.error(f"distkd: error: {e}")
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
