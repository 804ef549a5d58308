"""Synthetic next-item logs with a known true next-item distribution.

The truth, drawn once from the seed:

    item i:  cluster c(i), latent v_i = mu_c(i) + spread * eps_i   (K = 16 dims, dim k scaled by decay**k)
             popularity bias b_i = -zipf * log(1 + popularity rank of i)
    row:     history h_1..h_n (n uniform in 1..L), surface s (context)
             q = affinity * mean_t v_(h_t) + w_s
             p(i | history, surface) = softmax_i((b_i + <q, v_i>) / temperature)
    label:   next_item ~ p   (null on an `unlabeled_fraction` of train rows)

History items come from the session's clusters (a primary, a secondary, and some globally
popular items), so the mean of their latents says where the next item lies. The latent spectrum
decays fast (latent_decay 0.75), so a dim-12 student can represent nearly all of the truth (a
dim-5 one cannot: it stays ~0.03 Recall@10 lower); what a small student lacks on hard labels,
one draw from a 20,000-way softmax per row, is the sample efficiency that the teacher's soft
distribution gives. The truth is in the model family of `distkd.models.next_item` (mean-pooled
history plus a context embedding, dotted with item embeddings, plus an item bias).

With the default preset (20,000 items, oracle Recall@10 0.36, popularity alone 0.26) a dim-128
teacher on 1M rows reaches 96% of the oracle's Recall@10 in one pass; see distkd.bench.next_item.

Evaluation-only columns (float32, like synth.py's p_click): `oracle_rank`, the label's 0-based
rank under the true distribution, and `oracle_logp`, its true log-probability: the oracle
Recall@K / NDCG@K / MRR follow from them without the truth. `Truth.log_probs` gives the full true
log-probabilities of any rows; `load_truth(logs)` rebuilds the truth from `generator.yaml`
(seed and preset), written beside `schema.yaml`, which holds the contract's fields only.

Vectorized; one row group at a time; the softmax is computed in chunks of rows that fit the CPU
cache and sampled by inverse CDF over blocks of items. Each row group is seeded by
(seed, split, shard, row group): deterministic by seed, independent of the worker count.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import yaml
import time

from distkd import storage
from distkd.data.synth_layout import plan_shards

logger = logging.getLogger(__name__)

SCHEMA_FILE = "schema.yaml"
GENERATOR_FILE = "generator.yaml"
HISTORY, SURFACE, LABEL = "history", "surface", "next_item"
EVAL_COLUMNS = ("oracle_rank", "oracle_logp")
_CHUNK = 256  # rows per softmax chunk: [256, N] float32 stays cache-sized
_BLOCK = 128  # items per sampling block


@dataclass(frozen=True)
class Preset:
    num_items: int = 20_000
    latent_dim: int = 16
    latent_decay: float = 0.75  # dim k scaled by decay**k: a fast-falling spectrum
    clusters: int = 200
    spread: float = 0.6  # item latent = cluster center + spread * noise
    zipf: float = 1.0  # b_i = -zipf * log(1 + rank_i): popularity alone is Zipf(zipf)
    affinity: float = 3.0  # scale of the history's pull on the query
    temperature: float = 1.0
    max_history: int = 20
    surfaces: int = 8
    surface_scale: float = 0.5
    session_mix: tuple[float, float, float] = (0.7, 0.2, 0.1)  # primary, secondary cluster, global
    history_popularity: float = 0.5  # history items are drawn with weight exp(this * b_i): flatter


PRESETS = {
    "default": Preset(),
    "small": Preset(num_items=2_000, clusters=40, max_history=8, surfaces=4),  # for tests
}


class Truth:
    """The ground-truth parameters, drawn once from the seed."""

    def __init__(self, preset: Preset | str = "default", seed: int = 0):
        p = self.preset = PRESETS[preset] if isinstance(preset, str) else preset
        rng = np.random.default_rng([seed, 11])
        n, k = p.num_items, p.latent_dim
        rank = rng.permutation(n)  # popularity rank of item i (id 0 is not always the head)
        self.bias = (-p.zipf * np.log1p(rank)).astype(np.float32)
        spectrum = p.latent_decay ** np.arange(k)
        spectrum *= math.sqrt(k / (spectrum**2).sum())  # with the 1/sqrt(k) below: E|v|^2 = 1 + spread^2
        centers = rng.normal(0, 1, size=(p.clusters, k)) * spectrum
        self.cluster = rng.integers(0, p.clusters, size=n)
        noise = rng.normal(0, 1, size=(n, k)) * spectrum
        self.latent = ((centers[self.cluster] + p.spread * noise) / math.sqrt(k)).astype(np.float32)
        self.surface = (rng.normal(0, p.surface_scale, size=(p.surfaces, k)) * spectrum / math.sqrt(k)).astype(np.float32)
        # Sampling tables: global popularity CDF, and per cluster a within-cluster CDF laid out
        # as cluster + cdf (monotone across clusters) so one searchsorted serves every cluster.
        w = np.exp(p.history_popularity * self.bias.astype(np.float64))
        self.global_cdf = np.cumsum(w) / w.sum()
        self.members = np.lexsort((rank, self.cluster))  # items by cluster, then popularity
        c_sorted = self.cluster[self.members]
        mass = np.bincount(self.cluster, weights=w, minlength=p.clusters)
        within = np.cumsum(w[self.members]) - np.r_[0, np.cumsum(mass)][c_sorted]
        self.cluster_key = c_sorted + within / mass[c_sorted]
        last = np.r_[c_sorted[1:] != c_sorted[:-1], True]
        self.cluster_key[last] = c_sorted[last] + 1.0  # exactly: no draw falls past a cluster's end
        self.cluster_cdf = np.cumsum(mass) / mass.sum()
        pad = -(-n // _BLOCK) * _BLOCK
        self._bias_padded = np.full(pad, -np.inf, np.float32)
        self._bias_padded[:n] = self.bias / p.temperature
        self._latent_t = np.zeros((k, pad), np.float32)  # [K, N padded], / temperature
        self._latent_t[:, :n] = (self.latent / p.temperature).T

    @property
    def num_items(self) -> int:
        return self.preset.num_items

    # -- the true distribution ------------------------------------------------------------

    def query(self, values: np.ndarray, offsets: np.ndarray, surface: np.ndarray) -> np.ndarray:
        """[B, K] query vectors of rows given their history (flat values, offsets [B + 1])."""
        sums = np.add.reduceat(self.latent[values], offsets[:-1], axis=0)
        mean = sums / np.diff(offsets)[:, None]
        return (self.preset.affinity * mean + self.surface[surface]).astype(np.float32)

    def log_probs(self, values: np.ndarray, offsets: np.ndarray, surface: np.ndarray) -> np.ndarray:
        """[B, N] float32 true log-probabilities p(i | history, surface)."""
        q = self.query(values, offsets, surface)
        s = q @ self._latent_t[:, : self.num_items] + self._bias_padded[: self.num_items]
        m = s.max(1, keepdims=True)
        return s - (m + np.log(np.exp(s - m).sum(1, keepdims=True)))

    def log_probs_table(self, table: pa.Table) -> np.ndarray:
        """`log_probs` of the rows of a logs table (columns history, surface)."""
        hist = table.column(HISTORY).combine_chunks()
        offsets = hist.offsets.to_numpy()
        return self.log_probs(hist.flatten().to_numpy(), offsets - offsets[0], table.column(SURFACE).to_numpy())

    # -- sampling -------------------------------------------------------------------------

    def sample_history(self, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        p = self.preset
        lengths = rng.integers(1, p.max_history + 1, size=rows)
        offsets = np.r_[0, np.cumsum(lengths)]
        last = p.clusters - 1  # (a draw at the cdf's rounding edge)
        primary = np.minimum(np.searchsorted(self.cluster_cdf, rng.random(rows), side="right"), last)
        secondary = np.minimum(np.searchsorted(self.cluster_cdf, rng.random(rows), side="right"), last)
        row = np.repeat(np.arange(rows), lengths)
        source = np.searchsorted(np.cumsum(p.session_mix), rng.random(len(row)) * sum(p.session_mix), side="right")
        u = rng.random(len(row))
        cluster = np.where(source == 0, primary[row], secondary[row])
        in_cluster = self.members[np.minimum(np.searchsorted(self.cluster_key, cluster + u, side="right"), len(self.members) - 1)]
        popular = np.minimum(np.searchsorted(self.global_cdf, u, side="right"), self.num_items - 1)
        return np.where(source == 2, popular, in_cluster).astype(np.int64), offsets

    def sample_next(self, q: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: a draw from softmax(score), its true log-probability and its 0-based rank."""
        rows = len(q)
        label, logp, rank = np.empty(rows, np.int64), np.empty(rows, np.float32), np.empty(rows, np.int64)
        u = rng.random((rows, 2))
        width = self._latent_t.shape[1]
        # Reused buffers: fresh [256, N] arrays per chunk would cost more in page faults than the math.
        s_buf, e_buf, g_buf = np.empty((_CHUNK, width), np.float32), np.empty((_CHUNK, width), np.float32), \
            np.empty((_CHUNK, width), bool)
        for a in range(0, rows, _CHUNK):
            b = min(a + _CHUNK, rows)
            c, r = b - a, np.arange(b - a)
            s, e, g = s_buf[:c], e_buf[:c], g_buf[:c]
            np.matmul(q[a:b], self._latent_t, out=s)  # the latents and bias carry 1 / temperature
            s += self._bias_padded
            m = s.max(1, keepdims=True)
            np.subtract(s, m, out=e)
            np.exp(e, out=e)
            blocks = e.reshape(c, -1, _BLOCK)
            block_cdf = np.cumsum(blocks.sum(2, dtype=np.float64), 1)
            total = block_cdf[:, -1]
            target = u[a:b, 0] * total
            blk = np.minimum((block_cdf < target[:, None]).sum(1), block_cdf.shape[1] - 1)
            before = np.where(blk > 0, block_cdf[r, blk - 1], 0.0)
            inner = np.cumsum(blocks[r, blk], 1, dtype=np.float64)
            j = np.minimum((inner < (target - before)[:, None]).sum(1), _BLOCK - 1)
            item = np.minimum(blk * _BLOCK + j, self.num_items - 1)
            s_item = s[r, item]
            label[a:b] = item
            logp[a:b] = s_item - m[:, 0] - np.log(total)
            np.greater(s, s_item[:, None], out=g)
            rank[a:b] = np.count_nonzero(g, axis=1)
        return label, logp, rank

    def sample(self, rows: int, rng: np.random.Generator, id0: int, unlabeled_fraction: float = 0.0) -> pa.Table:
        values, offsets = self.sample_history(rows, rng)
        surface = rng.integers(0, self.preset.surfaces, size=rows).astype(np.int64)
        label, logp, rank = self.sample_next(self.query(values, offsets, surface), rng)
        missing = rng.random(rows) < unlabeled_fraction if unlabeled_fraction > 0 else None
        return pa.table(
            {
                "example_id": pa.array(np.arange(id0, id0 + rows, dtype=np.int64)),
                HISTORY: pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values)),
                SURFACE: pa.array(surface),
                LABEL: pa.array(label, mask=missing),
                "oracle_rank": pa.array(rank.astype(np.float32)),
                "oracle_logp": pa.array(logp),
            },
            schema=arrow_schema(),
        )


