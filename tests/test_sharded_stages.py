"""The data stages as shard jobs (issue 15): validate, decontaminate, embed and mine give the same
records whatever the number of shards; counts add up across shards and after the merge; errors
still name file, line or row and field; the DAG has one job per input file / partition."""

import json
import random
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kalm.cli import main as kalm_main
from kalm.data.shards import iter_shard, record_id, write_shard
from kalm.data.validate import ValidationError, parse_record, validate_file
from kalm.io import read_json, read_jsonl

# ---- text normalisation and JSON parsing: the fast paths are the same functions --------------------


def test_whitespace_folding_without_the_regex_is_the_same_for_every_code_point():
    from kalm.text import normalize_text

    ws = re.compile(r"\s+")
    assert [c for c in range(sys.maxunicode + 1) if (ws.fullmatch(chr(c)) is not None) != chr(c).isspace()] == []
    for text in ["", "  ", " a\u3000b\t\n c \x1c", "Ｑｕｅｒｙ  one", "a\u00a0\u2028b"]:
        import unicodedata

        assert normalize_text(text) == ws.sub(" ", unicodedata.normalize("NFKC", text)).strip()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text("a 中Ａ\t\ud800\udfff", max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["query", "pos", "neg", "instruction", "x"]), inner, max_size=4)
    ),
    max_leaves=8,
)
raw_lines = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=16),
    st.just(b'{"query": "q", "pos": ["a"], "n": 123456789012345678901234567890}'),
    st.just(b'{"query": NaN, "pos": ["a"]}'),
    st.just(b'{"query": "q", "pos": [1e400]}'),
)


@settings(max_examples=300, deadline=None)
@given(raw=raw_lines)
def test_orjson_fast_path_accepts_and_rejects_exactly_like_json(raw):
    def outcome(fast):
        try:
            return parse_record(raw, "f.jsonl", 7, fast=fast)
        except ValidationError as e:
            return (e.field, e.reason, str(e))

    assert outcome(True) == outcome(False)


# ---- validate: one job per file, ids in input order -------------------------------------------------


def _jsonl(path, recs):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in recs), encoding="utf-8"
    )
    return path


