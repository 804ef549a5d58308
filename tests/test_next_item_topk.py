"""Top-k cache rows: selection, bit packing, Arrow/Parquet round trips, size."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distkd.cache import topk as tk


@pytest.mark.unit
@pytest.mark.parametrize("bits", [1, 7, 8, 13, 15, 17, 32])
def test_bit_packing_round_trips(bits):
    rng = np.random.default_rng(bits)
    for m in (1, 3, 64):
        ids = rng.integers(0, 2**bits, size=(50, m), dtype=np.uint64).astype(np.int64)
        buf = tk.pack_bits(ids, bits)
        assert buf.shape == (50, -(-m * bits // 8)) and buf.dtype == np.uint8
        np.testing.assert_array_equal(tk.unpack_bits(buf, m, bits), ids)


def _teacher(rows=300, n=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g) * 3 + torch.linspace(0, 4, n)


@pytest.mark.unit
@pytest.mark.parametrize("tail,proposal,tau", [(0, "teacher", 1.0), (16, "teacher", 1.0), (8, "uniform", 2.0)])
def test_pack_unpack_is_exact(tmp_path, tail, proposal, tau):
    z = _teacher()
    fmt = tk.TopKFormat(z.shape[1], 64, tail, proposal, tau)
    top = tk.select(z, fmt, torch.Generator().manual_seed(0))
    v, i = z.topk(64, 1)
    assert torch.equal(top.ids, i)  # random logits: no ties
    assert torch.equal(top.logits, (v - v[:, :1]).half().float())
    assert top.logits.dtype == torch.float32 and top.ids.dtype == torch.int64
    table = tk.pack(top, fmt)
    assert table.schema == fmt.arrow_schema() and tk.TopKFormat.from_schema(table.schema) == fmt
    for got in (tk.unpack(table), tk.unpack(table, fmt)):
        for a, b in zip(top, got):
            assert (a is None and b is None) or torch.equal(a, b)
    sliced = tk.unpack(table.slice(37, 100))  # a slice: Arrow offsets into the buffers
    assert torch.equal(sliced.ids, top.ids[37:137]) and torch.equal(sliced.lse, top.lse[37:137])
    if tail:
        assert torch.equal(sliced.tail_ids, top.tail_ids[37:137])
        assert not (top.tail_ids[:, :, None] == top.ids[:, None, :]).any()  # draws come from the tail only
    path = tmp_path / "c.parquet"
    pq.write_table(table, path, row_group_size=128, **fmt.parquet_options())
    back = tk.unpack(pq.read_table(path))
    for a, b in zip(top, back):
        assert (a is None and b is None) or torch.equal(a, b)
    pf = pq.ParquetFile(path)
    assert pf.num_row_groups == 3 and pf.metadata.row_group(0).column(0).compression == "ZSTD"
    assert "BYTE_STREAM_SPLIT" in pf.metadata.row_group(0).column(1).encodings  # the fp16 logits


@pytest.mark.unit
def test_lse_and_tail_mass_are_consistent():
    z = _teacher().double()
    for tau in (1.0, 0.7):
        fmt = tk.TopKFormat(z.shape[1], 32, 0, tau=tau)
        top = tk.select(z.float(), fmt)
        shifted = z - z.max(1, keepdim=True).values
        shifted.scatter_(1, top.ids, top.logits.double())  # the cached (fp16-rounded) top-k, exact tail
        torch.testing.assert_close(top.lse.double(), torch.logsumexp(shifted / tau, 1), rtol=0, atol=2e-5)
        p_top = torch.exp(top.logits / tau - top.lse[:, None]).sum(1)
        assert (p_top <= 1.0 + 1e-6).all()


@pytest.mark.unit
def test_ties_are_broken_by_ascending_id_deterministically():
    g = torch.Generator().manual_seed(3)
    z = torch.randint(0, 6, (64, 500), generator=g).float()  # many ties, at the boundary too
    z[0] = 1.0  # a row of equal logits
    ids = tk.topk_ids(z, 20)[1]
    ref = z.sort(dim=1, descending=True, stable=True)
    assert torch.equal(ids, ref.indices[:, :20])
    assert torch.equal(tk.topk_ids(z, 20)[0], z.topk(20, 1).values)  # the same values as torch.topk
    assert torch.equal(ids[0], torch.arange(20))
    assert torch.equal(tk.topk_ids(z.flip(0), 20)[1], ids.flip(0))
    zero = torch.tensor([[0.0, -0.0, -0.0, 0.0, -1.0]])
    assert tk.topk_ids(zero, 3)[1].tolist() == [[0, 1, 2]]  # -0.0 ties with 0.0
    with pytest.raises(ValueError):
        tk.topk_ids(torch.tensor([[1.0, float("nan")]]), 1)


@pytest.mark.unit
def test_teacher_proposal_samples_the_tail_softmax():
    n, k, s = 50, 5, 4000
    z = _teacher(rows=2, n=n, seed=4)
    fmt = tk.TopKFormat(n, k, s)
    top = tk.select(z, fmt, torch.Generator().manual_seed(1))
    q = torch.softmax((z - z.max(1, keepdim=True).values).scatter(1, top.ids, float("-inf")), 1)
    counts = torch.zeros(2, n).scatter_add_(1, top.tail_ids, torch.ones(2, s)) / s
    assert (counts - q).abs().max() < 4 * (q * (1 - q) / s).sqrt().max() + 1e-3
    # Recomputed from fp16 logits: within their rounding (2^-11 relative of |z| <= 16).
    torch.testing.assert_close(top.tail_logq.exp(), q.gather(1, top.tail_ids), rtol=1e-2, atol=1e-6)
    uni = tk.select(z, tk.TopKFormat(n, k, 16, "uniform"), torch.Generator().manual_seed(1))
    torch.testing.assert_close(uni.tail_logq, torch.full((2, 16), -float(np.log(n - k))))


@pytest.mark.unit
def test_format_checks():
    assert tk.TopKFormat(20_000, 64).id_bits == 15 and tk.TopKFormat(20_000, 64).id_bytes(64) == 120
    assert tk.TopKFormat(2, 1).id_bits == 1 and tk.TopKFormat(1 << 16, 8).id_bits == 16
    with pytest.raises(ValueError):
        tk.TopKFormat(100, 100, tail=4)  # no tail to sample from
    with pytest.raises(ValueError):
        tk.TopKFormat(100, 0)


@pytest.mark.unit
def test_bytes_per_entry_at_k64_on_next_item_logits(tmp_path):
    """Logits of the synthetic task's true model (a perfect teacher), 20,000 items, zstd."""
    from distkd.data.synth_next_item import Truth

    truth = Truth("default", seed=0)
    rng = np.random.default_rng(0)
    values, offsets = truth.sample_history(4096, rng)
    logits = torch.from_numpy(truth.log_probs(values, offsets, rng.integers(0, truth.preset.surfaces, 4096)))
    fmt = tk.TopKFormat(truth.num_items, 64)
    path = tmp_path / "k64.parquet"
    pq.write_table(tk.pack(tk.select(logits, fmt), fmt), path, row_group_size=4096, **fmt.parquet_options())
    per_entry = path.stat().st_size / (4096 * 64)
    assert per_entry <= 4.5, per_entry
