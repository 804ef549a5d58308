"""The batch the model trains on, and its assembly from decoded rows.

A `Batch` is what a rank's loader yields: the sparse features as one KeyedJaggedTensor (the
input of TorchRec's sharded EmbeddingBagCollection), dense features, labels with NaN for
none, ids, and aligned side columns such as cached teacher logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from distkd.data.rows import Rows

__all__ = ["Batch", "Transfer", "to_batch", "transfer_for"]


class Transfer(NamedTuple):
    """How batches reach a device: pinned by the loader, copied with non_blocking."""

    pin_memory: bool
    non_blocking: bool


def transfer_for(device: torch.device | str) -> Transfer:
    """CUDA: pin batches in the loader's thread and copy them with non_blocking=True (the copy
    overlaps compute). Anything else (CPU): neither, and batches stay as they are."""
    cuda = torch.device(device).type == "cuda"
    return Transfer(pin_memory=cuda, non_blocking=cuda)


@dataclass
class Batch(Pipelineable):
    """TorchRec's Pipelineable (`to`, `record_stream`, `pin_memory`): what its train pipelines
    move between devices and CUDA streams."""

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

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.dense, self.labels, self.example_id, self.request_id, self.classes,
                            *self.extras.values()) if t is not None]

    def record_stream(self, stream: torch.Stream) -> None:
        """Mark every tensor as used on `stream` (the pipeline copies on one CUDA stream and
        computes on another), so the caching allocator does not reuse it too early."""
        self.sparse.record_stream(stream)
        for t in self._tensors():
            t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        """The batch in page-locked host memory, so that `to(cuda, non_blocking=True)` overlaps."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return Batch(
            self.sparse.pin_memory(),
            pin(self.dense),
            pin(self.labels),
            pin(self.example_id),
            pin(self.request_id),
            {k: pin(v) for k, v in self.extras.items()},
            pin(self.classes),
        )

    def __len__(self) -> int:
        return self.example_id.shape[0]


def _tensor(x: np.ndarray) -> torch.Tensor:
    # Own the memory: a batch must not pin a whole row group or an Arrow buffer.
    return torch.from_numpy(np.array(x, copy=True, order="C"))


def to_batch(rows: Rows, keys: list[str]) -> Batch:
    n = len(rows)
    values, lengths, per_key = rows.block.kjt_arrays()  # key-major: all rows of key 0, then key 1, ...
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(values),
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
