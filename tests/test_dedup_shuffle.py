"""The sharded dedup stage: exact dedup as a hash-partitioned shuffle, near-dup as band-partitioned
LSH + connected components. The result must not depend on the number of partitions or band jobs,
must equal the definition computed by brute force, and a failed partition job re-runs alone."""

import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kalm.cli import main as kalm_main
from kalm.data import near_dedup as nd
from kalm.data.config import scatter_runs
from kalm.data.dedup import dedup_partition, gather_stats, scatter_parts
from kalm.data.minhash import band_keys, optimal_bands, signatures
from kalm.data.shards import iter_shard, record_id, write_shard
from kalm.io import read_json
from kalm.text import record_hash

ROOT = Path(__file__).resolve().parents[1]
EN = "abcdefghijklmnopqrstuvwxyz"
THRESHOLD = 0.8


def random_text(rng, n_words):
    return " ".join("".join(rng.choice(EN) for _ in range(rng.randint(3, 8))) for _ in range(n_words))


def changed(rng, text, n=1):
    words = text.split(" ")
    for i in rng.sample(range(len(words)), n):
        words[i] = "changed" + str(rng.randrange(100))
    return " ".join(words)


def make_corpus(seed, n, n_exact, n_near, n_parts, tasks=("a", "b")):
    return make_clustered_corpus(seed, n, n_exact, n_near, n_parts, tasks)[0]


def make_clustered_corpus(seed, n, n_exact, n_near, n_parts, tasks=("a", "b")):
    """Originals, exact copies (case and whitespace changed), near copies (a word of the positive
    changed, of an original or of a copy: chains); shuffled, cut into parts, ids in input order.
    Also {id: the original it was copied from}."""
    rng = random.Random(seed)
    recs = [{"query": random_text(rng, 4), "pos": [random_text(rng, 30)], "task": rng.choice(tasks)} for _ in range(n)]
    origin = list(range(n))
    for _ in range(n_exact if recs else 0):
        i = rng.randrange(len(recs))
        r = recs[i]
        recs.append({"query": "  " + r["query"].upper(), "pos": [p + " " for p in r["pos"]], "task": rng.choice(tasks)})
        origin.append(origin[i])
    for _ in range(n_near if recs else 0):
        i = rng.randrange(len(recs))
        recs.append({"query": recs[i]["query"], "pos": [changed(rng, recs[i]["pos"][0])], "task": rng.choice(tasks)})
        origin.append(origin[i])
    order = list(range(len(recs)))
    rng.shuffle(order)
    recs, origin = [recs[i] for i in order], [origin[i] for i in order]
    cuts = sorted(rng.randint(0, len(recs)) for _ in range(n_parts - 1))
    bounds = [0, *cuts, len(recs)]
    corpus = [
        [{**r, "id": record_id(o, k)} for k, r in enumerate(recs[a:b])]
        for o, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]
    ids = [r["id"] for part in corpus for r in part]
    return corpus, dict(zip(ids, origin))


def run_steps(d: Path, parts: list[str], partitions: int, band_jobs: int, batch: int = 5, scatter_jobs: int = 0):
    """Every step as the workflow runs them (each call is one job), into folder ``d``; ``scatter_jobs``
    contiguous runs of parts scattered to a file each (0: one part each)."""
    d.mkdir(parents=True, exist_ok=True)
    groups = scatter_runs(parts, scatter_jobs)
    scatter = [str(d / f"scatter{i}.arrow") for i in range(len(groups))]
    for group, out in zip(groups, scatter):
        scatter_parts(group, out, partitions)
    exact = [str(d / f"exact{j}.parquet") for j in range(partitions)]
    for j in range(partitions):
        dedup_partition(scatter, j, partitions, exact[j], str(d / f"exact{j}.json"))
    mh = [str(d / f"mh{j}") for j in range(partitions)]
    for j in range(partitions):
        nd.minhash_partition(exact[j], mh[j], threshold=THRESHOLD, batch=batch)
    pairs = [str(d / f"pairs{k}.npy") for k in range(band_jobs)]
    for k in range(band_jobs):
        nd.bucket_pairs(mh, pairs[k], k, band_jobs, chunk_records=7)  # tiny key ranges: range cuts must not matter
    nd.near_components(pairs, str(d / "drop.npy"), str(d / "components.json"))
    final = [str(d / f"dedup{j}.parquet") for j in range(partitions)]
    for j in range(partitions):
        nd.near_filter(exact[j], str(d / "drop.npy"), final[j], str(d / f"dedup{j}.json"), str(d / "components.json"))
    stats = gather_stats(
        [str(d / f"exact{j}.json") for j in range(partitions)],
        str(d / "stats.json"),
        [str(d / f"dedup{j}.json") for j in range(partitions)],
        str(d / "components.json"),
    )
    return exact, final, stats


