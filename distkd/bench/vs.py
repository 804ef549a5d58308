"""`make bench-vs BASE=COMMIT`: bench-train and bench-distill of this tree against another commit's, interleaved in one run.

The base commit is checked out as a git worktree (runs/bench/vs/<sha>); each tree runs its own
code (PYTHONPATH and cwd set to it) on its own copy of the demo's jobs, scaled to `--rows` rows
and pointed at runs/bench/vs-demo, so neither touches the other's data nor the demo's. Rounds
alternate the order (base head, head base, ...), so a drift linear in time weighs on both alike;
each figure is the median over rounds with its range, and the head/base ratio is of medians,
with the per-round paired ratios beside it.

    python -m distkd.bench.vs 2dfa3e6 [--rounds 3] [--rows 300000]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from distkd import log
from distkd.bench import cpu_model, scaled_jobs

logger = logging.getLogger(__name__)

DEMO = "runs/bench/vs-demo"
TRAIN_LOGS = "runs/bench/vs-train-logs"
JOBS = "runs/bench/vs-jobs"


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def base_tree(root: Path, commit: str) -> tuple[Path, str]:
    """A detached worktree of `commit` (made once, reused while it is at that commit)."""
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}", cwd=root)
    tree = root / "runs" / "bench" / "vs" / sha[:12]
    if not (tree / ".git").exists():
        tree.parent.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "--detach", str(tree), sha, cwd=root)
    return tree, sha


def run_in(tree: Path, args: list[str], timeout: float) -> str:
    """`python ARGS` with the tree's code; its stdout (stderr passes through as progress)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    try:
        p = subprocess.run([sys.executable, *args], cwd=tree, env=env, stdout=subprocess.PIPE, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{tree}: `python {' '.join(args)}` did not finish within {timeout:.0f} s")
    if p.returncode:
        raise SystemExit(f"{tree}: `python {' '.join(args)}` exited {p.returncode}:\n{p.stdout[-2000:]}")
    return p.stdout


# What each benchmark prints per run (its table rows), as (label, rows/s) regex groups.
TRAIN_ROWS = (r"(?m)^\s+([12])\s+([\d,]+)\s*$", "train, {} rank(s)", 2)  # '    1       12,345'
DISTILL_ROWS = (r"(?m)^([abc]: [a-z ]+?)\s{2,}([\d,]+)\s", "distill {}", 3)  # 'a: hard labels   12,345  10.1'


def parse(out: str, rows: tuple[str, str, int], bench: str) -> dict[str, float]:
    pattern, label, count = rows
    found = {label.format(m.group(1)): float(m.group(2).replace(",", "")) for m in re.finditer(pattern, out)}
    if len(found) != count:
        raise SystemExit(f"{bench} printed {len(found)} rows/s figures, expected {count}:\n{out}")
    return found


def one_round(tree: Path, a: argparse.Namespace) -> dict[str, float]:
    out = run_in(tree, ["-m", "distkd.bench.train", "--logs", TRAIN_LOGS, "--rows", str(a.rows),
                        "--steps", str(a.train_steps)], a.timeout)
    res = parse(out, TRAIN_ROWS, "bench.train")
    out = run_in(tree, ["-m", "distkd.bench.distill", "--jobs", JOBS, "--steps", str(a.distill_steps),
                        "--repeats", "1"], a.timeout)
    return res | parse(out, DISTILL_ROWS, "bench.distill")


def table(base: list[dict[str, float]], head: list[dict[str, float]]) -> list[str]:
    lines = [f"{'rows/s (median, min-max)':<30} {'base':>22} {'head':>22} {'head/base':>9}  per round",
             "-" * 100]
    for name in base[0]:
        b, h = [r[name] for r in base], [r[name] for r in head]
        span = lambda v: f"{statistics.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f})"  # noqa: E731
        paired = " ".join(f"{y / x:.3f}" for x, y in zip(b, h))
        lines.append(f"{name:<30} {span(b):>22} {span(h):>22} {statistics.median(h) / statistics.median(b):>9.3f}  "
                     f"{paired}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the commit to compare against (e.g. the one before a rework)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, default=300_000, help="rows of each tree's demo logs and train-bench logs")
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--distill-steps", type=int, default=150)
    p.add_argument("--timeout", type=float, default=1800, help="seconds any one benchmark process may take")
    p.add_argument("--out", default="runs/bench/vs.md")
    a = p.parse_args(argv)
    log.setup()
    root = Path(git("rev-parse", "--show-toplevel", cwd=Path.cwd()))
    head_sha = git("rev-parse", "HEAD", cwd=root)
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", cwd=root))
    base, base_sha = base_tree(root, a.base)
    trees = {"base": base, "head": root}
    t0 = time.perf_counter()
    for name, tree in trees.items():
        logger.info(f"{name}: {tree}: demo logs, teacher and cache at {a.rows:,} rows (reused when valid)")
        jobs = scaled_jobs(tree / "jobs" / "demo", tree / JOBS, a.rows, ("runs/demo", DEMO))
        # the demo's stage lines are log lines in a tree that has distkd.log (an older base prints them)
        run_in(tree, ["-c", "import importlib.util; from pathlib import Path; "
                            "importlib.util.find_spec('distkd.log') and importlib.import_module('distkd.log').setup(); "
                            f"from distkd.demo import teacher_and_cache; teacher_and_cache(Path({str(jobs)!r}))"],
               a.timeout)
    results: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    for r in range(a.rounds):
        for name in (("base", "head") if r % 2 == 0 else ("head", "base")):
            logger.info(f"round {r + 1}/{a.rounds}: {name} ({time.perf_counter() - t0:,.0f} s so far)")
            results[name].append(one_round(trees[name], a))
    report = [f"# bench-vs: head {head_sha[:12]}{' (+ uncommitted changes)' if dirty else ''} against base {base_sha[:12]}",
              "",
              f"machine: {cpu_model()}, {os.cpu_count()} cores; {a.rounds} rounds, order alternating "
              f"(base head, head base, ...); {a.rows:,} rows; bench.train {a.train_steps} steps per run, "
              f"bench.distill {a.distill_steps} steps per run, one run of a, b and c per round",
              "", "```", *table(results["base"], results["head"]), "```",
              f"\n{time.perf_counter() - t0:,.0f} s in all. Reproduce: python -m distkd.bench.vs {a.base} "
              f"--rounds {a.rounds} --rows {a.rows}"]
    text = "\n".join(report) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
