"""The evaluation report: a console table, `report.md`, `result.json` and PNG plots.

Input is the result dict of `distkd.evaluate.evaluate_models`. Plots use matplotlib's
object API (a `Figure` rendered by Agg, no pyplot, no display). Every file is written to a
temporary name and renamed; `report.md` goes last, so a report that exists is complete.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from distkd.storage import atomic_write_bytes

# matplotlib is imported where a report draws its figures: ~0.5 s that a text-only report never needs.

COLUMNS = [("auc", "AUC"), ("logloss", "logloss"), ("ne", "NE"), ("calibration", "calibration"),
           ("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"), ("f1", "F1")]
# a next-item (multiclass) task: retrieval of the logged next item, and the brief's top-1 metrics
RETRIEVAL_COLUMNS = [("recall@10", "Recall@10"), ("ndcg@10", "NDCG@10"), ("mrr", "MRR"), ("recall@1", "Recall@1"),
                     ("recall@50", "Recall@50"), ("accuracy", "accuracy (top-1)"),
                     ("macro_precision", "precision (macro)"), ("macro_recall", "recall (macro)"),
                     ("macro_f1", "F1 (macro)")]
ETA_NAMES = {"auc": "AUC", "logloss": "logloss", "recall@10": "Recall@10", "ndcg@10": "NDCG@10"}


def _columns(result: dict, task: str) -> list[tuple[str, str]]:
    first = next(iter(result["models"].values()))["metrics"][task]
    return COLUMNS if "auc" in first else RETRIEVAL_COLUMNS


def _eta_lines(e: dict) -> list[str]:
    return [_eta_text(v, ETA_NAMES.get(metric, metric)) for metric, v in e.items()]

HOW_TO_READ = """\
**How to read this.** Each model is evaluated on the same rows of the held-out split; with
several seeds a cell shows the mean ± the sample standard deviation over seeds (n in the
second column). AUC: ranking quality (0.5 is chance). Logloss: the mean binary cross-entropy
against the real labels (lower is better); NE is logloss divided by the entropy of the base
rate, so NE < 1 beats always predicting the average. Calibration is the sum of predictions over
the number of positives (1 is calibrated, above 1 over-predicts). Accuracy, precision, recall
and F1 threshold the probability at 0.5, which says little for rare positives. η is the share of
the teacher–student AUC gap that distillation recovers: 1 means the distilled student matches
the teacher, 0 that it is no better than the same student trained on hard labels, below 0 that it
is worse; it is undefined when the teacher and the hard-label student differ by less than
{min_gap:g}. η (logloss) is the same share of the logloss gap, positive when distillation lowers
the logloss toward the teacher's. The η spread comes from pairing the students trained with the
same seed (η per pair: mean ± std, range); it is usually much wider than η from the means. The
oracle row (synthetic logs only) scores the true probabilities that drew the labels: no model
can expect to beat it. Inference rows/s is the CPU forward pass alone (decoding excluded), one
torch thread, {batch_size:,} rows a batch."""


def _num(v: Optional[float], digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _pm(cell: dict, digits: int = 4) -> str:
    s = _num(cell["mean"], digits)
    std = cell.get("std")
    return s + (f" ± {std:.{digits}f}" if s != "–" and std is not None and math.isfinite(std) else "")


def _int(cell: Optional[dict]) -> str:
    return "–" if not cell or not math.isfinite(cell["mean"]) else f"{cell['mean']:,.0f}"


def _eta_text(e: dict, what: str) -> str:
    if e["value"] is None:
        return f"η ({what}) undefined: teacher − hard = {e['gap']:+.5f}"
    s = f"η ({what}) {e['value']:.3f}"
    pp = e["per_pair"]
    if pp["n"] > 1:
        s += f" (per seed {pp['mean']:.3f} ± {pp['std']:.3f}, range {pp['min']:.3f}..{pp['max']:.3f}, n={pp['n']})"
    elif pp["n"] == 1:
        s += " (one seed pair)"
    if pp["undefined"]:
        s += f", {pp['undefined']} pair(s) undefined"
    if not e["teacher_better"]:
        s += f" [the teacher is not better than the hard-label student here: gap {e['gap']:+.5f}]"
    return s


def format_comparison(result: dict[str, Any]) -> str:
    """The console table: per task, one row per model, then the η line."""
    lines = [f"{result['split']} split of {result['logs']}: {result['rows']:,} rows; CPU inference, "
             f"{result['threads']} thread, batch {result['batch_size']:,}"]
    for task in result["tasks"]:
        binary = _columns(result, task) is COLUMNS
        cols = (["AUC", "logloss", "calib."] if binary else ["Recall@10", "NDCG@10", "MRR"])
        head = f"{'model':<16} {'n':>2} {cols[0]:>17} {cols[1]:>17} {cols[2]:>9} {'params':>13} {'rows/s':>11}"
        lines += ["", f"task {task}", head, "-" * len(head)]
        for name, m in result["models"].items():
            c = m["metrics"][task]
            n = str(m["n"]) if m["exports"] else "-"
            a, b, d = ("auc", "logloss", "calibration") if binary else ("recall@10", "ndcg@10", "mrr")
            lines.append(f"{name:<16} {n:>2} {_pm(c[a]):>17} {_pm(c[b]):>17} {_num(c[d]['mean'], 3 if binary else 4):>9} "
                         f"{_int(m['parameters']):>13} {_int(m['rows_per_s']):>11}")
        if task in result.get("eta", {}):
            lines += _eta_lines(result["eta"][task])
    if result.get("serving"):
        lines += ["", *serving_lines(result["serving"])]
    return "\n".join(lines)


def serving_lines(sv: dict[str, Any], markdown: bool = False) -> list[str]:
    """The serving table: per model, file size and p50 / p99 latency per batch size; then what
    int8 tables cost in AUC."""
    batches = [str(b) for b in sv["batches"]]
    head = ["model", "file", "size"] + [f"p50 / p99 ms @{b}" for b in batches]
    rows = []
    for name, m in sv["models"].items():
        lat = [f"{m['latency'][b]['p50_ms']:.3f} / {m['latency'][b]['p99_ms']:.3f}" for b in batches]
        rows.append([name, Path(m["file"]).name, f"{m['bytes'] / 2**20:,.2f} MiB"] + lat)
    q = sv["models"][sv["quantized"]]
    cost = "; ".join(f"{t} {q['metrics'][t]['auc']:.4f} ({-c:+.5f} vs {sv['of']})" for t, c in q["auc_cost"].items())
    note = (f"Latency of one call of the TorchScript file (torch.jit.load), {sv['threads']} CPU thread, raw dense in; "
            f"{sv['rounds']} interleaved rounds × {', '.join(f'{n} calls @{b}' for b, n in sv['calls_per_round'].items())}; "
            f"{sv['machine']}.")
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows),
                "", f"AUC with int8 tables ({sv['quantized']}): {cost}.", "", note]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return ["serving", fmt(head), "-" * len(fmt(head)), *map(fmt, rows), f"int8 AUC: {cost}", note]


# -- files --------------------------------------------------------------------------------


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def _clean(o: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))


def plot_calibration(result: dict, task: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 5))
    ax = fig.subplots()
    hi = 0.0
    for name, m in result["models"].items():
        c = m["calibration"].get(task)
        if c and c["pred"]:
            ax.plot(c["pred"], c["obs"], marker="o", ms=3, label=f"{name} (n={m['n']})")
            hi = max(hi, *c["pred"], *c["obs"])
    hi = min(1.0, hi * 1.05) or 1.0
    ax.plot([0, hi], [0, hi], ls="--", color="grey", lw=1, label="calibrated")
    ax.set(xlim=(0, hi), ylim=(0, hi), xlabel="mean predicted probability", ylabel="observed positive rate",
           title=f"calibration, {task} ({result['split']}, quantile bins, seeds pooled)")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_auc(result: dict, path: Path) -> None:
    """Bars per task and model of the task's headline metric: AUC (binary) or Recall@10 (next item)."""
    from matplotlib.figure import Figure

    tasks, names = result["tasks"], list(result["models"])
    metric = {t: "auc" if _columns(result, t) is COLUMNS else "recall@10" for t in tasks}
    fig = Figure(figsize=(1.5 + 1.6 * len(tasks) * max(1, len(names)) / 3, 4))
    ax = fig.subplots()
    width = 0.8 / len(names)
    lo, hi = 1.0, 0.0
    for j, name in enumerate(names):
        cells = [result["models"][name]["metrics"][t][metric[t]] for t in tasks]
        means = [c["mean"] for c in cells]
        errs = [c["std"] or 0.0 for c in cells]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, means, width, yerr=errs if any(errs) else None, capsize=3, label=name,
               hatch="//" if not result["models"][name]["exports"] else None)
        finite = [(m - e, m + e) for m, e in zip(means, errs) if math.isfinite(m)]
        lo, hi = min([lo, *(a for a, _ in finite)]), max([hi, *(b for _, b in finite)])
    pad = max(0.01, (hi - lo) * 0.15) if hi >= lo else 0.05
    ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) if hi >= lo else 1.0)
    ax.set_xticks(range(len(tasks)), tasks)
    label = " / ".join(sorted({ETA_NAMES[m] for m in metric.values()}))
    ax.set(ylabel=f"{label} (axis does not start at 0)",
           title=f"{label} per task, {result['split']} split (error bars: seed std)")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_recall_curve(result: dict, task: str, path: Path) -> None:
    """Recall@K against K per model (seed means): how much of the next-item mass each ranks high."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 4))
    ax = fig.subplots()
    for name, m in result["models"].items():
        ks = sorted(int(k.split("@")[1]) for k in m["metrics"][task] if k.startswith("recall@"))
        ax.plot(ks, [m["metrics"][task][f"recall@{k}"]["mean"] for k in ks], marker="o", ms=3,
                label=f"{name} (n={m['n']})")
    ax.set(xscale="log", xlabel="K", ylabel="Recall@K", title=f"Recall@K, {task} ({result['split']})")
    ax.legend(fontsize=8)
    _save(fig, path)


def _table(result: dict, task: str) -> list[str]:
    columns = _columns(result, task)
    head = ["model", "n"] + [label for _, label in columns] + ["parameters", "rows/s (CPU, 1 thread)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in result["models"].items():
        c = m["metrics"][task]
        cells = [name, str(m["n"]) if m["exports"] else "–"] + [_pm(c[k]) if k in c else "–" for k, _ in columns]
        cells += [_int(m["parameters"]), _int(m["rows_per_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    rows = next(iter(result["models"].values()))["metrics"][task]["rows"]["mean"]
    lines.append(f"\nLabelled rows: {_int({'mean': rows})}.")
    return lines


def render_markdown(result: dict, plots: dict[str, str], auc_plot: Optional[str] = None) -> str:
    md = ["# distkd evaluation report", "",
          f"Split `{result['split']}` of `{result['logs']}` ({result['rows']:,} rows, schema "
          f"{result['schema_fingerprint']}).", ""]
    if result.get("eta"):
        md += ["## Share of the teacher–student gap recovered (η)", "",
               "η = (metric_KD − metric_hard) / (metric_teacher − metric_hard), from the seed means.", ""]
        for task, e in result["eta"].items():
            md.append(f"- **{task}**: " + "; ".join(_eta_lines(e)))
        md.append("")
    md += paired_markdown(result)
    for task in result["tasks"]:
        md += [f"## Task `{task}`", "", *_table(result, task), ""]
        if task in plots:
            md += [f"![{task}]({plots[task]})", ""]
    if result.get("serving"):
        md += ["## Serving: size and latency", "", *serving_lines(result["serving"], markdown=True), ""]
    if auc_plot:
        md += ["## The headline metric per model", "", f"![per model]({auc_plot})", ""]
    md += [HOW_TO_READ.format(min_gap=result["min_gap"], batch_size=result["batch_size"]), "", "## Reproduce", ""]
    if result.get("command"):
        md += ["```", result["command"], "```", ""]
    md += ["| model | export | sha256 | role | seed | parameters |", "|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        for e in m["exports"]:
            md.append(f"| {name} | `{e['dir']}` | `{e['sha256']}` | {e['role']} | {e['seed']} | {e['parameters']:,} |")
        if not m["exports"] and m.get("source"):
            md.append(f"| {name} | eval columns {', '.join(m['source'])} of the logs | – | – | – | – |")
    every = "every row" if result["curve_every"] == 1 else f"every {result['curve_every']}th row"
    md += ["", f"torch {result['torch']}, {result['threads']} torch thread(s), batch size {result['batch_size']:,}; "
               f"calibration curves over {every}. All numbers: `result.json`.", ""]
    return "\n".join(md)


def write_report(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write the PNG plots, result.json and report.md (last) into `out_dir`; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    for task in result["tasks"]:
        if _columns(result, task) is COLUMNS:
            plots[task] = f"calibration_{_slug(task)}.png"
            plot_calibration(result, task, out / plots[task])
        else:
            plots[task] = f"recall_at_k_{_slug(task)}.png"
            plot_recall_curve(result, task, out / plots[task])
    plot_auc(result, out / "auc.png")
    _write_text(out / "result.json", json.dumps(_clean(result), indent=2))
    path = out / "report.md"
    _write_text(path, render_markdown(result, plots, "auc.png"))
    return path


def paired_markdown(result: dict) -> list[str]:
    """The per-seed paired differences (KD − hard, same seed) with their 95% t interval."""
    p = result.get("paired") or {}
    if not p:
        return []
    md = [f"## Paired differences over seeds ({p['pair']}, same seed)", "",
          f"Seeds {', '.join(map(str, p['seeds']))}; 95% t interval over the seeds. "
          "For AUC, Recall@10 and NDCG@10 above 0 favours KD, for logloss below 0 does.", "",
          "| task | metric | mean difference | 95% interval | per seed |", "|---|---|---|---|---|"]
    for task in result["tasks"]:
        for metric, d in p.get(task, {}).items():
            ci = f"[{d['low']:+.4f}, {d['high']:+.4f}]" if d["low"] is not None else "–"
            md.append(f"| {task} | {metric} | {d['mean']:+.4f} | {ci} | {', '.join(f'{x:+.4f}' for x in d['per_seed'])} |")
    return md + [""]
