"""Checkpoints on disk: what they hold, what loading one can and cannot do, retention, and a
crash mid-save. One rank, a few steps each (tests/test_restarts.py kills ranks for real)."""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest

from distkd.train.checkpoint import committed, latest
from tests.support import SMALL_MODEL, cli

pytestmark = pytest.mark.integration


def stage(logs, out, *extra) -> list[str]:
    return ["student", "train", "--nproc", "1", f"logs={logs}", f"out={out}", "tensorboard=false",
            "train.batch_size=512", "train.checkpoint_every=2", *SMALL_MODEL, *extra]


@pytest.fixture(scope="module")
def run(small_logs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    r = cli(*stage(small_logs, out, "train.max_steps=9", "train.keep_checkpoints=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_only_tensors_and_json_and_the_last_k_are_kept(run):
    kept = committed(run / "checkpoints")
    assert [p.name for p in kept] == ["step-00000008", "step-00000009"]  # keep_checkpoints=2
    assert not list((run / "checkpoints").glob(".*"))  # no partial folders left
    last = kept[-1]
    names = sorted(p.name for p in last.iterdir())
    shards = [n for n in names if n not in (".metadata", "COMMITTED", "rank-00000.json")]
    assert len(names) - len(shards) == 3 and len(shards) > 1  # DCP's files, one per tensor (distkd.dcp_writer)
    assert all(re.fullmatch(r"__0_\d+_0\.distcp", n) for n in shards), shards
    marker = json.loads((last / "COMMITTED").read_text())
    assert marker["step"] == 9 and marker["world_size"] == 1 and marker["trainer"]["step"] == 9
    assert marker["loader"] == {"epoch": 0, "generations": [[1, 9]]}


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_loading_never_runs_pickled_code(run, small_logs, tmp_path):
    """A .metadata rewritten to call os.system on load is refused before it runs."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out)
    pwned = tmp_path / "pwned"
    (latest(out / "checkpoints") / ".metadata").write_bytes(pickle.dumps(_Exploit(pwned)))
    r = cli(*stage(small_logs, out, "train.max_steps=12"), "--resume")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "checkpoint metadata refers to posix.system" in r.stderr, r.stderr[-2000:]
    assert not pwned.exists()


def test_a_checkpoint_of_another_run_is_refused(run, small_logs, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out)
    r = cli(*stage(small_logs, out, "train.max_steps=12", "model.embedding_dim=8"), "--resume")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "a checkpoint of another run (model.embedding_dim: 16 -> 8)" in r.stderr, r.stderr[-2000:]


def test_a_crash_while_committing_leaves_the_previous_checkpoint(small_logs, tmp_path):
    """Killed while step 4's checkpoint is being committed: its files are there, never trusted;
    the rerun resumes from step 2 and replaces the partial folder."""
    out = tmp_path / "run"
    r = cli("--kill-during-save", "4", "--", *stage(small_logs, out, "train.max_steps=6"), module="tests.faults.train")
    assert r.returncode != 0 and "while committing step-00000004" in r.stderr, r.stderr[-2000:]
    assert [p.name for p in committed(out / "checkpoints")] == ["step-00000002"]
    partial = out / "checkpoints" / ".step-00000004.partial"
    assert (partial / ".metadata").is_file() and not (partial / "COMMITTED").exists()
    r = cli(*stage(small_logs, out, "train.max_steps=6"), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr and "step-00000002 at epoch 0, step 2" in r.stderr
    assert [p.name for p in committed(out / "checkpoints")] == ["step-00000004", "step-00000006"]
    assert not partial.exists()
