"""Benchmark: `kalm validate` on a generated JSON Lines task, JSON parsed by the standard library's
``json`` vs ``orjson`` (kalm.data.validate's fast path), output Parquet (the workflow's) or JSON Lines;
also with the whitespace folding of kalm.text.normalize_text as it was (a regex), to show where the
time goes.

    python scripts/bench_validate.py --records 200000 [--negatives 7] [--repeat 2]

Records look like fine-tuning data: an English or Chinese query (~60 characters), one positive and
``--negatives`` negatives (~300 characters each). Prints records/s per (parser, output) and checks
that both parsers write the same records.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import tempfile
import time
import unicodedata
from pathlib import Path

EN = "the of and to in is was for on that with as by at from river bridge market town harvest mill".split()
ZH = list(
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所"
)


def _text(rng: random.Random, n: int) -> str:
    if rng.random() < 0.5:
        return " ".join(rng.choice(EN) for _ in range(n // 5)).capitalize() + "."
    return "".join(rng.choice(ZH) for _ in range(n // 2)) + "。"


def make(path: Path, n: int, negatives: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {
                "query": f"{_text(rng, 60)} {i}",
                "pos": [_text(rng, 300)],
                "neg": [_text(rng, 300) for _ in range(negatives)],
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path.stat().st_size


@contextlib.contextmanager
def _regex_normalize(on: bool):
    """kalm.text.normalize_text as it was before (a regex folds whitespace), while ``on``."""
    import kalm.data.validate as kv

    if not on:
        yield
        return
    ws = re.compile(r"\s+")
    real = kv.normalize_text
    kv.normalize_text = lambda text: ws.sub(" ", unicodedata.normalize("NFKC", text)).strip()
    try:
        yield
    finally:
        kv.normalize_text = real


def main() -> None:
    import orjson

    from kalm.data.shards import iter_shard
    from kalm.data.validate import validate_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--negatives", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        size = make(d / "in.jsonl", args.records, args.negatives)
        print(f"{args.records} records, {size / 2**20:.0f} MiB of JSON Lines")
        lines = (d / "in.jsonl").read_bytes().splitlines()
        for name, loads in (("json", lambda b: json.loads(b.decode("utf-8"))), ("orjson", orjson.loads)):
            t = time.perf_counter()
            for line in lines:
                loads(line)
            print(f"parse only, {name:6s}: {len(lines) / (time.perf_counter() - t):11,.0f} records/s")
        del lines
        outputs = {}
        for suffix in (".parquet", ".jsonl"):
            for fast, regex in ((False, True), (False, False), (True, False)):
                best = float("inf")
                for _ in range(args.repeat):
                    out = d / f"out{suffix}"
                    with _regex_normalize(regex):
                        t = time.perf_counter()
                        validate_file(
                            str(d / "in.jsonl"), "t", str(out), str(d / "s.json"), shard_ordinal=0, fast_json=fast
                        )
                        best = min(best, time.perf_counter() - t)
                name = ("orjson" if fast else "json") + (", regex whitespace (before)" if regex else "")
                print(f"output {suffix:8s} parser {name:32s}: {best:6.2f} s, {args.records / best:9,.0f} records/s")
                outputs[(suffix, fast, regex)] = (
                    (d / f"out{suffix}").read_bytes() if suffix == ".jsonl" else list(iter_shard(d / f"out{suffix}"))
                )
            print(
                f"  same output in the three runs: {len({repr(v) for k, v in outputs.items() if k[0] == suffix}) == 1}"
            )


if __name__ == "__main__":
    main()
