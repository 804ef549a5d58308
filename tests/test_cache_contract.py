"""The cache contract without Ray: manifest records, content codecs, reconciliation.

tests/cache_manifests/ holds manifests written by `distkd cache build` at commit a2b63bf (before
the typed records): a CTR cache with the hidden layer (ctr-hidden.json), the same cache grown by
a shard after another was deleted (ctr-grown-dropped.json: two builds, a `dropped` entry), and a
next-item top-k cache with a sampled tail (next-item-topk.json).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distkd.cache.content import CtrLogits, NextItemTopK, check_schema, codec_for, row_group_rng
from distkd.cache.contract import (
    CacheError, Content, InputFingerprint, Manifest, Output, SchemaRef, ShardEntry, Teacher, Timings, read_manifest,
    write_manifest,
)
from distkd.cache.reconcile import reconcile
from distkd.cache.topk import TopKFormat, topk_ids
from distkd.models.teacher import TeacherOutput
from distkd.models.teacher_spec import TeacherError

OLD = Path(__file__).parent / "cache_manifests"
OLD_FILES = sorted(OLD.glob("*.json"))


# -- manifest records ------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("path", OLD_FILES, ids=lambda p: p.stem)
def test_a_manifest_of_the_previous_code_reads_and_writes_back_byte_for_byte(path, tmp_path):
    shutil.copy(path, tmp_path / "manifest.json")
    m = read_manifest(tmp_path)
    assert m.complete and m.shards and all(isinstance(e, ShardEntry) for e in m.shards.values())
    write_manifest(tmp_path, m)
    assert (tmp_path / "manifest.json").read_bytes() == path.read_bytes()


@pytest.mark.unit
def test_the_records_are_typed():
    grown = Manifest.from_json(json.loads((OLD / "ctr-grown-dropped.json").read_text()), "grown")
    assert grown.content.hidden and grown.content.topk is None and len(grown.builds) == 2
    assert set(grown.dropped) == {"train/part-00000.parquet"} and "train/part-00009.parquet" in grown.planned("train")
    entry = grown.shards["train/part-00009.parquet"]
    assert entry.output.rows == entry.input.rows == sum(entry.input.row_groups) and entry.timings.attempt == 1
    topk = Manifest.from_json(json.loads((OLD / "next-item-topk.json").read_text()), "topk")
    assert topk.content.topk == TopKFormat(num_items=2000, k=16, tail=4) and topk.totals.values_per_row == 20


def _doc(name: str = "ctr-hidden.json") -> dict:
    return json.loads((OLD / name).read_text())


@pytest.mark.unit
def test_another_format_version_is_refused_naming_the_file(tmp_path):
    doc = _doc()
    doc["format"] = 2
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=f"{tmp_path / 'manifest.json'}: cache format 2; this distkd reads format 1"):
        read_manifest(tmp_path)


@pytest.mark.unit
@pytest.mark.parametrize("where, field", [
    (lambda d: d, "manifest.owner"),
    (lambda d: d["content"], "content.quantized"),
    (lambda d: d["shards"]["train/part-00001.parquet"]["timings"], "shards['train/part-00001.parquet'].timings.gpu"),
    (lambda d: d["builds"][0], "builds[0].host"),
    (lambda d: d["teacher"], "teacher.license"),
])
def test_an_unknown_field_is_refused_naming_it_and_the_file(tmp_path, where, field):
    doc = _doc()
    where(doc)[field.rsplit(".", 1)[1]] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError) as e:
        read_manifest(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'manifest.json'}: unknown field '{field}'"), e.value


@pytest.mark.unit
def test_a_missing_field_is_refused_naming_it():
    doc = _doc()
    del doc["shards"]["train/part-00001.parquet"]["output"]["sha256"]
    with pytest.raises(CacheError,
                       match=r"m.json: 'shards\['train/part-00001.parquet'\].output' has no field 'sha256'"):
        Manifest.from_json(doc, "m.json")


# -- content codecs --------------------------------------------------------------------------

def _through_parquet(codec, table, tmp_path):
    """The table written with the codec's options and read back, as the reader sees a row group."""
    with pq.ParquetWriter(tmp_path / "c.parquet", codec.schema, **codec.parquet_options()) as w:
        w.write_table(table, row_group_size=max(table.num_rows, 1))
    with pq.ParquetFile(tmp_path / "c.parquet") as pf:
        check_schema(codec.schema, pf.schema_arrow, "c.parquet")
        return pf.read_row_group(0)


