"""The logit cache: the teacher run once over the logs, read by every student run.

    contract.py  the contract: layout, format version, the manifest as typed records
    content.py   what the files hold: per-task logits (CTR) or a next-item top-k, one codec each
    manifest.py  the files: checksums, input fingerprints, locations, footers
    reconcile.py a build's plan against an existing cache: skip, compute, drop, refuse
    worker.py    one shard: stream row groups, run the teacher, commit a file atomically
    pool.py      Ray: connect, size the actor pool, run shards with retries
    group.py     a teacher sharded over K actors (teacher_ranks): one worker to the pool
    build.py     `distkd cache build`: the driver (lock, plan, resume, manifest, progress)
    verify.py    `distkd cache verify`: completeness, sha256, alignment with the logs
    recompute.py `cache verify --recompute`: the teacher run again on a sample, compared in ulps
    reader.py    `open_cache`: the distillation stage's validated view, an `Aligned`
    importer.py  `distkd cache import`: predictions computed elsewhere, as a cache (the driver)
    predictions.py  the predictions files it reads: layouts, checks
    join.py      its partitioned hash join by example_id, in bounded memory
"""

from distkd.cache.contract import FORMAT, CacheError, Manifest, read_manifest
from distkd.cache.reader import open_cache

__all__ = ["FORMAT", "CacheError", "Manifest", "open_cache", "read_manifest"]
