"""Real data (../shared/data): what scripts/prepare_real_data.py holds out is never trained on, the
prepared config is a valid DAG, and (opt-in, ~25 min on 2 cores: KALM_REAL_DATA=1) fine-tuning
all-MiniLM-L6-v2 through the whole DAG beats the base model on every held-out task."""

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
TARGETS = [
    "results/mteb_zh.json",
    "results/mteb_en.json",
    "results/baseline/mteb_zh.json",
    "results/baseline/mteb_en.json",
]

pytestmark = pytest.mark.skipif(
    not (SHARED / "stsb_multi_mt").is_dir() or not (SHARED / "csl" / "ts").is_dir(),
    reason="needs ../shared/data (stsb_multi_mt, csl/ts)",
)


def _prepare(out: Path) -> dict:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from prepare_real_data import prepare
    finally:
        sys.path.pop(0)
    return prepare(SHARED, out)


def _snakemake(work: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SNAKEMAKE_PROFILE": str(ROOT / "profiles/local"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # targets before --configfile, which takes several values
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            *args,
            "-s",
            str(ROOT / "workflow/Snakefile"),
            "--configfile",
            str(work / "config.yaml"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_held_out_data_is_never_trained_on_and_the_config_is_a_valid_dag(tmp_path):
    counts = _prepare(tmp_path)
    csl = counts["csl_title_abstract"]
    assert csl["train"] + csl["held_out"] == csl["papers"] == 1000 and 250 <= csl["held_out"] <= 350
    train_titles = {r["query"] for r in read_jsonl(tmp_path / "data/csl_title_abstract.jsonl")}
    eval_titles = {r["text"] for r in read_jsonl(tmp_path / "eval/CSLTitleAbstract/queries.jsonl")}
    assert len(eval_titles) == csl["held_out"] and not train_titles & eval_titles
    eval_abstracts = {r["text"] for r in read_jsonl(tmp_path / "eval/CSLTitleAbstract/corpus.jsonl")}
    assert not {r["pos"][0] for r in read_jsonl(tmp_path / "data/csl_title_abstract.jsonl")} & eval_abstracts
    for lang in ("en", "zh"):
        sts = counts[f"stsb_{lang}"]
        assert sts["train_pairs_in"] == 5749 and sts["eval_pairs"] == 1500  # the dev split is the evaluation
        assert len(list(read_jsonl(tmp_path / f"data/stsb_{lang}.jsonl"))) == sts["kept_score_ge_min"] > 1000
    res = _snakemake(tmp_path, "-n", *TARGETS)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = job_counts(res.stdout)
    assert jobs["finetune"] == 2 and "pretrain" not in jobs and jobs["evaluate"] == 2 * 3  # base and soup, 3 tasks


@pytest.mark.skipif(
    os.environ.get("KALM_REAL_DATA") != "1", reason="opt-in: KALM_REAL_DATA=1 (about 25 min on 2 cores)"
)
def test_fine_tuning_on_real_data_beats_the_base_model_on_held_out_tasks(tmp_path):
    _prepare(tmp_path)
    res = _snakemake(tmp_path, *TARGETS, timeout=3600)
    assert res.returncode == 0, res.stderr[-5000:]
    for lang in ("en", "zh"):
        agg = json.loads((tmp_path / f"results/mteb_{lang}.json").read_text(encoding="utf-8"))
        for task, entry in agg["tasks"].items():
            assert entry["main_score"] > agg["baseline"]["tasks"][task], (lang, task)
