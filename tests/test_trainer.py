"""The trainer for real: two gloo ranks, TorchRec sharded tables, the CLI entry point."""

from __future__ import annotations

import json

import pytest
import torch

from distkd import dist
from distkd.data.loader import LogLoader, split_files
from distkd.data.schema import load_schema
from distkd.metrics import TaskMetrics
from distkd.models.export import load_export
from distkd.train.prepare import prepare
from tests.support import SMALL_MODEL, cli, job_for, train


@pytest.mark.integration
@pytest.mark.parametrize("types", ["table_wise", "data_parallel"])
def test_two_ranks_loss_falls_with_each_plan(small_logs, tmp_path, types):
    job = job_for(small_logs, tmp_path / types, f"sharding.types={types}", "train.epochs=2")
    s = train(job, 2)
    assert set(s["plan"].values()) <= {f"{types}[0]", f"{types}[1]", f"{types}[0, 1]"}, s["plan"]
    # Means of the first and the last ten steps' raw losses: comparable, unlike a smoothed one.
    assert s["loss"]["window"] == 10
    assert s["loss"]["last"]["loss"] < 0.9 * s["loss"]["first"]["loss"], s["loss"]
    # Dense layers (and data-parallel tables) are DDP replicas: identical on every rank.
    assert s["replica_drift"] == 0.0
    # Well above chance on held-out rows: both plans reach ~0.71 here (data-parallel reached
    # 0.69 while its tables were stepped by the dense Adam; see the next test).
    assert s["test"]["click"]["auc"] > 0.65
    assert s["test"]["click"]["rows"] == 4_000  # the whole test split, each row once


def _moves(prepared) -> tuple[float, float]:
    """Rank worker: the largest change of any embedding table and of any dense parameter over
    three `Trainer.train_step`s (a data-parallel plan: every table is a plain replicated tensor)."""
    from distkd.train.trainer import Trainer

    env = dist.init()
    trainer = Trainer(prepared.job, prepared.schema, prepared.objective, env)
    before = {k: v.detach().clone() for k, v in trainer.dmp.state_dict().items()}
    for step, batch in zip(range(3), trainer.train_loader):
        trainer.train_step(batch)
    change = {k: (v.detach() - before[k]).abs().max().item() for k, v in trainer.dmp.state_dict().items()}
    dist.shutdown()
    tables = max(v for k, v in change.items() if ".ebc." in k)
    return tables, max(v for k, v in change.items() if ".ebc." not in k)


@pytest.mark.integration
def test_data_parallel_tables_get_the_embedding_optimizer(small_logs, tmp_path):
    """TorchRec leaves data-parallel tables to the dense optimizer; the trainer gives them the
    tables' rowwise Adagrad at embedding_lr, so a table learns the same whatever the plan.
    (They were stepped by Adam at dense_lr, and learned more slowly than sharded ones.)"""
    dp = "sharding.types=data_parallel"
    from distkd.launch.local import launch

    tables, dense = launch(_moves, 2, prepare(job_for(small_logs, tmp_path / "a", dp, "optim.embedding_lr=0")))[0]
    assert tables == 0.0 and dense > 0.0
    tables, dense = launch(_moves, 2, prepare(job_for(small_logs, tmp_path / "b", dp, "optim.dense_lr=0")))[0]
    assert tables > 0.0 and dense == 0.0


@pytest.mark.integration
def test_export_reloads_with_identical_predictions(small_logs, tmp_path):
    job = job_for(small_logs, tmp_path / "run", "train.epochs=1")
    s = train(job, 2)
    model, meta = load_export(tmp_path / "run" / "export")
    assert meta["sha256"] == s["export"]["sha256"]
    # Loads without executing pickled code.
    payload = torch.load(tmp_path / "run" / "export" / "model.pt", weights_only=True)
    assert payload["role"] == "teacher"
    schema = load_schema(small_logs)
    metrics = TaskMetrics(schema.task_names)
    with torch.no_grad():
        for batch in LogLoader(split_files(small_logs, "test"), schema, 4096):
            metrics.update(model(batch.sparse, batch.dense).logits, batch.labels)
    reloaded = metrics.compute()
    for task, m in s["test"].items():
        assert reloaded[task]["rows"] == m["rows"]
        assert reloaded[task]["logloss"] == pytest.approx(m["logloss"], abs=1e-6)
        assert reloaded[task]["auc"] == pytest.approx(m["auc"], abs=1e-6)


