"""A sweep study's own state: `<out>/<study>/state.json`, plain JSON that distkd writes and reads.

    {"version": 1, "study": "kd", "fingerprint": {...},       what the trial list was made from
     "trials": [{"id": "t000", "params": {...},               the trial's searched values
                 "status": "pending" | "running" | "done" | "stopped" | "errored",
                 "result": {...} | null,                      its last report (scalars only)
                 "error": null | "...", "runs": ["run-..."],  the driver runs that ran it
                 "seconds": {"run-...": s}}]}                 its training seconds in each

With the random and grid searches the driver draws every trial's parameters itself, up front
(seeded: `seed` and the study's name), so the list is whole before any trial runs. With optuna
(model-based: each proposal depends on earlier results) the driver records each trial's
parameters as Tune's searcher proposes them. A rerun reads only this file: `done` and `stopped`
trials are kept, the others run again (a fresh Tune experiment with their parameters fixed),
and the tables, plot and best export are made from it. Nothing Tune writes is read back, so no
pickled state from a path a job names is ever loaded. Every write is atomic (temp file, fsync,
rename).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any, Iterable, Optional

from distkd.config import ConfigError
from distkd.storage import atomic_write_bytes

VERSION = 1
FINISHED = ("done", "stopped")  # kept on a rerun; pending, running and errored trials run again
STATE = "state.json"


def draw(space: dict[str, dict[str, Any]], num_samples: int, seed: int, name: str) -> list[dict[str, Any]]:
    """Every trial's parameters: the `grid` entries crossed (in the space's order), and for each
    combination `num_samples` draws of the other entries, from a generator seeded by (seed, name)."""
    rng = random.Random(f"distkd-sweep/{seed}/{name}")
    grid = [(k, spec["grid"]) for k, spec in space.items() if "grid" in spec]
    points = []
    for combo in itertools.product(*(v for _, v in grid)):
        for _ in range(num_samples):
            point: dict[str, Any] = {}
            for key, spec in space.items():
                kind, v = next(iter(spec.items()))
                if kind == "grid":
                    point[key] = combo[[k for k, _ in grid].index(key)]
                elif kind == "choice":
                    point[key] = v[rng.randrange(len(v))]
                elif kind == "uniform":
                    point[key] = rng.uniform(v[0], v[1])
                elif kind == "loguniform":
                    point[key] = math.exp(rng.uniform(math.log(v[0]), math.log(v[1])))
                else:  # randint, inclusive as written
                    point[key] = rng.randint(v[0], v[1])
            points.append(point)
    return points


def _scalars(result: dict) -> dict[str, Any]:
    return {k: v for k, v in result.items()
            if k != "config" and (v is None or isinstance(v, (bool, int, float, str)))}


class StudyState:
    """The trial list of one study and its JSON file."""

    def __init__(self, path: Path, study: str, fingerprint: dict, trials: list[dict]):
        self.path, self.study, self.fingerprint, self.trials = Path(path), study, fingerprint, trials

    # -- the file --

    @classmethod
    def open(cls, folder: Path, study: str, fingerprint: dict, points: Optional[list[dict]]) -> tuple["StudyState", bool]:
        """The study's state at <folder>/state.json, read when it exists (and made from the same
        fingerprint), else new with `points` as pending trials. Returns (state, resumed)."""
        path = Path(folder) / STATE
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except ValueError as e:
                raise ConfigError(f"{path}: not a distkd sweep state ({e}); remove it to start the study over") from None
            if data.get("version") != VERSION or data.get("study") != study or not isinstance(data.get("trials"), list):
                raise ConfigError(f"{path}: not a version-{VERSION} state of study {study!r}; remove it to start over")
            if data.get("fingerprint") != json.loads(json.dumps(fingerprint)):
                raise ConfigError(f"{path}: the study changed since its trials were drawn (base, overrides, space, "
                                  f"search, seed or num_samples); remove {path.parent} or set another `out`")
            for t in data["trials"]:
                if not isinstance(t, dict) or not isinstance(t.get("id"), str) or not isinstance(t.get("params"), dict):
                    raise ConfigError(f"{path}: a trial entry without id and params: {t!r}")
            return cls(path, study, data["fingerprint"], data["trials"]), True
        trials = [new_trial(f"t{i:03d}", p) for i, p in enumerate(points or [])]
        state = cls(path, study, fingerprint, trials)
        state.save()
        return state, False

    def save(self) -> None:
        body = json.dumps({"version": VERSION, "study": self.study, "fingerprint": self.fingerprint,
                           "trials": self.trials}, indent=1, sort_keys=True).encode()
        atomic_write_bytes(self.path, lambda fh: fh.write(body))

    # -- the trials --

    def get(self, trial_id: str) -> Optional[dict]:
        return next((t for t in self.trials if t["id"] == trial_id), None)

    def unfinished(self) -> list[dict]:
        return [t for t in self.trials if t["status"] not in FINISHED]

    def finished(self) -> list[dict]:
        return [t for t in self.trials if t["status"] in FINISHED]

    def update(self, trial_id: str, params: dict, run: str, status: Optional[str] = None,
               result: Optional[dict] = None, error: Optional[str] = None) -> dict:
        """Record a trial's status and last result (adding it when a searcher just proposed it); saved at once."""
        t = self.get(trial_id)
        if t is None:
            t = new_trial(trial_id, params)
            self.trials.append(t)
        if run not in t["runs"]:
            t["runs"].append(run)
        if status:
            t["status"] = status
        if result is not None:
            t["result"] = _scalars(result)
            if isinstance(result.get("time_total_s"), (int, float)):  # Tune's clock restarts with each run
                t.setdefault("seconds", {})[run] = float(result["time_total_s"])
        if error is not None:
            t["error"] = error[-2000:]
        self.save()
        return t

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t["status"]] = out.get(t["status"], 0) + 1
        return out

    def best(self, metric: str, mode: str) -> Optional[dict]:
        scored = [t for t in self.trials if (t.get("result") or {}).get(metric) is not None]
        if not scored:
            return None
        key = lambda t: t["result"][metric]  # noqa: E731
        return max(scored, key=key) if mode == "max" else min(scored, key=key)


def new_trial(trial_id: str, params: dict) -> dict:
    return {"id": trial_id, "params": dict(params), "status": "pending", "result": None, "error": None, "runs": [],
            "seconds": {}}


def fingerprint(study, search: str, seed: int, num_samples: int, extra: Iterable[str] = (),
                points: Optional[list[dict]] = None) -> dict:
    """What a study's trial list is made from: a rerun with anything else here is refused."""
    return {"base": str(Path(study.base).resolve()), "overrides": list(study.overrides) + list(extra),
            "space": study.space, "search": search, "seed": seed, "num_samples": num_samples,
            **({"points": points} if points is not None else {})}