@pytest.fixture
def task_folder(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", [{"query": "q1", "pos": ["p1"]}, "", {"query": "q2", "pos": ["p2"], "neg": ["n"]}])
    pq.write_table(
        pa.Table.from_pylist(
            [{"query": "q3", "pos": ["p3"]}, {"query": "", "pos": ["x"]}, {"query": "q5", "pos": ["p5"]}]
        ),
        folder / "b.parquet",
    )
    _jsonl(folder / "c.jsonl", ['{"query": "q6", "pos": ["p6"]', {"query": "q7", "pos": ["p7"], "instruction": "own"}])
    return folder


def test_validating_each_file_with_its_ordinal_equals_validating_the_folder(tmp_path, task_folder):
    from kalm.data.validate import task_files

    whole = validate_file(
        str(task_folder),
        "t",
        str(tmp_path / "all.parquet"),
        str(tmp_path / "all.json"),
        on_error="quarantine",
        rejects_path=str(tmp_path / "all.rej"),
        instruction="Do it",
        shard_ordinal=5,
    )
    parts, stats = [], []
    for i, f in enumerate(task_files(task_folder)):
        out = tmp_path / f"part{i}.parquet"
        validate_file(
            str(f),
            "t",
            str(out),
            str(tmp_path / f"part{i}.json"),
            on_error="quarantine",
            rejects_path=str(tmp_path / f"part{i}.rej"),
            instruction="Do it",
            shard_ordinal=5 + i,
        )
        parts += list(iter_shard(out))
        stats.append(str(tmp_path / f"part{i}.json"))
    assert parts == list(iter_shard(tmp_path / "all.parquet"))
    # ids: (ordinal << 32) | (line or row - 1): file a lines 1 and 3, file b rows 1 and 3, file c line 2
    assert [r["id"] for r in parts] == [
        record_id(5, 0),
        record_id(5, 2),
        record_id(6, 0),
        record_id(6, 2),
        record_id(7, 1),
    ]
    assert parts[-1]["instruction"] == "own" and parts[0]["instruction"] == "Do it" and parts[0]["task"] == "t"
    # the per-file stats add up, also merged by `kalm shards merge-stats`
    assert kalm_main(["shards", "merge-stats", "--stage", "validate", "--out", str(tmp_path / "m.json"), *stats]) == 0
    merged = read_json(tmp_path / "m.json")
    assert merged["in"] == whole.n_in == 7 and merged["kept"] == whole.kept == 5
    assert merged["dropped"] == whole.dropped == {"invalid:query": 1, "invalid:<line>": 1}
    assert merged["per_task"]["t"]["in"] == merged["per_task"]["t"]["kept"] + sum(
        merged["per_task"]["t"]["dropped"].values()
    )
    rejects = [r for i in range(3) for r in read_jsonl(tmp_path / f"part{i}.rej")]
    assert rejects == list(read_jsonl(tmp_path / "all.rej"))
    assert [(r["file"].rsplit("/", 1)[1], r.get("line", r.get("row")), r["field"]) for r in rejects] == [
        ("b.parquet", 2, "query"),
        ("c.jsonl", 1, "<line>"),
    ]


@pytest.mark.parametrize(
    "name, content, where",
    [
        ("bad.jsonl", '{"query": "ok", "pos": ["p"]}\n{"query": "q"}\n', "bad.jsonl:2: field 'pos': missing"),
        (
            "bad.parquet",
            [{"query": "ok", "pos": ["p"]}, {"query": "q", "pos": ["a", None]}],
            "bad.parquet: row 2: field 'pos[1]': expected a string",
        ),
    ],
)
def test_a_file_error_of_a_shard_job_names_file_line_or_row_and_field(tmp_path, name, content, where):
    src = tmp_path / name
    if isinstance(content, str):
        src.write_text(content, encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(content), src)
    out = tmp_path / "part3.parquet"
    with pytest.raises(SystemExit) as err:
        kalm_main(
            [
                "validate",
                "--input",
                str(src),
                "--task",
                "t",
                "--shard-ordinal",
                "3",
                "--out",
                str(out),
                "--stats",
                str(tmp_path / "s.json"),
                "--rejects",
                str(tmp_path / "r.jsonl"),
            ]
        )
    assert where in str(err.value) and str(src) in str(err.value)
    assert not out.exists() and not (tmp_path / "r.jsonl").exists()


def test_jsonl_input_is_streamed_not_read_whole(tmp_path, monkeypatch):
    """validate reads a JSON Lines file line by line: records come out before the file is read to its end."""
    import kalm.data.validate as kv

    src = _jsonl(tmp_path / "t.jsonl", [{"query": f"q{i}", "pos": ["p"]} for i in range(50)])
    seen = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def __iter__(self):
            for line in self.f:
                seen.append(len(seen))
                yield line

    monkeypatch.setattr(
        kv,
        "open",
        lambda p, mode="r", **kw: Spy(real_open(p, mode, **kw)) if str(p) == str(src) else real_open(p, mode, **kw),
        raising=False,
    )
    gen = kv._raw_records(src)
    next(gen)
    assert len(seen) == 1  # one line read for the first record
    gen.close()


# ---- decontaminate: one index, any number of partitions ---------------------------------------------

PASSAGE = (
    "The old stone bridge of Belmora was built in 1620 by the guild of masons and still carries "
    "the market road across the river every morning."
)
FILLER = " ".join(f"Paragraph {i} of the town chronicle tells of harvests, fairs and floods." for i in range(6))


@pytest.fixture(scope="module")
def eval_index_dir(tmp_path_factory):
    from kalm.data.decontaminate import EvalIndex

    d = tmp_path_factory.mktemp("eval")
    ret = d / "EvalRetrieval"
    ret.mkdir()
    _jsonl(ret / "queries.jsonl", [{"id": "q1", "text": "Where is the old bridge?"}])
    _jsonl(ret / "corpus.jsonl", [{"id": "d1", "text": PASSAGE}, {"id": "d2", "text": "The mill stands by the weir."}])
    sts = d / "EvalSTS"
    sts.mkdir()
    _jsonl(
        sts / "test.jsonl",
        [
            {
                "sentence1": "A cat sleeps on the warm windowsill all afternoon.",
                "sentence2": "The mill stands by the weir.",
                "score": 1,
            }
        ],
    )
    tasks = {"EvalRetrieval": str(ret), "EvalSTS": str(sts)}
    EvalIndex.build(tasks, near=True, threshold=0.8, contain_min_chars=40).save(d / "index")
    return d / "index", tasks


def _train_records(n, seed):
    rng = random.Random(seed)
    kinds = [
        lambda i: {"query": "where is the  old bridge?", "pos": [f"passage {i}"]},  # exact
        lambda i: {"query": f"q{i}", "pos": [PASSAGE.replace("morning", "evening")]},  # near
        lambda i: {"query": f"q{i}", "pos": [FILLER + " " + PASSAGE.upper() + f" {i}"]},  # contains
        lambda i: {"query": "the mill stands by the weir.", "pos": ["x"]},  # exact, 2 tasks
        lambda i: {"query": f"clean query {i}", "pos": [f"clean passage {i}"]},
        lambda i: {"query": f"clean query {i}", "pos": [f"clean passage {i}"]},
    ]
    return [{**rng.choice(kinds)(i), "task": rng.choice(["a", "b"]), "id": record_id(i % 3, i)} for i in range(n)]


def _split(recs, parts, seed):
    rng = random.Random(seed)
    out = [[] for _ in range(parts)]
    for r in recs:
        out[rng.randrange(parts)].append(r)
    return [sorted(p, key=lambda r: r["id"]) for p in out]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 40), parts=st.integers(1, 4), seed=st.integers(0, 100))
def test_decontaminating_partitions_equals_one_run(tmp_path_factory, eval_index_dir, n, parts, seed):
    from kalm.data.decontaminate import EvalIndex, apply_index, merge

    index_dir, _ = eval_index_dir
    d = tmp_path_factory.mktemp("decon")
    recs = sorted(_train_records(n, seed), key=lambda r: r["id"])
    idx = EvalIndex.load(index_dir)
    write_shard(d / "all.parquet", recs)
    apply_index(idx, str(d / "all.parquet"), str(d / "one.parquet"), str(d / "one.json"), str(d / "one.r.json"))
    stats, reports, kept = [], [], []
    for j, part in enumerate(_split(recs, parts, seed)):
        write_shard(d / f"in{j}.parquet", part)
        s = apply_index(
            idx, str(d / f"in{j}.parquet"), str(d / f"p{j}.parquet"), str(d / f"p{j}.json"), str(d / f"p{j}.r.json")
        )
        assert s.n_in == len(part) == s.kept + sum(s.dropped.values())
        stats.append(str(d / f"p{j}.json"))
        reports.append(str(d / f"p{j}.r.json"))
        kept += list(iter_shard(d / f"p{j}.parquet"))
    merged = merge(stats, reports, str(d / "m.json"), str(d / "m.r.json"))
    assert sorted(kept, key=lambda r: r["id"]) == list(iter_shard(d / "one.parquet"))
    assert read_json(d / "m.r.json") == read_json(d / "one.r.json")
    single = read_json(d / "one.json")
    for key in (
        "in",
        "kept",
        "dropped",
        "per_task",
        "eval_tasks",
        "threshold",
        "num_perm",
        "bands",
        "rows",
        "contain_min_chars",
        "eval_texts_long_enough",
    ):
        assert merged[key] == single[key], key
    assert merged["in"] == n == merged["kept"] + sum(merged["dropped"].values())
    assert merged["shards"] == parts


