"""The DCP writer saves a tensor at a time: views of one flat buffer (what a fused TorchRec group's
tables are) are written without a copy of all of them held at once, and read back equal."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from distkd import memory
from distkd.dcp_reader import SafeReader
from distkd.dcp_writer import TensorAtATimeWriter

MIB = 2**20


@pytest.mark.unit
def test_views_of_one_buffer_are_written_one_at_a_time_and_read_back(tmp_path):
    # four 40 MiB "tables" side by side in one buffer, as a TBE holds them (over glibc's largest
    # mmap threshold, 32 MiB, as real tables are: each clone is returned to the system when freed)
    n = 40 * MIB // 4
    flat = torch.rand(4 * n)
    tables = {f"t{i}": flat[i * n:(i + 1) * n] for i in range(4)}
    tables["dense"] = torch.rand(100)
    base = memory.rss_bytes()
    if not memory.reset_peak():
        pytest.fail("the kernel refused to reset VmHWM (/proc/self/clear_refs): the figures of distkd.memory need it")
    dcp.save(tables, storage_writer=TensorAtATimeWriter(tmp_path), no_dist=True)
    grown = memory.peak_rss_bytes() - base
    # each view is cloned before it is written (its storage is the whole buffer): one at a time
    # is 40 MiB; DCP's own one-file writer holds all four clones (160 MiB) until the file closes
    assert grown < 60 * MIB, f"peak grew {grown / MIB:.1f} MiB while saving four 40 MiB views"
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".distcp"]) == 5  # a file per tensor
    back = {k: torch.zeros_like(v) for k, v in tables.items()}
    dcp.load(back, storage_reader=SafeReader(tmp_path), no_dist=True)
    assert all(torch.equal(back[k], tables[k]) for k in tables)


@pytest.mark.unit
def test_stages_record_each_stage_peak():
    stages = memory.Stages()
    big = torch.ones(64 * MIB // 4)  # 64 MiB, touched
    del big
    stages.mark("big")
    stages.mark("small")
    peaks = stages.record()["peak_rss_bytes"]
    assert stages.resettable and peaks["big"] - peaks["small"] > 48 * MIB  # the second stage's own peak, lower
