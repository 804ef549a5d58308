"""TorchRec's TrainPipelineSparseDist in the trainer's loop (`train.pipeline`, distkd.train.steps):
the same losses and weights as the plain loop, and checkpoints at the optimizer's position, not
the loader's (the pipeline holds two batches ahead), so a resume is exactly once."""

from __future__ import annotations

import json

import pytest

from distkd import dist
from distkd.config import ConfigError
from distkd.data.loader import LogLoader, split_files
from distkd.data.schema import load_schema
from distkd.launch.local import launch
from distkd.train.metrics_logger import read_losses
from distkd.train.prepare import prepare
from tests.support import SMALL_MODEL, assert_same_model, cli, job_for

import torch


@pytest.mark.unit
def test_the_pipeline_is_the_default_and_a_bad_value_names_the_field(tmp_path):
    assert job_for(tmp_path, tmp_path).train.pipeline == "sparse_dist"
    assert job_for(tmp_path, tmp_path, "train.pipeline=plain").train.pipeline == "plain"
    with pytest.raises(ConfigError, match="pipeline"):
        job_for(tmp_path, tmp_path, "train.pipeline=semi_sync")


@pytest.mark.unit
def test_the_loader_state_at_the_consumers_position_resumes_there(small_logs):
    """Three batches yielded, one consumed: the state at 1 resumes with the second batch."""
    def loader() -> LogLoader:
        return LogLoader(split_files(small_logs, "train"), load_schema(small_logs), 512, shuffle=True, prefetch=0)

    ld = loader()
    it = iter(ld)
    batches = [next(it) for _ in range(3)]
    assert ld.state_dict() == {"epoch": 0, "generations": [[1, 3]]}
    assert ld.state_dict(1) == {"epoch": 0, "generations": [[1, 1]]}
    with pytest.raises(ValueError, match="step 4 is not among the 3 batches yielded"):
        ld.state_dict(4)
    resumed = loader()
    resumed.load_state_dict(ld.state_dict(1))
    assert torch.equal(next(iter(resumed)).example_id, batches[1].example_id)


class _Positions:
    """After each step: (step, batches the optimizer consumed, batches the loader has yielded)."""

    def __init__(self):
        self.seen: list[tuple[int, int, int]] = []

    def __call__(self, trainer) -> None:
        self.seen.append((trainer.state.step, trainer.consumed, trainer.train_loader.layout_step))


def _run_rank(prepared) -> dict:
    from distkd.train.trainer import Trainer

    env = dist.init()
    positions = _Positions()
    trainer = Trainer(prepared.job, prepared.schema, prepared.objective, env, callbacks=[positions])
    summary = trainer.train()
    dist.shutdown()
    return {"loop": trainer.steps.name, "positions": positions.seen, "rows": summary["rows"],
            "valid": [h["metrics"] for h in trainer.validator.history]}


def _marker(out, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step-{step:08d}" / "COMMITTED").read_text())


@pytest.mark.integration
def test_pipeline_and_plain_loop_train_the_same_model(small_logs, tmp_path):
    """Two ranks, a per-step learning rate, validation and checkpoints mid-epoch (the pipeline
    detaches and re-attaches around each validation): the same losses, validation metrics and weights, bit for bit; the
    checkpoints record the batches stepped on while the loader was two ahead."""
    common = ["train.max_steps=12", "train.eval_every=4", "train.checkpoint_every=5", "train.keep_checkpoints=3",
              "optim.schedule=cosine", "optim.warmup_steps=3"]  # the learning rate changes every step
    runs = {}
    for loop in ("sparse_dist", "plain"):
        job = job_for(small_logs, tmp_path / loop, *common, f"train.pipeline={loop}")
        job.nproc = 2
        runs[loop] = launch(_run_rank, 2, prepare(job))[0]
    piped, plain = runs["sparse_dist"], runs["plain"]
    assert (piped["loop"], plain["loop"]) == ("sparse_dist", "plain")
    assert read_losses(tmp_path / "sparse_dist") == read_losses(tmp_path / "plain")
    assert piped["valid"] == plain["valid"] and len(piped["valid"]) == 3
    assert piped["rows"] == plain["rows"] == 12 * 2 * 512
    assert_same_model(tmp_path / "sparse_dist", tmp_path / "plain")
    # The plain loop's loader is where its optimizer is; the pipeline's is two batches ahead.
    assert all(consumed == fetched == step for step, consumed, fetched in plain["positions"])
    assert all(consumed == step and fetched == step + 2 for step, consumed, fetched in piped["positions"])
    for loop in runs:
        assert _marker(tmp_path / loop, 5)["loader"]["generations"] == [[2, 5]]
        assert _marker(tmp_path / loop, 10)["loader"]["generations"] == [[2, 10]]


@pytest.mark.integration
@pytest.mark.slow
def test_a_pipelined_run_killed_mid_epoch_resumes_to_the_uninterrupted_model(small_logs, tmp_path):
    """Shuffled, two epochs of 32 steps: rank 1 killed after step 13 of the pipelined run (the
    loader 15 batches in), the launcher restarts the group from the step-10 checkpoint; the
    export and the row count equal those of an uninterrupted plain run."""
    common = ["teacher", "train", "--nproc", "2", f"logs={small_logs}", "tensorboard=false", "train.batch_size=512",
              "train.epochs=2", "train.checkpoint_every=10", *SMALL_MODEL]
    whole = cli(*common, f"out={tmp_path / 'whole'}", "train.pipeline=plain")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = cli("--kill", "1:13", "--", "teacher", "train", "--max-restarts", "1", *common[2:],
                 f"out={tmp_path / 'resumed'}", module="tests.faults.train")
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "[fault] SIGKILL rank 1 after step 13" in killed.stderr
    assert "step-00000010 at epoch 0, step 10" in killed.stderr, killed.stderr[-2000:]
    assert "input dist pipelined for model.ebc" in killed.stderr
    assert_same_model(tmp_path / "whole", tmp_path / "resumed")
    sa = json.loads((tmp_path / "whole" / "summary.json").read_text())
    sb = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert sa["steps"] == sb["steps"] and sa["rows"] == sb["rows"] == 2 * 32_000
    assert sb["test"] == sa["test"]
