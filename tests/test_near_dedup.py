"""Near-duplicate removal (MinHash/LSH) and near-copy decontamination."""

import json
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.cli import main as kalm_main
from kalm.data.decontaminate import decontaminate
from kalm.data.dedup import dedup_local
from kalm.data.minhash import exact_jaccard, optimal_bands, signatures
from kalm.data.near_dedup import bucket_pairs, minhash_partition, near_duplicates, record_text
from kalm.data.shards import write_shard
from kalm.io import read_json, read_jsonl
from kalm.text import record_hash

EN = "abcdefghijklmnopqrstuvwxyz"
ZH = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明"


def random_text(rng, n_words=30):
    if rng.random() < 0.5:
        return " ".join("".join(rng.choice(EN) for _ in range(rng.randint(3, 9))) for _ in range(n_words))
    return "".join(rng.choice(ZH) for _ in range(n_words * 3))


def one_word_changed(rng, text):
    if " " in text:
        words = text.split(" ")
        words[rng.randrange(len(words))] = "changed"
        return " ".join(words)
    i = rng.randrange(len(text))
    return text[:i] + "变" + text[i + 1 :]


def run_pipeline(d, recs, shards=2, threshold=0.8, num_perm=128, shingle=5, name="in", band_jobs=2):
    """validate-free data stage, every step in this process (kalm.data.dedup.dedup_local): scatter,
    exact dedup per partition, minhash per partition, LSH bucket jobs, components, filter, gather."""
    src = d / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    stats = dedup_local(
        [str(src)],
        str(d / f"{name}.out.jsonl"),
        str(d / f"{name}.stats.json"),
        partitions=shards,
        near=True,
        band_jobs=band_jobs,
        threshold=threshold,
        num_perm=num_perm,
        shingle=shingle,
        batch=7,
    )  # tiny batches: batch boundaries must not matter
    return list(read_jsonl(d / f"{name}.out.jsonl")), stats


def test_signatures_estimate_jaccard_and_do_not_depend_on_the_batch():
    rng = random.Random(0)
    base = [random_text(rng) for _ in range(200)]
    edited = [one_word_changed(rng, t) for t in base]
    a, b = signatures(base), signatures(edited)
    est = (a == b).mean(axis=1)
    exact = np.array([exact_jaccard(x, y, 5) for x, y in zip(base, edited)])
    assert abs(float((est - exact).mean())) < 0.02 and float(np.abs(est - exact).mean()) < 0.05
    assert np.array_equal(signatures(base[:3]), a[:3]) and np.array_equal(signatures(base[5:6]), a[5:6])
    assert (signatures(["ab", "ab", "abcdefgh"])[0] == signatures(["ab"])[0]).all()  # shorter than k
    far = signatures([random_text(rng) for _ in range(50)])
    assert (far[:, None, :] == far[None, :, :]).mean(axis=2)[~np.eye(50, dtype=bool)].max() < 0.3


def test_bands_follow_the_threshold():
    b9, r9 = optimal_bands(0.9, 128)
    b5, r5 = optimal_bands(0.5, 128)
    assert b9 * r9 <= 128 and b5 * r5 <= 128 and r9 > r5


def test_planted_near_duplicates_are_dropped_first_seen_kept_and_counts_add_up(tmp_path):
    rng = random.Random(1)
    originals = [{"query": random_text(rng, 8), "pos": [random_text(rng, 40)], "task": "a"} for _ in range(300)]
    copies = [{"query": r["query"], "pos": [one_word_changed(rng, r["pos"][0])], "task": "b"} for r in originals[:40]]
    exact = [{"query": r["query"].upper(), "pos": [r["pos"][0] + "  "], "task": "b"} for r in originals[40:60]]
    recs = originals + copies + exact
    out, stats = run_pipeline(tmp_path, recs, shards=3)
    assert [r["query"] for r in out] == [r["query"] for r in originals]  # the first seen, in input order
    assert stats["dropped"] == {"exact_duplicate": 20, "near_duplicate": 40}
    assert stats["per_task"]["b"]["dropped"] == {"exact_duplicate": 20, "near_duplicate": 40}
    assert stats["per_task"]["a"] == {"in": 300, "kept": 300, "dropped": {}}
    assert stats["clusters"] == 40 and stats["pairs"] == 40
    s = read_json(tmp_path / "in.stats.json")
    assert s["in"] == len(recs) == s["kept"] + sum(s["dropped"].values())
    assert s["method"] == "exact+near" and s["near_duplicate_examples"]


