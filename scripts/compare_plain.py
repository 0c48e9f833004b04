"""Compare the recipe ("ours", the whole Snakemake pipeline) with sentence-transformers' plain recipe
("plain") on the same held-out split of real data: CSL title -> abstract (issue 14).

    nice -n 10 .venv/bin/python scripts/compare_plain.py --cross-instructions  # full size (1,000 papers)
    nice -n 10 .venv/bin/python scripts/compare_plain.py --work /tmp/cmp_smoke --max-papers 80 \\
        --set finetune.max_steps=2 --plain-epochs 3                            # smoke run (minutes)
    ... --set finetune.lr=5e-5 --set mine.filter_topk=0                        # a variant of ours

What it does, in one run, on one machine, with the same number of threads for both sides:

1. Split. ``../shared/data/csl/ts/dev.tsv`` (1,000 papers; optionally only the first ``--max-papers``)
   is split by a hash of the title (scripts/prepare_real_data.py's ``held_out``) into
   ``--held-out-share`` held-out papers (a local Retrieval task: held-out titles as queries, held-out
   abstracts as corpus, one relevant abstract per title) and training pairs (title -> abstract).
2. ours: ``config/csl_compare.yaml`` (overridden by ``--set key=value``) with the split's paths
   filled in, run by Snakemake in ``<work>/ours``: first ``models/soup`` (validate, dedup,
   decontaminate, embed, mine, fine-tune x runs, soup: the timed training part), then
   ``results/mteb_zh.json`` and ``results/baseline/mteb_zh.json`` (its evaluation of the soup and of
   the base model, with the pipeline's instruction handling: the task's instruction on queries).
3. plain: ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss(scale=20)`` (temperature
   0.05), in-batch negatives only, on the very training pairs ours starts from (before its dedup and
   mining), ``--plain-epochs`` x batch ``--plain-batch-size``, lr ``--plain-lr``, warm-up
   ``--plain-warmup``, linear schedule, the same max_seq_length, in its own process.
4. Evaluation with the same evaluator as the pipeline's ``evaluate`` rule (``kalm evaluate`` on the
   local task folder, same batch size and max_seq_length): plain without instruction (it was trained
   without one), and the base model without instruction too. ``--cross-instructions`` adds ours
   without and plain with the instruction.

(A smoke run's plain side needs 2+ steps: with one, the linear warm-up runs it at lr 0.) See
docs/compare_plain.md.

Output: one JSON line per row on stdout (also ``<work>/comparison.jsonl``), then a markdown table
(also ``<work>/comparison.md``): side, nDCG@10 on the held-out papers (x100), training wall seconds
(ours: the Snakemake call that builds models/soup from the raw pairs; plain: its process, imports,
model loading and saving included; evaluation excluded for both), training steps x batch and texts
encoded by the model during training (ours: the mining embeddings plus every query, positive and
negative of every step of every run; plain: every anchor and positive of every step). Beneath it:
the funnel of ours' training records (how many each data stage and the ranking filter dropped) and
the wall seconds of each pipeline rule (from Snakemake's benchmark files).

``--sides ours`` (or ``plain``) reruns one side only; the table then takes the other side's last
result from ``<work>`` if it was made on the same split (marked "earlier run"), so variants of ours
can be tried against one plain run. Timings of sides run in different calls are less comparable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from prepare_real_data import CSL_INSTRUCTION, held_out, read_csl_ts  # noqa: E402

from kalm.io import write_jsonl  # noqa: E402  (atomic, creates the folder)

TASK = "CSLTitleAbstract"
TRAIN_TASK = "csl_title_abstract"
MARKER = ".compare_plain"  # a <work> folder this script made (it may clear its sides' folders)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------


def write_split(shared: Path, work: Path, share: float, max_papers: int | None) -> dict:
    """Training pairs and the held-out retrieval task, as scripts/prepare_real_data.py writes its CSL part."""
    papers = read_csl_ts(shared / "csl" / "ts" / "dev.tsv")
    if max_papers:
        papers = papers[:max_papers]
    test = [(t, a) for t, a in papers if held_out(t, share)]
    train = [(t, a) for t, a in papers if not held_out(t, share)]
    if not test or not train:
        raise SystemExit(
            f"--held-out-share {share} with {len(papers)} papers leaves {len(test)} held out and "
            f"{len(train)} to train on: both must be non-empty"
        )
    data = work / "data" / f"{TRAIN_TASK}.jsonl"
    write_jsonl(data, [{"query": t, "pos": [a]} for t, a in train])
    folder = work / "eval" / TASK
    write_jsonl(folder / "queries.jsonl", [{"id": f"q{i}", "text": t} for i, (t, _) in enumerate(test)])
    write_jsonl(folder / "corpus.jsonl", [{"id": f"d{i}", "text": a} for i, (_, a) in enumerate(test)])
    (folder / "qrels.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(test))), encoding="utf-8"
    )
    digest = hashlib.sha256(json.dumps([test, train], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    test_abstracts = {a for _, a in test}
    split = {
        "papers": len(papers),
        "train": len(train),
        "held_out": len(test),
        "held_out_share": share,
        "max_papers": max_papers,
        "fingerprint": digest,
        # the same abstract on both sides (a paper listed twice under two titles): plain trains on it
        "train_abstracts_also_held_out": sum(a in test_abstracts for _, a in train),
        "data": str(data),
        "eval_task": str(folder),
    }
    (work / "split.json").write_text(json.dumps(split, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return split


# --------------------------------------------------------------------------------------------
# ours: the pipeline
# --------------------------------------------------------------------------------------------


def parse_set(items: list[str]) -> list[tuple[list[str], Any]]:
    """``a.b.c=value`` -> (["a", "b", "c"], value): 5e-5, 47, [10, 60], null, false, text."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set {item!r}: expected key.path=value (e.g. finetune.lr=5e-5)")
        out.append((key.strip().split("."), _value(value)))
    return out


