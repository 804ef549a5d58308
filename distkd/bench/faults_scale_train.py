"""`make bench-faults` at scale, the training side: a 2-rank distillation from the scale run's
clean cache under torchrun, with ranks killed (the seams of tests/faults/train.py).

  reference  no fault, under the same torchrun: what the faulted runs must equal
  ranks      rank 1 SIGKILLed after step E+2, then rank 0 of the restarted group after 2E+2
             (2 restarts allowed): resumed from step E, then from 2E
  commit     rank 0 SIGKILLed while committing the checkpoint of step 3E (1 restart allowed):
             the half-committed folder is not trusted, the restart resumes from 2E

E is a fifth of the epoch's steps; every run stops at 4E. A run is whole when torchrun exits 0,
every restart resumed where the table says, its summary counts the reference's rows, and its
exported student equals the reference's tensor for tensor (tolerance 0: same world size, so
the same rows, batches and optimizer state). Rows lost = the reference's rows less the run's.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

from distkd.bench.ray_local import ROOT, ray_env
from distkd.cache.contract import read_manifest
from distkd.models.export import read_meta

logger = logging.getLogger(__name__)

NPROC = 2


def _torchrun(out: Path, logs: Path, cache: Path, sha: str, batch: int, every: int, restarts: int,
              faults: list[str], timeout: float = 3600) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(NPROC),
           "--max-restarts", str(restarts), "--monitor-interval", "0.5",
           "-m", "tests.faults.train", *faults, "--",
           "distill", "--config", "jobs/demo/distill.yaml", f"logs={logs}", f"out={out}",
           f"objective.teachers.0.cache={cache}", f"objective.teachers.0.sha256={sha}", "tensorboard=false",
           "train.eval_every=null", f"train.batch_size={batch}", f"train.checkpoint_every={every}",
           f"train.max_steps={4 * every}"]
    env = ray_env()  # the checkout on the path, one thread, no rank variables (torchrun sets its own)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{out}: the distillation did not finish within {timeout:.0f} s")
    return p.returncode, time.perf_counter() - t0, p.stderr


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "export" / "model.pt", weights_only=True)["state_dict"]


def _differing(a: Path, b: Path) -> int:
    """Tensors of `b`'s export that are not exactly `a`'s (a missing or extra name counts)."""
    wa, wb = _weights(a), _weights(b)
    return len(wa.keys() ^ wb.keys()) + sum(not torch.equal(wa[k], wb[k]) for k in wa.keys() & wb.keys())


def train_faults(work: Path, logs: Path, cache: Path, teacher: Path, batch: int) -> list[tuple[str, str, str, str]]:
    """The table rows (fault, what distkd did, rows lost, seconds) of the three runs."""

    train_rows = sum(e.output.rows for e in read_manifest(cache).shards.values())
    every = train_rows // (NPROC * batch) // 5
    if every < 3:
        raise SystemExit(f"{train_rows:,} train rows make {every} steps between checkpoints at batch {batch} "
                         f"× {NPROC} ranks; at least 3 are needed: more rows or a smaller --train-batch")
    sha = read_meta(teacher)["sha256"]
    runs = {
        "reference": (0, []),
        "ranks": (2, ["--kill", f"1:{every + 2}", "--kill", f"0:{2 * every + 2}:1"]),
        "commit": (1, ["--kill-during-save", str(3 * every)]),
    }
    seen: dict[str, tuple[int, float, str]] = {}
    for name, (restarts, faults) in runs.items():
        logger.info(f"distillation at scale: {name} ({4 * every} steps of {NPROC} × {batch} rows) …")
        seen[name] = _torchrun(work / f"train-{name}", logs, cache, sha, batch, every, restarts, faults)
    rc, secs, err = seen["reference"]
    if rc:
        raise SystemExit(f"the reference distillation exited {rc}:\n{err[-3000:]}")
    ref_rows = json.loads((work / "train-reference" / "summary.json").read_text())["rows"]
    rows = [("distillation from the cache, 2 ranks (reference)", f"{4 * every} steps, {ref_rows:,} rows", "0",
             f"{secs:.0f}")]
    ckpt = lambda name, step: work / f"train-{name}" / "checkpoints" / f"step-{step:08d}"  # noqa: E731
    described = {
        "ranks": (f"two ranks SIGKILLed in one run (rank 1 after step {every + 2}, rank 0 of the restarted group "
                  f"after {2 * every + 2})", [every, 2 * every], "two torchrun restarts, resumed from step {}"),
        "commit": (f"rank 0 SIGKILLed while committing the checkpoint of step {3 * every}", [2 * every],
                   "the half-committed folder not trusted; one restart, resumed from step {}"),
    }
    for name, (fault, resumes, did) in described.items():
        rc, secs, err = seen[name]
        out = work / f"train-{name}"
        missing = [s for s in resumes if f"resumed from {ckpt(name, s)} at epoch 0, step {s}" not in err]
        if rc or missing:
            last = err.strip().splitlines()[-1][:160] if err.strip() else ""
            rows.append((fault, f"FAILED: exit {rc}, no resume from step(s) {missing}: {last}", "–", f"{secs:.0f}"))
            continue
        got = json.loads((out / "summary.json").read_text())["rows"]
        differ = _differing(work / "train-reference", out)
        rows.append((fault, did.format(" then ".join(map(str, resumes))) + f"; {differ} tensors differ from the "
                     "reference's export (tolerance 0)", f"{ref_rows - got:,}" if not differ else f"{ref_rows - got:,} "
                     "(weights differ)", f"{secs:.0f}"))
    return rows
