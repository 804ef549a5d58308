"""Ranks that die, under every launcher distkd supports: torchrun (c10d rendezvous and
--standalone) and the local launcher (--nproc --max-restarts) restart the rank group, the
trainer resumes from the last committed checkpoint, and the result equals an uninterrupted
run's exactly (same world size: the same rows, batches and optimizer state, so tolerance 0).
A checkpoint written by 2 ranks loads into 1, and one written by 1 into 2, tensor for tensor,
for tables of each sharding type gloo runs. A rendezvous or collective that cannot complete
fails within `launch.timeout_s`."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from distkd import dist
from distkd.dist import free_port
from distkd.launch.local import launch
from distkd.train.checkpoint import latest, optimizer_tensors
from distkd.train.prepare import prepare
from distkd.models.sharding_plan import describe_plan
from distkd.train.trainer import Trainer
from tests.support import SMALL_MODEL, assert_same_model, cli, job_for, torchrun, train

pytestmark = pytest.mark.integration

STEPS = 24  # of the 31 a 2-rank epoch has at batch 512; checkpoints at 10 and 20, kills after 13


def common(logs, out) -> list[str]:
    return [f"logs={logs}", f"out={out}", "tensorboard=false", "train.batch_size=512", "train.checkpoint_every=10",
            f"train.max_steps={STEPS}", *SMALL_MODEL]


def summary_rows(out) -> int:
    """Rows the run's final model was trained on, over all its restarts."""
    return json.loads((out / "summary.json").read_text())["rows"]


@pytest.fixture(scope="module")
def uninterrupted(small_logs, tmp_path_factory):
    out = tmp_path_factory.mktemp("restarts") / "whole"
    r = cli("student", "train", "--nproc", "2", *common(small_logs, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _faulty_torchrun(rdzv: list[str], fault: list[str], stage: list[str]):
    return torchrun(*rdzv, "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.5",
                    "-m", "tests.faults.train", *fault, "--", *stage)


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["c10d", "standalone"])
def test_torchrun_restarts_a_killed_rank_and_the_run_matches(small_logs, uninterrupted, tmp_path, rendezvous,
                                                             rows_lost):
    """One rank SIGKILLed after step 13 costs one torchrun restart and nothing else: the job
    exits 0 from the step-10 checkpoint with the uninterrupted run's weights."""
    out = tmp_path / "run"
    rdzv = (["--standalone"] if rendezvous == "standalone" else
            ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
             "--rdzv-id", uuid.uuid4().hex[:8]])
    victim = "0" if rendezvous == "standalone" else "1"
    r = _faulty_torchrun(rdzv, ["--kill", f"{victim}:13"], ["student", "train", *common(small_logs, out)])
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"[fault] SIGKILL rank {victim} after step 13 (generation 0)" in r.stderr
    assert f"resumed from {out / 'checkpoints' / 'step-00000010'} at epoch 0, step 10" in r.stderr, r.stderr[-3000:]
    assert_same_model(out, uninterrupted)
    rows_lost(summary_rows(uninterrupted), summary_rows(out))


@pytest.mark.slow
def test_torchrun_survives_several_ranks_killed_in_one_run(small_logs, uninterrupted, tmp_path, rows_lost):
    """Rank 1 SIGKILLed after step 13, then rank 0 after step 22 of the restarted group: two
    restarts (of 2 allowed), resumed from step 10 and then step 20, the uninterrupted weights."""
    out = tmp_path / "run"
    r = torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--monitor-interval", "0.5",
                 "-m", "tests.faults.train", "--kill", "1:13", "--kill", "0:22:1", "--",
                 "student", "train", *common(small_logs, out))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "[fault] SIGKILL rank 1 after step 13 (generation 0)" in r.stderr, r.stderr[-3000:]
    assert "[fault] SIGKILL rank 0 after step 22 (generation 1)" in r.stderr, r.stderr[-3000:]
    for step in (10, 20):
        assert f"resumed from {out / 'checkpoints' / f'step-{step:08d}'} at epoch 0, step {step}" in r.stderr
    assert_same_model(out, uninterrupted)
    rows_lost(summary_rows(uninterrupted), summary_rows(out))


@pytest.mark.slow
def test_local_launcher_restarts_a_killed_rank(small_logs, uninterrupted, tmp_path):
    out = tmp_path / "run"
    r = cli("--kill", "1:13", "--", "student", "train", "--nproc", "2", "--max-restarts", "1",
            *common(small_logs, out), module="tests.faults.train")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr and "step 10" in r.stderr
    assert_same_model(out, uninterrupted)


def _load_and_dump(prepared, dump: str) -> dict:
    """One rank: the trainer at this world size resumes from the run's last checkpoint (its own
    resume path), then writes this rank's piece of every tensor a checkpoint holds, with the
    piece's global offsets, to DUMP-RANK.pt. Returns the plan it loaded into and its step."""
    env = dist.init(timeout_s=60)
    try:
        trainer = Trainer(prepared.job, prepared.schema, prepared.objective, env, resume=True)
        trainer.resume_if_any()
        pieces = {}
        for group, tensors in (("model", trainer.dmp.state_dict()), ("optim", optimizer_tensors(trainer.optimizer))):
            for name, t in tensors.items():
                if isinstance(t, ShardedTensor):  # table-wise / column-wise: the shards this rank holds
                    pieces[f"{group}/{name}"] = [(list(sh.metadata.shard_offsets), sh.tensor.detach().clone())
                                                 for sh in t.local_shards()]
                else:  # dense layers, data-parallel tables: a whole replica on every rank
                    pieces[f"{group}/{name}"] = [([0] * t.dim(), t.detach().clone())]
        torch.save(pieces, f"{dump}-{env.rank}.pt")
        return {"plan": describe_plan(trainer.dmp), "step": trainer.state.step}
    finally:
        dist.shutdown()


