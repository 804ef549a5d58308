"""The end-to-end next-item distillation check, on a tiny catalog (a smoke test of the wiring)."""

from __future__ import annotations

import pytest

from distkd.bench.next_item import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_end_to_end_on_the_small_preset(tmp_path):
    r = main(["--out", str(tmp_path), "--preset", "small", "--rows", "6000", "--test-rows", "500",
              "--teacher-dim", "16", "--student-dim", "4", "--batch", "256", "--k", "16", "--tail", "4",
              "--alpha", "0.5", "--bytes"])
    for name in ("teacher", "oracle"):
        assert 0 < r[name]["recall@10"] <= 1
    assert len(r["student_hard"]) == len(r["student_kd"]) == 1
    assert set(r["eta"]) == {"recall@10", "ndcg@10"}
    assert r["parameters"]["ratio"] < 0.5 and r["cache"]["rows"] > 0
    assert {(b["k"], b["tail"]) for b in r["bytes"]} == {(k, s) for k in (8, 32, 64, 128) for s in (0, 32)}
