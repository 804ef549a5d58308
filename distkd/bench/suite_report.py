"""BENCHMARKS.md from one `distkd.bench.suite` run: machine, goals, tables, plots, profile.

Every figure is a median over the run's repetitions, with its min–max; ratios are of medians.
Plots are matplotlib Figures rendered by Agg (no pyplot), written beside the markdown.
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any

import importlib.metadata as md

from distkd.bench import cpu_model

# matplotlib is imported where a plot is drawn (~0.5 s).

SWEEP = (1, 4, 16)


def machine() -> dict[str, Any]:

    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {}
    for name in ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "ray", "pyarrow"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        pass
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "memory_gib": round(mem / 2**30, 1), "load": round(os.getloadavg()[0], 2), "gpu": gpu,
            "python": platform.python_version(), "versions": versions}


def at(d: dict, k: int):
    """d[k] for an int key, also after a JSON round trip (keys as strings)."""
    return d[k] if k in d else d[str(k)]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fig(xs: list[float], unit: str = "rows/s", scale: float = 1.0) -> str:
    """'median (min–max, n=k)'."""
    if not xs:
        return "—"
    m, lo, hi = med(xs) * scale, min(xs) * scale, max(xs) * scale
    f = (lambda v: f"{v:,.0f}") if m >= 100 else (lambda v: f"{v:.3g}")
    return f"{f(m)} {unit} ({f(lo)}–{f(hi)}, n={len(xs)})"


def slope_ratio(points: dict, cost) -> float:
    """Marginal cost per row from 4× to 16× over that from 1× to 4× (1.0: linear); `cost`: a
    point's key, or a function of the point."""
    cost = cost if callable(cost) else (lambda p, key=cost: p[key])
    (r1, t1), (r4, t4), (r16, t16) = [(med([p["rows"] for p in at(points, k)]), med([cost(p) for p in at(points, k)]))
                                      for k in SWEEP]
    return ((t16 - t4) / (r16 - r4)) / ((t4 - t1) / (r4 - r1)) if r4 > r1 and r16 > r4 and t4 != t1 else float("nan")


def goal_row(goal: str, value: float, ok: bool, miss: str, note: str = "") -> str:
    verdict = "met" if ok else f"missed by {miss}"
    return f"| {goal} | {value:.3f} | {verdict} | {note} |"


