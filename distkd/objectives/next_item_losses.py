"""Next-item (multi-class) distillation losses, as plain functions on tensors.

Notation: z the teacher's logits, u the student's, both over a catalog of N items; the cache
holds per row the teacher's top-k ids and logits, `lse` = logsumexp(z / tau_c) over the whole
catalog at the cache's temperature tau_c, and optionally s tail items drawn from a proposal q
over the items outside the top-k, with their logits and log q. Logits may be shifted by any
per-row constant as long as `lse` is shifted with them (distkd.cache.topk stores z - max z).

Temperature: the tempered teacher p_tau = softmax(z / tau) needs logsumexp(z / tau), which the
top-k and an LSE at another temperature do not determine (the tail's shape is unknown). So the
cache records the LSE at the configured tau (`lse_tau` = tau: exact). At tau != lse_tau,
`teacher_lse` assumes a flat tail (the tail's mass spread evenly over its N - k items): exact
for a flat tail, an upper bound on the tail mass for tau > lse_tau and a lower bound for
tau < lse_tau (Jensen on x -> x^(lse_tau / tau)).

Rows are averaged over `mask` (bool [B], default all); KL terms are scaled by tau^2 so their
gradient keeps its size as tau changes (Hinton et al. 2015). Labels are int64 with -1 = none.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["teacher_lse", "topk_kl", "sampled_tail_kl", "ranking_distillation", "hard_ce", "sampled_softmax_ce"]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _mean_rows(per_row: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return per_row.mean()
    m = mask.to(per_row.dtype)
    return (per_row * m).sum() / m.sum().clamp(min=1.0)


def teacher_lse(topk_logits: torch.Tensor, lse: torch.Tensor, tau: float, lse_tau: Optional[float] = None,
                num_items: Optional[int] = None) -> torch.Tensor:
    """logsumexp(z / tau) over the catalog [B], from the top-k logits and `lse` cached at `lse_tau`.

    Exact when lse_tau is None or equals tau; otherwise the flat-tail approximation (needs num_items)."""
    if lse_tau is None or lse_tau == tau:
        return lse
    k = topk_logits.shape[1]
    if num_items is None:
        raise ValueError("teacher_lse at tau != lse_tau needs num_items (the tail's size)")
    top_tau = torch.logsumexp(topk_logits / tau, 1)
    m = num_items - k
    if m <= 0:
        return top_tau
    tail_c = lse + _log1mexp(torch.logsumexp(topk_logits / lse_tau, 1) - lse)  # log tail sum at lse_tau
    log_m = math.log(m)
    tail_tau = log_m + (lse_tau / tau) * (tail_c - log_m)  # m items, each at the mean tail value
    return torch.logaddexp(top_tau, tail_tau)


def _student_parts(student_logits: torch.Tensor, ids: torch.Tensor, tau: float):
    """Student log-probs at `ids` [B, k], log of its mass outside them [B] (None if k = N), the
    tempered logits and their logsumexp [B, 1]. The outside mass is 1 - (mass at ids), from [B, k]
    tensors only: no second pass over the catalog (exact to about 1e-6 of the total in float32)."""
    u = student_logits / tau
    log_z = torch.logsumexp(u, 1, keepdim=True)
    log_s = u.gather(1, ids) - log_z
    if ids.shape[1] >= u.shape[1]:
        return log_s, None, u, log_z
    tiny = math.log(torch.finfo(u.dtype).tiny)
    return log_s, _log1mexp(torch.logsumexp(log_s, 1)).clamp(min=tiny), u, log_z


def topk_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logits: torch.Tensor, lse: torch.Tensor,
            tau: float = 1.0, lse_tau: Optional[float] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(teacher || student) over k + 1 buckets, the k cached items and the rest ("tail"), x tau^2.

    The teacher's tail mass is 1 - sum of its top-k probabilities (known from the LSE); the
    student's is its mass outside those k ids. With k = N it is the full-softmax KL. A lower
    bound of the full KL (merging items loses information), exact in the tail's total mass."""
    n = student_logits.shape[1]
    log_p = topk_logits / tau - teacher_lse(topk_logits, lse, tau, lse_tau, n)[:, None]
    p = log_p.exp()
    log_s, log_s_tail, _, _ = _student_parts(student_logits, topk_ids, tau)
    per_row = (p * (log_p - log_s)).sum(1)
    if log_s_tail is not None:
        p_tail = (1.0 - p.sum(1)).clamp(min=0.0)
        per_row = per_row + torch.xlogy(p_tail, p_tail) - p_tail * log_s_tail
    return _mean_rows(per_row, mask) * tau**2


