"""The sharded export: a teacher's embedding tables written by every rank through DCP, never gathered.

    export/  export.json         form "sharded"; `sha256` (the fingerprint), `files` {path: sha256}
             dense.pt            dense layers + schema + config (torch.load(weights_only=True))
             tables/.metadata    DCP's index: each table's chunks, their global offsets and files
             tables/__R_I.distcp the chunks rank R wrote (its own shards; a data-parallel table once)

A table is any parameter of an embedding collection (`is_table`); everything else is dense.
DCP stores each chunk with its offsets, so the tables load into plain tensors on one process
or into the ShardedTensors of any world size's plan: each rank reads the chunks overlapping
its own shards. `.metadata` is a pickle: it is read only through distkd.dcp_reader.SafeReader.

The fingerprint, the teacher's sha256 that the logit cache keys on, is the sha256 of the
canonical JSON (sorted keys, no spaces) of

    {"files": {path: sha256 of the file}, "form": "sharded", "format", "model": config,
     "role", "schema_fingerprint"}

where `files` lists dense.pt, tables/.metadata and every shard file. `check_files` recomputes
every file's sha256 (naming the first that differs, or a file missing or not listed) and then
the fingerprint. The metadata is written without DCP's random save id and temporary path, so
it depends only on the tables, their plan and the world size that wrote them.

distkd.models.export writes, verifies and loads both forms through these functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from distkd.config import ConfigError
from distkd.dcp_reader import METADATA_FILE, SafeReader
from distkd.dcp_writer import TensorAtATimeWriter
from distkd.dist import gather_objects
from distkd.errors import CheckpointError
from distkd.storage import sha256_file

logger = logging.getLogger(__name__)

FORM = "sharded"
TABLES_DIR = "tables"
FINGERPRINTED = ("format", "form", "role", "model", "schema_fingerprint", "files")


def is_table(param: str) -> bool:
    """A parameter (or its optimizer state) of an embedding collection: a table."""
    return ".embedding_bags." in param or ".embeddings." in param


def split_state_dict(state_dict: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """(tables, dense) of the keys under `prefix` (e.g. "model." of a train module), prefix
    removed. Tables keep their values (ShardedTensors under a plan); dense ones too."""
    tables: dict[str, Any] = {}
    dense: dict[str, Any] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(prefix):
            key = key[len(prefix):]
            (tables if is_table(key) else dense)[key] = value
    return tables, dense


class _Writer(TensorAtATimeWriter):
    """DCP's file writer without storage metadata (a random save id and the temporary folder's
    path), so `.metadata` is a function of the tables and the plan alone; a tensor at a time, so
    no rank holds its shards twice (distkd.dcp_writer)."""

    def storage_meta(self) -> None:
        return None


def save_tables(folder: Path, tables: dict[str, Any], rank: int, world_size: int) -> dict[str, str]:
    """Collective: every rank writes its shards of `tables` into `folder` (DCP; data-parallel
    tables once), then the ranks hash the files between them. Returns {"tables/<name>": sha256}
    on every rank."""
    dcp.save(tables, storage_writer=_Writer(folder, sync_files=True))  # ends once .metadata is written
    names = sorted(os.listdir(folder))
    mine = {f"{TABLES_DIR}/{n}": sha256_file(folder / n) for n in names[rank::world_size]}
    return {k: v for part in gather_objects(mine, world_size) for k, v in part.items()}


def fingerprint(meta: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the fingerprinted fields of export.json (see the module)."""
    blob = {k: meta.get(k) for k in FINGERPRINTED}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _listed_path(export_dir: Path, name: str, dense_file: str) -> Path:
    parts = name.split("/")
    plain = all(p not in ("", ".", "..") and "\\" not in p for p in parts)
    if not plain or not (parts == [dense_file] or (len(parts) == 2 and parts[0] == TABLES_DIR)):
        raise ConfigError(f"{export_dir}: export.json lists {name!r}: neither {dense_file} nor a file in {TABLES_DIR}/")
    return export_dir.joinpath(*parts)


def check_files(export_dir: str | Path, meta: dict[str, Any]) -> str:
    """The export's fingerprint, after every file is checked against export.json: each listed
    file is there with its sha256, no file in tables/ is unlisted, and `sha256` is the
    fingerprint of what is listed. Else ConfigError naming the file."""
    export_dir = Path(export_dir)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise ConfigError(f"{export_dir}: export.json of a sharded export lists no files")
    paths = {name: _listed_path(export_dir, name, meta["file"]) for name in files}
    for name in (meta["file"], f"{TABLES_DIR}/{METADATA_FILE}"):
        if name not in files:
            raise ConfigError(f"{export_dir}: export.json does not list {name}")
    tables = export_dir / TABLES_DIR
    extra = sorted(f"{TABLES_DIR}/{n}" for n in (os.listdir(tables) if tables.is_dir() else []) if f"{TABLES_DIR}/{n}" not in files)
    if extra:
        raise ConfigError(f"{export_dir / extra[0]}: not listed in export.json: not part of the fingerprinted export")
    for name, path in sorted(paths.items()):
        if not path.is_file():
            raise ConfigError(f"{path}: missing; export.json lists it")
        digest = sha256_file(path)
        if digest != files[name]:
            raise ConfigError(f"{export_dir}: {name} has sha256 {digest[:12]}…, export.json says {str(files[name])[:12]}…: "
                              "not the file the export's fingerprint covers")
    digest = fingerprint(meta)
    if digest != meta.get("sha256"):
        raise ConfigError(f"{export_dir}: export.json's sha256 {str(meta.get('sha256'))[:12]}… is not the fingerprint "
                          f"of the files it lists ({digest[:12]}…)")
    return digest


def check_metadata(export_dir: str | Path) -> Path:
    """Read the tables' DCP metadata the safe way (nothing pickled runs; a folder listing
    pickled objects is refused, a ConfigError). Returns the tables' folder."""
    folder = Path(export_dir) / TABLES_DIR
    try:
        SafeReader(folder, what="export").read_metadata()
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return folder


def load_tables(export_dir: str | Path, tables: dict[str, Any], distributed: bool) -> None:
    """Fill `tables` in place from the export's DCP folder: plain tensors on one process
    (`distributed` False), or (collective) this rank's shards under its plan. Nothing pickled
    runs: `.metadata` goes through SafeReader, the chunks through torch.load(weights_only)."""
    folder = check_metadata(export_dir)  # here, so a refusal is ours, not wrapped by DCP's collectives
    try:
        with warnings.catch_warnings():  # DCP warns that one process is one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(tables, storage_reader=SafeReader(folder, what="export"), no_dist=not distributed)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # DCP wraps rank failures: a table the export lacks, a size that differs
        raise ConfigError(f"{folder}: cannot load the tables: {' '.join(str(e).split())[:500]}") from None
    logger.debug("loaded %d tables from %s", len(tables), folder)


def fill_from_full(target: Any, full: torch.Tensor) -> None:
    """Copy this rank's part of the whole tensor `full` into `target`: a ShardedTensor's local
    shards (at their offsets), or a plain (data-parallel) tensor whole."""
    shards = target.local_shards() if hasattr(target, "local_shards") else None
    if shards is None:
        target.detach().copy_(full)
        return
    for shard in shards:
        index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
        shard.tensor.detach().copy_(full[index])