def brute_force(records):
    """The definition, all pairs: exact dedup keeps the smallest id of each record_hash; then two
    kept records are linked when they share a band key and their estimated Jaccard is >= the
    threshold; the smallest id of each connected component stays."""
    first = {}
    for r in sorted(records, key=lambda r: r["id"]):
        first.setdefault(record_hash(r["query"], r["pos"]), r)
    exact = sorted(first.values(), key=lambda r: r["id"])
    if not exact:
        return [], []
    sigs = signatures([nd.record_text(r) for r in exact])
    keys = band_keys(sigs, *optimal_bands(THRESHOLD, sigs.shape[1]))
    parent = list(range(len(exact)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(exact)):
        for j in range(i + 1, len(exact)):
            if (keys[i] == keys[j]).any() and (sigs[i] == sigs[j]).mean() >= THRESHOLD:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    kept = [r["id"] for i, r in enumerate(exact) if find(i) == i]
    return [r["id"] for r in exact], kept


def write_parts(d: Path, corpus):
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, recs in enumerate(corpus):
        paths.append(str(d / f"part{i}.parquet"))
        write_shard(paths[-1], recs)
    return paths


def read_partitions(paths):
    out = []
    for p in paths:
        recs = list(iter_shard(p))
        assert [r["id"] for r in recs] == sorted(r["id"] for r in recs), f"{p} is not in id order"
        out += recs
    return sorted(out, key=lambda r: r["id"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(0, 25),
    n_exact=st.integers(0, 6),
    n_near=st.integers(0, 8),
    n_parts=st.integers(1, 3),
    partitions=st.integers(1, 4),
    band_jobs=st.integers(1, 3),
    scatter_jobs=st.integers(0, 3),
)
def test_result_does_not_depend_on_partitions_or_band_jobs(
    tmp_path_factory, seed, n, n_exact, n_near, n_parts, partitions, band_jobs, scatter_jobs
):
    d = tmp_path_factory.mktemp("shuffle")
    corpus, origin = make_clustered_corpus(seed, n, n_exact, n_near, n_parts)
    records = [r for part in corpus for r in part]
    parts = write_parts(d / "in", corpus)
    exact1, final1, stats1 = run_steps(d / "one", parts, 1, 1)
    exact, final, stats = run_steps(d / "many", parts, partitions, band_jobs, scatter_jobs=scatter_jobs)
    out1, out = read_partitions(final1), read_partitions(final)
    # the same records whatever the partitions, band jobs and scatter jobs, and the definition's
    assert out == out1
    exact_ids, kept_ids = brute_force(records)
    assert [r["id"] for r in read_partitions(exact)] == exact_ids  # first occurrence in input order
    assert [r["id"] for r in out] == kept_ids
    # each planted cluster (an original and its exact and near copies) keeps its smallest id
    kept = {r["id"] for r in out}
    for o in set(origin.values()):
        assert min(i for i, g in origin.items() if g == o) in kept
    by_id = {r["id"]: r for r in records}
    assert all(r == {k: v for k, v in by_id[r["id"]].items()} for r in out)  # records pass through unchanged
    # counts add up, in total and per task
    for s in (stats, stats1):
        assert s["in"] == len(records) and s["kept"] == len(out) == s["in"] - sum(s["dropped"].values())
        groups = Counter(record_hash(r["query"], r["pos"]) for r in records)
        assert s["dropped"].get("exact_duplicate", 0) == sum(c - 1 for c in groups.values())
        assert s["dropped"].get("near_duplicate", 0) == len(exact_ids) - len(kept_ids)
        for task, t in s["per_task"].items():
            assert t["in"] == sum(r["task"] == task for r in records)
            assert t["kept"] == sum(r["task"] == task for r in out) == t["in"] - sum(t["dropped"].values())
    assert stats["partitions"] == partitions and stats1["clusters"] == stats["clusters"]


def test_planted_cluster_keeps_its_smallest_id_and_chains_are_one_cluster(tmp_path):
    """A ~ B and B ~ C but A !~ C: connected components drop B and C (the greedy single-job version
    kept C, as no earlier *kept* record was similar to it)."""
    for seed in range(200):
        rng = random.Random(seed)
        a = random_text(rng, 25)
        b = changed(rng, a, 2)
        c = changed(rng, b, 2)
        sig = signatures([nd.record_text({"query": "q", "pos": [t]}) for t in (a, b, c)])
        keys = band_keys(sig, *optimal_bands(THRESHOLD, 128))
        sim = lambda i, j: (sig[i] == sig[j]).mean()  # noqa: E731
        if (
            sim(0, 1) >= 0.85
            and sim(1, 2) >= 0.85
            and sim(0, 2) < 0.75
            and (keys[0] == keys[1]).any()
            and (keys[1] == keys[2]).any()
        ):
            break
    else:
        pytest.fail("no chain found")
    rng = random.Random(0)
    others = [{"query": random_text(rng, 3), "pos": [random_text(rng, 25)], "task": "t"} for _ in range(10)]
    chain = [{"query": "q", "pos": [t], "task": "t"} for t in (c, a, b)]  # C first in input order: it is kept
    corpus = [
        [{**r, "id": record_id(0, i)} for i, r in enumerate(others[:5] + chain[:1])],
        [{**r, "id": record_id(1, i)} for i, r in enumerate(others[5:] + chain[1:])],
    ]
    parts = write_parts(tmp_path / "in", corpus)
    _, final, stats = run_steps(tmp_path / "run", parts, 3, 2)
    kept = {r["pos"][0] for r in read_partitions(final)}
    assert c in kept and a not in kept and b not in kept  # the cluster's smallest id (C) stays
    assert stats["dropped"] == {"near_duplicate": 2} and stats["clusters"] == 1
    ex = stats["near_duplicate_examples"]
    assert {e["kept_id"] for e in ex} == {record_id(0, 5)} and len(ex) == 2


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 5), max_size=60), two_d=st.booleans())
def test_sorted_unique_is_numpys_unique(values, two_d):
    from kalm.data.dedup import sorted_unique

    a = np.array(values, dtype=np.int64)
    if two_d:
        a = a[: len(a) // 2 * 2].reshape(-1, 2)
    got, want = sorted_unique(a), np.unique(a)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), max_size=20), rows=st.integers(1, 50))
