"""`distkd eval`: the teacher, the distilled student and the hard-label student on a held-out split.

Every export is loaded once and the split streamed once through the real loader, in one
process. Per export: per-task metrics (TaskMetrics), a subsample of its probabilities for
calibration curves, its parameter count and its CPU inference rate (forward passes only,
decode excluded, one torch thread). The seeds of one setup are reduced to mean, std and n.

    η = (m_KD − m_hard) / (m_teacher − m_hard)

is the share of the teacher–student gap that distillation recovers, from the seed means and,
where seeds line up, per seed. On synthetic logs the true probabilities (the schema's eval
columns) give an "oracle" row: the best any model can score against these labels.

With `serving: true` the report adds serving figures (distkd.serve.figures): the teacher,
the first distilled student and that student with int8 tables as TorchScript serving files,
their sizes and p50/p99 latency at batch 1, 64 and 1024 on one CPU thread, and the AUC the
int8 tables cost.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from distkd import storage
from distkd.config import ConfigError, load, to_dict
from distkd.models.export import META_FILE, load_export, read_meta
from distkd.data.layout import PartitionRange, split_files
from distkd.data.loader import LogLoader
from distkd.metrics import METRICS, TaskMetrics
from distkd.report import format_comparison, write_report
from distkd.data.schema import LogsError, Schema, load_schema

TEACHER, KD, HARD, ORACLE = "teacher", "student-KD", "student-hard", "oracle"
MIN_GAP = 1e-4  # |teacher − hard| below this: η is undefined, not a huge number
CURVE_BINS = 15
CURVE_ROWS = 1_000_000  # at most this many rows per export kept for calibration curves
RESULT_FORMAT = 1
GAP_METRICS = {"auc": +1, "logloss": -1}  # +1: higher is better


@dataclass
class EvalJob:
    logs: str = ""
    teacher: str = ""  # export directory, or a training run directory holding export/
    kd: list[str] = field(default_factory=list)  # one per seed
    hard: list[str] = field(default_factory=list)  # one per seed
    out: str = ""  # report directory
    split: str = "test"
    batch_size: int = 16384
    partitions: dict[str, PartitionRange] = field(default_factory=dict)  # partitioned logs (distkd.data.layout)
    serving: bool = False  # add file sizes, latency and the int8 AUC cost (distkd.serve.figures)

    def check(self) -> None:
        missing = [n for n in ("logs", "teacher", "kd", "hard", "out") if not getattr(self, n)]
        if missing:
            raise ConfigError(f"eval: missing {', '.join(missing)} (give --{' --'.join(missing)} or a --config)")
        if self.batch_size < 1:
            raise ConfigError(f"eval: batch_size must be >= 1, got {self.batch_size}")
        for d in self.kd + self.hard:
            if "=" in d and not Path(d).exists():
                raise ConfigError(f"eval: '{d}' looks like a key=value override caught by --kd/--hard; "
                                  "put overrides before the options")


# -- inputs -----------------------------------------------------------------------------


def resolve_export(path: str | Path) -> Path:
    """An export directory, or a training run directory whose export/ is one."""
    p = Path(path)
    for d in (p, p / "export"):
        if (d / META_FILE).is_file():
            return d
    if not p.exists():
        raise ConfigError(f"{p}: no such export directory")
    raise ConfigError(f"{p}: not a model export (no {META_FILE} here nor in {p / 'export'})")


def check_export(export_dir: Path, schema: Schema, logs: str | Path) -> dict[str, Any]:
    meta = read_meta(export_dir)
    want, got = schema.fingerprint(), meta.get("schema_fingerprint")
    if got != want:
        raise ConfigError(f"{export_dir}: exported for schema {got}, but the logs {logs} have schema {want}; "
                          "evaluate a model on logs with the schema it was trained on")
    return meta


# -- one export -------------------------------------------------------------------------


def _every(row0: int, n: int, stride: int) -> np.ndarray:
    """Indices of a batch's rows whose global row number is a multiple of `stride`."""
    return np.arange((-row0) % stride, n, stride)


