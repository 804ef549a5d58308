"""LogLoader on real Parquet files: exactly once across ranks, decoding, resume, bad data."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from distkd.data.loader import LogLoader, SideFiles, split_files
from distkd.data.schema import DenseFeature, LogsError, Schema, SparseFeature, Task

SCHEMA = Schema(
    sparse=[
        SparseFeature("user", num_embeddings=1000),
        SparseFeature("item", hash_size=97),
        SparseFeature("tags", num_embeddings=50, multi_valued=True),
    ],
    dense=[DenseFeature("d0", transform="log1p"), DenseFeature("d1")],
    tasks=[Task("click", "click"), Task("conv", "conv")],
    request_id="request_id",
    eval_columns=["p_true"],
)


def _table(ids: np.ndarray, rng: np.random.Generator) -> pa.Table:
    n = len(ids)
    lens = rng.integers(0, 5, n)
    flat = rng.integers(0, 50, int(lens.sum()))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    tags_null = rng.random(n) < 0.1
    tags = pa.ListArray.from_arrays(
        pa.array(offsets, mask=np.concatenate([tags_null, [False]])), pa.array(flat, pa.int64())
    )
    click = rng.integers(0, 2, n).astype(np.int8)
    return pa.table(
        {
            "example_id": pa.array(ids, pa.int64()),
            "user": pa.array(rng.integers(0, 1000, n), pa.int64()),
            "item": pa.array(rng.integers(0, 10**6, n), pa.int64()),
            "tags": tags,
            "d0": pa.array((rng.normal(size=n) * 10).astype(np.float32)),
            "d1": pa.array(rng.random(n).astype(np.float32)),
            "click": pa.array(click, pa.int8(), mask=rng.random(n) < 0.2),
            "conv": pa.array(click * rng.integers(0, 2, n).astype(np.int8), pa.int8()),
            "request_id": pa.array(ids // 5, pa.int64()),
            "p_true": pa.array(rng.random(n).astype(np.float32)),
        }
    )


def write_logs(root: Path, groups: list[list[int]], split: str = "train", seed: int = 0) -> list[str]:
    """One shard per entry of `groups`, one row group per size; example ids 0..N-1."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    SCHEMA.save(root / "schema.yaml")
    next_id, files = 0, []
    for i, sizes in enumerate(groups):
        path = root / split / f"part-{i:05d}.parquet"
        with pq.ParquetWriter(path, _table(np.arange(1), rng).schema) as w:
            for n in sizes:
                w.write_table(_table(np.arange(next_id, next_id + n), rng))
                next_id += n
        files.append(str(path))
    return files


AWKWARD = [[100, 37, 64], [1], [50, 50, 23]]  # 325 rows, uneven row groups


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader") / "logs"
    write_logs(root, AWKWARD)
    return root


def run_epoch(loader: LogLoader) -> list[np.ndarray]:
    return [b.example_id.numpy() for b in loader]


def expected_rows(files: list[str]) -> dict[int, dict]:
    t = pa.concat_tables(pq.read_table(f) for f in files).to_pylist()
    return {r["example_id"]: r for r in t}


# -- exactly once ------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "world,batch,shuffle",
    [(2, 64, False), (2, 64, True), (3, 54, False), (3, 54, True), (3, 7, True), (2, 400, False),
     (4, 3, True)],
)
def test_exactly_once_equal_steps(logs, world, batch, shuffle):
    files = split_files(logs, "train")
    loaders = [
        LogLoader(files, SCHEMA, batch, rank=r, world_size=world, shuffle=shuffle, seed=3) for r in range(world)
    ]
    assert len({len(ld) for ld in loaders}) == 1
    epochs = [run_epoch(ld) for ld in loaders]
    for ld, batches in zip(loaders, epochs):
        assert len(batches) == len(ld)
        assert all(0 < len(b) <= batch for b in batches)
        assert sum(len(b) for b in batches) == ld.num_rows
    ids = np.concatenate([np.concatenate(b) for b in epochs])
    assert len(ids) == 325 and set(ids.tolist()) == set(range(325))