def test_coalesced_tables_keep_every_row_in_order(sizes, rows):
    import pyarrow as pa

    from kalm.data.dedup import coalesced

    starts = np.cumsum([0, *sizes])
    tables = [pa.table({"id": np.arange(a, b)}) for a, b in zip(starts, starts[1:])]
    out = list(coalesced(tables, rows))
    assert [i for t in out for i in t.column("id").to_pylist()] == list(range(starts[-1]))
    assert all(t.num_rows >= rows for t in out[:-1])  # only the last may be short
    assert len(out) <= -(-starts[-1] // rows) + (1 if sizes else 0)  # a table per ~rows, not per input


def test_components_roots_are_the_smallest_id():
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 200, size=(300, 2)) * 7 + 3
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    nodes, root = nd.components(nd.unique_pairs([np.sort(pairs, axis=1)]))
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    assert [find(int(x)) for x in nodes] == root.tolist()


def test_empty_stage_and_empty_partitions(tmp_path):
    parts = write_parts(tmp_path / "in", [[], [{"query": "q", "pos": ["p"], "task": "t", "id": record_id(1, 0)}]])
    _, final, stats = run_steps(tmp_path / "run", parts, 4, 3)
    assert [r["query"] for r in read_partitions(final)] == ["q"] and stats["in"] == stats["kept"] == 1


