"""The loader's fast paths: decoding workers give the same batches, the vectorised checks catch
what check_row_group catches (same message), the sparse block builds the same KJT, and the
CUDA transfer settings (pinned batches, non_blocking copies) are chosen from the device."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest
import torch

from distkd.data.batch import Batch, transfer_for
from distkd.data.checked import decode_checked
from distkd.data.checks import check_row_group
from distkd.data.decode_pool import ordered
from distkd.data.jagged import Sparse
from distkd.data.loader import LogLoader, split_files
from distkd.data.rows import decode
from distkd.data.schema import LogsError
from tests.test_loader import AWKWARD, SCHEMA, _table, write_logs


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers") / "logs"
    write_logs(root, AWKWARD)
    return root


def _arrays(b: Batch) -> list[np.ndarray]:
    kjt = b.sparse
    return [kjt.values().numpy(), kjt.lengths().numpy(), np.array(kjt.keys()), b.dense.numpy(), b.labels.numpy(),
            b.example_id.numpy(), b.request_id.numpy()]


def _assert_same(xs: list[Batch], ys: list[Batch]) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for a, c in zip(_arrays(x), _arrays(y)):
            assert a.dtype == c.dtype and np.array_equal(a, c, equal_nan=a.dtype.kind == "f")


# -- decoding workers ---------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("world,batch,shuffle,keep", [(1, 16, True, False), (2, 7, True, True), (3, 40, False, False)])
def test_workers_give_the_same_batches_and_resume(logs, world, batch, shuffle, keep):
    files = split_files(logs, "train")

    def loader(rank: int, workers: int) -> LogLoader:
        return LogLoader(files, SCHEMA, batch, rank=rank, world_size=world, shuffle=shuffle, seed=3,
                         shuffle_window_row_groups=2, keep_requests=keep, workers=workers)

    for rank in range(world):
        one = list(loader(rank, 1))
        for workers in (2, 3):
            _assert_same(list(loader(rank, workers)), one)
            # Stop mid-epoch at N workers, resume at the other N: the rest is N=1's rest.
            k = len(one) // 2
            ld = loader(rank, workers)
            it = iter(ld)
            head = [next(it) for _ in range(k)]
            it.close()
            state = ld.state_dict()
            _assert_same(head, one[:k])
            again = loader(rank, 1 if workers > 1 else 2)
            again.load_state_dict(state)
            _assert_same(list(again), one[k:])


@pytest.mark.unit
def test_ordered_keeps_job_order_and_raises_the_first_failure():
    def slow_first(handles, job):
        handles[job] = _Closable()
        if job == 0:
            threading.Event().wait(0.05)  # finishes last
        if job == 5:
            raise ValueError("job 5")
        return job * 10

    assert list(ordered(slow_first, range(5), workers=3)) == [0, 10, 20, 30, 40]
    assert list(ordered(slow_first, range(5), workers=1)) == [0, 10, 20, 30, 40]
    got = []
    with pytest.raises(ValueError, match="job 5"):
        for x in ordered(slow_first, range(8), workers=2):
            got.append(x)
    assert got == [0, 10, 20, 30, 40]
    before = threading.active_count()
    it = ordered(slow_first, range(100), workers=2)
    next(it)
    it.close()  # abandoned: its threads end, its files close
    assert threading.active_count() == before and _Closable.open == 0


class _Closable:
    open = 0

    def __init__(self):
        _Closable.open += 1

    def close(self):
        _Closable.open -= 1


# -- vectorised checks ---------------------------------------------------------------------


def _set(t: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, arr)


def _corruptions(t: pa.Table) -> dict[str, pa.Table]:
    n = t.num_rows
    user = t.column("user").to_numpy().copy()
    d1 = t.column("d1").to_numpy().copy()
    out = {}
    for what, v in [("user high", 1000), ("user negative", -1)]:
        u = user.copy()
        u[7] = v
        out[what] = _set(t, "user", pa.array(u))
    out["item negative (hash_size)"] = _set(t, "item", pa.array(np.r_[t.column("item").to_numpy()[:-1], -5]))
    tags = t.column("tags").combine_chunks()
    vals = tags.values.to_numpy().copy()
    vals[3] = 50
    out["tags high"] = _set(t, "tags", pa.ListArray.from_arrays(tags.offsets, pa.array(vals), mask=tags.is_null()))
    vals[3] = -2
    out["tags negative"] = _set(t, "tags", pa.ListArray.from_arrays(tags.offsets, pa.array(vals), mask=tags.is_null()))
    out["tags null inside"] = _set(t, "tags", pa.ListArray.from_arrays(
        tags.offsets, pa.array(vals, mask=np.arange(len(vals)) == 1), mask=tags.is_null()))
    for what, v in [("d1 nan", np.nan), ("d1 inf", -np.inf)]:
        d = d1.copy()
        d[11] = v
        out[what] = _set(t, "d1", pa.array(d))
    out["d1 null"] = _set(t, "d1", pa.array(d1, mask=np.arange(n) == 4))
    d64 = d1.astype(np.float64)
    d64[9] = float(np.finfo(np.float32).max) * (1 + 2**-30)  # rounds to float32's max, still refused
    out["d1 float64 past float32"] = _set(t, "d1", pa.array(d64))
    click = t.column("click").combine_chunks()
    c = click.to_numpy(zero_copy_only=False).copy()
    c[np.isnan(c)] = 0
    c[5] = 2
    out["click 2"] = _set(t, "click", pa.array(c.astype(np.int8), mask=click.is_null().to_numpy(zero_copy_only=False)))
    out["click float64 near 1"] = _set(t, "click", pa.array(np.r_[np.ones(n - 1), 1 - 1e-12]))
    out["null id"] = _set(t, "example_id", pa.array(t.column("example_id").to_numpy(), mask=np.arange(n) == 2))
    out["null user"] = _set(t, "user", pa.array(user, mask=np.arange(n) == 6))
    return out


def _error(fn) -> str | None:
    try:
        fn()
    except LogsError as e:
        return str(e)
    return None


@pytest.mark.unit
def test_vectorised_checks_raise_what_check_row_group_raises():
    t = _table(np.arange(200), np.random.default_rng(1))
    assert _error(lambda: decode_checked(t, SCHEMA, "f", 3, 100)) is None
    for what, bad in _corruptions(t).items():
        want = _error(lambda: check_row_group(bad, SCHEMA, "f", 3, 100))
        assert want is not None, what
        assert _error(lambda: decode_checked(bad, SCHEMA, "f", 3, 100)) == want, what


@pytest.mark.unit
def test_vectorised_checks_false_alarm_is_no_error_and_decode_is_unchanged():
    t = _table(np.arange(300), np.random.default_rng(2))
    big = np.full(300, 3e38, np.float32)  # finite, but their float32 sum is not
    t = _set(t, "d1", pa.array(big))
    rows, ref = decode_checked(t, SCHEMA, "f", 0, 0), decode(t, SCHEMA, "f")
    assert np.array_equal(rows.dense, ref.dense) and np.array_equal(rows.labels, ref.labels, equal_nan=True)
    for (v, o), (w, p) in zip(rows.sparse, ref.sparse):
        assert np.array_equal(v, w) and (o is None) == (p is None) and (o is None or np.array_equal(o, p))


# -- the sparse block --------------------------------------------------------------------


def _reference_kjt(features, n):
    values = np.concatenate([v for v, _ in features])
    lengths = np.concatenate([np.ones(n, np.int32) if o is None else np.diff(o).astype(np.int32)
                              for _, o in features])
    return values, lengths, [len(v) for v, _ in features]


@pytest.mark.unit
def test_sparse_block_slices_takes_concats_like_per_feature_code():
    rng = np.random.default_rng(0)

    def features(n, multi):
        out = []
        for m in multi:
            if m:
                off = np.r_[0, np.cumsum(rng.integers(0, 4, n))].astype(np.int64)
                out.append((rng.integers(0, 9, off[-1]), off))
            else:
                out.append((rng.integers(0, 9, n), None))
        return out

    a = Sparse.of(features(30, [False, True, False, False, True]), 30)
    b = Sparse.of(features(20, [False, True, False, False, True]), 20)
    c = Sparse.of(features(10, [False, True, True, False, True]), 10)  # another layout (nulls, checks off)
    for block in [a.slice(3, 25), a.take(rng.permutation(30)), Sparse.concat([a, b]), Sparse.concat([a, c, b]),
                  Sparse.concat([a.slice(0, 0), b])]:
        got = block.kjt_arrays()
        want = _reference_kjt(block.features(), len(block))
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
    feats = a.features()
    idx = np.array([4, 0, 29, 4])
    for (v, o), (w, p) in zip(a.take(idx).features(), feats):
        rows = [w[i] for i in idx] if p is None else [w[p[i]:p[i + 1]] for i in idx]
        assert np.array_equal(v, np.hstack(rows) if rows else v)
        assert (o is None) == (p is None)


# -- pinned memory, non_blocking ----------------------------------------------------------


@pytest.mark.unit
def test_transfer_is_pinned_and_non_blocking_only_for_cuda():
    assert transfer_for("cpu") == (False, False) and transfer_for(torch.device("cpu")) == (False, False)
    assert transfer_for("cuda") == (True, True) and transfer_for(torch.device("cuda", 1)) == (True, True)
    assert transfer_for("meta") == (False, False)


@pytest.mark.unit
@pytest.mark.parametrize("pin", [False, True])
def test_loader_pins_batches_in_its_thread_when_asked(logs, monkeypatch, pin):
    threads = []

    def fake_pin(self):  # pin_memory() needs CUDA, absent here: record who pinned
        threads.append(threading.current_thread().name)
        return self

    monkeypatch.setattr(Batch, "pin_memory", fake_pin)
    batches = list(LogLoader(split_files(logs, "train"), SCHEMA, 50, pin_memory=pin, prefetch=2))
    assert threads == (["distkd-loader"] * len(batches) if pin else [])
