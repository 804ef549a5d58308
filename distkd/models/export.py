"""The model export contract, in two forms; `load_export` loads either.

file (`model.pt`): {"format", "role", "schema", "model", "state_dict"} in one file that
loads with `torch.load(weights_only=True)`: plain tensors, strings and numbers only, so
loading executes no pickled code. Gathered on rank 0; what a student is served from.

sharded (a teacher too large to gather): `dense.pt` (the same payload, dense layers only)
plus the embedding tables as DCP shards written by every rank (distkd.models.sharded_export).

`export.json` beside them records the form, the teacher's fingerprint that the logit cache
keys on (`sha256`: of `model.pt`, or of every file of the sharded form), parameter counts
and the metrics it was exported with. `verify_export` recomputes the fingerprint.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from distkd.config import ConfigError, coerce, from_dict, to_dict
from distkd.data.roles import view_fingerprint
from distkd.data.schema import Schema
from distkd.models import ModelSpec, build_model, sharded_export as sharded
from distkd.storage import atomic_write_bytes, replace_dir, sha256_file

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 1
MODEL_FILE = "model.pt"
DENSE_FILE = "dense.pt"
META_FILE = "export.json"
PARTIAL = ".partial"


@dataclass
class ExportConfig:
    # file: one model.pt gathered on rank 0 (servable); sharded: the tables as DCP shards written
    # by every rank, never gathered. auto: sharded for a teacher on more than one rank whose
    # tables exceed gather_limit_bytes, else file.
    format: Literal["auto", "file", "sharded"] = "auto"
    gather_limit_bytes: int = 1 << 30

    def validate(self) -> None:
        if self.gather_limit_bytes < 0:
            raise ConfigError(f"gather_limit_bytes: must be >= 0, got {self.gather_limit_bytes}")


def _numel(t: Any) -> int:
    return math.prod(t.size())  # a ShardedTensor's global size


def export_form(cfg: ExportConfig, role: str, world_size: int, state_dict: dict[str, Any], prefix: str = "") -> str:
    """"file" or "sharded": what `cfg` asks for, `auto` decided by the size of the tables."""
    if cfg.format != "auto":
        return cfg.format
    tables, _ = sharded.split_state_dict(state_dict, prefix)
    size = sum(_numel(t) * t.dtype.itemsize for t in tables.values())
    return "sharded" if role == "teacher" and world_size > 1 and size > cfg.gather_limit_bytes else "file"


def gather_state_dict(dmp: torch.nn.Module, rank: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Collective: the full, unsharded state dict on rank 0 (empty elsewhere), of the keys under
    `prefix` (e.g. "model." of a train module), with the prefix removed."""
    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        key = key.removeprefix("module.")
        if not key.startswith(prefix):
            continue
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            value = full
        elif isinstance(value, torch.Tensor):
            value = value.detach().cpu().clone()
        if rank == 0 and value is not None:
            out[key[len(prefix):]] = value
    return out


def _write_payload(path: Path, role: str, schema: Schema, cfg, state_dict: dict[str, torch.Tensor]) -> None:
    payload = {"format": EXPORT_FORMAT, "role": role, "schema": to_dict(schema), "model": to_dict(cfg),
               "state_dict": state_dict}
    atomic_write_bytes(path, lambda fh: torch.save(payload, fh))


def _write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write_bytes(out_dir / META_FILE, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))


def _describe(role: str, schema: Schema, cfg, form: str, file: str) -> dict[str, Any]:
    return {"format": EXPORT_FORMAT, "form": form, "role": role, "file": file,
            "schema_fingerprint": schema.fingerprint(), "features": schema.feature_names, "model": to_dict(cfg)}


