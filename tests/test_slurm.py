"""profiles/slurm against a real SLURM cluster, and dry runs of what it submits.

`test_workflow_runs_on_a_real_slurm_cluster` starts munged, slurmctld and slurmd on this machine
(tests/slurm_cluster.py: Debian's slurm-wlm 22.05, installed with apt-get when missing), a node
with two GPUs declared as GRES. Those GPUs are the one fake thing: character device files made
with mknod; Slurm allocates and exports them exactly as real ones, and the jobs run on the CPU.
Then Snakemake runs the workflow with `--profile profiles/slurm`: every job goes through sbatch,
the plugin's jobstep, srun and the rule's command. It needs root (slurmd, munged as `munge`):
elsewhere it skips with the reason.

To stay within CI time it re-runs a slice of the session's local tiny run (`tiny_run`,
conftest.py) in a copy of its working directory, chosen to cover every GPU rule with the fewest
rounds of jobs (each round costs 12-33 s of the plugin's polling): `--forcerun embed pretrain
evaluate` for both fine-tuned models and the English baseline report makes SLURM run both embed
shards, pretraining, mining, both fine-tuning runs, both English MTEB jobs of the base model and
their aggregate (a CPU rule); the outputs must equal the local run's. Five GPU jobs are ready at
the start for two GPUs. Plugin facts it relies on (snakemake 9.27, plugin 2.8, measured): without
slurmdbd `sacct` answers nothing, so it uses `--slurm-status-command squeue` with MinJobAge=600;
the first status check is 1 s after submission instead of 40 (the plugin then backs off by 10 s
per idle check, up to 180).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import ClusterUnavailable, SlurmCluster  # noqa: E402

GPU_RULES = {"embed", "mine", "pretrain", "finetune", "evaluate"}


def snakemake(*args, cwd=ROOT, env=None, timeout=300):
    full_env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    full_env.update(
        {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    )
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args, "-s", str(ROOT / "workflow/Snakefile")],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def site_profile(dest: Path, **variables) -> Path:
    """A copy of profiles/slurm with some site variables edited, as a user would."""
    text = (ROOT / "profiles/slurm/config.yaml").read_text()
    for name, value in variables.items():
        text, n = re.subn(rf"^(  {name}:) \S+", rf"\1 {value}", text, count=1, flags=re.M)
        assert n == 1, name
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(text)
    return dest


def dry_run_jobs(output: str) -> list[dict]:
    """(rule, resources, shell command) of each job in a `snakemake -n -p` listing."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if not m:
            continue
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        resources = dict(kv.split("=", 1) for kv in res[1].split(", ")) if res else {}
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.append({"rule": m[1], "resources": resources, "shell": shell[1] if shell else ""})
    return jobs


def with_gpus(cfg: dict, gpus: int, **nodes) -> dict:
    cfg = json.loads(json.dumps(cfg))
    cfg["resources"]["gpus"] = {rule: gpus for rule in cfg["resources"]["gpus"]}
    if nodes:
        cfg["resources"]["nodes"] = nodes
    return cfg