@pytest.mark.parametrize("types", ["table_wise", "column_wise", "data_parallel"])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_checkpoint_loads_at_another_world_size_tensor_for_tensor(small_logs, tmp_path, before, after, types):
    """Trained 3 steps on `before` ranks with every table `types`-sharded, checkpointed, then
    loaded by `after` ranks through the trainer's resume: every piece of every tensor each rank
    holds (tables, the tables' and the dense layers' optimizer state, dense weights) equals the
    saved tensor at its offsets, bit for bit, and together the pieces cover every element."""
    out = tmp_path / "run"
    job = job_for(small_logs, out, "train.max_steps=3", "train.checkpoint_every=3", f"sharding.types={types}")
    assert train(job, before)["steps"] == 3
    ckpt = latest(out / "checkpoints")
    assert json.loads((ckpt / "COMMITTED").read_text())["world_size"] == before
    dcp_to_torch_save(ckpt, tmp_path / "saved.pt")  # every tensor whole, read without a process group
    saved = {f"{group}/{name}": t for group, tensors in torch.load(tmp_path / "saved.pt", weights_only=True).items()
             for name, t in tensors.items()}

    job.nproc = after
    results = launch(_load_and_dump, after, prepare(job), str(tmp_path / "loaded"), timeout_s=120)
    for r in results:
        assert r["step"] == 3
        assert r["plan"] and all(p.startswith(types) for p in r["plan"].values()), r["plan"]
    covered = {name: torch.zeros(t.shape, dtype=torch.bool) for name, t in saved.items()}
    for rank in range(after):
        pieces = torch.load(tmp_path / f"loaded-{rank}.pt", weights_only=True)
        # a rank holds optimizer state only for the table shards it holds (table-wise: none of
        # another rank's table), so each rank's names are a part of the saved ones
        assert pieces.keys() <= saved.keys(), pieces.keys() - saved.keys()
        for name, shards in pieces.items():
            for offsets, piece in shards:
                where = tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))
                torch.testing.assert_close(piece, saved[name][where], rtol=0, atol=0,
                                           msg=lambda m, name=name, rank=rank: f"rank {rank}, {name}: {m}")
                covered[name][where] = True
    assert all(c.all() for c in covered.values()), [n for n, c in covered.items() if not c.all()]


def test_process_group_survives_a_torchrun_restart(tmp_path):
    """The root cause of restarted generations that never trained: built on torchrun's agent
    store under its default prefix, a restarted process group read the dead generation's
    keys. This script's rank 1 dies after its first all-reduce; the restarted pair must meet."""
    script = tmp_path / "pg.py"
    script.write_text(
        "import os, signal, torch, torch.distributed as td\n"
        "from distkd.dist import init, restart_generation\n"
        "env = init(timeout_s=60)\n"
        "t = torch.ones(1); td.all_reduce(t)\n"
        "print(f'rank {env.rank} generation {restart_generation()} sum {t.item():.0f}', flush=True)\n"
        "if env.rank == 1 and restart_generation() == 0:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "td.barrier(); td.destroy_process_group()\n")
    r = torchrun("--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--monitor-interval", "0.5", str(script), timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "rank 0 generation 1 sum 2" in r.stdout and "rank 1 generation 1 sum 2" in r.stdout, r.stdout


def _rank_env(rank: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


@pytest.mark.parametrize("rank,expect", [(0, "process group did not form within 5s"),
                                         (1, "cannot reach the rendezvous store at 127.0.0.1")])
def test_a_rank_whose_peer_never_arrives_fails_within_the_timeout(small_logs, tmp_path, rank, expect):
    """Rank 0 waits for a rank 1 that never starts; rank 1 dials a store nobody hosts: each
    fails with a message after launch.timeout_s, never hangs."""
    import subprocess

    env = {**os.environ, **_rank_env(rank, free_port()), "DISTKD_NO_PROGRESS": "1"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "distkd.cli", "student", "train", *common(small_logs, tmp_path / "o"),
                        "launch.timeout_s=5"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert expect in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_a_hung_rank_fails_the_collective_within_the_timeout(small_logs, tmp_path):
    """Rank 1 stops answering after step 3: rank 0's next collective times out after
    launch.timeout_s and the launch fails (no restarts left), naming the ranks."""
    t0 = time.monotonic()
    r = cli("--hang", "1:3", "--", "student", "train", "--nproc", "2", *common(small_logs, tmp_path / "o"),
            "launch.timeout_s=10", module="tests.faults.train", timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "rank 1 hangs after step 3" in r.stderr and "distkd: error: rank" in r.stderr, r.stderr[-3000:]
    assert time.monotonic() - t0 < 150