def test_the_index_on_disk_finds_what_the_one_shot_run_finds(tmp_path, eval_index_dir):
    """`--step index` + `--step apply` (CLI) and `--step all` give the same records, stats and report."""
    index_dir, tasks = eval_index_dir
    recs = _train_records(30, 4)
    write_shard(tmp_path / "in.parquet", recs)
    base = [
        "decontaminate",
        *[a for t, p in tasks.items() for a in ("--eval-task", f"{t}={p}")],
        "--near",
        "--contain-min-chars",
        "40",
        "--input",
        str(tmp_path / "in.parquet"),
    ]
    assert (
        kalm_main(
            [
                *base,
                "--out",
                str(tmp_path / "a.parquet"),
                "--stats",
                str(tmp_path / "a.json"),
                "--report",
                str(tmp_path / "a.r.json"),
            ]
        )
        == 0
    )
    assert kalm_main(["decontaminate", "--step", "index", *base[1:-2], "--index-dir", str(tmp_path / "idx")]) == 0
    assert (
        kalm_main(
            [
                "decontaminate",
                "--step",
                "apply",
                "--index-dir",
                str(tmp_path / "idx"),
                "--input",
                str(tmp_path / "in.parquet"),
                "--out",
                str(tmp_path / "b.parquet"),
                "--stats",
                str(tmp_path / "b.json"),
                "--report",
                str(tmp_path / "b.r.json"),
            ]
        )
        == 0
    )
    assert list(iter_shard(tmp_path / "a.parquet")) == list(iter_shard(tmp_path / "b.parquet"))
    assert read_json(tmp_path / "a.r.json") == read_json(tmp_path / "b.r.json")
    a, b = read_json(tmp_path / "a.json"), read_json(tmp_path / "b.json")
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert set(a["dropped"]) == {"overlaps_eval", "near_overlaps_eval", "contains_eval"}
    report = read_json(tmp_path / "a.r.json")
    assert all(
        e["id"] == sorted(e["id"] for e in report[t]["examples"])[i]
        for t in report
        for i, e in enumerate(report[t]["examples"])
    )


def test_an_exact_hit_is_confirmed_by_the_text_not_the_hash(tmp_path, eval_index_dir, monkeypatch):
    import kalm.data.decontaminate as kd

    _, tasks = eval_index_dir
    monkeypatch.setattr(kd, "_key_hash", lambda key: 7)  # every text collides with every other
    kd.EvalIndex.build(tasks).save(tmp_path / "index")
    idx = kd.EvalIndex.load(tmp_path / "index")
    assert len(set(idx.exact_hash.tolist())) == 1 and len(idx.exact_hash) == 5  # 3 + 2 texts
    assert idx.exact_owners(["where is the old bridge?", "not an eval text", "the mill stands by the weir."]) == [
        {"EvalRetrieval"},
        set(),
        {"EvalRetrieval", "EvalSTS"},
    ]


# ---- embed and mine: text shards by hash, one mine job per query shard -----------------------------


def test_embed_text_shards_are_a_hash_partition_of_the_texts_to_embed(tmp_path):
    from kalm.mining.embed import shard_texts, texts_to_embed

    recs = [
        {
            "query": f"q{i}",
            "pos": [f"p{i}"],
            "neg": [f"n{i % 4}"],
            "task": "r" if i % 3 else "s",
            "id": i,
            "instruction": "Find",
        }
        for i in range(30)
    ]
    recs.append({"query": "label me", "pos": ["A"], "task": "cls", "id": 99})
    write_shard(tmp_path / "p0.parquet", recs[:12])
    write_shard(tmp_path / "p1.parquet", recs[12:])
    mine_tasks = {"r": False, "s": True}
    shards = [
        shard_texts([str(tmp_path / "p0.parquet"), str(tmp_path / "p1.parquet")], mine_tasks, s, 3) for s in range(3)
    ]
    assert all(s == sorted(s) for s in shards)
    assert sorted(t for s in shards for t in s) == texts_to_embed(recs, mine_tasks)
    assert len({t for s in shards for t in s}) == sum(map(len, shards))  # disjoint


def _mine_corpus(tmp_path, n=60, seed=0, dim=16):
    from test_mine import fake_shards

    from kalm.mining.embed import texts_to_embed

    rng = random.Random(seed)
    recs = []
    for i in range(n):
        task = rng.choice(["a", "b"])
        rec = {"query": f"{task} query {i}", "pos": [f"{task} passage {i}"], "task": task, "id": record_id(i % 4, i)}
        if i % 5 == 0:
            rec["neg"] = [f"{task} given {i}", f"{task} passage {(i + 1) % n}"]
        recs.append(rec)
    recs += [
        {"query": f"label {i}", "pos": ["A"], "neg": ["B"], "task": "cls", "id": record_id(9, i)} for i in range(3)
    ]
    mine_tasks = {"a": False, "b": True}
    paths, _ = fake_shards(tmp_path, texts_to_embed(recs, mine_tasks), num_shards=2, dim=dim, seed=seed)
    return recs, mine_tasks, paths


MINE_KW = dict(window=(28, 45), negative_number=20, filter_topk=10, pad="random", sampling="random", seed=3)


