"""kalm gpu-slots: concurrent GPU jobs get distinct devices (CUDA_VISIBLE_DEVICES), never a shared one.

The devices are fake: ids in KALM_GPUS (the launcher only locks ids and exports them; no test opens
a GPU), so these tests run the same on a CPU-only machine. Everything else is real: the launcher is
run as a process, torchrun really starts its ranks, and Snakemake really runs jobs with
profiles/local.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from kalm.cluster.gpu_slots import device_pool, split_env, try_acquire

ROOT = Path(__file__).resolve().parents[1]
GPU_RUN = [sys.executable, "-m", "kalm", "gpu-slots"]

# A job body: record when it held which devices (wall clock, so that separate processes compare).
RECORD = (
    "import json, os, sys, time; t0 = time.time(); time.sleep(float(sys.argv[2])); "
    "json.dump({'cvd': os.environ['CUDA_VISIBLE_DEVICES'], 'start': t0, 'end': time.time()}, "
    "open(sys.argv[1], 'w'))"
)


def fake_env(tmp_path, devices="0,1", **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    env.update(KALM_GPUS=devices, KALM_GPU_LOCK_DIR=str(tmp_path / "locks"), **extra)
    return env


def overlapping(records):
    """Pairs of records whose [start, end) intervals overlap."""
    return [
        (a, b)
        for i, a in enumerate(records)
        for b in records[i + 1 :]
        if a["start"] < b["end"] and b["start"] < a["end"]
    ]


def max_in_use(records):
    """Most devices held at one time."""
    events = sorted(
        [(r["start"], len(r["cvd"].split(","))) for r in records]
        + [(r["end"], -len(r["cvd"].split(","))) for r in records],
        key=lambda e: (e[0], e[1]),
    )
    most = now = 0
    for _, delta in events:
        now += delta
        most = max(most, now)
    return most


def test_device_pool_prefers_kalm_gpus_then_cuda_visible_devices():
    assert device_pool({"KALM_GPUS": "2, 3", "CUDA_VISIBLE_DEVICES": "0"}) == ["2", "3"]
    assert device_pool({"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}) == ["GPU-aa", "GPU-bb"]
    assert device_pool({"CUDA_VISIBLE_DEVICES": ""}) == []  # explicitly no GPUs


def test_split_env_reads_leading_assignments_like_env():
    assert split_env(["OMP_NUM_THREADS=2", "A=b=c", "python", "X=1"]) == (
        {"OMP_NUM_THREADS": "2", "A": "b=c"},
        ["python", "X=1"],
    )


def test_a_request_locks_all_its_devices_or_none(tmp_path):
    pool = ["0", "1"]
    held = try_acquire(1, pool, tmp_path / "locks" / "slurm-7")
    # every folder the launcher creates is usable by other users (sticky, world-writable)
    assert all((tmp_path / d).stat().st_mode & 0o7777 == 0o1777 for d in ("locks", "locks/slurm-7"))
    for fd in held[1]:
        os.close(fd)
    held = try_acquire(1, pool, tmp_path)
    assert held and held[0] == ["0"]
    # two devices wanted, one busy: nothing is kept, so device 1 stays free for someone else
    assert try_acquire(2, pool, tmp_path) is None
    other = try_acquire(1, pool, tmp_path)
    assert other and other[0] == ["1"]
    for fd in held[1] + other[1]:
        os.close(fd)
    both = try_acquire(2, pool, tmp_path)
    assert both and both[0] == ["0", "1"]


def test_concurrent_jobs_never_share_a_device(tmp_path):
    """Seven jobs (one needing both devices) started at once on a 2-device pool."""
    env = fake_env(tmp_path)
    procs, outs = [], []
    for i, need in enumerate([1, 1, 2, 1, 1, 1, 1]):
        out = tmp_path / f"job{i}.json"
        outs.append(out)
        procs.append(
            subprocess.Popen(
                [*GPU_RUN, "--gpus", str(need), "--poll", "0.05", "--", sys.executable, "-c", RECORD, str(out), "0.4"],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    records = [json.loads(o.read_text()) for o in outs]
    assert sorted(len(r["cvd"].split(",")) for r in records) == [1, 1, 1, 1, 1, 1, 2]
    assert all(set(r["cvd"].split(",")) <= {"0", "1"} for r in records)
    pairs = overlapping(records)
    assert pairs, "the jobs should have run concurrently"
    for a, b in pairs:
        assert not set(a["cvd"].split(",")) & set(b["cvd"].split(",")), (a, b)
    assert max_in_use(records) <= 2


def test_a_killed_job_releases_its_device(tmp_path):
    env = fake_env(tmp_path, devices="7")
    holder = subprocess.Popen([*GPU_RUN, "--gpus", "1", "--", "sleep", "60"], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{holder.pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":  # locked, then exec'd
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.1)
    busy = subprocess.run(
        [*GPU_RUN, "--gpus", "1", "--timeout", "1", "--", "true"], env=env, capture_output=True, text=True
    )
    assert busy.returncode != 0 and "no 1 free GPU" in busy.stderr
    os.killpg(holder.pid, signal.SIGKILL)  # no clean-up code runs: the kernel drops the flock
    holder.wait()
    freed = subprocess.run(
        [
            *GPU_RUN,
            "--gpus",
            "1",
            "--timeout",
            "10",
            "--",
            sys.executable,
            "-c",
            "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert freed.returncode == 0, freed.stderr
    assert freed.stdout.strip() == "7"


def test_zero_gpus_hides_every_device_and_env_words_are_applied(tmp_path):
    res = subprocess.run(
        [
            *GPU_RUN,
            "--gpus",
            "0",
            "--",
            "OMP_NUM_THREADS=3",
            sys.executable,
            "-c",
            "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']), os.environ['OMP_NUM_THREADS'])",
        ],
        env=fake_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["''", "3"]


def test_asking_for_more_gpus_than_the_pool_fails_with_a_reason(tmp_path):
    res = subprocess.run(
        [*GPU_RUN, "--gpus", "3", "--", "true"], env=fake_env(tmp_path), capture_output=True, text=True
    )
    assert res.returncode != 0
    assert "needs 3 GPU(s) but the device pool has 2" in res.stderr


def test_torchrun_starts_one_rank_per_device(tmp_path):
    """--torchrun with two devices: torchrun (really started, on CPU) runs the command once per rank."""
    # each rank writes its own file: two ranks' prints into one pipe can be lost under load (seen in CI)
    script = (
        "import os, sys; e = os.environ; open(os.path.join(sys.argv[1], 'rank' + e['RANK']), 'w').write(' '.join("
        "[e['RANK'], e['LOCAL_RANK'], e['WORLD_SIZE'], e['CUDA_VISIBLE_DEVICES'], e['OMP_NUM_THREADS']]))"
    )
    out = tmp_path / "ranks"
    out.mkdir()
    res = subprocess.run(
        [*GPU_RUN, "--gpus", "2", "--torchrun", "--", "OMP_NUM_THREADS=1", sys.executable, "-c", script, str(out)],
        env=fake_env(tmp_path, devices="4,5"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = sorted(f.read_text().split() for f in out.iterdir())
    assert ranks == [["0", "0", "2", "4,5", "1"], ["1", "1", "2", "4,5", "1"]]
    # one device: no torchrun (a plain process, no rendezvous to pay for)
    single = subprocess.run(
        [*GPU_RUN, "--gpus", "1", "--torchrun", "--dry-run", "--", "python", "-m", "kalm"],
        env=fake_env(tmp_path, devices="4,5"),
        capture_output=True,
        text=True,
    )
    assert single.stdout.strip() == "python -m kalm"


def test_multi_node_launch_is_srun_then_torchrun_per_node(tmp_path):
    """Dry run of a 2-node x 8-GPU job: the batch step's srun, then what each node's task starts."""
    cmd = ["OMP_NUM_THREADS=8", "python", "-m", "kalm", "train", "--stage", "pretrain"]
    outer = subprocess.run(
        [*GPU_RUN, "--gpus", "16", "--nodes", "2", "--torchrun", "--dry-run", "--", *cmd],
        env=fake_env(tmp_path, SLURM_JOB_ID="42"),
        capture_output=True,
        text=True,
    )
    assert outer.returncode == 0, outer.stderr
    srun = outer.stdout.split()
    assert srun[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    inner_args = srun[srun.index("gpu-slots") + 1 :]
    assert inner_args[:3] == ["--gpus", "8", "--torchrun"]
    endpoint = inner_args[inner_args.index("--rdzv-endpoint") + 1]
    assert re.fullmatch(r"[\w.-]+:\d+", endpoint)
    assert inner_args[inner_args.index("--") + 1 :] == cmd[1:]  # env words travel in srun's environment
    # on the second node, as srun starts it there
    node = subprocess.run(
        [*GPU_RUN, *inner_args[: inner_args.index("--")], "--dry-run", "--", *cmd[1:]],
        env=fake_env(tmp_path, devices="0,1,2,3,4,5,6,7", SLURM_JOB_ID="42", SLURM_NNODES="2", SLURM_NODEID="1"),
        capture_output=True,
        text=True,
    )
    assert node.returncode == 0, node.stderr
    torchrun = node.stdout.split()
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    opts = " ".join(torchrun[3 : torchrun.index("--no-python")])
    assert opts == f"--nnodes 2 --rdzv-backend c10d --rdzv-endpoint {endpoint} --rdzv-id 42 --nproc-per-node 8"
    assert torchrun[torchrun.index("--no-python") + 1 :] == cmd[1:]
    # outside SLURM a multi-node job cannot start
    alone = subprocess.run(
        [*GPU_RUN, "--gpus", "16", "--nodes", "2", "--", "true"], env=fake_env(tmp_path), capture_output=True, text=True
    )
    assert alone.returncode != 0 and "needs a SLURM allocation" in alone.stderr


TOY_SNAKEFILE = """
import sys
rule all:
    input: expand("out/{i}.json", i=range(7))
