"""The Snakemake workflow: DAG shape, config validation, full recipe, profiles (dry runs)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import dry_run_commands, mine_config_of, train_config_of

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args, cwd=ROOT, env=None, snakefile=ROOT / "workflow" / "Snakefile"):
    full_env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    full_env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})})
    return subprocess.run(
        [*SNAKEMAKE, *args, "-s", str(snakefile)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_dry_run_has_every_stage_of_the_pipeline():
    res = snakemake("results/mteb_zh.json", "-n", "--forceall")  # independent of what this checkout has built
    assert res.returncode == 0, res.stderr
    counts = job_counts(res.stdout)
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    n_files = sum(len(cfg["data"][s]) for s in ("pretrain", "finetune"))
    zh_tasks = len(cfg["eval"]["languages"]["zh"])
    parts = cfg["data"]["dedup"]["shards"]  # P partitions per stage after dedup: one job each downstream
    mined = sum(spec.get("mine", True) for spec in cfg["data"]["finetune"].values())
    labelled = sum(
        spec.get("format") == "labelled" for s in ("pretrain", "finetune") for spec in cfg["data"][s].values()
    )
    assert labelled == 2  # the demo's classification tasks (issue 19)
    assert counts == {
        "labelled": labelled,  # one job per labelled task, before its validate
        "validate": n_files,
        "dedup_scatter": n_files,  # one job per input file
        "dedup": 2 * parts,
        "minhash": 2 * parts,
        "near_buckets": 2,
        "near_components": 2,
        "near_filter": 2 * parts,
        "eval_index": 1,
        "decontaminate": 2 * parts,  # the evaluation index once, then one job per partition
        "embed_texts": parts,  # one part's texts to mine scattered by embedding shard
        "embed": cfg["embed"]["shards"],
        "mine_ranges": mined,  # a pool per mined task, its text ranges
        "mine_index": mined * cfg["mine"].get("pool_shards", 1),
        "mine": parts,  # a job per pool shard, per part
        "pretrain": 1,
        "model_prompts": 1,  # the prompts the saved models carry (issue 17)
        "finetune": cfg["finetune"]["runs"],
        "soup": 1,
        "evaluate": 2 * zh_tasks,  # one job per task, for the final and the base model
        "aggregate": 1,
        "aggregate_baseline": 1,
    }


def test_ivf_mining_plans_one_quantizer_and_one_merged_index_per_pool(tmp_path):
    """mine.index.type ivf: per pool, one quantizer job (before its shards) and one merge job (after them),
    and every mine job reads the merged indexes; the shard jobs get the quantizer as their input."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["mine"].update(index={"type": "ivf"}, pool_shards=3)
    lines = dry_run_commands(cfg, tmp_path, "work/data/finetune/mined/p0.parquet")
    counts = job_counts("\n".join(lines))
    mined = sum(spec.get("mine", True) for spec in cfg["data"]["finetune"].values())
    assert counts["mine_ranges"] == counts["mine_quantizer"] == counts["mine_ivf"] == mined
    assert counts["mine_index"] == 3 * mined and counts["mine"] == 1
    cmds = [line for line in lines if " -m kalm mine " in line]
    assert sum("--step quantizer" in c for c in cmds) == sum("--step ivf" in c for c in cmds) == mined
    assert all(mine_config_of(c).list_size == 256 for c in cmds)  # MineConfig's default, through the schema


def test_rulegraph_renders_every_rule_family():
    res = snakemake("results/mteb_zh.json", "--rulegraph")
    assert res.returncode == 0, res.stderr
    for rule in [
        "validate",
        "dedup",
        "decontaminate",
        "embed",
        "mine",
        "pretrain",
        "finetune",
        "soup",
        "evaluate",
        "aggregate",
    ]:
        assert f'label = "{rule}"' in res.stdout


@pytest.mark.parametrize(
    "override, key", [("bogus_key=1", "bogus_key"), ("threads=two", "threads"), ("mine={'pad': 'sometimes'}", "pad")]
)
def test_bad_config_stops_with_the_key_named(override, key):
    res = snakemake("-n", "--config", override)
    assert res.returncode != 0
    assert key in res.stderr + res.stdout and "validat" in (res.stderr + res.stdout).lower()


