"""Next-item distillation on the synthetic task, end to end in one process (plain PyTorch, CPU).

    logs (distkd.data.synth_next_item) -> teacher on hard labels (all train rows)
    -> top-k cache of the teacher's logits on the students' rows (distkd.cache.topk, Parquet + zstd)
    -> student on hard labels | student distilled from the cache (same rows, same steps)
    -> Recall / NDCG / MRR on the test split (distkd.metrics_retrieval), the oracle, eta

It checks that the task leaves something to distill and that the cache format carries it; the
trainer integration is separate. `python -m distkd.bench.next_item --help`.

Measured with the defaults (2-core shared CPU; teacher one pass ~40 min under load, each student
~2-4 min): 1.25M rows, seed 0 (1M train, test on the first 20,000 test rows); teacher dim 128,
5,141,024 parameters, 1,953 steps of 512 on all train rows, Adam 3e-3 with linear decay;
students dim 12, 500,096 parameters (9.7%), 976 steps of 512 on the first half of them, Adam 1e-2;
KD = 0.2 hard CE + 0.8 top-k KL (tau 1), k = 64.

    model                       Recall@10  NDCG@10  MRR     Recall@50
    oracle (true distribution)  0.3605     0.2466   0.2207  0.5179
    teacher                     0.3469     0.2373   0.2126  0.5017
    student hard (seeds 0, 1)   0.3144     0.2116   0.1893  0.4719  |  0.3090  0.2074
    student KD top-k (0, 1)     0.3381     0.2308   0.2068  0.4930  |  0.3372  0.2303
    student KD top-k + 32 tail  0.3427     0.2335   0.2090  0.4969     (sampled_tail_kl, seed 0)

eta(Recall@10) 0.73 / 0.75 per seed (top-k), 0.87 with the sampled tail; eta(NDCG@10) 0.75 / 0.76,
0.85. Pure top-k KL (no hard term) gives the same Recall@10 (0.3380) but loses deep recall
(Recall@50 0.458): the tail bucket says nothing about the order outside the top-k.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from torchrec import KeyedJaggedTensor

from distkd import log
from distkd.cache import topk as tk
from distkd.data import synth_next_item as sn
from distkd.metrics_retrieval import RetrievalMetrics, expected_recall_at_k, gap_recovered
from distkd.models.next_item import NextItemConfig, NextItemModel, count_parameters
from distkd.objectives.next_item_losses import hard_ce, sampled_tail_kl, topk_kl

logger = logging.getLogger(__name__)


def load_split(logs: str, split: str, max_rows: int | None = None) -> dict[str, np.ndarray]:
    files = sorted(Path(logs, split).glob("*.parquet"))
    cols = ["example_id", sn.HISTORY, sn.SURFACE, sn.LABEL, "oracle_rank"]
    table = pa.concat_tables(pq.read_table(f, columns=cols) for f in files)
    if max_rows:
        table = table.slice(0, max_rows)
    hist = table.column(sn.HISTORY).combine_chunks()
    offsets = hist.offsets.to_numpy().astype(np.int64)
    return {"hv": hist.flatten().to_numpy(), "ho": offsets - offsets[0],
            "surface": table.column(sn.SURFACE).to_numpy(),
            "y": table.column(sn.LABEL).fill_null(-1).to_numpy().copy(),  # writable, for torch.from_numpy
            "oracle_rank": table.column("oracle_rank").to_numpy().copy()}


def kjt(d: dict, a: int, b: int):

    ho = d["ho"]
    lengths = np.concatenate([np.diff(ho[a:b + 1]), np.ones(b - a, np.int64)]).astype(np.int32)
    values = np.concatenate([d["hv"][ho[a]:ho[b]], d["surface"][a:b]])
    return KeyedJaggedTensor(keys=[sn.HISTORY, sn.SURFACE], values=torch.from_numpy(values),
                             lengths=torch.from_numpy(lengths))


def make_model(num_items: int, surfaces: int, dim: int, tower: list[int], seed: int) -> NextItemModel:
    torch.manual_seed(seed)
    feats = [{"name": sn.HISTORY, "num_embeddings": num_items, "multi_valued": True},
             {"name": sn.SURFACE, "num_embeddings": surfaces}]
    return NextItemModel(feats, num_items, NextItemConfig(embedding_dim=dim, tower=tower), sparse_device=torch.device("cpu"))


def train(model, d, rows: int, loss_fn, batch: int, lr: float, micro: int = 128, label: str = "") -> float:
    """One pass over rows [0, rows) in order (the rows are i.i.d. draws), Adam, linear decay."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = rows // batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    t0, seen = time.perf_counter(), 0.0
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for a in range(step * batch, (step + 1) * batch, micro):  # cache-sized [micro, N] logits
            b = a + micro
            out = model(kjt(d, a, b))
            loss = loss_fn(out, a, b) * (micro / batch)
            loss.backward()
            total += loss.item()
        opt.step()
        sched.step()
        seen = 0.98 * seen + 0.02 * total if step else total
        if (step + 1) % max(1, steps // 5) == 0:
            logger.info(f"  {label} step {step + 1}/{steps} loss {seen:.4f} ({time.perf_counter() - t0:.0f}s)")
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, d, rows: int, num_items: int) -> dict[str, float]:
    m = RetrievalMetrics(num_items, ks=(1, 10, 50))
    model.eval()
    for a in range(0, rows, 256):
        b = min(a + 256, rows)
        m.update(model(kjt(d, a, b)).logits, torch.from_numpy(d["y"][a:b]))
    model.train()
    return m.compute()