def test_a_rerun_step_writes_the_same_bytes(tmp_path):
    corpus = make_corpus(3, 30, 5, 5, 2)
    parts = write_parts(tmp_path / "in", corpus)
    exact, final, _ = run_steps(tmp_path / "run", parts, 2, 2)
    before = {p: Path(p).read_bytes() for p in exact + final}
    d = tmp_path / "run"
    dedup_partition([str(d / "scatter0.arrow"), str(d / "scatter1.arrow")], 1, 2, exact[1], str(d / "exact1.json"))
    nd.near_filter(exact[1], str(d / "drop.npy"), final[1], str(d / "dedup1.json"), str(d / "components.json"))
    assert {p: Path(p).read_bytes() for p in exact + final} == before


def test_exact_step_takes_parts_in_any_order_and_rejects_duplicate_ids(tmp_path):
    corpus = make_corpus(4, 20, 6, 0, 3)
    parts = write_parts(tmp_path / "in", corpus)
    outs = [str(tmp_path / f"s{i}.arrow") for i in range(3)]
    for p, o in zip(parts, outs):
        scatter_parts([p], o, 1)
    dedup_partition(outs, 0, 1, str(tmp_path / "a.parquet"), str(tmp_path / "a.json"))
    dedup_partition(outs[::-1], 0, 1, str(tmp_path / "b.parquet"), str(tmp_path / "b.json"))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    # files whose ids interleave are merged by id: the same result as one file
    recs = [r for part in corpus for r in part]
    write_shard(tmp_path / "even.parquet", recs[0::2])
    write_shard(tmp_path / "odd.parquet", recs[1::2])
    halves = [str(tmp_path / f"{n}.arrow") for n in ("even", "odd")]
    for n, o in zip(("even", "odd"), halves):
        scatter_parts([str(tmp_path / f"{n}.parquet")], o, 1)
    dedup_partition(halves, 0, 1, str(tmp_path / "m.parquet"), str(tmp_path / "m.json"))
    assert list(iter_shard(tmp_path / "m.parquet")) == list(iter_shard(tmp_path / "a.parquet"))
    assert (
        read_json(tmp_path / "m.json")["dropped"] == read_json(tmp_path / "a.json")["dropped"] == {"exact_duplicate": 6}
    )
    with pytest.raises(ValueError, match="occurs twice"):
        dedup_partition([outs[0], outs[0]], 0, 1, str(tmp_path / "c.parquet"), str(tmp_path / "c.json"))
    assert not (tmp_path / "c.parquet").exists()


def test_buckets_reject_partitions_with_different_settings(tmp_path):
    parts = write_parts(tmp_path, [[{"query": "q", "pos": ["p"], "task": "t", "id": 0}]])
    nd.minhash_partition(parts[0], str(tmp_path / "m0"), num_perm=64)
    nd.minhash_partition(parts[0], str(tmp_path / "m1"), num_perm=128)
    with pytest.raises(ValueError, match="num_perm"):
        nd.bucket_pairs([str(tmp_path / "m0"), str(tmp_path / "m1")], str(tmp_path / "pairs.npy"))


