"""Loss functions of the CTR objectives, on plain tensors (per task, [T]).

Labels are float with NaN for rows that have none; a loss over labels averages over
the labelled rows of each task only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-task mean BCE over rows whose target is not NaN: [T]."""
    mask = ~torch.isnan(targets)
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    loss = F.binary_cross_entropy_with_logits(logits, safe, reduction="none") * mask
    return loss.sum(0) / mask.sum(0).clamp(min=1)


def soft_bce(student: torch.Tensor, teacher: torch.Tensor, tau: float, mask: torch.Tensor | None = None,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-task soft-label BCE at temperature tau, scaled by tau² (so its gradient,
    tau * (sigmoid(s/tau) - sigmoid(t/tau)), keeps its size as tau changes): [T]."""
    target = torch.sigmoid(teacher / tau)
    loss = F.binary_cross_entropy_with_logits(student / tau, target, reduction="none") * tau**2
    return _mean_rows(loss, mask, weight)


def logit_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-task mean squared error between logits: [T]."""
    return _mean_rows((student - teacher) ** 2, mask, weight)


def listwise_kl(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor, tau: float,
                mask: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-task KL(teacher || student) of the softmax over the rows sharing a request, at
    temperature tau and scaled by tau², averaged over requests of two or more rows: [T].

    `groups` is any int64 id per row (request_id); rows of a request need not be adjacent.
    `weight` [B] scales each row's part of its request's KL.
    """
    if mask is not None:
        student, teacher, groups = student[mask], teacher[mask], groups[mask]
        weight = weight[mask] if weight is not None else None
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    log_p_s = _group_log_softmax(student / tau, inverse, n_groups)
    log_p_t = _group_log_softmax(teacher / tau, inverse, n_groups)
    per_row = log_p_t.exp() * (log_p_t - log_p_s)  # [N, T]
    if weight is not None:
        per_row = per_row * weight.to(per_row.dtype).unsqueeze(1)
    per_group = torch.zeros(n_groups, student.shape[1], dtype=student.dtype, device=student.device)
    per_group.index_add_(0, inverse, per_row)
    lists = counts > 1  # a one-row request has nothing to rank
    if not lists.any():
        return student.sum(0) * 0.0
    return per_group[lists].mean(0) * tau**2


def _group_log_softmax(z: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    idx = group.unsqueeze(1).expand_as(z)
    peak = torch.full((n_groups, z.shape[1]), float("-inf"), dtype=z.dtype, device=z.device)
    peak = peak.scatter_reduce(0, idx, z, reduce="amax").detach()  # for stability only
    shifted = z - peak[group]
    denom = torch.zeros(n_groups, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, group, shifted.exp())
    return shifted - denom.log()[group]


def hint_mse(projected: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Feature distillation: mean over rows of the squared error, averaged over hidden units: scalar."""
    err = ((projected - teacher_hidden) ** 2).mean(1, keepdim=True)
    return _mean_rows(err, mask, weight).squeeze(0)


def _mean_rows(loss: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the (masked) rows; `weight` [B] scales each row's loss, the divisor stays the row
    count (a weight below 1 shrinks the term rather than being renormalised away)."""
    if weight is not None:
        loss = loss * weight.to(loss.dtype).unsqueeze(1)
    if mask is None:
        return loss.mean(0)
    m = mask.to(loss.dtype).unsqueeze(1)
    return (loss * m).sum(0) / m.sum().clamp(min=1)