@pytest.mark.parametrize("index, pool", [("flat", "task"), ("ivf", "task"), ("flat", "global")])
def test_mining_three_query_shards_equals_one(tmp_path, index, pool):
    from kalm.mining.mine import TEXTS_FILE, IndexConfig, MineSettings, merge, mine_shard, read_texts, write_pools

    recs, mine_tasks, emb = _mine_corpus(tmp_path)
    cfg = IndexConfig(index, nlist=4, nprobe=2)
    s = MineSettings(**{k: v for k, v in MINE_KW.items()})
    s.window = tuple(s.window)
    results = {}
    for parts in (1, 3):
        d = tmp_path / f"P{parts}"
        d.mkdir()
        inputs = []
        for j, part in enumerate(_split(recs, parts, seed=parts)):
            write_shard(d / f"in{j}.parquet", part)
            inputs.append(str(d / f"in{j}.parquet"))
        write_pools(inputs, emb, mine_tasks, str(d / "pools"), pool=pool, index=cfg, settings=s)
        out, stats = [], []
        for j, path in enumerate(inputs):
            st_ = mine_shard(
                path, emb, mine_tasks, str(d / "pools"), str(d / f"p{j}.parquet"), str(d / f"p{j}.json"), s, pool, cfg
            )
            assert st_.n_in == st_.kept + sum(st_.dropped.values())
            out += list(iter_shard(d / f"p{j}.parquet"))
            stats.append(str(d / f"p{j}.json"))
        merged = merge(stats, str(d / "m.json"))
        pool_files = sorted(p.name for p in (d / "pools").iterdir())
        results[parts] = (
            sorted(out, key=lambda r: r["id"]),
            merged,
            pool_files,
            {n: read_texts(d / "pools" / n / "shard0" / TEXTS_FILE).to_pylist() for n in pool_files},
        )
    (one, m1, pools1, texts1), (three, m3, pools3, texts3) = results[1], results[3]
    assert one == three and len(one) > 0
    assert pools1 == pools3 == (["global"] if pool == "global" else ["a", "b"]) and texts1 == texts3
    assert any(-1 in r.get("neg_ranks", []) for r in one)  # random pads: drawn per record too
    assert any(r.get("neg_ranks", [None])[0] == -2 for r in one)  # given negatives kept first
    for key, value in m1.items():
        if key not in ("seconds", "shards"):
            assert m3[key] == value, key
    assert m3["negative_number"] == 20 and m3["filter_topk"] == 10  # settings copied, not summed
    assert m3["in"] == len(recs) == m3["kept"] + sum(m3["dropped"].values())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pool_shards=st.integers(2, 7),
    pool=st.sampled_from(["task", "global"]),
    seed=st.integers(0, 3),
    sampling=st.sampled_from(["random", "top"]),
    index=st.sampled_from(["flat", "ivf"]),
    piece_bytes=st.sampled_from([1, 1500, 2**20]),
)
def test_mining_against_pool_shards_equals_one_pool(
    tmp_path_factory, pool_shards, pool, seed, sampling, index, piece_bytes
):
    """A pool split into S text ranges mines the same records as the whole pool: same candidates, ranks,
    scores, pads (global rows). flat: one exact index per shard, searched in turn, top k merged; ivf (an
    approximate search: 2 of 4 lists probed): one quantizer trained on the pool's bottom-k sample, the
    shards' lists merged on disk, so the same lists are scanned whatever S (with a quantizer per shard,
    as before, the candidates depend on S), and whatever the pieces the merged lists are cut into
    (``scan_mib``: one list a piece, about two, all in one; the whole pool in one piece for S = 1)."""
    from kalm.mining.mine import IndexConfig, mine, read_json

    tmp = tmp_path_factory.mktemp("poolshards")
    recs, mine_tasks, emb = _mine_corpus(tmp, seed=seed)
    write_shard(tmp / "in.parquet", recs)
    outs, stats = [], []
    for shards in (1, pool_shards):
        kw = {**MINE_KW, "sampling": sampling, "seed": seed, "pool": pool, "pool_shards": shards}
        scan_mib = piece_bytes / 2**20 if shards > 1 else 256
        kw["index"] = IndexConfig(index, nlist=4, nprobe=2, scan_mib=scan_mib, use_gpu=False)
        st_ = mine(
            str(tmp / "in.parquet"),
            emb,
            mine_tasks,
            str(tmp / f"o{shards}.parquet"),
            str(tmp / f"s{shards}.json"),
            **kw,
        )
        assert st_.n_in == st_.kept + sum(st_.dropped.values())
        outs.append(list(iter_shard(tmp / f"o{shards}.parquet")))
        stats.append({k: v for k, v in read_json(tmp / f"s{shards}.json").items() if k != "seconds"})
    assert outs[0] == outs[1] and len(outs[0]) > 0
    assert stats[0] == stats[1]
    assert any(-1 in r.get("neg_ranks", []) for r in outs[0])  # random pads: global rows across shards


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), max_size=30), piece=st.integers(1, 400))
def test_ivf_pieces_are_consecutive_list_ranges_within_the_size(sizes, piece):
    from kalm.mining.mine import list_pieces

    pieces = list_pieces(np.array(sizes, dtype=np.int64), 8, piece)
    assert [lo for lo, _ in pieces] == [0] + [hi for _, hi in pieces[:-1]] and pieces[-1][1] == len(sizes)
    for lo, hi in pieces:
        assert hi > lo or not sizes
        assert sum(sizes[lo:hi]) * 8 <= piece or np.count_nonzero(sizes[lo:hi]) == 1  # a larger list alone
    for (lo, hi), (nxt, _) in zip(pieces, pieces[1:]):
        assert (sum(sizes[lo:hi]) + sizes[nxt]) * 8 > piece  # a piece is cut only when the next list overflows it


