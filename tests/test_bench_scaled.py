"""bench.scaled_jobs: a suite's job files scaled to fewer rows still load as the jobs they were,
with every path moved and the students' step budgets scaled alike (bench.vs, bench.next_item_k)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distkd.bench import scaled_jobs
from distkd.cache.build import CacheJob
from distkd.config import load
from distkd.demo import DataJob
from distkd.train.job import TrainJob

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_scaled_next_item_jobs_load_and_move(tmp_path):
    jobs = scaled_jobs(ROOT / "jobs" / "next-item", tmp_path / "jobs", 250_000, ("runs/next-item", "runs/ni-250k"))
    data = load(DataJob, jobs / "data.yaml")
    assert (data.rows, data.out) == (250_000, "runs/ni-250k/logs")
    original = load(TrainJob, ROOT / "jobs" / "next-item" / "student.yaml")
    student = load(TrainJob, jobs / "student.yaml")
    assert student.train.max_steps == round(original.train.max_steps * 250_000 / 1_250_000)
    assert student.out == "runs/ni-250k/student-hard" and student.logs == "runs/ni-250k/logs"
    cache = load(CacheJob, jobs / "cache.yaml")
    assert (cache.teacher, cache.out) == ("runs/ni-250k/teacher/export", "runs/ni-250k/cache")
    for f in jobs.glob("*.yaml"):
        assert "runs/next-item/" not in f.read_text(), f


def test_scaling_needs_one_rows_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.yaml").write_text("out: runs/x/logs\nsource: synth\n")
    with pytest.raises(SystemExit, match=r"data.yaml: expected one top-level 'rows:' line"):
        scaled_jobs(src, tmp_path / "dst", 10, ("runs/x", "runs/y"))
