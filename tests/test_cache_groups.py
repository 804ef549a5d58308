"""Teacher groups in the cache build (distkd.cache.group): a teacher trained on 2 ranks and
exported sharded, cached by a group of K = 2 actors on a two-node loopback Ray cluster (one CPU
a node, so the two ranks sit on two nodes), against a K = 1 build of the same export; a group
member SIGKILLed mid-shard; a group larger than the cluster refused in one line.

Tolerance: both builds write fp16 logits. The K = 1 worker runs the tables unsharded
(nn.EmbeddingBag), the group runs them sharded (fbgemm's fused kernel, which sums in its own
order: ~1e-7 apart in fp32), so a logit that sits on an fp16 rounding boundary may round the
other way. The files are compared bit for bit first; where they differ, every value must be
within one fp16 ulp of the other build's.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray._private.ray_constants as ray_constants
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from distkd.cache import CacheError, read_manifest
from distkd.cache.build import CacheJob, build
from distkd.cache.group import share, take_rows
from distkd.cache.pool import plan_pool
from distkd.cache.verify import verify_cache
from distkd.cli import main as cli_main
from distkd.config import ConfigError
from distkd.data.synth import generate
from distkd.models.teacher_spec import TeacherSpec
from tests.faults.cache import kill_rank_class, slow_worker_class
from distkd.bench.ray_local import kill_session, ray_cluster
from tests.support import distkd_log, job_for, train

TIMEOUT_S = 60.0  # the group's rendezvous, collectives and placement: a hang fails the test in a minute


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny logs (2 train shards of 2,400 rows, row groups of 1,024) and a teacher trained on 2
    ranks, exported sharded (each rank wrote its own tables through DCP)."""
    root = tmp_path_factory.mktemp("groups")
    logs = root / "logs"
    generate(logs, rows=6000, shards=2, seed=0, row_group_rows=1024, preset="small")
    train(job_for(logs, root / "run", "train.max_steps=2", "train.eval_every=2", "export.format=sharded"), 2)
    export = root / "run" / "export"
    names = sorted(p.name for p in (export / "tables").iterdir())
    assert names[0] == ".metadata" and {n.split("_")[2] for n in names[1:]} == {"0", "1"}  # both ranks wrote shards
    return {"root": root, "logs": logs, "export": export}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two `ray start` nodes on 127.0.0.1, one CPU each; this process drives builds on it."""
    # The driver's address look-ups must say 127.0.0.1, as the nodes' do: what
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 does (tests/ray_cluster.py), read by Ray when this
    # process imported it, before this fixture could set it.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        with ray_cluster(tmp_path_factory.mktemp("ray"), head_cpus=1, workers=({"cpus": 1},), dashboard=False) as c:
            yield c


def _job(world, cluster, out: Path, ranks: int, **kw) -> CacheJob:
    return CacheJob(teacher=str(world["export"]), logs=str(world["logs"]), out=str(out), splits=["train"],
                    ray_address=str(cluster), teacher_ranks=ranks, **{"group_timeout_s": TIMEOUT_S, **kw})


@pytest.fixture(scope="module")
def builds(world, cluster):
    """The train split cached by two single actors (K = 1) and by one group of two (K = 2)."""
    out = {k: world["root"] / f"cache-k{k}" for k in (1, 2)}
    summaries = {k: build(_job(world, cluster, out[k], k)) for k in (1, 2)}
    return out, summaries


def _logits(path: Path) -> np.ndarray:
    col = pq.read_table(path, columns=["logits"]).column("logits").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)


@pytest.mark.unit
@pytest.mark.parametrize("rows", [1, 2, 5, 7, 8])
@pytest.mark.parametrize("ranks", [2, 3])
def test_the_ranks_shares_put_together_are_the_batch_in_row_order(rows, ranks):
    gen = torch.Generator().manual_seed(rows * 10 + ranks)
    lengths = torch.randint(0, 4, (2 * rows,), generator=gen, dtype=torch.int32)
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.arange(int(lengths.sum())), lengths=lengths, stride=rows)
    shares = [share(rows, ranks, r) for r in range(ranks)]
    assert len({len(s) for s in shares}) == 1  # every rank runs the same number of rows (padded)
    assert torch.cat(shares)[:rows].tolist() == list(range(rows))
    assert all(int(s.max()) <= rows - 1 for s in shares)
    parts = [take_rows(kjt, s) for s in shares]
    for key in ("a", "b"):
        want = kjt.to_dict()[key].to_dense()
        got = [bag for p in parts for bag in p.to_dict()[key].to_dense()][:rows]
        assert [b.tolist() for b in got] == [b.tolist() for b in want], key


@pytest.mark.unit
def test_the_pool_counts_groups_and_refuses_one_larger_than_the_cluster():
    p = plan_pool({"CPU": 8}, None, None, ranks=2)
    assert (p.workers, p.threads, p.num_cpus, p.ranks) == (4, 1, 1.0, 2)
    assert p.describe() == "4 group(s) of 2 ranks × (1 thread(s)) on cpu"
    p = plan_pool({"CPU": 8}, 2, None, ranks=2)
    assert (p.workers, p.threads) == (2, 2)
    p = plan_pool({"CPU": 8, "GPU": 4}, None, None, ranks=2)
    assert (p.workers, p.num_gpus, p.device) == (2, 1, "cuda") and p.workers * p.ranks * p.num_cpus <= 8
    with pytest.raises(CacheError, match=r"teacher_ranks=3: one teacher group is 3 actors of 1 CPU each, "
                                         r"the Ray cluster has 2 CPU and 0 GPU"):
        plan_pool({"CPU": 2}, None, None, ranks=3)
    with pytest.raises(CacheError, match=r"teacher_ranks=2: .* 2 CPU each, the Ray cluster has 3 CPU"):
        plan_pool({"CPU": 3}, None, 2, ranks=2)
    with pytest.raises(CacheError, match=r"teacher_ranks=8: one teacher group is 8 actors of 1 GPU each"):
        plan_pool({"CPU": 16, "GPU": 4}, None, None, ranks=8)
    assert plan_pool({"CPU": 2}, None, 4).describe() == "1 worker(s) × (4 thread(s)) on cpu"  # K = 1 as before


@pytest.mark.unit
def test_a_group_needs_an_export_teacher(tmp_path):
    spec = TeacherSpec(factory="tests.user_teacher.model:build", weights=str(tmp_path / "w.pt"))
    with pytest.raises(ConfigError, match="teacher_ranks: 2 shards the teacher over a group of actors, which needs "
                                          "a distkd export"):
        CacheJob(teacher=spec, teacher_ranks=2).validate()
    with pytest.raises(ConfigError, match="teacher_ranks: must be >= 1"):
        CacheJob(teacher_ranks=0).validate()


@pytest.mark.cluster
@pytest.mark.slow
def test_a_two_rank_group_on_two_nodes_caches_what_one_actor_caches(builds, world, record_property):
    out, s = builds
    assert s[1]["complete"] and s[2]["complete"] and s[1]["rows"] == s[2]["rows"] == 4800
    assert s[2]["pool"] == "1 group(s) of 2 ranks × (1 thread(s)) on cpu", s[2]["pool"]
    m1, m2 = read_manifest(out[1]), read_manifest(out[2])
    # K recorded in the run's record only when it is not 1 (a K = 1 manifest as before)
    assert m1.builds[-1].teacher_ranks is None and '"teacher_ranks"' not in (out[1] / "manifest.json").read_text()
    assert m2.builds[-1].teacher_ranks == 2
    (group,) = m2.builds[-1].workers
    assert group["ranks"] == 2 and len({member["node"] for member in group["members"]}) == 2, group  # two nodes
    assert set(group["plan"].values()) & {"table_wise[1]", "column_wise[1]"}, group["plan"]  # rank 1 holds tables
    verify_cache(out[2], world["logs"], str(world["export"]))
    ulp, identical = 0.0, 0
    for rel, e1 in m1.shards.items():
        e2 = m2.shards[rel]
        assert (e2.input, e2.output.rows) == (e1.input, e1.output.rows), rel
        if e2.output.sha256 == e1.output.sha256:  # the same file, bit for bit
            identical += 1
            continue
        a, b = _logits(out[1] / rel), _logits(out[2] / rel)
        assert a.shape == b.shape, rel
        step = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
        diff = np.abs(a.astype(np.float32) - b.astype(np.float32))
        assert (diff <= step).all(), (rel, float(diff.max()))
        ulp = max(ulp, float((diff / step).max()))
    record_property("files_identical", f"{identical}/{len(m1.shards)}")
    record_property("max_fp16_ulps", ulp)
    assert ulp <= 1.0


@pytest.mark.cluster
@pytest.mark.slow
def test_a_group_member_killed_mid_shard_costs_one_retry(builds, world, cluster, tmp_path):
    """Rank 1 (not the one writing) SIGKILLs itself after the first row group of the first shard
    it runs: rank 0 fails in its next collective, the driver kills and rebuilds the group, the
    shard is retried once; every row is cached once, in the clean build's bytes."""
    out, _ = builds
    t0 = time.monotonic()
    with distkd_log() as logs:
        s = build(_job(world, cluster, tmp_path / "cache", 2), worker=kill_rank_class(tmp_path, rank=1))
    assert (tmp_path / "killed-rank-1").exists(), "the fault never fired"
    assert s["complete"] and s["rows"] == 4800 and s["computed"] == 2
    assert time.monotonic() - t0 < 2 * TIMEOUT_S  # never waited out a timeout
    died = [line for line in logs if "group 0 (2 ranks) died on" in line]
    assert len(died) == 1 and "rebuilding the group; retrying the shard" in died[0], logs
    m = read_manifest(tmp_path / "cache")
    assert sorted(e.timings.attempt for e in m.shards.values()) == [1, 2]
    assert not list((tmp_path / "cache").glob("*/.*.tmp-*"))
    verify_cache(tmp_path / "cache", world["logs"])
    clean = read_manifest(out[2]).shards
    for rel, e in m.shards.items():
        assert (e.output.sha256, e.input.ids) == (clean[rel].output.sha256, clean[rel].input.ids), rel


