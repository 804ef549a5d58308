"""The reductions of an evaluation: seeds to mean and spread, η (the share of the teacher-student
gap distillation recovers), per-seed pairs, and the paired KD - hard differences with a 95% t
interval. η is reported for each task's gap metrics: AUC and logloss for a binary task,
Recall@10 and NDCG@10 for a multiclass (next-item) one."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

TEACHER, KD, HARD, ORACLE = "teacher", "student-KD", "student-hard", "oracle"
MIN_GAP = 1e-4  # |teacher − hard| below this: η is undefined, not a huge number
CURVE_BINS = 15
GAP_METRICS = {"auc": +1, "logloss": -1}  # +1: higher is better
RETRIEVAL_GAP_METRICS = {"recall@10": +1, "ndcg@10": +1}


def gap_metrics(task_metrics: dict[str, Any]) -> dict[str, int]:
    """The metrics η is reported on for a task, from what its metrics hold."""
    return GAP_METRICS if "auc" in task_metrics else RETRIEVAL_GAP_METRICS


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
    """η per gap metric of the task: from the seed means, and per seed pair."""
    t_name, k_name, h_name = names
    out = {}
    for metric, sign in gap_metrics(models[t_name]["metrics"][task]).items():
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
    """Per task and gap metric: the per-seed differences a − b (same training seed) and
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
        for metric in gap_metrics(models[a]["metrics"][task]):
            d = [ka[s]["metrics"][task][metric] - kb[s]["metrics"][task][metric] for s in seeds]
            out[task][metric] = {"per_seed": d, **t_interval(d)}
    return out
