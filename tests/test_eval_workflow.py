"""Evaluation and soup settings reach the job command lines, or are refused (Snakemake dry runs)."""

from __future__ import annotations

import json
import re
import shlex

import yaml
from conftest import dry_run_commands, train_config_of
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
    cfg = demo_config_with(
        tmp_path,
        soup={"method": "uniform", "last_k": 3},
        finetune=finetune,
        eval={
            "batch_size": 8,
            "instruction_set": "kalm",
            "mirror": "mirrors",
            "languages": {"zh": {"benchmark": "KaLM-C-MTEB"}},
        },
    )
    res = snakemake("results/mteb_zh.json", "-n", "-p", "--forceall", "--configfile", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert job_counts(res.stdout)["evaluate"] == 2 * 35  # final and base model, one job per task
    specs = {}
    for m in re.finditer(r"evaluate --model (\S+) --task-json '(\{.*?\})' --out (\S+)", res.stdout):
        spec = json.loads(m[2])
        specs[(m[1], spec["name"])] = spec
    assert len(specs) == 70
    massive = specs[("models/soup", "MassiveIntentClassification")]
    assert massive == {
        "subsets": ["zh-CN"],
        "name": "MassiveIntentClassification",
        "lang": "zh",
        "instruction_set": "kalm",
        "mirror_root": "mirrors",
    }
    assert specs[("models/soup", "T2Retrieval")] == {
        "name": "T2Retrieval",
        "lang": "zh",
        "instruction_set": "kalm",
        "mirror_root": "mirrors",
    }
    soup = next(line for line in res.stdout.splitlines() if " soup models/finetune/run0" in line)
    assert "--snapshots work/checkpoints/finetune_run0/snapshots work/checkpoints/finetune_run1/snapshots" in soup
    options_json = shlex.split(soup.split(" -m kalm soup ", 1)[1])[
        shlex.split(soup.split(" -m kalm soup ", 1)[1]).index("--options") + 1
    ]
    assert json.loads(options_json)["last_k"] == 3  # the soup section, as kalm soup's --options
    finetune = [line for line in res.stdout.splitlines() if "train --stage finetune" in line]
    assert len(finetune) == 2 and all("--keep-snapshots 2 --snapshot-every 5" in line for line in finetune)


def test_schema_refuses_an_unknown_instruction_set(tmp_path):
    cfg = demo_config_with(tmp_path, eval={"batch_size": 8, "instruction_set": "e5", "languages": {"zh": ["X"]}})
    res = snakemake("-n", "--configfile", cfg)
    assert res.returncode != 0 and "instruction_set" in res.stderr + res.stdout


def test_mteb_eng_v1_is_selectable_and_kalm_full_uses_kalm_v2(tmp_path):
    """MTEB(eng, v1), the 56 English tasks the KaLM papers report, beside v2; the full recipe evaluates
    (and so trains) with KaLM V2's instructions."""
    assert yaml.safe_load((ROOT / "config/kalm_full.yaml").read_text())["eval"]["instruction_set"] == "kalm_v2"
    cfg = demo_config_with(
        tmp_path,
        eval={"batch_size": 8, "instruction_set": "kalm_v2", "languages": {"en": {"benchmark": "MTEB(eng, v1)"}}},
    )
    res = snakemake("results/mteb_en.json", "-n", "-p", "--forceall", "--configfile", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert job_counts(res.stdout)["evaluate"] == 2 * 56
    specs = [json.loads(m[1]) for m in re.finditer(r"evaluate --model models/soup --task-json '(\{.*?\})'", res.stdout)]
    assert {s["benchmark"] for s in specs} == {"MTEB(eng, v1)"} and {s["instruction_set"] for s in specs} == {"kalm_v2"}
    assert "CQADupstackRetrieval" in {s["name"] for s in specs} and "MSMARCO" in {s["name"] for s in specs}


def _soup_dry_run(tmp_path, soup: dict, extra_tasks: dict | None = None):
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["soup"] = soup
    cfg["eval"]["tasks"].update(extra_tasks or {})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    res = snakemake("models/soup", "-n", "-p", "--forceall", "--configfile", str(path))
    return res, res.stdout + res.stderr


def test_soup_dev_task_must_not_be_a_reported_task(tmp_path):
    """Greedy / loss-weighted soups pick ingredients on the dev task: a reported task (or a copy of its
    data under another name) would be selection on the test set, refused when the config is read."""
    res, log = _soup_dry_run(tmp_path, {"method": "greedy", "dev_task": "DemoRetrievalEn"})
    assert res.returncode != 0
    assert "soup.dev_task 'DemoRetrievalEn' is a reported evaluation task (eval.languages.en)" in log
    assert "chosen on the test set" in log
    copy = {"DevCopy": {"type": "Retrieval", "path": "data/demo/eval/DemoRetrievalZh/"}}
    res, log = _soup_dry_run(tmp_path, {"method": "weighted", "dev_task": "DevCopy"}, copy)
    assert res.returncode != 0 and "has the data of 'DemoRetrievalZh', which is a reported" in log
    res, log = _soup_dry_run(tmp_path, {"method": "greedy", "dev_task": "Nowhere"})
    assert res.returncode != 0 and "soup.dev_task 'Nowhere' must be a local task of eval.tasks" in log
    res, log = _soup_dry_run(tmp_path, {"method": "greedy"})
    assert res.returncode != 0 and "soup.method greedy needs soup.dev_task" in log

    # a held-out local task, listed in no language: accepted, and its spec reaches the soup job
    dev = tmp_path / "dev"
    dev.mkdir()
    res, _ = _soup_dry_run(
        tmp_path,
        {"method": "greedy", "dev_task": "HeldOut"},
        {"HeldOut": {"type": "Retrieval", "path": str(dev), "instruction": "Find it"}},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    cmd = next(line for line in res.stdout.splitlines() if " soup models/finetune/run0" in line)
    argv = shlex.split(cmd.split(" -m kalm soup ", 1)[1].split(" > ", 1)[0])
    assert json.loads(argv[argv.index("--options") + 1])["method"] == "greedy"
    spec = json.loads(argv[argv.index("--dev-task-json") + 1])
    assert spec["path"] == str(dev) and spec["name"] == "HeldOut"


def test_soup_with_the_start_model_and_guard_tasks(tmp_path):
    """soup.include_base passes the start model (models/pretrain, an input of the soup job; else base_model)
    and soup.guard_tasks their specs; a reported guard task is refused like a reported dev task."""
    dev, guard = tmp_path / "dev", tmp_path / "guard"
    dev.mkdir()
    guard.mkdir()
    tasks = {
        "HeldOut": {"type": "Retrieval", "path": str(dev)},
        "Guard": {"type": "Retrieval", "path": str(guard), "instruction": "Find it"},
    }
    soup = {"method": "weighted", "dev_task": "HeldOut", "guard_tasks": ["Guard"], "include_base": True}
    res, log = _soup_dry_run(tmp_path, soup, tasks)
    assert res.returncode == 0, log[-3000:]
    cmd = next(line for line in res.stdout.splitlines() if " soup models/finetune/run0" in line)
    argv = shlex.split(cmd.split(" -m kalm soup ", 1)[1].split(" > ", 1)[0])
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    start = "models/pretrain" if cfg["pretrain"]["enabled"] else cfg["base_model"]
    assert argv[argv.index("--base-model") + 1] == start
    assert [g["name"] for g in json.loads(argv[argv.index("--guard-task-json") + 1])] == ["Guard"]
    assert json.loads(argv[argv.index("--options") + 1])["include_base"] is True
    res, log = _soup_dry_run(tmp_path, dict(soup, guard_tasks=["DemoSTSEn"]), tasks)
    assert res.returncode != 0 and "soup.guard_tasks 'DemoSTSEn' is a reported evaluation task" in log


def test_periodic_evaluation_feeds_the_best_checkpoints_to_the_soup(tmp_path):
    """finetune.eval_every: each run scores soup.dev_task (then the guards) during training and writes its
    best model, which soup.checkpoint best soups instead of the final ones; the configs that cannot work
    are refused."""
    dev = tmp_path / "dev"
    dev.mkdir()
    tasks = {"HeldOut": {"type": "Retrieval", "path": str(dev)}}
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["soup"] = {"method": "uniform", "dev_task": "HeldOut", "checkpoint": "best"}
    cfg["finetune"]["eval_every"] = 50
    cfg["eval"]["tasks"].update(tasks)
    lines = dry_run_commands(cfg, tmp_path, "models/soup")
    runs = [x for x in lines if "train --stage finetune" in x]
    assert len(runs) == cfg["finetune"]["runs"]
    for cmd in runs:
        argv = shlex.split(cmd.split(" -m kalm train ", 1)[1].split(" > ", 1)[0])
        assert argv[argv.index("--best-out") + 1] == argv[argv.index("--out") + 1] + ".best"
        assert [t["name"] for t in json.loads(argv[argv.index("--eval-tasks-json") + 1])] == ["HeldOut"]
        assert train_config_of(cmd).eval_every == 50
    soup = next(x for x in lines if " -m kalm soup " in x)
    assert "models/finetune/run0.best models/finetune/run1.best" in soup
    for change, message in [
        ({"eval_every": 0}, "soup.checkpoint best needs finetune.eval_every"),
        ({"soup": {"method": "uniform", "checkpoint": "final"}}, "finetune.eval_every needs soup.dev_task"),
    ]:
        bad = yaml.safe_load(yaml.safe_dump(cfg))
        if "soup" in change:
            bad["soup"] = change["soup"]
        else:
            bad["finetune"].update(change)
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad, allow_unicode=True))
        res = snakemake("models/soup", "-n", "--configfile", str(tmp_path / "bad.yaml"))
        assert res.returncode != 0 and message in res.stdout + res.stderr
