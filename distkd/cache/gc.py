"""`distkd cache gc --root ROOT --keep N`: remove the oldest caches of a root of caches by teacher.

A root (`cache build ... by_teacher: true`) holds one cache per teacher version,
ROOT/<sha256[:12]>/. The newest N (by their last build) are kept; each older one is removed
only if this process can take both its build lock and its readers lock exclusively, so a
cache a build is writing or a distillation is reading is never removed (it is listed as in
use, and the next gc tries again). Local caches only: object storage has no locks.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from distkd import storage
from distkd.cache.contract import CacheError, read_manifest
from distkd.cache.lock import BuildLock, ReaderLock
from distkd.cache.reader import caches_under

logger = logging.getLogger(__name__)


def last_built(cache_dir: str) -> str:
    m = read_manifest(cache_dir)
    return m.builds[-1].started_at if m is not None and m.builds else ""


def gc(root: str | Path, keep: int, dry_run: bool = False) -> dict[str, Any]:
    root = str(root)
    if keep < 1:
        raise CacheError(f"cache gc: --keep must be >= 1, got {keep}")
    if storage.is_remote(root):
        raise CacheError(f"{root}: cache gc needs locks, which object storage does not have; remove old "
                         "caches there by hand while no build or distillation uses them")
    caches = sorted(caches_under(root), key=last_built)
    removed, in_use = [], []
    for cache in caches[:-keep]:
        built = last_built(cache)
        try:
            with BuildLock(cache):
                pin = ReaderLock(cache, exclusive=True).acquire()
                try:
                    if not dry_run:
                        shutil.rmtree(cache)
                finally:
                    pin.release()
        except CacheError as e:
            in_use.append(cache)
            logger.info(f"cache gc: kept {cache}: {str(e).split(': ', 1)[-1].split(';')[0]}")
            continue
        removed.append(cache)
        logger.info(f"cache gc: {'would remove' if dry_run else 'removed'} {cache} (last built {built or '?'})")
    kept = [c for c in caches if c not in removed]
    logger.info(f"cache gc: {root}: {len(caches)} caches, kept {len(kept)} (newest {keep}"
                f"{f', {len(in_use)} in use' if in_use else ''}), "
                f"{'would remove' if dry_run else 'removed'} {len(removed)}")
    return {"root": root, "kept": kept, "removed": removed, "in_use": in_use}


def run(args) -> int:
    gc(args.root, args.keep, args.dry_run)
    return 0
