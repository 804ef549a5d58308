"""A stale teacher (issue 28, item 2): the cache records the teacher's training window and each
shard's partition, the loader carries the teacher's age per row, and the KD objective weights
its distillation terms by that age and/or distills from an adapter's corrected logits.

The gradients are checked exactly: age weighting scales each row's distillation gradient by
0.5 ** (age / half life) (none at an infinite age, the hard term untouched); the adapter starts
as the identity, learns from its label loss only (its BCE gradient in closed form) and never
passes the student's terms back into itself.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import math

import pytest
import torch

from distkd.bench.staleness import table
from distkd.cache import open_cache, read_manifest
from distkd.cache.age import ages
from distkd.cache.build import CacheJob, build
from distkd.cache.contract import CacheError, Manifest
from distkd.cache.status import format_status, status
from distkd.config import ConfigError
from distkd.data.layout import PartitionRange, split_files, window_of
from distkd.data.loader import LogLoader
from distkd.data.schema import load_schema
from distkd.data.synth import generate
from distkd.eval_stats import t_interval
from distkd.models.ranking import RankingModel
from distkd.objectives.ctr_kd import CtrKDTrain
from distkd.objectives.losses import masked_bce, soft_bce
from distkd.objectives.staleness import Adapter, AdapterConfig
from tests.support import job_for, train
from tests.test_ensemble import CPU, TINY, kd, tiny_batch

HALF_LIFE = 3.0


def _module(seed=0, **cfg):
    schema, batch = tiny_batch(seed=seed)
    torch.manual_seed(0)
    model = RankingModel(schema, TINY, device=CPU, sparse_device=CPU)
    return model, CtrKDTrain(model, kd({"cache": "a"}, temperature=2.0, **cfg), [1.0, 0.5], [None]), batch


def _student_grad(model, loss) -> torch.Tensor:
    """d loss / d the student's logits, through the head: the head's bias gradient [T]."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return model.head.bias.grad.clone()


