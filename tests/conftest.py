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
