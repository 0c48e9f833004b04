"""kalm.data.containment: evaluation texts found whole inside longer training texts, and the
decontaminate step that drops them (``contains_eval``)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.data.containment import ContainmentIndex, _codes, window_hashes
from kalm.data.decontaminate import decontaminate
from kalm.io import read_json, read_jsonl

# a small alphabet (Latin, CJK, an astral-plane emoji, a lone surrogate as JSON allows) so that
# texts contain each other often
TEXT = st.text(alphabet="ab 桥河😀\ud800", min_size=0, max_size=30)


def brute_force(eval_texts, texts, min_chars):
    return [
        sorted(e for e, ev in enumerate(eval_texts) if len(ev) >= min_chars and len(t) > len(ev) and ev in t)
        for t in texts
    ]


@settings(max_examples=300, deadline=None)
@given(eval_texts=st.lists(TEXT, max_size=8), texts=st.lists(TEXT, max_size=8), min_chars=st.integers(1, 6))
def test_matches_equal_a_brute_force_substring_search(eval_texts, texts, min_chars):
    index = ContainmentIndex(eval_texts, ["task"] * len(eval_texts), min_chars)
    got = [sorted(hits) for hits in index.query(texts)]
    assert got == brute_force(eval_texts, texts, min_chars)


@given(st.text(min_size=4, max_size=40), st.text(max_size=20), st.integers(1, 4))
def test_a_window_hash_does_not_depend_on_its_position(window, prefix, width):
    """The rolling hash of a window equals the hash of the window on its own: what makes an
    anchor (an eval text's first characters) findable anywhere in a training text."""
    whole = window_hashes(_codes([prefix + window]), width)
    alone = window_hashes(_codes([window]), width)
    assert (whole[len(prefix) :] == alone).all()


def test_decontamination_drops_a_training_text_that_contains_an_eval_passage(tmp_path):
    """The eval passage pasted into a much longer training document: Jaccard is far below the near
    threshold, so only the containment check catches it; a short eval query inside a training text
    (under contain_min_chars) is not a reason to drop."""
    passage = (
        "The old stone bridge of Belmora was built in 1620 by the guild of masons and still carries "
        "the market road across the river every morning."
    )
    ev = tmp_path / "EvalRetrieval"
    ev.mkdir()
    (ev / "queries.jsonl").write_text('{"id": "q1", "text": "Where is the old bridge?"}\n', encoding="utf-8")
    (ev / "corpus.jsonl").write_text(json.dumps({"id": "d1", "text": passage}) + "\n", encoding="utf-8")
    filler = " ".join(f"Paragraph {i} of the town chronicle tells of harvests, fairs and floods." for i in range(12))
    recs = [
        {
            "query": "history of the town",
            "pos": [filler + " " + passage.upper() + " " + filler],
        },  # contains it (case differs)
        {
            "query": "tell me: where is the old bridge? and the mill?",
            "pos": ["the mill stands by the weir"],
        },  # short eval text
        {"query": "clean", "pos": [filler]},
    ]
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({**r, "task": "train"}) + "\n" for r in recs), encoding="utf-8")
    out, stats_path, report_path = tmp_path / "o.jsonl", tmp_path / "s.json", tmp_path / "r.json"
    stats = decontaminate(
        str(src),
        {"EvalRetrieval": str(ev)},
        str(out),
        str(stats_path),
        str(report_path),
        near=True,
        threshold=0.8,
        contain_min_chars=50,
    )
    assert [r["query"] for r in read_jsonl(out)] == [recs[1]["query"], "clean"]
    assert stats.dropped == {"contains_eval": 1} and stats.kept + sum(stats.dropped.values()) == len(recs)
    report = read_json(report_path)["EvalRetrieval"]
    assert (
        report["overlapping_records"],
        report["exact_records"],
        report["near_records"],
        report["contained_records"],
    ) == (1, 0, 0, 1)
    assert report["examples"][0]["contains"] == [{"field": "pos[0]", "eval_text": passage.casefold()}]
    assert read_json(stats_path)["contain_min_chars"] == 50
    # off (the default): the record stays, as before
    stats = decontaminate(str(src), {"EvalRetrieval": str(ev)}, str(out), str(stats_path), str(report_path), near=True)
    assert stats.dropped == {} and stats.kept == len(recs)
