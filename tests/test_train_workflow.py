"""The trainer's batching, negatives and memory options travel from the config to the command line."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(cfg: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    snakemake = Path(sys.executable).parent / "snakemake"
    # the target first: --configfile takes several values
    return subprocess.run([str(snakemake), "models/finetune/run0", "-n", "-p", "--forceall", "--cores", "1",
                           "--configfile", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_training_options_reach_the_commands_and_bad_values_are_refused(tmp_path):
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["pretrain"].update(precision="bf16", gradient_checkpointing=True, mini_batch_size=32)
    cfg["finetune"].update(homogeneous_ratio=0.75, few_negatives="drop", precision="fp32", mini_batch_size=8)
    res = _dry_run(cfg, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    pre = next(line for line in res.stdout.splitlines() if "train --stage pretrain" in line)
    fine = next(line for line in res.stdout.splitlines() if "train --stage finetune" in line)
    assert "--precision bf16" in pre and "--gradient-checkpointing" in pre and "--mini-batch-size 32" in pre
    assert "--stats models/pretrain.stats.json" in pre
    for flag in ("--homogeneous-ratio 0.75", "--few-negatives drop", "--precision fp32", "--mini-batch-size 8"):
        assert flag in fine, flag
    assert "--gradient-checkpointing" not in fine and "--stats models/finetune/run0.stats.json" in fine

    cfg["finetune"]["few_negatives"] = "repeat"
    bad = _dry_run(cfg, tmp_path)
    assert bad.returncode != 0 and "few_negatives" in bad.stderr + bad.stdout


def test_pooling_reaches_every_command_that_loads_the_base_model(tmp_path):
    """`pooling` (cls / lasttoken instead of KaLM's mean) for a plain Hugging Face base model: the
    mining encoder, both training stages and the baseline evaluation must pool alike."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["pooling"] = "lasttoken"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    snakemake = Path(sys.executable).parent / "snakemake"
    res = subprocess.run([str(snakemake), "models/finetune/run0", "results/baseline/mteb_en.json", "-n", "-p",
                          "--forceall", "--cores", "1", "--configfile", str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if " -m kalm " in line]
    for command in ("embed", "train --stage pretrain", "train --stage finetune", "evaluate"):
        found = [line for line in lines if f"-m kalm {command}" in line]
        assert found and all("--pooling lasttoken" in line for line in found), command
    cfg["pooling"] = "max"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    bad = _dry_run(cfg, tmp_path)
    assert bad.returncode != 0 and "pooling" in bad.stderr + bad.stdout