@pytest.mark.unit
def test_age_weighting_scales_each_rows_distillation_gradient():
    model, tm, batch = _module(age_weighting={"half_life_days": HALF_LIFE}, losses={"hard": 0.0, "soft": 1.0})
    n = len(batch)
    age = torch.tensor([0.0, -2.0, 3.0, 6.0] * (n // 4))  # -2: a day the teacher trained on (weight 1)
    batch.extras["teacher0.age"] = age
    out = tm(batch)
    logits = model(batch.sparse, batch.dense).logits
    weight = torch.tensor([1.0, 1.0, 0.5, 0.25] * (n // 4))
    w = torch.tensor([1.0, 0.5])
    per_row = torch.nn.functional.binary_cross_entropy_with_logits(
        logits / 2.0, torch.sigmoid(batch.extras["teacher0.logits"] / 2.0), reduction="none") * 4.0
    want = ((per_row * weight[:, None]).mean(0) * w).sum()  # divided by the row count, not the weights' sum
    torch.testing.assert_close(out.parts["soft"], want.detach())
    # the gradient of each row's logit: weight x tau (sigmoid(s/tau) - sigmoid(t/tau)) / n, exactly
    s = logits.detach().requires_grad_(True)
    (soft_bce(s, batch.extras["teacher0.logits"], 2.0, None, weight) * w).sum().backward()
    unweighted = 2.0 * (torch.sigmoid(s / 2.0) - torch.sigmoid(batch.extras["teacher0.logits"] / 2.0)) / n * w
    torch.testing.assert_close(s.grad, (unweighted * weight[:, None]).detach())


@pytest.mark.unit
def test_an_infinitely_old_teacher_gives_no_distillation_gradient_and_the_hard_term_is_unweighted():
    model, tm, batch = _module(age_weighting={"half_life_days": HALF_LIFE}, losses={"hard": 1.0, "soft": 1.0})
    batch.extras["teacher0.age"] = torch.full((len(batch),), math.inf)
    out = tm(batch)
    assert out.parts["soft"] == 0
    # all of the gradient is the hard term's, which age weighting never touches
    hard = _student_grad(model, hard_term(model, tm, batch))
    assert hard.abs().sum() > 0 and torch.equal(_student_grad(model, tm(batch).loss), hard)
    # fresh rows (age 0) distill exactly as without age weighting
    batch.extras["teacher0.age"] = torch.zeros(len(batch))
    _, plain, _ = _module(losses={"hard": 1.0, "soft": 1.0})
    torch.testing.assert_close(tm(batch).parts["soft"], plain(batch).parts["soft"])


def hard_term(model, tm, batch) -> torch.Tensor:
    """The hard term as the objective computes it (graph attached)."""
    return (masked_bce(model(batch.sparse, batch.dense).logits, batch.labels) * tm.w).sum()


def adapter_term(tm, batch) -> torch.Tensor:
    """The adapter's term as the objective computes it (graph attached)."""
    corrected = tm.adapter(batch.extras["teacher0.logits"], batch.extras["teacher0.age"])
    return tm.cfg.adapter.weight * (masked_bce(corrected, batch.labels) * tm.w).sum()


@pytest.mark.unit
@pytest.mark.parametrize("kind,age", [("affine", False), ("affine", True), ("mlp", True)])
def test_the_adapter_starts_as_the_identity_and_learns_from_the_labels_only(kind, age):
    model, tm, batch = _module(adapter={"form": kind, "age": age, "weight": 2.0}, losses={"hard": 1.0, "soft": 1.0})
    batch.extras["teacher0.age"] = torch.arange(len(batch), dtype=torch.float32) % 5
    z = batch.extras["teacher0.logits"]
    torch.testing.assert_close(tm.adapter(z, batch.extras["teacher0.age"]), z)
    out = tm(batch)
    assert set(out.parts) == {"adapter", "hard", "soft"}
    torch.testing.assert_close(out.parts["adapter"], adapter_term(tm, batch).detach())
    # the adapter's gradient from the whole loss is its own term's: the student's terms read it detached
    tm.zero_grad(set_to_none=True)
    out.loss.backward()
    whole = [p.grad.clone() for p in tm.adapter.parameters()]
    tm.zero_grad(set_to_none=True)
    adapter_term(tm, batch).backward()
    for a, b in zip(whole, (p.grad for p in tm.adapter.parameters())):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in model.parameters())  # and its own term reaches no student parameter
    # (the mlp's first layer learns once its last, started at 0, is not)
    learns = list(tm.adapter.parameters()) if kind == "affine" else [tm.adapter.w2, tm.adapter.b2]
    assert all(p.grad.abs().sum() > 0 for p in learns)


@pytest.mark.unit
def test_the_affine_adapters_gradient_is_the_bce_gradient_in_closed_form():
    cfg = AdapterConfig(form="affine", age=True, weight=1.0)
    adapter = Adapter(cfg, 2, CPU).double()
    g = torch.Generator().manual_seed(3)
    z, age = torch.randn(40, 2, generator=g, dtype=torch.float64), torch.randint(0, 15, (40,), generator=g).double()
    y = torch.randint(0, 2, (40, 2), generator=g).double()
    y[::3, 0] = float("nan")
    with torch.no_grad():
        adapter.coef.copy_(torch.tensor([[0.8, 0.1], [1.2, -0.3]]))
        adapter.bias.copy_(torch.tensor([0.2, -0.1]))
    masked_bce(adapter(z, age), y).sum().backward()
    x = torch.stack([z, (age / 7.0)[:, None].expand_as(z)], -1)
    zc = (x * adapter.coef.detach()).sum(-1) + adapter.bias.detach()
    m = ~torch.isnan(y)
    r = torch.where(m, torch.sigmoid(zc) - torch.nan_to_num(y), 0.0) / m.sum(0)  # d BCE / d z'
    torch.testing.assert_close(adapter.bias.grad, r.sum(0))
    torch.testing.assert_close(adapter.coef.grad, (r[..., None] * x).sum(0))


@pytest.mark.unit
def test_the_options_are_checked():
    with pytest.raises(ConfigError, match="exactly one teacher"):
        kd({"cache": "a"}, {"cache": "b"}, age_weighting={"half_life_days": 7})
    with pytest.raises(ConfigError, match="half_life_days must be positive"):
        kd({"cache": "a"}, age_weighting={"half_life_days": 0})
    with pytest.raises(ConfigError, match="from its cache"):
        kd({"export": "x"}, adapter={"age": True})
    kd({"export": "x"}, adapter={"form": "mlp"})  # no age: an online teacher will do


@pytest.mark.unit
def test_partition_and_window_round_trip_and_old_manifests_lack_them(tmp_path):
    doc = json.loads((Path(__file__).parent / "cache_manifests" / "ctr-hidden.json").read_text())
    m = Manifest.from_json(doc, "old")
    assert m.teacher.window is None and all(e.partition is None for e in m.shards.values())
    doc["teacher"]["window"] = {"key": "dt", "start": "2026-11-01", "end": "2026-11-02"}
    rel = next(iter(doc["shards"]))
    doc["shards"][rel]["partition"] = {"dt": "2026-11-05"}
    m = Manifest.from_json(doc, "new")
    assert m.shards[rel].partition == {"dt": "2026-11-05"} and m.teacher.window["end"] == "2026-11-02"
    assert json.loads(m.to_json()) == doc
    doc["shards"][rel]["partition"] = "2026-11-05"
    with pytest.raises(CacheError, match=r"partition' is '2026-11-05', expected an object"):
        Manifest.from_json(doc, "bad")


@pytest.mark.integration
def test_a_teacher_trained_on_days_records_its_window_and_the_student_reads_its_age(tmp_path):
    logs = tmp_path / "logs"
    generate(logs, rows=6_000, shards=1, seed=0, row_group_rows=1024, preset="small", days=4, start="2026-11-01",
             drift=0.1)
    days = {"train": PartitionRange("dt", "2026-11-01", "2026-11-02"), "valid": PartitionRange("dt", "2026-11-03", "2026-11-03"),
            "test": PartitionRange("dt", "2026-11-03", "2026-11-03")}
    assert window_of(str(logs), "train", days) == {"key": "dt", "start": "2026-11-01", "end": "2026-11-02"}
    teacher = job_for(logs, tmp_path / "teacher", "role=teacher", "train.max_steps=3")
    teacher.partitions = days
    train(teacher, 1)
    cache = tmp_path / "cache"
    build(CacheJob(teacher=str(tmp_path / "teacher" / "export"), logs=str(logs), out=str(cache), workers=1,
                   batch_size=1024, partitions={"all": PartitionRange("dt")}, splits=["all"]))
    m = read_manifest(cache)
    assert m.teacher.window == {"key": "dt", "start": "2026-11-01", "end": "2026-11-02"}
    assert sorted(e.partition["dt"] for e in m.shards.values()) == [f"2026-11-0{d}" for d in range(1, 5)]
    s = status(str(cache), str(logs))
    assert {k: g["age"] for k, g in s["groups"].items()} == {f"dt=2026-11-0{d}": d - 2 for d in range(1, 5)}
    assert "teacher age (days)" in format_status(s) and "trained on dt 2026-11-01 .. 2026-11-02" in format_status(s)
    # the student's window: days 3 and 4, the teacher 1 and 2 days old on them, per row
    student_days = {"train": PartitionRange("dt", "2026-11-03", "2026-11-04")}
    view = open_cache(cache, logs, "train", partitions=student_days, age=True, name="teacher0")
    files = split_files(str(logs), "train", student_days)
    for f, want in zip(files, (1.0, 2.0)):
        for batch in LogLoader([f], load_schema(logs), 700, aligned=[view], prefetch=0):
            assert torch.equal(batch.extras["teacher0.age"], torch.full((len(batch),), want))
    # a shard committed before partitions were recorded: its age is unknown, and said so
    rel = next(iter(m.shards))
    m.shards[rel] = dataclasses.replace(m.shards[rel], partition=None)
    with pytest.raises(CacheError, match=f"shard {rel} records no partition dt="):
        ages(m, list(m.shards), str(cache))
    # a student with both options trains through the real trainer, and the adapter is not exported
    student = job_for(logs, tmp_path / "student", "role=student", "train.max_steps=4", "model.embedding_dim=8",
                      "model.deep_arch=[16,8]", "model.dense_arch=[8]", "model.cross_layers=0")
    student.partitions = {**days, "train": student_days["train"]}
    student.objective = kd({"cache": str(cache)}, age_weighting={"half_life_days": 7}, adapter={"age": True})
    s = train(student, 1)
    assert math.isfinite(s["loss"]["last"]["adapter"])
    exported = torch.load(tmp_path / "student" / "export" / "model.pt", weights_only=True)
    assert not any("adapter" in k for k in exported["state_dict"])


@pytest.mark.unit
def test_the_bench_table_pairs_each_student_with_the_same_seeds_hard_and_kd():
    hard, kd = [0.60, 0.62, 0.61], [0.61, 0.64, 0.615]
    result = {"teachers": {"7": {"auc": 0.65}},
              "students": {"hard": hard, "KD@7": kd, "KD+age@7": [0.62, 0.65, 0.63], "KD+adapter@7": kd}}
    rows = {line.split(" | ")[2]: line for line in table(result).splitlines()[2:]}
    want = t_interval([a - b for a, b in zip(kd, hard)])
    assert f"| {want['mean']:+.4f} [{want['low']:+.4f}, {want['high']:+.4f}] | – |" in rows["KD"]
    age = t_interval([0.01, 0.01, 0.015])
    assert rows["KD+age"].endswith(f"| {age['mean']:+.4f} [{age['low']:+.4f}, {age['high']:+.4f}] |")
    assert rows["KD+adapter"].endswith("| +0.0000 [+0.0000, +0.0000] |")
