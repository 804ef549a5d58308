"""Next-item (retrieval) metrics with one relevant item per row, the label, aggregated across ranks.

Per row the label's 0-based rank among the catalog's logits gives Recall@K (the label is in the
top K), NDCG@K (1 / log2(rank + 2) inside the top K; the ideal DCG of one relevant item is 1) and
MRR (1 / (rank + 1), untruncated). Ties are broken by ascending item id, as torch.argmax and the
top-k cache do, so a row's rank is never ambiguous. The top-1 prediction gives accuracy and
macro precision / recall / F1 over the classes that occur as a label or a prediction (a class's
precision is 0 when it is never predicted, sklearn's zero_division=0; F1 is per class, then
averaged).

Everything is a sum (float64 tensors), so `compute()` all-reduces them once over the default
process group: exact whatever the sharding of the rows. Rows with label -1 are skipped.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def label_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's label [B] (ties: ascending id first); labels must be >= 0."""
    at = logits.gather(1, labels[:, None])
    ids = torch.arange(logits.shape[1], device=logits.device)[None, :]
    return (logits > at).sum(1) + ((logits == at) & (ids < labels[:, None])).sum(1)


def expected_recall_at_k(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """The oracle's expected Recall@K per row [B]: the true mass of its K most probable items
    (the label's draw averaged out; lower variance than the sampled labels' recall)."""
    return log_probs.topk(k, dim=1).values.exp().sum(1)


class RetrievalMetrics:
    """Accumulate over batches; `compute()` is collective when a process group is up (call it on
    every rank)."""

    def __init__(self, num_classes: int, ks: Sequence[int] = (1, 5, 10, 20, 50)):
        self.num_classes, self.ks = num_classes, tuple(ks)
        # rows, sum 1/(rank+1), then per K: hits, sum of DCG; and rows with a top-1 prediction
        self.sums = torch.zeros(3 + 2 * len(self.ks), dtype=torch.float64)
        # per class: true positives (top-1), predictions, labels
        self.per_class = torch.zeros(3, num_classes, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Full-catalog logits [B, N] (any monotone transform of them: log-probs work) and labels [B]."""
        keep = labels >= 0
        logits, labels = logits.detach()[keep], labels[keep]
        if not len(labels):
            return
        ranks = label_ranks(logits, labels)
        preds = logits.argmax(1)
        self.update_ranks(ranks.cpu(), labels.cpu(), preds.cpu())

    @torch.no_grad()
    def update_ranks(self, ranks: torch.Tensor, labels: Optional[torch.Tensor] = None,
                     preds: Optional[torch.Tensor] = None) -> None:
        """From precomputed ranks (e.g. the synthetic logs' `oracle_rank`); without `preds` the
        macro precision / recall / F1 stay undefined (NaN)."""
        r = ranks.to(torch.float64).reshape(-1)
        s = [float(len(r)), (1.0 / (r + 1)).sum().item()]
        dcg = 1.0 / torch.log2(r + 2)
        for k in self.ks:
            hit = r < k
            s += [hit.sum().item(), (dcg * hit).sum().item()]
        s.append(float(len(r)) if preds is not None else 0.0)
        self.sums += torch.tensor(s, dtype=torch.float64)
        if preds is not None:
            labels, preds = labels.reshape(-1).long(), preds.reshape(-1).long()
            ones = torch.ones(len(labels), dtype=torch.float64)
            self.per_class[0].index_add_(0, labels[preds == labels], ones[preds == labels])
            self.per_class[1].index_add_(0, preds, ones)
            self.per_class[2].index_add_(0, labels, ones)

    def compute(self) -> dict[str, float]:
        flat = torch.cat([self.sums, self.per_class.reshape(-1)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
        sums, per_class = flat[: len(self.sums)], flat[len(self.sums):].reshape(3, -1)
        n = sums[0].item()
        nan = float("nan")
        out: dict[str, float] = {"rows": n, "mrr": sums[1].item() / n if n else nan}
        for i, k in enumerate(self.ks):
            out[f"recall@{k}"] = sums[2 + 2 * i].item() / n if n else nan
            out[f"ndcg@{k}"] = sums[3 + 2 * i].item() / n if n else nan
        tp, pred, true = per_class
        present = (pred + true) > 0
        if sums[-1].item() > 0 and present.any():
            precision = torch.where(pred > 0, tp / pred.clamp(min=1), 0.0)[present]
            recall = torch.where(true > 0, tp / true.clamp(min=1), 0.0)[present]
            f1 = (2 * tp / (pred + true).clamp(min=1))[present]
            out.update(accuracy=tp.sum().item() / sums[-1].item(), macro_precision=precision.mean().item(),
                       macro_recall=recall.mean().item(), macro_f1=f1.mean().item())
        else:
            out.update(accuracy=out.get("recall@1", nan) if 1 in self.ks else nan,
                       macro_precision=nan, macro_recall=nan, macro_f1=nan)
        return out

    def reset(self) -> None:
        self.sums.zero_()
        self.per_class.zero_()


def gap_recovered(kd: float, hard: float, teacher: float) -> float:
    """eta = (metric_KD - metric_hard) / (metric_teacher - metric_hard)."""
    return (kd - hard) / (teacher - hard) if teacher != hard else math.nan