def test_full_recipe_dry_runs(tmp_path):
    """From nothing: no corpora in the folder, the recipe's sources are fetch jobs of the plan."""
    full = yaml.safe_load((ROOT / "config/kalm_full.yaml").read_text())
    n_files = sum(
        len(spec["source"]["files"]) for stage in ("pretrain", "finetune") for spec in full["data"][stage].values()
    )
    res = snakemake(
        "results/mteb_zh.json",
        "results/mteb_en.json",
        "-n",
        "-p",
        "--configfile",
        str(ROOT / "config/kalm_full.yaml"),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    counts = job_counts(res.stdout)
    assert counts["fetch"] == counts["validate"] == n_files
    assert counts["evaluate"] == 2 * (31 + 41)  # MTEB(cmn, v1) + MTEB(eng, v2), final and base model
    assert counts["embed"] == 8 and counts["finetune"] == 2
    # the KaLM hyper-parameters reach the training command lines
    finetune_cmds = [line for line in res.stdout.splitlines() if "train --stage finetune" in line]
    assert len(finetune_cmds) == 2
    for cmd in finetune_cmds:  # parsed by the trainer's own parser
        c = train_config_of(cmd)
        assert c.matryoshka_dims == (896, 512, 256, 128, 64) and c.matryoshka_weights == (1.0, 0.3, 0.2, 0.1, 0.1)
        assert (c.group_size, c.temperature, c.lr, c.focal_gamma, c.mix_negatives) == (8, 0.01, 1e-05, 0.5, -1)
    mine_cmd = next(line for line in res.stdout.splitlines() if " mine --step apply " in line)
    m = mine_config_of(mine_cmd)  # parsed by kalm mine's own parser
    assert (m.range_for_sampling, m.negative_number, m.filter_topk) == ((50, 100), 7, 50)


def test_local_profile_gives_a_bare_run_its_cores_and_slurm_profile_replaces_it():
    local = {"SNAKEMAKE_PROFILE": str(ROOT / "profiles/local")}
    bare = snakemake("results/mteb_zh.json", "-n", env=local)
    assert bare.returncode == 0, bare.stderr
    assert "profiles/local" in bare.stderr
    slurm = snakemake("results/mteb_zh.json", "-n", "--profile", "profiles/slurm", env=local)
    assert slurm.returncode == 0, slurm.stderr
    assert "Using profile profiles/slurm for" in slurm.stderr, "the local profile must not be merged in"
    # No profile at all: Snakemake 9 refuses a local run without a core count (why the profile exists).
    none = snakemake("results/mteb_zh.json")
    assert none.returncode != 0 and "cores" in (none.stderr + none.stdout)


def test_an_unknown_soup_method_is_refused():
    # (a greedy soup's config reaching its job, on a held-out dev task: tests/test_eval_workflow.py)
    bad = snakemake("models/soup", "-n", "--config", "soup={'method': 'best'}")
    assert bad.returncode != 0 and "best" in bad.stderr + bad.stdout


def embed_jobs(dry_run_output: str) -> list[str]:
    """The `rule embed:` blocks of a `snakemake -n -p` listing (header, input/output lines, command)."""
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", dry_run_output)
    return [b for b in blocks if re.match(r"(?:local)?rule embed:", b)]


def test_embed_model_pretrain_mines_with_the_pretrained_model():
    res = snakemake(
        "work/data/finetune/mined.stats.json", "-n", "-p", "--forceall", "--config", "embed={'model': 'pretrain'}"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    counts = job_counts(res.stdout)
    assert counts["pretrain"] == 1 and counts["embed"] == 2  # config.yaml: 2 shards
    jobs = embed_jobs(res.stdout)
    assert len(jobs) == 2
    for job in jobs:
        inputs = re.search(r"^\s*input: (.*)$", job, re.M)[1]
        assert "models/pretrain" in inputs.split(", ")  # runs after rule pretrain
        cmd = next(line for line in job.splitlines() if " embed --input" in line)
        assert "--model models/pretrain " in cmd and "--pooling" not in cmd  # a saved ST model keeps its pooling
    # the default (null): the base model, no dependency on pretrain
    base = snakemake("work/data/finetune/mined.stats.json", "-n", "-p", "--forceall")
    assert base.returncode == 0, base.stderr[-3000:]
    assert "pretrain" not in job_counts(base.stdout)
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    assert all(f"--model {cfg['base_model']} " in b and "models/pretrain" not in b for b in embed_jobs(base.stdout))


def test_embed_model_pretrain_without_pretraining_is_a_config_error(tmp_path):
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["embed"]["model"], cfg["pretrain"]["enabled"] = "pretrain", False  # (--config passes 'False' as a string)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "--configfile", str(tmp_path / "c.yaml"))
    assert res.returncode != 0
    out = res.stderr + res.stdout
    assert "embed.model" in out and "pretrain.enabled" in out


@pytest.mark.parametrize("override, value", [(None, "keep"), ("mine={'given_negatives': 'replace'}", "replace")])
def test_given_negatives_setting_reaches_the_mine_command(override, value):
    res = snakemake(
        "work/data/finetune/mined.stats.json", "-n", "-p", "--forceall", *(["--config", override] if override else [])
    )
    assert res.returncode == 0, res.stderr[-3000:]
    mine_cmd = next(line for line in res.stdout.splitlines() if " mine --step apply " in line)
    assert mine_config_of(mine_cmd).given_negatives == value


FILTER_RULE = """

DATA_STEPS.append("filtered")


rule my_filter:
    input:
        lambda w: step_input("filtered", w.stage, w.part),
    output:
        data="work/data/{stage}/filtered/p{part}.parquet",
        stats="work/data/{stage}/filtered/p{part}.stats.json",
    log:
        "logs/my_filter/{stage}/p{part}.log",
    shell:
        "cp {input} {output.data} > {log} 2>&1"
"""


def test_a_filter_step_is_its_rules_and_one_data_steps_entry(tmp_path):
    """A data step added after decontamination (a rule in rules/data.smk and its DATA_STEPS entry, nothing
    else) reads decontamination's parts, and every consumer (embed, mine, pretrain) reads its output: no
    consumer names a step's files by hand, so none can bypass a new filter."""
    import shutil

    shutil.copytree(ROOT / "workflow", tmp_path / "workflow")
    with open(tmp_path / "workflow/rules/data.smk", "a", encoding="utf-8") as f:
        f.write(FILTER_RULE)
    res = snakemake(
        "models/finetune/run0",
        "-n",
        "-p",
        "--forceall",
        f"--configfile={ROOT / 'config/config.yaml'}",
        snakefile=tmp_path / "workflow/Snakefile",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    filt = [line for line in lines if line.startswith("Shell command: cp work/data/")]
    assert filt and all("/decontaminated/p" in line and "/filtered/p" in line for line in filt)
    for step in (" embed --step scatter ", " mine --step apply ", " mine --step ranges ", "train --stage pretrain"):
        cmds = [line for line in lines if step in line]
        assert cmds and all("/filtered/p" in c and "/decontaminated/p" not in c for c in cmds), step
    encode = [line for line in lines if " embed --input " in line]  # the embed jobs read the scatter's files
    assert encode and all("work/embed/texts/p" in c and "/data/finetune/" not in c for c in encode)


def test_the_demo_dag_has_the_jobs_and_outputs_it_had():
    """The demo's jobs, by their outputs, against tests/data/demo_dag_outputs.txt (taken before the layout
    move of issue 16 and updated only by changes that mean to change the DAG: issue 15's digests and range
    files, issue 17's model prompts; the pools' sample.arrow of the ivf quantizer, issue 15, removed again
    when nothing read it; the labelled jobs of the demo's classification tasks, issue 19; the embed_texts
    scatter, issue 15; the dedup scatter files named by scatter job, issue 15). Refactors must leave it alone;
    a change that means
    to alter the DAG rewrites the file with
    `snakemake results/mteb_zh.json results/mteb_en.json -n --forceall | grep output: | sed 's/^ *output: //' | sort`."""
    res = snakemake("results/mteb_zh.json", "results/mteb_en.json", "-n", "--forceall")
    assert res.returncode == 0, res.stderr[-3000:]
    outputs = sorted(
        line.strip().removeprefix("output: ") for line in res.stdout.splitlines() if line.strip().startswith("output: ")
    )
    want = (ROOT / "tests/data/demo_dag_outputs.txt").read_text(encoding="utf-8").splitlines()
    assert outputs == want
