"""`make bench-faults`' rows-lost column: what a fault test records (the `rows_lost` fixture) is
what the table prints, summed over the test's parameters; a cache's kept rows are only those of
shards byte-identical to the clean build's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from distkd.bench import faults
from distkd.bench.faults import RESULTS_ENV, claimed, clean_rows, kept_rows, results_file

pytestmark = pytest.mark.unit


def _shard(rows: int, sha: str, ids: str = "i") -> SimpleNamespace:
    """The fields of a manifest's shard entry (distkd.cache.contract.ShardEntry) kept_rows reads."""
    return SimpleNamespace(output=SimpleNamespace(rows=rows, sha256=sha), input=SimpleNamespace(ids=ids))


def test_the_fixture_records_what_the_table_reads(rows_lost, request, tmp_path, monkeypatch):
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))
    rows_lost(100, 100)
    rows_lost(50, 47)  # a second parameter of the same test
    node = request.node.nodeid
    assert results_file(tmp_path, node).is_file()
    assert faults.rows_lost(tmp_path, node) == 3
    assert faults.rows_lost(tmp_path, "tests/test_x.py::test_never_recorded") is None


def test_without_the_variable_nothing_is_written(rows_lost, tmp_path, monkeypatch):
    monkeypatch.delenv(RESULTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    rows_lost(10, 0)
    assert not list(tmp_path.iterdir())


def test_kept_rows_are_those_of_shards_equal_to_the_clean_build():
    clean = {"train/a": _shard(10, "x"), "train/b": _shard(20, "y"), "valid/c": _shard(5, "z")}
    faulted = {"train/a": _shard(10, "x"), "train/b": _shard(20, "other"), "valid/c": _shard(5, "z", ids="j")}
    assert kept_rows(faulted, clean) == 10
    assert clean_rows(clean) == 35 and clean_rows(clean, "train/") == 30


def test_claims_read_as_numbers():
    assert claimed("0") == 0 and claimed("0 (refused)") == 0 and claimed("–") is None
