"""The stats file of a logs directory: `LOGS/stats.json`, where it is, how it is written and read.

    {"format": 1, "kind": "distkd.stats", "fingerprint": sha256(content)[:16], "content": {...}}

`distkd.data.stats` computes the content; `distkd.data.schema.load_schema` reads it back to give
dense transforms their parameters. It sits below both so that neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
import re

from distkd import storage
from distkd.config import ConfigError

STATS_FILE = "stats.json"
FORMAT = 1
KIND = "distkd.stats"


def _fingerprint(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def stats_location(logs: str) -> str:
    return storage.join(logs, STATS_FILE)


def write_stats(logs: str, content: dict) -> str:
    """Commit stats.json atomically (local or object storage); return its fingerprint."""
    fp = _fingerprint(content)
    doc = {"format": FORMAT, "kind": KIND, "fingerprint": fp, "content": content}
    text = json.dumps(doc, indent=1, allow_nan=False)
    # Number lists (quantiles) on one line each: a file a person can read.
    text = re.sub(r"\[\s+([-0-9.e+,\s]*?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"
    storage.write_atomic(stats_location(logs), lambda fh: fh.write(text.encode()))
    return fp


def read_stats(logs: str) -> dict | None:
    """The whole stats.json document (format, kind, fingerprint, content), or None if the logs
    have none. ConfigError if it is not one this distkd wrote, or its content does not match
    its fingerprint."""
    loc = stats_location(logs)
    if storage.size(loc) is None:
        return None
    try:
        doc = json.loads(storage.read_text(loc))
    except ValueError as e:
        raise ConfigError(f"{loc}: not valid JSON ({e}); rerun `distkd data stats {logs}`") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("format") != FORMAT:
        raise ConfigError(f"{loc}: not a distkd stats file of format {FORMAT}; rerun `distkd data stats {logs}`")
    if _fingerprint(doc.get("content")) != doc.get("fingerprint"):
        raise ConfigError(f"{loc}: content does not match its fingerprint {doc.get('fingerprint')} (edited or "
                          f"truncated?); rerun `distkd data stats {logs}`")
    return doc


def param_fields(transform: str, entry: dict) -> dict:
    """The DenseParams fields of `transform` from a dense feature's stats entry."""
    if transform == "standardize":
        return {"mean": entry["mean"], "std": entry["std"]}
    if transform == "log1p_standardize":
        return {"mean": entry["log1p"]["mean"], "std": entry["log1p"]["std"]}
    return {"quantiles": entry["quantiles"]}
