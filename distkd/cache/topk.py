"""The top-k logit cache of a next-item (multi-class) teacher: row format and packing.

Dense logits over a catalog cannot be cached, so a row keeps what the losses need
(distkd.objectives.next_item_losses):

    topk_ids     fixed_size_binary[ceil(k b / 8)]   the top-k item ids, descending logit (ties:
                                                    ascending id), bit-packed at b = ceil(log2 N) bits
    topk_logits  fixed_size_list<float16>[k]        their logits minus the row's largest logit
    lse          float32                            logsumexp over the catalog of (z - max z) / tau
    tail_ids     fixed_size_binary[ceil(s b / 8)]   (optional) s tail items drawn from the proposal
    tail_logits  fixed_size_list<float16>[s]        (optional) their logits, shifted the same way

Why these types: logits are stored relative to the row's maximum because softmax is
shift-invariant and fp16 is most precise near 0, where the probability mass is; the top-1 is
exactly 0. The LSE is float32: the tail mass 1 - sum(top-k probabilities) is a difference, and an
fp16 LSE (about 0.005 absolute error at 5-10) would move every probability by 0.5%, which can be
most of a small tail. The LSE is computed from the fp16-rounded top-k logits plus the exact tail,
so the cached top-k probabilities and tail mass form a proper distribution (the tail mass is
never negative). At `tau` != 1 the LSE is of the tempered logits (see next_item_losses.teacher_lse).

Tail proposal ("teacher", the default): q_j = softmax over the tail of z_j / tau, drawn with
replacement. The importance weight p_j / q_j is then the tail mass, the same for every draw, so
the tail estimate of sampled_tail_kl is unbiased with no weight variance. "uniform" (q = 1 / (N - k))
is unbiased too but its weights follow the teacher's skewed tail, a much noisier estimate. log q
is recomputed from the stored tail logits and the LSE at unpack time, so it costs no bytes.

Packing and unpacking are vectorized numpy (np.packbits over a [B, m, b] bit array). Writers
take `parquet_options(fmt)`: zstd level 6, dictionaries and statistics off, and the fp16 logits
byte-stream-split (their high bytes, sign and exponent, are alike across a row group and
compress well once apart). On a trained teacher's k = 64 logits this is 2.65 bytes an entry
against 3.42 with pyarrow's default zstd level and no split; the bit-packed ids are near random
and compress by about 5% whatever the codec.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import torch

META_KEY = "distkd.topk"
FORMAT = 1
_CHUNK = 64  # rows per selection pass: [64, N] float32 temporaries stay in the CPU cache


@dataclass(frozen=True)
class TopKFormat:
    num_items: int
    k: int
    tail: int = 0  # s sampled tail items per row
    proposal: Literal["teacher", "uniform"] = "teacher"
    tau: float = 1.0  # temperature of the cached LSE and of the teacher proposal

    def __post_init__(self):
        if not 0 < self.k <= self.num_items or self.tail < 0 or (self.tail and self.k >= self.num_items):
            raise ValueError(f"need 0 < k <= num_items and a non-empty tail to sample from: {self}")
        if self.num_items > 2**32:
            raise ValueError("catalogs beyond 2^32 items are not supported")

    @property
    def id_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.num_items)))

    def id_bytes(self, m: int) -> int:
        return -(-m * self.id_bits // 8)

    def arrow_schema(self) -> pa.Schema:
        fields = [pa.field("topk_ids", pa.binary(self.id_bytes(self.k)), nullable=False),
                  pa.field("topk_logits", pa.list_(pa.float16(), self.k), nullable=False),
                  pa.field("lse", pa.float32(), nullable=False)]
        if self.tail:
            fields += [pa.field("tail_ids", pa.binary(self.id_bytes(self.tail)), nullable=False),
                       pa.field("tail_logits", pa.list_(pa.float16(), self.tail), nullable=False)]
        return pa.schema(fields, metadata={META_KEY: json.dumps(self.metadata())})

    def metadata(self) -> dict:
        return {"format": FORMAT, **asdict(self), "id_bits": self.id_bits}

    def parquet_options(self) -> dict:
        """Keyword arguments for pyarrow.parquet.write_table / ParquetWriter."""
        split = ["topk_logits.list.element"] + (["tail_logits.list.element"] if self.tail else [])
        return dict(compression="zstd", compression_level=6, use_dictionary=False, write_statistics=False,
                    use_byte_stream_split=split)

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> "TopKFormat":
        meta = json.loads((schema.metadata or {})[META_KEY.encode()])
        if meta.get("format") != FORMAT:
            raise ValueError(f"top-k cache format {meta.get('format')} is not {FORMAT}")
        return cls(meta["num_items"], meta["k"], meta["tail"], meta["proposal"], meta["tau"])


class TopK(NamedTuple):
    ids: torch.Tensor  # int64 [B, k]
    logits: torch.Tensor  # float32 [B, k], minus the row max, fp16-rounded
    lse: torch.Tensor  # float32 [B], logsumexp((z - max z) / tau) over the catalog
    tail_ids: Optional[torch.Tensor] = None  # int64 [B, s]
    tail_logits: Optional[torch.Tensor] = None  # float32 [B, s]
    tail_logq: Optional[torch.Tensor] = None  # float32 [B, s], log proposal probability


# -- from teacher logits -------------------------------------------------------------------

def topk_ids(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) [B, k] of the top-k by descending logit, ties broken by ascending id.

    torch.topk's choice and order among equal values is unspecified: here the k chosen are put
    in (value desc, id asc) order, and the rare rows where the k-th value ties with the next
    (so it may also occur outside the chosen k) are redone with a stable sort."""
    n = logits.shape[1]
    v, i = logits.topk(min(k + 1, n), dim=1, sorted=True)  # one more: it shows a tie at the boundary
    if torch.isnan(v).any():  # topk ranks NaN above every number: any NaN is in v
        raise ValueError("teacher logits contain NaN")
    ambiguous = v[:, k] == v[:, k - 1] if k < n else torch.zeros(len(v), dtype=torch.bool)
    v, i = v[:, :k], i[:, :k]
    i, perm = i.sort(1)  # ascending id, then a stable sort by value
    v = v.gather(1, perm)
    v, perm = v.sort(dim=1, descending=True, stable=True)
    i = i.gather(1, perm)
    if ambiguous.any():
        rows = ambiguous.nonzero()[:, 0]
        sv, si = logits[rows].sort(dim=1, descending=True, stable=True)
        v[rows], i[rows] = sv[:, :k], si[:, :k]
    return v, i