def goals(R: dict) -> list[str]:
    C, D, T, L = R["cache"], R["distill"], R["train"], R["loader"]
    raw1 = med(C["raw_1"])
    rd = med(C["build"]) / med(C["ray_data"])
    fwd = med(C["build"]) / (C["workers"] * raw1)
    ld = med(L["loader"]) / med(L["pyarrow"])
    floor = med(L["floor"]) / med(L["pyarrow"]) if "floor" in L else None  # results from before it: none
    ba = med(D["hard"]) / med(D["cache"])  # epoch time ratio: cache / hard
    two = med(at(T, 2)["pipeline"]) / med(at(T, 1)["pipeline"])  # the trainer's default loop
    # a build's seconds less its workers' start-up (process start and teacher load: a fixed cost
    # of 7-10 s here that scatters by more than a 1x build's whole compute)
    lin_b = slope_ratio(C["sweep"], lambda p: p["seconds"] - (p.get("workers_start_s") or 0.0))
    lin_d = slope_ratio(D["sweep"], "seconds")
    mem_b = med([p["peak_rss"] for p in at(C["sweep"], 16)]) / med([p["peak_rss"] for p in at(C["sweep"], 1)])
    mem_d = med([p["peak_rss"] for p in at(D["sweep"], 16)]) / med([p["peak_rss"] for p in at(D["sweep"], 1)])
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    return [
        "| goal | measured | verdict | note |",
        "|---|---|---|---|",
        goal_row("cache build ≥ 1.3 × the Ray Data pipeline (rows/s)", rd, rd >= 1.3, pct(1 - rd / 1.3),
                 f"same pool: {C['plan']}"),
        goal_row(f"cache build ≥ 0.85 × cores used ({C['workers']}) × 1-thread forward", fwd, fwd >= 0.85,
                 pct(1 - fwd / 0.85), f"the pool takes every CPU: {C['plan']}"),
        goal_row("loader ≥ 0.9 × pyarrow read+decode (1 core)", ld, ld >= 0.9, pct(1 - ld / 0.9),
                 f"the KJT floor (pyarrow + the one copy any KJT loader makes) reaches {floor:.3f}"
                 if floor is not None else ""),
        goal_row("distillation from the cache ≤ 1.03 × hard-label epoch", ba, ba <= 1.03, pct(ba / 1.03 - 1),
                 "epoch time ratio; the cache join is profiled below"),
        goal_row("2 ranks ≥ 1.7 × 1 rank (the default loop: TrainPipelineSparseDist)", two, two >= 1.7, pct(1 - two / 1.7),
                 "gloo on CPU, one thread per rank"),
        goal_row("cache build linear 1×→16× (marginal cost 4–16× / 1–4×, within ±10%)", lin_b,
                 abs(lin_b - 1) <= 0.1, pct(abs(lin_b - 1) - 0.1), "build time less the workers' start-up"),
        goal_row("distillation linear 1×→16× (same measure, loop time)", lin_d, abs(lin_d - 1) <= 0.1,
                 pct(abs(lin_d - 1) - 0.1)),
        goal_row("cache build memory flat (peak RSS of a worker, 16× / 1×, ≤ 1.1)", mem_b, mem_b <= 1.1,
                 pct(mem_b / 1.1 - 1)),
        goal_row("distillation memory flat (peak RSS of a rank, 16× / 1×, ≤ 1.1)", mem_d, mem_d <= 1.1,
                 pct(mem_d / 1.1 - 1)),
    ]


def _plots(R: dict, out: Path) -> list[str]:
    from matplotlib.figure import Figure

    C, D = R["cache"], R["distill"]
    names = []
    f = Figure(figsize=(9, 3.6))
    a1, a2 = f.subplots(1, 2)
    for label, pts, key in (("cache build", C["sweep"], "seconds"), ("distillation (loop)", D["sweep"], "seconds")):
        rows = [med([p["rows"] for p in at(pts, k)]) for k in SWEEP]
        a1.plot(rows, [med([p[key] for p in at(pts, k)]) for k in SWEEP], marker="o", label=label)
        a2.plot(rows, [med([p["peak_rss"] for p in at(pts, k)]) / 2**20 for k in SWEEP], marker="o", label=label)
    for ax, title in ((a1, "time (s)"), (a2, "peak RSS, largest process (MiB)")):
        ax.set_xlabel("train rows")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    a2.set_ylim(bottom=0)
    p = out.parent / f"{out.stem}-sweep.png"
    f.tight_layout()
    f.savefig(p, dpi=110)
    names.append(p.name)

    f = Figure(figsize=(9, 3.4))
    a1, a2 = f.subplots(1, 2)
    bars = {"forward, 1 thread": C["raw_1"], f"forward, {C['cores']} threads": C["raw_all"],
            "distkd build": C["build"], "Ray Data": C["ray_data"]}
    _bars(a1, bars, "cache: rows/s")
    _bars(a2, {"hard labels": D["hard"], "from the cache": D["cache"], "online": D["online"]}, "student: rows/s")
    p = out.parent / f"{out.stem}-rates.png"
    f.tight_layout()
    f.savefig(p, dpi=110)
    names.append(p.name)
    return names


def _bars(ax, bars: dict, title: str) -> None:
    xs = list(range(len(bars)))
    ms = [med(v) for v in bars.values()]
    lo = [m - min(v) for m, v in zip(ms, bars.values())]
    hi = [max(v) - m for m, v in zip(ms, bars.values())]
    ax.bar(xs, ms, yerr=[lo, hi], capsize=3)
    ax.set_xticks(xs, list(bars), rotation=20, ha="right", fontsize=8)
    ax.set_title(title)


