"""Shared pytest fixtures.

Model hubs are unreachable: every test runs offline (set before transformers is imported).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"


@pytest.fixture(scope="session", autouse=True)
def _offline_hub():
    """Keep Hugging Face libraries offline for the whole session (also set at import time above)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    yield


def make_bilingual_sentences(n: int = 300, seed: int = 0) -> list[str]:
    """``n`` generated English and Chinese sentences (half each), deterministic for ``seed``."""
    rng = random.Random(seed)
    en_subjects = ["The cat", "A student", "My neighbour", "The old man", "Our team", "The robot", "A doctor", "She"]
    en_verbs = ["reads", "writes", "finds", "cooks", "repairs", "paints", "explains", "sells", "buys", "studies"]
    en_objects = [
        "a book about rivers",
        "the broken bicycle",
        "fresh bread",
        "a long letter",
        "the answer",
        "an old map",
        "green tea",
        "the search engine",
        "a small garden",
        "the weather report",
    ]
    en_tails = ["every morning.", "in the library.", "before dinner.", "with great care.", "on Sunday.", "quickly."]
    zh_subjects = ["我", "他们", "老师", "这个学生", "我的朋友", "小猫", "医生", "我们公司"]
    zh_verbs = ["喜欢", "正在读", "买了", "找到了", "介绍了", "研究", "修理", "写了"]
    zh_objects = ["一本新书", "中文文本", "天气预报", "绿茶", "一张旧地图", "搜索引擎", "北京的公园", "这个问题的答案"]
    zh_tails = ["。", "，非常有意思。", "，今天下午。", "，在图书馆里。", "，每天早上。"]
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(
                f"{rng.choice(en_subjects)} {rng.choice(en_verbs)} {rng.choice(en_objects)} {rng.choice(en_tails)}"
            )
        else:
            out.append(f"{rng.choice(zh_subjects)}{rng.choice(zh_verbs)}{rng.choice(zh_objects)}{rng.choice(zh_tails)}")
    return out


def import_script(name: str):
    """A module of scripts/ (the benchmarks and comparisons), imported for its tests."""
    import importlib

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def shared_tmp(tmp_path_factory) -> Path:
    """A folder of this test run that every pytest-xdist worker sees (each worker has its own basetemp
    below it); without xdist, the session's basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2 backbone (plain HF directory, causal config), built once per session.

    64 hidden, 2 layers, 4 heads / 2 kv heads, byte-level BPE tokenizer trained on generated
    English + Chinese text. Load it with ``kalm.models.modeling.load_embedding_model(tiny_qwen_dir)``
    to get the bidirectional mean-pooled embedding model.
    """
    from kalm.models.tiny_qwen import build_tiny_qwen2

    root = shared_tmp(tmp_path_factory)
    out = root / "tiny_qwen" / "model"
    with FileLock(str(root / "tiny_qwen.lock")):  # built once, whichever pytest-xdist worker asks first
        if not (root / "tiny_qwen" / ".built").exists():
            shutil.rmtree(out, ignore_errors=True)
            build_tiny_qwen2(out, make_bilingual_sentences(300), seed=0)
            (root / "tiny_qwen" / ".built").touch()
    return str(out)


def slice_jsonl(src: Path, dst: Path, n: int) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return str(dst)


@pytest.fixture
def tiny_run(tmp_path_factory, tiny_qwen_dir):
    """The real DAG run locally on a tiny config, once per test run: (working directory, config).

    `snakemake results/mteb_zh.json results/mteb_en.json` bare, as a user would after
    `source .venv/bin/activate` (SNAKEMAKE_PROFILE points at profiles/local). tests/test_e2e.py
    checks its outputs; tests/test_slurm.py re-runs part of it on a SLURM cluster and compares;
    tests/test_report.py makes its report. The first test to ask builds it (under a lock shared by
    the pytest-xdist workers); each test then holds it alone, because some re-run its jobs.
    """
    root = shared_tmp(tmp_path_factory)
    with FileLock(str(root / "tiny_run.lock")):
        work = root / "e2e"
        if not (work / ".built").exists():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            _build_tiny_run(work, tiny_qwen_dir)
            (work / ".built").touch()
        yield work, yaml.safe_load((work / "tiny.yaml").read_text(encoding="utf-8"))


def _build_tiny_run(work: Path, tiny_qwen_dir: str) -> None:
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    cfg["base_model"] = tiny_qwen_dir
    cfg["threads"] = 1
    for stage, n in (("pretrain", 40), ("finetune", 60)):
        for task, spec in cfg["data"][stage].items():
            spec["path"] = slice_jsonl(ROOT / spec["path"], work / "in" / stage / f"{task}.jsonl", n)
    # plant a leak and a duplicate so that the funnel has something to count
    leak = json.loads((DEMO / "eval/DemoRetrievalEn/queries.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"]
    with open(cfg["data"]["finetune"]["retrieval_en"]["path"], "a", encoding="utf-8") as f:
        f.write(json.dumps({"query": leak, "pos": ["a leaked example"]}) + "\n")
        f.write(json.dumps({"query": leak.upper() + "  ", "pos": ["a  leaked example"]}) + "\n")
    for task in cfg["eval"]["tasks"].values():
        task["path"] = str(ROOT / task["path"])
    cfg["embed"].update(shards=2, batch_size=32)
    cfg["pretrain"].update(max_steps=3, batch_size=16)
    cfg["finetune"].update(max_steps=4, batch_size=8, runs=2)
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    env = {
        **os.environ,
        "SNAKEMAKE_PROFILE": str(ROOT / "profiles/local"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # the results, and the fine-tuning funnel's gathers (what the report reads; tests/test_e2e.py checks them)
    funnel = [f"work/data/finetune/{name}.stats.json" for name in ("dedup", "decontaminated", "mined")]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "results/mteb_zh.json",
            "results/mteb_en.json",
            *funnel,
            "-s",
            str(ROOT / "workflow/Snakefile"),
            "--configfile",
            str(work / "tiny.yaml"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-5000:]


def dry_run_commands(cfg: dict, folder: Path, *targets: str) -> list[str]:
    """The printed shell commands (`-n -p --forceall`) of a dry run of ``targets`` under config ``cfg``."""
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    res = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), *targets, "-n", "-p", "--forceall", "--cores", "1"]
        + ["--configfile", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.splitlines()


def train_config_of(command_line: str):
    """The TrainConfig a `kalm train` command line of a dry run trains with (the trainer's own parser)."""
    import shlex

    from kalm import options
    from kalm.cli import build_parser
    from kalm.training.config import TrainConfig

    argv = shlex.split(command_line.split(" -m kalm train ", 1)[1].split(" > ", 1)[0])
    args = build_parser(["kalm.training.train"]).parse_args(["train", *argv])
    return options.from_args(TrainConfig, args, args.options)


def mine_config_of(command_line: str):
    """The MineConfig a `kalm mine` command line of a dry run mines with (kalm mine's own parser)."""
    import shlex

    from kalm.cli import build_parser
    from kalm.mining.mine import mine_config

    argv = shlex.split(command_line.split(" -m kalm mine ", 1)[1].split(" > ", 1)[0])
    return mine_config(build_parser(["kalm.mining.mine"]).parse_args(["mine", *argv]))
