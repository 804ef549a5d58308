"""`make bench-faults`' scale run, on a tiny dataset: every fault fires for real (a worker
killed on each of 4 shards, the driver killed and the build rerun, two builds racing while a
reader polls, a teacher returning NaN, the Ray head of a separate cluster killed and the build
rerun on a new one; two ranks of a distillation killed under torchrun, then
rank 0 killed while committing a checkpoint) and the table reports no row lost, complete caches
that verify, students equal to the uninterrupted one. Structure and outcome only; no speed is
checked."""

from __future__ import annotations

import re

import pytest

from distkd.bench import faults_scale

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_the_scale_run_loses_no_row_and_says_so(tmp_path, capsys):
    rc = faults_scale.main(["--rows", "20000", "--shards", "4", "--train-batch", "256", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert len(list((tmp_path / "markers").glob("killed-*"))) == 4, "a worker was not killed on every shard"
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    assert len(rows) == 10, out
    assert "one worker SIGKILLed on every shard (4 deaths)" in rows[1] and "4 shards retried once" in rows[1], out
    assert re.search(r"driver SIGKILLed after 1 shard\(s\) finished, rerun \| 1 shard\(s\) in the manifest at the "
                     r"kill .*; the rerun computed 3", rows[2]), out
    assert "the second exited 2 after" in rows[3] and "naming the lock's holder" in rows[3], out
    for row in rows[1:4]:
        assert "complete True" in row and "verify passes" in row and row.split(" | ")[2] == "0", row
    assert "each whole, every file named whole and the clean build's" in rows[4], out
    assert re.search(r"exit 2 naming the shard, row group \d+, row \d+ \(row \d+ of the shard\); nothing of it "
                     r"published, \d shards committed, each the clean build's", rows[5]), out
    assert re.search(r"exit 2 \d+\.\d s after the kill, naming the lost cluster; [123] shard\(s\) in the manifest, "
                     r"each the clean build's; on a new head the rerun computed [123]; complete True, verify passes",
                     rows[6]), out
    # 16,000 train rows at 2 × 256 a step: 31 steps an epoch, checkpoints every 6, 24 steps
    assert "24 steps, 12,288 rows" in rows[7], out
    assert "rank 1 after step 8, rank 0 of the restarted group after 14" in rows[8], out
    assert "two torchrun restarts, resumed from step 6 then 12" in rows[8], out
    assert "committing the checkpoint of step 18" in rows[9] and "resumed from step 12" in rows[9], out
    for row in rows[8:]:
        assert "0 tensors differ from the reference's export (tolerance 0)" in row, row
    assert all(row.split(" | ")[2] == "0" for row in rows), out