rule job:
    output: "out/{i}.json"
    log: "logs/{i}.log"
    benchmark: "benchmarks/{i}.tsv"
    resources: gpu=lambda w: 2 if w.i == "3" else 1
    shell: "{sys.executable} -m kalm gpu-slots --gpus {resources.gpu} -- "
           "{sys.executable} -c {RECORD:q} {output} 1 2> {log}"
"""


def test_local_profile_gives_concurrent_snakemake_jobs_distinct_devices(tmp_path):
    """profiles/local on a fake 2-GPU workstation: Snakemake caps GPU jobs at 2 devices (the profile
    reads the pool), the launcher decides which; 6 cores so that cores are not what limits."""
    (tmp_path / "Snakefile").write_text(f"RECORD = {RECORD!r}\n" + TOY_SNAKEFILE)
    env = fake_env(tmp_path, SNAKEMAKE_PROFILE=str(ROOT / "profiles/local"))
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "6"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Provided resources: gpu=" in res.stderr and 'Resource("gpu", 2)' in res.stderr
    records = [json.loads((tmp_path / f"out/{i}.json").read_text()) for i in range(7)]
    assert records[3]["cvd"] in ("0,1", "1,0")
    pairs = overlapping(records)
    assert pairs, "jobs should have overlapped"
    for a, b in pairs:
        assert not set(a["cvd"].split(",")) & set(b["cvd"].split(","))
    assert max_in_use(records) <= 2
    assert "CUDA_VISIBLE_DEVICES=" in (tmp_path / "logs/0.log").read_text()


def test_every_gpu_rule_runs_behind_the_launcher_and_is_capped_at_the_pool(tmp_path):
    """Dry run of the real workflow with profiles/local on a fake 2-GPU machine: GPU rules start with
    `kalm gpu-slots --gpus N` (training with --torchrun; 4 wanted, scaled down to the 2 there are),
    CPU rules do not."""
    env = fake_env(tmp_path, SNAKEMAKE_PROFILE=str(ROOT / "profiles/local"), HF_HUB_OFFLINE="1")
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    cfg["resources"]["gpus"] = {"embed": 1, "mine": 1, "pretrain": 4, "finetune": 4, "evaluate": 1}
    (tmp_path / "gpus.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "results/mteb_en.json",
            "-n",
            "-p",
            "--forceall",
            "-s",
            str(ROOT / "workflow/Snakefile"),
            "--configfile",
            str(tmp_path / "gpus.yaml"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    commands = [line for line in (res.stdout + res.stderr).splitlines() if " -m kalm " in line]
    by_rule = {}
    for line in commands:
        launcher = r"gpu-slots (--gpus \d+(?: --nodes \d+)?(?: --torchrun)?) -- .*?-m kalm "
        m = re.search(rf" -m kalm (?:{launcher})?([\w-]+)", line)
        step = re.search(r"--step (\w+)", line)
        name = {"pool": "mine_index", "ranges": "mine_ranges"}.get(step[1], m[2]) if m[2] == "mine" and step else m[2]
        name = "embed_texts" if m[2] == "embed" and step and step[1] == "scatter" else name
        by_rule.setdefault(name, set()).add(m[1])
    assert by_rule["embed"] == by_rule["mine"] == by_rule["evaluate"] == {"--gpus 1"}
    assert by_rule["train"] == {"--gpus 2 --nodes 1 --torchrun"}
    for cpu_rule in (
        "validate",
        "dedup",
        "decontaminate",
        "embed_texts",
        "mine_ranges",
        "mine_index",
        "soup",
        "aggregate",
    ):
        assert by_rule[cpu_rule] == {None}, cpu_rule