@torch.inference_mode()
def evaluate_export(export_dir: Path, loader: LogLoader, stride: int = 1) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics, CPU rate and parameter count of one export over the loader's split.

    Returns (entry, probabilities [N', T] float32, labels [N', T]) for every `stride`-th row.
    """
    model, meta = load_export(export_dir)
    metrics = TaskMetrics(loader.schema.task_names)
    probs, labels = [], []
    seconds, row0 = 0.0, 0
    for batch in loader:
        if row0 == 0:
            model(batch.sparse, batch.dense)  # warm-up, untimed: first-call setup is not inference
        t0 = time.perf_counter()
        logits = model(batch.sparse, batch.dense).logits
        seconds += time.perf_counter() - t0
        metrics.update(logits, batch.labels)
        keep = torch.from_numpy(_every(row0, len(batch), stride))
        probs.append(torch.sigmoid(logits[keep].float()).numpy())
        labels.append(batch.labels[keep].numpy())
        row0 += len(batch)
    seed = (meta.get("job") or {}).get("train", {}).get("seed")
    entry = {
        "dir": str(export_dir),
        "sha256": meta["sha256"],
        "role": meta.get("role"),
        "seed": seed,
        "parameters": int(meta["parameters"]),
        "rows": row0,
        "forward_s": seconds,
        "rows_per_s": row0 / seconds if seconds > 0 else float("nan"),
        "metrics": metrics.compute(),
    }
    return entry, np.concatenate(probs), np.concatenate(labels)


def oracle_metrics(files: list[str], schema: Schema) -> Optional[dict[str, dict[str, float]]]:
    """Metrics of the true probabilities, or None where the logs have none.

    By convention the true probability of task T is the evaluation-only column `p_T`
    (synthetic logs have them); other evaluation columns (MovieLens keeps `rating`) are not
    probabilities and never make an oracle."""
    oracle = [f"p_{task}" for task in schema.task_names]
    if not set(oracle) <= set(schema.eval_columns):
        return None
    metrics = TaskMetrics(schema.task_names)
    for path in files:
        pf = storage.open_parquet(path)
        try:
            if any(pf.schema_arrow.get_field_index(c) < 0 for c in oracle):
                raise LogsError(f"{path}: missing eval column(s) {oracle} named by the schema")
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g, columns=schema.label_columns + oracle)
                y = np.stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
                              for c in schema.label_columns], 1)
                p = np.stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                              for c in oracle], 1).clip(1e-7, 1 - 1e-7)
                metrics.update(torch.from_numpy(np.log(p) - np.log1p(-p)), torch.from_numpy(y))
        finally:
            pf.close()
    return metrics.compute()


# -- reductions ---------------------------------------------------------------------------


def calibration_curve(p: np.ndarray, y: np.ndarray, bins: int = CURVE_BINS) -> dict[str, list[float]]:
    """Mean prediction vs observed rate in `bins` quantile bins of the prediction (labelled rows)."""
    keep = ~np.isnan(y)
    p, y = p[keep].astype(np.float64), y[keep].astype(np.float64)
    if p.size == 0:
        return {"pred": [], "obs": [], "count": []}
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    k = max(len(edges) - 1, 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, k - 1)
    count = np.bincount(idx, minlength=k)
    nz = count > 0
    pred = np.bincount(idx, weights=p, minlength=k)[nz] / count[nz]
    obs = np.bincount(idx, weights=y, minlength=k)[nz] / count[nz]
    return {"pred": pred.tolist(), "obs": obs.tolist(), "count": count[nz].tolist()}


def spread(values: list[float]) -> dict[str, Any]:
    """mean, sample std (None for one value) and n."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()) if a.size else float("nan"),
            "std": float(a.std(ddof=1)) if a.size > 1 else None, "n": int(a.size)}


def gap_recovered(kd: Optional[float], hard: Optional[float], teacher: Optional[float],
                  min_gap: float = MIN_GAP) -> Optional[float]:
    """η = (kd − hard) / (teacher − hard): 1 when KD reaches the teacher, 0 when it adds nothing.

    Negating all three leaves the ratio unchanged, so for a lower-is-better metric (logloss)
    the same formula is positive when the gap is recovered. None when a value is missing or
    |teacher − hard| < min_gap: there is no gap to share out.
    """
    if any(v is None or not math.isfinite(v) for v in (kd, hard, teacher)):
        return None
    gap = teacher - hard
    return None if abs(gap) < min_gap else (kd - hard) / gap


def _by_seed(entries: list[dict]) -> Optional[dict]:
    seeds = [e["seed"] for e in entries]
    return dict(zip(seeds, entries)) if None not in seeds and len(set(seeds)) == len(seeds) else None