@pytest.mark.unit
def test_ctr_logits_encode_and_decode(tmp_path):
    codec = codec_for(Content("fp16", True, 3, ["click", "buy"]))
    assert codec == CtrLogits(("click", "buy"), "fp16", 3) and codec.values_per_row == 2
    torch.manual_seed(0)
    outs = [TeacherOutput(torch.randn(5, 2) * 4, torch.randn(5, 3)),
            TeacherOutput(torch.randn(2, 2), torch.randn(2, 3))]
    rng = row_group_rng("00ff00ff00ff00ff")
    table = _through_parquet(codec, codec.table([codec.encode(o, rng) for o in outs]), tmp_path)
    got = codec.decode(table, "t", codec.read_columns(True), "c.parquet")
    logits, hidden = torch.cat([o.logits for o in outs]), torch.cat([o.hidden for o in outs])
    np.testing.assert_array_equal(got["t.logits"], logits.numpy().astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got["t.hidden"], hidden.numpy().astype(np.float16).astype(np.float32))
    cmp = codec.comparable(table)
    assert cmp["logits"].dtype == np.float16 and cmp["hidden"].shape == (7, 3)
    assert codec.position("logits", 1) == "task 'buy'" and codec.table([]).num_rows == 0
    with pytest.raises(TeacherError, match=r"exceed the fp16 range; cache with dtype fp32") as e:
        codec.encode(TeacherOutput(torch.tensor([[0.0, 1.0], [7e4, 0.0]]), torch.zeros(2, 3)), rng)
    assert e.value.row == 1


@pytest.mark.unit
def test_next_item_topk_encode_and_decode(tmp_path):
    fmt = TopKFormat(num_items=300, k=8, tail=4)
    codec = codec_for(Content("fp16", False, None, ["next_item"], fmt))
    assert codec == NextItemTopK(fmt) and codec.values_per_row == 12 and not codec.hidden
    torch.manual_seed(0)
    logits = [torch.randn(6, 300) * 3, torch.randn(3, 300) * 3]
    rng = row_group_rng("0123456789abcdef")
    table = _through_parquet(codec, codec.table([codec.encode(TeacherOutput(z), rng) for z in logits]), tmp_path)
    got = codec.decode(table, "t", codec.read_columns(False), "c.parquet")
    values, ids = topk_ids(torch.cat(logits), 8)
    np.testing.assert_array_equal(got["t.topk_ids"], ids.numpy())
    np.testing.assert_array_equal(got["t.topk_logits"], (values - values[:, :1]).half().float().numpy())
    assert got["t.tail_ids"].shape == (9, 4) and set(got) >= {"t.lse", "t.tail_logits", "t.tail_logq"}
    # the same seed draws the same tail: what `cache verify --recompute` relies on
    again = codec.table([codec.encode(TeacherOutput(z), row_group_rng("0123456789abcdef")) for z in logits[:1]])
    np.testing.assert_array_equal(codec.comparable(again)["tail_ids"], codec.comparable(table)["tail_ids"][:6])
    assert codec.describe(2.5) == "2.50 bytes per cached entry (top-8 + 4 tail of 300 items)"


@pytest.mark.unit
def test_a_file_of_the_other_content_is_refused():
    ctr, topk = CtrLogits(("click",), "fp16"), NextItemTopK(TopKFormat(num_items=50, k=4))
    with pytest.raises(CacheError, match="f.parquet: column 'topk_ids' is missing"):
        check_schema(topk.schema, ctr.schema, "f.parquet")
    with pytest.raises(CacheError, match="column 'logits' is fixed_size_list<item: halffloat>"):
        check_schema(CtrLogits(("click",), "fp32").schema, ctr.schema, "f.parquet")