def test_mine_ivf_writes_pieces_of_at_most_scan_mib(tmp_path):
    """The merged lists are cut into on-disk pieces of consecutive lists within ``scan_mib`` (a mine job maps
    one at a time); together they hold every passage of the pool once."""
    import faiss

    import kalm.mining.mine as km

    recs, mine_tasks, emb = _mine_corpus(tmp_path, n=200)
    write_shard(tmp_path / "in.parquet", recs)
    pools = str(tmp_path / "pools")
    cfg = km.IndexConfig("ivf", nlist=8, nprobe=3, scan_mib=2000 / 2**20, use_gpu=False)
    km.write_pools([str(tmp_path / "in.parquet")], emb, mine_tasks, pools, pool="task", only="a", index=cfg)
    meta = km.read_ivf_pieces(tmp_path / "pools" / "a" / km.IVF_DIR)
    assert len(meta["pieces"]) > 2 and meta["lists"] == 8
    ids = []
    for piece in meta["pieces"]:
        index = faiss.read_index(
            str(tmp_path / "pools" / "a" / km.IVF_DIR / piece["file"]), faiss.IO_FLAG_ONDISK_SAME_DIR
        )
        lo, hi = piece["lists"]
        assert index.nlist == hi - lo and index.ntotal == piece["passages"] > 0
        assert piece["passages"] * (16 * 4 + 8) <= 2000 or hi - lo == 1
        invlists = index.invlists
        for i in range(index.nlist):
            ids += faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).tolist()
    assert (
        sorted(ids) == list(range(meta["passages"]))
        and meta["passages"] == km.PoolShards(tmp_path / "pools" / "a", cfg, 10).size
    )


@pytest.mark.parametrize("dim", [16, 33, 300])
def test_ivf_candidates_are_rescored_from_the_pieces_as_from_the_pool_shards(tmp_path, dim):
    """The ivf search re-scores its candidates with their vectors read back from the merged pieces
    (rescore_entries: one pass over the mapped pieces) instead of one pread per candidate from the pool's
    shards: the same bits as exact_scores of the shards' vectors, so the same ranking, ties included
    (dims past numpy's unrolled and pairwise-sum blocks)."""
    import faiss

    import kalm.mining.mine as km

    recs, mine_tasks, emb = _mine_corpus(tmp_path, n=200, dim=dim)
    write_shard(tmp_path / "in.parquet", recs)
    pools = tmp_path / "pools"
    cfg = km.IndexConfig("ivf", nlist=8, nprobe=3, scan_mib=(dim * 4 + 8) * 30 / 2**20, use_gpu=False)
    km.write_pools([str(tmp_path / "in.parquet")], emb, mine_tasks, str(pools), pool="task", only="a", index=cfg)
    pool = km.PoolShards(pools / "a", cfg, 10)
    folder = pools / "a" / km.IVF_DIR
    meta = km.read_ivf_pieces(folder)
    assert len(meta["pieces"]) > 2
    rng = np.random.default_rng(dim)
    queries = pool.vectors(rng.choice(pool.size, 40)) + rng.normal(0, 0.1, (40, dim)).astype(np.float32)
    quantizer = faiss.read_index(str(folder / km.QUANTIZER_FILE))
    probers = km.ListProbers(faiss.extract_index_ivf(quantizer).quantizer.search(queries, 3)[1], 8)
    kk = 10 + km.RESCORE_EXTRA
    best = faiss.ResultHeap(40, kk, keep_max=True)
    for piece in meta["pieces"]:
        index = faiss.read_index(str(folder / piece["file"]), faiss.IO_FLAG_ONDISK_SAME_DIR)
        km.scan_lists(index.invlists, *piece["lists"], queries, probers, best)
    entries = best.I
    ids, got = km.rescore_entries(folder, meta["pieces"], queries, entries, block=7)
    rows = pool.global_rows(ids)
    assert ((entries >= 0) == (ids >= 0)).all() and (ids >= 0).sum() > 40 * 10
    want = np.where(
        rows >= 0,
        km.exact_scores(pool.vectors(np.maximum(rows, 0).ravel()).reshape(40, kk, dim), queries[:, None, :]),
        -np.inf,
    )
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(pool.search(queries, 10)[0], km.rescore(pool, queries, rows, 10)[0])


