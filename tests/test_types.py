"""The column types users have: each accepted type decodes, through the real LogLoader, into the
same Batch as the canonical int64 / float32 / int8 logs; string ids hash the same in every
process and as the pure-Python definition; what is still refused names file, column and row."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distkd.config import from_dict, to_dict
from distkd.data.hashing import FNV_OFFSET, hash_ids, hash_strings, reference_fnv1a64, reference_hash
from distkd.data.loader import LogLoader, split_files
from distkd.data.schema import DenseFeature, HashSpec, LogsError, Schema, SparseFeature, Task, load_schema
from distkd.data.validate import validate_logs

REPO = Path(__file__).resolve().parents[1]
N, GROUP = 300, 64
SEED = 7
CANONICAL = Schema(
    sparse=[SparseFeature("user", num_embeddings=1000), SparseFeature("item", hash_size=97),
            SparseFeature("tags", num_embeddings=50, multi_valued=True),
            SparseFeature("city", hash_size=101), SparseFeature("words", hash_size=53, multi_valued=True)],
    dense=[DenseFeature("d0"), DenseFeature("d1", "log1p")],
    tasks=[Task("click", "click"), Task("conv", "conv")],
)
# The same logs with city and words as strings: the canonical ids above are their hashes.
STRINGS = from_dict(Schema, to_dict(CANONICAL), "strings")
for _f in STRINGS.sparse[3:]:
    _f.hash = HashSpec(seed=SEED)
CITIES = ["", "Zürich", "a", "São Paulo", "x" * 300] + [f"city-{i}" for i in range(40)]


def _data(seed: int = 0) -> dict:
    """Plain numpy/Python columns: canonical ints and floats, strings for the hashed features."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 4, N)
    wlens = rng.integers(0, 3, N)
    return {
        "example_id": np.arange(N, dtype=np.int64),
        "user": rng.integers(0, 1000, N), "item": rng.integers(0, 10**6, N),
        "tags": [list(rng.integers(0, 50, k)) for k in lens],
        "city": [CITIES[i] for i in rng.integers(0, len(CITIES), N)],
        "words": [[f"w{j}" for j in rng.integers(0, 500, k)] for k in wlens],
        "d0": (rng.normal(size=N) * 3).astype(np.float32), "d1": (rng.random(N) * 100).astype(np.float32),
        "click": rng.integers(0, 2, N), "click_null": rng.random(N) < 0.2, "conv": rng.integers(0, 2, N),
    }


def _ref(s: str, size: int) -> int:
    return reference_hash(s, SEED) % size


def canonical_table(d: dict) -> pa.Table:
    cols = {
        "example_id": pa.array(d["example_id"]), "user": pa.array(d["user"], pa.int64()),
        "item": pa.array(d["item"], pa.int64()), "tags": pa.array(d["tags"], pa.list_(pa.int64())),
        "city": pa.array([_ref(s, 101) for s in d["city"]], pa.int64()),
        "words": pa.array([[_ref(w, 53) for w in ws] for ws in d["words"]], pa.list_(pa.int64())),
        "d0": pa.array(d["d0"]), "d1": pa.array(d["d1"]),
        "click": pa.array(d["click"], pa.int8(), mask=d["click_null"]), "conv": pa.array(d["conv"], pa.int8()),
    }
    return pa.table(cols, schema=CANONICAL.arrow_schema())


def string_table(d: dict, string=pa.string()) -> dict:
    t = canonical_table(d)
    return {**{n: t.column(n) for n in t.column_names},
            "city": pa.array(d["city"], string), "words": pa.array(d["words"], pa.list_(string))}


def write(root: Path, cols: dict | pa.Table, schema: Schema) -> Path:
    t = cols if isinstance(cols, pa.Table) else pa.table(cols)
    for k, split in enumerate(("train", "valid", "test")):  # the same rows, unique example ids
        (root / split).mkdir(parents=True, exist_ok=True)
        i = t.schema.get_field_index("example_id")
        ids = pa.array(np.arange(k * N, (k + 1) * N), t.schema.field(i).type)
        pq.write_table(t.set_column(i, "example_id", ids), root / split / "part-00000.parquet", row_group_size=GROUP)
    schema.save(root / "schema.yaml")
    return root


def batches(root: Path) -> list:
    return list(LogLoader(split_files(root, "train"), load_schema(root), 128))


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.sparse.keys() == y.sparse.keys()
        assert torch.equal(x.sparse.values(), y.sparse.values()) and x.sparse.values().dtype == torch.int64
        assert torch.equal(x.sparse.lengths(), y.sparse.lengths())
        assert torch.equal(x.dense, y.dense) and x.dense.dtype == torch.float32
        assert torch.equal(x.labels.isnan(), y.labels.isnan())
        assert torch.equal(x.labels.nan_to_num(-1), y.labels.nan_to_num(-1))
        assert torch.equal(x.example_id, y.example_id) and x.example_id.dtype == torch.int64


