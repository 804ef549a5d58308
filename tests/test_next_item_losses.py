"""Next-item losses against dense references computed from full distributions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distkd.cache.topk import TopKFormat, select
from distkd.objectives.next_item_losses import (
    hard_ce, ranking_distillation, sampled_softmax_ce, sampled_tail_kl, teacher_lse, topk_kl,
)

pytestmark = pytest.mark.unit

B, N = 6, 40


def _logits(seed, dtype=torch.float64, scale=2.0, b=B, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, generator=g, dtype=dtype) * scale


def _cache(teacher, k, tau=1.0):
    """Exact (unrounded) top-k, in float64, as the cache would hold them (shifted by the row max)."""
    z = teacher - teacher.max(1, keepdim=True).values
    v, ids = z.topk(k, 1)
    return ids, v, torch.logsumexp(z / tau, 1)


def _bucket_kl(teacher, student, ids, tau):
    """KL over the k ids plus one bucket for the rest, built from the full distributions."""
    p, s = F.softmax(teacher / tau, 1), F.softmax(student / tau, 1)
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(1, ids, True)
    pk, sk = p.gather(1, ids), s.gather(1, ids)
    pt, st = (p * ~in_top).sum(1, keepdim=True), (s * ~in_top).sum(1, keepdim=True)
    P, S = torch.cat([pk, pt], 1), torch.cat([sk, st], 1)
    return (torch.xlogy(P, P) - P * S.log()).sum(1).mean() * tau**2


@pytest.mark.parametrize("k,tau", [(5, 1.0), (12, 2.0), (1, 0.5)])
def test_topk_kl_matches_bucketed_reference(k, tau):
    t, s = _logits(0), _logits(1)
    ids, v, lse = _cache(t, k, tau)
    got = topk_kl(s, ids, v, lse, tau=tau)
    torch.testing.assert_close(got, _bucket_kl(t, s, ids, tau))


def test_topk_kl_with_k_equal_n_is_the_full_kl():
    t, s = _logits(2), _logits(3)
    ids, v, lse = _cache(t, N)
    full = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(topk_kl(s, ids, v, lse), full)
    s.requires_grad_(True)
    topk_kl(s, ids, v, lse, tau=1.5).backward()
    assert torch.isfinite(s.grad).all()


def test_topk_kl_gradient():
    t = _logits(4)
    ids, v, lse = _cache(t, 7, 2.0)
    s = _logits(5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: topk_kl(x, ids, v, lse, tau=2.0), (s,))
    s2 = s.detach().clone().requires_grad_(True)
    _bucket_kl(t, s2, ids, 2.0).backward()
    topk_kl(s, ids, v, lse, tau=2.0).backward()
    torch.testing.assert_close(s.grad, s2.grad)


def test_topk_kl_mask_averages_selected_rows():
    t, s = _logits(6), _logits(7)
    ids, v, lse = _cache(t, 5)
    mask = torch.tensor([True, False, True, False, False, True])
    want = topk_kl(s[mask], ids[mask], v[mask], lse[mask])
    torch.testing.assert_close(topk_kl(s, ids, v, lse, mask=mask), want)
    assert topk_kl(s, ids, v, lse, mask=torch.zeros(B, dtype=torch.bool)) == 0


def test_teacher_lse_at_another_temperature():
    t = _logits(8)
    ids, v, lse1 = _cache(t, 6, 1.0)
    z = t - t.max(1, keepdim=True).values
    # Same temperature: the cached LSE as is.
    assert teacher_lse(v, lse1, 1.0, 1.0, N) is lse1
    # Flat tail: exact at any temperature.
    flat = z.clone()
    flat_ids = ids
    tail_mask = torch.ones_like(flat, dtype=torch.bool).scatter(1, flat_ids, False)
    flat[tail_mask] = -3.0
    fv, f_lse = flat.gather(1, flat_ids), torch.logsumexp(flat, 1)
    for tau in (0.5, 2.0, 4.0):
        torch.testing.assert_close(teacher_lse(fv, f_lse, tau, 1.0, N), torch.logsumexp(flat / tau, 1))
    # A skewed tail: an upper bound for tau > lse_tau, a lower bound for tau < lse_tau.
    exact2, exact05 = torch.logsumexp(z / 2.0, 1), torch.logsumexp(z / 0.5, 1)
    assert (teacher_lse(v, lse1, 2.0, 1.0, N) >= exact2 - 1e-12).all()
    assert (teacher_lse(v, lse1, 0.5, 1.0, N) <= exact05 + 1e-12).all()
    # The KL at tau != lse_tau is the KL under that approximate normalizer.
    s = _logits(10)
    approx = teacher_lse(v, lse1, 2.0, 1.0, N)
    torch.testing.assert_close(topk_kl(s, ids, v, lse1, tau=2.0, lse_tau=1.0), topk_kl(s, ids, v, approx, tau=2.0))
    with pytest.raises(ValueError):
        teacher_lse(v, lse1, 2.0, 1.0)


def _full_kl_rows(t, s, tau):
    lp, ls = F.log_softmax(t / tau, 1), F.log_softmax(s / tau, 1)
    return (lp.exp() * (lp - ls)).sum(1)


@pytest.mark.parametrize("proposal", ["teacher", "uniform"])
def test_sampled_tail_kl_is_unbiased(proposal):
    n, k, s_tail, draws = 300, 16, 8, 400
    # Logits on a 1/8 grid: exact in fp16, so the cached values equal the reference's.
    t = (_logits(11, torch.float32, scale=3.0, b=4, n=n) * 8).round() / 8
    st = _logits(12, torch.float32, scale=1.0, b=4, n=n)
    fmt = TopKFormat(n, k, s_tail, proposal=proposal)
    gen = torch.Generator().manual_seed(0)
    est = []
    for _ in range(draws):
        top = select(t, fmt, gen)
        est.append(sampled_tail_kl(st, top.ids, top.logits, top.lse, top.tail_ids, top.tail_logits, top.tail_logq).item())
    est = torch.tensor(est, dtype=torch.float64)
    exact = _full_kl_rows(t.double(), st.double(), 1.0).mean().item()
    top = select(t, fmt, gen)
    se = est.std().item() / math.sqrt(draws)
    assert abs(est.mean().item() - exact) < 4 * se + 2e-4, (est.mean().item(), exact, se)
    # The top-k + tail-bucket KL is a lower bound of the full KL.
    assert topk_kl(st, top.ids, top.logits, top.lse).item() <= exact + 1e-4


def test_sampled_tail_kl_matches_direct_formula_and_gradcheck():
    t, s = _logits(13), _logits(14)
    ids, v, lse = _cache(t, 5)
    z = t - t.max(1, keepdim=True).values
    g = torch.Generator().manual_seed(1)
    tail_ids = torch.randint(0, N, (B, 7), generator=g)  # any ids: the formula does not care
    tail_logits = z.gather(1, tail_ids)
    logq = torch.full_like(tail_logits, -math.log(N - 5))
    got = sampled_tail_kl(s, ids, v, lse, tail_ids, tail_logits, logq)
    lp, ls = F.log_softmax(t, 1), F.log_softmax(s, 1)
    top = (lp.gather(1, ids).exp() * (lp.gather(1, ids) - ls.gather(1, ids))).sum(1)
    w = (lp.gather(1, tail_ids) - logq).exp() / 7
    tail = (w * (lp.gather(1, tail_ids) - ls.gather(1, tail_ids))).sum(1)
    torch.testing.assert_close(got, (top + tail).mean())
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u: sampled_tail_kl(u, ids, v, lse, tail_ids, tail_logits, logq, tau=1.5), (x,))


def _plackett_luce_reference(s, ids, weights):
    out = []
    for b in range(s.shape[0]):
        remaining = list(range(s.shape[1]))
        total = 0.0
        for r, i in enumerate(ids[b].tolist()):
            total = total + weights[r] * (torch.logsumexp(s[b, remaining], 0) - s[b, i])
            remaining.remove(i)
        out.append(total)
    return torch.stack(out).mean()


@pytest.mark.parametrize("k,decay", [(6, None), (6, 2.0), (N, None)])
def test_ranking_distillation_is_the_top_k_plackett_luce_nll(k, decay):
    t, s = _logits(15), _logits(16)
    _, ids = t.topk(k, 1)
    w = torch.ones(k, dtype=torch.float64) / k if decay is None else torch.exp(-torch.arange(1, k + 1) / decay).double()
    w = w / w.sum()
    torch.testing.assert_close(ranking_distillation(s, ids, position_decay=decay), _plackett_luce_reference(s, ids, w))
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u: ranking_distillation(u, ids, position_decay=decay), (x,))
    # Shift-invariant, and the teacher's own order scores better than its reverse.
    torch.testing.assert_close(ranking_distillation(s + 3.0, ids, decay), ranking_distillation(s, ids, decay))
    assert ranking_distillation(t, ids, decay) < ranking_distillation(t, ids.flip(1), decay)


def test_hard_ce_ignores_unlabelled_rows():
    s = _logits(17)
    y = torch.tensor([3, -1, 0, 39, -1, 7])
    keep = y >= 0
    torch.testing.assert_close(hard_ce(s, y), F.cross_entropy(s[keep], y[keep]))
    x = s.clone().requires_grad_(True)
    hard_ce(x, torch.full((B,), -1)).backward()
    assert hard_ce(s, torch.full((B,), -1)) == 0 and (x.grad == 0).all()
    assert torch.autograd.gradcheck(lambda u: hard_ce(u, y), (x.detach().requires_grad_(True),))


def test_sampled_softmax_ce_formula_and_convergence():
    g = torch.Generator().manual_seed(2)
    d = 8
    q = torch.randn(B, d, generator=g, dtype=torch.float64)
    table = torch.randn(N, d, generator=g, dtype=torch.float64)
    bias = torch.randn(N, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 5, -1, 7, 7, 0])
    proposal = torch.rand(N, generator=g, dtype=torch.float64) + 0.1
    qn = proposal / proposal.sum()
    neg = torch.tensor([5, 2, 9, 7, 5, 30])
    got = sampled_softmax_ce(q, table, y, 6, proposal, item_bias=bias, negatives=neg)
    logits = q @ table.t() + bias
    rows = []
    for b in range(B):
        if y[b] < 0:
            continue
        pos = logits[b, y[b]]
        negs = [logits[b, j] - math.log(6 * qn[j]) for j in neg.tolist() if j != y[b]]
        rows.append(torch.logsumexp(torch.stack([pos, *negs]), 0) - pos)
    torch.testing.assert_close(got, torch.stack(rows).mean())
    # A callable scorer gives the same; and with many samples the loss tends to the full CE.
    scorer = lambda qq, ids: (qq @ table[ids].t() + bias[ids]) if ids.dim() == 1 else \
        (torch.einsum("bd,bsd->bs", qq, table[ids]) + bias[ids])  # noqa: E731
    torch.testing.assert_close(sampled_softmax_ce(q, scorer, y, 6, proposal, negatives=neg), got)
    big = sampled_softmax_ce(q, table, y, 200_000, proposal, item_bias=bias, generator=torch.Generator().manual_seed(3))
    full = hard_ce(logits, y)
    assert abs(big.item() - full.item()) < 0.01 * full.item()
    x = q.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda qq: sampled_softmax_ce(qq, table, y, 6, proposal, item_bias=bias, negatives=neg), (x,))