words = st.text(alphabet=st.sampled_from(list("abcdefghij中文字")), min_size=1, max_size=4)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 40),
    n_dups=st.integers(0, 10),
    n_near=st.integers(0, 10),
    shards=st.integers(1, 4),
    band_jobs=st.integers(1, 3),
)
def test_near_dedup_invariants(tmp_path_factory, seed, n, n_dups, n_near, shards, band_jobs):
    d = tmp_path_factory.mktemp("nd")
    rng = random.Random(seed)
    recs = [{"query": random_text(rng, 5), "pos": [random_text(rng, 25)], "task": "t"} for _ in range(n)]
    recs += [dict(rng.choice(recs[:n])) for _ in range(n_dups)]
    recs += [{**r, "pos": [one_word_changed(rng, r["pos"][0])]} for r in rng.sample(recs[:n], min(n_near, n))]
    rng.shuffle(recs)
    out, stats = run_pipeline(d, recs, shards=shards, band_jobs=band_jobs)
    # counts add up, and exactly one record of each exact-duplicate group survives
    dropped = sum(stats["dropped"].values())
    assert stats["in"] == len(recs) == stats["kept"] + dropped == len(out) + dropped
    hashes = [record_hash(r["query"], r["pos"]) for r in out]
    assert len(hashes) == len(set(hashes))
    groups = Counter(record_hash(r["query"], r["pos"]) for r in recs)
    assert stats["dropped"].get("exact_duplicate", 0) == sum(c - 1 for c in groups.values())
    # a record with no exact or near duplicate (text far from every other) is never dropped
    texts = [record_text(r) for r in recs]
    kept = set(hashes)
    for i, r in enumerate(recs):
        others = [exact_jaccard(texts[i], t, 5) for j, t in enumerate(texts) if j != i]
        if not others or max(others) < 0.5:
            assert record_hash(r["query"], r["pos"]) in kept
    # idempotent: the output has nothing left to drop and comes back unchanged
    again, stats2 = run_pipeline(d, out, shards=shards, name="again", band_jobs=band_jobs)
    assert again == out and stats2["dropped"] == {}


def test_texts_far_apart_are_never_dropped():
    rng = random.Random(2)
    sigs = signatures([random_text(rng) for _ in range(3000)])
    keep, match = near_duplicates(sigs, 0.5)
    assert keep.all() and (match == -1).all()


