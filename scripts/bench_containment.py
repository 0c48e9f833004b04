"""Benchmark: the containment check of decontamination (kalm.data.containment) against an Aho-Corasick
automaton (pyahocorasick, the library one would reach for), same data, same answers.

    .venv/bin/python scripts/bench_containment.py                    # 100k eval texts, 40k training texts
    .venv/bin/python scripts/bench_containment.py --eval 1000000     # MTEB-corpus scale

Eval texts are passages of 5-60 random words (the sizes of MTEB queries and passages); training
texts are ~80 words, and every 1,000th has a whole eval text pasted into its middle. Each side runs
in its own process (build the index, then search all training texts in batches of 12,288 texts, as
the decontaminate stage does: 4,096 records x 3 fields); peak RSS from ``wait4``. Both report the
same (training text, eval text) pairs, checked. Needs ``pip install pyahocorasick`` for the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import time

BATCH = 4096 * 3


def corpus(n_eval: int, n_train: int, min_chars: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(20_000)]
    evals = [" ".join(rng.choices(words, k=rng.randint(5, 60))) for _ in range(n_eval)]
    train = [" ".join(rng.choices(words, k=80)) for _ in range(n_train)]
    for i in range(0, n_train, 1000):
        train[i] = train[i][:200] + " " + evals[i % n_eval] + " " + train[i][200:]
    return evals, train


def side(name: str, n_eval: int, n_train: int, min_chars: int) -> None:
    """Runs in a child process: prints one JSON line with timings and the matched pairs."""
    evals, train = corpus(n_eval, n_train, min_chars)
    t0 = time.perf_counter()
    if name == "kalm":
        from kalm.data.containment import ContainmentIndex

        index = ContainmentIndex(evals, ["t"] * len(evals), min_chars)
        t1 = time.perf_counter()
        pairs = [
            (s + t, e)
            for s in range(0, len(train), BATCH)
            for t, hits in enumerate(index.query(train[s : s + BATCH]))
            for e in hits
        ]
    else:
        import ahocorasick

        auto = ahocorasick.Automaton()
        for i, e in enumerate(evals):
            if len(e) >= min_chars:
                auto.add_word(e, i)
        auto.make_automaton()
        t1 = time.perf_counter()
        pairs = []
        for t, text in enumerate(train):
            hits = {i for _, i in auto.iter(text) if len(text) > len(evals[i])}
            pairs += [(t, i) for i in sorted(hits)]
    t2 = time.perf_counter()
    chars = sum(map(len, train))
    print(json.dumps({"build_s": t1 - t0, "search_s": t2 - t1, "chars": chars, "pairs": sorted(pairs)}))


def run(name: str, args) -> tuple[dict, float]:
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--side",
            name,
            "--eval",
            str(args.eval),
            "--train",
            str(args.train),
            "--min-chars",
            str(args.min_chars),
        ],
        stdout=subprocess.PIPE,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed")
    return json.loads(out), usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=100_000)
    ap.add_argument("--train", type=int, default=40_000)
    ap.add_argument("--min-chars", type=int, default=50)
    ap.add_argument("--side", choices=["kalm", "pyahocorasick"])
    args = ap.parse_args()
    if args.side:
        side(args.side, args.eval, args.train, args.min_chars)
        return
    (ours, m_ours), (peer, m_peer) = run("kalm", args), run("pyahocorasick", args)
    assert ours["pairs"] == peer["pairs"], "the two sides disagree"
    mchars = ours["chars"] / 1e6
    print(
        f"{args.eval:,} eval texts, {args.train:,} training texts ({mchars:.1f} M chars), min {args.min_chars} chars, "
        f"{len(ours['pairs'])} contained pairs (equal on both sides), {os.cpu_count()} CPU cores"
    )
    for label, r, m in (("kalm.data.containment", ours, m_ours), ("pyahocorasick", peer, m_peer)):
        print(
            f"  {label:17s} build {r['build_s']:6.1f} s  search {r['search_s']:6.1f} s "
            f"({mchars / r['search_s']:5.1f} M chars/s)  peak RSS {m:7.0f} MiB"
        )
    print(
        f"  kalm vs pyahocorasick: search x{peer['search_s'] / ours['search_s']:.2f}, "
        f"build x{peer['build_s'] / ours['build_s']:.2f}, memory x{m_ours / m_peer:.2f}"
    )


if __name__ == "__main__":
    main()