def _value(text: str) -> Any:
    """A number as Python reads it (YAML 1.1 reads 5e-5 as a string: it wants 5.0e-5), else YAML."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def ours_config(config_path: Path, overrides: list[tuple[list[str], Any]], split: dict) -> dict:
    """The recipe's config with --set applied and the split's training task and evaluation task filled in."""
    import jsonschema
    import yaml

    cfg = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    for keys, value in overrides:
        node = cfg
        for k in keys[:-1]:
            if not isinstance(node.setdefault(k, {}), dict):
                raise SystemExit(f"--set {'.'.join(keys)}: {k!r} is not a mapping in {config_path}")
            node = node[k]
        node[keys[-1]] = value
    cfg["data"]["finetune"] = {TRAIN_TASK: {"path": split["data"], "type": "retrieval", "instruction": CSL_INSTRUCTION}}
    cfg["eval"]["tasks"] = {TASK: {"type": "Retrieval", "path": split["eval_task"], "instruction": CSL_INSTRUCTION}}
    cfg["eval"]["languages"] = {"zh": [TASK]}
    from kalm.schema import full_schema

    schema = full_schema(ROOT / "workflow/schemas/config.schema.yaml")  # with the trainer's declared keys
    try:
        jsonschema.validate(cfg, schema)
    except jsonschema.ValidationError as e:
        where = ".".join(map(str, e.absolute_path)) or "(top level)"
        raise SystemExit(f"config after --set is invalid at {where}: {e.message}") from None
    return cfg


def snakemake_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "snakemake"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]


def run_snakemake(folder: Path, targets: list[str], threads: int, log: Path, extra: tuple[str, ...] = ()) -> float:
    """One Snakemake call in ``folder`` (targets before --configfile, which takes several values); its wall seconds."""
    env = {**os.environ, **OFFLINE_ENV, "SNAKEMAKE_PROFILE": str(ROOT / "profiles/local")}
    cmd = [
        *snakemake_cmd(),
        *targets,
        "--cores",
        str(threads),
        *extra,
        "-s",
        str(ROOT / "workflow/Snakefile"),
        "--directory",
        str(folder),
        "--configfile",
        str(folder / "config.yaml"),
    ]
    t0 = time.time()
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=folder, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if proc.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"snakemake {' '.join(targets)} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return seconds


def rule_seconds(folder: Path) -> dict[str, float]:
    """Wall seconds per rule, summed over its jobs, from Snakemake's benchmark files (benchmarks/<rule>/...)."""
    out: dict[str, float] = {}
    for tsv in sorted((folder / "benchmarks").rglob("*.tsv")):
        lines = tsv.read_text(encoding="utf-8").splitlines()
        if len(lines) < 2:
            continue
        row = dict(zip(lines[0].split("\t"), lines[1].split("\t")))
        rule = tsv.relative_to(folder / "benchmarks").parts[0]
        if rule == "train":  # benchmarks/train/finetune_run0.tsv, pretrain.tsv
            rule = tsv.stem.split("_run")[0]
        elif rule == "evaluate" and "baseline" in tsv.parts:
            rule = "evaluate_baseline"
        try:
            out[rule] = round(out.get(rule, 0.0) + float(row["s"]), 2)
        except (KeyError, ValueError):
            continue
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


