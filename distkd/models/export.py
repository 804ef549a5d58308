"""The model export contract: one file that loads with `torch.load(weights_only=True)`.

`model.pt` holds {"format", "role", "schema", "model", "state_dict"}: plain tensors,
strings and numbers only, so loading executes no pickled code. `export.json` beside
it records the sha256 of `model.pt`, the teacher's fingerprint that the logit cache
keys on, plus parameter counts and the metrics it was exported with.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from distkd import storage
from distkd.storage import atomic_write_bytes
from distkd.config import ConfigError, from_dict, to_dict
from distkd.data.schema import Schema

EXPORT_FORMAT = 1
MODEL_FILE = "model.pt"
META_FILE = "export.json"


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


def sha256_file(path: str | Path) -> str:
    """sha256 of a file (a path, or a storage URI such as s3://…)."""
    h = hashlib.sha256()
    with storage.open_input(path) as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_export(out_dir: str | Path, role: str, schema: Schema, cfg,
                 state_dict: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out_dir = Path(out_dir)
    payload = {
        "format": EXPORT_FORMAT,
        "role": role,
        "schema": to_dict(schema),
        "model": to_dict(cfg),
        "state_dict": state_dict,
    }
    path = out_dir / MODEL_FILE
    atomic_write_bytes(path, lambda fh: torch.save(payload, fh))
    meta = {
        "format": EXPORT_FORMAT,
        "role": role,
        "file": MODEL_FILE,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "parameters": sum(t.numel() for t in state_dict.values()),
        "schema_fingerprint": schema.fingerprint(),
        "model": to_dict(cfg),
        **(extra or {}),
    }
    atomic_write_bytes(out_dir / META_FILE, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    return meta


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


def load_export(export_dir: str | Path, verify: bool = True, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the exported model (unsharded, eval mode) and return it with its metadata.

    With verify, the file's sha256 must match export.json: a model that is not the
    fingerprinted one is never used silently.
    """
    export_dir = Path(export_dir)
    meta = read_meta(export_dir)
    path = export_dir / meta["file"]
    if verify:
        digest = sha256_file(path)
        if digest != meta["sha256"]:
            raise ConfigError(f"{path}: sha256 {digest[:12]}… does not match {META_FILE} ({meta['sha256'][:12]}…): "
                              "not the file its metadata names")
    payload = load_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{path}: export format {payload.get('format') if isinstance(payload, dict) else '?'} "
                          f"is not {EXPORT_FORMAT}")
    schema = from_dict(Schema, payload["schema"], f"{path}:schema")
    from distkd.config import coerce
    from distkd.models import ModelSpec, build_model

    cfg = coerce(payload["model"], ModelSpec, f"{path}:model")
    model = build_model(schema, cfg, device=torch.device(device), sparse_device=torch.device(device))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, meta
