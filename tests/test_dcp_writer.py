"""The DCP writer saves a tensor at a time: views of one flat buffer (what a fused TorchRec group's
tables are) are written without a copy of all of them held at once, and read back equal."""

from __future__ import annotations

import mmap
import subprocess
import sys

import pytest

from distkd import memory

MIB = 2**20


# Run in a fresh process: its high-water mark before the save is its own (the tables just made),
# so the growth is measured without resetting the mark, which some kernels ignore (distkd.memory).
SAVE_FOUR_VIEWS = """
import sys, torch, torch.distributed.checkpoint as dcp
from distkd import memory
from distkd.dcp_reader import SafeReader
from distkd.dcp_writer import TensorAtATimeWriter
n = 40 * 2**20 // 4
flat = torch.rand(4 * n)
tables = {f"t{i}": flat[i * n:(i + 1) * n] for i in range(4)}
tables["dense"] = torch.rand(100)
before = memory.peak_rss_bytes()
dcp.save(tables, storage_writer=TensorAtATimeWriter(sys.argv[1]), no_dist=True)
print(memory.peak_rss_bytes() - before)
back = {k: torch.zeros_like(v) for k, v in tables.items()}
dcp.load(back, storage_reader=SafeReader(sys.argv[1]), no_dist=True)
assert all(torch.equal(back[k], tables[k]) for k in tables), "read back unequal"
"""


@pytest.mark.integration
def test_views_of_one_buffer_are_written_one_at_a_time_and_read_back(tmp_path):
    # four 40 MiB "tables" side by side in one buffer, as a TBE holds them (over glibc's largest
    # mmap threshold, 32 MiB, as real tables are: each clone is returned to the system when freed)
    r = subprocess.run([sys.executable, "-c", SAVE_FOUR_VIEWS, str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    grown = int(r.stdout.split()[-1])
    # each view is cloned before it is written (its storage is the whole buffer): one at a time
    # is 40 MiB; DCP's own one-file writer holds all four clones (160 MiB) until the file closes
    assert grown < 60 * MIB, f"peak grew {grown / MIB:.1f} MiB while saving four 40 MiB views"
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".distcp"]) == 5  # a file per tensor


@pytest.mark.unit
def test_stages_record_each_stage_peak():
    stages = memory.Stages()
    # a mapping of its own, touched then unmapped: memory a long-lived process's allocator had
    # freed but kept (torch.ones would reuse it) would not raise the mark at all
    big = mmap.mmap(-1, 64 * MIB)
    for offset in range(0, 64 * MIB, mmap.PAGESIZE):
        big[offset] = 1
    big.close()
    stages.mark("big")
    stages.mark("small")
    record = stages.record()
    peaks = record["peak_rss_bytes"]
    assert record["per_stage"] == memory.peak_resettable()
    if record["per_stage"]:
        assert peaks["big"] - peaks["small"] > 48 * MIB  # the second stage's own peak, lower
    else:  # a kernel that ignores the reset: each figure is the peak so far, and says so
        assert peaks["small"] >= peaks["big"] >= record["rss_bytes"]


@pytest.mark.unit
def test_the_probe_sees_a_reset_the_kernel_ignores(monkeypatch):
    """The probe's verdict comes from the mark itself, not from the write being accepted."""
    memory.peak_resettable.cache_clear()
    monkeypatch.setattr(memory, "reset_peak", lambda: True)  # accepted, and nothing lowered
    try:
        assert memory.peak_resettable() is False
    finally:
        memory.peak_resettable.cache_clear()
