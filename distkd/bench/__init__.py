"""Benchmarks (`make bench-*`): each measures its figures side by side in one run."""

from __future__ import annotations

import json
import os
import platform
import re
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


def scaled_jobs(src: Path, dst: Path, rows: int, runs: tuple[str, str]) -> Path:
    """A copy of the job files in `src` at `dst`, for a smaller (or larger) run of the same suite:
    data.yaml's top-level `rows:` set to `rows`, every `max_steps:` scaled by the same factor (a
    student's budget stays the same fraction of the teacher's epoch), and every path under
    runs[0] moved under runs[1]. Text edits, not a parse, so that another commit's job files keep
    their own schema (bench.vs runs this on an older tree)."""
    data = (src / "data.yaml").read_text()
    found = re.findall(r"(?m)^rows:\s*(\d+)", data)
    if len(found) != 1:
        raise SystemExit(f"{src / 'data.yaml'}: expected one top-level 'rows:' line to scale, found {len(found)}")
    factor = rows / int(found[0])
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.yaml")):
        text = f.read_text().replace(runs[0].rstrip("/") + "/", runs[1].rstrip("/") + "/")
        text = re.sub(r"(?m)^rows:\s*\d+", f"rows: {rows}", text) if f.name == "data.yaml" else text
        text = re.sub(r"(?m)^(\s*max_steps:\s*)(\d+)", lambda m: f"{m.group(1)}{max(1, round(int(m.group(2)) * factor))}",
                      text)
        (dst / f.name).write_text(f"# {f} scaled to {rows:,} rows (distkd.bench.scaled_jobs); its comments may not fit\n"
                                  + text)
    return dst
