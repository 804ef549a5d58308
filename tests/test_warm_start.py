"""Warm start (`init:`): a new run whose weights start from an export or a checkpoint.

The source is a student trained 4 steps on 2 ranks over logs whose schema leaves out C1. A
new run's state at step 0 (read through `Trainer.start`, what `train` runs first) equals the
source's, tensor for tensor: from its file export on 2 ranks, from its checkpoint on 1 rank
(resharded 2 -> 1), with the optimizer state too. Over logs whose schema adds C1, drops C6 and
grows C4, the job is refused naming them (exit 2), or with `schema_change: adapt` starts from
the kept tables, C4's first 400 rows and the interaction layers mapped by feature, and trains.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from distkd import dist
from distkd.config import ConfigError
from distkd.data.schema import load_schema
from distkd.dcp_reader import SafeReader
from distkd.launch.local import launch
from distkd.models.export import gather_state_dict
from distkd.train.checkpoint import latest, optimizer_tensors
from distkd.train.init import InitConfig, plan_init
from distkd.train.prepare import prepare
from tests.support import SMALL_MODEL, cli, distkd_log, job_for, train


def _logs_with(small_logs: Path, out: Path, drop: tuple[str, ...] = (), rows: dict[str, int] | None = None) -> Path:
    """`small_logs`' shards under a schema that leaves out `drop` and resizes `rows`."""
    schema = load_schema(small_logs)
    sparse = [dataclasses.replace(f, num_embeddings=(rows or {}).get(f.name, f.num_embeddings))
              for f in schema.sparse if f.name not in drop]
    out.mkdir(parents=True)
    dataclasses.replace(schema, sparse=sparse).save(out / "schema.yaml")
    for split in ("train", "valid", "test"):
        (out / split).symlink_to(small_logs / split)
    return out