@pytest.mark.integration
def test_export_refuses_a_tampered_file(small_logs, tmp_path):
    job = job_for(small_logs, tmp_path / "run", "train.max_steps=2")
    train(job, 1)
    path = tmp_path / "run" / "export" / "model.pt"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_export(tmp_path / "run" / "export")


@pytest.mark.slow
@pytest.mark.integration
def test_killed_run_resumes_to_the_same_model(small_logs, tmp_path):
    """Rank 1 is SIGKILLed after step 13 (a test callback); with no restarts left the launch
    fails naming the rank, and `--resume` continues from the step-10 checkpoint to the same
    weights as a run that was never interrupted."""
    common = ["teacher", "train", "--nproc", "2", f"logs={small_logs}", "tensorboard=false",
              "train.batch_size=512", "train.epochs=2", "train.checkpoint_every=10", *SMALL_MODEL]
    whole = cli(*common, f"out={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]

    crashed = cli("--kill", "1:13", "--", *common, f"out={tmp_path / 'resumed'}", module="tests.faults.train")
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    assert "distkd: error: rank 1 killed by SIGKILL (after 0 restart(s))" in crashed.stderr, crashed.stderr[-2000:]
    assert not (tmp_path / "resumed" / "export").exists()
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step-*")] == ["step-00000010"]

    resumed = cli(*common, f"out={tmp_path / 'resumed'}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step 10" in resumed.stderr

    a = torch.load(tmp_path / "whole" / "export" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "export" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    sa = json.loads((tmp_path / "whole" / "summary.json").read_text())
    sb = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert sa["steps"] == sb["steps"] and sa["rows"] == sb["rows"] == 2 * 32_000
    assert sb["test"] == sa["test"]


@pytest.mark.integration
def test_bad_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "teacher.yaml"
    bad.write_text("model:\n  embeding_dim: 8\n")
    r = cli("teacher", "train", "--config", str(bad))
    assert r.returncode == 2
    assert str(bad) in r.stderr and "embeding_dim" in r.stderr
    r = cli("teacher", "train", "train.batch_size=lots")
    assert r.returncode == 2 and "train.batch_size" in r.stderr


@pytest.mark.unit
def test_heads_start_at_the_base_rates(small_logs):
    """The heads' bias starts at the log-odds of each task's rate among labeled rows (first row
    group of each train shard), so an untrained model already predicts the base rate."""
    import pyarrow.parquet as pq

    from distkd.models.ranking import ModelConfig, RankingModel
    from distkd.models import label_rates, set_prior

    schema = load_schema(small_logs)
    files = split_files(small_logs, "train")
    rates = label_rates(schema, files)
    for task, rate in zip(schema.tasks, rates):
        labels = [pq.ParquetFile(f).read_row_group(0, columns=[task.label]).column(0).drop_null().to_pylist()
                  for f in files]
        flat = [y for ys in labels for y in ys]
        assert 0 < rate < 1 and rate == pytest.approx(sum(flat) / len(flat)), task.name
    model = RankingModel(schema, ModelConfig(embedding_dim=8, dense_arch=[8], cross_layers=0, deep_arch=[16],
                                             aux_head=True))
    set_prior(model, rates)
    for head in (model.head, model.aux_head):
        torch.testing.assert_close(torch.sigmoid(head.bias.detach()), torch.tensor(rates))


@pytest.mark.unit
def test_lr_schedule_through_a_combined_optimizer():
    """Warmup, then linear or cosine decay to zero, set on every group of a CombinedOptimizer
    (what the trainer builds: the fused tables' optimizer reads its group's lr at each step)."""
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    from distkd.train.sharding import LRSchedule, OptimConfig

    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    opt = CombinedOptimizer([
        ("a", KeyedOptimizerWrapper(dict(a.named_parameters()), lambda p: torch.optim.Adam(p, lr=0.01))),
        ("b", KeyedOptimizerWrapper(dict(b.named_parameters()), lambda p: torch.optim.SGD(p, lr=0.1))),
    ])
    sched = LRSchedule(opt, OptimConfig(schedule="linear", warmup_steps=10), total_steps=110)
    assert [sched.set(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert sched.set(60) == pytest.approx(0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.05])
    assert sched.set(110) == 0.0
    cosine = LRSchedule(opt, OptimConfig(schedule="cosine"), total_steps=100)
    assert [cosine.factor(s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    assert LRSchedule(opt, OptimConfig(), total_steps=100).factor(99) == 1.0
