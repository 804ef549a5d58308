"""The sharded teacher export: written by 2 real ranks (DCP, never gathered), loaded on one
process into an unsharded model and into 1- and 3-rank DistributedModelParallel plans, each
tensor equal to the gathered one; a tampered shard and a crafted metadata pickle refused."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from distkd import dist
from distkd.config import ConfigError
from distkd.data.loader import LogLoader, split_files
from distkd.launch.local import launch
from distkd.models.export import ExportConfig, export_form, gather_state_dict, load_export, verify_export, write_export
from distkd.models.sharded_export import fingerprint
from distkd.models.teacher import describe
from distkd.models.teacher_spec import TeacherError, TeacherSpec
from distkd.train.prepare import prepare
from tests.support import job_for


def _train_and_gather(prepared, gathered: Path) -> dict:
    """Rank worker: train (the trainer writes the sharded export), then gather the same
    model to rank 0 the old way and write it as a file export: the reference."""
    from distkd.train.trainer import Trainer

    env = dist.init()
    trainer = Trainer(prepared.job, prepared.schema, prepared.objective, env)
    summary = trainer.train()
    full = gather_state_dict(trainer.dmp, env.rank, prefix="model.")
    if env.is_main:
        write_export(gathered, "teacher", prepared.schema, trainer.model_cfg, full)
    dist.shutdown()
    return summary


def _test_batches(logs: Path, schema, rank: int = 0, world_size: int = 1, n: int = 2):
    loader = LogLoader(split_files(logs, "test"), schema, 300, rank=rank, world_size=world_size)
    return [b for _, b in zip(range(n), loader)]


@pytest.fixture(scope="module")
def teacher(small_logs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    job = job_for(small_logs, root / "run", "train.max_steps=4", "train.eval_every=4", "export.format=sharded")
    gathered = root / "gathered"
    summary = launch(_train_and_gather, 2, prepare(job), gathered)[0]
    full = torch.load(gathered / "model.pt", weights_only=True)["state_dict"]
    return {"export": root / "run" / "export", "summary": summary, "gathered": gathered, "full": full,
            "logs": small_logs, "schema": prepare(job).schema}


@pytest.mark.integration
@pytest.mark.slow
def test_two_ranks_write_shards_and_one_process_loads_them_unsharded(teacher):
    export = teacher["export"]
    meta = json.loads((export / "export.json").read_text())
    assert meta["form"] == "sharded" and meta["world_size"] == 2 and teacher["summary"]["export"]["sha256"] == meta["sha256"]
    names = sorted(str(p.relative_to(export)) for p in export.rglob("*") if p.is_file())
    assert names[:3] == ["dense.pt", "export.json", "tables/.metadata"]
    shards = names[3:]  # one file per table shard (distkd.dcp_writer), from both ranks
    assert all(re.fullmatch(r"tables/__[01]_\d+_0\.distcp", n) for n in shards), shards
    assert {n.split("_")[2] for n in shards} == {"0", "1"}
    assert sorted(meta["files"]) == [n for n in names if n != "export.json"]
    assert not list(export.parent.glob(".export*"))  # the partial folder was renamed, nothing left
    assert verify_export(export) == meta["sha256"] == fingerprint(meta)
    # dense.pt holds no table: the tables were never gathered
    dense = torch.load(export / "dense.pt", weights_only=True)["state_dict"]
    assert dense and not any(".embedding_bags." in k for k in dense)

    model, _ = load_export(export)
    full = teacher["full"]
    state = model.state_dict()
    assert sorted(state) == sorted(full)
    for key, value in full.items():
        assert torch.equal(state[key], value), key
    # the same forward as the gathered model's
    from distkd.models import build_model

    gathered = build_model(model.schema, model.cfg, device=torch.device("cpu"), sparse_device=torch.device("cpu"))
    gathered.load_state_dict(full)
    gathered.eval()
    with torch.no_grad():
        for batch in _test_batches(teacher["logs"], teacher["schema"]):
            assert torch.equal(model(batch.sparse, batch.dense).logits, gathered(batch.sparse, batch.dense).logits)


def _load_on_ranks(export: Path, gathered: Path, types: str, logs: Path, schema) -> dict:
    """Rank worker: the sharded export into this world's DMP plan. Every tensor against the
    gathered one (rank 0); this rank's eval forward over its share of the test rows against
    the unsharded model's, and against the gathered file export loaded under the same plan."""
    from torchrec.distributed.model_parallel import DistributedModelParallel

    from distkd.models.sharding_plan import ShardingConfig, describe_plan, plan_for

    env = dist.init()

    def parallel(model):
        return DistributedModelParallel(model, device=env.device, plan=plan_for(model, env, ShardingConfig(types)))

    dmp, _ = load_export(export, parallel=parallel)
    same_plan, _ = load_export(gathered, parallel=parallel)  # the file form, sliced into the same plan
    full = gather_state_dict(dmp, env.rank)
    unequal = []
    if env.is_main:
        ref = torch.load(gathered / "model.pt", weights_only=True)["state_dict"]
        unequal = [k for k in ref if k not in full or not torch.equal(full[k], ref[k])] + sorted(set(full) - set(ref))
    model, _ = load_export(export)  # unsharded, on this process alone
    diffs, same = [], []
    with torch.no_grad():
        for batch in _test_batches(logs, schema, env.rank, env.world_size):
            logits = dmp(batch.sparse, batch.dense).logits
            diffs.append((logits - model(batch.sparse, batch.dense).logits).abs().max().item())
            same.append(torch.equal(logits, same_plan(batch.sparse, batch.dense).logits))
    plan = describe_plan(dmp)
    dist.shutdown()
    return {"unequal": unequal, "diffs": diffs, "same": same, "plan": plan}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("world, types", [(1, "auto"), (3, "table_wise")])