def test_pool_shards_are_consecutive_text_ranges_of_about_equal_size(tmp_path):
    from kalm.mining.mine import (
        TEXTS_FILE,
        IndexConfig,
        PoolShards,
        read_texts,
        shard_folder,
        write_pools,
        write_ranges,
    )

    recs, mine_tasks, emb = _mine_corpus(tmp_path)
    write_shard(tmp_path / "in.parquet", recs)
    write_ranges(str(tmp_path / "in.parquet"), mine_tasks, str(tmp_path / "p1"), 1, pool="global")
    write_pools(str(tmp_path / "in.parquet"), emb, mine_tasks, str(tmp_path / "p1"), pool="global")
    whole = read_texts(shard_folder(tmp_path / "p1" / "global", 0) / TEXTS_FILE, "text").to_pylist()
    write_ranges(str(tmp_path / "in.parquet"), mine_tasks, str(tmp_path / "p4"), 4, pool="global")
    for j in range(4):  # one job per shard, as the workflow runs them: from its range's file, not the records
        write_pools(None, emb, mine_tasks, str(tmp_path / "p4"), pool="global", shard=j)
    scattered = sum(
        pq.read_metadata(tmp_path / "p4" / "global" / "ranges" / f"r{j}.parquet").num_rows for j in range(4)
    )
    assert scattered == sum(len(r["pos"]) + len(r.get("neg", [])) for r in recs if r["task"] in mine_tasks)
    parts = [read_texts(shard_folder(tmp_path / "p4" / "global", j) / TEXTS_FILE, "text").to_pylist() for j in range(4)]
    assert sum(parts, []) == whole  # consecutive ranges of the sorted texts: global rows unchanged
    assert min(map(len, parts)) > 0.5 * len(whole) / 4  # balanced by the sample's quantiles
    pool = PoolShards(tmp_path / "p4" / "global", IndexConfig("flat", use_gpu=False), 60)
    one = PoolShards(tmp_path / "p1" / "global", IndexConfig("flat", use_gpu=False), 60)
    assert pool.size == one.size == len(whole) and np.array_equal(pool.keys, one.keys)
    rows = [0, len(whole) - 1, len(whole) // 2, 3]
    assert [pool.raw(x) for x in rows] == [one.raw(x) for x in rows]
    assert np.array_equal(pool.vectors(rows), one.vectors(rows))


def test_a_record_draws_the_same_negatives_wherever_it_is_in_its_shard(tmp_path):
    """The sampling RNG is seeded by (seed, record id), not by the record's place in the file."""
    from kalm.mining.mine import mine

    recs, mine_tasks, emb = _mine_corpus(tmp_path, seed=1)
    outs = []
    for k, order in enumerate([recs, list(reversed(recs))]):
        write_shard(tmp_path / f"in{k}.parquet", order)
        mine(
            str(tmp_path / f"in{k}.parquet"),
            emb,
            mine_tasks,
            str(tmp_path / f"o{k}.parquet"),
            str(tmp_path / f"s{k}.json"),
            **{**MINE_KW, "filter_topk": None},
        )
        outs.append(sorted(iter_shard(tmp_path / f"o{k}.parquet"), key=lambda r: r["id"]))
    assert outs[0] == outs[1]


# ---- the DAG: one job per input file, per partition; the evaluation index once ---------------------


def test_dry_run_has_one_job_per_input_file_and_partition(tmp_path):
    import yaml
    from test_workflow import ROOT, job_counts, snakemake

    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    folder = tmp_path / "retrieval_en"
    folder.mkdir()
    for i in range(3):
        _jsonl(folder / f"shard{i}.jsonl", [{"query": f"q{i}", "pos": ["p"]}])
    (tmp_path / "data").symlink_to(ROOT / "data")
    cfg["data"]["finetune"]["retrieval_en"]["path"] = str(folder)
    cfg["data"]["dedup"]["shards"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    res = snakemake(
        "work/data/finetune/mined.stats.json",
        "work/data/pretrain/decontaminated.stats.json",
        "work/data/finetune/contamination_report.json",
        "work/data/finetune/validated/retrieval_en.stats.json",
        "-n",
        "-p",
        "--forceall",
        "--configfile",
        str(tmp_path / "c.yaml"),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    counts = job_counts(res.stdout)
    n_files = {s: sum(3 if t == "retrieval_en" else 1 for t in cfg["data"][s]) for s in ("pretrain", "finetune")}
    mined_tasks = [t for t, spec in cfg["data"]["finetune"].items() if spec.get("mine", True)]
    assert counts["validate"] == n_files["pretrain"] + n_files["finetune"]
    assert counts["eval_index"] == 1
    assert counts["decontaminate"] == 2 * 3 and counts["decontaminate_gather"] == 2
    assert counts["mine"] == 3 and counts["mine_gather"] == 1 and counts["mine_ranges"] == len(mined_tasks)
    assert counts["mine_index"] == len(mined_tasks) * cfg["mine"].get("pool_shards", 1)
    assert counts["embed"] == cfg["embed"]["shards"] and counts["embed_texts"] == 3
    # shard ordinals: the place of each file in the stage, tasks sorted, then the folder's files in order
    cmds = [l for l in res.stdout.splitlines() if " validate --input " in l and "/finetune/" in l]
    ordinals = {re.search(r"--input (\S+)", c)[1]: int(re.search(r"--shard-ordinal (\d+)", c)[1]) for c in cmds}

    def source(t, i):  # a labelled task is validated from the KaLM records its labelled job writes
        if t == "retrieval_en":
            return str(folder / f"shard{i}.jsonl")
        if cfg["data"]["finetune"][t].get("format") == "labelled":
            return f"work/data/finetune/labelled/{t}.parquet"
        return cfg["data"]["finetune"][t]["path"]

    expected = [source(t, i) for t in sorted(cfg["data"]["finetune"]) for i in range(3 if t == "retrieval_en" else 1)]
    assert sorted(ordinals, key=ordinals.get) == expected and sorted(ordinals.values()) == list(range(len(expected)))
    # each mine job searches its own part against every pool
    mine_cmds = [l for l in res.stdout.splitlines() if " mine --step apply " in l]
    assert sorted(re.search(r"--input (\S+)", c)[1] for c in mine_cmds) == [
        f"work/data/finetune/decontaminated/p{j}.parquet" for j in range(3)
    ]


def test_a_mine_job_reads_only_the_row_groups_of_the_task_it_mines(tmp_path, monkeypatch):
    from kalm.mining.mine import iter_task_records, task_counts

    recs = [
        {"query": f"q{i}", "pos": ["p"], "task": t, "id": i} for i, t in enumerate(["a"] * 5 + ["b"] * 5 + ["c"] * 5)
    ]
    write_shard(tmp_path / "p.parquet", recs, row_group_rows=5)
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, **kw: read.append(g) or real(self, g, **kw))
    assert [r["id"] for r in iter_task_records(str(tmp_path / "p.parquet"), {"b"})] == list(range(5, 10))
    assert read == [1]  # the row groups of tasks a and c are skipped by their statistics
    assert task_counts(str(tmp_path / "p.parquet")) == {"a": 5, "b": 5, "c": 5}


def test_a_query_gets_the_same_candidates_and_score_bits_alone_or_in_a_batch(tmp_path):
    """FAISS / BLAS may sum in another order for another batch shape; the scores that decide (ranks,
    filter) are re-computed by kalm.mining.mine.exact_scores, so a query's result does not depend on its batch."""
    from kalm.mining.mine import IndexConfig, build_index, search_rescored

    rng = np.random.default_rng(0)
    base = rng.normal(size=(3000, 384)).astype(np.float16)
    base = (base / np.linalg.norm(base.astype(np.float32), axis=1, keepdims=True)).astype(np.float16)
    queries = (base[:300].astype(np.float32) + 0.01 * rng.normal(size=(300, 384))).astype(np.float16).astype(np.float32)

    class FakePool:
        size = len(base)

        def vectors(self, rows):
            return base[np.asarray(rows)].astype(np.float32)

    index = build_index(base, IndexConfig("flat", use_gpu=False), k=40)
    batch_ids, batch_scores = search_rescored(index, FakePool(), queries, 30)
    for i in range(0, 300, 37):
        ids, scores = search_rescored(index, FakePool(), queries[i : i + 1], 30)
        assert np.array_equal(ids[0], batch_ids[i]) and np.array_equal(scores[0], batch_scores[i])


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_an_empty_pool_still_has_its_shards_and_finds_nothing(tmp_path, index):
    """A pool without passages (a task with no records in this stage) and pool_shards 3: every shard job and
    the ivf merge still write their outputs, and a search finds no candidate."""
    from test_mine import fake_shards

    from kalm.mining.mine import IndexConfig, PoolShards, train_quantizer, write_ivf, write_pools, write_ranges

    emb, _ = fake_shards(tmp_path, ["a text", "another"], num_shards=1, dim=8, seed=0)
    cfg = IndexConfig(index, use_gpu=False)
    pools = str(tmp_path / "pools")
    write_ranges([], {"t": False}, pools, 3, pool="task", only="t", index=cfg)
    if index == "ivf":
        train_quantizer(pools, "t", emb, cfg)
    for j in range(3):  # one job per shard, as the workflow runs them
        write_pools(None, emb, {"t": False}, pools, pool="task", only="t", shard=j, index=cfg)
    if index == "ivf":
        write_ivf(pools, "t")
    pool = PoolShards(tmp_path / "pools" / "t", cfg, 10)
    ids, scores = pool.search(np.zeros((2, 8), np.float32), 5)
    assert pool.size == 0 and (ids == -1).all() and np.isneginf(scores).all()


def test_ivf_with_an_hnsw_quantizer_mines_the_same_records_whatever_the_pool_shards(tmp_path, monkeypatch):
    """From HNSW_QUANTIZER_LISTS lists on, the pool's centroids sit behind an HNSW graph (lowered here to 2):
    the quantizer job writes it once, every shard files into it, so 1 and 3 pool shards mine the same."""
    import faiss

    import kalm.mining.mine as km

    monkeypatch.setattr(km, "HNSW_QUANTIZER_LISTS", 2)
    recs, mine_tasks, emb = _mine_corpus(tmp_path, seed=1)
    write_shard(tmp_path / "in.parquet", recs)
    outs = []
    for shards in (1, 3):
        kw = {**MINE_KW, "pool_shards": shards, "index": km.IndexConfig("ivf", nlist=4, nprobe=2, use_gpu=False)}
        km.mine(
            str(tmp_path / "in.parquet"),
            emb,
            mine_tasks,
            str(tmp_path / f"o{shards}.parquet"),
            str(tmp_path / "s.json"),
            **kw,
        )
        outs.append(list(iter_shard(tmp_path / f"o{shards}.parquet")))
    assert outs[0] == outs[1] and len(outs[0]) > 0
    pools = tmp_path / "q"
    km.write_ranges(str(tmp_path / "in.parquet"), mine_tasks, str(pools), 2, only="a", index=km.IndexConfig("ivf"))
    km.train_quantizer(str(pools), "a", emb, km.IndexConfig("ivf", nlist=4))
    index = faiss.read_index(str(pools / "a" / km.QUANTIZER_FILE))  # kept alive: the quantizer is its member
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(index).quantizer), faiss.IndexHNSWFlat)


