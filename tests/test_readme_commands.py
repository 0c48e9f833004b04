"""Every Snakemake command of README.md, copied from it and run on a fresh copy of the project (issue 18).

The commands are read from the README's ```bash blocks, not written here, so a README edit is tested as
printed. They run in a copy of the working tree (tracked and untracked files, no outputs: a fresh clone),
with `.venv/bin` first on PATH and the variables `source .venv/bin/activate` sets, offline. A command that
would start real work (a local run, the SLURM submission) runs as its dry run (`-n` added after
`snakemake`); the tiny DAG run of tests/conftest.py is the real local run, tests/test_slurm.py the real
cluster one. Commands that only print (`-n`, `--rulegraph`) run exactly as printed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRINTING = ("-n", "--dry-run", "--rulegraph", "--dag", "--summary", "--list")


def readme_snakemake_commands() -> list[str]:
    """The `snakemake ...` lines of README.md's bash blocks, comments stripped, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if re.match(r"^(\w+=\S+\s+)*snakemake\b", line):
                out.append(line)
    return out


COMMANDS = readme_snakemake_commands()


def as_run(command: str) -> str:
    """The command as the test runs it: as printed, or its dry run if it would do work."""
    if any(w in PRINTING for w in command.split("|")[0].split()):
        return command
    return re.sub(r"\bsnakemake\b", "snakemake -n", command, count=1)


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Path:
    """The project as a fresh clone sees it: git's tracked and untracked (not ignored) files."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    dst = tmp_path_factory.mktemp("fresh") / "kalm-pipeline"
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


def test_the_readme_lists_the_commands_it_promises():
    assert any("--profile profiles/slurm" in c for c in COMMANDS)
    assert any("config/kalm_full.yaml" in c for c in COMMANDS) and any("config/kalm_small.yaml" in c for c in COMMANDS)
    assert any(c.startswith("snakemake release") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_works_as_printed_on_a_fresh_clone(command, fresh_copy):
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "SNAKEMAKE_PROFILE": str(fresh_copy / "profiles/local"),  # what `source .venv/bin/activate` sets
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    run = as_run(command)
    if "| dot" in run and shutil.which("dot") is None:
        run = run.split("|")[0]  # graphviz is not installed here: the graph Snakemake prints is checked instead
    res = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {run}"], cwd=fresh_copy, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, f"{run}\n{res.stderr[-3000:]}"
    if "--rulegraph" in run and "| dot" not in run:
        assert res.stdout.lstrip().startswith("digraph")
    if "-n" in run.split():
        assert "This was a dry-run" in res.stdout + res.stderr
    if "config/kalm_" in run:  # the full (and small) recipe from nothing: its corpora are fetch jobs in the plan
        assert re.search(r"^fetch\s+\d+", res.stdout, re.M), res.stdout[-2000:]