@pytest.mark.unit
def test_empty_last_batch_is_rebalanced(logs):
    # 325 rows over 3 ranks: 108, 108, 109; at batch 54 ranks 0-1 would end on an empty batch.
    files = split_files(logs, "train")
    sizes = [[len(b) for b in run_epoch(LogLoader(files, SCHEMA, 54, rank=r, world_size=3))] for r in range(3)]
    assert sizes == [[54, 53, 1], [54, 53, 1], [54, 54, 1]]


@pytest.mark.unit
def test_drop_last(logs):
    files = split_files(logs, "train")
    loaders = [LogLoader(files, SCHEMA, 50, rank=r, world_size=3, drop_last=True, shuffle=True) for r in range(3)]
    epochs = [run_epoch(ld) for ld in loaders]
    assert [len(e) for e in epochs] == [2, 2, 2] and all(len(b) == 50 for e in epochs for b in e)
    ids = np.concatenate([np.concatenate(e) for e in epochs])
    assert len(set(ids.tolist())) == len(ids) == 300


@pytest.mark.unit
def test_impossible_split_is_refused(logs):
    with pytest.raises(ValueError, match="drop_last"):
        LogLoader(split_files(logs, "train"), SCHEMA, 1, rank=0, world_size=2)


@pytest.mark.unit
def test_shuffle_is_seeded_and_changes_with_epoch(logs):
    files = split_files(logs, "train")

    def order(seed, epoch):
        ld = LogLoader(files, SCHEMA, 32, rank=1, world_size=2, shuffle=True, seed=seed)
        ld.set_epoch(epoch)
        return np.concatenate(run_epoch(ld)).tolist()

    e0 = order(0, 0)
    assert e0 == order(0, 0)
    assert e0 != order(0, 1) and e0 != order(1, 0)
    plain = np.concatenate(run_epoch(LogLoader(files, SCHEMA, 32, rank=1, world_size=2))).tolist()
    assert plain == sorted(plain) and e0 != plain


# -- two real ranks ----------------------------------------------------------------------


def _ddp_worker(files: list[str], schema: Schema, out_dir: str) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        loader = LogLoader(files, schema, 54, rank=rank, world_size=world, shuffle=True, seed=1)
        ids, steps = [], 0
        for batch in loader:
            assert len(batch) > 0
            dist.all_reduce(torch.ones(1))  # a collective per step, as DDP does
            ids.append(batch.example_id.numpy())
            steps += 1
        counts = [None] * world
        dist.all_gather_object(counts, steps)
        np.save(Path(out_dir) / f"rank{rank}.npy", np.concatenate(ids))
        (Path(out_dir) / f"steps{rank}.txt").write_text(" ".join(map(str, counts)))
        return steps
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_two_process_ranks_exactly_once(logs, tmp_path):
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=2,
        run_id=f"loader-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    files = split_files(logs, "train")
    result = elastic_launch(config, entrypoint=_ddp_worker)(files, SCHEMA, str(tmp_path))
    assert sorted(result) == [0, 1]
    for r in range(2):
        counts = (tmp_path / f"steps{r}.txt").read_text().split()
        assert counts == [str(result[0])] * 2
    ids = np.concatenate([np.load(tmp_path / f"rank{r}.npy") for r in range(2)])
    assert len(ids) == 325 and set(ids.tolist()) == set(range(325))


# -- decoding ----------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_match_pyarrow(logs, shuffle):
    # 3 ranks: rank boundaries slice row groups (sliced list arrays with nulls); batches of 48
    # span row groups; with shuffle, rows (and their jagged ids) are permuted within windows.
    files = split_files(logs, "train")
    want = expected_rows(files)
    loaders = [LogLoader(files, SCHEMA, 48, rank=r, world_size=3, shuffle=shuffle, seed=5) for r in range(3)]
    seen = 0
    for b in (b for ld in loaders for b in ld):
        kjt = b.sparse
        assert isinstance(kjt, KeyedJaggedTensor) and kjt.keys() == ["user", "item", "tags"]
        assert kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int32
        assert kjt.stride() == len(b)
        assert b.dense.dtype == b.labels.dtype == torch.float32
        assert b.dense.shape == (len(b), 2) and b.labels.shape == (len(b), 2)
        # Key-major layout: all rows of 'user', then 'item', then 'tags'.
        lengths = kjt.lengths().view(3, len(b))
        assert (lengths[:2] == 1).all()
        jt = kjt.to_dict()
        tags = jt["tags"].to_dense()
        for i, eid in enumerate(b.example_id.tolist()):
            r = want[eid]
            assert jt["user"].values()[i] == r["user"]
            assert jt["item"].values()[i] == r["item"] % 97
            assert tags[i].tolist() == (r["tags"] or [])
            d0 = np.log1p(np.float32(max(r["d0"], 0)))
            assert b.dense[i, 0].item() == pytest.approx(d0, rel=1e-6) and b.dense[i, 1].item() == r["d1"]
            click = b.labels[i, 0].item()
            assert (np.isnan(click) and r["click"] is None) or click == r["click"]
            assert b.labels[i, 1].item() == r["conv"]
            assert b.request_id[i].item() == r["request_id"]
        seen += len(b)
    assert seen == len(want)