@pytest.mark.parametrize("lists_per_piece", [1, 3, 8])
def test_the_list_by_list_scan_finds_what_faiss_ivf_search_finds(tmp_path, lists_per_piece):
    """kalm.mining.mine.scan_lists over the pieces of an IVF (list-major, one product per list) against
    faiss's own IndexIVFFlat.search with the same lists probed: the same k best passages per query."""
    import faiss

    from kalm.mining.mine import ListProbers, scan_lists

    rng = np.random.default_rng(0)
    d, nlist, nprobe, k = 16, 8, 3, 10
    base = rng.normal(size=(2000, d)).astype(np.float32)
    queries = rng.normal(size=(300, d)).astype(np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(base)
    index.add_with_ids(base, np.arange(len(base), dtype=np.int64) * 7)  # ids that are not rows
    index.nprobe = nprobe
    want_scores, want_ids = index.search(queries, k)
    _, probes = index.quantizer.search(queries, nprobe)
    probers = ListProbers(probes, nlist)
    best = faiss.ResultHeap(len(queries), k, keep_max=True)
    for lo in range(0, nlist, lists_per_piece):
        hi = min(nlist, lo + lists_per_piece)
        piece = faiss.ArrayInvertedLists(hi - lo, index.code_size)
        for lst in range(lo, hi):
            n = index.invlists.list_size(lst)
            if n:
                piece.add_entries(lst - lo, n, index.invlists.get_ids(lst), index.invlists.get_codes(lst))
        scan_lists(piece, lo, hi, queries, probers, best)
    best.finalize()  # each query's best first
    scores, entries = best.D, best.I  # a candidate as list << 32 | place: its id read from that list
    list_ids = [faiss.rev_swig_ptr(index.invlists.get_ids(i), index.invlists.list_size(i)) for i in range(nlist)]
    ids = np.array([list_ids[e >> 32][e & 0xFFFFFFFF] for e in entries.ravel().tolist()]).reshape(entries.shape)
    assert np.array_equal(np.sort(ids, axis=1), np.sort(want_ids, axis=1))
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_a_pool_beyond_its_sample_gets_its_lists_trained_cell_by_cell(tmp_path, monkeypatch):
    """A pool with more distinct passages than its bottom-k sample can train (MIN_POINTS_PER_LIST points a
    list) still gets distinct passages / list_size lists (was: the sample's cap, 300 // 39 = 7 lists here,
    so lists 50x longer than list_size and a query scanning as much more): the lists are trained cell by cell
    on the pool's passages read from its range files, hold about list_size passages, and a query probing
    nprobe of them finds its neighbours as with centroids trained on every passage at once."""
    import faiss

    import kalm.mining.mine as km
    from kalm.mining.embed import texts_to_embed, write_embedding_shard

    monkeypatch.setattr(km, "TRAIN_SAMPLE", 300)
    n, d, list_size = 3000, 16, 8
    recs = [{"query": f"q{i}", "pos": [f"passage {i}"], "task": "a", "id": record_id(0, i)} for i in range(n)]
    write_shard(tmp_path / "in.parquet", recs)
    texts = texts_to_embed(recs, {"a": False})
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(60, d))
    vecs = centres[rng.integers(0, 60, len(texts))] + 0.5 * rng.normal(size=(len(texts), d))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float16)
    emb = [str(write_embedding_shard(tmp_path / f"shard{s}.npy", texts[s::2], vecs[s::2])) for s in range(2)]
    cfg = km.IndexConfig("ivf", list_size=list_size, use_gpu=False)
    pools = tmp_path / "pools"
    km.write_ranges(str(tmp_path / "in.parquet"), {"a": False}, str(pools), 1, only="a", index=cfg)
    meta = km.read_json(pools / "a" / km.RANGES_FILE)
    assert abs(meta["distinct_passages"] / n - 1) < 0.15  # a KMV estimate on 300 digests
    sample = km.train_sample(pools / "a", km.ShardedEmbeddings(emb))
    assert sample.shape == (300, d) and sample.dtype == np.float16  # as stored: no float32 copy of the sample
    lists = km.train_quantizer(str(pools), "a", emb, cfg)
    assert lists == round(meta["distinct_passages"] / list_size)
    index = faiss.read_index(str(pools / "a" / km.QUANTIZER_FILE))
    quantizer = faiss.extract_index_ivf(index).quantizer
    passages = np.asarray(vecs[[texts.index(f"passage {i}") for i in range(n)]], dtype=np.float32)
    sizes = np.bincount(quantizer.search(passages, 1)[1][:, 0], minlength=quantizer.ntotal)
    assert sizes.max() <= 6 * list_size and (sizes > 0).mean() > 0.9, np.sort(sizes)[-10:]
    truth = faiss.IndexFlatIP(d)
    truth.add(passages)
    queries = passages[:300] + 0.1 * rng.normal(size=(300, d)).astype(np.float32)
    want = truth.search(queries, 10)[1]

    def recall(centroids):
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, len(centroids), faiss.METRIC_INNER_PRODUCT)
        ivf.quantizer.add(centroids)
        ivf.is_trained = True
        ivf.add(passages)
        ivf.nprobe = 8
        got = ivf.search(queries, 10)[1]
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])

    two_level = recall(quantizer.reconstruct_n(0, quantizer.ntotal))
    at_once = recall(km.kmeans(passages, lists))
    assert two_level >= at_once - 0.05, (two_level, at_once)


