"""Deterministic 64-bit hashes in numpy: string ids into a table, and integer mixing for sketches.

String (or binary) sparse ids are hashed with `fnv1a_fmix64`, the one function a schema's
`hash: {function: fnv1a_fmix64, seed: S}` names:

    h = 0xcbf29ce484222325 XOR S                 # FNV-1a 64 offset basis, seeded
    for each byte b of the UTF-8 (or binary) value:
        h = (h XOR b) * 0x100000001b3  mod 2**64   # FNV-1a 64
    h = fmix64(h)                                  # MurmurHash3's finalizer: every bit mixes into
    id = h mod hash_size                           #   the low bits the modulo keeps

    fmix64(h): h ^= h >> 33; h *= 0xff51afd7ed558ccd; h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53; h ^= h >> 33

With S = 0 the loop is plain FNV-1a 64, so a serving system reimplements it in a few lines in
any language. Python's `hash()` is salted per process and never used. The vectorized version
runs one numpy step per byte position over all values at once (values sorted by length, so
the step at position k touches only values longer than k); a dictionary-encoded column hashes
only its dictionary.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_M64 = (1 << 64) - 1
HASH_FUNCTIONS = ("fnv1a_fmix64",)


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place on a uint64 array (returned)."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed uint64 per integer (splitmix64's finalizer of x + golden gamma): the
    pseudo-random keys of the stats sketches, the same for the same id on any machine."""
    h = x.astype(np.uint64, copy=True) + np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(bytes uint8, offsets int64 [n+1]) of a string/binary array (large and view types too)."""
    if pa.types.is_string_view(arr.type) or pa.types.is_binary_view(arr.type):
        arr = arr.cast(pa.large_binary())
    wide = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    bufs = arr.buffers()
    off = np.frombuffer(bufs[1], np.int64 if wide else np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return data, off.astype(np.int64)


def hash_strings(arr: pa.Array, seed: int = 0) -> np.ndarray:
    """fnv1a_fmix64 of every value of a string/binary array, as uint64 (drop nulls first: a
    null's bytes are undefined). Deterministic across processes and machines."""
    if isinstance(arr, pa.DictionaryArray):
        return hash_strings(arr.dictionary, seed)[arr.indices.to_numpy(zero_copy_only=False)]
    data, off = _buffers(arr)
    n = len(off) - 1
    h = np.full(n, FNV_OFFSET ^ (seed & _M64), np.uint64)
    if n == 0:
        return h
    starts, lengths = off[:-1], np.diff(off)
    top = int(lengths.max())
    prime = np.uint64(FNV_PRIME)
    if top and int(lengths.min()) == top:
        # Fixed width (hex ids, UUIDs): byte k of every value is one strided column, no gather.
        cols = data[int(off[0]) : int(off[-1])].reshape(n, top)
        for k in range(top):
            h ^= cols[:, k]
            h *= prime
        return fmix64(h)
    # Longest first, so the values still going at byte k are a prefix. Radix sort on 16 bits.
    key = (top - lengths).astype(np.uint16 if top < 65536 else np.int64)
    order = np.argsort(key, kind="stable")
    starts = starts[order]
    active = np.searchsorted(-lengths[order], -np.arange(top), side="left")
    for k in range(top):
        m = int(active[k])
        hk = h[:m]
        hk ^= data[starts[:m] + k]
        hk *= prime
    out = np.empty_like(h)
    out[order] = h
    return fmix64(out)


def hash_ids(arr: pa.Array, seed: int, hash_size: int) -> np.ndarray:
    """Table rows (int64 in [0, hash_size)) of string/binary ids."""
    return (hash_strings(arr, seed) % np.uint64(hash_size)).astype(np.int64)


def reference_fnv1a64(value: bytes | str, seed: int = 0) -> int:
    """Seeded FNV-1a 64 in plain Python (seed 0: the standard function)."""
    h = FNV_OFFSET ^ (seed & _M64)
    for b in value.encode() if isinstance(value, str) else value:
        h = ((h ^ b) * FNV_PRIME) & _M64
    return h


def reference_hash(value: bytes | str, seed: int = 0) -> int:
    """fnv1a_fmix64 in plain Python, one value: the definition the vectorized version must match."""
    h = reference_fnv1a64(value, seed)
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    return h ^ (h >> 33)
