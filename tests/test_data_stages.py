"""Validation, exact dedup and decontamination: errors name file/line/field, counts add up."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.data.decontaminate import decontaminate
from kalm.data.dedup import dedup_local
from kalm.data.validate import ValidationError, validate_file
from kalm.io import read_json, read_jsonl
from kalm.text import normalize_text, record_hash


def write_lines(path, lines):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


@pytest.mark.parametrize(
    "line, field, reason",
    [
        ('{"pos": ["a"]}', "query", "missing"),
        ('{"query": "q"}', "pos", "missing"),
        ('{"query": "q", "pos": "a"}', "pos", "list of strings"),
        ('{"query": "q", "pos": ["a", 3]}', "pos[1]", "expected a string"),
        ('{"query": "   ", "pos": ["a"]}', "query", "empty text"),
        ('{"query": "q", "pos": []}', "pos", "empty list"),
        ('{"query": "q", "pos": ["a"], "neg": [""]}', "neg[0]", "empty text"),
        ('{"query": "q", "pos": ["a"]', "<line>", "not JSON"),
        ('["q", "a"]', "<line>", "JSON object"),
        (b'{"query": "\xff", "pos": ["a"]}', "<line>", "invalid UTF-8"),
        ('{"query": "q", "pos": ["a \\ud800 b"]}', "pos[0]", "lone surrogate U+D800 at character 2"),
    ],
)
def test_bad_record_stops_with_file_line_and_field(tmp_path, line, field, reason):
    src = write_lines(tmp_path / "t.jsonl", ['{"query": "ok", "pos": ["fine"]}', line])
    with pytest.raises(ValidationError) as err:
        validate_file(str(src), "t", str(tmp_path / "o.jsonl"), str(tmp_path / "s.json"))
    assert (err.value.path, err.value.line, err.value.field) == (str(src), 2, field)
    assert reason in str(err.value) and f"{src}:2" in str(err.value)
    assert not (tmp_path / "o.jsonl").exists(), "a failed run must not leave a finished-looking output"


def test_quarantine_keeps_good_records_and_counts_rejects(tmp_path):
    src = write_lines(
        tmp_path / "t.jsonl",
        [
            '{"query": "Ｑｕｅｒｙ  one", "pos": ["a\\tb"]}',
            '{"pos": ["x"]}',
            "",
            "not json",
            '{"query": "q2", "pos": ["p"], "neg": ["n"]}',
        ],
    )
    validate_file(
        str(src),
        "t",
        str(tmp_path / "o.jsonl"),
        str(tmp_path / "s.json"),
        on_error="quarantine",
        rejects_path=str(tmp_path / "r.jsonl"),
        instruction="Find it",
    )
    kept = list(read_jsonl(tmp_path / "o.jsonl"))
    assert [r["query"] for r in kept] == ["Query one", "q2"]  # NFKC + whitespace folding
    assert kept[0]["pos"] == ["a b"] and kept[0]["task"] == "t" and kept[0]["instruction"] == "Find it"
    rejects = list(read_jsonl(tmp_path / "r.jsonl"))
    assert [(r["line"], r["field"]) for r in rejects] == [(2, "query"), (4, "<line>")]
    s = read_json(tmp_path / "s.json")
    assert s["in"] == 4 and s["kept"] == 2 and sum(s["dropped"].values()) == 2


# any JSON value (NaN too, which Python's json reads), text with lone surrogates (JSON escapes allow them)
# (a string alphabet: Hypothesis leaves surrogates out of strategy-made characters)
some_text = st.text("a 中Ａ\t\ud800\udfff", min_size=1, max_size=8) | st.text(min_size=1, max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | some_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
record_like = st.fixed_dictionaries(  # mostly well-formed, so that both outcomes are common
    {"query": some_text | json_values, "pos": st.lists(some_text, min_size=1, max_size=3) | json_values},
    optional={"neg": st.lists(some_text, max_size=2) | json_values, "instruction": some_text | json_values},
)
lines = st.lists(
    st.one_of(record_like.map(json.dumps), json_values.map(json.dumps), st.binary(max_size=12)), max_size=12
)


@settings(max_examples=150, deadline=None)
@given(raw_lines=lines)
def test_quarantine_never_crashes_and_accounts_for_every_line(tmp_path_factory, raw_lines):
    """Whatever a line holds (any JSON value, any Unicode, stray bytes), quarantine mode either keeps
    it as a valid record or rejects it with file, line and field: in = kept + rejects, nothing raises,
    and the kept records validate again unchanged (normalisation is idempotent)."""
    d = tmp_path_factory.mktemp("fuzz")
    src = write_lines(d / "t.jsonl", [l.replace(b"\n", b" ") if isinstance(l, bytes) else l for l in raw_lines])
    stats = validate_file(
        str(src), "t", str(d / "o.jsonl"), str(d / "s.json"), on_error="quarantine", rejects_path=str(d / "r.jsonl")
    )
    kept, rejects = list(read_jsonl(d / "o.jsonl")), list(read_jsonl(d / "r.jsonl"))
    assert stats.n_in == stats.kept + len(rejects) == stats.kept + sum(stats.dropped.values())
    assert len(kept) == stats.kept and all(r["file"] == str(src) and r["field"] and r["reason"] for r in rejects)
    again = validate_file(str(d / "o.jsonl"), "t", str(d / "o2.jsonl"), str(d / "s2.json"))
    assert list(read_jsonl(d / "o2.jsonl")) == kept and again.kept == len(kept)


texts = st.text(alphabet=st.sampled_from(list("ab 中文Ａ\t")), min_size=1, max_size=6).filter(
    lambda t: normalize_text(t)
)
records = st.lists(st.tuples(texts, st.lists(texts, min_size=1, max_size=2)), max_size=30)


def _write_records(path, recs, task="t"):
    path.write_text(
        "".join(json.dumps({"query": q, "pos": p, "task": task}, ensure_ascii=False) + "\n" for q, p in recs),
        encoding="utf-8",
    )
    return str(path)


@settings(max_examples=40, deadline=None)
@given(recs=records, partitions=st.integers(1, 4))
def test_dedup_invariants(tmp_path_factory, recs, partitions):
    d = tmp_path_factory.mktemp("dedup")
    src = _write_records(d / "in.jsonl", recs)
    stats = dedup_local([src], str(d / "out.jsonl"), str(d / "s.json"), partitions=partitions)
    out = list(read_jsonl(d / "out.jsonl"))
    keys = [record_hash(r["query"], r["pos"]) for r in out]
    # exactly one record per duplicate group, the first seen, in input order, and counts add up
    assert len(keys) == len(set(keys)) == len({record_hash(q, p) for q, p in recs})
    first = {}
    for i, (q, p) in enumerate(recs):
        first.setdefault(record_hash(q, p), i)
    assert [r["id"] for r in out] == sorted(first.values())
    assert stats["in"] == len(recs) == stats["kept"] + stats["dropped"].get("exact_duplicate", 0)
    assert stats["partitions"] == partitions and stats["method"] == "exact"
    # a record without duplicates is never dropped
    from collections import Counter

    counts = Counter(record_hash(q, p) for q, p in recs)
    assert all(k in set(keys) for k, c in counts.items() if c == 1)
    # idempotent (and the same whatever the partitions)
    dedup_local([str(d / "out.jsonl")], str(d / "out2.jsonl"), str(d / "s2.json"), partitions=1 + partitions % 3)
    assert list(read_jsonl(d / "out2.jsonl")) == out


def test_dedup_spans_files_and_normalises(tmp_path):
    a = _write_records(tmp_path / "a.jsonl", [("Hello  World", ["x"]), ("other", ["y"])], task="a")
    b = _write_records(tmp_path / "b.jsonl", [("hello world", ["X"]), ("Ｈｅｌｌｏ World", ["x "])], task="b")
    stats = dedup_local([a, b], str(tmp_path / "o.jsonl"), str(tmp_path / "s.json"), partitions=2)
    assert stats["kept"] == 2 and stats["per_task"]["b"]["dropped"] == {"exact_duplicate": 2}
    assert [r["query"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["Hello  World", "other"]


def test_decontamination_drops_planted_eval_copies(tmp_path):
    task = tmp_path / "EvalRetrieval"
    task.mkdir()
    (task / "queries.jsonl").write_text('{"id": "q1", "text": "Where is the old bridge?"}\n', encoding="utf-8")
    (task / "corpus.jsonl").write_text('{"id": "d1", "text": "The bridge is in Belmora."}\n', encoding="utf-8")
    sts = tmp_path / "EvalSTS"
    sts.mkdir()
    (sts / "test.jsonl").write_text(
        '{"sentence1": "A cat sleeps.", "sentence2": "A dog runs.", "score": 1}\n', encoding="utf-8"
    )
    src = _write_records(
        tmp_path / "train.jsonl",
        [
            ("where is the  old bridge?", ["unrelated"]),  # copy of an eval query (normalised)
            ("clean query", ["The bridge is in Belmora."]),  # eval passage as a positive
            ("a cat sleeps.", ["x"]),  # STS sentence
            ("clean", ["clean passage"]),
        ],
    )
    stats = decontaminate(
        src,
        {"EvalRetrieval": str(task), "EvalSTS": str(sts)},
        str(tmp_path / "o.jsonl"),
        str(tmp_path / "s.json"),
        str(tmp_path / "r.json"),
    )
    assert [r["query"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["clean"]
    assert stats.dropped == {"overlaps_eval": 3}
    report = read_json(tmp_path / "r.json")
    assert report["EvalRetrieval"]["overlapping_records"] == 2 and report["EvalSTS"]["overlapping_records"] == 1
    assert report["EvalRetrieval"]["examples"][1]["fields"] == ["pos[0]"]