@torch.no_grad()
def build_cache(teacher, d, rows: int, fmt: tk.TopKFormat, path: str, row_group: int = 16_384) -> pa.Table:
    """The teacher's top-k of rows [0, rows), written as one Parquet file; returns the table."""
    teacher.eval()
    gen = torch.Generator().manual_seed(0)
    parts = []
    for a in range(0, rows, 256):
        b = min(a + 256, rows)
        parts.append(tk.pack(tk.select(teacher(kjt(d, a, b)).logits, fmt, gen), fmt))
    teacher.train()
    table = pa.concat_tables(parts).combine_chunks()
    pq.write_table(table, path, row_group_size=row_group, **fmt.parquet_options())
    return pq.read_table(path)


def bytes_table(teacher, d, rows: int, num_items: int, out: str, ks=(8, 32, 64, 128), tails=(0, 32)) -> list[dict]:
    res = []
    for k in ks:
        for s in tails:
            fmt = tk.TopKFormat(num_items, k, s)
            path = os.path.join(out, f"bytes-k{k}-s{s}.parquet")
            build_cache(teacher, d, rows, fmt, path)
            size = os.path.getsize(path)
            res.append({"k": k, "tail": s, "rows": rows, "bytes": size, "bytes_per_row": size / rows,
                        "bytes_per_entry": size / (rows * (k + s))})
            print(f"  k={k:4d} tail={s:3d}: {size / rows:8.1f} B/row  {size / (rows * (k + s)):.3f} B/entry", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/next_item")
    ap.add_argument("--rows", type=int, default=1_250_000, help="logs rows (80%% train)")
    ap.add_argument("--preset", default="default", choices=sorted(sn.PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-rows", type=int, default=50_000)
    ap.add_argument("--teacher-dim", type=int, default=128)
    ap.add_argument("--teacher-tower", type=int, nargs="*", default=[])
    ap.add_argument("--student-dim", type=int, default=12)
    ap.add_argument("--student-share", type=float, default=0.5, help="share of train rows the students see")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--teacher-lr", type=float, default=3e-3)
    ap.add_argument("--teacher-epochs", type=int, default=1)
    ap.add_argument("--skip-hard", action="store_true", help="only the KD student (tuning)")
    ap.add_argument("--student-lr", type=float, default=1e-2)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--tail", type=int, default=0, help="sampled tail items (uses sampled_tail_kl)")
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.2],
                    help="weight of the hard loss in the KD student (several: one KD student each)")
    ap.add_argument("--student-seeds", type=int, default=1)
    ap.add_argument("--first-student-seed", type=int, default=0)
    ap.add_argument("--bytes", action="store_true", help="also measure cache bytes at k = 8..128")
    ap.add_argument("--bytes-only", action="store_true", help="only the teacher (trained or loaded) and the bytes")
    args = ap.parse_args(argv)
    log.setup()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    os.makedirs(args.out, exist_ok=True)
    logs = os.path.join(args.out, "logs")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(logs, sn.SCHEMA_FILE)):
        sn.generate(logs, rows=args.rows, shards=4, seed=args.seed, preset=args.preset, force=True)
        logger.info(f"generated {args.rows:,} rows in {time.perf_counter() - t0:.0f}s")
    p = sn.PRESETS[args.preset]
    n = p.num_items
    train_d, test_d = load_split(logs, "train"), load_split(logs, "test", args.test_rows)
    n_train, n_test = len(train_d["y"]), len(test_d["y"])
    n_student = int(n_train * args.student_share) // args.batch * args.batch
    results: dict = {"args": vars(args), "train_rows": n_train, "test_rows": n_test, "student_rows": n_student}

    oracle = RetrievalMetrics(n, ks=(1, 10, 50))
    keep = test_d["y"] >= 0
    oracle.update_ranks(torch.from_numpy(test_d["oracle_rank"][keep]))
    results["oracle"] = oracle.compute()
    truth = sn.Truth(p, args.seed)
    m = min(5000, n_test)
    lp = truth.log_probs(test_d["hv"][: test_d["ho"][m]], test_d["ho"][:m + 1], test_d["surface"][:m])
    results["oracle"]["expected_recall@10"] = expected_recall_at_k(torch.from_numpy(lp), 10).mean().item()

    def hard(out, a, b):
        return hard_ce(out.logits, torch.from_numpy(train_d["y"][a:b]))

    teacher = make_model(n, p.surfaces, args.teacher_dim, args.teacher_tower, args.seed)
    ckpt = os.path.join(args.out, f"teacher-d{args.teacher_dim}-lr{args.teacher_lr}-e{args.teacher_epochs}.pt")
    if os.path.exists(ckpt):
        teacher.load_state_dict(torch.load(ckpt, weights_only=True))
        results["teacher"] = {**evaluate(teacher, test_d, n_test, n), "checkpoint": ckpt}
    else:
        secs = sum(train(teacher, train_d, n_train, hard, args.batch, args.teacher_lr, label=f"teacher epoch {e}")
                   for e in range(args.teacher_epochs))
        results["teacher"] = {**evaluate(teacher, test_d, n_test, n), "train_s": secs,
                              "steps": args.teacher_epochs * (n_train // args.batch)}
        torch.save(teacher.state_dict(), ckpt)
    logger.info(f"teacher {results['teacher']}")

    if args.bytes_only:
        results["bytes"] = bytes_table(teacher, train_d, min(16_384, n_train), n, args.out)
        return results
    fmt = tk.TopKFormat(n, args.k, args.tail, tau=args.tau)
    cache_path = ckpt[:-3] + f"-cache-k{args.k}-s{args.tail}-t{args.tau}-r{n_student}.parquet"
    t1 = time.perf_counter()
    cache = pq.read_table(cache_path) if os.path.exists(cache_path) else build_cache(teacher, train_d, n_student, fmt, cache_path)
    size = os.path.getsize(cache_path)
    results["cache"] = {"k": args.k, "tail": args.tail, "rows": n_student, "bytes": size, "seconds": time.perf_counter() - t1,
                        "bytes_per_row": size / n_student, "bytes_per_entry": size / (n_student * (args.k + args.tail))}
    logger.info(f"cache {results['cache']}")

    def kd(out, a, b):
        top = tk.unpack(cache.slice(a, b - a), fmt)
        y = torch.from_numpy(train_d["y"][a:b])
        if args.tail:
            soft = sampled_tail_kl(out.logits, top.ids, top.logits, top.lse, top.tail_ids, top.tail_logits,
                                   top.tail_logq, tau=args.tau, lse_tau=fmt.tau)
        else:
            soft = topk_kl(out.logits, top.ids, top.logits, top.lse, tau=args.tau, lse_tau=fmt.tau)
        return alpha * hard_ce(out.logits, y) + (1 - alpha) * soft

    runs = ([] if args.skip_hard else [("student_hard", hard, None)]) + [("student_kd", kd, a) for a in args.alpha]
    for seed in range(args.first_student_seed, args.first_student_seed + args.student_seeds):
        for name, fn, alpha in runs:
            student = make_model(n, p.surfaces, args.student_dim, [], 100 + seed)
            secs = train(student, train_d, n_student, fn, args.batch, args.student_lr, label=name)
            results.setdefault(name, []).append({**evaluate(student, test_d, n_test, n), "train_s": secs,
                                                 "steps": n_student // args.batch, "alpha": alpha, "seed": seed})
            logger.info(f"{name} {results[name][-1]}")

    feats = [{"name": sn.HISTORY, "num_embeddings": n, "multi_valued": True}, {"name": sn.SURFACE, "num_embeddings": p.surfaces}]
    pt = count_parameters(feats, n, NextItemConfig(args.teacher_dim, args.teacher_tower))["total"]
    ps = count_parameters(feats, n, NextItemConfig(args.student_dim))["total"]
    results["parameters"] = {"teacher": pt, "student": ps, "ratio": ps / pt}
    for m in ("recall@10", "ndcg@10") if "student_hard" in results else ():
        hard_m = float(np.mean([r[m] for r in results["student_hard"]]))
        kd_m = float(np.mean([r[m] for r in results["student_kd"]]))
        results.setdefault("eta", {})[m] = gap_recovered(kd_m, hard_m, results["teacher"][m])
    if args.bytes:
        results["bytes"] = bytes_table(teacher, train_d, min(16_384, n_train), n, args.out)
    results["seconds"] = time.perf_counter() - t0
    print(json.dumps({k: results.get(k) for k in ("parameters", "eta")}, indent=1))
    for name in [k for k in ("oracle", "teacher", "student_hard", "student_kd") if k in results]:
        rs = results[name] if isinstance(results[name], list) else [results[name]]
        print(f"{name:<14} " + "  ".join(f"R@10 {r['recall@10']:.4f} NDCG@10 {r['ndcg@10']:.4f} MRR {r['mrr']:.4f}" for r in rs))
    with open(os.path.join(args.out, f"result-{time.strftime('%H%M%S')}.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