def _py_labels(d: dict, nan=float("nan")) -> list:
    return [nan if m else float(v) for v, m in zip(d["click"], d["click_null"])]


def _float64_dense(d, t):  # the way pandas writes floats: float64, from Python floats
    return {**t, "d0": pa.Table.from_pydict({"x": [float(v) for v in d["d0"]]}).column("x"),
            "d1": pa.array(d["d1"].astype(np.float64))}


def _float_labels_nan(d, t):  # NaN and null both mean "no label"
    click = [None if i % 2 else v for i, v in enumerate(_py_labels(d))]
    return {**t, "click": pa.array(click, pa.float64()), "conv": pa.array(d["conv"].astype(np.float32))}


def _bool_labels(d, t):
    return {**t, "click": pa.array([None if m else bool(v) for v, m in zip(d["click"], d["click_null"])]),
            "conv": pa.array(d["conv"].astype(bool))}


def _narrow_ints(d, t):
    return {**t, "example_id": pa.array(d["example_id"], pa.int32()), "user": pa.array(d["user"], pa.int16()),
            "item": pa.array(d["item"], pa.int32()), "tags": pa.array(d["tags"], pa.list_(pa.int8())),
            "conv": pa.array(d["conv"], pa.int64())}


def _unsigned(d, t):
    return {**t, "user": pa.array(d["user"], pa.uint16()), "item": pa.array(d["item"], pa.uint64()),
            "tags": pa.array(d["tags"], pa.large_list(pa.uint8())), "conv": pa.array(d["conv"], pa.uint8())}


def _dictionary(d, t):
    enc = {n: t[n].combine_chunks().dictionary_encode() for n in ("user", "item", "d0", "d1", "click", "conv")}
    return {**t, **enc, "city": pa.array(d["city"]).dictionary_encode(),
            "words": pa.array(d["words"], pa.list_(pa.dictionary(pa.int32(), pa.string())))}


def _large_string(d, t):
    return string_table(d, pa.large_string())


def _binary(d, t):
    return {**string_table(d, pa.binary()), "city": pa.array([s.encode() for s in d["city"]], pa.binary())}


VARIANTS = [_float64_dense, _float_labels_nan, _bool_labels, _narrow_ints, _unsigned, _dictionary,
            _large_string, _binary]


@pytest.fixture(scope="module")
def canonical(tmp_path_factory):
    root = write(tmp_path_factory.mktemp("canonical"), canonical_table(_data()), CANONICAL)
    return root, batches(root)


@pytest.mark.unit
@pytest.mark.parametrize("variant", VARIANTS, ids=[v.__name__[1:] for v in VARIANTS])
def test_accepted_types_decode_like_canonical_logs(tmp_path, canonical, variant):
    d = _data()
    root = write(tmp_path, variant(d, string_table(d)), STRINGS)
    summary = validate_logs(root)  # the contract checks and `distkd data validate` accept them
    assert summary["rows"] == 3 * N
    assert summary["splits"]["train"]["labels"]["click"]["labeled"] == N - int(d["click_null"].sum()) - (
        int((~d["click_null"][1::2]).sum()) if variant is _float_labels_nan else 0)
    want = canonical[1]
    if variant is _float_labels_nan:  # every other row's label was nulled too
        want = [dataclasses.replace(b, labels=b.labels.clone()) for b in want]
        for b in want:
            b.labels[b.example_id % 2 == 1, 0] = float("nan")
    assert_same(batches(root), want)


@pytest.mark.unit
def test_unsigned_ids_past_int64_fold_modulo_hash_size(tmp_path):
    d = _data()
    big = np.uint64(2**64 - 1) - d["item"].astype(np.uint64)
    root = write(tmp_path, {**string_table(d), "item": pa.array(big, pa.uint64())}, STRINGS)
    validate_logs(root)
    values = [b.sparse["item"].values() for b in batches(root)]
    assert torch.cat(values).tolist() == [int(v) % 97 for v in big]


# -- hashing ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_fnv_part_is_the_standard_fnv1a64():
    assert reference_fnv1a64(b"") == FNV_OFFSET
    assert reference_fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert reference_fnv1a64(b"foobar") == 0x85944171F73967E8


@pytest.mark.unit
def test_vectorized_hash_equals_the_pure_python_definition():
    rng = np.random.default_rng(1)
    words = CITIES + ["".join(chr(c) for c in rng.integers(32, 0x2FF, k)) for k in rng.integers(0, 40, 500)]
    for seed in (0, SEED, 2**64 - 1):
        want = [reference_hash(w, seed) for w in words]
        for typ in (pa.string(), pa.large_string(), pa.string_view()):
            assert hash_strings(pa.array(words, typ), seed).tolist() == want
        assert hash_strings(pa.array([w.encode() for w in words], pa.binary()), seed).tolist() == want
        assert hash_strings(pa.array(words).dictionary_encode(), seed).tolist() == want
        assert hash_strings(pa.array(words).slice(7, 100), seed).tolist() == want[7:107]  # offsets
    fixed = [f"{i:08x}" for i in rng.integers(0, 2**32, 300)]  # the fixed-width path
    assert hash_strings(pa.array(fixed)).tolist() == [reference_hash(w) for w in fixed]
    assert hash_strings(pa.array(words), 1).tolist() != hash_strings(pa.array(words), 0).tolist()
    ids = hash_ids(pa.array(words), 0, 1000)
    assert ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < 1000


