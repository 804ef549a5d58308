"""Teacher ensembles: N teachers cached as one combined target, and learned per-example gating.

The combined cache records every member's fingerprint, its identity depends on all of them (one
changed member: the build refuses the old cache), and `cache verify --recompute` runs the
ensemble again. Gating: a gate on the student's hidden layer weighs the teachers per example;
its gradient reaches the gate, and the fixed weights compute what they always did.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from distkd.cache import CacheError, open_cache, read_manifest
from distkd.cache.build import CacheJob, build
from distkd.cache.verify import verify_cache
from distkd.config import ConfigError, from_dict, load
from distkd.data.batch import Batch
from distkd.data.layout import split_files
from distkd.data.loader import LogLoader
from distkd.data.roles import view
from distkd.data.schema import DenseFeature, Schema, SparseFeature, Task, load_schema
from distkd.data.synth import generate
from distkd.models.ensemble import fingerprint
from distkd.models.export import write_export
from distkd.models.ranking import ModelConfig, RankingModel
from distkd.models.teacher import load_teacher
from distkd.models.teacher_spec import EnsembleSpec, TeacherSpec
from distkd.objectives.ctr_kd import CtrKDConfig, CtrKDTrain
from distkd.objectives.losses import masked_bce, soft_bce
from tests.support import job_for, train
from tests.test_privileged import PRIVILEGED, with_roles

TINY = ModelConfig(embedding_dim=8, dense_arch=[8], cross_layers=0, deep_arch=[16, 8])
CPU = torch.device("cpu")


def teacher_export(out, schema: Schema, seed: int, cfg: ModelConfig = TINY) -> str:
    torch.manual_seed(seed)
    model = RankingModel(schema, cfg, device=CPU, sparse_device=CPU)
    return write_export(out, "teacher", schema, cfg, model.state_dict())["sha256"]


def kd(*teachers: dict, **kw) -> CtrKDConfig:
    return from_dict(CtrKDConfig, {"kind": "ctr_kd", "teachers": list(teachers), **kw}, "objective")


def tiny_batch(n: int = 32, seed: int = 0) -> tuple[Schema, Batch]:
    schema = Schema(sparse=[SparseFeature("a", num_embeddings=10), SparseFeature("b", num_embeddings=7)],
                    dense=[DenseFeature("x")], tasks=[Task("click", "clicked"), Task("buy", "bought")])
    g = torch.Generator().manual_seed(seed)
    kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.cat([torch.randint(0, 10, (n,), generator=g),
                                                                     torch.randint(0, 7, (n,), generator=g)]),
                                              torch.ones(2 * n, dtype=torch.int32))
    labels = torch.randint(0, 2, (n, 2), generator=g).float()
    labels[::5, 1] = float("nan")  # some rows unlabeled
    extras = {f"teacher{i}.logits": 2 * torch.randn(n, 2, generator=g) for i in range(2)}
    return schema, Batch(kjt, torch.randn(n, 1, generator=g), labels, torch.arange(n), None, extras)


@pytest.mark.unit
def test_learned_gating_trains_the_gate():
    schema, batch = tiny_batch()
    torch.manual_seed(0)
    model = RankingModel(schema, TINY, device=CPU, sparse_device=CPU)
    train_module = CtrKDTrain(model, kd({"cache": "a"}, {"cache": "b", "weight": 3.0}, gating="learned",
                                         temperature=2.0), [1.0, 1.0], [None, None])
    h = model(batch.sparse, batch.dense).hidden
    assert torch.allclose(train_module.gate.weights(h), torch.tensor([0.25, 0.75]).expand(len(batch), 2))
    out = train_module(batch)
    assert set(out.parts) == {"gate", "hard", "soft"}
    out.loss.backward()
    for p in train_module.gate.parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # the gate reads the hidden layer detached: its own loss never reaches the student
    model.zero_grad(set_to_none=True)
    zs = torch.stack([batch.extras["teacher0.logits"], batch.extras["teacher1.logits"]], -1)
    train_module.gate(model(batch.sparse, batch.dense).hidden, zs).sum().backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.unit
def test_fixed_weights_are_what_they_were():
    schema, batch = tiny_batch(seed=1)
    torch.manual_seed(0)
    model = RankingModel(schema, TINY, device=CPU, sparse_device=CPU)
    train_module = CtrKDTrain(model, kd({"cache": "a"}, {"cache": "b", "weight": 3.0}, temperature=2.0),
                              [1.0, 0.5], [None, None])
    assert train_module.gate is None
    assert {n for n, _ in train_module.named_parameters()} == {f"model.{n}" for n, _ in model.named_parameters()}
    out = train_module(batch)
    logits, w = model(batch.sparse, batch.dense).logits, torch.tensor([1.0, 0.5])
    target = 0.25 * batch.extras["teacher0.logits"] + 0.75 * batch.extras["teacher1.logits"]
    assert torch.equal(out.parts["hard"], (masked_bce(logits, batch.labels) * w).sum().detach())
    assert torch.allclose(out.parts["soft"], (soft_bce(logits, target, 2.0) * w).sum(), rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match="gating: learned needs 2 or more teachers"):
        kd({"cache": "a"}, gating="learned").validate()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Logs with teacher-only C3 and I2; teachers 0 and 1 read every feature (1 a wider model),
    teacher 2 only C1, C2 and I1 (a view); teacher 0' is teacher 0 changed (another seed)."""
    root = tmp_path_factory.mktemp("ensemble")
    logs = root / "logs"
    generate(logs, rows=4_000, shards=2, seed=0, row_group_rows=1024, preset="small")
    with_roles(load_schema(logs), PRIVILEGED).save(logs / "schema.yaml")
    schema = load_schema(logs)
    wide = ModelConfig(embedding_dim=12, dense_arch=[8], cross_layers=1, cross_rank=4, deep_arch=[24, 8])
    t = {"t0": teacher_export(root / "t0", schema, 0), "t1": teacher_export(root / "t1", schema, 1, wide),
         "t2": teacher_export(root / "t2", view(schema, ["C1", "C2", "I1"]), 2),
         "t0b": teacher_export(root / "t0b", schema, 7)}
    return root, logs, schema, t