@pytest.fixture(scope="module")
def source(small_logs, tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    logs = _logs_with(small_logs, root / "logs", drop=("C1",))
    run = root / "run"
    train(job_for(logs, run, "role=student", "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=4"), 2)
    return {"logs": logs, "run": run, "export": run / "export", "root": root,
            "weights": torch.load(run / "export" / "model.pt", weights_only=True)["state_dict"]}


def _full(t) -> torch.Tensor:
    """One rank's tensor, whole: on one rank a ShardedTensor has a single shard."""
    shards = t.local_shards() if hasattr(t, "local_shards") else None
    return (shards[0].tensor if shards is not None else t).detach().clone()


def _started(prepared, optimizer: bool = False, then_train: bool = False) -> dict:
    """Rank worker: a trainer of the job, started (`init:` loaded) but before any step: its
    step, its weights gathered to rank 0, its optimizer state (one rank), then optionally trained."""
    from distkd.train.trainer import Trainer

    env = dist.init()
    trainer = Trainer(prepared.job, prepared.schema, prepared.objective, env)
    trainer.start()
    out = {"step": trainer.state.step, "weights": gather_state_dict(trainer.dmp, env.rank, prefix="model.")}
    if optimizer:
        out["optim"] = {k: _full(v) for k, v in optimizer_tensors(trainer.optimizer).items()}
    if then_train:
        out["summary"] = trainer.train()
    dist.shutdown()
    return out


def _assert_equal(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    unequal = [k for k in want if not torch.equal(got[k], want[k])]
    assert not unequal, f"{what}: {unequal}"


@pytest.mark.integration
@pytest.mark.slow
def test_a_file_export_starts_a_new_run_at_its_weights(source, tmp_path):
    job = job_for(source["logs"], tmp_path / "new", f"init.path={source['export']}")
    started = launch(_started, 2, prepare(job))[0]
    assert started["step"] == 0
    _assert_equal(started["weights"], source["weights"], "2 ranks from the file export")


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole, read on this process alone (the reference)."""
    meta = SafeReader(path).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in meta.items() if hasattr(v, "size")}
    dcp.load(tensors, storage_reader=SafeReader(path), no_dist=True)
    return tensors


@pytest.mark.integration
@pytest.mark.parametrize("optimizer", [False, True])
def test_a_checkpoint_written_by_two_ranks_starts_one_rank(source, tmp_path, optimizer):
    """The run directory names its latest committed checkpoint (step 4, 2 ranks); one rank
    loads it at step 0, and with init.optimizer its Adagrad accumulators and Adam moments."""
    job = job_for(source["logs"], tmp_path / "new", f"init.path={source['run']}", f"init.optimizer={str(optimizer).lower()}")
    with distkd_log() as lines:
        started = launch(_started, 1, prepare(job), optimizer)[0]
    step = latest(source["run"] / "checkpoints")
    assert step.name == "step-00000004" and json.loads((step / "COMMITTED").read_text())["world_size"] == 2
    assert any(f"init: weights from {step} (checkpoint at step 4, written by 2 rank(s))" in line for line in lines), lines
    assert started["step"] == 0
    _assert_equal(started["weights"], source["weights"], "1 rank from the 2-rank checkpoint")
    saved = {k[len("optim."):]: v for k, v in _checkpoint_tensors(step).items() if k.startswith("optim.")}
    if optimizer:
        _assert_equal(started["optim"], saved, "optimizer state")


@pytest.mark.integration
def test_an_added_removed_or_resized_feature_is_refused_naming_it(source, small_logs, tmp_path):
    logs = _logs_with(small_logs, tmp_path / "logs", drop=("C6",), rows={"C4": 600})
    r = cli("student", "train", "--nproc", "1", f"logs={logs}", f"out={tmp_path / 'new'}", "tensorboard=false",
            "train.batch_size=512", *SMALL_MODEL, f"init.path={source['export']}")
    assert r.returncode == 2, r.stderr[-3000:]
    for change in ("sparse feature 'C1' added (20 rows)", "sparse feature 'C6' removed (200 rows)",
                   "sparse feature 'C4' resized 400 -> 600 rows", "init.schema_change: adapt"):
        assert change in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "new" / "checkpoints").exists()


@pytest.mark.integration
def test_adapt_keeps_what_the_weights_can_follow_and_trains(source, small_logs, tmp_path):
    logs = _logs_with(small_logs, tmp_path / "logs", drop=("C6",), rows={"C4": 600})
    job = job_for(logs, tmp_path / "new", f"init.path={source['run']}", "init.schema_change=adapt",
                  "train.max_steps=2", "init.optimizer=true")
    with distkd_log() as lines:
        started = launch(_started, 1, prepare(job), False, True)[0]
    for note in ("init: sparse feature 'C1' added (20 rows): its table keeps its fresh initialisation",
                 "init: sparse feature 'C6' removed (200 rows): its table is dropped",
                 "init: sparse feature 'C4' resized 400 -> 600 rows: the first 400 rows copied, the rest freshly",
                 "init: model.deep._mlp.0._linear.weight: the interaction's columns mapped by feature: 26 kept, 5 new"):
        assert any(line.startswith(note) for line in lines), (note, lines)
    got, src = started["weights"], source["weights"]
    table = "ebc.embedding_bags.t_{}.weight".format
    for f in ("C2", "C3", "C5"):
        assert torch.equal(got[table(f)], src[table(f)]), f
    assert table("C6") not in got and got[table("C1")].shape == (20, 16) and got[table("C4")].shape == (600, 16)
    assert torch.equal(got[table("C4")][:400], src[table("C4")])
    assert not torch.equal(got[table("C4")][400:], torch.zeros(200, 16))  # freshly initialised, not left empty
    for k in ("dense_arch._mlp.0._linear.weight", "deep._mlp.1._linear.weight", "head.bias"):
        assert torch.equal(got[k], src[k]), k
    # The cross layer and the first deep layer read the interaction: <dense> 16 + the pairs of 6
    # vectors, before and after (C1 in, C6 out). The dense part and the kept features' pairs are
    # the source's, C1's pairs zero.
    vectors, old = ["<dense>", "C1", "C2", "C3", "C4", "C5"], ["<dense>", "C2", "C3", "C4", "C5", "C6"]
    pairs = [(a, b) for i, a in enumerate(vectors) for b in vectors[i + 1:]]
    old_pairs = [(a, b) for i, a in enumerate(old) for b in old[i + 1:]]
    readers = {"deep._mlp.0._linear.weight": 1, "cross.V_kernels.0": 1, "cross.W_kernels.0": 0, "cross.bias.0": 0}
    for key, dim in readers.items():
        w, w_src = got[key].movedim(dim, 0), src[key].movedim(dim, 0)
        assert w.shape == w_src.shape and w.shape[0] == 16 + 15, key
        assert torch.equal(w[:16], w_src[:16]), key
        for j, pair in enumerate(pairs):
            want = torch.zeros_like(w[0]) if "C1" in pair else w_src[16 + old_pairs.index(pair)]
            assert torch.equal(w[16 + j], want), (key, pair)
    s = started["summary"]
    assert s["steps"] == 2 and s["test"]["click"]["rows"] > 0


@pytest.mark.integration
def test_what_adapt_cannot_follow_is_refused_naming_it(source, small_logs):
    schema = load_schema(source["logs"])
    model = job_for(source["logs"], Path("unused")).model
    adapt = InitConfig(path=str(source["export"]), schema_change="adapt")
    no_i4 = dataclasses.replace(schema, dense=[f for f in schema.dense if f.name != "I4"])
    with pytest.raises(ConfigError, match="dense feature 'I4' removed: the dense layers' input follows them"):
        plan_init(adapt, no_i4, model)
    with pytest.raises(ConfigError, match=r"init.optimizer: true needs a checkpoint .* an export holds no optimizer"):
        plan_init(InitConfig(path=str(source["export"]), optimizer=True), schema, model)
    with pytest.raises(ConfigError, match=r"the model differs \(model.embedding_dim: 16 -> 8\)"):
        plan_init(adapt, schema, dataclasses.replace(model, embedding_dim=8))
    with pytest.raises(ConfigError, match="neither an export"):
        plan_init(InitConfig(path=str(source["root"] / "logs")), schema, model)
    plan = plan_init(InitConfig(path=str(source["export"])), schema, model)
    assert not plan.notes and not plan.rows and not plan.columns and len(plan.copy) == len(source["weights"])