@pytest.mark.integration
def test_hash_is_identical_in_fresh_processes():
    code = ("import sys, pyarrow as pa; from distkd.data.hashing import hash_strings; "
            "print(hash_strings(pa.array(sys.argv[1:]), 7).tolist(), hash(sys.argv[1]))")
    words = ["user-1", "Zürich", "", "x" * 100]
    outs = []
    for salt in ("1", "2"):  # different PYTHONHASHSEED: Python's own hash() differs, ours must not
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": salt}
        r = subprocess.run([sys.executable, "-c", code, *words], capture_output=True, text=True, env=env, check=True)
        hashes, py_hash = r.stdout.rsplit(" ", 1)
        outs.append((json.loads(hashes), int(py_hash)))
    assert outs[0][0] == outs[1][0] == [reference_hash(w, 7) for w in words]
    assert outs[0][1] != outs[1][1]


@pytest.mark.unit
def test_hash_spec_is_part_of_the_fingerprint():
    a = from_dict(Schema, to_dict(STRINGS), "a")
    assert a.fingerprint() == STRINGS.fingerprint() != CANONICAL.fingerprint()
    a.sparse[3].hash = HashSpec(seed=SEED + 1)
    assert a.fingerprint() != STRINGS.fingerprint()


# -- refused, naming file, column and row ---------------------------------------------------


def _set_row(d: dict, t: dict, name: str, row: int, value, typ, dictionary: bool = False) -> dict:
    col = t[name].to_pylist()
    col[row] = value
    arr = pa.array(col, typ)
    return {**t, name: arr.dictionary_encode() if dictionary else arr}


REFUSED = [
    # (column changes, column, message): the row is 70, in row group 1
    (lambda d, t: _set_row(d, _float64_dense(d, t), "d0", 70, 1e39, pa.float64()), "d0",
     r"row group 1, column 'd0', row 70: dense value 1e\+39 overflows float32"),
    (lambda d, t: _set_row(d, _float_labels_nan(d, t), "click", 70, 0.5, pa.float64()), "click",
     "row group 1, column 'click', row 70: label 0.5 is not 0, 1 or null"),
    (lambda d, t: _set_row(d, _float_labels_nan(d, t), "conv", 70, 2.0, pa.float32()), "conv",
     "row group 1, column 'conv', row 70: label 2.0 is not 0, 1 or null"),
    (lambda d, t: _set_row(d, _dictionary(d, t), "click", 70, 3, pa.int8(), dictionary=True), "click",
     "row group 1, column 'click', row 70: label 3 is not 0, 1 or null"),
    (lambda d, t: _set_row(d, t, "city", 70, None, pa.string()), "city",
     "row group 1, column 'city', row 70: null id in a single-valued feature"),
    (lambda d, t: {**t, "d1": pa.array(d["d1"].astype(str))}, "d1", "column 'd1' has type string, expected float"),
    (lambda d, t: {**t, "d0": pa.array(d["example_id"].astype("datetime64[s]"))}, "d0",
     r"column 'd0' has type timestamp\[\w+\], expected float"),
    (lambda d, t: {**t, "user": pa.array(d["user"].astype(np.float64))}, "user",
     "column 'user' has type double, expected int64"),
    (lambda d, t: {**t, "click": pa.array([str(v) for v in d["click"]])}, "click",
     "column 'click' has type string, expected int8"),
    (lambda d, t: {**t, "user": pa.array([str(u) for u in d["user"]])}, "user",
     "column 'user' has type string, expected int64: string ids need `hash: "),
    (lambda d, t: {**t, "words": pa.array([",".join(w) for w in d["words"]])}, "words",
     "column 'words' has type string, expected list<item: string>"),
]


@pytest.mark.integration
@pytest.mark.parametrize("change, column, message", REFUSED, ids=[f"{i}-{r[1]}" for i, r in enumerate(REFUSED)])
def test_refused_types_and_values_name_file_column_and_row(tmp_path, change, column, message):
    d = _data()
    root = write(tmp_path, change(d, string_table(d)), STRINGS)
    shard = str(root / "train" / "part-00000.parquet")
    with pytest.raises(LogsError, match=message) as e:
        validate_logs(root)
    assert str(e.value).startswith(shard)
    with pytest.raises(LogsError, match=message):  # the loader's own checks say the same
        batches(root)
    r = subprocess.run([sys.executable, "-m", "distkd.cli", "data", "validate", str(root)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "Traceback" not in r.stderr and shard in r.stderr, r.stderr