@settings(max_examples=100, deadline=None)
@given(
    blocks=st.lists(st.lists(st.integers(0, 2**64 - 1), max_size=60), max_size=8),
    k=st.integers(1, 40),
    block=st.integers(1, 16),
)
def test_digest_sketch_keeps_the_k_smallest_distinct_digests(blocks, k, block):
    """DigestSketch, fed one digest at a time and a block at a time, against sorting everything."""
    from kalm.mining.mine import DigestSketch

    one, many = DigestSketch(k, block=block), DigestSketch(k, block=block)
    for digests in blocks:
        for d in digests:
            one.add(d)
        many.add_many(np.array(digests, dtype=np.uint64))
    everything = np.unique(np.array([d for b in blocks for d in b], dtype=np.uint64))
    want = everything[:k]
    for sketch in (one, many):
        np.testing.assert_array_equal(sketch.digests(), want)
        exact = len(everything) < k
        assert sketch.distinct() == (len(everything) if exact else round((k - 1) * 2**64 / (int(want[-1]) + 1)))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 3000), k=st.integers(1, 40), d=st.sampled_from([4, 16, 33]), seed=st.integers(0, 2**16))
def test_kmeans_on_float16_points_gives_the_centroids_of_their_float32_copy(n, k, d, seed):
    """The quantizer trains on its sample as stored (float16, faiss decoding block by block) instead of a
    float32 copy of it: the same centroids, bit for bit, subsampling (n > 256 k) included."""
    from kalm.mining.mine import kmeans

    k = min(k, n)
    points = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float16)
    np.testing.assert_array_equal(kmeans(points, k), kmeans(points.astype(np.float32), k))


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 500), min_size=1, max_size=30), nlist=st.integers(1, 2000))
def test_lists_are_shared_among_cells_in_proportion(counts, nlist):
    from kalm.mining.mine import share_lists

    lists = share_lists(np.array(counts), nlist)
    counts = np.array(counts)
    total, target = counts.sum(), min(nlist, counts.sum())
    assert (lists <= counts).all() and (lists[counts > 0] >= 1).all() and (lists[counts == 0] == 0).all()
    assert target <= lists.sum() <= target + (counts > 0).sum()
    if total:  # no cell more than one list (or its forced one) away from its share
        assert (np.abs(lists - counts * target / total) <= 1 + (counts > 0)).all()
