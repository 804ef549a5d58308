"""Peer baselines for `distkd.bench.suite`: what a user would write instead of distkd.

(1) `ray_data_build`: teacher logits over log shards as Ray's batch-inference guide has it,
    `ray.data.read_parquet` -> `map_batches` with a callable class that holds the teacher
    (the same export, loaded the same way as distkd's workers) -> `write_parquet`, with the
    same number of actors (concurrency), CPUs and torch threads as distkd's pool.
    What it does not give: row order (blocks finish in any order), alignment checks against
    the log shards (example ids, row groups), and exactly-once commits into a manifest (a
    failed or repeated run leaves partial or duplicate files that nothing reconciles).
(2) `train_rank`: one rank of distkd's trainer (the same model, sharding, optimizer and
    loader), timing its two loops (distkd.train.steps): the plain one (`Trainer.train_step`
    over the loader) and TorchRec's `TrainPipelineSparseDist` (the default), interleaved, in
    the same process.

    python -m distkd.bench.baselines train --config jobs/demo/teacher.yaml --nproc 2 \\
        --steps 40 --reps 3 --json out.json [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import itertools
import torch
import numpy as np
import pyarrow as pa

from distkd import dist, log
from distkd.data.schema import load_schema
from distkd.train.steps import PipelinedSteps, PlainSteps
from distkd.train.trainer import Trainer
from distkd.config import load
from distkd.log import quiet
from distkd.launch.local import launch
from distkd.train.job import TrainJob
from distkd.train.prepare import prepare
from distkd.models.teacher import load_teacher
from distkd.data.batch import to_batch
from distkd.data.rows import decode

# Ray is imported by the Ray Data baseline alone: its import costs seconds.


# -- (1) Ray Data batch inference ------------------------------------------------------------

class TeacherPredictor:
    """The callable class Ray Data's `map_batches` instantiates once per actor."""

    def __init__(self, export: str, threads: int):


        quiet()
        torch.set_num_threads(threads)
        self.teacher = load_teacher(export)
        self.schema = self.teacher.schema
        self.keys = [f.name for f in self.schema.sparse]

    def __call__(self, table):


        batch = to_batch(decode(table, self.schema, "ray-data block"), self.keys)
        with torch.inference_mode():
            logits = self.teacher(batch.sparse, batch.dense).logits.float().numpy().astype(np.float16)
        flat = pa.array(logits.reshape(-1))
        return pa.table({self.schema.id: table.column(self.schema.id),
                         "logits": pa.FixedSizeListArray.from_arrays(flat, logits.shape[1])})


def ray_data_build(export: str, files: list[str], out: str, workers: int, threads: int, num_cpus: float,
                   batch_size: int = 8192) -> dict[str, Any]:
    """Run the Ray Data pipeline on an already started Ray; returns rows and seconds (from
    building the dataset to the last file written: actor start-up included, as in distkd's)."""
    import ray


    schema = load_schema(Path(files[0]).parent.parent)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_progress = False
    t = time.perf_counter()
    ds = ray.data.read_parquet(files, columns=schema.training_columns())
    ds = ds.map_batches(TeacherPredictor, fn_constructor_kwargs={"export": export, "threads": threads},
                        batch_size=batch_size, batch_format="pyarrow", concurrency=workers, num_cpus=num_cpus)
    ds.write_parquet(out, compression="zstd")
    seconds = time.perf_counter() - t
    rows = sum(pq.ParquetFile(os.path.join(out, f)).metadata.num_rows for f in os.listdir(out)
               if f.endswith(".parquet"))
    return {"rows": rows, "seconds": seconds}


# -- (2) the trainer's two loops --------------------------------------------------------------

def _timed(epoch, warmup: int) -> tuple[float, int]:
    """(seconds, steps) of the steps `epoch` yields after `warmup` untimed ones."""
    n, t = 0, None
    for _ in epoch:
        n += 1
        if n == warmup:
            t = time.perf_counter()
    return (time.perf_counter() - t if t is not None else 0.0), max(0, n - warmup)


def train_rank(prepared, steps: int, reps: int) -> dict[str, Any]:
    """One rank: `reps` rounds of the plain loop then TorchRec's pipeline (`train.pipeline`:
    plain, sparse_dist), `steps` batches each, on the same trainer (model, loader, optimizer)."""
    log.setup()  # a spawned rank starts with logging unconfigured; the level comes from the environment
    env = dist.init()
    trainer = Trainer(prepared.job, prepared.schema, prepared.objective, env)
    ld = trainer.train_loader
    rows_per_step = ld.batch_size * env.world_size
    out: dict[str, list[float]] = {"distkd": [], "pipeline": []}  # plain loop, sparse_dist
    epoch, piped_modules = 0, []
    for _ in range(reps):
        for name in ("distkd", "pipeline"):
            ld.set_epoch(epoch)
            epoch += 1
            # a fresh pipeline each round: it holds batches of the iterator it last ran
            loop = PlainSteps(trainer) if name == "distkd" else PipelinedSteps(trainer)
            s, n = _timed(loop.epoch(itertools.islice(ld, steps)), warmup=2)
            out[name].append(n * rows_per_step / s if s else 0.0)
            if name == "pipeline":
                piped_modules = [type(m).__name__ for m in loop.pipeline._pipelined_modules]
                loop.pause()
    dist.shutdown()
    return {"rank": env.rank, "world_size": env.world_size, "rows_per_s": out, "rows_per_step": rows_per_step,
            "pipelined_modules": piped_modules}


def _train_main(args) -> int:

    quiet()
    job = load(TrainJob, args.config, [*args.overrides, "tensorboard=false", "train.shuffle=false"])
    prepared = prepare(job, args.config)
    ranks = launch(train_rank, args.nproc, prepared, args.steps, args.reps)
    Path(args.json).write_text(json.dumps(ranks[0]))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distkd.bench.baselines", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="the plain loop vs TrainPipelineSparseDist, one launch of --nproc ranks")
    t.add_argument("--config", required=True)
    t.add_argument("--nproc", type=int, default=1)
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--reps", type=int, default=1)
    t.add_argument("--json", required=True)
    t.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    log.setup()
    return _train_main(args)


if __name__ == "__main__":
    sys.exit(main())