FUNNEL_STATS = {
    "validate": f"work/data/finetune/validated/{TRAIN_TASK}.stats.json",
    "dedup": "work/data/finetune/dedup.stats.json",
    "decontaminate": "work/data/finetune/decontaminated.stats.json",
    "mine": "work/data/finetune/mined.stats.json",
}
"""The stage gathers (`kalm shards merge-stats`) ours' training call builds beside models/soup: with the
sharded data plane the soup needs only the per-shard stats, not these."""


def funnel(folder: Path, cfg: dict) -> dict:
    """Records in and kept at each data stage of ours, with the reasons for drops."""
    out: dict[str, Any] = {}
    for name, rel in FUNNEL_STATS.items():
        path = folder / rel
        if path.exists():
            s = _read_json(path)
            out[name] = {"in": s.get("in"), "kept": s.get("kept"), "dropped": s.get("dropped", {})}
    runs = []
    for r in range(cfg["finetune"]["runs"]):
        path = folder / "models" / "finetune" / f"run{r}.stats.json"
        if path.exists():
            s = _read_json(path)
            runs.append(
                {
                    "in": s.get("in"),
                    "kept": s.get("kept"),
                    "dropped": s.get("dropped", {}),
                    "steps": s.get("steps"),
                    "negatives_padded_random": s.get("negatives_padded_random"),
                    "loss_first": s.get("loss_first"),
                    "loss_last": s.get("loss_last"),
                }
            )
    out["finetune_runs"] = runs
    return out


# Compute as token passes: a training step costs ~3 forward passes of its tokens (forward + backward,
# Kaplan et al. 2020's 6N vs 2N FLOPs per token), an embedding (mining) pass 1. Both sides train the
# same model at the same max_seq_length, so the ratio of token passes is the ratio of FLOPs.
TRAIN_PASSES, EMBED_PASSES = 3, 1


def count_tokens(model_spec: str, texts: list[str], max_seq_length: int) -> int:
    """Non-padding tokens of ``texts`` as the model encodes them (special tokens in, cut at max_seq_length)."""
    from transformers import AutoTokenizer

    from kalm.models.modeling import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model_spec))
    return sum(len(ids) for ids in tok(texts, truncation=True, max_length=max_seq_length)["input_ids"])