@torch.no_grad()
def select(logits: torch.Tensor, fmt: TopKFormat, generator: Optional[torch.Generator] = None) -> TopK:
    """The cached values of a batch of teacher logits [B, N] (fp16 rounding included), computed
    in chunks of rows so that any batch size fits in memory."""
    parts = [_select(logits[a:a + _CHUNK], fmt, generator) for a in range(0, logits.shape[0], _CHUNK)]
    if not parts:
        parts = [_select(logits, fmt, generator)]
    return TopK(*(None if p[0] is None else torch.cat(p) for p in zip(*parts)))


def _select(logits: torch.Tensor, fmt: TopKFormat, generator: Optional[torch.Generator]) -> TopK:
    z = logits.float()
    v, ids = topk_ids(z, fmt.k)
    top = _fp16(v - v[:, :1])  # relative to the row max, which is the top-1
    # One exp pass over the catalog: the tail's sum is the total minus the (exact) top-k.
    e = torch.exp((z - v[:, :1]) / fmt.tau)
    total = e.sum(1)
    tail_sum = (total - e.gather(1, ids).sum(1)).clamp(min=0.0) if fmt.k < fmt.num_items else torch.zeros_like(total)
    lse = torch.log(torch.exp(top / fmt.tau).sum(1) + tail_sum)
    if not fmt.tail:
        return TopK(ids, top, lse)
    weights = e.scatter_(1, ids, 0.0) if fmt.proposal == "teacher" else torch.ones_like(e).scatter_(1, ids, 0.0)
    tail_ids = (torch.multinomial(weights, fmt.tail, replacement=True, generator=generator) if len(z)
                else torch.empty(0, fmt.tail, dtype=torch.int64))
    tail = _fp16(z.gather(1, tail_ids) - v[:, :1])
    return TopK(ids, top, lse, tail_ids, tail, tail_logq(top, lse, tail, fmt))


