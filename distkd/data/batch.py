"""The batch the model trains on, and its assembly from decoded rows.

A `Batch` is what a rank's loader yields: the sparse features as one KeyedJaggedTensor (the
input of TorchRec's sharded EmbeddingBagCollection), dense features, labels with NaN for
none, ids, and aligned side columns such as cached teacher logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from distkd.data.rows import Rows

__all__ = ["Batch", "to_batch"]


@dataclass
class Batch:
    sparse: KeyedJaggedTensor  # keys = schema.sparse names; int64 values, int32 lengths
    dense: torch.Tensor  # float32 [B, n_dense], transforms applied
    labels: torch.Tensor  # float32 [B, binary tasks], NaN where the label is null
    example_id: torch.Tensor  # int64 [B]
    request_id: torch.Tensor | None  # int64 [B] if the schema has one
    extras: dict[str, torch.Tensor]  # aligned side columns, float32 [B] or [B, k] (int64 item ids)
    classes: torch.Tensor | None = None  # int64 [B, multiclass tasks], -1 where none

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(
            self.sparse.to(device, non_blocking=non_blocking),
            mv(self.dense),
            mv(self.labels),
            mv(self.example_id),
            mv(self.request_id),
            {k: mv(v) for k, v in self.extras.items()},
            mv(self.classes),
        )

    def __len__(self) -> int:
        return self.example_id.shape[0]


def _tensor(x: np.ndarray) -> torch.Tensor:
    # Own the memory: a batch must not pin a whole row group or an Arrow buffer.
    return torch.from_numpy(np.array(x, copy=True, order="C"))


def to_batch(rows: Rows, keys: list[str]) -> Batch:
    n = len(rows)
    lengths = np.ones(len(keys) * n, np.int32)  # key-major: all rows of key 0, then key 1, ...
    for k, (_, offsets) in enumerate(rows.sparse):
        if offsets is not None:
            np.subtract(offsets[1:], offsets[:-1], out=lengths[k * n : (k + 1) * n], casting="unsafe")
    per_key = [len(v) for v, _ in rows.sparse]
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate([v for v, _ in rows.sparse])),
        lengths=torch.from_numpy(lengths),
        stride=n,
        length_per_key=per_key,
        offset_per_key=[0, *np.cumsum(per_key).tolist()],
    )
    return Batch(
        kjt,
        _tensor(rows.dense),
        _tensor(rows.labels),
        _tensor(rows.ids),
        None if rows.request is None else _tensor(rows.request),
        {k: _tensor(v) for k, v in rows.extras.items()},
        None if rows.classes is None else _tensor(rows.classes),
    )