# -- the logs contract ------------------------------------------------------------------------

def arrow_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("example_id", pa.int64(), nullable=False),
            pa.field(HISTORY, pa.list_(pa.int64())),
            pa.field(SURFACE, pa.int64()),
            pa.field(LABEL, pa.int64(), nullable=True),
            *(pa.field(c, pa.float32()) for c in EVAL_COLUMNS),
        ]
    )


def schema_dict(preset: Preset | str = "default") -> dict:
    """The logs' schema: the fields of distkd.data.schema plus a multi-class task."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    return {
        "sparse": [
            {"name": HISTORY, "num_embeddings": p.num_items, "hash_size": None, "multi_valued": True},
            {"name": SURFACE, "num_embeddings": p.surfaces, "hash_size": None, "multi_valued": False},
        ],
        "dense": [],
        "tasks": [{"name": LABEL, "label": LABEL, "kind": "multiclass", "num_classes": p.num_items,
                   "item_feature": HISTORY}],
        "id": "example_id",
        "request_id": None,
        "eval_columns": list(EVAL_COLUMNS),
        "version": 1,
    }


@dataclass(frozen=True)
class _ShardJob:
    out: str
    split: str
    split_idx: int
    shard: int
    rows: int
    id0: int
    preset: Preset
    seed: int
    row_group_rows: int
    unlabeled_fraction: float


_TRUTH: dict = {}


def _truth(preset: Preset, seed: int) -> Truth:
    if (preset, seed) not in _TRUTH:
        _TRUTH.clear()
        _TRUTH[(preset, seed)] = Truth(preset, seed)
    return _TRUTH[(preset, seed)]


def _write_shard(job: _ShardJob) -> str:
    truth = _truth(job.preset, job.seed)
    path = storage.join(job.out, job.split, f"part-{job.shard:05d}.parquet")

    def write(fh) -> None:
        with pq.ParquetWriter(fh, arrow_schema(), compression="zstd") as writer:
            done, rg = 0, 0
            while done < job.rows:
                n = min(job.row_group_rows, job.rows - done)
                rng = np.random.default_rng([job.seed, job.split_idx, job.shard, rg])
                frac = job.unlabeled_fraction if job.split == "train" else 0.0
                writer.write_table(truth.sample(n, rng, job.id0 + done, frac), row_group_size=n)
                done, rg = done + n, rg + 1

    storage.write_atomic(path, write)
    return path


def resolve_preset(preset: Preset | str = "default", **overrides) -> Preset:
    p = PRESETS[preset] if isinstance(preset, str) else preset
    return replace(p, **{k: v for k, v in overrides.items() if v is not None})


def generate(out, rows: int, shards: int = 4, seed: int = 0, row_group_rows: int = 16_384,
             preset: Preset | str = "default", num_items: int | None = None, unlabeled_fraction: float = 0.1,
             workers: int = 1, force: bool = False) -> dict:
    """Write `rows` rows (schema.yaml + train/valid/test shards) into `out`; returns the schema dict."""

    out = os.fspath(out)
    p = resolve_preset(preset, num_items=num_items)
    if rows < 10 * (shards + 2):
        raise ValueError(f"rows={rows} is too few for {shards} shards")
    if storage.list_files(out, recursive=True):
        if not force:
            raise FileExistsError(f"{out}: exists and is not empty (use force=True to overwrite)")
        storage.delete(storage.join(out, SCHEMA_FILE))  # first: the directory is now visibly unfinished
        if storage.is_remote(out):
            for f in storage.list_files(out, recursive=True):
                storage.delete(f)
        else:
            shutil.rmtree(out)
    jobs, id0 = [], 0
    for split_idx, (split, sizes) in enumerate(plan_shards(rows, shards).items()):
        storage.makedirs(storage.join(out, split))
        for shard, n in enumerate(sizes):
            jobs.append(_ShardJob(out, split, split_idx, shard, n, id0, p, seed, row_group_rows, unlabeled_fraction))
            id0 += n
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_shard, jobs))
    else:
        for job in jobs:
            _write_shard(job)
    # The generator's parameters beside the schema (schema.yaml holds the contract's fields only).
    params = yaml.safe_dump({"generator": "distkd.data.synth_next_item", "seed": seed, "preset": asdict(p)}, sort_keys=False)
    storage.write_atomic(storage.join(out, GENERATOR_FILE), lambda fh: fh.write(params.encode()))
    schema = schema_dict(p)
    text = yaml.safe_dump(schema, sort_keys=False)
    storage.write_atomic(storage.join(out, SCHEMA_FILE), lambda fh: fh.write(text.encode()))  # last
    return schema


def load_truth(logs) -> Truth:
    """The true model of a logs directory written by `generate` (from its generator.yaml)."""

    params = yaml.safe_load(storage.read_text(storage.join(os.fspath(logs), GENERATOR_FILE)))
    preset = params["preset"]
    preset["session_mix"] = tuple(preset["session_mix"])
    return Truth(Preset(**preset), params["seed"])


def iter_row_groups(path: str, columns: list[str] | None = None):
    """Stream a shard's row groups as Arrow tables."""
    with storage.open_parquet(path) as pf:
        for g in range(pf.num_row_groups):
            yield pf.read_row_group(g, columns=columns)


def run(args) -> int:
    """`distkd data synth-next-item`."""

    t0 = time.perf_counter()
    schema = generate(args.out, args.rows, args.shards, args.seed, args.row_group_rows, args.preset,
                      num_items=args.num_items, unlabeled_fraction=args.unlabeled_fraction, workers=args.workers,
                      force=args.force)
    task = schema["tasks"][0]
    logger.info(f"wrote {args.rows:,} next-item rows ({task['num_classes']:,} items) to {args.out} in "
                f"{time.perf_counter() - t0:.1f}s")
    return 0
