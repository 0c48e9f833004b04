"""Evaluation and soup settings reach the job command lines (Snakemake dry runs)."""

from __future__ import annotations

import json
import re

import yaml
from test_workflow import ROOT, job_counts, snakemake


def demo_config_with(tmp_path, **sections) -> str:
    """The demo config with some sections replaced (--config parses nested values as strings)."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg.update(sections)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return str(path)


def test_kalm_cmteb_list_instruction_set_and_mirror_reach_the_evaluate_jobs(tmp_path):
    finetune = {**yaml.safe_load((ROOT / "config/config.yaml").read_text())["finetune"], "snapshot_every": 5}
    cfg = demo_config_with(tmp_path, soup={"method": "uniform", "last_k": 3}, finetune=finetune,
                           eval={"batch_size": 8, "instruction_set": "kalm", "mirror": "mirrors",
                                 "languages": {"zh": {"benchmark": "KaLM-C-MTEB"}}})
    res = snakemake("results/mteb_zh.json", "-n", "-p", "--forceall", "--configfile", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert job_counts(res.stdout)["evaluate"] == 2 * 35  # final and base model, one job per task
    specs = {}
    for m in re.finditer(r"evaluate --model (\S+) --task-json '(\{.*?\})' --out (\S+)", res.stdout):
        spec = json.loads(m[2])
        specs[(m[1], spec["name"])] = spec
    assert len(specs) == 70
    massive = specs[("models/soup", "MassiveIntentClassification")]
    assert massive == {"subsets": ["zh-CN"], "name": "MassiveIntentClassification", "lang": "zh",
                       "instruction_set": "kalm", "mirror_root": "mirrors"}
    assert specs[("models/soup", "T2Retrieval")] == {"name": "T2Retrieval", "lang": "zh", "instruction_set": "kalm",
                                                     "mirror_root": "mirrors"}
    soup = next(line for line in res.stdout.splitlines() if " soup models/finetune/run0" in line)
    assert "--last-k 3 --snapshots work/checkpoints/finetune_run0/snapshots work/checkpoints/finetune_run1/snapshots" in soup
    finetune = [line for line in res.stdout.splitlines() if "train --stage finetune" in line]
    assert len(finetune) == 2 and all("--keep-snapshots 2 --snapshot-every 5" in line for line in finetune)


def test_schema_refuses_an_unknown_instruction_set(tmp_path):
    cfg = demo_config_with(tmp_path, eval={"batch_size": 8, "instruction_set": "e5", "languages": {"zh": ["X"]}})
    res = snakemake("-n", "--configfile", cfg)
    assert res.returncode != 0 and "instruction_set" in res.stderr + res.stdout
