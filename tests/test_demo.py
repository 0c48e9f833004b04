"""The embedded default, end to end, as `make demo` runs it (about 9 minutes on 2 CPU cores).

The acceptance test of the walking skeleton: the souped model beats the base model on the
held-out demo retrieval tasks of both languages. Runs in a scratch directory so that it
never touches a developer's results/. (Fast: the committed demo corpus is the generator's output.)
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_demo_corpus_is_the_generators_output():
    """data/demo is byte for byte what scripts/make_demo_corpus.py writes (`--check`), and the demo's
    classification tasks are labelled {text, label} records that the config declares `format: labelled`."""
    from conftest import import_script

    assert import_script("make_demo_corpus").main(["--check"]) == 0
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    for task in ("cls_en", "cls_zh"):
        spec = cfg["data"]["finetune"][task]
        assert spec["format"] == "labelled" and spec["type"] == "classification"
        lines = (ROOT / spec["path"]).read_text(encoding="utf-8").splitlines()
        assert len({json.loads(line)["label"] for line in lines}) == 10
        assert all(set(json.loads(line)) == {"text", "label"} for line in lines)


@pytest.mark.slow
def test_demo_soup_beats_the_base_model(tmp_path):
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    for stage in ("pretrain", "finetune"):
        for spec in cfg["data"][stage].values():
            spec["path"] = str(ROOT / spec["path"])
    for spec in cfg["eval"]["tasks"].values():
        spec["path"] = str(ROOT / spec["path"])
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    env = {
        **os.environ,
        "SNAKEMAKE_PROFILE": str(ROOT / "profiles/local"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    t0 = time.time()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "results/mteb_zh.json",
            "results/mteb_en.json",
            "-s",
            str(ROOT / "workflow/Snakefile"),
            "--configfile",
            str(tmp_path / "demo.yaml"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    print(f"demo DAG finished in {time.time() - t0:.0f} s")
    for lang, task in (("en", "DemoRetrievalEn"), ("zh", "DemoRetrievalZh")):
        agg = json.loads((tmp_path / f"results/mteb_{lang}.json").read_text(encoding="utf-8"))
        print(lang, {t: (agg["baseline"]["tasks"][t], e["main_score"]) for t, e in agg["tasks"].items()})
        assert agg["tasks"][task]["main_score"] > agg["baseline"]["tasks"][task] + 0.05
        for name, entry in agg["tasks"].items():  # every held-out demo task, STS included
            assert entry["main_score"] > agg["baseline"]["tasks"][name] + 0.01, name
        assert agg["mean_task"] > agg["baseline"]["mean_task"]