@pytest.mark.unit
def test_multi_valued_matches_pyarrow_exactly(logs):
    files = split_files(logs, "train")
    tags = pa.concat_tables(pq.read_table(f, columns=["tags"]) for f in files).column("tags").combine_chunks()
    lengths = np.nan_to_num(pc.list_value_length(tags).to_numpy(zero_copy_only=False)).astype(np.int32)
    values = tags.flatten().to_numpy()
    got = [b.sparse["tags"] for b in LogLoader(files, SCHEMA, 37)]  # batches cross row groups
    assert np.array_equal(np.concatenate([j.lengths().numpy() for j in got]), lengths)
    assert np.array_equal(np.concatenate([j.values().numpy() for j in got]), values)


# -- resume ------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("shuffle,k", [(False, 3), (True, 2), (True, 5), (False, 0)])
def test_resume_equals_uninterrupted_epoch(logs, shuffle, k):
    files = split_files(logs, "train")

    def make():
        ld = LogLoader(
            files, SCHEMA, 16, rank=1, world_size=2, shuffle=shuffle, seed=7, shuffle_window_row_groups=2
        )
        ld.set_epoch(1)
        return ld

    full = np.concatenate(run_epoch(make())).tolist()
    first = make()
    it = iter(first)
    head = [next(it).example_id.numpy() for _ in range(k)]
    sd = first.state_dict()
    it.close()
    assert sd == {"epoch": 1, "generations": [[2, k]]}
    second = make()
    second.load_state_dict(sd)
    second.set_epoch(1)  # the same epoch keeps the pending resume
    rest = run_epoch(second)
    assert len(head) + len(rest) == len(first)
    assert np.concatenate(head + rest).tolist() == full
    assert second.state_dict() == {"epoch": 1, "generations": [[2, len(second)]]}


@pytest.mark.unit
def test_resume_does_not_decode_skipped_row_groups(tmp_path):
    files = write_logs(tmp_path, [[40, 40, 40]])
    pq.write_table(_with_bad_user(pq.read_table(files[0]), row=3), files[0], row_group_size=40)
    with pytest.raises(LogsError, match="row group 0"):
        run_epoch(LogLoader(files, SCHEMA, 20))
    ld = LogLoader(files, SCHEMA, 20)
    ld.load_state_dict({"epoch": 0, "generations": [[1, 2]]})  # rows 40.. : row group 0 is never read
    assert np.concatenate(run_epoch(ld)).tolist() == list(range(40, 120))


# -- bad data ----------------------------------------------------------------------------


def _with_bad_user(table: pa.Table, row: int) -> pa.Table:
    user = table.column("user").to_numpy().copy()
    user[row] = 5000
    return table.set_column(table.schema.get_field_index("user"), "user", pa.array(user))


@pytest.mark.unit
@pytest.mark.parametrize("prefetch", [0, 2])
def test_out_of_range_id_names_file_and_row_group(tmp_path, prefetch):
    files = write_logs(tmp_path, [[30, 30, 30, 30], [30]])
    pq.write_table(_with_bad_user(pq.read_table(files[0]), row=70), files[0], row_group_size=30)
    with pytest.raises(LogsError) as e:
        run_epoch(LogLoader(files, SCHEMA, 16, prefetch=prefetch))
    msg = str(e.value)
    assert files[0] in msg and "row group 2" in msg and "'user'" in msg and "row 70" in msg
    assert "5000" in msg


