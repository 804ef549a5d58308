"""`distkd cache import`: predictions computed elsewhere, joined to the logs by example_id.

The round trip exports the predictions of a cache built by `distkd cache build` (kd_world),
shuffles them into files of other layouts and imports them through the real command line:
the imported logits equal the built cache's row for row. The other tests import synthetic
logits for small_logs' train split (no teacher, no Ray): each refusal names the file, row and
id and publishes nothing; a cache grows by a new log shard alone; a join forced into many
partitions by a small memory budget writes the same bytes as a join in one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from distkd import storage
from distkd.cache import CacheError, read_manifest
from distkd.cache.importer import ImportJob, import_predictions
from distkd.cache.join import partition_of, plan
from distkd.cache.verify import verify_cache
from distkd.cli import main as cli_main
from distkd.data.layout import split_files
from tests.support import cli, distkd_log
from tests.support import BUCKET

FP = "feedc0de" * 8  # the fingerprint the predictions' owners give
TASKS = ["click", "conversion"]  # small_logs' tasks


def log_ids(logs: Path, split: str = "train") -> list[np.ndarray]:
    return [pq.read_table(f, columns=["example_id"]).column(0).to_numpy() for f in split_files(str(logs), split)]


def cached_logits(cache: Path | str, logs: Path, split: str = "train") -> list[np.ndarray]:
    out = []
    for f in split_files(str(logs), split):
        with storage.open_parquet(storage.join(cache, split, Path(f).name)) as pf:
            out.append(pf.read().column("logits").combine_chunks().flatten().to_numpy().reshape(-1, len(TASKS)))
    return out


def write_layouts(folder: Path, ids: np.ndarray, z: np.ndarray, seed: int = 0) -> tuple[Path, Path, Path]:
    """The rows shuffled into three files of three layouts: `a.parquet`, a `logits`
    list<float32> in row groups of 1,000; `b.parquet`, the logits column first as
    fixed_size_list<float16>[2], one row group; `sub/c.parquet`, one float32 column per task
    (and a column the import ignores), row groups of 3,000."""
    p = np.random.default_rng(seed).permutation(len(ids))
    a, b, c = np.array_split(p, [len(p) // 3, 2 * len(p) // 3])
    (folder / "sub").mkdir(parents=True)
    paths = folder / "a.parquet", folder / "b.parquet", folder / "sub" / "c.parquet"
    pq.write_table(pa.table({"example_id": ids[a], "logits": pa.array(list(z[a].astype(np.float32)),
                                                                        pa.list_(pa.float32()))}),
                   paths[0], row_group_size=1000)
    flat = pa.array(z[b].astype(np.float16).reshape(-1))
    pq.write_table(pa.table({"logits": pa.FixedSizeListArray.from_arrays(flat, 2), "example_id": ids[b]}), paths[1])
    pq.write_table(pa.table({"conversion": z[c, 1].astype(np.float32), "model_version": np.full(len(c), 7),
                             "example_id": ids[c], "click": z[c, 0].astype(np.float32)}),
                   paths[2], row_group_size=3000)
    return paths


def import_args(preds: Path, logs: Path, out: Path, *extra: str, fp: str = FP) -> list[str]:
    return ["cache", "import", "--predictions", str(preds / "*.parquet"), "--predictions", str(preds / "sub"),
            "--logs", str(logs), "--out", str(out), "--teacher-name", "ranker-v7", "--fingerprint", fp,
            "--splits", "train", *extra]


def published(out: Path) -> list[str]:
    """Everything in the cache directory but its lock file."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != ".lock")


@pytest.fixture(scope="module")
def synthetic(small_logs):
    """Logits for every train row of small_logs (fp16 values), by shard."""
    rng = np.random.default_rng(1)
    ids = log_ids(small_logs)
    return ids, [rng.normal(0, 3, size=(len(i), len(TASKS))).astype(np.float16) for i in ids]


# -- the round trip ------------------------------------------------------------------------

