"""Benchmarks (`make bench-*`): each measures its figures side by side in one run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name, for the one-line machine description every benchmark prints."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cli_summary(args: list[str], steps: int) -> dict:
    """Run `distkd ARGS` for `steps` optimizer steps in a fresh process, one torch thread per
    rank and no checkpoints, and return the run's summary.json."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTKD_NO_PROGRESS": "1"}
        cmd = [sys.executable, "-m", "distkd.cli", *args, f"out={out}", f"train.max_steps={steps}",
               "train.checkpoint_every=1000000", "tensorboard=false"]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads((Path(out) / "summary.json").read_text())
