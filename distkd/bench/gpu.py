"""The GPU figures (issue 26, item 4): one rank's distillation step, alone and end to end.

    python -m distkd.bench.gpu --logs L --cache C --out O [--batch B] [--steps N]

Builds the distillation trainer of a job file (default jobs/demo/distill.yaml) on one rank
(the first GPU with nccl, else the CPU with gloo) and times the same train step twice:

  step alone   `--staged` batches read once and moved to the device before the clock starts,
               then cycled: forward, backward, optimizer step; nothing else in the loop.
  end to end   the loader's batches as training reads them: Parquet logs and the logit cache
               decoded, joined, moved to the device, then the same step.

After `--warmup` steps, each figure runs `--rounds` times, interleaved (a b b a a b), `--steps`
steps a round, with the device synchronized at both ends of a round (torch.cuda.synchronize on
a GPU), so queued kernels are inside the interval; a figure is its median round. Prints one
line per figure and writes them with the device's name to OUT/gpu_bench.json.
On a machine without CUDA the same code runs on the CPU (the rehearsal).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from distkd import compat, dist, log
from distkd.config import load
from distkd.train.job import TrainJob
from distkd.train.prepare import prepare
from distkd.train.trainer import Trainer

logger = logging.getLogger(__name__)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def endless(trainer: Trainer) -> Iterator:
    """The train loader's batches, epoch after epoch."""
    for epoch in itertools.count():
        trainer.train_loader.set_epoch(epoch)
        yield from trainer.train_loader


def timed(step: Callable[[Any], None], batches: Iterable, warmup: int, steps: int,
          device: torch.device) -> dict[str, float]:
    """Run `step` on `warmup` + `steps` batches; rows/s over the last `steps`."""
    it = iter(batches)
    for _ in range(warmup):
        step(next(it))
    synchronize(device)
    if not steps:
        return {}
    rows, t0 = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        step(batch)
        rows += len(batch)
    synchronize(device)
    seconds = time.perf_counter() - t0
    return {"steps": steps, "rows": rows, "seconds": round(seconds, 4), "samples_per_s": rows / seconds}


def measure(trainer: Trainer, warmup: int, steps: int, staged: int, rounds: int) -> dict[str, Any]:
    """Both figures, `rounds` times each in the order a b b a a b ... (a drift in time, or a
    neighbour's load on a shared CPU, weighs on both alike); each figure's median round."""
    device = trainer.env.device

    def step(batch) -> None:
        trainer.train_step(batch)  # moves the batch to the device: a no-op for staged ones

    batches = endless(trainer)
    on_device = [b.to(device) for b in itertools.islice(batches, staged)]
    cycled = itertools.cycle(on_device)
    sources = {"step_alone": cycled, "end_to_end": batches}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
    timed(step, batches, warmup, 0, device)  # first steps: allocations, optimizer state
    for r in range(rounds):
        for name in (list(sources) if r % 2 == 0 else list(sources)[::-1]):
            runs[name].append(timed(step, sources[name], 0, steps, device))
            logger.info(f"round {r + 1}/{rounds} {name}: {runs[name][-1]['samples_per_s']:,.0f} samples/s")
    batches.close()
    return {name: {**statistics_of(each), "rounds": each} for name, each in runs.items()}


def statistics_of(runs: list[dict[str, float]]) -> dict[str, float]:
    rates = [r["samples_per_s"] for r in runs]
    return {"samples_per_s": statistics.median(rates), "steps": sum(r["steps"] for r in runs),
            "rows": sum(r["rows"] for r in runs), "seconds": round(sum(r["seconds"] for r in runs), 4)}


def job_for(args: argparse.Namespace) -> TrainJob:
    overrides = [
        "role=student", f"logs={args.logs}", f"out={args.out}", f"objective.teachers.0.cache={args.cache}",
        "tensorboard=false", "train.max_steps=null", "train.checkpoint_every=1000000",
    ]
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    job = load(TrainJob, args.config, overrides + list(args.overrides))
    job.nproc = 1
    return job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="jobs/demo/distill.yaml", help="a distillation job file")
    p.add_argument("--logs", required=True)
    p.add_argument("--cache", required=True, help="the teacher's logit cache of those logs")
    p.add_argument("--out", required=True, help="gpu_bench.json goes here")
    p.add_argument("--batch", type=int, default=0, help="rows per step (default: the job's)")
    p.add_argument("--steps", type=int, default=100, help="timed steps of each figure in each round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each figure, interleaved")
    p.add_argument("--warmup", type=int, default=20, help="steps before the clock starts")
    p.add_argument("--staged", type=int, default=16, help="batches held on the device for the step alone")
    p.add_argument("overrides", nargs="*", help="job fields, key=value")
    args = p.parse_args(argv)
    log.setup()

    job = job_for(args)
    prepared = prepare(job, args.config)
    env = dist.init(timeout_s=job.launch.timeout_s)
    try:
        trainer = Trainer(job, prepared.schema, prepared.objective, env)
        figures = measure(trainer, args.warmup, args.steps, args.staged, args.rounds)
        result = {"device": device_name(env.device), "backend": env.backend, "batch": job.train.batch_size,
                  "stack": {**compat.versions(), "torch": torch.__version__, "cuda": torch.version.cuda},
                  **figures}
    except BaseException:
        dist.abandon()
        raise
    dist.shutdown()

    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_bench.json").write_text(json.dumps(result, indent=2))
    stack = ", ".join(f"{k} {v}" for k, v in result["stack"].items() if v)
    for name in ("step_alone", "end_to_end"):
        f = result[name]
        each = ", ".join(f"{r['samples_per_s']:,.0f}" for r in f["rounds"])
        print(f"{name.replace('_', ' ')}: {f['samples_per_s']:,.0f} samples/s on {result['device']} "
              f"(median of {len(f['rounds'])} rounds: {each}; {f['steps']} steps of {result['batch']} rows "
              f"in {f['seconds']:.2f} s; {stack})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