@pytest.mark.unit
def test_an_ensemble_is_one_teacher(world):
    root, logs, schema, t = world
    members = [TeacherSpec(export=str(root / n)) for n in ("t0", "t1", "t2")]
    batch = next(iter(LogLoader(split_files(logs, "valid"), schema, 300, prefetch=0)))
    # teacher 2 reads its view only (its own loader's batch); the ensemble, given the whole batch,
    # hands it its own features
    own = next(iter(LogLoader(split_files(logs, "valid"), view(schema, ["C1", "C2", "I1"]), 300, prefetch=0)))
    each = [load_teacher(m, schema)(b.sparse, b.dense).logits for m, b in zip(members, (batch, batch, own))]
    z = torch.stack(each)
    mean_logit = load_teacher(EnsembleSpec(members, "mean_logit"), schema)
    assert torch.allclose(mean_logit(batch.sparse, batch.dense).logits, z.mean(0), atol=1e-6)
    mean_prob = load_teacher(EnsembleSpec(members, "mean_prob"), schema)
    p = torch.sigmoid(z).mean(0)
    assert torch.allclose(mean_prob(batch.sparse, batch.dense).logits, torch.log(p / (1 - p)), atol=1e-5)
    assert mean_logit.sha256 == fingerprint("mean_logit", [m.sha256 for m in map(lambda s: load_teacher(s, schema),
                                                                                    members)])
    assert len({mean_logit.sha256, mean_prob.sha256,
                load_teacher(EnsembleSpec(members[::-1], "mean_logit"), schema).sha256,
                load_teacher(EnsembleSpec([TeacherSpec(export=str(root / "t0b")), *members[1:]]), schema).sha256}) == 4
    with pytest.raises(ConfigError, match="at least 2 teachers"):
        load(CacheJob, None, ["teachers=[a]"])
    with pytest.raises(ConfigError, match="not both"):
        load(CacheJob, None, ["teachers=[a,b]", "teacher=c"])


@pytest.mark.integration
def test_a_combined_cache_records_and_depends_on_every_teacher(world, tmp_path):
    root, logs, schema, t = world
    out = tmp_path / "cache"
    job = CacheJob(teachers=[str(root / n) for n in ("t0", "t1", "t2")], combine="mean_prob", logs=str(logs),
                   out=str(out), splits=["train"], workers=1, batch_size=512)
    build(job)
    m = read_manifest(out)
    assert m.teacher.record["form"] == "ensemble" and m.teacher.record["combine"] == "mean_prob"
    assert [x["sha256"] for x in m.teacher.record["members"]] == [t["t0"], t["t1"], t["t2"]]
    assert m.teacher.sha256 == fingerprint("mean_prob", [t["t0"], t["t1"], t["t2"]])
    # the cached target is the ensemble's, computed with the teacher-only features
    ens = load_teacher(job.spec(), schema)
    view = open_cache(out, logs, "train")
    for batch in LogLoader(split_files(logs, "train"), schema, 1024, aligned=[view], prefetch=0):
        want = ens(batch.sparse, batch.dense).logits.half().float()
        assert torch.allclose(batch.extras["teacher.logits"], want, atol=2e-3)
    assert verify_cache(out, logs, recompute=1.0)["recompute"]["max_ulp"] == 0
    # one changed member: another teacher, refused (never blended into the old cache)
    job.teachers[0] = str(root / "t0b")
    with pytest.raises(CacheError, match="holds logits of teacher"):
        build(job)
    # learned gating over several caches read together: the gate trains, the export has no gate
    student = job_for(logs, tmp_path / "student", "role=student", "train.max_steps=4", "model.embedding_dim=8",
                      "model.deep_arch=[16,8]", "model.dense_arch=[8]", "model.cross_layers=0")
    student.objective = kd({"cache": str(out)}, {"cache": str(out), "weight": 2.0}, gating="learned")
    s = train(student, 1)
    assert np.isfinite(s["loss"]["last"]["gate"])
    exported = torch.load(tmp_path / "student" / "export" / "model.pt", weights_only=True)
    assert not any("gate" in k for k in exported["state_dict"])
    assert not set(PRIVILEGED) & {f["name"] for f in exported["schema"]["sparse"] + exported["schema"]["dense"]}