# -- reconciliation --------------------------------------------------------------------------

def _fp(rel: str, rows: int = 10) -> InputFingerprint:
    return InputFingerprint(rel, 100 + rows, rows, [rows], "f00d")


def _header(sha: str = "a" * 64, logs: str = "/logs") -> Manifest:
    return Manifest(teacher=Teacher({"name": "t", "sha256": sha}), schema=SchemaRef("s1", {"id": "example_id"}),
                    content=Content("fp16", False, None, ["click"]), logs=logs)


def _world(tmp_path: Path, committed: dict[str, int], logs: list[str]) -> tuple[str, str]:
    """A logs folder with files `logs`, a cache whose manifest commits `committed` (rel -> bytes
    of its file on disk; -1: no file)."""
    out, root = tmp_path / "cache", tmp_path / "logs"
    for rel in logs:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    m = _header(logs=str(root))
    m.splits["train"] = list(committed)
    for rel, size in committed.items():
        m.shards[rel] = ShardEntry(_fp(rel).with_ids("1d"), Output(Path(rel).name, 10, 64, "0" * 64),
                                   Timings(1.0, 0.1, 0.5, 0.1, 0.0, 1, {}, "2026-01-01T00:00:00+0000"))
        if size >= 0:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(b"p" * size)
    out.mkdir(exist_ok=True)
    write_manifest(out, m)
    return str(out), str(root)


@pytest.mark.unit
def test_reconcile_skips_recomputes_drops_and_adds(tmp_path):
    out, logs = _world(tmp_path, {"train/a.parquet": 64, "train/b.parquet": -1, "train/c.parquet": 64,
                                  "train/d.parquet": 63}, ["train/a.parquet", "train/b.parquet", "train/d.parquet"])
    current = {"train": [_fp(f"train/{x}.parquet") for x in "abde"]}
    plan = reconcile(out, logs, _header(), current)
    assert plan.valid == ["train/a.parquet"]
    assert [fp.path for fp in plan.todo] == ["train/b.parquet", "train/d.parquet", "train/e.parquet"]
    assert plan.damaged == ["train/b.parquet", "train/d.parquet"]  # no file, and a file of the wrong size
    assert plan.gone == ["train/c.parquet"] and plan.gained == {"train": ["train/e.parquet"]}
    m = plan.manifest
    assert set(m.shards) == {"train/a.parquet"} and set(m.dropped) == {"train/c.parquet"}
    assert m.planned() == ["train/a.parquet", "train/b.parquet", "train/d.parquet", "train/e.parquet"]
    assert (Path(out) / "train/c.parquet").exists()  # reconcile decides; the build deletes


@pytest.mark.unit
def test_reconcile_of_a_new_cache_computes_everything(tmp_path):
    header = _header()
    plan = reconcile(str(tmp_path / "new"), str(tmp_path), header, {"test": [_fp("test/a.parquet")]})
    assert plan.manifest is header and [fp.path for fp in plan.todo] == ["test/a.parquet"] and not plan.gained
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match=r"stray: exists, holds \['notes.txt'\] but no manifest.json"):
        reconcile(str(tmp_path / "stray"), str(tmp_path), header, {})


@pytest.mark.unit
def test_reconcile_refuses_to_mix(tmp_path):
    out, logs = _world(tmp_path, {"train/a.parquet": 64}, ["train/a.parquet"])
    with pytest.raises(CacheError, match=r"existing cache holds logits of teacher aaaaaaaaaaaa… \(t\), this build's "
                                         r"is teacher bbbbbbbbbbbb…"):
        reconcile(out, logs, _header(sha="b" * 64), {})
    other = dataclasses.replace(_header(), content=Content("fp32", False, None, ["click"]))
    with pytest.raises(CacheError, match="has dtype='fp16', this build asks dtype='fp32'"):
        reconcile(out, logs, other, {})
    changed = dataclasses.replace(_fp("train/a.parquet"), size=999)
    with pytest.raises(CacheError,
                       match=r"log shard train/a.parquet changed since its logits were cached \(size 110 -> 999\)"):
        reconcile(out, logs, _header(), {"train": [changed]})
