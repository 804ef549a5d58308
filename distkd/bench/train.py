"""`make bench-train`: training rows/s with one rank and with two (one thread each), in one run.

Both runs train the same model on the same logs for the same number of steps per rank;
rows/s counts the rows of every rank, measured from the first optimizer step to the
last (start-up, planning and the final evaluation are excluded).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from distkd import log
from distkd.bench import cli_summary, cpu_model
from distkd.data.synth import generate

logger = logging.getLogger(__name__)


def ensure_logs(path: Path, rows: int) -> None:
    if (path / "schema.yaml").is_file():
        return

    logger.info(f"generating {rows:,} rows of synthetic logs in {path} …")
    generate(path, rows=rows, shards=4, seed=0, max_cardinality=100_000, force=True, workers=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logs", default="runs/bench/train-logs")
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--config", default="jobs/demo/teacher.yaml")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the job")
    args = p.parse_args(argv)
    log.setup()
    logs = Path(args.logs)
    ensure_logs(logs, args.rows)

    results = {n: cli_summary(["teacher", "train", "--config", args.config, "--nproc", str(n), f"logs={logs}",
                               *args.overrides], args.steps) for n in (1, 2)}
    one, two = results[1]["rows_per_s"], results[2]["rows_per_s"]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; one thread per rank; gloo on CPU")
    print(f"model: {args.config} ({results[1]['parameters']['total']:,} parameters), {args.steps} steps per run")
    print(f"{'ranks':>5} {'rows/s':>12}")
    print(f"{1:>5} {one:>12,.0f}")
    print(f"{2:>5} {two:>12,.0f}")
    print(f"scaling 2 ranks / 1 rank: {two / one:.2f}x (ideal 2.00x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
