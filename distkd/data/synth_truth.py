"""The synthetic logs' ground truth: presets of features and the label model drawn from a seed.

Labels are Bernoulli draws from a fixed model over the features:

    logit = bias + sum_f b_f[id_f]                             (first order, every feature)
          + sum_{(f,g)} ± <u_f[id_f], u_g[id_g]> * s / sqrt(K)   (pairwise, low cardinality)
          + dense terms (linear, a product and a sine)

`u_f` are K-dimensional latent vectors (K = 16) whose dimension k is scaled by
`latent_decay**k`: in the criteo preset (0.7) the spectrum falls fast, so the pair terms have an
effective rank of about 3 and a dim-8 student can represent them. What it lacks is the wide
teacher's sample efficiency: on hard labels, in one pass, it learns the interactions less well,
and that is the gap the teacher's soft targets close. An id's signal is concentrated on the
`head` most popular ids (past it, it fades as (head / rank) ** fade_power), so the signal is
learnable from a million rows and the rarely seen tail is noise the models must learn to
ignore. The true click / conversion probabilities go in evaluation-only columns (`p_click`,
`p_conversion`) so evaluation reports the oracle AUC.

With a drift the truth moves by day: `Truth.drifted(angle)` rotates one draw of the weights
towards a second one, so the ids and dense features keep their distributions while the label
model they feed drifts at a known rate (distkd.data.synth writes the days).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

LATENT_DIM = 16


@dataclass(frozen=True)
class Preset:
    cardinalities: tuple[int, ...]  # one per sparse feature
    multi_valued: tuple[int, ...]  # indices of list<int64> features (1..max_list ids each)
    pairs: tuple[tuple[int, int], ...]  # interacting feature pairs
    n_dense: int
    request_features: tuple[int, ...]  # context features shared by all rows of a request
    zipf: float = 1.05
    head: int = 300  # ids past this popularity rank carry fading signal (the unlearnable tail)
    fade_power: float = 1.0  # past `head`, an id's effect is scaled by (head / rank) ** fade_power
    pair_scale: float = 0.35
    first_std: float = 0.4  # first-order effects: N(0, first_std / (1 + log10(cardinality) / 3))
    max_list: int = 5
    # Latent dimension k is scaled by latent_decay**k (pair-term variance kept): the truth's
    # interactions have a decaying spectrum, as real ones do, rather than K equal directions.
    latent_decay: float = 1.0


PRESETS = {
    # 26 sparse features (tens to millions of ids, Zipf-skewed), 13 dense, 2 tasks.
    "criteo": Preset(
        cardinalities=(
            12, 24, 40, 64, 100, 150, 250, 400, 600, 1_000, 1_500, 2_500, 4_000,
            6_000, 10_000, 20_000, 50_000, 100_000, 200_000, 400_000, 700_000,
            1_000_000, 1_500_000, 2_000_000, 3_000_000, 5_000,
        ),
        multi_valued=(25,),
        pairs=((0, 4), (1, 5), (2, 6), (0, 5), (1, 6), (3, 4), (4, 6), (0, 3), (1, 2), (0, 6),
               (3, 5), (1, 4), (2, 3)),
        n_dense=13,
        request_features=(0, 1, 2),
        # Tuned so that a one-pass teacher on the demo's 1.5M rows comes within 0.01 AUC of the
        # oracle (see docs/evaluation.md).
        head=30,
        fade_power=2.0,
        pair_scale=0.5,
        latent_decay=0.7,
    ),
    # A handful of features for tests: still one multi-valued, still pairwise truth.
    "small": Preset(
        cardinalities=(20, 50, 100, 400, 1_000, 200),
        multi_valued=(5,),
        pairs=((0, 2), (1, 3), (2, 5)),
        n_dense=4,
        request_features=(0,),
        pair_scale=0.8,
    ),
}


def cardinalities(p: Preset, max_cardinality: int | None) -> list[int]:
    return [min(c, max_cardinality) if max_cardinality else c for c in p.cardinalities]


class Truth:
    """The ground-truth model's parameters, drawn once from the seed."""

    def __init__(self, preset: str, seed: int, max_cardinality: int | None = None):
        p = self.preset = PRESETS[preset]
        self.cards = cardinalities(p, max_cardinality)
        rng = np.random.default_rng([seed, 7])
        n = len(self.cards)
        # Popularity rank -> id: a random permutation so that id 0 is not always the head.
        self.rank_to_id = [rng.permutation(c).astype(np.int64) for c in self.cards]
        self.cdf = [np.cumsum(1.0 / np.arange(1, c + 1) ** p.zipf) for c in self.cards]
        for c in self.cdf:
            c /= c[-1]
        # Signal lives in the head: an id's effect fades past popularity rank `head`, so the
        # rarely seen tail is mostly noise and a model that sees enough rows can reach the oracle.
        fade = [(np.minimum(1.0, p.head / (np.arange(c) + 1.0)) ** p.fade_power).astype(np.float32)[np.argsort(r)]
                for c, r in zip(self.cards, self.rank_to_id)]
        self.seed, self.fade, self.other = seed, fade, None
        self.first, self.latent = self._effects(rng)
        # Each pair interacts through the plain dot product of its latents (a factorization
        # machine), with a random sign: what a dot-interaction model of width >= K represents exactly.
        self.pair_sign = rng.choice([-1.0, 1.0], size=len(p.pairs)).astype(np.float32)
        self.dense_w = rng.normal(0, 0.2, size=(2, p.n_dense)).astype(np.float32)
        self.dense_scale = rng.uniform(0.5, 2.5, size=p.n_dense)
        self.task_mix = rng.normal(0, 1, size=(len(p.pairs),)).astype(np.float32)
        self.bias = (-1.6, -3.2)
        self.n = n

    def _effects(self, rng: np.random.Generator) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
        """First-order effects of every feature's ids and the pair features' latents, drawn from `rng`."""
        p = self.preset
        first = [rng.normal(0, p.first_std / (1 + math.log10(c) / 3), size=c).astype(np.float32) * fd
                 for c, fd in zip(self.cards, self.fade)]
        in_pair = sorted({f for pair in p.pairs for f in pair})
        spectrum = p.latent_decay ** np.arange(LATENT_DIM)
        spectrum *= (LATENT_DIM / (spectrum**4).sum()) ** 0.25  # keeps the variance of <u_f, u_g>
        latent = {f: (rng.normal(0, 1, size=(self.cards[f], LATENT_DIM)) * spectrum).astype(np.float32)
                  * self.fade[f][:, None] for f in in_pair}
        return first, latent

    def drifted(self, angle: float) -> "Truth":
        """The truth `angle` radians along its drift: each weight (first-order effects, pair
        latents, dense weights) is cos(angle) w0 + sin(angle) w1, w0 this truth's and w1 a second
        draw of the same distribution (seeded by the same seed), so every weight keeps its
        distribution and the correlation of the weights with day 0's is cos(angle)."""
        if angle == 0:
            return self
        if self.other is None:
            rng = np.random.default_rng([self.seed, 8])
            first, latent = self._effects(rng)
            self.other = first, latent, rng.normal(0, 0.2, size=self.dense_w.shape).astype(np.float32)
        first, latent, dense_w = self.other
        c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        out = copy.copy(self)
        out.first = [c * a + s * b for a, b in zip(self.first, first)]
        out.latent = {f: c * v + s * latent[f] for f, v in self.latent.items()}
        out.dense_w = c * self.dense_w + s * dense_w
        return out

    def sample(self, rows: int, rng: np.random.Generator, id0: int) -> pa.Table:
        p = self.preset
        # Requests: runs of 1..20 rows sharing the context features.
        sizes = rng.integers(1, 21, size=rows // 5 + 2)
        req_of_row = np.repeat(np.arange(len(sizes)), sizes)[:rows]
        n_req = int(req_of_row[-1]) + 1
        req_key = rng.integers(0, 2**62, size=n_req)
        request_id = req_key[req_of_row]

        ids, cols = [], {}
        for f, card in enumerate(self.cards):
            n_draw = n_req if f in p.request_features else rows
            if f in p.multi_valued:
                lengths = rng.integers(1, p.max_list + 1, size=rows)
                flat = self.rank_to_id[f][np.searchsorted(self.cdf[f], rng.random(lengths.sum()))]
                offsets = np.zeros(rows + 1, dtype=np.int32)
                np.cumsum(lengths, out=offsets[1:])
                cols[f"C{f + 1}"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
                ids.append((flat, offsets))
            else:
                draw = self.rank_to_id[f][np.searchsorted(self.cdf[f], rng.random(n_draw))]
                if f in p.request_features:
                    draw = draw[req_of_row]
                cols[f"C{f + 1}"] = pa.array(draw)
                ids.append(draw)

        first = np.zeros(rows, dtype=np.float32)
        for f in range(self.n):
            first += self._pooled(self.first[f], ids[f], rows)
        pair_terms = np.stack(
            [
                sign * np.einsum("bk,bk->b", self._pooled(self.latent[f], ids[f], rows), self._pooled(self.latent[g], ids[g], rows))
                for (f, g), sign in zip(p.pairs, self.pair_sign)
            ],
            axis=1,
        ) * (p.pair_scale / math.sqrt(LATENT_DIM))
        raw = rng.lognormal(0.0, self.dense_scale, size=(rows, p.n_dense)).astype(np.float32)
        raw = np.floor(raw).astype(np.float32)  # count-like, as in Criteo's integer features
        z = np.log1p(raw)
        z = (z - z.mean(0, keepdims=True)) / (z.std(0, keepdims=True) + 1e-6)
        dense_terms = z @ self.dense_w.T  # [rows, 2]
        nonlinear = 0.5 * z[:, 0] * z[:, 1] + 0.4 * np.sin(2.0 * z[:, 2])

        logit_click = self.bias[0] + first + pair_terms.sum(1) + dense_terms[:, 0] + nonlinear
        logit_conv = self.bias[1] + 0.5 * first + pair_terms @ self.task_mix * 0.5 + dense_terms[:, 1] - 0.5 * nonlinear
        p_click = 1.0 / (1.0 + np.exp(-logit_click))
        p_conv = 1.0 / (1.0 + np.exp(-logit_conv))

        out = {"example_id": pa.array(np.arange(id0, id0 + rows, dtype=np.int64))}
        out.update(cols)
        for i in range(p.n_dense):
            out[f"I{i + 1}"] = pa.array(raw[:, i])
        out["clicked"] = pa.array((rng.random(rows) < p_click).astype(np.int8))
        out["converted"] = pa.array((rng.random(rows) < p_conv).astype(np.int8))
        out["request_id"] = pa.array(request_id)
        out["p_click"] = pa.array(p_click.astype(np.float32))
        out["p_conversion"] = pa.array(p_conv.astype(np.float32))
        return pa.table(out)

    @staticmethod
    def _pooled(table: np.ndarray, ids, rows: int) -> np.ndarray:
        """Look up `table` rows; multi-valued features are mean-pooled over their list."""
        if not isinstance(ids, tuple):
            return table[ids]
        flat, offsets = ids
        sums = np.add.reduceat(table[flat], offsets[:-1], axis=0)
        lengths = np.diff(offsets).reshape((-1,) + (1,) * (table.ndim - 1))
        return sums / lengths
