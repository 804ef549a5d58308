"""What a sweep shows and leaves: progress lines, the trial table, the plot, the best export, the report.

    <out>/<study>/state.json                the study's trials (distkd.launch.sweep_state): all of the below is made from it
    <out>/<study>/trials.csv, trials.md     every trial ranked by the sweep's validation metric:
                                            parameters, valid and test metrics per task, steps, seconds
    <out>/<study>/<metric>.png              that metric against each searched parameter
    <out>/<study>/best/export               the best finished trial's export (copied: a few MB)
    <out>/report/                           teacher vs the best KD student vs the best hard-label
                                            student (their final_seeds runs where given), on report_split
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from ray import tune

from distkd.launch.sweep_state import StudyState
from distkd.storage import atomic_write_bytes

# matplotlib is imported where a plot is drawn (~0.5 s).

SHOWN = ("auc", "logloss")

logger = logging.getLogger(__name__)


def _params(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("__")}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


class Record(tune.Callback):
    """Records every trial of a Tune run in the study's state (distkd.launch.sweep_state), and
    logs one line per change: trials done / running / stopped (ASHA) / errored, counting those
    kept from earlier runs, and the best so far."""

    def __init__(self, state: StudyState, run: str, metric: str, mode: str, every_s: float = 15.0):
        self.state, self.run, self.metric, self.mode, self.every_s = state, run, metric, mode, every_s
        self.last_line, self.last_t = "", 0.0

    def _record(self, trial, **kw) -> None:
        config = trial.config or {}
        self.state.update(config.get("__trial") or trial.trial_id, _params(config), self.run, **kw)

    def line(self) -> str:
        counts = self.state.counts()
        parts = ", ".join(f"{counts[k]} {k}" for k in ("done", "running", "stopped", "pending", "errored") if counts.get(k))
        line = f"sweep {self.state.study}: {len(self.state.trials)} trials: {parts}"
        best = self.state.best(self.metric, self.mode)
        if best:
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
            line += f"; best {self.metric} {best['result'][self.metric]:.4f} ({best['id']}: {params})"
        return line

    def _say(self, force: bool = False) -> None:
        line, now = self.line(), time.monotonic()
        if line != self.last_line and (force or now - self.last_t >= self.every_s):
            logger.info(line)
            self.last_line, self.last_t = line, now

    def on_trial_start(self, iteration, trials, trial, **info):
        self._record(trial, status="running")
        self._say()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._record(trial, status="running", result=result)
        self._say()

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        self._record(trial, status="done" if result.get("finished") else "stopped", result=result)
        self._say(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        path = trial.error_file  # this run's own text file (never a pickle)
        text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else "error"
        self._record(trial, status="errored", result=trial.last_result or None, error=text)
        self._say(force=True)


def final(state: StudyState) -> None:
    counts = state.counts()
    logger.info(f"sweep {state.study}: finished, {len(state.trials)} trials: "
                + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


# -- the table --------------------------------------------------------------------------------


def rows(state: StudyState, metric: str, mode: str) -> list[dict[str, Any]]:
    """Every trial of a study's state, ranked by `metric` (trials without it last)."""
    out = []
    trials = state.path.parent / "trials"
    for t in state.trials:
        m = t.get("result") or {}
        row = {"trial": t["id"], "status": t["status"]}
        row.update(t["params"])
        row[metric] = m.get(metric)
        for key in sorted(m, key=lambda k: (not k.startswith("valid/"), k)):  # valid first, then test
            if key.startswith(("valid/", "test/")) and key.rsplit("/", 1)[1] in SHOWN and key != metric:
                row[key] = m[key]
        row["steps"] = m.get("step")
        seconds = (t.get("seconds") or {}).values()  # summed over the runs that ran it (a resumed trial: two)
        row["seconds"] = round(sum(seconds), 1) if seconds else None
        row["path"] = str(trials / t["id"])
        out.append(row)
    sign = -1 if mode == "max" else 1
    out.sort(key=lambda row: (row[metric] is None, sign * (row[metric] or 0.0)))
    for i, row in enumerate(out, 1):
        row["rank"] = i
    return out


def _columns(table: list[dict]) -> list[str]:
    cols = ["rank"]
    for row in table:
        cols += [k for k in row if k not in cols and k != "path"]
    return cols


def write_table(table: list[dict], folder: Path) -> None:
    cols = _columns(table)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(table)
    atomic_write_bytes(folder / "trials.csv", lambda fh: fh.write(buf.getvalue().encode()))
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join("–" if row.get(c) is None else _fmt(row[c]) for c in cols) + " |" for row in table]
    atomic_write_bytes(folder / "trials.md", lambda fh: fh.write(("\n".join(md) + "\n").encode()))


def plot(table: list[dict], metric: str, space: dict, path: Path) -> None:
    """The metric against each searched parameter (one panel each; log x for loguniform)."""
    from matplotlib.figure import Figure

    names = list(space) or ["trial"]
    fig = Figure(figsize=(3.6 * len(names), 3.4))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        for status, marker in (("done", "o"), ("stopped", "x"), ("errored", "s")):
            pts = [(row.get(name, row["rank"]), row[metric]) for row in table
                   if row["status"] == status and row[metric] is not None]
            if pts:
                xs, ys = zip(*pts)
                if not all(isinstance(x, (int, float)) for x in xs):
                    xs = [str(x) for x in xs]
                ax.scatter(xs, ys, marker=marker, label=status)
        if "loguniform" in space.get(name, {}):
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel=metric)
        ax.legend(fontsize=7)
    fig.suptitle(f"{metric} of every trial (x: stopped early by the scheduler)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))


def best_export(table: list[dict], folder: Path, metric: str) -> dict | None:
    """Copy the best finished trial's export to <folder>/best/export; return its row."""
    for row in table:
        src = row.get("export")
        if row["status"] == "done" and src and Path(src).is_dir() and row.get(metric) is not None:
            dst = folder / "best" / "export"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
            info = {k: v for k, v in row.items() if k != "path"} | {"source": str(src)}
            atomic_write_bytes(folder / "best" / "best.json", lambda fh: fh.write(json.dumps(info, indent=2).encode()))
            return row
    return None


# -- the whole sweep --------------------------------------------------------------------------


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def exports(state: StudyState) -> list[str]:
    trials = state.path.parent / "trials"
    return [str(trials / t["id"] / "export") for t in state.trials
            if t["status"] == "done" and (trials / t["id"] / "export").is_dir()]


def best_of_studies(cfg, states: dict[str, StudyState]) -> dict[str, dict] | None:
    """Tables, plots and best exports of every study (from their states); the best row of each,
    or None when a study has no finished trial."""
    out = Path(cfg.out).resolve()
    best: dict[str, dict] = {}
    for name, state in states.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        table = rows(state, cfg.metric, cfg.mode)
        for row in table:
            export = folder / "trials" / row["trial"] / "export"
            row["export"] = str(export) if row["status"] == "done" and export.is_dir() else None
        write_table(table, folder)
        study = cfg.studies()[name]
        plot(table, cfg.metric, study.space, folder / f"{_slug(cfg.metric)}.png")
        row = best_export(table, folder, cfg.metric)
        if row is None:
            logger.error(f"sweep {name}: no trial finished; nothing to compare")
            return None
        best[name] = row
        params = ", ".join(f"{k}={_fmt(row[k])}" for k in study.space)
        print(f"sweep {name}: best {cfg.metric} {row[cfg.metric]:.4f}: {params}; export {folder / 'best' / 'export'}; "
              f"table {folder / 'trials.md'}")
    return best