def ours_texts_encoded(folder: Path, cfg: dict) -> dict:
    """Texts (and tokens) the model encoded to build the soup: mining embeddings + each step's queries
    and passages."""
    embed_texts = [t for p in sorted((folder / "work" / "embed").glob("shard*.ids.json")) for t in _read_json(p)]
    train, queries, steps, train_tokens = 0, 0, [], 0
    for r in range(cfg["finetune"]["runs"]):
        lines = (folder / "models" / "finetune" / f"run{r}.metrics.jsonl").read_text(encoding="utf-8").splitlines()
        metrics = [json.loads(line) for line in lines if line.strip()]
        steps.append(len(metrics))
        queries += sum(m.get("batch", 0) for m in metrics)
        train += sum(m.get("batch", 0) + m.get("passages", 0) for m in metrics)
        train_tokens += sum(m["tokens"] for m in metrics)
    embed_tokens = count_tokens(cfg["base_model"], embed_texts, cfg["max_seq_length"])
    return {
        "embed": len(embed_texts),
        "train": train,
        "total": len(embed_texts) + train,
        "steps": steps,
        "queries": queries,
        "embed_tokens": embed_tokens,
        "train_tokens": train_tokens,
        "token_passes": EMBED_PASSES * embed_tokens + TRAIN_PASSES * train_tokens,
    }


def _tree_mtime(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*")), default=0.0)


def score_of(sidecar: Path) -> dict:
    s = _read_json(sidecar)
    return {
        "ndcg_at_10": s["main_score"],
        "metric": s["metric"],
        "instruction": s.get("instruction"),
        "eval_seconds": s.get("seconds"),
    }


def run_ours(args: argparse.Namespace, work: Path, split: dict, overrides) -> tuple[dict, dict, dict]:
    """The pipeline: training timed apart from evaluation; returns (ours row, base row, details)."""
    folder = work / "ours"
    if folder.exists():
        shutil.rmtree(folder)  # a fresh run: Snakemake must not reuse an earlier variant's outputs
    folder.mkdir(parents=True)
    cfg = ours_config(args.config, overrides, split)
    import yaml

    (folder / "config.yaml").write_text(
        "# Written by scripts/compare_plain.py from "
        + str(args.config)
        + "\n"
        + yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False),
        encoding="utf-8",
    )
    print(f"ours: snakemake models/soup in {folder} ...", file=sys.stderr, flush=True)
    train_s = run_snakemake(
        folder, ["models/soup", *FUNNEL_STATS.values()], args.threads, folder / "snakemake.train.log"
    )
    print(f"ours: trained in {train_s:.1f} s; evaluating ...", file=sys.stderr, flush=True)
    built = _tree_mtime(folder / "models")
    # --rerun-triggers mtime: only evaluate what was just trained, even if the workflow's code changed
    # in the meantime (Snakemake would otherwise rebuild everything before evaluating it)
    eval_s = run_snakemake(
        folder,
        ["results/mteb_zh.json", "results/baseline/mteb_zh.json"],
        args.threads,
        folder / "snakemake.eval.log",
        ("--rerun-triggers", "mtime"),
    )
    if _tree_mtime(folder / "models") != built:
        raise SystemExit(
            f"ours: the evaluation call rebuilt models/ (see {folder / 'snakemake.eval.log'}): "
            "the training wall time would not be the evaluated model's"
        )
    texts = ours_texts_encoded(folder, cfg)
    ft = cfg["finetune"]
    batch = round(texts["queries"] / max(1, sum(texts["steps"])))  # below batch_size when the data is smaller
    sizes = f"{ft['runs']}x{max(texts['steps'], default=0)}x{batch} (group {ft['group_size']})"
    details = {
        "rule_seconds": rule_seconds(folder),
        "funnel": funnel(folder, cfg),
        "overrides": {".".join(k): v for k, v in overrides},
        "eval_wall_s": round(eval_s, 2),
    }
    ours = {
        "side": "ours",
        "model": "models/soup",
        **score_of(folder / "results/mteb/zh" / f"{TASK}.kalm.json"),
        "train_wall_s": round(train_s, 2),
        "steps_x_batch": sizes,
        "train_queries": texts["queries"],
        "texts_encoded": texts["total"],
        "token_passes": texts["token_passes"],
        "texts_encoded_detail": texts,
    }
    base = {
        "side": "base",
        "model": cfg["base_model"],
        **score_of(folder / "results/baseline/mteb/zh" / f"{TASK}.kalm.json"),
        "train_wall_s": 0.0,
        "steps_x_batch": "-",
        "train_queries": 0,
        "texts_encoded": 0,
    }
    return ours, base, details


