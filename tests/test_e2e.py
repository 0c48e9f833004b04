"""End to end: the real DAG on a tiny config (tiny bidirectional Qwen2, a slice of the demo corpus).

The run itself is the session fixture `tiny_run` (tests/conftest.py; tests/test_slurm.py compares a
SLURM run with it): `snakemake results/mteb_zh.json results/mteb_en.json` bare, as a user would after
`source .venv/bin/activate` (SNAKEMAKE_PROFILE points at profiles/local), in a scratch working
directory. These tests check the contract of every stage's output.
"""

import json
from pathlib import Path

import pytest


def read(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_aggregate_follows_the_contract(tiny_run, lang):
    work, cfg = tiny_run
    agg = read(work / f"results/mteb_{lang}.json")
    tasks = cfg["eval"]["languages"][lang]
    assert set(agg["tasks"]) == set(tasks)
    for name, entry in agg["tasks"].items():
        assert entry["type"] == cfg["eval"]["tasks"][name]["type"]
        assert entry["metric"] in ("ndcg_at_10", "cosine_spearman") and -1 <= entry["main_score"] <= 1
        raw = read(work / f"results/mteb/{lang}/{name}.json")  # mteb's own result file stays beside it
        assert raw["task_name"] == name
    by_type = {}
    for entry in agg["tasks"].values():
        by_type.setdefault(entry["type"], []).append(entry["main_score"])
    assert agg["by_type"] == pytest.approx({t: sum(v) / len(v) for t, v in by_type.items()})
    assert agg["mean_task"] == pytest.approx(sum(e["main_score"] for e in agg["tasks"].values()) / len(tasks))
    assert agg["mean_type"] == pytest.approx(sum(agg["by_type"].values()) / len(agg["by_type"]))
    assert agg["mteb_version"] and agg["model"]
    base = read(work / f"results/baseline/mteb_{lang}.json")
    assert agg["baseline"]["mean_task"] == pytest.approx(base["mean_task"])
    assert agg["gain"]["mean_task"] == pytest.approx(agg["mean_task"] - base["mean_task"])


def test_funnel_counts_add_up_and_catch_planted_problems(tiny_run):
    work, _ = tiny_run
    dedup = read(work / "work/data/finetune/dedup.stats.json")
    decon = read(work / "work/data/finetune/decontaminated.stats.json")
    mined = read(work / "work/data/finetune/mined.stats.json")
    for stats in (dedup, decon, mined):
        assert stats["in"] == stats["kept"] + sum(stats["dropped"].values())
    assert dedup["per_task"]["retrieval_en"]["dropped"].get("exact_duplicate", 0) >= 1
    assert decon["per_task"]["retrieval_en"]["dropped"] == {"overlaps_eval": 1}
    assert decon["kept"] == mined["in"]
    assert read(work / "work/data/finetune/contamination_report.json")["DemoRetrievalEn"]["overlapping_records"] >= 1


def test_souped_model_is_a_bidirectional_sentence_transformer(tiny_run):
    from sentence_transformers import SentenceTransformer

    from kalm.models.modeling import attention_is_bidirectional, is_bidirectional

    work, _ = tiny_run
    model = SentenceTransformer(str(work / "models/soup"))
    assert is_bidirectional(model) and attention_is_bidirectional(model)
    for run in (0, 1):
        metrics = [
            json.loads(line) for line in (work / f"models/finetune/run{run}.metrics.jsonl").read_text().splitlines()
        ]
        assert len(metrics) == 4 and all(m["passages"] > m["batch"] for m in metrics)  # hard negatives used
