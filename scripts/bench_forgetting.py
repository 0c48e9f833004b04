"""Fine-tuning without forgetting on real data (issue 19): the plain soup against the soup with the base model.

The `make real` data (scripts/prepare_real_data.py, ../shared/data) with one change: the Chinese STS-B
train pairs are left out of training, so STS-B dev zh becomes a *guard task*, an ability of the base model
that fine-tuning never trains. The DAG then fine-tunes all-MiniLM-L6-v2 on STS-B en and CSL title ->
abstract (zh) as `make real` does (two runs, a uniform soup), and this script soups the same two runs once
more with the base model as a third ingredient (`kalm.soup.make_soup(..., base_model=...)`, what
`soup.include_base: true` runs). Base model, plain soup and soup with base are scored on the held-out
tasks: CSLTitleAbstract and STSBDevEn (trained tasks, held-out data) and STSBDevZh (the guard).

    .venv/bin/python scripts/bench_forgetting.py --out /tmp/forgetting     # ~25 min on 2 CPU cores

Prints one JSON line per (model, task) and a markdown table; writes OUT/forgetting.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GUARD = "stsb_zh"  # the training task left out: its dev split is the guard task
TARGETS = [
    "results/mteb_zh.json",
    "results/mteb_en.json",
    "results/baseline/mteb_zh.json",
    "results/baseline/mteb_en.json",
]


def snakemake(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow/Snakefile"), "--directory", str(out)]
    cmd += [f"--configfile={out / 'config.yaml'}", *args]  # "=": a bare --configfile would take the targets
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def task_specs(out: Path) -> dict[str, dict]:
    """{task: the spec `kalm evaluate --task-json` gets}, read from the DAG's own dry run."""
    res = snakemake(out, *TARGETS, "-n", "-p", "--forceall", "--cores", "1")
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    specs = [json.loads(m[1]) for m in re.finditer(r"evaluate --model models/soup --task-json '(\{.*?\})'", res.stdout)]
    return {s["name"]: s for s in specs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="OUT has a finished DAG run: only soup and score again")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "scripts"))
    import prepare_real_data

    out = args.out.resolve()
    dag_seconds = None
    if not (args.reuse and all((out / t).exists() for t in TARGETS)):
        if prepare_real_data.main(["--shared", str(args.shared), "--out", str(out)]):
            return 2
        cfg = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
        del cfg["data"]["finetune"][GUARD]
        (out / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
        t0 = time.time()
        res = snakemake(out, *TARGETS, "--cores", str(args.cores))
        if res.returncode:
            print(res.stdout[-3000:], res.stderr[-3000:], file=sys.stderr)
            return 1
        dag_seconds = time.time() - t0
    cfg = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))

    from kalm.models.modeling import load_embedding_model
    from kalm.soup import dev_score, make_soup

    runs = [str(out / "models" / "finetune" / f"run{r}") for r in range(cfg["finetune"]["runs"])]
    report = make_soup(runs, str(out / "models" / "soup_with_base"), "uniform", base_model=cfg["base_model"])
    specs = task_specs(out)
    models = {
        "base": cfg["base_model"],
        "soup": str(out / "models" / "soup"),
        "soup_with_base": str(out / "models" / "soup_with_base"),
    }
    print(json.dumps({"soup_with_base": report["ingredients"]}), flush=True)
    rows = []
    for name, path in models.items():
        model = load_embedding_model(path, max_seq_length=cfg["max_seq_length"])
        for task, spec in specs.items():
            score = dev_score(model, spec, batch_size=cfg["eval"]["batch_size"])
            role = "guard (not trained on)" if task == "STSBDevZh" else "trained task, held-out data"
            rows.append({"model": name, "task": task, "role": role, "main_score": round(score, 5)})
            print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    dag = {}  # the DAG's own scores of the soup and the base, to check this script scores the same way
    for which, key in (("results", "soup"), ("results/baseline", "base")):
        for lang in ("en", "zh"):
            agg = json.loads((out / which / f"mteb_{lang}.json").read_text(encoding="utf-8"))
            for task, entry in agg.get("tasks", {}).items():
                dag[(key, task)] = entry.get("main_score")
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "dag_seconds": None if dag_seconds is None else round(dag_seconds, 1),
        "trained": sorted(cfg["data"]["finetune"]),
        "guard": "STSBDevZh",
        "rows": rows,
        "dag_scores": {f"{m}/{t}": s for (m, t), s in dag.items()},
    }
    (out / "forgetting.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tasks = list(specs)
    print("\n| model | " + " | ".join(tasks) + " |\n|---|" + "---:|" * len(tasks))
    for name in models:
        scores = {r["task"]: r["main_score"] for r in rows if r["model"] == name}
        print(f"| {name} | " + " | ".join(f"{100 * scores[t]:.2f}" for t in tasks) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
