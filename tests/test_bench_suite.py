"""`make bench` at --quick scale: BENCHMARKS.md has its sections, every benchmark row and the
goals table. Structure only: no figure is checked against any speed."""

from __future__ import annotations

import json
import re

import pytest

from distkd.bench import suite

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = [
    "teacher forward alone, 1 thread",
    "distkd cache build,",
    "Ray Data read_parquet → map_batches → write_parquet",
    "pyarrow read+decode",
    "LogLoader, batch 8192",
    "plain loop, 1 rank",
    "plain loop, 2 ranks",
    "TrainPipelineSparseDist (default), 1 rank",
    "TrainPipelineSparseDist (default), 2 ranks",
    "student on hard labels",
    "student distilled from the cache",
    "student distilled online",
]
GOALS = ["Ray Data pipeline", "× 1-thread forward", "pyarrow",
         "hard-label epoch", "2 ranks", "cache build linear", "distillation linear", "cache build memory",
         "distillation memory"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    suite.main(["--quick", "--out", str(d / "BENCHMARKS.md"), "--work", str(d / "work")])
    return d


def test_quick_suite_writes_every_section(quick):
    md = (quick / "BENCHMARKS.md").read_text()
    for section in ("## Machine", "## Goals", "## Cache build", "## Loader", "## Training", "## Distillation",
                    "### The loader's cache join (cProfile)", "## Scale sweep"):
        assert section in md, section
    machine = md.split("## Machine", 1)[1].split("##", 1)[0]
    for word in ("CPU:", "cores", "GiB", "torch ", "torchrec ", "fbgemm-gpu ", "ray ", "pyarrow "):
        assert word in machine, word
    for row in ROWS:
        assert re.search(r"^\| [^|]*" + re.escape(row) + r"[^|]*\| .*rows/s \(.*n=1\) \|$", md, re.M), row
    goals = md.split("## Goals", 1)[1].split("\n## ", 1)[0]
    assert "| goal | measured | verdict | note |" in goals
    for g in GOALS:
        line = next((ln for ln in goals.splitlines() if g in ln), None)
        assert line is not None, g
        assert re.search(r"\| (-?\d+\.\d{3}|nan) \| (met|missed by (\d+|nan)%) \|", line), line
    for stage in ("cache build", "distillation"):
        for k in ("1×", "4×", "16×"):
            assert re.search(rf"^\| {stage} \| {k} \|", md, re.M), (stage, k)
    for png in ("BENCHMARKS-sweep.png", "BENCHMARKS-rates.png"):
        assert (quick / png).stat().st_size > 0 and f"]({png})" in md


def test_quick_suite_keeps_its_raw_figures(quick):
    r = json.loads((quick / "BENCHMARKS.json").read_text())
    assert r["quick"] and r["reps"] == 1
    assert all(len(r["cache"][k]) == 1 for k in ("raw_1", "build", "ray_data"))
    assert set(r["distill"]["sweep"]) == {"1", "4", "16"}
