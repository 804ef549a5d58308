"""The next-item model: shapes, scoring, training, sizes, and two real ranks under DMP."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from distkd.models.next_item import (
    Feature, NextItemConfig, NextItemModel, NextItemOutput, count_parameters, kjt_from_lists,
)
from distkd.objectives.next_item_losses import hard_ce

N = 500
FEATURES = [Feature("history", N, True), Feature("surface", 4)]


def _batch(b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (b,), generator=g)
    history = torch.randint(0, N, (int(lengths.sum()),), generator=g)
    surface = torch.randint(0, 4, (b,), generator=g)
    # A learnable target: the next item is the history's first item shifted by the surface.
    first = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), lengths[:-1]]), 0)
    y = (history[first] + surface) % N
    return kjt_from_lists({"history": (history, lengths), "surface": (surface, torch.ones(b, dtype=torch.int32))}), y


def _model(dim=16, tower=(), seed=0, **kw):
    torch.manual_seed(seed)
    return NextItemModel(FEATURES, N, NextItemConfig(embedding_dim=dim, tower=list(tower), **kw),
                         sparse_device=torch.device("cpu"))


@pytest.mark.unit
@pytest.mark.parametrize("tower", [(), (32,)])
def test_shapes_and_score_agree_with_logits(tower):
    model = _model(tower=tower)
    kjt, _ = _batch()
    with torch.no_grad():
        model.item_bias.normal_()
    out = model(kjt)
    assert isinstance(out, NextItemOutput) and out.logits.shape == (16, N) and out.query.shape == (16, 16)
    ids = torch.tensor([3, 7, 499])
    torch.testing.assert_close(model.score(out.query, ids), out.logits[:, ids])
    per_row = torch.randint(0, N, (16, 5))
    torch.testing.assert_close(model.score(out.query, per_row), out.logits.gather(1, per_row))
    assert model(kjt, full_logits=False).logits is None


@pytest.mark.unit
def test_dense_features_and_feature_checks():
    torch.manual_seed(0)
    model = NextItemModel([{"name": "history", "num_embeddings": N, "multi_valued": True}], N,
                          NextItemConfig(embedding_dim=8), n_dense=3, sparse_device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    kjt = kjt_from_lists({"history": (torch.randint(0, N, (10,), generator=g), torch.tensor([4, 6]))})
    assert model(kjt, torch.randn(2, 3)).logits.shape == (2, N)
    with pytest.raises(ValueError):
        NextItemModel(FEATURES, N + 1, NextItemConfig(), sparse_device=torch.device("cpu"))
    with pytest.raises(ValueError):
        NextItemModel(FEATURES, N, NextItemConfig(), item_feature="surface", sparse_device=torch.device("cpu"))


@pytest.mark.unit
def test_meta_device_tables_by_default():
    model = NextItemModel(FEATURES, N, NextItemConfig(embedding_dim=8))
    assert all(p.is_meta for p in model.ebc.parameters())
    assert not model.item_embedding.is_meta  # the replicated output table is materialized


@pytest.mark.unit
def test_a_few_steps_reduce_the_loss():
    model = _model(dim=32)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    kjt, y = _batch(64, seed=1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = hard_ce(model(kjt).logits, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.unit
def test_parameter_counts_and_teacher_student_ratio():
    feats = [Feature("history", 20_000, True), Feature("surface", 8)]
    teacher, student = NextItemConfig(64), NextItemConfig(5)
    ct, cs = count_parameters(feats, 20_000, teacher), count_parameters(feats, 20_000, student)
    assert ct["total"] == 20_008 * 64 + 20_000 * 65 and cs["total"] == 20_008 * 5 + 20_000 * 6
    assert cs["total"] / ct["total"] <= 0.1
    model = _model(dim=12, tower=(24,))
    counts = count_parameters(FEATURES, N, NextItemConfig(12, [24]))
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == (N + 4) * 12 and counts["item"] == N * 13


# -- two ranks: table-wise sharded input tables, replicated output table ----------------------

def _dmp_worker(out_dir: str) -> list[float]:
    import torch.distributed as dist
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from distkd.log import quiet

    quiet()
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)  # the same replicated parameters on every rank
        model = NextItemModel(FEATURES, N, NextItemConfig(embedding_dim=8, tower=[16]))
        _apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": 0.1})
        constraints = {f"t_{f.name}": ParameterConstraints(sharding_types=["table_wise"]) for f in FEATURES}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                           constraints=constraints)
        plan = planner.collective_plan(model, pg=dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(module=model, device=torch.device("cpu"), plan=plan)
        dense = [p for n, p in dmp.named_parameters() if "item_" in n or "tower" in n]
        opt = torch.optim.Adam(dense, lr=0.01)
        kjt, y = _batch(8, seed=rank)  # each rank its own rows
        losses = []
        for _ in range(3):
            opt.zero_grad()
            out = dmp(kjt)
            assert out.logits.shape == (8, N) and out.query.shape == (8, 8)
            loss = hard_ce(out.logits, y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        item = dmp.module.item_embedding.detach()
        sums = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(sums, item.sum().reshape(1))
        assert torch.allclose(sums[0], sums[1])  # replicas stay equal: DDP all-reduced their gradient
        sharding = {t: s.sharding_type for m in plan.plan.values() for t, s in m.items()}
        assert set(sharding.values()) == {"table_wise"}, sharding
        return losses
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_two_ranks_under_distributed_model_parallel(tmp_path):
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=f"ni-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = elastic_launch(config, entrypoint=_dmp_worker)(str(tmp_path))
    assert sorted(result) == [0, 1]
    for losses in result.values():
        assert losses[-1] < losses[0]
