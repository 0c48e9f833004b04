"""Contrastive training: one direct loop for both stages (in the spirit of nanoGPT).

- ``pretrain``: weak pairs, in-batch negatives only.
- ``finetune``: mined hard negatives, ``group_size`` = 1 positive + (group_size - 1) negatives.

Batches are task-homogeneous: every batch is drawn from one task, so in-batch negatives are
of the same kind as the positive (KaLM). Queries carry their task instruction; symmetric
tasks (STS-like) carry it on both sides. Metrics go to a JSON Lines file, one line per step.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kalm.instructions import format_passage, format_query
from kalm.io import atomic_path, read_jsonl, write_jsonl
from kalm.losses import info_nce, matryoshka, mix_hard_negatives

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    stage: str = "finetune"
    batch_size: int = 32
    group_size: int = 8
    lr: float = 1e-5
    temperature: float = 0.01
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    max_seq_length: int | None = None
    threads: int | None = None
    focal_gamma: float = 0.0
    mix_negatives: int = 0  # synthetic negatives per query; -1 = as many as its mined negatives
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()


def task_homogeneous_batches(records: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """Shuffle within each task, cut into batches, shuffle the batch order.

    A task's last partial batch is kept when it has at least two examples (a batch of one has
    no in-batch negatives).
    """
    by_task: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_task[rec["task"]].append(rec)
    batches = []
    for task in sorted(by_task):
        recs = by_task[task][:]
        rng.shuffle(recs)
        batches += [b for i in range(0, len(recs), batch_size) if len(b := recs[i:i + batch_size]) >= 2]
    rng.shuffle(batches)
    return batches


def batch_texts(batch: list[dict], n_neg: int, symmetric: dict[str, bool], rng: random.Random) -> tuple[list[str], list[str]]:
    """Query texts, then passages: one positive per query followed by every hard negative.

    A record with fewer than ``n_neg`` negatives contributes the ones it has (the batch then
    has a ragged negative count and skips hard-negative mixing).
    """
    queries, positives, negatives = [], [], []
    for rec in batch:
        instr, sym = rec.get("instruction"), symmetric.get(rec["task"], False)
        queries.append(format_query(rec["query"], instr))
        positives.append(format_passage(rng.choice(rec["pos"]), instr, sym))
        negs = rec.get("neg", [])
        chosen = rng.sample(negs, n_neg) if len(negs) >= n_neg else negs
        negatives += [format_passage(n, instr, sym) for n in chosen]
    return queries, positives + negatives


def embed(model, texts: list[str]) -> tuple[torch.Tensor, int]:
    """Embeddings of ``texts`` (with gradients) and the number of non-padding tokens encoded."""
    features = model.preprocess(texts)
    features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
    return model(features)["sentence_embedding"], int(features["attention_mask"].sum())


def contrastive_loss(q: torch.Tensor, p: torch.Tensor, cfg: TrainConfig, negs_per_query: int = 0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """InfoNCE (+ focal weights, + mixed negatives, + Matryoshka prefixes) as configured.

    ``p`` is laid out as the B positives, then ``negs_per_query`` negatives per query in query
    order (0 when the batch's queries do not all have the same number: no mixing then).
    """
    b = q.shape[0]
    k = negs_per_query if cfg.mix_negatives < 0 else cfg.mix_negatives

    def nce(a, c):
        extra = None
        if k and negs_per_query >= 2:
            extra = mix_hard_negatives(c[b:].reshape(b, negs_per_query, -1), k, generator)
        return info_nce(a, c, cfg.temperature, focal_gamma=cfg.focal_gamma, extra_negatives=extra)

    if cfg.matryoshka_dims:
        return matryoshka(nce, q, p, cfg.matryoshka_dims, cfg.matryoshka_weights)
    return nce(q, p)


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up, then linear decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * max(0.0, (total - step) / max(1, total - warmup))


def batch_at(records: list[dict], cfg: TrainConfig, step: int, steps_per_epoch: int) -> list[dict]:
    """The batch of global step ``step``: a pure function of (seed, step), so resume is exact."""
    epoch, position = divmod(step, steps_per_epoch)
    return task_homogeneous_batches(records, cfg.batch_size, random.Random(f"{cfg.seed}:epoch:{epoch}"))[position]


class Checkpoint:
    """Resumable training state, kept OUTSIDE the rule's declared output.

    Snakemake deletes a rule's outputs (``directory()`` included) before re-running it, so the
    checkpoint lives in its own folder. It holds the weights, optimizer state, step and the
    metrics so far; everything random is derived from (seed, step). A checkpoint whose
    fingerprint (start model, data, hyper-parameters) differs is ignored, never mixed in.
    """

    def __init__(self, folder: str | None, fingerprint: dict):
        self.path = Path(folder) / "checkpoint.pt" if folder else None
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        if not self.path or not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("ignoring checkpoint %s: it was made for another run configuration", self.path)
            return None
        return state

    def save(self, model, optimizer, step: int, metrics: list[dict]) -> None:
        if not self.path:
            return
        with atomic_path(self.path) as tmp:
            torch.save({"fingerprint": self.fingerprint, "step": step, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "metrics": metrics}, tmp)

    def remove(self) -> None:
        if self.path:
            self.path.unlink(missing_ok=True)


def _fingerprint(model_spec: str, data_path: str, cfg: TrainConfig) -> dict:
    data = Path(data_path).stat()
    return {"model": model_spec, "data": str(data_path), "data_size": data.st_size,
            "data_mtime_ns": data.st_mtime_ns, "config": {k: v for k, v in asdict(cfg).items() if k != "threads"}}


def train(model_spec: str, data_path: str, out_dir: str, cfg: TrainConfig, symmetric: dict[str, bool],
          metrics_path: str | None = None, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
          stop_after_steps: int | None = None) -> dict:
    """Train and save a sentence-transformers model to ``out_dir``.

    With ``checkpoint_dir``, state is saved every ``checkpoint_every`` steps and a re-run after a
    kill resumes from it, ending (on CPU) with the same weights as an uninterrupted run.
    ``stop_after_steps`` simulates a kill (tests): the process exits abruptly after that step.
    """
    from kalm.modeling import load_embedding_model, save_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_embedding_model(model_spec, max_seq_length=cfg.max_seq_length)
    model.train()
    records = list(read_jsonl(data_path))
    if not records:
        raise ValueError(f"{data_path}: no training records")
    n_neg = 0 if cfg.stage == "pretrain" else cfg.group_size - 1
    steps_per_epoch = len(task_homogeneous_batches(records, cfg.batch_size, random.Random(0)))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_ratio * total)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    checkpoint = Checkpoint(checkpoint_dir, _fingerprint(model_spec, data_path, cfg))
    step, metrics = 0, []
    if (state := checkpoint.load()) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, metrics = state["step"], state["metrics"]
        log.info("resuming %s from step %d (%s)", cfg.stage, step, checkpoint.path)
    log.info("%s: %d records, %d steps (%d per epoch), batch %d, group %d", cfg.stage, len(records), total,
             steps_per_epoch, cfg.batch_size, n_neg + 1)
    t_start = time.time()
    while step < total:
        t0 = time.time()
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout masks: a function of the step
        sample_rng = random.Random(f"{cfg.seed}:step:{step}")
        mix_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        batch = batch_at(records, cfg, step, steps_per_epoch)
        lr = lr_at(step, total, warmup, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        queries, passages = batch_texts(batch, n_neg, symmetric, sample_rng)
        per_query = (len(passages) - len(queries)) // len(queries)
        uniform = per_query * len(queries) == len(passages) - len(queries)
        (q_emb, q_tok), (p_emb, p_tok) = embed(model, queries), embed(model, passages)
        loss = contrastive_loss(q_emb, p_emb, cfg, per_query if uniform else 0, mix_gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{cfg.stage}: loss is {loss.item()} at step {step + 1} (task {batch[0]['task']})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        step += 1
        dt = time.time() - t0
        metrics.append({"step": step, "stage": cfg.stage, "task": batch[0]["task"], "loss": round(loss.item(), 6),
                        "lr": lr, "batch": len(batch), "passages": len(passages),
                        "samples_per_s": round(len(batch) / dt, 3), "tokens_per_s": round((q_tok + p_tok) / dt, 1),
                        "elapsed_s": round(time.time() - t_start, 3)})
        if step == 1 or step % 10 == 0 or step == total:
            log.info("step %d/%d loss %.4f lr %.2e (%s)", step, total, metrics[-1]["loss"], lr, batch[0]["task"])
        if checkpoint_every and step % checkpoint_every == 0 and step < total:
            checkpoint.save(model, optimizer, step, metrics)
        if stop_after_steps is not None and step >= stop_after_steps:
            log.warning("stopping abruptly after step %d (simulated kill)", step)
            os._exit(137)
    model.eval()
    save_model(model, out_dir)
    write_jsonl(metrics_path or f"{out_dir}.metrics.jsonl", metrics)
    checkpoint.remove()
    return {"steps": total, "seconds": round(time.time() - t_start, 3)}


def _run(args: argparse.Namespace) -> None:
    cfg = TrainConfig(stage=args.stage, batch_size=args.batch_size, group_size=args.group_size, lr=args.lr,
                      temperature=args.temperature, epochs=args.epochs, max_steps=args.max_steps,
                      warmup_ratio=args.warmup_ratio, seed=args.seed, max_seq_length=args.max_seq_length,
                      threads=args.threads, focal_gamma=args.focal_gamma, mix_negatives=args.mix_negatives,
                      matryoshka_dims=tuple(args.matryoshka_dims or ()),
                      matryoshka_weights=tuple(args.matryoshka_weights or ()))
    train(args.model, args.data, args.out, cfg, json.loads(args.symmetric), args.metrics,
          checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
          stop_after_steps=args.stop_after_steps)


def register(sub) -> None:
    p = sub.add_parser("train", help="contrastive pretraining or fine-tuning")
    p.add_argument("--stage", choices=["pretrain", "finetune"], required=True)
    p.add_argument("--model", required=True, help="model spec to start from")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", help="per-step metrics JSONL")
    p.add_argument("--symmetric", default="{}", help='JSON {"task": bool}: instruction on both sides')
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--temperature", type=float, default=0.01)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--checkpoint-dir", help="resumable state, outside the declared output (Snakemake deletes those)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: none)")
    p.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # tests: simulate a kill
    p.add_argument("--focal-gamma", type=float, default=0.0, help="focal reweighting exponent (KaLM V2: 0.5)")
    p.add_argument("--mix-negatives", type=int, default=0,
                   help="synthetic mixed negatives per query (-1: as many as its hard negatives)")
    p.add_argument("--matryoshka-dims", type=int, nargs="+", help="prefix dims for the Matryoshka loss")
    p.add_argument("--matryoshka-weights", type=float, nargs="+", help="one weight per Matryoshka dim")
    p.set_defaults(func=_run)