@pytest.mark.unit
def test_corrupt_and_mistyped_files(tmp_path):
    files = write_logs(tmp_path, [[30], [30]])
    data = Path(files[1]).read_bytes()
    Path(files[1]).write_bytes(data[: len(data) // 2])
    with pytest.raises(LogsError, match=files[1]):
        LogLoader(files, SCHEMA, 8)
    t = pq.read_table(files[0])
    pq.write_table(t.set_column(t.schema.get_field_index("d1"), "d1", pa.array(["x"] * 30)), files[0])
    with pytest.raises(LogsError, match=f"{files[0]}.*'d1'"):
        LogLoader(files[:1], SCHEMA, 8)
    with pytest.raises(LogsError, match="no Parquet shards"):
        split_files(tmp_path, "valid")


# -- aligned side files ------------------------------------------------------------------


def _side_path(log_path: str) -> str:
    return log_path.replace("/train/", "/cache/")


def _write_side(files: list[str], sizes: list[list[int]] | None = None) -> None:
    for i, f in enumerate(files):
        ids = pq.read_table(f, columns=["example_id"]).column("example_id").to_numpy()
        t = pa.table(
            {
                "example_id": ids,
                "logit": pa.array((ids * 0.5).astype(np.float16)),
                "hidden": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.stack([ids, -ids], 1).ravel().astype(np.float32)), 2
                ),
            }
        )
        Path(_side_path(f)).parent.mkdir(exist_ok=True)
        md = pq.ParquetFile(f).metadata
        groups = sizes[i] if sizes else [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        with pq.ParquetWriter(_side_path(f), t.schema) as w:
            start = 0
            for n in groups:
                w.write_table(t.slice(start, n))
                start += n


def _same_ids(log: pa.Table, side: pa.Table, path: str, g: int) -> None:
    if not log.column("example_id").equals(side.column("example_id")):
        raise LogsError(f"{path}: row group {g}: cache rows do not match the log's example_id")


@pytest.mark.unit
def test_aligned_side_files(tmp_path):
    files = write_logs(tmp_path, AWKWARD)
    _write_side(files)
    al = SideFiles("teacher", _side_path, ["logit", "hidden"], check_fn=_same_ids, check_columns=["example_id"])
    ids = []
    for r in range(2):
        for b in LogLoader(files, SCHEMA, 40, rank=r, world_size=2, shuffle=True, aligned=[al]):
            eid = b.example_id.float()
            assert b.extras["teacher.logit"].dtype == torch.float32 and b.extras["teacher.logit"].shape == (len(b),)
            assert torch.equal(b.extras["teacher.logit"], (eid * 0.5).half().float())
            assert torch.equal(b.extras["teacher.hidden"], torch.stack([eid, -eid], 1))
            ids.append(b.example_id.numpy())
    assert sorted(np.concatenate(ids).tolist()) == list(range(325))


@pytest.mark.unit
def test_misaligned_side_files_are_rejected(tmp_path):
    files = write_logs(tmp_path, AWKWARD)
    _write_side(files, sizes=[[101, 36, 64], [1], [50, 50, 23]])
    al = SideFiles("teacher", _side_path, ["logit"])
    with pytest.raises(LogsError) as e:
        LogLoader(files, SCHEMA, 40, aligned=[al])
    assert _side_path(files[0]) in str(e.value) and files[0] in str(e.value)

    _write_side(files)  # right row groups, wrong rows: caught by the check callback
    side = pq.read_table(_side_path(files[2]))
    bad = side.take(np.arange(len(side))[::-1].copy())
    with pq.ParquetWriter(_side_path(files[2]), bad.schema) as w:
        for a, n in [(0, 50), (50, 50), (100, 23)]:
            w.write_table(bad.slice(a, n))
    al = SideFiles("teacher", _side_path, ["logit"], check_fn=_same_ids, check_columns=["example_id"])
    with pytest.raises(LogsError, match="do not match"):
        run_epoch(LogLoader(files, SCHEMA, 40, aligned=[al]))
    with pytest.raises(LogsError, match="missing column"):
        LogLoader(files, SCHEMA, 40, aligned=[SideFiles("teacher", _side_path, ["nope"])])


# -- prefetch thread ---------------------------------------------------------------------


@pytest.mark.unit
def test_abandoned_iterator_stops_its_thread(logs):
    before = threading.active_count()
    it = iter(LogLoader(split_files(logs, "train"), SCHEMA, 8, prefetch=1))
    assert len(next(it)) == 8
    it.close()
    assert threading.active_count() == before
    for _ in LogLoader(split_files(logs, "train"), SCHEMA, 8):
        break  # abandoned by a for loop: the generator is closed when collected
    assert threading.active_count() == before


@pytest.mark.unit
def test_batch_to(logs):
    b = next(iter(LogLoader(split_files(logs, "train"), SCHEMA, 8)))
    c = b.to("cpu")
    assert len(c) == 8 and torch.equal(c.sparse.values(), b.sparse.values()) and c.request_id is not None


# -- synthetic logs ----------------------------------------------------------------------


@pytest.mark.unit
def test_synthetic_logs_exactly_once(small_logs):
    from distkd.data.schema import load_schema

    schema = load_schema(small_logs)
    files = split_files(small_logs, "train")
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    ids, steps = [], set()
    for r in range(2):
        loader = LogLoader(files, schema, 1000, rank=r, world_size=2, shuffle=True, seed=2)
        batches = list(loader)
        steps.add(len(batches))
        assert len(batches) == len(loader) and all(len(b) > 0 for b in batches)
        ids += [b.example_id for b in batches]
        multi = [f.name for f in schema.sparse if f.multi_valued]
        assert multi and all(b.sparse[multi[0]].lengths().sum() > 0 for b in batches)
    ids = torch.cat(ids)
    assert len(steps) == 1 and len(ids) == total == len(set(ids.tolist()))


def _take(loaders, steps: int) -> tuple[list[np.ndarray], dict]:
    """`steps` batches from each rank's loader; returns their ids and the (shared) state."""
    ids = []
    for ld in loaders:
        it = iter(ld)
        ids += [next(it).example_id.numpy() for _ in range(steps)]
        it.close()
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states)
    return ids, states[0]