@pytest.mark.integration
def test_predictions_exported_from_a_built_cache_import_to_the_same_logits(kd_world, tmp_path):
    logs, built = kd_world["logs"], kd_world["cache"]
    ids, want = log_ids(logs), cached_logits(built, logs)
    write_layouts(tmp_path / "preds", np.concatenate(ids), np.concatenate(want))
    out = tmp_path / "imported"
    r = cli(*import_args(tmp_path / "preds", logs, out), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = cached_logits(out, logs)
    for f, w, g in zip(split_files(str(logs), "train"), want, got):
        assert g.dtype == np.float16 and np.array_equal(g, w), f  # row for row, bit for bit
        with pq.ParquetFile(f) as a, pq.ParquetFile(out / "train" / Path(f).name) as b:
            assert [a.metadata.row_group(i).num_rows for i in range(a.num_row_groups)] == \
                [b.metadata.row_group(i).num_rows for i in range(b.num_row_groups)]
    m = read_manifest(out)
    assert m.teacher.record == {"form": "imported", "name": "ranker-v7", "sha256": FP} and m.complete
    assert m.builds[-1].predictions == [str(tmp_path / "preds" / "*.parquet"), str(tmp_path / "preds" / "sub")]
    assert sorted(m.shards) == sorted(read_manifest(built).shards)
    assert verify_cache(out, logs)["rows"] == sum(len(i) for i in ids)
    with distkd_log() as lines:
        assert cli_main(["cache", "verify", "--cache", str(out), "--logs", str(logs), "--recompute", "0.1"]) == 2
    assert any("imported from teacher 'ranker-v7'" in line and "no teacher to run again" in line for line in lines)


@pytest.mark.integration
def test_predictions_and_the_cache_in_object_storage(s3, small_logs, synthetic, tmp_path):
    ids, z = synthetic
    write_layouts(tmp_path / "preds", np.concatenate(ids), np.concatenate(z))
    fs, root = pafs.FileSystem.from_uri(f"s3://{BUCKET}/import/preds")
    for f in (tmp_path / "preds").rglob("*.parquet"):
        with fs.open_output_stream(f"{root}/{f.relative_to(tmp_path / 'preds').as_posix()}") as o:
            o.write(f.read_bytes())
    out = f"s3://{BUCKET}/import/cache"
    assert cli_main(["cache", "import", "--predictions", f"s3://{BUCKET}/import/preds/*.parquet", "--predictions",
                     f"s3://{BUCKET}/import/preds/sub", "--logs", str(small_logs), "--out", out,
                     "--teacher-name", "ranker-v7", "--fingerprint", FP, "--splits", "train"]) == 0
    assert all(np.array_equal(g, w) for g, w in zip(cached_logits(out, small_logs), z))
    assert verify_cache(out, small_logs)["shards"] == len(ids)
    assert not [f for f in storage.list_files(out, recursive=True) if storage.is_temp(storage.basename(f))]


# -- refusals ------------------------------------------------------------------------------

def _set_row(table: pa.Table, r: int, values: list[float]) -> pa.Table:
    rows = table.column("logits").to_pylist()
    rows[r] = values
    return table.set_column(1, "logits", pa.array(rows, pa.list_(pa.float32())))


DAMAGE = {  # name: (damage to a.parquet's table and an extra file, what the error says; X: the id of row 5)
    "missing": (lambda t: (pa.concat_tables([t.slice(0, 5), t.slice(6)]), None),
                "1 logged rows without a prediction; first: example_id {X} ({logs}/train/part-0000"),
    "duplicate": (lambda t: (t, t.slice(5, 1)), "example_id {X} is predicted twice: {a} row 5 and {extra} row 0"),
    "unknown": (lambda t: (t, pa.table({"example_id": [10**15], "logits": t.column("logits").slice(5, 1)})),
                "{extra} row 0: example_id 1000000000000000 is not in the logs"),
    "three tasks": (lambda t: (_set_row(t, 5, [0.5, 1.0, 2.0]), None),
                    "{a} row 5: example_id {X} has 3 logits; the logs have 2 tasks"),
    "nan": (lambda t: (_set_row(t, 5, [0.5, float("nan")]), None), "{a} row 5: example_id {X} has a non-finite logit"),
    "fp16 overflow": (lambda t: (_set_row(t, 5, [7e4, 1.0]), None),
                      "{a} row 5: example_id {X} has logits [70000.0, 1.0] beyond the float16 range"),
}


@pytest.mark.unit
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_bad_prediction_is_refused_naming_file_row_and_id_and_nothing_is_published(damage, small_logs, synthetic,
                                                                                      tmp_path):
    ids, z = synthetic
    a, _, _ = write_layouts(tmp_path / "preds", np.concatenate(ids), np.concatenate(z))
    fn, message = DAMAGE[damage]
    table, extra = fn(pq.read_table(a))
    x = pq.read_table(a).column("example_id")[5].as_py()
    pq.write_table(table, a, row_group_size=1000)
    if extra is not None:
        pq.write_table(extra, tmp_path / "preds" / "extra.parquet")
    out = tmp_path / "out"
    with distkd_log() as lines:
        assert cli_main(import_args(tmp_path / "preds", small_logs, out)) == 2
    error = next(line for line in lines if line.startswith("distkd: error:"))
    assert message.format(X=x, a=a, extra=tmp_path / "preds" / "extra.parquet", logs=small_logs) in error, error
    assert published(out) == []  # no manifest, no cache file, no spill or temporary file


# -- growth, identity ----------------------------------------------------------------------

@pytest.mark.unit
def test_a_new_log_shard_is_imported_alone_and_another_fingerprint_is_refused(small_logs, synthetic, tmp_path):
    ids, z = synthetic
    logs = tmp_path / "logs"
    shutil.copytree(small_logs, logs)
    new = logs / "train" / "part-00003.parquet"
    held = new.rename(tmp_path / "held.parquet")
    write_layouts(tmp_path / "p1", np.concatenate(ids[:3]), np.concatenate(z[:3]))
    out = tmp_path / "out"
    assert cli_main(import_args(tmp_path / "p1", logs, out)) == 0
    first = read_manifest(out)
    assert sorted(first.shards) == [f"train/part-0000{i}.parquet" for i in range(3)]

    held.rename(new)  # the logs gain a shard; the predictions now cover every row (one export of all)
    all_ids, all_z = np.concatenate(ids), np.concatenate(z)
    keep = all_ids != ids[3][0]
    write_layouts(tmp_path / "bad", all_ids[keep], all_z[keep], seed=5)
    before = (out / "manifest.json").read_bytes()
    with distkd_log() as lines:  # the new shard's first row has no prediction: refused, the cache as it was
        assert cli_main(import_args(tmp_path / "bad", logs, out)) == 2
    assert any(f"example_id {ids[3][0]} ({logs}/train/part-00003.parquet row 0)" in line for line in lines), lines
    assert (out / "manifest.json").read_bytes() == before
    assert published(out) == ["manifest.json", "train", *(f"train/part-0000{i}.parquet" for i in range(3))]

    write_layouts(tmp_path / "p2", all_ids, all_z, seed=5)
    assert cli_main(import_args(tmp_path / "p2", logs, out)) == 0
    grown = read_manifest(out)
    assert grown.builds[-1].computed == ["train/part-00003.parquet"] and grown.builds[-1].skipped == 3
    assert all(grown.shards[rel] == e for rel, e in first.shards.items())  # committed shards untouched
    assert all(np.array_equal(g, w) for g, w in zip(cached_logits(out, logs), z))
    assert verify_cache(out, logs)["shards"] == 4

    assert cli_main(import_args(tmp_path / "p2", logs, out)) == 0  # nothing left to import
    assert read_manifest(out).builds[-1].computed == []
    with distkd_log() as lines:
        assert cli_main(import_args(tmp_path / "p2", logs, out, fp="ab" * 32)) == 2
    assert any("holds logits of teacher feedc0defeed" in line and "teacher abababababab" in line for line in lines)


# -- bounded memory ------------------------------------------------------------------------

@pytest.mark.unit
def test_a_small_memory_budget_joins_in_many_partitions_to_the_same_bytes(small_logs, synthetic, tmp_path):
    ids, z = synthetic
    write_layouts(tmp_path / "preds", np.concatenate(ids), np.concatenate(z))
    n = sum(len(i) for i in ids)

    def run(out: str, **kw) -> dict:
        return import_predictions(ImportJob(
            predictions=[str(tmp_path / "preds" / "*.parquet"), str(tmp_path / "preds" / "sub")], logs=str(small_logs),
            out=str(tmp_path / out), teacher_name="ranker-v7", fingerprint=FP, splits=["train"], **kw))

    one = run("one", partitions=1)
    many = run("many", memory_budget_mb=0.1)
    assert one["partitions"] == 1 and one["destination_partitions"] == 1 and one["largest_partition_rows"] == 2 * n
    assert many["partitions"] >= 8 and many["destination_partitions"] >= 4, many
    assert many["largest_partition_rows"] < 2 * n / 4  # a partition holds a share of the rows, not all
    a, b = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "many")
    assert {r: e.output for r, e in a.shards.items()} == {r: e.output for r, e in b.shards.items()}  # sha256 too
    assert all(np.array_equal(g, w) for g, w in zip(cached_logits(tmp_path / "many", small_logs), z))


@pytest.mark.unit
def test_ids_spread_evenly_over_partitions_and_the_budget_sizes_them():
    for ids in (np.arange(100_000), np.arange(100_000) * 1024, np.arange(-50_000, 50_000)):
        counts = np.bincount(partition_of(ids, 16), minlength=16)
        assert counts.min() > 0.9 * len(ids) / 16 and counts.max() < 1.1 * len(ids) / 16
    p = plan(10**9, 10**9, 10**9, 4, 2**30)
    assert p.partitions == 4 * (10**9 * 24 + 10**9 * 16) // 2**30 + 1 and p.range_rows == 2**30 // (4 * 20)
    assert plan(10**9, 10**9, 10**9, 4, 2**30, partitions=3).partitions == 3
    with pytest.raises(CacheError, match="partitions for a memory budget of 1.0 MiB, at most .* give a larger"):
        plan(10**9, 10**9, 10**9, 4, 2**20)
