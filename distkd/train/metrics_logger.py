"""What a run shows and records while it trains (rank 0): progress, TensorBoard, loss log.

* a tqdm bar: steps, rows/s over all ranks, the loss, ETA;
* TensorBoard scalars (`<out>/tensorboard/`): train/loss and each term, valid/<task>/<metric>;
* `<out>/losses.jsonl`: one line per step, {"step", "loss", <term>: value}, appended across
  resumes (lines past the resumed step are dropped first), for golden-loss tests and plots.

Loss values stay tensors until `log_every` steps have gathered, then move to the host in
one transfer: on a GPU a `.item()` per step would stall the step on the device.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

# TensorBoard is imported where a job asks for it (tensorboard: true): its import alone takes ~0.45 s.

LOSS_LOG = "losses.jsonl"


class MetricsLogger:
    def __init__(self, out: Path, is_main: bool, total: int, start: int, rows_per_step: int, log_every: int,
                 tensorboard: bool, window: int = 10):
        self.is_main, self.rows_per_step, self.log_every, self.window = is_main, rows_per_step, log_every, window
        self.start, self.t1 = start, None
        self.steps = 0
        self.pending: list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]] = []
        self.history: list[dict[str, float]] = []  # this run's steps, on the host
        self.smoothed: Optional[float] = None
        self.bar = self.tb = None
        self.log_path = out / LOSS_LOG
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            _truncate(self.log_path, start)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5 if sys.stderr.isatty() else 15,
                            disable=os.environ.get("DISTKD_NO_PROGRESS") == "1")
        # rows/s counts from here: opening TensorBoard (its import alone is ~0.5 s here) is set-up, not training
        self.t0 = time.perf_counter()

    def step(self, step: int, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        self.pending.append((step, loss.detach(), parts))
        if len(self.pending) >= self.log_every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        names = list(self.pending[0][2])
        values = torch.stack([torch.stack([loss, *(p[n] for n in names)]) for _, loss, p in self.pending]).tolist()
        rows = [{"step": s, "loss": v[0], **dict(zip(names, v[1:]))} for (s, _, _), v in zip(self.pending, values)]
        self.pending.clear()
        self.history += rows
        if not self.is_main:
            return
        with open(self.log_path, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        for r in rows:
            self.smoothed = r["loss"] if self.smoothed is None else 0.95 * self.smoothed + 0.05 * r["loss"]
            if self.tb is not None:
                for k, v in r.items():
                    if k != "step":
                        self.tb.add_scalar(f"train/{k}", v, r["step"])
        if self.bar is not None:
            self.bar.update(len(rows))
            self.bar.set_postfix(loss=f"{self.smoothed:.4f}", rows_s=f"{self.rate():,.0f}")

    def valid(self, step: int, result: dict[str, dict[str, float]]) -> None:
        if self.tb is not None:
            for task, vals in result.items():
                for name, v in vals.items():
                    self.tb.add_scalar(f"valid/{task}/{name}", v, step)

    def rate(self) -> float:
        end = self.t1 if self.t1 is not None else time.perf_counter()
        return self.steps * self.rows_per_step / max(end - self.t0, 1e-9)

    def loss_summary(self) -> dict[str, Any]:
        """Mean loss and terms over the first and the last `window` steps of this run (raw, not
        smoothed, so the two are comparable)."""
        w = min(self.window, max(1, len(self.history) // 2))
        if not self.history:
            return {"window": 0, "first": {}, "last": {}}
        keys = [k for k in self.history[0] if k != "step"]

        def mean(rows):
            return {k: sum(r[k] for r in rows) / len(rows) for k in keys}

        return {"window": w, "first": mean(self.history[:w]), "last": mean(self.history[-w:])}

    def close(self) -> None:
        self.flush()
        self.t1 = time.perf_counter()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_losses(out: str | Path) -> list[dict[str, float]]:
    path = Path(out) / LOSS_LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _truncate(path: Path, start: int) -> None:
    """Keep the lines of steps <= start (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
