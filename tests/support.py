"""Helpers shared by the training tests: a small model, jobs, the real CLI in a subprocess."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from distkd.config import load
from distkd.launch import run_job
from distkd.train.job import TrainJob

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = [
    "model.embedding_dim=16", "model.cross_layers=1", "model.cross_rank=8",
    "model.deep_arch=[64,32]", "model.dense_arch=[16]",
]


def job_for(logs: Path, out: Path, *overrides: str) -> TrainJob:
    return load(TrainJob, None, [f"logs={logs}", f"out={out}", "tensorboard=false", "train.batch_size=512",
                                 "optim.dense_lr=0.01", "optim.embedding_lr=0.2", *SMALL_MODEL, *overrides])


def train(job: TrainJob, nproc: int) -> dict:
    """The job on `nproc` local ranks through the same entry as the CLI; rank 0's summary."""
    job.nproc = nproc
    return run_job(job)


def cli(*args: str, env_extra: dict | None = None, module: str = "distkd.cli", cwd=None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (the real CLI, or a fault wrapper around it) from the repository root."""
    env = {**os.environ, "DISTKD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=timeout)


def torchrun(*args: str, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run ARGS` (torchrun) with the test environment."""
    return cli(*args, module="torch.distributed.run", cwd=cwd, timeout=timeout)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def distkd_log():
    """The lines distkd logs (INFO and up) in this process while the block runs: a handler on the
    `distkd` logger itself, so it sees them whether or not distkd.log.setup() ran here."""
    root, handler = logging.getLogger("distkd"), _Lines()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