def seed_pairs(teacher: list[dict], kd: list[dict], hard: list[dict]) -> list[tuple[str, dict, dict, dict]]:
    """(label, teacher, kd, hard) triples: by training seed where all carry one, else by position
    for equal counts; a single teacher serves every pair. Empty when they do not line up."""
    sk, sh, st = _by_seed(kd), _by_seed(hard), _by_seed(teacher)
    if sk and sh and set(sk) == set(sh):
        triples = [(f"seed {s}", sk[s], sh[s]) for s in sorted(sk)]
        t_of = (lambda i, s: st[s]) if st and set(sk) <= set(st) else None
    elif len(kd) == len(hard):
        triples = [(f"#{i + 1}", k, h) for i, (k, h) in enumerate(zip(kd, hard))]
        t_of = None
    else:
        return []
    if len(teacher) == 1:
        t_of = lambda i, s: teacher[0]  # noqa: E731
    elif t_of is None and len(teacher) == len(triples):
        t_of = lambda i, s: teacher[i]  # noqa: E731
    if t_of is None:
        return []
    return [(lab, t_of(i, k["seed"]), k, h) for i, (lab, k, h) in enumerate(triples)]


def gap_report(models: dict[str, dict], task: str, names=(TEACHER, KD, HARD)) -> dict[str, dict]:
    """η per metric of GAP_METRICS for one task: from the seed means, and per seed pair."""
    t_name, k_name, h_name = names
    out = {}
    for metric, sign in GAP_METRICS.items():
        mean = {n: models[n]["metrics"][task][metric]["mean"] for n in names}
        gap = mean[t_name] - mean[h_name]
        pairs = [{"pair": lab, "eta": gap_recovered(k["metrics"][task][metric], h["metrics"][task][metric],
                                                    t["metrics"][task][metric])}
                 for lab, t, k, h in seed_pairs(models[t_name]["exports"], models[k_name]["exports"],
                                               models[h_name]["exports"])]
        defined = [p["eta"] for p in pairs if p["eta"] is not None]
        out[metric] = {
            "value": gap_recovered(mean[k_name], mean[h_name], mean[t_name]),
            "gap": gap,
            "teacher_better": bool(sign * gap > 0),
            "pairs": pairs,
            "per_pair": spread(defined) | {"min": min(defined, default=None), "max": max(defined, default=None),
                                           "undefined": len(pairs) - len(defined)},
        }
    return out


# -- the whole comparison -----------------------------------------------------------------


def evaluate_models(logs: str | Path, models: dict[str, list[str]], split: str = "test", batch_size: int = 16384,
                    *, threads: int = 1, curve_rows: int = CURVE_ROWS, gap=(TEACHER, KD, HARD),
                    partitions=None, serving_dir: Optional[str | Path] = None,
                    serving_calls: Optional[dict[int, int]] = None) -> dict[str, Any]:
    """Evaluate every export of every named model on `split`; see the module docstring.
    With `serving_dir`, the serving figures too (files written there)."""
    schema = load_schema(logs)
    files = split_files(str(logs), split, partitions)
    if ORACLE in models:
        raise ConfigError(f"'{ORACLE}' is reserved for the true-probability row; name the model otherwise")
    dirs: dict[str, list[Path]] = {}
    for name, given in models.items():
        if not given:
            raise ConfigError(f"{name}: no export directory given")
        dirs[name] = [resolve_export(d) for d in given]
        for d in dirs[name]:
            check_export(d, schema, logs)  # every input checked before any work
    loader = LogLoader(files, schema, batch_size, prefetch=0)  # decode inline: nothing competes with the timing
    stride = max(1, math.ceil(loader.num_rows / curve_rows))

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[str, dict] = {}
    try:
        for name, exports in dirs.items():
            entries, probs, labels = [], [], None
            for d in exports:
                entry, p, y = evaluate_export(d, loader, stride)
                entries.append(entry)
                probs.append(p)
                labels = y
            pooled_p, pooled_y = np.concatenate(probs), np.tile(labels, (len(probs), 1))
            out[name] = {
                "n": len(entries),
                "exports": entries,
                "metrics": {t: {m: spread([e["metrics"][t][m] for e in entries]) for m in METRICS}
                            for t in schema.task_names},
                "parameters": spread([e["parameters"] for e in entries]),
                "rows_per_s": spread([e["rows_per_s"] for e in entries]),
                "calibration": {t: calibration_curve(pooled_p[:, i], pooled_y[:, i])
                                for i, t in enumerate(schema.task_names)},
            }
            del probs, pooled_p, pooled_y
        serving = None
        if serving_dir is not None and TEACHER in dirs and KD in dirs:
            from distkd.serve.figures import serving_figures

            serving = serving_figures({TEACHER: dirs[TEACHER][0], KD: dirs[KD][0]}, loader, files, serving_dir,
                                      {n: out[n]["exports"][0]["metrics"] for n in (TEACHER, KD)},
                                      calls=serving_calls)
    finally:
        torch.set_num_threads(old_threads)

    oracle = oracle_metrics(files, schema)
    if oracle is not None:
        out[ORACLE] = {"n": 1, "exports": [], "source": schema.eval_columns, "parameters": None,
                       "rows_per_s": None, "calibration": {},
                       "metrics": {t: {m: spread([v]) for m, v in ms.items()} for t, ms in oracle.items()}}
    return {
        "format": RESULT_FORMAT,
        "logs": str(logs),
        "split": split,
        "rows": loader.num_rows,
        "tasks": schema.task_names,
        "schema_fingerprint": schema.fingerprint(),
        "batch_size": batch_size,
        "threads": threads,
        "torch": torch.__version__,
        "curve_every": stride,
        "models": out,
        "eta": {t: gap_report(out, t, gap) for t in schema.task_names} if set(gap) <= set(out) else {},
        "paired": paired_differences(out, schema.task_names, gap[1], gap[2]),
        "min_gap": MIN_GAP,
        **({"serving": serving} if serving is not None else {}),
    }


