"""What a warm start (`init: {path: PATH}`) reads its weights from: an export or a checkpoint.

    PATH is                                   read as
    an export dir (export.json)               the file form (model.pt) or the sharded form
    a checkpoint dir (step-N/ with COMMITTED)  that checkpoint
    a run dir (checkpoints/ in it)            its latest committed checkpoint

Every source is described by plain data before anything loads (the preflight compares it
with the job): each tensor's global shape under one key space, the train module's state-dict
keys (`model.<param>`, optimizer state `model.<param>/<name>`, as distkd.train.checkpoint
names it), the model config, and the schema when the source records one (exports always;
checkpoints since they carry it in COMMITTED). `read` then fills the requested tensors,
ShardedTensors of any plan or plain ones, in place. Nothing pickled runs: export files load
with torch.load(weights_only=True), DCP metadata through distkd.dcp_reader.SafeReader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch.distributed.checkpoint as dcp

from distkd.config import ConfigError, from_dict
from distkd.data.schema import Schema
from distkd.dcp_reader import SafeReader
from distkd.errors import CheckpointError
from distkd.models import export as exports, sharded_export as sharded
from distkd.train.checkpoint import MARKER, latest, read_marker

PREFIX = "model."  # the model's keys inside the train module's state dict (and its export)


@dataclass
class InitSource:
    path: Path
    kind: str  # "export" | "checkpoint"
    form: str  # export: "file" | "sharded"; checkpoint: "dcp"
    model: dict[str, Any]  # the model config it was written with
    shapes: dict[str, tuple[int, ...]]  # `model.<param>` -> global shape
    optim_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # `model.<param>/<name>` (checkpoints)
    schema: Optional[Schema] = None  # None: a checkpoint written before COMMITTED recorded it
    step: Optional[int] = None
    world_size: Optional[int] = None

    def describe(self) -> str:
        if self.kind == "export":
            return f"{self.path} ({self.form} export)"
        return f"{self.path} (checkpoint at step {self.step}, written by {self.world_size} rank(s))"

    def read(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        """Collective for DCP sources: fill every value of `model` / `optim` (keyed as `shapes`
        / `optim_shapes`; each the source tensor's global shape) in place, under this rank's plan."""
        if self.kind == "checkpoint":
            _dcp_load(self.path, {"model": model, "optim": optim}, "checkpoint")
            return
        payload = exports.load_payload(self.path / exports.read_meta(self.path)["file"], mmap=True)["state_dict"]
        tables = {k[len(PREFIX):]: v for k, v in model.items() if sharded.is_table(k)}
        if self.form == sharded.FORM:
            sharded.load_tables(self.path, tables, distributed=True)
        else:
            for key, target in tables.items():
                sharded.fill_from_full(target, payload[key])
        for key, target in model.items():
            if not sharded.is_table(key):
                sharded.fill_from_full(target, payload[key[len(PREFIX):]])


def _dcp_load(folder: Path, tensors: dict[str, Any], what: str) -> None:
    try:
        dcp.load(tensors, storage_reader=SafeReader(folder, what=what))
    except CheckpointError:
        raise
    except Exception as e:  # DCP wraps rank failures; say which folder and what
        raise CheckpointError(f"{folder}: cannot load: {' '.join(str(e).split())[:500]}") from None


def _dcp_shapes(folder: Path, what: str) -> dict[str, tuple[int, ...]]:
    try:
        metadata = SafeReader(folder, what=what).read_metadata()
    except CheckpointError as e:
        raise ConfigError(f"init.path: {e}") from None
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def _schema(data: Any, where: str) -> Optional[Schema]:
    return from_dict(Schema, data, where) if isinstance(data, dict) else None


def _open_export(path: Path) -> InitSource:
    meta = exports.read_meta(path)
    exports.verify_export(path, meta)  # the fingerprinted weights, or a ConfigError naming the file
    payload = exports.load_payload(path / meta["file"], mmap=True)  # tensors stay on disk: shapes only
    if not isinstance(payload, dict) or payload.get("format") != exports.EXPORT_FORMAT:
        raise ConfigError(f"init.path: {path}: not an export of format {exports.EXPORT_FORMAT}")
    shapes = {PREFIX + k: tuple(v.size()) for k, v in payload["state_dict"].items()}
    form = meta.get("form", "file")
    if form == sharded.FORM:
        shapes.update({PREFIX + k: s for k, s in _dcp_shapes(path / sharded.TABLES_DIR, "export").items()})
    return InitSource(path, "export", form, payload["model"], shapes,
                      schema=_schema(payload["schema"], f"{path}:schema"))


def _open_checkpoint(path: Path) -> InitSource:
    try:
        meta = read_marker(path)
    except CheckpointError as e:
        raise ConfigError(f"init.path: {e}") from None
    model: dict[str, tuple[int, ...]] = {}
    optim: dict[str, tuple[int, ...]] = {}
    for key, shape in _dcp_shapes(path, "checkpoint").items():
        group, _, name = key.partition(".")
        (model if group == "model" else optim if group == "optim" else {})[name] = shape
    return InitSource(path, "checkpoint", "dcp", meta.get("identity", {}).get("model", {}), model, optim,
                      schema=_schema(meta.get("schema"), f"{path / MARKER}:schema"), step=meta.get("step"),
                      world_size=meta.get("world_size"))


def open_source(path: str | Path) -> InitSource:
    """The source at `path` (see the module), described; ConfigError if it is none of them."""
    p = Path(path)
    if (p / exports.META_FILE).is_file():
        return _open_export(p)
    if (p / MARKER).is_file():
        return _open_checkpoint(p)
    if (p / "checkpoints").is_dir():
        found = latest(p / "checkpoints")
        if found is None:
            raise ConfigError(f"init.path: {p}: a run directory without a committed checkpoint")
        return _open_checkpoint(found)
    if not p.exists():
        raise ConfigError(f"init.path: {p}: no such directory")
    raise ConfigError(f"init.path: {p}: neither an export ({exports.META_FILE}), a committed checkpoint ({MARKER}) "
                      "nor a run directory (checkpoints/)")
