"""What a build has to do: an existing cache reconciled with the teacher and the logs, once.

    is the cache directory this teacher's, these logs' schema and this content's?  else refuse
    did a committed shard's log shard change?                                      refuse
    is a committed shard's log shard gone?                                         drop its logits
    is a committed shard's file missing or of another size?                        recompute it
    is a shard of the logs new?                                                    compute it

The cache grows with the logs (shards gained are computed, shards gone are dropped) but never
mixes: another teacher, schema or content, or a log shard rewritten in place, is refused with
what differs. `reconcile` reads and decides; it deletes nothing: `Plan.gone` are the files the
build removes before it writes the manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from distkd import storage
from distkd.cache.contract import (
    MANIFEST, CacheError, Dropped, InputFingerprint, Manifest, read_manifest, to_json_value,
)
from distkd.cache.manifest import cache_file


@dataclass
class Plan:
    manifest: Manifest  # to continue: the existing one, or the new one; splits as the logs have them now
    valid: list[str] = field(default_factory=list)  # committed shards that still match (skipped)
    todo: list[InputFingerprint] = field(default_factory=list)  # to compute, in plan order
    gone: list[str] = field(default_factory=list)  # committed, log shard gone: remove the file (in `dropped`)
    damaged: list[str] = field(default_factory=list)  # committed, file missing or resized: recomputed (in todo)
    gained: dict[str, list[str]] = field(default_factory=dict)  # split -> shards new since the last build


def check_same_build(cache_dir: str, old: Manifest, new: Manifest) -> None:
    """Refuse to mix: another teacher, schema or content layout into an existing cache."""
    where = f"{cache_dir}: existing cache"
    if old.teacher.sha256 != new.teacher.sha256:
        raise CacheError(f"{where} holds logits of {old.teacher.describe()}, this build's is "
                         f"{new.teacher.describe()}; build into a new cache directory (or delete this one)")
    if old.schema.fingerprint != new.schema.fingerprint:
        raise CacheError(f"{where} was built for logs with schema {old.schema.fingerprint}, these logs have "
                         f"{new.schema.fingerprint}; build into a new cache directory")
    for k in ("dtype", "hidden", "tasks", "topk"):
        a, b = getattr(old.content, k), getattr(new.content, k)
        if a != b:
            raise CacheError(f"{where} has {k}={to_json_value(a)!r}, this build asks {k}={to_json_value(b)!r}; "
                             "build into a new cache directory")


def check_unchanged(cache_dir: str, manifest: Manifest, current: list[InputFingerprint]) -> None:
    """Refuse log shards whose bytes changed since their logits were cached (a shard the logs
    gained or lost is the cache growing)."""
    for fp in current:
        entry = manifest.shards.get(fp.path)
        if entry is not None and (diff := entry.input.diff(fp)):
            raise CacheError(
                f"{cache_dir}: log shard {fp.path} changed since its logits were cached "
                f"({'; '.join(diff)}); logs are append-only for a cache: write changed data as new shards, "
                "or build into a new cache directory"
            )


def reconcile(out: str, logs: str, header: Manifest, current: dict[str, list[InputFingerprint]]) -> Plan:
    """The plan of a build of `header` (this teacher, schema, content) into `out`, given the
    fingerprints of the log shards of each split of the job now (`current`)."""
    old = read_manifest(out)
    if old is None:
        stray = [storage.relative(out, f) for f in storage.list_files(out, recursive=True)
                 if not storage.basename(f).startswith(".")]
        if stray:
            raise CacheError(f"{out}: exists, holds {sorted(stray)[:5]} but no {MANIFEST}; not a cache directory "
                             "this build started, refusing to write into it")
        manifest = header
    else:
        check_same_build(out, old, header)
        manifest = old
        manifest.logs = header.logs
    plan = Plan(manifest)
    for split, fps in current.items():
        check_unchanged(out, manifest, fps)
        before = set(manifest.splits.get(split, []))
        manifest.splits[split] = [fp.path for fp in fps]
        if before and (new := [fp.path for fp in fps if fp.path not in before]):
            plan.gained[split] = new
    for rel in sorted(manifest.shards):
        if storage.size(storage.join(logs, rel)) is None:  # the log shard is gone: never use its logits
            manifest.dropped[rel] = Dropped(time.strftime("%Y-%m-%dT%H:%M:%S%z"), manifest.shards.pop(rel).output.rows)
            plan.gone.append(rel)
    for split, rels in manifest.splits.items():  # splits this job did not list again too
        manifest.splits[split] = [r for r in rels if r not in plan.gone]
    seen = set()
    for fps in current.values():
        for fp in fps:
            if fp.path in seen:
                continue
            seen.add(fp.path)
            entry = manifest.shards.get(fp.path)
            if entry is not None:
                if storage.size(cache_file(out, fp.path)) == entry.output.bytes:
                    plan.valid.append(fp.path)
                    continue
                plan.damaged.append(fp.path)
                del manifest.shards[fp.path]
            plan.todo.append(fp)
    return plan
