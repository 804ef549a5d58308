"""Shared fixtures: small but real sharded Parquet logs, written once per session."""

from __future__ import annotations

import os

import pytest

# One thread per process: tests start several ranks on two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def small_logs(tmp_path_factory):
    """Synthetic logs (preset 'small'): 40k rows, 4 train shards, row groups of 2,048 rows."""
    from distkd.data.synth import generate

    out = tmp_path_factory.mktemp("logs") / "small"
    generate(out, rows=40_000, shards=4, seed=0, row_group_rows=2048, preset="small")
    return out


@pytest.fixture(scope="session")
def kd_world(small_logs, tmp_path_factory):
    """Two teacher exports (untrained, seeds 0 and 1) and a cache of `small_logs`' train split by
    teacher 0, built by the real `distkd cache build` in its own process (its own Ray): what the
    bad-input, security and fault tests damage copies of."""
    from tests.support import cli
    from tests.test_cache import make_teacher
    from distkd.data.schema import load_schema

    root = tmp_path_factory.mktemp("kd-world")
    schema = load_schema(small_logs)
    teachers = [(root / f"t{i}", make_teacher(root / f"t{i}", schema, seed=i)) for i in (0, 1)]
    cache = root / "cache"
    r = cli("cache", "build", "--teacher", str(teachers[0][0]), "--logs", str(small_logs), "--out", str(cache),
            "--splits", "train", "--workers", "1", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"logs": small_logs, "teachers": teachers, "cache": cache}
