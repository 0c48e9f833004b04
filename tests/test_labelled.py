"""Example-based multi-class data (issue 19, part 2): labelled {text, label} records -> KaLM records with a
same-class text as the positive and other classes' texts as negatives (kalm.data.labelled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.data.labelled import LabelledConfig, build_records, convert, draw
from kalm.data.validate import ValidationError
from kalm.io import StageStats
from kalm.text import dedup_key

ROOT = Path(__file__).resolve().parents[1]

labelled_sets = st.lists(
    st.tuples(
        st.sampled_from(["tower", "river", "Tower ", "market", "bridge", "hill", "塔", "河流", "a", "b", "c", "d"]),
        st.sampled_from(["geo", "econ", "history", "food"]),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(labelled_sets, st.integers(1, 5), st.integers(0, 3))
def test_positives_share_the_class_negatives_do_not_and_counts_add_up(items, negatives, seed):
    cfg = LabelledConfig(negatives=negatives, seed=seed)
    classes_of = {}
    for text, label in items:
        classes_of.setdefault(dedup_key(text), set()).add(label)
    stats = StageStats("labelled")
    for i, rec in draw(items, cfg, stats):
        label = items[i][1]
        assert rec["query"] == items[i][0]
        q, (p,) = dedup_key(rec["query"]), rec["pos"]
        assert dedup_key(p) != q  # no positive shares a text with its query
        assert label in classes_of[dedup_key(p)]  # the positive is a text of the query's class
        keys = [dedup_key(n) for n in rec["neg"]]
        assert len(set(keys)) == len(keys) <= negatives and q not in keys and dedup_key(p) not in keys
        assert all(label not in classes_of[k] for k in keys)  # every negative comes from another class
    assert stats.n_in == len(items) == stats.kept + sum(stats.dropped.values())
    records, s = build_records(items, cfg)
    assert sum(c["in"] for c in s.extra["classes"].values()) == len(items)
    assert sum(c["kept"] for c in s.extra["classes"].values()) == s.kept == len(records) == stats.kept
    assert build_records(items, cfg)[0] == records  # seeded: the same input gives the same records


def test_singletons_and_a_single_class_are_dropped_by_reason():
    items = [("only one", "a"), ("x1", "b"), ("x2", "b")]
    records, stats = build_records(items, LabelledConfig(negatives=2))
    assert stats.dropped == {"singleton_class": 1}
    assert [r["query"] for r in records] == ["x1", "x2"] and all(r["neg"] == ["only one"] for r in records)
    _, one = build_records([("x1", "b"), ("x2", "b")], LabelledConfig())
    assert one.dropped == {"no_other_class": 2}


def test_a_record_without_a_label_is_an_error_naming_file_line_and_field(tmp_path):
    f = tmp_path / "cls.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(ValidationError, match=r"cls.jsonl:2: field 'label'"):
        convert([str(f)], str(tmp_path / "o.parquet"), None, LabelledConfig())
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.slow
def test_the_dag_turns_a_labelled_task_into_records_that_validate(tmp_path):
    """The demo's classification task cls_en (labelled {text, label} records, format: labelled), its first 80
    records: rule labelled, then validate."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    spec = cfg["data"]["finetune"]["cls_en"]
    assert spec["format"] == "labelled"
    src = [json.loads(line) for line in (ROOT / spec["path"]).read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"text", "label"} for r in src)
    labelled = tmp_path / "cls_en_labelled.jsonl"
    labelled.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in src[:80]), encoding="utf-8")
    for stage in ("pretrain", "finetune"):
        for task in cfg["data"][stage].values():
            task["path"] = str(ROOT / task["path"])
    spec.update(path=str(labelled), labelled={"negatives": 3})
    for task in cfg["eval"]["tasks"].values():
        task["path"] = str(ROOT / task["path"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    env = {**os.environ, "SNAKEMAKE_PROFILE": str(ROOT / "profiles/local"), "HF_HUB_OFFLINE": "1"}
    target = "work/data/finetune/validated/cls_en/part0.parquet"
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        target,
        "-s",
        str(ROOT / "workflow/Snakefile"),
        f"--configfile={tmp_path / 'c.yaml'}",
    ]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads((tmp_path / "work/data/finetune/labelled/cls_en.stats.json").read_text())
    assert stats["in"] == 80 and stats["kept"] + sum(stats["dropped"].values()) == 80 and stats["negatives"] == 3
    label = {dedup_key(r["text"]): r["label"] for r in src[:80]}  # validate normalises the texts
    rows = pq.read_table(tmp_path / target).to_pylist()
    assert len(rows) == json.loads((tmp_path / target.replace(".parquet", ".stats.json")).read_text())["kept"] > 60
    for r in rows:
        q, p = dedup_key(r["query"]), dedup_key(r["pos"][0])
        assert label[p] == label[q] and p != q
        assert len(r["neg"]) == 3 and all(label[dedup_key(n)] != label[q] for n in r["neg"])