def sampled_tail_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logits: torch.Tensor,
                    lse: torch.Tensor, tail_ids: torch.Tensor, tail_logits: torch.Tensor, tail_logq: torch.Tensor,
                    tau: float = 1.0, lse_tau: Optional[float] = None,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full-catalog KL(teacher || student), x tau^2: exact over the top-k, importance-sampled
    over the tail (RS-KD-style, "Sparse Logit Sampling", 2025: sampling, not truncation, keeps it unbiased).

    With tail items j_1..j_s drawn i.i.d. from q over the items outside the top-k,
        sum_{j in tail} p_j (log p_j - log s_j)  ~  (1/s) sum_r (p_jr / q_jr) (log p_jr - log s_jr),
    unbiased for any q that covers the tail; so is its gradient in the student's logits. With q the
    teacher's tail softmax at tau (distkd.cache.topk's default) the weights p/q are the constant
    tail mass, the lowest-variance choice for the teacher's side."""
    n = student_logits.shape[1]
    lse_t = teacher_lse(topk_logits, lse, tau, lse_tau, n)[:, None]
    log_p = topk_logits / tau - lse_t
    log_s, _, u, log_z = _student_parts(student_logits, topk_ids, tau)
    exact = (log_p.exp() * (log_p - log_s)).sum(1)
    log_pt = tail_logits / tau - lse_t
    w = (log_pt - tail_logq).exp() / tail_ids.shape[1]
    log_st = u.gather(1, tail_ids) - log_z
    return _mean_rows(exact + (w * (log_pt - log_st)).sum(1), mask) * tau**2


def ranking_distillation(student_logits: torch.Tensor, topk_ids: torch.Tensor, position_decay: Optional[float] = None,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Ranking distillation on the teacher's top-k order: the negative log-likelihood of that order
    as the first k draws of a Plackett-Luce model over the whole catalog with the student's logits
    (top-k ListMLE, Xia et al. 2008), position r weighted by exp(-r / position_decay) as in Tang &
    Wang's ranking distillation (KDD 2018); uniform when position_decay is None.

        nll_r = log sum_{j not in pi_1..pi_(r-1)} exp(u_j) - u_(pi_r),   loss = sum_r w_r nll_r, sum w = 1

    Only the order is used, not the teacher's values; shift-invariant in the student's logits."""
    top = student_logits.gather(1, topk_ids)  # [B, k] in the teacher's order
    suffix = torch.logcumsumexp(top.flip(1), 1).flip(1)  # logsumexp of top[:, r:]
    if topk_ids.shape[1] < student_logits.shape[1]:
        log_z = torch.logsumexp(student_logits, 1, keepdim=True)
        tail = log_z + _log1mexp(suffix[:, :1] - log_z).clamp(min=math.log(torch.finfo(top.dtype).tiny))
        suffix = torch.logaddexp(suffix, tail)
    nll = suffix - top
    k = topk_ids.shape[1]
    if position_decay is None:
        w = torch.full((k,), 1.0 / k, dtype=nll.dtype, device=nll.device)
    else:
        w = torch.exp(-torch.arange(1, k + 1, dtype=nll.dtype, device=nll.device) / position_decay)
        w = w / w.sum()
    return _mean_rows((nll * w).sum(1), mask)


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full-softmax cross-entropy against the labels, averaged over labelled rows (-1 = none)."""
    keep = labels >= 0
    total = F.cross_entropy(student_logits, labels.clamp(min=0), reduction="none")
    return (total * keep).sum() / keep.sum().clamp(min=1)


def sampled_softmax_ce(query: torch.Tensor, item_table: Union[torch.Tensor, Callable], labels: torch.Tensor,
                       num_samples: int, proposal: torch.Tensor, item_bias: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None, negatives: Optional[torch.Tensor] = None,
                       remove_accidental_hits: bool = True) -> torch.Tensor:
    """Sampled-softmax cross-entropy with the logQ correction, for catalogs too large to score.

    `num_samples` negatives are drawn with replacement from `proposal` (probabilities over the
    catalog, e.g. label frequency^0.75), shared by the batch; `item_table` is the item embedding
    [N, D] (plus `item_bias`) or a callable (query, ids) -> logits such as NextItemModel.score.
    Each negative's logit is corrected by -log(S q_j) and negatives equal to the row's label are
    dropped, so the denominator exp(u_y) + sum_r exp(u_jr) / (S q_jr) is an unbiased estimate of
    the full softmax's partition function: the loss tends to the full-softmax CE as S grows
    (Bengio & Senecal 2008; Jean et al. 2015). Rows with label -1 are ignored."""
    q = proposal / proposal.sum()
    if negatives is None:
        negatives = torch.multinomial(q, num_samples, replacement=True, generator=generator)
    keep = labels >= 0
    y = labels.clamp(min=0)
    if callable(item_table):
        pos = item_table(query, y[:, None])[:, 0]
        neg = item_table(query, negatives)
    else:
        pos = (query * item_table[y]).sum(1)
        neg = query @ item_table[negatives].t()
        if item_bias is not None:
            pos, neg = pos + item_bias[y], neg + item_bias[negatives]
    neg = neg - torch.log(negatives.shape[0] * q[negatives])
    if remove_accidental_hits:
        # A finite fill: a row whose every negative is its label keeps a finite gradient.
        neg = neg.masked_fill(negatives[None, :] == y[:, None], torch.finfo(neg.dtype).min)
    per_row = torch.logaddexp(pos, torch.logsumexp(neg, 1)) - pos
    return (per_row * keep).sum() / keep.sum().clamp(min=1)