def test_loads_into_a_distributed_model_parallel_of_any_world_size(teacher, world, types):
    results = launch(_load_on_ranks, world, teacher["export"], teacher["gathered"], types, teacher["logs"],
                     teacher["schema"])
    assert results[0]["unequal"] == []  # every tensor, gathered back from this plan's shards
    for r in results:
        # Against the unsharded model: the weights are equal bit for bit, the pooling is not the
        # same kernel (TorchRec's fused TBE sharded, nn.EmbeddingBag unsharded): float rounding.
        assert r["diffs"] and max(r["diffs"]) < 1e-5, r
        assert r["same"] and all(r["same"]), r  # the gathered model under the same plan: bit for bit
    if world == 3:  # really resharded: tables on every one of the 3 ranks
        assert {spec for spec in results[0]["plan"].values()} >= {"table_wise[0]", "table_wise[1]", "table_wise[2]"}


@pytest.mark.integration
def test_a_tampered_shard_is_refused_naming_the_file(teacher, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(teacher["export"], export)
    shard = export / "tables" / "__1_0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="tables/__1_0_0.distcp has sha256 .*export.json says"):
        verify_export(export)
    with pytest.raises(ConfigError, match="tables/__1_0_0.distcp has sha256"):
        load_export(export)
    with pytest.raises(TeacherError, match="tables/__1_0_0.distcp has sha256"):  # the cache build's check
        describe(TeacherSpec(export=str(export)))
    shutil.copy(teacher["export"] / "tables" / "__1_0_0.distcp", shard)  # restored; now a file not listed
    (export / "tables" / "__2_0_0.distcp").write_bytes(b"extra")
    with pytest.raises(ConfigError, match=r"tables/__2_0_0.distcp: not listed in export.json"):
        verify_export(export)


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.integration
def test_a_crafted_metadata_pickle_never_runs(teacher, tmp_path):
    """`.metadata` rewritten to call os.system on load, and export.json rewritten to agree
    with it (only the loader stands in the way): refused before anything runs."""
    from distkd.storage import sha256_file

    export = tmp_path / "export"
    shutil.copytree(teacher["export"], export)
    pwned = tmp_path / "pwned"
    (export / "tables" / ".metadata").write_bytes(pickle.dumps(_Exploit(pwned)))
    meta = json.loads((export / "export.json").read_text())
    meta["files"]["tables/.metadata"] = sha256_file(export / "tables" / ".metadata")
    meta["sha256"] = fingerprint(meta)
    (export / "export.json").write_text(json.dumps(meta))
    assert verify_export(export) == meta["sha256"]
    with pytest.raises(ConfigError, match="export metadata refers to posix.system"):
        load_export(export)
    with pytest.raises(TeacherError, match="export metadata refers to posix.system"):
        describe(TeacherSpec(export=str(export)))
    assert not pwned.exists()


@pytest.mark.unit
def test_auto_shards_only_a_teacher_too_large_to_gather():
    tables = {"model.ebc.embedding_bags.t.weight": torch.zeros(1000, 16), "model.head.weight": torch.zeros(2, 16)}
    small, big = ExportConfig(), ExportConfig(gather_limit_bytes=1000)
    assert export_form(small, "teacher", 2, tables, "model.") == "file"
    assert export_form(big, "teacher", 2, tables, "model.") == "sharded"
    assert export_form(big, "teacher", 1, tables, "model.") == "file"
    assert export_form(big, "student", 2, tables, "model.") == "file"
    assert export_form(ExportConfig(format="sharded"), "teacher", 1, tables, "model.") == "sharded"
