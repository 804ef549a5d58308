"""The teacher's age on a cached shard: days from the last partition it trained on to the shard's.

A teacher export trained on partitioned logs records its window (`window: {key, start, end}` in
export.json, then in the cache manifest's teacher record), and every committed shard of
partitioned logs records its partition folders (`partition: {dt: 2026-11-03}`). The age of the
teacher on that shard is `shard's date - window end` in days: 1 on the day after its last
training day, 0 or less on a day it trained on. Dates are ISO `YYYY-MM-DD` partition values.
"""

from __future__ import annotations

import datetime as dt
from typing import Optional

from distkd.cache.contract import CacheError, Manifest


def _date(value: str, what: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise CacheError(f"{what} {value!r} is not an ISO date (YYYY-MM-DD): the teacher's age needs dates") from None


def shard_age(manifest: Manifest, rel: str, where: str) -> Optional[int]:
    """Days from the teacher's last training partition to shard `rel`'s (None: the teacher has
    no window, or the shard no partition of its key)."""
    window = manifest.teacher.window
    part = manifest.shards[rel].partition if rel in manifest.shards else None
    if not window or not part or window.get("key") not in part:
        return None
    return age_on(window, part[window["key"]], f"{where}: shard {rel}")


def age_on(window: dict[str, str], value: str, where: str) -> int:
    """Days from the window's end to the partition `value` of its key."""
    end = _date(window.get("end"), f"{where}: the teacher's window end")
    return (_date(value, f"{where}: partition {window['key']}") - end).days


def ages(manifest: Manifest, rels: list[str], where: str) -> dict[str, int]:
    """{rel: age} of every shard of `rels`; CacheError naming what is missing if any has none."""
    window = manifest.teacher.window
    if not window:
        raise CacheError(f"{where}: the teacher has no training window in the manifest (an export trained on "
                         "partitioned logs records one, from this distkd on: retrain it, or rebuild the cache "
                         "from such an export); the teacher's age is unknown")
    out = {}
    for rel in rels:
        age = shard_age(manifest, rel, where)
        if age is None:
            raise CacheError(f"{where}: shard {rel} records no partition {window['key']}= (a cache built before "
                             "partitions were recorded, or logs in split folders); the teacher's age on it is unknown")
        out[rel] = age
    return out