@pytest.mark.unit
@pytest.mark.parametrize("shuffle,keep", [(False, False), (True, False), (True, True)])
def test_resume_at_other_world_sizes_reads_every_row_once(logs, shuffle, keep):
    """2 ranks take 2 steps, 3 ranks resume and take 1, then 1 rank finishes the epoch:
    every row of the epoch exactly once, and the step count matches on every rank."""
    files = split_files(logs, "train")

    def make(world):
        lds = [LogLoader(files, SCHEMA, 16, rank=r, world_size=world, shuffle=shuffle, seed=5, keep_requests=keep,
                         shuffle_window_row_groups=2) for r in range(world)]
        for ld in lds:
            ld.set_epoch(2)
        return lds

    first, sd = _take(make(2), 2)
    assert sd == {"epoch": 2, "generations": [[2, 2]]}
    three = make(3)
    for ld in three:
        ld.load_state_dict(sd)
    assert {len(ld) for ld in three} == {len(three[0])} and three[0].step == 2
    second, sd = _take(three, 1)
    assert sd == {"epoch": 2, "generations": [[2, 2], [3, 1]]}
    one = make(1)[0]
    one.load_state_dict(sd)
    rest = run_epoch(one)
    ids = np.concatenate(first + second + rest)
    assert len(ids) == 325 and sorted(ids.tolist()) == list(range(325))
    assert one.step == len(one) and one.state_dict()["generations"][-1] == [1, len(rest)]


@pytest.mark.unit
def test_resume_at_the_same_world_size_continues_in_place(logs):
    files = split_files(logs, "train")
    full = run_epoch(LogLoader(files, SCHEMA, 16, rank=1, world_size=3, shuffle=True, seed=1))
    ld = LogLoader(files, SCHEMA, 16, rank=1, world_size=3, shuffle=True, seed=1)
    ld.load_state_dict({"epoch": 0, "generations": [[3, 4]]})
    assert [b.tolist() for b in run_epoch(ld)] == [b.tolist() for b in full[4:]]