def schema_mismatch(meta: dict[str, Any], schema: Schema) -> Optional[str]:
    """Why the export of `meta` (its export.json) cannot read logs of `schema`, None if it can.
    An export reads a view of the logs (a student: their shared features; `features` in
    export.json, absent from exports older than roles: all): the logs' schema narrowed to its
    features must have the export's fingerprint."""
    got = meta.get("schema_fingerprint")
    try:
        want = view_fingerprint(schema, meta.get("features"))
    except ConfigError as e:
        return f"exported for schema {got}, which reads features these logs lack ({e})"
    return None if got == want else f"exported for schema {got}, the logs have schema {want}"


def write_export(out_dir: str | Path, role: str, schema: Schema, cfg,
                 state_dict: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The file form: `model.pt` (the whole state dict, gathered) and export.json."""
    out_dir = Path(out_dir)
    path = out_dir / MODEL_FILE
    _write_payload(path, role, schema, cfg, state_dict)
    meta = {**_describe(role, schema, cfg, "file", MODEL_FILE), "sha256": sha256_file(path),
            "bytes": path.stat().st_size, "parameters": sum(t.numel() for t in state_dict.values()), **(extra or {})}
    _write_meta(out_dir, meta)
    return meta


def write_sharded_export(out_dir: str | Path, role: str, schema: Schema, cfg, state_dict: dict[str, Any],
                         rank: int, world_size: int, prefix: str = "",
                         extra: dict[str, Any] | None = None) -> Optional[dict[str, Any]]:
    """Collective: the sharded form of a (DistributedModelParallel) state dict, the keys under
    `prefix`. Every rank writes its table shards, rank 0 the dense layers and export.json, all
    into `.<out>.partial/`, which rank 0 renames to `out` once complete: a half-written export
    is never where a reader looks. Returns export.json's content on rank 0, None elsewhere."""
    final = Path(out_dir)
    partial = final.with_name(f".{final.name}{PARTIAL}")
    tables, dense = sharded.split_state_dict(state_dict, prefix)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash mid-export
        partial.mkdir(parents=True)
    _barrier()
    meta = None
    try:
        files = sharded.save_tables(partial / sharded.TABLES_DIR, tables, rank, world_size)
        if rank == 0:
            _write_payload(partial / DENSE_FILE, role, schema, cfg, {k: v.detach().cpu() for k, v in dense.items()})
            files[DENSE_FILE] = sha256_file(partial / DENSE_FILE)
            meta = {**_describe(role, schema, cfg, sharded.FORM, DENSE_FILE), "files": dict(sorted(files.items())),
                    "world_size": world_size}
            meta["sha256"] = sharded.fingerprint(meta)
            meta.update(bytes=sum(p.stat().st_size for p in partial.rglob("*") if p.is_file()),
                        parameters=sum(_numel(t) for t in (*tables.values(), *dense.values())), **(extra or {}))
            _write_meta(partial, meta)
            replace_dir(partial, final)
    except BaseException:  # a full disk, a lost rank (DCP's CheckpointException is a BaseException)
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # never published, never trusted
        raise
    _barrier()
    logger.debug("rank %d: sharded export of %d tables written to %s", rank, len(tables), final)
    return meta


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def read_meta(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / META_FILE
    if not path.is_file():
        raise ConfigError(f"{export_dir}: no {META_FILE}; is this an exported model directory?")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    name = meta.get("file") if isinstance(meta, dict) else None
    # the weights file is a plain name inside the export directory, never a path out of it
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"{path}: file: {name!r} must be the name of a file in {export_dir}")
    return meta


def resolve_export(path: str | Path) -> Path:
    """An export directory, or a training run directory whose export/ is one."""
    p = Path(path)
    for d in (p, p / "export"):
        if (d / META_FILE).is_file():
            return d
    if not p.exists():
        raise ConfigError(f"{p}: no such export directory")
    raise ConfigError(f"{p}: not a model export (no {META_FILE} here nor in {p / 'export'})")


def unpickling_refusal(e: BaseException) -> str:
    """The line of a torch.load(weights_only=True) refusal that names the global it refused."""
    lines = str(e).splitlines() or [""]
    return next((line for line in lines if "GLOBAL" in line), lines[0][:200]).strip()


def load_payload(path: str | Path, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` of an export's file: tensors, containers, strings and
    numbers; a pickled callable (or any other object) is refused, never run. With `mmap`, the
    tensors stay on disk: the check alone, cheap for the driver of a cache build."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: refused: it holds pickled objects, not only tensors ({unpickling_refusal(e)}); "
                          "an export is loaded with torch.load(weights_only=True)") from None
    except RuntimeError as e:
        raise ConfigError(f"{path}: not a torch file: {(str(e).splitlines() or [''])[0][:200]}") from None


def verify_export(export_dir: str | Path, meta: Optional[dict[str, Any]] = None) -> str:
    """The export's fingerprint (export.json's `sha256`), recomputed from its files: the sha256
    of model.pt, or of every file of the sharded form (sharded_export.check_files). A file that
    does not match is a ConfigError naming it. What `cache verify` checks a teacher with."""
    export_dir = Path(export_dir)
    meta = read_meta(export_dir) if meta is None else meta
    if meta.get("form", "file") == sharded.FORM:
        return sharded.check_files(export_dir, meta)
    digest = sha256_file(export_dir / meta["file"])
    if digest != meta["sha256"]:
        raise ConfigError(f"{export_dir}: {meta['file']} has sha256 {digest[:12]}…, {META_FILE} says "
                          f"{meta['sha256'][:12]}…: not the file its metadata names")
    return digest


def check_loadable(export_dir: str | Path, meta: dict[str, Any]) -> None:
    """Refuse (ConfigError) an export whose files would run pickled code, without loading its
    tensors: model.pt / dense.pt memory-mapped, a sharded export's DCP metadata read safely."""
    load_payload(Path(export_dir) / meta["file"], mmap=True)
    if meta.get("form", "file") == sharded.FORM:
        sharded.check_metadata(export_dir)


def load_export(export_dir: str | Path, verify: bool = True, device: str | torch.device = "cpu",
                parallel: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the exported model (eval mode), either form, and return it with its metadata.

    Without `parallel`: one process, an unsharded model (a sharded export's tables are read
    into plain tensors). With `parallel` (collective: every rank of the group calls it), the
    model is built with its tables on meta and handed to `parallel`, which returns it wrapped
    in a DistributedModelParallel under this world's plan; each rank then reads its own shards
    (DCP reshards a sharded export from any world size; a file export is sliced).

    With verify, the files must hash to export.json's fingerprint (`verify_export`): a model
    that is not the fingerprinted one is never used silently.
    """
    export_dir = Path(export_dir)
    meta = read_meta(export_dir)
    if verify:
        verify_export(export_dir, meta)
    path = export_dir / meta["file"]
    payload = load_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{path}: export format {payload.get('format') if isinstance(payload, dict) else '?'} "
                          f"is not {EXPORT_FORMAT}")
    schema = from_dict(Schema, payload["schema"], f"{path}:schema")
    cfg = coerce(payload["model"], ModelSpec, f"{path}:model")
    device = torch.device(device)
    is_sharded = meta.get("form", "file") == sharded.FORM
    if parallel is None:
        model = build_model(schema, cfg, device=device, sparse_device=device)
        state = payload["state_dict"]
        if is_sharded:
            tables, _ = sharded.split_state_dict(model.state_dict())
            sharded.load_tables(export_dir, tables, distributed=False)
            state = {**state, **tables}
        model.load_state_dict(state)
        return model.eval(), meta
    model = parallel(build_model(schema, cfg, device=device))
    state = model.state_dict()
    tables, _ = sharded.split_state_dict(state)
    if is_sharded:
        sharded.load_tables(export_dir, tables, distributed=True)
    else:
        for key, target in tables.items():
            sharded.fill_from_full(target, payload["state_dict"][key])
    model.load_state_dict({**state, **tables, **{k: v for k, v in payload["state_dict"].items() if k not in tables}})
    return model.eval(), meta