def write_markdown(R: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    M, C, D, T, L, P = R["machine"], R["cache"], R["distill"], R["train"], R["loader"], R["profile"]
    T1, T2 = at(T, 1), at(T, 2)
    v = M["versions"]
    fb = v.get("fbgemm-gpu-cpu") or v.get("fbgemm-gpu", "?")
    plots = _plots(R, out)
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `make bench` (`python -m distkd.bench.suite --scale {R['scale']}"
        f"{' --quick' if R['quick'] else ''}`) on {R['started']}, in {R['seconds'] / 60:.1f} min. "
        f"Every figure: median of {R['reps']} interleaved repetition(s) (min–max); ratios are of medians."
        + (" **Quick run: structure only, the figures mean nothing.**" if R["quick"] else ""),
        "",
        "## Machine",
        "",
        f"- CPU: {M['cpu']}, {M['cores']} cores ({M['usable_cores']} usable), {M['memory_gib']} GiB memory, "
        f"load average {M['load']} at the start",
        f"- GPU: {M['gpu'] or 'none'}",
        f"- torch {v.get('torch', '?')}, torchrec {v.get('torchrec', '?')}, fbgemm-gpu {fb}, ray {v.get('ray', '?')}, "
        f"pyarrow {v.get('pyarrow', '?')}, python {M['python']}",
        f"- data: {R['scale']:,} rows of criteo-preset synthetic logs (ids capped at 100,000 per feature), "
        f"{R['rows_train']:,} in {R.get('shards_per_x', 1) * SWEEP[-1]} train shards; teacher: untrained RankingModel, "
        + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in R["teacher"].items()),
        "",
        "## Goals",
        "",
        *goals(R),
        "",
        "## Cache build",
        "",
        f"Train split, {R['rows_train']:,} rows. Ray started before each build (not timed); a build's time runs from "
        "its start to its manifest (worker start-up and teacher load included). The forward-alone rates run over a "
        "quarter of the rows, pre-decoded in memory.",
        "",
        "| benchmark | rows/s |",
        "|---|---|",
        f"| teacher forward alone, 1 thread | {fig(C['raw_1'])} |",
        f"| teacher forward alone, {C['cores']} threads | {fig(C['raw_all'])} |",
        f"| distkd cache build, {C['plan']} (as shipped) | {fig(C['build'])} |",
        f"| Ray Data read_parquet → map_batches → write_parquet, same pool | {fig(C['ray_data'])} |",
        "",
        "The Ray Data pipeline gives none of: row order (blocks finish in any order, files are named by block), "
        "checks that each output row belongs to its log row (example ids, row groups, shard fingerprints), or "
        "exactly-once commits (a failed or repeated run leaves partial or duplicate files that nothing reconciles); "
        "the distkd build does all three.",
        "",
        "Both run on every core: distkd's pool takes every CPU of a Ray started with one per core (its workers read "
        "their own shards). Ray Data's read tasks need a CPU beside the actors or the pipeline never starts, so its "
        "Ray is started with one CPU more; its actors and reads then share the same cores.",
        "",
        "## Loader",
        "",
        "| benchmark | rows/s |",
        "|---|---|",
        f"| pyarrow read+decode, training columns, 1 core | {fig(L['pyarrow'])} |",
        f"| LogLoader, batch 8192, checks on, 1 core | {fig(L['loader'])} |",
        *([f"| the KJT floor: pyarrow + ids key-major, dense and labels stacked, nothing else, 1 core | "
           f"{fig(L['floor'])} |"] if "floor" in L else []),
        "",
        "## Training",
        "",
        f"`{T['config']}` on the train split, {T['steps']} steps per repetition (2 untimed), one thread per rank, "
        "gloo. Each launch times the trainer's two loops (`train.pipeline`, distkd.train.steps) alternately on "
        "the same sharded model and loader: plain (`Trainer.train_step` per batch) and TorchRec's "
        "`TrainPipelineSparseDist` (the default); launches of 1 and 2 ranks alternate.",
        "",
        "| benchmark | rows/s (all ranks) |",
        "|---|---|",
        f"| plain loop, 1 rank | {fig(T1['distkd'])} |",
        f"| plain loop, 2 ranks | {fig(T2['distkd'])} |",
        f"| TrainPipelineSparseDist (default), 1 rank | {fig(T1['pipeline'])} |",
        f"| TrainPipelineSparseDist (default), 2 ranks | {fig(T2['pipeline'])} |",
        "",
        f"What the pipeline does on CPU: it pipelines the input distribution of {T.get('pipelined_modules') or 'no'} "
        "module(s) (the sparse features' all-to-all of batch i+1 is started before the forward of batch i and "
        "waited for after it) and keeps batches i+1, i+2 in flight; there are no CUDA streams, so the host-to-device "
        "copy is a no-op and the overlap is only what gloo's asynchronous collectives give. "
        f"Pipeline / plain loop: {med(T1['pipeline']) / med(T1['distkd']):.2f} (1 rank), "
        f"{med(T2['pipeline']) / med(T2['distkd']):.2f} (2 ranks).",
        "",
        "## Distillation",
        "",
        f"`jobs/demo/student.yaml` / `distill.yaml` ({D['parameters']:,} parameters), {D.get('nproc', 2)} rank(s), "
        f"{D['steps']} steps per "
        "run, the loop's rows/s (start-up and evaluation excluded); order hard, cache, online, then reversed.",
        "",
        "| benchmark | rows/s |",
        "|---|---|",
        f"| student on hard labels | {fig(D['hard'])} |",
        f"| student distilled from the cache | {fig(D['cache'])} |",
        f"| student distilled online (teacher forward in the loop) | {fig(D['online'])} |",
        "",
        f"Epoch time, cache / hard labels: {med(D['hard']) / med(D['cache']):.3f}; online / cache: "
        f"{med(D['cache']) / med(D['online']):.2f}.",
        "",
        "### The loader's cache join (cProfile)",
        "",
        f"One pass over {P['rows']:,} rows (batch 1024, no prefetch thread): {P['plain_s']:.2f} s without the join, "
        f"{P['joined_s']:.2f} s with it ({100 * (P['joined_s'] / P['plain_s'] - 1):+.0f}%). Where the joined pass "
        "spends its time (own time, top functions):",
        "",
        "| function | calls | own s | share |",
        "|---|---|---|---|",
        *[f"| `{r['function']}` | {r['calls']:,} | {r['tottime']:.3f} | {100 * r['share']:.1f}% |" for r in P["top"]],
        "",
        "## Scale sweep",
        "",
        f"1×, 4×, 16× = {', '.join(str(R.get('shards_per_x', 1) * k) for k in SWEEP)} train shards. Build: Ray up, "
        "the shipped pool; distillation: one epoch from the "
        f"cache, {D.get('nproc', 2)} rank(s) (loop time; wall includes start-up and evaluation). "
        "Peak RSS: the largest single process "
        "(a cache worker, a rank), sampled every 0.2 s.",
        "",
        "| stage | scale | rows | seconds | wall s | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, pts in (("cache build", C["sweep"]), ("distillation", D["sweep"])):
        for k in SWEEP:
            p = at(pts, k)
            wall = fig([x.get("wall", x["seconds"]) for x in p], "")
            lines.append(f"| {name} | {k}× | {med([x['rows'] for x in p]):,.0f} | {fig([x['seconds'] for x in p], '')} "
                         f"| {wall} | {fig([x['peak_rss'] for x in p], '', 2**-20)} |")
    lines += ["", *[f"![{n}]({n})" for n in plots], "",
              "## GPU", "", ("A GPU was present (" + M["gpu"] + ") but this suite measures on CPU only." if M["gpu"]
                             else "No GPU on this machine; this suite measures on CPU only."), ""]
    out.write_text("\n".join(lines))
