"""`make bench-faults`' scale run, on a tiny dataset: every fault fires for real (a worker
killed on each of 4 shards, the driver killed and the build rerun) and the table reports no row
lost, complete caches that verify. Structure and outcome only; no speed is checked."""

from __future__ import annotations

import re

from distkd.bench import faults_scale


def test_the_scale_run_loses_no_row_and_says_so(tmp_path, capsys):
    rc = faults_scale.main(["--rows", "20000", "--shards", "4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert len(list((tmp_path / "markers").glob("killed-*"))) == 4, "a worker was not killed on every shard"
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    assert len(rows) == 3, out
    assert "one worker SIGKILLed on every shard (4 deaths)" in rows[1] and "4 shards retried once" in rows[1], out
    assert re.search(r"driver SIGKILLed after 1 commits, rerun \| 1 shards committed before the kill; the rerun "
                     r"computed 3", rows[2]), out
    for row in rows[1:]:
        assert "complete True" in row and "verify passes" in row and row.split(" | ")[2] == "0", row
