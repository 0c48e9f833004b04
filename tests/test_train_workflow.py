"""The trainer's batching, negatives and memory options travel from the config to the command line, and
the training data's instructions follow the evaluation's rule (kalm.evaluation.instructions.instruction_sides)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import dry_run_commands, train_config_of

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(cfg: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    snakemake = Path(sys.executable).parent / "snakemake"
    # the target first: --configfile takes several values
    return subprocess.run(
        [str(snakemake), "models/finetune/run0", "-n", "-p", "--forceall", "--cores", "1", "--configfile", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_training_options_reach_the_commands_and_bad_values_are_refused(tmp_path):
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["pretrain"].update(precision="bf16", gradient_checkpointing=True, mini_batch_size=32)
    cfg["finetune"].update(homogeneous_ratio=0.75, few_negatives="drop", precision="fp32", mini_batch_size=8)
    res = _dry_run(cfg, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    pre = next(line for line in res.stdout.splitlines() if "train --stage pretrain" in line)
    fine = next(line for line in res.stdout.splitlines() if "train --stage finetune" in line)
    p, f = train_config_of(pre), train_config_of(fine)  # parsed by the trainer's own parser
    assert (p.precision, p.gradient_checkpointing, p.mini_batch_size) == ("bf16", True, 32)
    assert (p.lr, p.batch_size, p.max_seq_length, p.stage) == (
        cfg["pretrain"]["lr"],
        cfg["pretrain"]["batch_size"],
        cfg["max_seq_length"],
        "pretrain",
    )
    assert "--stats models/pretrain.stats.json" in pre
    assert (f.homogeneous_ratio, f.few_negatives, f.precision, f.mini_batch_size) == (0.75, "drop", "fp32", 8)
    assert f.group_size == cfg["finetune"]["group_size"] and f.max_steps == cfg["finetune"]["max_steps"]
    assert not f.gradient_checkpointing and "--stats models/finetune/run0.stats.json" in fine

    cfg["finetune"]["few_negatives"] = "repeat"
    bad = _dry_run(cfg, tmp_path)
    assert bad.returncode != 0 and "few_negatives" in bad.stderr + bad.stdout


def test_pooling_reaches_every_command_that_loads_the_base_model(tmp_path):
    """`pooling` (cls / lasttoken instead of KaLM's mean) for a plain Hugging Face base model: the
    mining encoder, both training stages and the baseline evaluation must pool alike."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["pooling"] = "lasttoken"
    commands = dry_run_commands(cfg, tmp_path, "models/finetune/run0", "results/baseline/mteb_en.json")
    path = tmp_path / "config.yaml"
    lines = [line for line in commands if " -m kalm " in line]
    for command in ("embed --input", "train --stage pretrain", "train --stage finetune", "evaluate"):  # not the scatter
        found = [line for line in lines if f"-m kalm {command}" in line]
        assert found and all("--pooling lasttoken" in line for line in found), command
    cfg["pooling"] = "max"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    bad = _dry_run(cfg, tmp_path)
    assert bad.returncode != 0 and "pooling" in bad.stderr + bad.stdout


# --------------------------------------------------------------------------------------------
# Instructions: training places them by the evaluation's rule (kalm.evaluation.instructions.instruction_sides)
# --------------------------------------------------------------------------------------------


def _sides_of_prompts(prompts: dict) -> tuple[bool, bool]:
    """(query side, passage side) of an evaluate job's prompts: '<type>-query' keys prefix queries
    only, a '<type>' key every input."""
    return bool(prompts), any(not k.endswith("-query") for k in prompts)


@pytest.mark.parametrize("instruction_set, sts_sides", [("kalm", (False, False)), ("kalm_v2", (True, True))])
def test_training_instructs_sts_as_the_evaluation_does(tmp_path, monkeypatch, instruction_set, sts_sides):
    """Under KaLM V1's set (kalm) STS is evaluated without instruction, so its training records get none
    (validate --drop-instructions) and no passage side; under kalm_v2 both sides, in both. The sides
    of the DAG's validate / mine / train commands equal those of its evaluate jobs and of the rule."""
    import json
    import re

    import kalm.evaluation.evaluate
    from kalm.evaluation.evaluate import prepare_task
    from kalm.evaluation.instructions import instruction_sides

    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["eval"]["instruction_set"] = instruction_set
    out = "\n".join(dry_run_commands(cfg, tmp_path, "models/finetune/run0", "results/mteb_en.json"))
    validate = {
        m[1]: m[2] for m in re.finditer(r"kalm validate --input \S+ --task (\S+) .*?--on-error \w+ (.*?) > ", out)
    }
    symmetric = json.loads(re.search(r"train --stage finetune .*?--symmetric '(\{.*?\})'", out)[1])
    mined = json.loads(re.search(r"kalm mine .*?--mine-tasks '(\{.*?\})'", out)[1])
    specs = {
        json.loads(m[1])["name"]: json.loads(m[1])
        for m in re.finditer(r"evaluate --model models/soup --task-json '(\{.*?\})'", out)
    }

    monkeypatch.setattr(kalm.evaluation.evaluate, "load_task_data", lambda task, spec: {"source": "local"})

    def eval_sides(spec):
        return _sides_of_prompts(
            prepare_task({**spec, "path": str(ROOT / spec["path"])} if "path" in spec else spec).prompts
        )

    for train_task, eval_task, task_type in (
        ("sts_en", "DemoSTSEn", "sts"),
        ("retrieval_en", "DemoRetrievalEn", "retrieval"),
    ):
        want = instruction_sides(instruction_set, task_type)
        data_instruction = cfg["data"]["finetune"][train_task]["instruction"]
        query = validate[train_task] == f"--instruction '{data_instruction}'"
        assert query or validate[train_task] == "--drop-instructions"
        train = (query, query and symmetric[train_task])
        assert train == want == eval_sides(specs[eval_task]), (train_task, validate[train_task], symmetric)
        assert mined[train_task] == want[1]
    assert instruction_sides(instruction_set, "sts") == sts_sides
    # a registered STS task of the set's table is evaluated the same way
    assert eval_sides({"name": "STSB", "lang": "zh", "instruction_set": instruction_set}) == sts_sides


def test_validate_drops_every_instruction_when_asked(tmp_path):
    from kalm.data.validate import validate_file
    from kalm.io import read_json, read_jsonl

    src = tmp_path / "sts.jsonl"
    src.write_text(
        '{"query": "a", "pos": ["b"], "instruction": "own"}\n{"query": "c", "pos": ["d"]}\n', encoding="utf-8"
    )
    stats = tmp_path / "s.json"
    validate_file(str(src), "sts", str(tmp_path / "out.jsonl"), str(stats), drop_instructions=True)
    assert [r.get("instruction") for r in read_jsonl(tmp_path / "out.jsonl")] == [None, None]
    assert read_json(stats)["instructions_dropped"] == 1
    validate_file(str(src), "sts", str(tmp_path / "kept.jsonl"), str(stats), instruction="config's")
    assert [r["instruction"] for r in read_jsonl(tmp_path / "kept.jsonl")] == ["own", "config's"]


def test_the_data_mix_of_the_config_reaches_the_trainer(tmp_path):
    """data.<stage>.<task>.weight / max_records: one --task-mix JSON on the stage's train command, read by the
    trainer's parser; a config without them passes none (the commands of existing runs do not change)."""
    import json
    import shlex

    from kalm.cli import build_parser

    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    plain = dry_run_commands(cfg, tmp_path, "models/finetune/run0")
    assert not any("--task-mix" in line for line in plain)
    cfg["data"]["finetune"]["retrieval_en"]["weight"] = 2.0
    cfg["data"]["finetune"]["sts_en"]["max_records"] = 100
    lines = dry_run_commands(cfg, tmp_path, "models/finetune/run0")
    (line,) = [line for line in lines if "train --stage finetune" in line]
    argv = shlex.split(line.split(" -m kalm train ", 1)[1].split(" > ", 1)[0])
    args = build_parser(["kalm.training.train"]).parse_args(["train", *argv])
    assert json.loads(args.task_mix) == {"retrieval_en": {"weight": 2.0}, "sts_en": {"max_records": 100}}
    assert not any("--task-mix" in line for line in lines if "train --stage pretrain" in line)
