"""scripts/compare_plain.py (issue 14: the recipe against sentence-transformers' plain recipe on CSL).

Needs ../shared/data/csl/ts (skipped without it). The split, the config with --set and the DAG it
makes are checked in seconds; the run of both sides at a tiny size (2.5 to 5 minutes on 2 shared
cores: every pipeline job imports torch) is opt-in, KALM_REAL_DATA=1, like tests/test_real_data.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_workflow import job_counts

from kalm.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SCRIPT = ROOT / "scripts" / "compare_plain.py"

pytestmark = pytest.mark.skipif(not (SHARED / "csl" / "ts" / "dev.tsv").is_file(), reason="needs ../shared/data/csl/ts")


@pytest.fixture(scope="module")
def cp():
    from conftest import import_script

    return import_script("compare_plain")


def test_the_split_holds_out_half_the_papers_and_never_trains_on_them(cp, tmp_path):
    split = cp.write_split(SHARED, tmp_path, 0.5, None)
    assert split["papers"] == 1000 and split["train"] + split["held_out"] == 1000
    assert 430 <= split["held_out"] <= 570  # ~500 each side
    train = list(read_jsonl(tmp_path / "data/csl_title_abstract.jsonl"))
    queries = [r["text"] for r in read_jsonl(tmp_path / "eval/CSLTitleAbstract/queries.jsonl")]
    corpus = [r["text"] for r in read_jsonl(tmp_path / "eval/CSLTitleAbstract/corpus.jsonl")]
    assert len(train) == split["train"] and len(queries) == len(corpus) == split["held_out"]
    assert not {r["query"] for r in train} & set(queries)
    # the same split as scripts/prepare_real_data.py's at the same share (same hash of the title)
    again = cp.write_split(SHARED, tmp_path / "again", 0.5, None)
    assert again["fingerprint"] == split["fingerprint"]
    small = cp.write_split(SHARED, tmp_path / "small", 0.5, 80)
    assert small["papers"] == 80 and small["fingerprint"] != split["fingerprint"]


def test_set_overrides_the_recipe_and_bad_keys_are_refused_before_anything_runs(cp, tmp_path):
    split = cp.write_split(SHARED, tmp_path, 0.5, 80)
    overrides = cp.parse_set(
        ["finetune.lr=5e-5", "mine.filter_topk=0", "mine.range_for_sampling=[10, 60]", "mine.margin_ratio=null"]
    )
    cfg = cp.ours_config(ROOT / "config/csl_compare.yaml", overrides, split)
    assert cfg["finetune"]["lr"] == 5e-5 and cfg["mine"]["filter_topk"] == 0
    assert cfg["mine"]["range_for_sampling"] == [10, 60] and cfg["mine"]["margin_ratio"] is None
    assert list(cfg["data"]["finetune"]) == ["csl_title_abstract"]  # CSL only, no STS-B
    assert cfg["eval"]["languages"] == {"zh": ["CSLTitleAbstract"]}
    assert cfg["max_seq_length"] == 256 and cfg["finetune"]["runs"] == 1 and cfg["finetune"]["max_steps"] == 44
    with pytest.raises(SystemExit, match="finetune"):
        cp.ours_config(ROOT / "config/csl_compare.yaml", cp.parse_set(["finetune.learning_rate=5e-5"]), split)
    with pytest.raises(SystemExit, match="key.path=value"):
        cp.parse_set(["finetune.lr"])


def test_ours_config_is_a_dag_of_one_run_and_two_evaluations(cp, tmp_path):
    import yaml

    split = cp.write_split(SHARED, tmp_path, 0.5, 80)
    cfg = cp.ours_config(ROOT / "config/csl_compare.yaml", [], split)
    folder = tmp_path / "ours"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    env = {**os.environ, **cp.OFFLINE_ENV, "SNAKEMAKE_PROFILE": str(ROOT / "profiles/local")}
    res = subprocess.run(
        [
            *cp.snakemake_cmd(),
            "results/mteb_zh.json",
            "results/baseline/mteb_zh.json",
            "-n",
            "-s",
            str(ROOT / "workflow/Snakefile"),
            "--directory",
            str(folder),
            "--configfile",
            str(folder / "config.yaml"),
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = job_counts(res.stdout)
    assert jobs["finetune"] == 1 and jobs["soup"] == 1 and jobs["evaluate"] == 2 and "pretrain" not in jobs


@pytest.mark.skipif(os.environ.get("KALM_REAL_DATA") != "1", reason="opt-in: KALM_REAL_DATA=1 (2.5-5 min on 2 cores)")
def test_a_tiny_comparison_runs_both_sides_and_reports_them(tmp_path):
    work = tmp_path / "cmp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--work",
            str(work),
            "--max-papers",
            "80",
            "--set",
            "finetune.max_steps=2",
            "--set",
            "max_seq_length=128",
            "--plain-epochs",
            "3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    rows = [json.loads(line) for line in (work / "comparison.jsonl").read_text(encoding="utf-8").splitlines()]
    by = {(r["side"], bool(r["instruction"])): r for r in rows}
    assert set(by) == {("base", True), ("base", False), ("ours", True), ("plain", False)}
    for r in rows:
        assert r["metric"] == "ndcg_at_10" and 0 <= r["ndcg_at_10"] <= 1
    ours, plain = by[("ours", True)], by[("plain", False)]
    assert ours["train_wall_s"] > 0 and plain["train_wall_s"] > 0
    assert ours["texts_encoded_detail"]["steps"] == [2] and plain["steps_x_batch"].startswith("3x")
    funnel = json.loads((work / "details.json").read_text(encoding="utf-8"))["ours"]["funnel"]
    assert list(funnel) == ["validate", "dedup", "decontaminate", "mine", "finetune_runs"]  # every stage's gather
    assert funnel["validate"]["in"] == funnel["validate"]["kept"] + sum(funnel["validate"]["dropped"].values())
    assert plain["texts_encoded"] == 2 * plain["train_queries"]  # anchors and positives, no negatives
    # compute: 3 passes (forward + backward) per training token, 1 per mining token
    detail = ours["texts_encoded_detail"]
    assert ours["token_passes"] == 3 * detail["train_tokens"] + detail["embed_tokens"] > 0
    assert plain["token_passes"] % 3 == 0 and plain["token_passes"] > 3 * plain["texts_encoded"]
    # plain trained (after a warm-up step at lr 0), and was scored without instruction like the base row
    assert plain["ndcg_at_10"] != by[("base", False)]["ndcg_at_10"]
    assert "| ours | task's |" in res.stdout and "| plain | none |" in res.stdout
    assert (work / "comparison.md").read_text(encoding="utf-8") in res.stdout
