"""Retrieval metrics against hand-computed numbers, and their all-reduce over two ranks."""

from __future__ import annotations

import math

import pytest
import torch

from distkd.metrics_retrieval import RetrievalMetrics, expected_recall_at_k, gap_recovered, label_ranks

LOGITS = torch.tensor([
    [0.1, 0.5, 0.3, 0.0, 0.2],  # label 2: items 1 above it -> rank 1
    [1.0, 1.0, 0.0, 0.0, 2.0],  # label 1: item 4 above, item 0 ties with a smaller id -> rank 2
    [0.0, 0.0, 0.0, 0.0, 3.0],  # label 4: rank 0
    [9.0, 0.0, 0.0, 0.0, 0.0],  # no label
])
LABELS = torch.tensor([2, 1, 4, -1])
WANT = {
    "rows": 3, "recall@1": 1 / 3, "ndcg@1": 1 / 3, "recall@2": 2 / 3, "ndcg@2": (1 / math.log2(3) + 1) / 3,
    "mrr": (1 / 2 + 1 / 3 + 1) / 3, "accuracy": 1 / 3,
    # top-1 predictions 1, 4, 4; classes present: 1, 2, 4
    "macro_precision": (0 + 0 + 1 / 2) / 3, "macro_recall": (0 + 0 + 1) / 3, "macro_f1": (0 + 0 + 2 / 3) / 3,
}


def _check(got, want=WANT):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k


@pytest.mark.unit
def test_hand_computed_example():
    assert label_ranks(LOGITS[:3], LABELS[:3]).tolist() == [1, 2, 0]
    m = RetrievalMetrics(5, ks=(1, 2))
    m.update(LOGITS, LABELS)
    _check(m.compute())
    m.reset()
    assert m.compute()["rows"] == 0 and math.isnan(m.compute()["mrr"])


@pytest.mark.unit
def test_batches_accumulate_like_one_update():
    m = RetrievalMetrics(5, ks=(1, 2))
    for a in range(4):
        m.update(LOGITS[a:a + 1], LABELS[a:a + 1])
    _check(m.compute())


@pytest.mark.unit
def test_oracle_from_ranks_and_expected_recall():
    m = RetrievalMetrics(5, ks=(1, 2))
    m.update_ranks(torch.tensor([1.0, 2.0, 0.0]))  # e.g. the logs' oracle_rank column
    got = m.compute()
    _check(got, {k: WANT[k] for k in ("rows", "recall@1", "recall@2", "ndcg@2", "mrr")})
    assert got["accuracy"] == pytest.approx(1 / 3) and math.isnan(got["macro_f1"])
    log_p = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    torch.testing.assert_close(expected_recall_at_k(log_p, 2), torch.tensor([0.8, 0.5]))
    assert gap_recovered(0.3, 0.2, 0.4) == pytest.approx(0.5) and math.isnan(gap_recovered(1, 1, 1))


def _rank_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        m = RetrievalMetrics(5, ks=(1, 2))
        rows = [0, 3] if rank == 0 else [1, 2]  # each rank holds part of the rows
        m.update(LOGITS[rows], LABELS[rows])
        torch.save(m.compute(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_all_reduce_over_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(f"file://{tmp_path}/store", str(tmp_path)), nprocs=2)
    for r in range(2):
        _check(torch.load(tmp_path / f"rank{r}.pt"))
