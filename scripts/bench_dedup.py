"""Benchmark near-duplicate removal: kalm's numpy MinHash/LSH against datasketch (and rensa).

    nice -n 19 .venv/bin/python scripts/bench_dedup.py --records 200000

Generates a bilingual corpus (half English, half Chinese; Zipf-distributed synthetic words and
characters, so unrelated records share common shingles) with planted near-duplicates: copies of
an earlier record with 1-3 words (English) or 1-3 characters (Chinese) of a positive replaced,
inserted or deleted. Every side reads the same JSONL file and runs in its own subprocess (fair
peak RSS: ``ru_maxrss`` of that process), on the same record text (``kalm.data.near_dedup.record_text``)
and the same character shingles, and returns the ids it kept.

- ``kalm``: the pipeline's own code path, ``kalm.data.dedup.dedup_local``: the JSONL converted to a
  Parquet part, scatter into ``--shards`` hash partitions, exact dedup per partition, minhash per
  partition, ``--band-jobs`` LSH bucket jobs, components, filter per partition, gather (files in,
  files out; one process, the jobs run one after another).
- ``kalm_core``: only kalm's ``signatures`` + ``near_duplicates`` (in memory, the same
  connected-components semantics) on texts already in memory.
- ``datasketch``: plain ``MinHash`` (``update`` per shingle) + ``MinHashLSH`` (query, then insert
  when nothing is found: first seen kept), default band weights.
- ``datasketch_batch``: the same with ``MinHash.update_batch`` (datasketch's faster path).
- ``rensa``: ``RMinHash`` + ``RMinHashLSH`` per record, with kalm's bands (when rensa is installed).

Reported per side (``start_rss_mib``: the side's process before it starts work): records/s (wall time of the side, reading and writing included; and of the
MinHash + LSH calls alone), peak RSS,
recall of planted pairs (the later copy dropped; pairs with exact Jaccard >= threshold), and
precision (dropped records that are planted copies) / false drops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EN_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# 3,500 common CJK characters would be ideal; the unified block's first 3,000 code points will do.
ZH_CHARS = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def _zipf_weights(n: int, s: float = 1.05) -> list[float]:
    return [1 / (i + 1) ** s for i in range(n)]


class Generator:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.en_vocab = [
            "".join(self.rng.choice(EN_LETTERS) for _ in range(self.rng.randint(2, 9))) for _ in range(20000)
        ]
        self.en_cum = list(_accumulate(_zipf_weights(len(self.en_vocab))))
        self.zh_cum = list(_accumulate(_zipf_weights(len(ZH_CHARS), 0.9)))

    def en(self, n):
        return " ".join(self.rng.choices(self.en_vocab, cum_weights=self.en_cum, k=n))

    def zh(self, n):
        return "".join(self.rng.choices(ZH_CHARS, cum_weights=self.zh_cum, k=n))

    def record(self, i):
        if i % 2:
            return {"query": self.en(self.rng.randint(4, 12)), "pos": [self.en(self.rng.randint(25, 70))]}
        return {"query": self.zh(self.rng.randint(6, 20)), "pos": [self.zh(self.rng.randint(50, 160))]}

    def edit(self, rec):
        """A near copy: 1-3 word (English) or character (Chinese) edits in the positive."""
        pos = rec["pos"][0]
        en = " " in pos
        toks = pos.split(" ") if en else list(pos)
        for _ in range(self.rng.randint(1, 3)):
            op, j = self.rng.random(), self.rng.randrange(len(toks))
            new = self.en(1) if en else self.zh(1)
            if op < 0.5:
                toks[j] = new
            elif op < 0.8:
                toks.insert(j, new)
            elif len(toks) > 2:
                del toks[j]
        return {"query": rec["query"], "pos": [(" " if en else "").join(toks)]}


def _accumulate(ws):
    total = 0.0
    for w in ws:
        total += w
        yield total


def generate(path: Path, n: int, dup_rate: float, seed: int, k: int) -> dict:
    from kalm.data.minhash import exact_jaccard
    from kalm.data.near_dedup import record_text

    gen = Generator(seed)
    planted = {}  # copy id -> (original id, exact Jaccard of the record texts)
    recs = []
    for i in range(n):
        if i > 100 and gen.rng.random() < dup_rate:
            o = gen.rng.randrange(i)
            while o in planted:  # copy an original, not a copy (keeps pairs well defined)
                o = gen.rng.randrange(i)
            rec = gen.edit(recs[o])
            planted[i] = (o, exact_jaccard(record_text(rec), record_text(recs[o]), k))
        else:
            rec = gen.record(i)
        recs.append(rec)
    with open(path, "w", encoding="utf-8") as f:
        for i, rec in enumerate(recs):
            f.write(
                json.dumps({"id": i, **rec, "task": "en" if " " in rec["pos"][0] else "zh"}, ensure_ascii=False) + "\n"
            )
    return {str(c): list(v) for c, v in planted.items()}


# ---- sides (each runs in its own process) ---------------------------------------------------


def side_kalm(data, work, args):
    from kalm.data.dedup import dedup_local
    from kalm.io import read_jsonl

    dedup_local(
        [str(data)],
        str(work / "out.jsonl"),
        str(work / "stats.json"),
        partitions=args.shards,
        near=True,
        band_jobs=args.band_jobs,
        threshold=args.threshold,
        num_perm=args.num_perm,
        shingle=args.shingle,
        workdir=str(work / "steps"),
    )
    return [r["id"] for r in read_jsonl(work / "out.jsonl")]


def side_kalm_core(data, work, args):
    """Only MinHash + LSH of kalm (texts already in memory): the part a library would replace."""
    import numpy as np

    from kalm.data.minhash import signatures
    from kalm.data.near_dedup import near_duplicates, record_text
    from kalm.io import read_jsonl

    recs = list(read_jsonl(data))
    texts = [record_text(r) for r in recs]
    t0 = time.perf_counter()
    sigs = np.concatenate(
        [signatures(texts[i : i + 4096], args.num_perm, args.shingle) for i in range(0, len(texts), 4096)]
    )
    keep, _ = near_duplicates(sigs, args.threshold)
    CORE["seconds"] = time.perf_counter() - t0
    return [r["id"] for r, k in zip(recs, keep) if k]


CORE = {"seconds": 0.0}


def _shingles(text, k):
    return {text[i : i + k] for i in range(max(len(text) - k + 1, 1))}


def _greedy(data, work, make, lsh):
    """Query, then insert when nothing matched: the first seen of each cluster is kept."""
    from kalm.data.near_dedup import record_text
    from kalm.io import read_jsonl

    kept = []
    clock = time.perf_counter
    with open(work / "out.jsonl", "w", encoding="utf-8") as out:
        for rec in read_jsonl(data):
            text = record_text(rec)
            t0 = clock()
            m = make(text)
            found = lsh.query(m)
            if not found:
                lsh.insert(rec["id"], m)
            CORE["seconds"] += clock() - t0
            if found:
                continue
            kept.append(rec["id"])
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return kept


def side_datasketch(data, work, args, batch=False):
    from datasketch import MinHash, MinHashLSH

    def make(text):
        m = MinHash(num_perm=args.num_perm)
        sh = _shingles(text, args.shingle)
        if batch:
            m.update_batch([s.encode("utf-8") for s in sh])
        else:
            for s in sh:
                m.update(s.encode("utf-8"))
        return m

    return _greedy(data, work, make, MinHashLSH(threshold=args.threshold, num_perm=args.num_perm))


def side_rensa(data, work, args):
    from rensa import RMinHash, RMinHashLSH

    from kalm.data.minhash import optimal_bands

    bands, _ = optimal_bands(args.threshold, args.num_perm)

    def make(text):
        m = RMinHash(num_perm=args.num_perm, seed=1)
        m.update(list(_shingles(text, args.shingle)))
        return m

    return _greedy(data, work, make, RMinHashLSH(threshold=args.threshold, num_perm=args.num_perm, num_bands=bands))


SIDES = {
    "kalm": side_kalm,
    "kalm_core": side_kalm_core,
    "datasketch": side_datasketch,
    "datasketch_batch": lambda d, w, a: side_datasketch(d, w, a, batch=True),
    "rensa": side_rensa,
}


def run_side(args):
    work = Path(args.work)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    kept = SIDES[args.run_side](Path(args.data), work, args)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    (work / "kept.json").write_text(json.dumps(kept))
    print(
        json.dumps(
            {
                "seconds": seconds,
                "core_seconds": CORE["seconds"] or None,
                "peak_rss_mib": peak / 1024,
                "start_rss_mib": start_rss / 1024,
            }
        )
    )


# ---- driver ---------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--dup-rate", type=float, default=0.1, help="share of records that are planted near copies")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--shingle", type=int, default=5)
    p.add_argument("--shards", type=int, default=2, help="kalm: hash partitions (data.dedup.shards)")
    p.add_argument("--band-jobs", type=int, default=2, help="kalm: LSH bucket jobs (data.dedup.band_jobs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="kalm,kalm_core,datasketch_batch,datasketch,rensa")
    p.add_argument("--workdir", help="keep files here (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--run-side", help=argparse.SUPPRESS)
    p.add_argument("--run-generate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_side:
        return run_side(args)
    if args.run_generate:
        planted = generate(Path(args.data), args.records, args.dup_rate, args.seed, args.shingle)
        (Path(args.data).parent / "planted.json").write_text(json.dumps(planted))
        return None

    base = Path(args.workdir or tempfile.mkdtemp(prefix="bench_dedup."))
    base.mkdir(parents=True, exist_ok=True)
    data = base / "data.jsonl"
    t0 = time.perf_counter()
    # generated in a subprocess: a child inherits its parent's peak RSS (ru_maxrss survives fork
    # and exec on Linux), so the driver must stay small for the sides' peaks to be their own
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--run-generate",
            "--data",
            str(data),
            "--records",
            str(args.records),
            "--dup-rate",
            str(args.dup_rate),
            "--seed",
            str(args.seed),
            "--shingle",
            str(args.shingle),
        ],
        check=True,
    )
    planted = json.loads((base / "planted.json").read_text())
    n_above = sum(1 for _, j in planted.values() if j >= args.threshold)
    jac = sorted(j for _, j in planted.values())
    print(
        f"generated {args.records} records ({data.stat().st_size / 2**20:.0f} MiB) with {len(planted)} planted "
        f"near copies ({n_above} at Jaccard >= {args.threshold}; median {jac[len(jac) // 2]:.2f}, "
        f"min {jac[0]:.2f}) in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "records": args.records,
        "planted": len(planted),
        "planted_above_threshold": n_above,
        "threshold": args.threshold,
        "num_perm": args.num_perm,
        "shingle": args.shingle,
        "sides": {},
    }
    for side in args.sides.split(","):
        if side == "rensa":
            try:
                import rensa  # noqa: F401
            except ImportError:
                print("rensa: not installed, skipped")
                continue
        work = base / side
        work.mkdir(exist_ok=True)
        cmd = [
            sys.executable,
            __file__,
            "--run-side",
            side,
            "--data",
            str(data),
            "--work",
            str(work),
            "--threshold",
            str(args.threshold),
            "--num-perm",
            str(args.num_perm),
            "--shingle",
            str(args.shingle),
            "--shards",
            str(args.shards),
            "--band-jobs",
            str(args.band_jobs),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(f"{side}: failed\n{res.stderr[-3000:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        kept = set(json.loads((work / "kept.json").read_text()))
        dropped = set(range(args.records)) - kept
        copies = {int(c) for c in planted}
        above = {int(c) for c, (_, j) in planted.items() if j >= args.threshold}
        r.update(
            records_per_s=args.records / r["seconds"],
            dropped=len(dropped),
            core_records_per_s=args.records / r["core_seconds"] if r["core_seconds"] else None,
            recall=len(dropped & above) / max(len(above), 1),
            recall_all_planted=len(dropped & copies) / max(len(copies), 1),
            precision=len(dropped & copies) / max(len(dropped), 1),
            false_drops=len(dropped - copies),
            originals_dropped=sum(1 for c, (o, _) in planted.items() if o in dropped),
        )
        results["sides"][side] = r
        core = f"{r['core_records_per_s']:9.0f}" if r["core_records_per_s"] else "        -"
        print(
            f"{side:17s} {r['records_per_s']:9.0f} rec/s (MinHash+LSH only {core})  {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mib']:6.0f} MiB  "
            f"recall {r['recall']:.3f} (all planted {r['recall_all_planted']:.3f})  precision {r['precision']:.3f}  "
            f"false drops {r['false_drops']}",
            flush=True,
        )
    sides = results["sides"]
    if "kalm" in sides:
        for side, r in sides.items():
            if not side.startswith("kalm"):
                r["kalm_speedup"] = sides["kalm"]["records_per_s"] / r["records_per_s"]
                msg = f"kalm vs {side}: {r['kalm_speedup']:.1f}x the end-to-end throughput"
                if "kalm_core" in sides and r["core_records_per_s"]:
                    r["kalm_core_speedup"] = sides["kalm_core"]["core_records_per_s"] / r["core_records_per_s"]
                    msg += f", {r['kalm_core_speedup']:.1f}x on MinHash+LSH alone"
                print(msg)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