# --------------------------------------------------------------------------------------------
# plain: sentence-transformers' recipe
# --------------------------------------------------------------------------------------------


def plain_child(spec_path: Path) -> None:
    """Runs in its own process: train with SentenceTransformerTrainer + MNRL, save, write a result JSON."""
    spec = _read_json(spec_path)
    t0 = time.time()
    try:
        import accelerate  # noqa: F401  (transformers' Trainer needs it; the pipeline does not)
    except ImportError:
        raise SystemExit(
            "the plain side needs accelerate>=1.1 (pyproject's bench extra): .venv/bin/pip install 'accelerate>=1.1'"
        ) from None
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from kalm.io import read_jsonl
    from kalm.models.modeling import load_embedding_model

    torch.set_num_threads(spec["threads"])
    records = list(read_jsonl(spec["data"]))
    dataset = Dataset.from_dict({"anchor": [r["query"] for r in records], "positive": [r["pos"][0] for r in records]})
    device = "cuda" if spec["gpu"] and torch.cuda.is_available() else "cpu"
    model = load_embedding_model(
        spec["model"], max_seq_length=spec["max_seq_length"], device=device, pooling=spec["pooling"]
    )
    counts = {"texts": 0, "steps": 0, "tokens": 0}

    class CountingMNRL(MultipleNegativesRankingLoss):
        """MNRL that counts the texts and non-padding tokens it encodes (every column of every batch)."""

        def forward(self, sentence_features, labels):
            sentence_features = list(sentence_features)
            counts["texts"] += sum(int(f["input_ids"].shape[0]) for f in sentence_features)
            counts["tokens"] += sum(int(f["attention_mask"].sum()) for f in sentence_features)
            counts["steps"] += 1
            return super().forward(sentence_features, labels)

    targs = SentenceTransformerTrainingArguments(
        output_dir=str(Path(spec["out"]) / "trainer"),
        num_train_epochs=spec["epochs"],
        max_steps=spec["max_steps"] or -1,
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"],
        warmup_steps=spec["warmup"],
        lr_scheduler_type="linear",
        seed=spec["seed"],
        logging_steps=max(1, spec["log_every"]),
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        disable_tqdm=True,
    )
    losses = []

    from transformers import TrainerCallback

    class Losses(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = SentenceTransformerTrainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        loss=CountingMNRL(model, scale=spec["scale"]),
        callbacks=[Losses()],
    )
    out = trainer.train()
    model.save(str(Path(spec["out"]) / "model"))
    result = {
        "steps": trainer.state.global_step,
        "loss_steps": counts["steps"],
        "texts_encoded": counts["texts"],
        "tokens": counts["tokens"],
        "train_runtime_s": out.metrics.get("train_runtime"),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "records": len(records),
        "process_wall_s": round(time.time() - t0, 2),
    }
    (Path(spec["out"]) / "train.json").write_text(json.dumps(result) + "\n", encoding="utf-8")