def test_cli_steps(tmp_path):
    """Every step is a `kalm dedup --step` command; `kalm dedup IN --out OUT` runs them all."""
    corpus = make_corpus(5, 20, 3, 4, 2)
    parts = write_parts(tmp_path / "in", corpus)
    d = tmp_path / "cli"
    for i, p in enumerate(parts):
        assert kalm_main(["dedup", "--step", "scatter", p, "--shards", "2", "--out", str(d / f"s{i}.arrow")]) == 0
    for j in range(2):
        assert (
            kalm_main(
                [
                    "dedup",
                    "--step",
                    "exact",
                    *[str(d / f"s{i}.arrow") for i in range(2)],
                    "--shards",
                    "2",
                    "--partition",
                    f"p{j}",
                    "--out",
                    str(d / f"e{j}.parquet"),
                    "--stats",
                    str(d / f"e{j}.json"),
                ]
            )
            == 0
        )
        assert (
            kalm_main(
                [
                    "dedup",
                    "--step",
                    "minhash",
                    str(d / f"e{j}.parquet"),
                    "--out",
                    str(d / f"m{j}"),
                    "--num-perm",
                    "128",
                    "--threshold",
                    "0.8",
                ]
            )
            == 0
        )
    for k in range(2):
        assert (
            kalm_main(
                [
                    "dedup",
                    "--step",
                    "buckets",
                    str(d / "m0"),
                    str(d / "m1"),
                    "--band-job",
                    str(k),
                    "--band-jobs",
                    "2",
                    "--out",
                    str(d / f"pairs{k}.npy"),
                ]
            )
            == 0
        )
    assert (
        kalm_main(
            [
                "dedup",
                "--step",
                "components",
                str(d / "pairs0.npy"),
                str(d / "pairs1.npy"),
                "--out",
                str(d / "drop.npy"),
                "--stats",
                str(d / "components.json"),
            ]
        )
        == 0
    )
    for j in range(2):
        assert (
            kalm_main(
                [
                    "dedup",
                    "--step",
                    "filter",
                    str(d / f"e{j}.parquet"),
                    "--drop",
                    str(d / "drop.npy"),
                    "--components",
                    str(d / "components.json"),
                    "--out",
                    str(d / f"o{j}.parquet"),
                    "--stats",
                    str(d / f"o{j}.json"),
                ]
            )
            == 0
        )
    assert (
        kalm_main(
            [
                "dedup",
                "--step",
                "stats",
                str(d / "e0.json"),
                str(d / "e1.json"),
                "--near-stats",
                str(d / "o0.json"),
                str(d / "o1.json"),
                "--components",
                str(d / "components.json"),
                "--params",
                '{"threshold": 0.8}',
                "--out",
                str(d / "stats.json"),
            ]
        )
        == 0
    )
    s = read_json(d / "stats.json")
    assert s["in"] == 27 == s["kept"] + sum(s["dropped"].values()) and s["threshold"] == 0.8
    assert s["method"] == "exact+near" and s["partitions"] == 2
    # all in one process: the same records
    assert (
        kalm_main(
            [
                "dedup",
                *parts,
                "--near-dup",
                "--partitions",
                "3",
                "--out",
                str(tmp_path / "all.parquet"),
                "--stats",
                str(tmp_path / "all.json"),
            ]
        )
        == 0
    )
    assert list(iter_shard(tmp_path / "all.parquet")) == read_partitions([str(d / "o0.parquet"), str(d / "o1.parquet")])
    assert read_json(tmp_path / "all.json")["dropped"] == s["dropped"]


# ---- the Snakemake rules (workflow/rules/dedup.smk) on their own ---------------------------------

HARNESS = """
import shlex, sys
# `kalm`, through a wrapper that fails the job whose command matches $KALM_TEST_FAIL (a killed job)
KALM = f"{shlex.quote(sys.executable)} {shlex.quote(str(workflow.basedir))}/kalm_wrapper.py"
import dataclasses
from kalm.data.config import DedupConfig
def dedup_settings():  # the declared defaults (the workflow's schema fills the same ones in)
    return {**dataclasses.asdict(DedupConfig()), **config["data"].get("dedup", {})}
def data_tasks(stage):
    return sorted(config["data"][stage])
def validated_parts(stage):
    return [f"work/data/{stage}/validated/{t}/part{i}.parquet" for t in data_tasks(stage)
            for i in range(config["data"][stage][t])]
wildcard_constraints:
    stage="pretrain|finetune",
    dtask="[^/]+",
include: "%s"
"""