# -- command line -------------------------------------------------------------------------


def job_from_args(args) -> EvalJob:
    """The job YAML (`--config`) plus key=value overrides, then any flag given on the command line."""
    job = load(EvalJob, getattr(args, "config", None), list(getattr(args, "overrides", None) or []))
    for name in ("logs", "teacher", "kd", "hard", "out", "split", "batch_size", "serving"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(job, name, list(value) if isinstance(value, (list, tuple)) else value)
    job.check()
    return job


def command_line(job: EvalJob) -> str:
    """The flags-only command that reproduces this evaluation."""
    return shlex.join(["distkd", "eval", "--logs", job.logs, "--teacher", job.teacher, "--kd", *job.kd,
                       "--hard", *job.hard, "--out", job.out, "--split", job.split,
                       "--batch-size", str(job.batch_size), *(["--serving"] if job.serving else [])])


def run(args) -> int:
    """`distkd eval`."""
    job = job_from_args(args)
    result = evaluate_models(job.logs, {TEACHER: [job.teacher], KD: job.kd, HARD: job.hard},
                             job.split, job.batch_size, partitions=job.partitions,
                             serving_dir=Path(job.out) / "serving" if job.serving else None)
    result["command"] = command_line(job)
    result["job"] = to_dict(job)
    path = write_report(result, job.out)
    print(format_comparison(result))
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    from distkd.cli import main

    sys.exit(main(["eval", *sys.argv[1:]]))


# -- paired differences over seeds (KD − hard, same seed) -----------------------------------------

# two-sided 95% Student t quantiles t(0.975, df), df = 1..30; beyond, the normal's 1.96 is within 2%
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(diffs: list[float]) -> dict[str, Any]:
    """Mean of `diffs` and its 95% t interval over the n values (None below two values)."""
    a = np.asarray(diffs, dtype=np.float64)
    n = int(a.size)
    if n < 2:
        return {"n": n, "mean": float(a.mean()) if n else None, "low": None, "high": None}
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * a.std(ddof=1) / math.sqrt(n)
    return {"n": n, "mean": float(a.mean()), "low": float(a.mean() - half), "high": float(a.mean() + half)}


def paired_differences(models: dict[str, dict], tasks: list[str], a: str = KD, b: str = HARD) -> dict[str, Any]:
    """Per task and metric of GAP_METRICS: the per-seed differences a − b (same training seed) and
    their 95% t interval. Empty when the exports of a and b do not pair by seed."""
    if a not in models or b not in models:
        return {}
    ka, kb = _by_seed(models[a]["exports"]), _by_seed(models[b]["exports"])
    if not ka or not kb or not set(ka) & set(kb):
        return {}
    seeds = sorted(set(ka) & set(kb))
    out: dict[str, Any] = {"pair": f"{a} − {b}", "seeds": seeds}
    for task in tasks:
        out[task] = {}
        for metric in GAP_METRICS:
            d = [ka[s]["metrics"][task][metric] - kb[s]["metrics"][task][metric] for s in seeds]
            out[task][metric] = {"per_seed": d, **t_interval(d)}
    return out