def test_slurm_profile_places_gpu_and_cpu_rules(tmp_path):
    """Dry run with the shipped profile: GPU rules carry their `gpu` count and the GPU partition,
    rules without GPUs the CPU partition and no GPU request; every job has account and runtime."""
    cfg = with_gpus(yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8")), 1)
    (tmp_path / "gpus.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    res = snakemake(
        "results/mteb_zh.json",
        "-n",
        "-p",
        "--forceall",
        "--profile",
        "profiles/slurm",
        "--configfile",
        str(tmp_path / "gpus.yaml"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = dry_run_jobs(res.stdout + res.stderr)
    assert {j["rule"] for j in jobs} >= GPU_RULES | {"validate", "dedup", "decontaminate", "soup", "aggregate"}
    for job in jobs:
        r = job["resources"]
        assert r["slurm_account"] == "your_account" and int(r["runtime"]) > 0, job
        assert "gres" not in r, "gres and gpu would request GPUs twice"
        if job["rule"] in GPU_RULES:
            assert r["gpu"] == "1" and r["slurm_partition"] == "gpu", job
            assert "gpu-slots --gpus 1" in job["shell"]
            # host memory: the profile's, except mine, whose rule sizes it from the shards
            assert (r["mem_mb"] == "64000") == (job["rule"] in ("embed", "evaluate")), job
        else:
            assert r.get("gpu", "0") == "0" and r["slurm_partition"] == "cpu", job
            assert "gpu-slots" not in job["shell"]


def test_multi_node_training_dry_run(tmp_path):
    """2 nodes x 8 GPUs for pretrain: the job's resources, the sbatch line the plugin builds from
    them, and the launch (srun, then one torchrun per node) - all without a cluster."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    cfg = with_gpus(
        yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8")), 8, pretrain=2, finetune=2
    )
    (tmp_path / "nodes.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    profile = site_profile(tmp_path / "profile", gpu_model="h100")
    res = snakemake(
        "models/pretrain",
        "-n",
        "-p",
        "--forceall",
        "--profile",
        str(profile),
        "--configfile",
        str(tmp_path / "nodes.yaml"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    job = next(j for j in dry_run_jobs(res.stdout + res.stderr) if j["rule"] == "pretrain")
    r = job["resources"]
    assert (r["nodes"], r["tasks"], r["tasks_per_gpu"], r["mpi"], r["gpu"], r["gpu_model"]) == (
        "2",
        "2",
        "0",
        "srun",
        "16",
        "h100",
    )
    assert "gpu-slots --gpus 16 --nodes 2 --torchrun -- " in job["shell"]

    # The plugin's own sbatch builder on these resources (its code, not a copy of it).
    class Resources(dict):
        __getattr__ = dict.__getitem__

    typed = Resources({k: int(v) if v.isdigit() else v for k, v in r.items()})
    fake_job = SimpleNamespace(resources=typed, threads=8)
    sbatch = get_submit_command(
        fake_job,
        {
            "run_uuid": "u",
            "slurm_logfile": "l",
            "comment_str": "c",
            "account": "-A acc",
            "partition": "-p gpu",
            "workdir": "/w",
        },
    )
    sbatch += set_gres_string(fake_job)
    assert "--nodes=2" in sbatch and "--ntasks=2" in sbatch and sbatch.endswith("--gpus=h100:16")
    assert "--ntasks-per-gpu" not in sbatch and "--gres" not in sbatch

    # What the job then starts: the launcher's own dry run (see tests/test_gpu_slots.py for the
    # per-node torchrun command).
    launch = job["shell"].split(" > ")[0].replace("--torchrun --", "--torchrun --dry-run --", 1)
    out = subprocess.run(launch, shell=True, capture_output=True, text=True, env={**os.environ, "SLURM_JOB_ID": "7"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 ")
    assert " gpu-slots --gpus 8 --torchrun --rdzv-endpoint " in out.stdout


@pytest.fixture(scope="module")
def cluster():
    """A running single-node cluster (two fake GPUs of type a100), stopped after this module."""
    try:
        c = SlurmCluster(gpus=2, gpu_type="a100", partitions=("cpu", "gpu")).start()
    except ClusterUnavailable as e:
        pytest.skip(f"no test SLURM cluster on this machine: {e}")
    yield c
    c.cleanup()


def _has_real_gpus() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _time(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


TORCHRUN_SNAKEFILE = """
import sys
SCRIPT = "import os; print(os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['CUDA_VISIBLE_DEVICES'])"
rule pretrain:
    output: "ranks.txt"
    log: "logs/pretrain.log"
    resources: gpu=2, nodes=1
    shell: "{sys.executable} -m kalm gpu-slots --gpus {resources.gpu} --nodes {resources.nodes} --torchrun -- "
           "{sys.executable} -c {SCRIPT:q} > {output} 2> {log}"
"""


@pytest.fixture(scope="module")
def torchrun_job(cluster, tmp_path_factory):
    """A 2-GPU job of a training rule submitted through the profile, started in the background when
    the workflow test starts (it overlaps that run instead of adding its own minute of polling)."""
    work = tmp_path_factory.mktemp("torchrun")
    (work / "Snakefile").write_text(TORCHRUN_SNAKEFILE)
    profile = site_profile(work / "profile", gpu_model="a100")
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--profile",
            str(profile),
            "--slurm-status-command",
            "squeue",
            "--slurm-init-seconds-before-status-checks",
            "1",
        ],
        cwd=work,
        env={**env, "SLURM_CONF": str(cluster.conf)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield work, proc
    if proc.poll() is None:
        proc.kill()


def test_workflow_runs_on_a_real_slurm_cluster(cluster, tiny_run, torchrun_job, tmp_path):
    local, cfg = tiny_run
    work = tmp_path / "slurm_run"
    shutil.copytree(local, work, symlinks=True)  # the local run's outputs, mtimes and metadata
    shutil.rmtree(work / "logs")
    (work / "slurm.yaml").write_text(yaml.safe_dump(with_gpus(cfg, 1), allow_unicode=True), encoding="utf-8")
    profile = site_profile(tmp_path / "profile", gpu_model="a100")  # the site edit: its GPU type

    targets = ["models/finetune/run0", "models/finetune/run1", "results/baseline/mteb_en.json"]
    res = snakemake(
        *targets,
        "--profile",
        str(profile),
        "--configfile",
        str(work / "slurm.yaml"),
        "--forcerun",
        "embed",
        "pretrain",
        "evaluate",
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "1",
        cwd=work,
        env={"SLURM_CONF": str(cluster.conf)},
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-6000:] + "\n--- slurmctld:\n" + cluster.log("slurmctld")[-3000:]

    jobs = [j for j in cluster.jobs() if j.get("Comment", "").startswith("rule_") and j["WorkDir"] == str(work)]
    rules = {j["JobId"]: re.match(r"rule_([a-z_]+?)(?:_wildcards_.*)?$", j["Comment"])[1] for j in jobs}
    mined_tasks = sum(spec.get("mine", True) for spec in cfg["data"]["finetune"].values())
    assert sorted(rules.values()) == sorted(
        [
            *["embed_texts"] * cfg["data"]["dedup"]["shards"],  # the forced embed jobs' temporary inputs again
            "embed",
            "embed",
            *["mine_ranges"] * mined_tasks,  # a pool per mined task
            *["mine_index"] * mined_tasks * cfg["mine"].get("pool_shards", 1),
            *["mine"] * cfg["data"]["dedup"]["shards"],  # a job per query shard
            "pretrain",
            "finetune",
            "finetune",
            "evaluate",
            "evaluate",
            "aggregate_baseline",
        ]
    )
    gpu_jobs = []
    for j in jobs:
        rule = rules[j["JobId"]]
        assert j["JobState"] == "COMPLETED" and j["Account"] == "your_account", j
        if rule in GPU_RULES:  # sbatch --gpus=a100:1 on the GPU partition
            assert j.get("TresPerJob") == "gres:gpu:a100:1" and j["Partition"] == "gpu", j
            gpu_jobs.append(j)
        else:  # no GPU request at all
            assert "gpu" not in j.get("TresPerJob", "") + j.get("JOB_GRES", "") and j["Partition"] == "cpu", j

    # Which devices each GPU job's command saw: the launcher logs it into the rule's log.
    seen = {}
    for log in (work / "logs").rglob("*.log"):
        for m in re.finditer(r"CUDA_VISIBLE_DEVICES=(\S*) \(.*? on SLURM job (\d+);", log.read_text(errors="replace")):
            seen[m[2]] = m[1]
    spans = [(_time(j["StartTime"]), _time(j["EndTime"]), seen[j["JobId"]], rules[j["JobId"]]) for j in gpu_jobs]
    assert all(dev in ("0", "1") for _, _, dev, _ in spans), spans
    overlaps = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :] if a[0] < b[1] and b[0] < a[1]]
    assert overlaps, "two GPU jobs should have run at once (embed shards, finetune runs)"
    for a, b in overlaps:
        assert a[2] != b[2], f"GPU jobs shared a device: {a} {b}"
    # never more than two GPUs in use (embed x2, pretrain and evaluate x2 were ready together; the
    # 2-GPU torchrun job of the other test ran during this workflow too)
    all_gpu = [
        (_time(j["StartTime"]), _time(j["EndTime"]), int(j["TresPerJob"].rsplit(":", 1)[1]))
        for j in cluster.jobs()
        if "gres:gpu" in j.get("TresPerJob", "") and j["JobState"] == "COMPLETED"
    ]
    for start, *_ in all_gpu:
        assert sum(n for s, e, n in all_gpu if s <= start < e) <= 2

    # The results equal the local run's (same config apart from GPU counts; CPU numerics both times).
    report = "results/baseline/mteb_en.json"
    ours, theirs = (json.loads((d / report).read_text()) for d in (work, local))
    assert (work / report).stat().st_mtime > (local / report).stat().st_mtime
    if _has_real_gpus():  # device 0 is a real GPU there: bf16 numerics, so equal up to rounding
        for name, entry in theirs["tasks"].items():
            assert ours["tasks"][name]["main_score"] == pytest.approx(entry["main_score"], abs=0.05)
        return
    for rel in ["work/embed/shard0.npy", "work/embed/shard1.npy"]:
        assert np.array_equal(np.load(local / rel), np.load(work / rel)), rel
    from kalm.data.shards import iter_shard

    mined = sorted(p.relative_to(local) for p in (local / "work/data/finetune/mined").glob("p*.parquet"))
    assert mined and mined == sorted(
        p.relative_to(work) for p in (work / "work/data/finetune/mined").glob("p*.parquet")
    )
    for rel in mined:  # the mined records of every query shard
        assert list(iter_shard(local / rel)) == list(iter_shard(work / rel)), rel
    for rel in [
        "models/pretrain/model.safetensors",
        "models/finetune/run0/model.safetensors",
        "models/finetune/run1/model.safetensors",
    ]:
        assert (local / rel).read_bytes() == (work / rel).read_bytes(), rel
    assert ours["tasks"] == theirs["tasks"] and ours["mean_task"] == theirs["mean_task"]


def test_multi_gpu_training_job_starts_torchrun_on_the_gpus_slurm_gave_it(cluster, torchrun_job):
    """sbatch --gpus=a100:2 for the training rule, and inside the job torchrun starts one rank per GPU
    SLURM allocated, each seeing both (the trainer picks its device by LOCAL_RANK)."""
    work, proc = torchrun_job
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:] + (work / "logs/pretrain.log").read_text(errors="replace")
    job = next(j for j in cluster.jobs() if j.get("Comment") == "rule_pretrain" and j["WorkDir"] == str(work))
    assert job["TresPerJob"] == "gres:gpu:a100:2" and job["Partition"] == "gpu"
    assert "CUDA_VISIBLE_DEVICES=0,1 (2 of pool 0,1 on SLURM job" in (work / "logs/pretrain.log").read_text()
    ranks = sorted((work / "ranks.txt").read_text().split("\n")[:-1])
    assert ranks == ["0 2 0,1", "1 2 0,1"]
