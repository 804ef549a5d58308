"""`distkd data validate` on small hand-made logs: a clean directory passes with the right
summary; each kind of bad input is a LogsError naming the file and the problem, and the real
CLI exits 2 with that message on stderr."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from distkd.config import ConfigError
from distkd.data.validate import validate_logs
from distkd.data.schema import DenseFeature, LogsError, Schema, SparseFeature, Task

REPO = Path(__file__).resolve().parents[1]
SCHEMA = Schema(
    sparse=[SparseFeature("item", num_embeddings=50), SparseFeature("ctx", hash_size=1000),
            SparseFeature("tags", num_embeddings=8, multi_valued=True)],
    dense=[DenseFeature("price", "log1p"), DenseFeature("score")],
    tasks=[Task("click", "clicked"), Task("buy", "bought")],
    request_id="request_id",
    eval_columns=["p_true"],
)
SHARDS = {"train": [(0, 100), (100, 200)], "valid": [(200, 250)], "test": [(250, 300)]}
ROW_GROUP = 32


def _table(lo: int, hi: int) -> pa.Table:
    rng = np.random.default_rng(lo)
    n = hi - lo
    lengths = rng.integers(0, 4, n)
    tags = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32)),
                                    pa.array(rng.integers(0, 8, lengths.sum()), pa.int64()))
    clicked = pa.array(rng.integers(0, 2, n), pa.int8(), mask=np.arange(n) % 10 == 9)  # some unlabeled rows
    cols = {
        "example_id": np.arange(lo, hi), "item": rng.integers(0, 50, n), "ctx": rng.integers(0, 10**6, n),
        "tags": tags, "price": rng.random(n, np.float32) * 100, "score": rng.standard_normal(n).astype(np.float32),
        "clicked": clicked, "bought": rng.integers(0, 2, n).astype(np.int8), "request_id": np.arange(lo, hi) // 5,
        "p_true": rng.random(n, np.float32),
    }
    return pa.Table.from_pydict(cols, schema=SCHEMA.arrow_schema())


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, row_group_size=ROW_GROUP)


@pytest.fixture
def logs(tmp_path) -> Path:
    for split, ranges in SHARDS.items():
        (tmp_path / split).mkdir()
        for i, (lo, hi) in enumerate(ranges):
            _write(_table(lo, hi), tmp_path / split / f"part-{i:05d}.parquet")
    SCHEMA.save(tmp_path / "schema.yaml")
    return tmp_path


def _rewrite(path: Path, fn) -> None:
    _write(fn(pq.read_table(path)), path)


def _set(table: pa.Table, name: str, values, type=None) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, pa.field(name, type or table.schema.field(i).type), pa.array(values, type))


def _setrow(name: str, row: int, value):
    def fn(t: pa.Table) -> pa.Table:
        col = t.column(name).to_numpy(zero_copy_only=False).copy()
        col[row] = value
        return _set(t, name, col)
    return fn


@pytest.mark.unit
def test_clean_logs_pass_with_summary(logs):
    s = validate_logs(logs)
    assert s["rows"] == 300
    assert {k: v["shards"] for k, v in s["splits"].items()} == {"train": 2, "valid": 1, "test": 1}
    assert s["splits"]["train"]["row_groups"] == 8  # 100 rows in groups of 32: 4 per shard
    for split, ranges in SHARDS.items():
        tables = [_table(lo, hi) for lo, hi in ranges]
        clicked = pa.concat_tables(tables).column("clicked")
        click = s["splits"][split]["labels"]["click"]
        assert click["labeled"] == len(clicked) - clicked.null_count
        assert click["positives"] == pc.sum(clicked).as_py()
        assert click["rate"] == pytest.approx(click["positives"] / click["labeled"])


TRAIN0, TRAIN1, VALID0 = "train/part-00000.parquet", "train/part-00001.parquet", "valid/part-00000.parquet"


def _break_missing_column(d):
    _rewrite(d / TRAIN1, lambda t: t.drop_columns(["score"]))
    return TRAIN1, "missing column 'score'"


def _break_dtype(d):
    # float64 is accepted (cast to float32); text in a dense column is not.
    _rewrite(d / TRAIN1, lambda t: _set(t, "price", t.column("price").to_numpy().astype(str), pa.string()))
    return TRAIN1, "column 'price' has type string, expected float"


def _break_negative_id(d):
    _rewrite(d / TRAIN0, _setrow("item", 37, -3))
    return TRAIN0, "row group 1, column 'item', row 37: negative id: -3"


def _break_out_of_range(d):
    _rewrite(d / VALID0, _setrow("item", 3, 50))
    return VALID0, r"row group 0, column 'item', row 3: id out of range \[0, 50\): 50"


def _break_nan_dense(d):
    _rewrite(d / TRAIN1, _setrow("score", 70, np.nan))
    return TRAIN1, "row group 2, column 'score', row 70: dense value is nan"


def _break_label(d):
    _rewrite(d / TRAIN0, _setrow("bought", 5, 2))
    return TRAIN0, "column 'bought', row 5: label 2 is not 0, 1 or null"


def _break_null_in_list(d):
    def fn(t):
        tags = t.column("tags").to_pylist()
        tags[10] = [1, None]
        return _set(t, "tags", tags)
    _rewrite(d / TRAIN0, fn)
    return TRAIN0, "column 'tags', row 10: null id inside a multi-valued list"


def _break_duplicate_id(d):
    _rewrite(d / VALID0, _setrow("example_id", 4, 7))
    return VALID0, (rf"duplicate example_id 7 in \S*{TRAIN0} row 7 and \S*{VALID0} row 4")


def _break_corrupt(d):
    (d / TRAIN1).write_bytes(np.random.default_rng(0).bytes(4096))
    return TRAIN1, "not a readable Parquet file"


def _break_truncated(d):
    data = (d / VALID0).read_bytes()
    (d / VALID0).write_bytes(data[: len(data) // 2])
    return VALID0, "not a readable Parquet file"


def _break_corrupt_page(d):
    data = bytearray((d / TRAIN1).read_bytes())
    data[100:300] = bytes(200)  # inside the first row group's pages; the footer stays intact
    (d / TRAIN1).write_bytes(bytes(data))
    return TRAIN1, "row group 0: cannot decode"


def _break_empty_split(d):
    (d / "test/part-00000.parquet").unlink()
    return "test", "split directory holds no Parquet shards"


def _break_missing_split(d):
    (d / "valid/part-00000.parquet").unlink()
    (d / "valid").rmdir()
    return "valid", "split directory is missing"


BREAKS = [_break_missing_column, _break_dtype, _break_negative_id, _break_out_of_range, _break_nan_dense,
          _break_label, _break_null_in_list, _break_duplicate_id, _break_corrupt, _break_truncated,
          _break_corrupt_page, _break_empty_split, _break_missing_split]


@pytest.mark.integration
@pytest.mark.parametrize("breaker", BREAKS, ids=[b.__name__[len("_break_"):] for b in BREAKS])
def test_bad_logs_are_clear_errors(logs, breaker):
    where, problem = breaker(logs)
    with pytest.raises(LogsError) as e:
        validate_logs(logs)
    assert str(logs / where) in str(e.value)
    assert re.search(problem, str(e.value)), str(e.value)

    r = subprocess.run([sys.executable, "-m", "distkd.cli", "data", "validate", str(logs)],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert str(logs / where) in r.stderr and str(e.value) in r.stderr


@pytest.mark.unit
def test_missing_schema_is_a_config_error(logs):
    (logs / "schema.yaml").unlink()
    with pytest.raises(ConfigError, match="schema.yaml"):
        validate_logs(logs)


@pytest.mark.integration
def test_cli_prints_summary(logs):
    r = subprocess.run([sys.executable, "-m", "distkd.cli", "data", "validate", str(logs)],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert "OK, 300 rows" in r.stdout and "train" in r.stdout