WRAPPER = """
import os, re, sys
if os.environ.get("KALM_TEST_FAIL") and re.search(os.environ["KALM_TEST_FAIL"], " ".join(sys.argv[1:])):
    sys.exit("killed (test)")
from kalm.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _snakemake(work, *args, fail=None):
    env = {k: v for k, v in __import__("os").environ.items() if k != "SNAKEMAKE_PROFILE"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **({"KALM_TEST_FAIL": fail} if fail else {}))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            *args,
            "-s",
            str(work / "Snakefile"),
            "--configfile",
            str(work / "config.yaml"),
            "--nolock",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _jobs(output):
    table = output.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_snakemake_rules_rerun_a_failed_partition_job_alone(tmp_path):
    work = tmp_path
    (work / "Snakefile").write_text(HARNESS % (ROOT / "workflow/rules/dedup.smk"), encoding="utf-8")
    (work / "kalm_wrapper.py").write_text(WRAPPER, encoding="utf-8")
    (work / "config.yaml").write_text(
        json.dumps(
            {
                "data": {
                    "finetune": {"a": 2, "b": 1},
                    # the parts of task a to one scatter job, b's to another (the result: one job a part's)
                    "dedup": {"near_dup": True, "threshold": THRESHOLD, "shards": 2, "band_jobs": 2, "scatter_jobs": 2},
                }
            }
        ),
        encoding="utf-8",
    )
    corpus = make_corpus(6, 40, 6, 8, 3)
    for (task, i), recs in zip([("a", 0), ("a", 1), ("b", 0)], corpus):
        write_shard(work / f"work/data/finetune/validated/{task}/part{i}.parquet", [{**r, "task": task} for r in recs])
    target = "work/data/finetune/dedup.stats.json"
    res = _snakemake(work, target, "-n")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _jobs(res.stdout) == {
        "dedup_scatter": 2,
        "dedup": 2,
        "minhash": 2,
        "near_buckets": 2,
        "near_components": 1,
        "near_filter": 2,
        "dedup_stats": 1,
    }
    # partition 1's filter job is killed; everything else finishes (-k)
    res = _snakemake(work, target, "-c2", "-k", fail=r"--step filter \S*exact/p1\.parquet")
    assert res.returncode != 0 and (work / "work/data/finetune/dedup/p0.parquet").exists()
    assert not (work / "work/data/finetune/dedup/p1.parquet").exists()
    assert (work / "work/data/finetune/exact/p1.parquet").exists()  # a temp input is kept for its unfinished job
    res = _snakemake(work, target, "-n")
    assert _jobs(res.stdout) == {"near_filter": 1, "dedup_stats": 1}, res.stdout[-3000:]
    p0 = (work / "work/data/finetune/dedup/p0.parquet").read_bytes()
    res = _snakemake(work, target, "-c2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (work / "work/data/finetune/dedup/p0.parquet").read_bytes() == p0
    # temporary intermediates are gone; the outputs equal the steps run by hand with other settings
    left = {
        str(p.relative_to(work / "work/data/finetune")) for p in (work / "work/data/finetune").rglob("*") if p.is_file()
    }
    assert not {
        p
        for p in left
        if p.startswith(("scatter/", "minhash/", "exact/p")) and p.endswith((".arrow", ".parquet", ".npy"))
    }
    assert "near/pairs0.npy" not in left
    parts = [str(work / f"work/data/finetune/validated/{t}/part{i}.parquet") for t, i in [("a", 0), ("a", 1), ("b", 0)]]
    _, final, ref = run_steps(tmp_path / "ref", parts, 3, 1)
    out = [str(work / f"work/data/finetune/dedup/p{j}.parquet") for j in range(2)]
    assert read_partitions(out) == read_partitions(final)
    stats = read_json(work / target)
    for key in ("in", "kept", "dropped", "per_task", "pairs", "clusters"):
        assert stats[key] == ref[key], key
    assert stats["band_jobs"] == 2 and stats["threshold"] == THRESHOLD and stats["method"] == "exact+near"
    assert pq.ParquetFile(out[0]).schema_arrow.names[:4] == ["id", "task", "query", "pos"]


def test_snakemake_rules_exact_only(tmp_path):
    work = tmp_path
    (work / "Snakefile").write_text(HARNESS % (ROOT / "workflow/rules/dedup.smk"), encoding="utf-8")
    (work / "kalm_wrapper.py").write_text(WRAPPER, encoding="utf-8")
    (work / "config.yaml").write_text(
        json.dumps({"data": {"finetune": {"a": 1}, "dedup": {"shards": 3}}}), encoding="utf-8"
    )
    corpus = make_corpus(7, 10, 4, 0, 1, tasks=("a",))
    write_shard(work / "work/data/finetune/validated/a/part0.parquet", corpus[0])
    target = "work/data/finetune/dedup.stats.json"
    res = _snakemake(work, target, "-n")
    assert _jobs(res.stdout) == {"dedup_scatter": 1, "dedup": 3, "dedup_stats": 1}
    res = _snakemake(work, target, "-c2")
    assert res.returncode == 0, res.stderr[-3000:]
    stats = read_json(work / target)
    assert stats["in"] == 14 and stats["dropped"] == {"exact_duplicate": 4} and stats["method"] == "exact"
    out = read_partitions([str(work / f"work/data/finetune/dedup/p{j}.parquet") for j in range(3)])
    assert [r["id"] for r in out] == brute_force(corpus[0])[0]