def tail_logq(top: torch.Tensor, lse: torch.Tensor, tail: torch.Tensor, fmt: TopKFormat) -> torch.Tensor:
    """log q of the tail draws, recomputed from the cached values."""
    if fmt.proposal == "uniform":
        return torch.full_like(tail, -math.log(fmt.num_items - fmt.k))
    log_top_mass = (torch.logsumexp(top / fmt.tau, 1) - lse).clamp(max=0.0)  # <= 0: lse includes the top-k
    log1m = torch.where(log_top_mass > -math.log(2.0), torch.log(-torch.expm1(log_top_mass)),
                        torch.log1p(-torch.exp(log_top_mass)))  # log(1 - top mass), stable
    return tail / fmt.tau - (lse + log1m)[:, None]


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=-65504.0).half().float()


# -- Arrow packing -------------------------------------------------------------------------

def pack_bits(ids: np.ndarray, bits: int) -> np.ndarray:
    """ids [B, m] in [0, 2^bits) -> uint8 [B, ceil(m bits / 8)], little-endian bit order."""
    b, m = ids.shape
    raw = np.ascontiguousarray(ids, dtype="<u4").view(np.uint8).reshape(b, m, 4)
    flat = np.unpackbits(raw, axis=2, bitorder="little")[:, :, :bits].reshape(b, m * bits)
    return np.packbits(flat, axis=1, bitorder="little")


def unpack_bits(buf: np.ndarray, m: int, bits: int) -> np.ndarray:
    """The inverse of pack_bits: uint8 [B, nbytes] -> int64 [B, m]."""
    b = buf.shape[0]
    flat = np.unpackbits(buf, axis=1, count=m * bits, bitorder="little").reshape(b, m, bits)
    wide = np.zeros((b, m, 32), np.uint8)
    wide[:, :, :bits] = flat
    return np.packbits(wide, axis=2, bitorder="little").view("<u4").reshape(b, m).astype(np.int64)


def _binary(rows: np.ndarray) -> pa.Array:
    b, width = rows.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), b, [None, pa.py_buffer(np.ascontiguousarray(rows))])


def _halves(x: torch.Tensor) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.numpy().astype(np.float16).reshape(-1)), x.shape[1])


def pack(top: TopK, fmt: TopKFormat) -> pa.Table:
    """A row group's Arrow table (schema `fmt.arrow_schema()`) from its cached values."""
    cols = [_binary(pack_bits(top.ids.cpu().numpy(), fmt.id_bits)), _halves(top.logits.cpu()),
            pa.array(top.lse.cpu().numpy().astype(np.float32))]
    if fmt.tail:
        cols += [_binary(pack_bits(top.tail_ids.cpu().numpy(), fmt.id_bits)), _halves(top.tail_logits.cpu())]
    return pa.Table.from_arrays(cols, schema=fmt.arrow_schema())


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)


def _ids(arr: pa.Array, m: int, fmt: TopKFormat) -> torch.Tensor:
    width = arr.type.byte_width
    buf = np.frombuffer(arr.buffers()[1], np.uint8, count=(arr.offset + len(arr)) * width)[arr.offset * width:]
    return torch.from_numpy(unpack_bits(buf.reshape(len(arr), width), m, fmt.id_bits))


def _floats(arr: pa.Array, m: int) -> torch.Tensor:
    return torch.from_numpy(arr.flatten().to_numpy().astype(np.float32).reshape(len(arr), m))


def unpack(table: pa.Table, fmt: Optional[TopKFormat] = None) -> TopK:
    """Tensors back from a cache table (a row group or any slice of one)."""
    fmt = fmt or TopKFormat.from_schema(table.schema)
    ids, top = _ids(_column(table, "topk_ids"), fmt.k, fmt), _floats(_column(table, "topk_logits"), fmt.k)
    lse = torch.from_numpy(_column(table, "lse").to_numpy().astype(np.float32))
    if not fmt.tail:
        return TopK(ids, top, lse)
    tail = _floats(_column(table, "tail_logits"), fmt.tail)
    return TopK(ids, top, lse, _ids(_column(table, "tail_ids"), fmt.tail, fmt), tail, tail_logq(top, lse, tail, fmt))