def run_plain(args: argparse.Namespace, work: Path, split: dict, cfg: dict) -> tuple[dict, dict]:
    folder = work / "plain"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    spec = {
        "data": split["data"],
        "model": cfg["base_model"],
        "pooling": cfg.get("pooling") or "mean",
        "max_seq_length": args.plain_max_seq_length or cfg["max_seq_length"],
        "threads": args.threads,
        "epochs": args.plain_epochs,
        "max_steps": args.plain_max_steps,
        "batch_size": args.plain_batch_size,
        "lr": args.plain_lr,
        "warmup": args.plain_warmup,
        "scale": args.plain_scale,
        "seed": cfg["seed"],
        "log_every": 1,
        "out": str(folder),
        # on a GPU only where ours fine-tunes on one (config resources.gpus.finetune)
        "gpu": bool(cfg["resources"]["gpus"].get("finetune", 0)),
    }
    (folder / "spec.json").write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(args.threads)}
    print(f"plain: SentenceTransformerTrainer in {folder} ...", file=sys.stderr, flush=True)
    t0 = time.time()
    with (folder / "train.log").open("w", encoding="utf-8") as f:
        proc = subprocess.run(
            [sys.executable, __file__, "--plain-child", str(folder / "spec.json")],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    wall = time.time() - t0
    if proc.returncode:
        tail = (folder / "train.log").read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"plain side failed (exit {proc.returncode}); log {folder / 'train.log'}:\n{tail}")
    res = _read_json(folder / "train.json")
    print(f"plain: trained in {wall:.1f} s; evaluating ...", file=sys.stderr, flush=True)
    t0 = time.time()
    score = evaluate(args, work, cfg, str(folder / "model"), "plain", instruction=False)
    res["eval_wall_s"] = round(time.time() - t0, 2)
    row = {
        "side": "plain",
        "model": str(folder / "model"),
        **score,
        "train_wall_s": round(wall, 2),
        "steps_x_batch": f"{res['steps']}x{round(res['texts_encoded'] / 2 / max(1, res['loss_steps']))}",
        "train_queries": res["texts_encoded"] // 2,
        "texts_encoded": res["texts_encoded"],
        "token_passes": TRAIN_PASSES * res["tokens"],
    }
    return row, {"train": res, "spec": spec}


# --------------------------------------------------------------------------------------------
# Evaluation outside the pipeline: the pipeline's own `kalm evaluate` command
# --------------------------------------------------------------------------------------------


def constructed_task_spec(cfg: dict) -> dict:
    """The task spec the pipeline's evaluate rule gives `kalm evaluate` (eval_task_spec of workflow/rules/common.smk)."""
    spec = {**cfg["eval"]["tasks"][TASK], "name": TASK, "lang": "zh"}
    if cfg["eval"].get("instruction_set"):
        spec["instruction_set"] = cfg["eval"]["instruction_set"]
    return spec


def pipeline_task_spec(folder: Path) -> dict | None:
    """The --task-json ours' baseline evaluate job ran with (its log's first line, from kalm gpu-slots), so
    that the script's evaluations use the pipeline's very spec; None when ours has not run."""
    import shlex

    log = folder / "logs" / "evaluate" / "results" / "baseline" / "zh" / f"{TASK}.log"
    if not log.exists():
        return None
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if "--task-json" in line:
            try:
                words = shlex.split(line[line.index(" -m kalm evaluate") :])
                return json.loads(words[words.index("--task-json") + 1])
            except (ValueError, IndexError):
                return None
    return None