@pytest.mark.cluster
def test_a_group_larger_than_the_cluster_is_one_line(world, cluster, tmp_path, capsys):
    rc = cli_main(["cache", "build", "--teacher", str(world["export"]), "--logs", str(world["logs"]),
                   "--out", str(tmp_path / "cache"), "--splits", "train", "--ray-address", str(cluster),
                   "--teacher-ranks", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and "Traceback" not in "\n".join(err), err
    assert "teacher_ranks=3" in err[-1] and "the Ray cluster has 2 CPU and 0 GPU" in err[-1], err


@pytest.mark.cluster
@pytest.mark.slow
def test_a_lost_node_with_no_room_left_stops_the_build_in_one_line_naming_k(world, tmp_path, record_property):
    """A cluster of its own (its second node is killed): a K = 2 group, one rank a node, loses the
    worker node mid-shard (every process of that `ray start` SIGKILLed). The group is rebuilt, but
    one node of one CPU cannot place it: the build stops within a bound, naming K and the resources."""
    out = tmp_path / "cache"
    killed: list[float] = []

    def kill_node_mid_shard(cluster) -> None:
        deadline = time.monotonic() + 300
        while not list(out.glob("train/.*.tmp-*")) and time.monotonic() < deadline:  # a shard is being written
            time.sleep(0.1)
        killed.append(time.monotonic())
        kill_session(cluster.sids[1])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        (tmp_path / "ray").mkdir()
        with ray_cluster(tmp_path / "ray", head_cpus=1, workers=({"cpus": 1},), dashboard=False) as c:
            killer = threading.Thread(target=kill_node_mid_shard, args=(c,), daemon=True)
            killer.start()
            with pytest.raises(CacheError) as e:
                build(_job(world, c, out, 2, group_timeout_s=10), worker=slow_worker_class(1.0))
            killer.join()
    assert killed, "the node was never killed"
    took = time.monotonic() - killed[0]
    msg = str(e.value)
    record_property("seconds_from_kill", round(took, 1))
    record_property("message", msg)
    assert "teacher_ranks=2" in msg and "the Ray cluster has 1 CPU, 0 GPU on 1 live node(s)" in msg, msg
    assert "\n" not in msg and took < 120, (took, msg)
    assert not read_manifest(out).complete