def test_cli_runs_every_step_with_near_dup(tmp_path):
    """`kalm dedup IN --near-dup --out OUT --stats S`: the stage in one process (the workflow runs
    each step as its jobs: tests/test_dedup_shuffle.py)."""
    src = tmp_path / "v.jsonl"
    rng = random.Random(3)
    recs = [{"query": random_text(rng, 5), "pos": [random_text(rng, 30)], "task": "t"} for _ in range(20)]
    recs.append({**recs[3], "pos": [one_word_changed(rng, recs[3]["pos"][0])]})
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    assert (
        kalm_main(
            [
                "dedup",
                str(src),
                "--near-dup",
                "--partitions",
                "2",
                "--band-jobs",
                "2",
                "--num-perm",
                "64",
                "--threshold",
                "0.8",
                "--out",
                str(tmp_path / "o.jsonl"),
                "--stats",
                str(tmp_path / "o.json"),
            ]
        )
        == 0
    )
    s = read_json(tmp_path / "o.json")
    assert s["in"] == 21 and s["kept"] == 20 and s["dropped"] == {"near_duplicate": 1}
    assert s["num_perm"] == 64 and s["partitions"] == 2 and s["near_duplicate_examples"][0]["kept_id"] == 3
    out = list(read_jsonl(tmp_path / "o.jsonl"))
    assert [r["id"] for r in out] == list(range(20))  # ids by input order, kept in the output
    # the minhash step writes a folder of memory-mappable arrays
    write_shard(tmp_path / "p.parquet", out)
    assert (
        kalm_main(
            [
                "dedup",
                "--step",
                "minhash",
                str(tmp_path / "p.parquet"),
                "--out",
                str(tmp_path / "mh"),
                "--num-perm",
                "64",
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "mh/sig.npy", mmap_mode="r").shape == (20, 64)
    meta = read_json(tmp_path / "mh/meta.json")
    assert np.load(tmp_path / "mh/keys.npy").shape == (meta["bands"], 20)


def test_buckets_reject_signatures_of_other_settings(tmp_path):
    a = tmp_path / "a.parquet"
    write_shard(
        a, [{"id": 0, "query": "q", "pos": ["p"], "task": "t"}, {"id": 1, "query": "r", "pos": ["p"], "task": "t"}]
    )
    minhash_partition(str(a), str(tmp_path / "m0"))
    minhash_partition(str(a), str(tmp_path / "m1"), shingle=3)
    with pytest.raises(ValueError, match="shingle"):
        bucket_pairs([str(tmp_path / "m0"), str(tmp_path / "m1")], str(tmp_path / "pairs.npy"))
    assert not (tmp_path / "pairs.npy").exists()


# ---- decontamination against near-copies of evaluation texts --------------------------------


@pytest.fixture
def eval_tasks(tmp_path):
    ret = tmp_path / "EvalRetrieval"
    ret.mkdir()
    (ret / "queries.jsonl").write_text('{"id": "q1", "text": "Where is the old bridge?"}\n', encoding="utf-8")
    (ret / "corpus.jsonl").write_text(
        json.dumps(
            {
                "id": "d1",
                "text": (
                    "The old stone bridge of Belmora was built in 1620 by the guild of masons and still carries "
                    "the market road across the river every morning."
                ),
            }
        )
        + "\n",
        encoding="utf-8",
    )
    sts = tmp_path / "EvalSTSZh"
    sts.mkdir()
    (sts / "test.jsonl").write_text(
        json.dumps(
            {
                "sentence1": "这座古老的石桥建于一六二零年，由石匠行会修建，至今仍然承载着每天清晨穿过河流的集市道路，是全城最受欢迎的地标。",
                "sentence2": "猫在睡觉。",
                "score": 1,
            },
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    return {"EvalRetrieval": str(ret), "EvalSTSZh": str(sts)}


def _train(path, recs):
    path.write_text(
        "".join(json.dumps({"query": q, "pos": p, "task": "train"}, ensure_ascii=False) + "\n" for q, p in recs),
        encoding="utf-8",
    )
    return str(path)


def test_decontamination_drops_a_near_copy_of_an_eval_text(tmp_path, eval_tasks):
    src = _train(
        tmp_path / "train.jsonl",
        [
            ("where is the old bridge?", ["unrelated passage"]),  # exact copy of an eval query
            (
                "a clean query",
                [
                    "The old stone bridge of Belmora was built in 1620 by the guild of masons and still "
                    "carries the market road across the river every evening."
                ],
            ),  # one word changed
            (
                "这座古老的石桥建于一六二零年，由石匠行会修建，至今仍然承载着每天早晨穿过河流的集市道路，是全城最受欢迎的地标。",
                ["x"],
            ),  # zh, one character changed
            (
                "Where is the new bridge?",
                ["A different passage about a ferry crossing near the harbour."],
            ),  # short: kept
            ("clean", ["clean passage about something else entirely"]),
        ],
    )
    stats = decontaminate(
        src,
        eval_tasks,
        str(tmp_path / "o.jsonl"),
        str(tmp_path / "s.json"),
        str(tmp_path / "r.json"),
        near=True,
        threshold=0.8,
    )
    assert [r["query"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["Where is the new bridge?", "clean"]
    assert stats.dropped == {"overlaps_eval": 1, "near_overlaps_eval": 2}
    report = read_json(tmp_path / "r.json")
    ret = report["EvalRetrieval"]
    assert (ret["overlapping_records"], ret["exact_records"], ret["near_records"]) == (2, 1, 1)
    near = ret["examples"][1]["near"][0]
    assert near["field"] == "pos[0]" and 0.8 <= near["jaccard"] < 1
    assert (
        report["EvalSTSZh"]["near_records"] == 1 and report["EvalSTSZh"]["examples"][0]["near"][0]["field"] == "query"
    )
    # without near matching, only the exact copy goes (the existing behaviour)
    stats = decontaminate(
        src, eval_tasks, str(tmp_path / "o2.jsonl"), str(tmp_path / "s2.json"), str(tmp_path / "r2.json")
    )
    assert stats.dropped == {"overlaps_eval": 1}
    assert set(read_json(tmp_path / "r2.json")["EvalRetrieval"]) == {"texts", "overlapping_records", "examples"}


def test_mteb_tasks_are_read_from_their_mirror_and_skipped_with_a_note_without_data(
    tmp_path, eval_tasks, monkeypatch, caplog
):
    """A registered MTEB task's texts come from its local mirror (as for kalm evaluate); a task with
    neither mirror nor offline cache is skipped with a note, never silently."""
    import datasets.config
    from test_eval_mirror import DOCS, QUERIES, t2reranking_mirror

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "mirror"
    t2reranking_mirror(root)
    src = _train(tmp_path / "train.jsonl", [(QUERIES["q1"], ["p"]), ("ok", [DOCS[3]]), ("fine", ["kept"])])
    mirrored = {"name": "T2Reranking", "lang": "zh", "mirror_root": str(root)}
    stats = decontaminate(
        src,
        eval_tasks,
        str(tmp_path / "o.jsonl"),
        str(tmp_path / "s.json"),
        str(tmp_path / "r.json"),
        mteb_tasks=[mirrored, {"name": "STS12", "lang": "en", "mirror_root": str(root)}],
    )
    report = read_json(tmp_path / "r.json")
    assert report["T2Reranking"]["texts"] == len(set(DOCS) | set(QUERIES.values()))
    assert report["T2Reranking"]["overlapping_records"] == 2 and stats.kept == 1
    assert stats.dropped == {"overlaps_eval": 2}
    assert "no mirror at" in report["STS12"]["skipped"] and "OfflineModeIsEnabled" in report["STS12"]["skipped"]
    assert "STS12" in caplog.text and read_json(tmp_path / "s.json")["skipped_eval_tasks"] == ["STS12"]
    # a mistake in the spec is not a skip
    with pytest.raises(ValueError, match="not a registered MTEB task"):
        decontaminate(
            src,
            eval_tasks,
            str(tmp_path / "o.jsonl"),
            str(tmp_path / "s.json"),
            str(tmp_path / "r.json"),
            mteb_tasks=["T2Rerankingg"],
        )


@pytest.mark.parametrize(
    "section, bad",
    [
        ("dedup", {"near_dup": True, "treshold": 0.8}),
        ("dedup", {"shards": 0}),
        ("dedup", {"band_jobs": 0}),
        ("decontaminate", {"near_dup": "yes"}),
    ],
)
def test_config_schema_rejects_bad_dedup_keys(section, bad):
    from pathlib import Path

    import jsonschema
    import yaml

    root = Path(__file__).resolve().parents[1]
    from kalm.schema import full_schema

    schema = full_schema(root / "workflow/schemas/config.schema.yaml")  # with the trainer's declared keys
    cfg = yaml.safe_load((root / "config/config.yaml").read_text(encoding="utf-8"))
    jsonschema.validate(cfg, schema)
    cfg["data"][section] = bad
    with pytest.raises(jsonschema.ValidationError) as err:
        jsonschema.validate(cfg, schema)
    assert next(iter(bad)) in str(err.value) or "0" in str(err.value)
