"""Reading torch.distributed.checkpoint (DCP) folders without running pickled code.

DCP's `.metadata` file is a pickle. `SafeReader` is DCP's file reader with that file read
by an unpickler that builds DCP's own metadata classes, torch sizes and dtypes and nothing
else, and it refuses a folder whose metadata lists pickled objects (DCP's "bytes" items,
which it would unpickle on load). The tensor files themselves DCP reads with
`torch.load(weights_only=True)`. Training checkpoints (distkd.train.checkpoint) and sharded
teacher exports (distkd.models.sharded_export) both read through it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from distkd.errors import CheckpointError

METADATA_FILE = ".metadata"

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
        "StorageMeta", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch dtypes and nothing else."""

    def __init__(self, fh, what: str):
        super().__init__(fh)
        self.what = what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.what} metadata refers to {module}.{name}, which a DCP checkpoint never needs")


class SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by `_MetadataUnpickler`; pickled objects refused.
    `what` names the folder's kind in errors ("checkpoint", "export")."""

    def __init__(self, path: str | Path, what: str = "checkpoint"):
        super().__init__(path)
        self.what = what

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA_FILE
        try:
            with open(path, "rb") as fh:
                metadata = _MetadataUnpickler(fh, self.what).load()
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise CheckpointError(f"{path}: unreadable DCP metadata: {e}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata")
        objects = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        if objects:
            raise CheckpointError(f"{Path(self.path)}: holds pickled objects ({objects[:3]}); distkd {self.what}s hold "
                                  "tensors only, and loading these would run their code")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