def evaluate(args: argparse.Namespace, work: Path, cfg: dict, model: str, name: str, instruction: bool) -> dict:
    """`kalm evaluate` as the pipeline's evaluate rule runs it (same task folder, batch size, max length,
    threads); ``instruction=False`` gives the task an empty instruction (no prefix on either side)."""
    spec = pipeline_task_spec(work / "ours") or constructed_task_spec(cfg)
    if not instruction:
        spec["instruction"] = ""
    out = work / "evals" / f"{name}.{'instr' if instruction else 'noinstr'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "kalm",
        "evaluate",
        "--model",
        model,
        "--task-json",
        json.dumps(spec, ensure_ascii=False),
        "--out",
        str(out),
        "--batch-size",
        str(cfg["eval"]["batch_size"]),
        "--max-seq-length",
        str(cfg["max_seq_length"]),
    ]
    if cfg.get("pooling"):
        cmd += ["--pooling", cfg["pooling"]]
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(args.threads)}
    if not cfg["resources"]["gpus"].get("evaluate", 0):
        env["CUDA_VISIBLE_DEVICES"] = ""  # as kalm gpu-slots --gpus 0 runs the pipeline's evaluate jobs
    log = out.with_suffix(".log")
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"kalm evaluate {name} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return score_of(out.with_name(out.name.removesuffix(".json") + ".kalm.json"))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def markdown(rows: list[dict], split: dict, details: dict) -> str:
    lines = [
        f"CSL title -> abstract, {split['held_out']} held-out papers (queries = their titles, corpus = their "
        f"abstracts), {split['train']} training pairs; split fingerprint {split['fingerprint']}.",
        "",
        "| side | instruction | nDCG@10 (held out) | train wall s | steps x batch | texts encoded "
        "| compute (M token-passes) |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        side = r["side"] + (" (earlier run)" if r.get("earlier_run") else "")
        instr = "task's" if r.get("instruction") else "none"
        wall = f"{r['train_wall_s']:.1f}" if r.get("train_wall_s") else "-"
        texts = f"{r['texts_encoded']:,}" if r.get("texts_encoded") else "-"
        compute = f"{r['token_passes'] / 1e6:.2f}" if r.get("token_passes") else "-"
        lines.append(
            f"| {side} | {instr} | {100 * r['ndcg_at_10']:.2f} | {wall} | {r['steps_x_batch']} | {texts} | {compute} |"
        )
    ours = details.get("ours") or {}
    if ours.get("funnel"):
        f = ours["funnel"]
        parts = []
        for stage in ("validate", "dedup", "decontaminate", "mine"):
            if stage in f:
                s = f[stage]
                drops = ", ".join(f"{k} {v}" for k, v in s["dropped"].items() if v)
                parts.append(f"{stage} {s['in']} -> {s['kept']}" + (f" ({drops})" if drops else ""))
        for r, run in enumerate(f.get("finetune_runs", [])):
            drops = ", ".join(f"{k} {v}" for k, v in (run.get("dropped") or {}).items() if v)
            parts.append(f"finetune run{r} {run['in']} -> {run['kept']}" + (f" ({drops})" if drops else ""))
        lines += ["", "ours, training records: " + "; ".join(parts) + "."]
    if ours.get("rule_seconds"):
        lines += [
            "",
            "ours, wall seconds per rule (Snakemake benchmarks, summed over jobs): "
            + ", ".join(f"{k} {v:.1f}" for k, v in ours["rule_seconds"].items())
            + ".",
        ]
    if details.get("comparison_wall_s"):
        lines += [
            "",
            f"This comparison (split, both sides' training and every evaluation): "
            f"{details['comparison_wall_s']:.0f} s wall.",
        ]
    if ours.get("overrides"):
        lines += ["", "ours, --set: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in ours["overrides"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument(
        "--work",
        type=Path,
        default=ROOT / "real" / "compare_plain",
        help="output folder (git-ignored by default; its sides' folders are replaced on each run)",
    )
    p.add_argument("--config", type=Path, default=ROOT / "config" / "csl_compare.yaml", help="ours' recipe")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of --config, dotted, value in YAML (repeatable): finetune.lr=5e-5, "
        "mine.range_for_sampling=[10,60], mine.margin_ratio=null",
    )
    p.add_argument("--held-out-share", type=float, default=0.5, help="share of the papers held out for evaluation")
    p.add_argument("--max-papers", type=int, default=None, help="only the first N papers of the file (smoke runs)")
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads of every job on both sides (and Snakemake's --cores)"
    )
    p.add_argument("--sides", default="ours,plain", help="comma-separated sides to run now: ours, plain")
    p.add_argument(
        "--cross-instructions",
        action="store_true",
        help="also score ours without and plain with the task's instruction",
    )
    p.add_argument("--plain-epochs", type=float, default=3)
    p.add_argument(
        "--plain-max-steps", type=int, default=None, help="stop plain after this many steps (overrides epochs)"
    )
    p.add_argument("--plain-batch-size", type=int, default=32)
    p.add_argument("--plain-lr", type=float, default=5e-5)
    p.add_argument("--plain-warmup", type=float, default=0.1, help="warm-up, share of the steps")
    p.add_argument("--plain-scale", type=float, default=20.0, help="MNRL scale = 1 / temperature")
    p.add_argument("--plain-max-seq-length", type=int, default=None, help="default: the config's max_seq_length")
    p.add_argument("--plain-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    t_start = time.time()
    if args.plain_child:
        plain_child(args.plain_child)
        return 0
    sides = {s.strip() for s in args.sides.split(",") if s.strip()}
    if not sides or sides - {"ours", "plain"}:
        p.error(f"--sides {args.sides!r}: choose from ours, plain")
    if not 0 < args.held_out_share < 1:
        p.error("--held-out-share must be in (0, 1)")
    if not (args.shared / "csl" / "ts" / "dev.tsv").is_file():
        print(f"{args.shared}: no csl/ts/dev.tsv (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    work = args.work.resolve()
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        p.error(f"--work {work} exists, is not empty and was not made by this script: choose another folder")
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).touch()
    overrides = parse_set(args.overrides)

    split = write_split(args.shared, work, args.held_out_share, args.max_papers)
    cfg = ours_config(args.config, overrides, split)  # validated before anything runs
    print(f"split: {split['train']} training pairs, {split['held_out']} held-out papers", file=sys.stderr, flush=True)

    rows: dict[str, dict] = {}
    details: dict[str, Any] = {"split": split}
    earlier_path = work / "sides.json"
    earlier = _read_json(earlier_path) if earlier_path.exists() else {}
    if "ours" in sides:
        rows["ours"], rows["base"], details["ours"] = run_ours(args, work, split, overrides)
    if "plain" in sides:
        rows["plain"], details["plain"] = run_plain(args, work, split, cfg)
    # the other side's last result, if it was made on this very split
    for side in ("ours", "plain"):
        if side not in sides and earlier.get(side, {}).get("fingerprint") == split["fingerprint"]:
            rows[side] = {**earlier[side]["row"], "earlier_run": True}
            details[side] = earlier[side]["details"]
            if side == "ours" and "base" in earlier.get(side, {}):
                rows["base"] = {**earlier[side]["base"], "earlier_run": True}
    store = dict(earlier)
    for side in sides:
        store[side] = {
            "fingerprint": split["fingerprint"],
            "row": rows[side],
            "details": details[side],
            **({"base": rows["base"]} if side == "ours" else {}),
        }
    earlier_path.write_text(json.dumps(store, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    # the base model as plain sees it (no instruction), and optional cross-instruction scores
    rows["base_noinstr"] = {
        "side": "base",
        "model": cfg["base_model"],
        **evaluate(args, work, cfg, cfg["base_model"], "base", instruction=False),
        "train_wall_s": 0.0,
        "steps_x_batch": "-",
        "train_queries": 0,
        "texts_encoded": 0,
    }
    if args.cross_instructions:
        if "ours" in rows and (work / "ours" / "models" / "soup").is_dir():
            rows["ours_noinstr"] = {
                **rows["ours"],
                **evaluate(args, work, cfg, str(work / "ours/models/soup"), "ours", instruction=False),
            }
        if "plain" in rows and Path(rows["plain"]["model"]).is_dir():
            rows["plain_instr"] = {
                **rows["plain"],
                **evaluate(args, work, cfg, rows["plain"]["model"], "plain", instruction=True),
            }
    order = ["base", "base_noinstr", "ours", "ours_noinstr", "plain", "plain_instr"]
    table = [rows[k] for k in order if k in rows]
    jsonl = [
        json.dumps(
            {**r, "held_out_papers": split["held_out"], "train_pairs": split["train"], "threads": args.threads},
            ensure_ascii=False,
        )
        for r in table
    ]
    details["comparison_wall_s"] = round(time.time() - t_start, 1)
    md = markdown(table, split, details)
    (work / "comparison.jsonl").write_text("\n".join(jsonl) + "\n", encoding="utf-8")
    (work / "comparison.md").write_text(md, encoding="utf-8")
    (work / "details.json").write_text(json.dumps(details, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print("\n".join(jsonl))
    print()
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
