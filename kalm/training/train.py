"""Contrastive training: one direct loop for both stages (in the spirit of nanoGPT).

- ``pretrain``: weak pairs, in-batch negatives only.
- ``finetune``: mined hard negatives, ``group_size`` = 1 positive + (group_size - 1) negatives.

One step, top to bottom (``train``):

1. the batch of global step t is a pure function of (seed, t) (``BatchSchedule``): task-homogeneous
   (KaLM), or semi-homogeneous with ``homogeneous_ratio`` < 1. Batches are rows of a small index (per
   record its row and task code); the texts stay on disk, memory-mapped (``kalm.training.train_data``: the
   Parquet parts or JSON Lines through an Arrow cache), and a step reads only its batch's records;
2. its texts (``batch_texts``): queries carry their task instruction, symmetric tasks (STS-like) carry
   it on both sides; a record short of hard negatives is dropped, padded with random passages of its
   task, or kept ragged (``few_negatives``), and counted;
3. with torchrun (WORLD_SIZE > 1) each rank encodes its slice of the global batch; embeddings are
   all-gathered so every query sees every rank's passages (cross-device negatives);
4. encoding runs under bf16 autocast (``precision``), with gradient checkpointing if asked, and in
   GradCache chunks of ``mini_batch_size`` texts (``forward_backward``);
5. the loss (``contrastive_loss``: InfoNCE + focal + mixed negatives + Matryoshka) and its terms go to
   the metrics JSON Lines file, one line per step, and to the experiment tracker if one is configured
   (``kalm.training.tracking``: the same numbers); counts go to a stats JSON at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kalm import options
from kalm.io import StageStats, read_json, write_jsonl
from kalm.training.batches import BatchSchedule, batch_texts
from kalm.training.checkpoints import Checkpoint, SnapshotKeeper, _fingerprint, snapshot_dir
from kalm.training.config import SAVE_DTYPES, TrackingConfig, TrainConfig
from kalm.training.distributed import Distributed, rank_slices
from kalm.training.encoding import (
    autocast_dtype,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    forward_backward,
)
from kalm.training.objective import contrastive_loss, lr_at, make_optimizer
from kalm.training.tracking import job_tracking, make_tracker
from kalm.training.train_data import (
    convert_parts,
    data_parts,
    open_data,
    remove_cache,
)

log = logging.getLogger(__name__)


def fp32_master_weights(model) -> torch.dtype | None:
    """Cast the model's floating-point weights to fp32 when the checkpoint stored another dtype.

    transformers loads a checkpoint in the dtype its config names (Qwen2-0.5B: bfloat16). AdamW on
    bf16 weights loses most updates: an update of lr 1e-5 on a weight of 0.02 is below half a bf16
    ulp (2^-8 relative), so it rounds to nothing. Training keeps fp32 master weights and optimizer
    state; bf16 enters only through autocast (``precision``). Returns the dtype found, if not fp32.
    """
    dtypes = {t.dtype for t in model.parameters() if t.is_floating_point()}
    if dtypes <= {torch.float32}:
        return None
    model.float()
    found = sorted(dtypes - {torch.float32}, key=str)[0]
    log.info("checkpoint weights are %s: training on fp32 master weights", str(found).replace("torch.", ""))
    return found


class Progress:
    """When to log a progress line, and its text: ``step s/N (p%), r steps/s, ETA h:mm:ss``, at most one
    per ``every_s`` seconds (the first and the last step always; 0: every step). The rate is over the steps
    this process ran (a resumed run does not count the steps before its checkpoint)."""

    def __init__(self, total: int, start_step: int, every_s: float, clock=time.time):
        self.total, self.start, self.every_s, self.clock = total, start_step, every_s, clock
        self.t0 = self.last = clock()

    def line(self, step: int) -> str | None:
        now = self.clock()
        if not (step == self.start + 1 or step == self.total or now - self.last >= self.every_s):
            return None
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = int(round((self.total - step) / rate))
        return (
            f"step {step}/{self.total} ({100 * step / self.total:.1f}%), {rate:.3g} steps/s, "
            f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        )


class PeriodicEval:
    """Held-out scores during training (``eval_every``) and the best model by the first task's score."""

    def __init__(self, tasks: list[dict] | None, every: int, total: int, best_dir: Path, metrics: list[dict]):
        self.tasks, self.every, self.total, self.best_dir = list(tasks or []), every, total, best_dir
        self.active = bool(self.tasks and every)
        self.prepared = None
        self.key = f"eval_{self.tasks[0]['name']}" if self.tasks else None
        seen = [m for m in metrics if self.key and self.key in m]  # a resumed run: its best so far
        best = max(seen, key=lambda m: m[self.key], default=None)
        self.best = (best["step"], best[self.key]) if best else None

    def due(self, step: int) -> bool:
        return self.active and (step % self.every == 0 or step == self.total)

    def run(self, model, step: int, prompts: dict[str, str] | None) -> dict[str, float]:
        from kalm.evaluation.evaluate import prepare_task
        from kalm.models.modeling import save_model
        from kalm.soup import dev_score

        if self.prepared is None:
            self.prepared = [prepare_task(t) for t in self.tasks]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            scores = {f"eval_{t['name']}": round(dev_score(model, p), 6) for t, p in zip(self.tasks, self.prepared)}
        model.train(was_training)
        if self.best is None or scores[self.key] > self.best[1]:
            self.best = (step, scores[self.key])
            save_model(model, self.best_dir, prompts)  # atomic; fp32, as trained
        log.info("step %d: held-out %s (best %s at step %d)", step, scores, self.best[1], self.best[0])
        return scores

    def summary(self) -> dict:
        return {"eval_best_step": self.best[0], "eval_best_score": self.best[1], "eval_key": self.key}

    def export(self, out: str) -> None:
        from kalm.io import atomic_path

        with atomic_path(out, is_dir=True) as tmp:
            shutil.copytree(self.best_dir, tmp, dirs_exist_ok=True)
        shutil.rmtree(self.best_dir, ignore_errors=True)


def train(
    model_spec: str,
    data_path: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str,
    cfg: TrainConfig,
    symmetric: dict[str, bool],
    metrics_path: str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    stop_after_steps: int | None = None,
    stats_path: str | None = None,
    keep_snapshots: int = 0,
    snapshot_every: int = 0,
    in_batch: dict[str, bool] | None = None,
    data_cache: str | None = None,
    tracking: TrackingConfig | None = None,
    prompts: dict[str, str] | None = None,
    task_mix: dict[str, dict] | None = None,
    eval_tasks: list[dict] | None = None,
    best_out: str | None = None,
) -> dict:
    """Train and save a sentence-transformers model to ``out_dir``.

    ``data_path``: Parquet parts (``kalm.data.shards``) or JSON Lines files, or folders of them, read
    in that order through an Arrow cache (``kalm.training.train_data``): ``data_cache`` if given (kept),
    else ``<checkpoint_dir>/arrow`` (removed with the checkpoint at the end), else a temporary folder.

    With ``checkpoint_dir``, state is saved every ``checkpoint_every`` steps and a re-run after a
    kill resumes from it, ending (on CPU) with the same weights as an uninterrupted run.
    ``stop_after_steps`` simulates a kill (tests): the process exits abruptly after that step.
    With ``keep_snapshots`` K and ``snapshot_every`` N, the model is also saved every N steps into
    ``<checkpoint_dir>/snapshots`` (the last K kept): the soup's last-k ingredients.
    ``in_batch``: {task: False} for tasks trained without in-batch negatives.
    ``tracking``: an experiment tracker (TensorBoard, W&B, MLflow) that gets the options and each step's
    metrics line too (run name: ``tracking.run_name``, else the stage).
    ``eval_tasks`` (local task specs) with ``cfg.eval_every`` N: every N steps and at the last, rank 0 scores
    the model on each (mteb's main score, as ``kalm evaluate``) into that step's metrics line
    (``eval_<task>``); the best model by the first task is kept (``<checkpoint_dir>/best``, which survives a
    kill) and written to ``best_out`` at the end. The scoring draws no random number, so the trained
    weights are those of a run without it.
    ``task_mix``: {task: {"weight": w, "max_records": m}}: the data mix (kalm.training.batches.mix_rows).
    ``prompts``: the saved model's prompts (kalm.release.prompts: its instructions, for encode_query and mteb).
    Under torchrun only rank 0 writes (model, metrics, stats, checkpoints, tracking).
    """
    from kalm.models.modeling import load_embedding_model, save_model

    if cfg.save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {sorted(SAVE_DTYPES)}, got {cfg.save_dtype!r}")
    if keep_snapshots > 0 and (not checkpoint_dir or snapshot_every <= 0):
        raise ValueError("keeping snapshots for the soup needs a checkpoint folder and snapshot_every > 0")

    parts = data_parts(data_path)
    ddp = Distributed()
    if ddp.rank:
        logging.getLogger().setLevel(logging.WARNING)  # one rank tells the story
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ddp.device()
    tracker = make_tracker(tracking, ddp.rank, cfg.stage)  # before any work: a missing package stops it here
    ddp.start(device)
    scratch = None if data_cache or checkpoint_dir else tempfile.TemporaryDirectory(prefix="kalm-train-arrow-")
    try:
        model = load_embedding_model(
            model_spec, max_seq_length=cfg.max_seq_length, device=device and str(device), pooling=cfg.pooling
        )
        device = model.device
        loaded_dtype = fp32_master_weights(model)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        amp = autocast_dtype(cfg.precision, device)
        n_neg = 0 if cfg.stage == "pretrain" else cfg.group_size - 1
        stats = StageStats(f"train_{cfg.stage}")
        # The texts stay on disk, memory-mapped: one process per node converts the parts to the
        # Arrow cache (a shared cache folder), the others wait; in RAM only the index (row, task).
        cache = Path(data_cache or (Path(checkpoint_dir) / "arrow" if checkpoint_dir else scratch.name))
        if scratch is not None or ddp.local_rank == 0:
            convert_parts(parts, cache)
        ddp.barrier()
        data = open_data(parts, cache, convert=False)
        n_short = data.apply_few_negatives(n_neg, cfg.few_negatives, stats)
        pad = data.random_passages if cfg.few_negatives == "pad_random" and n_short else None
        if not len(data):
            raise ValueError(f"{', '.join(map(str, parts))}: no training records")
        if cfg.distill_weight > 0 and not data.scored_by_teacher():
            raise ValueError(
                f"{cfg.stage}: distill.weight {cfg.distill_weight} but no record of {', '.join(map(str, parts))} has "
                "teacher scores (pos_teacher): set distill.teacher (rule teacher_score) or run kalm teacher-score"
            )
        if n_neg == 0 and in_batch and not all(in_batch.values()):
            raise ValueError(
                f"{cfg.stage}: in_batch_negatives false for {sorted(t for t, v in in_batch.items() if not v)} "
                "leaves those queries no negative (this stage has no hard negatives)"
            )
        schedule = BatchSchedule(data.rows, data.tasks, cfg, task_mix_codes(task_mix, data.task_names))
        if task_mix:
            stats.extra["records_per_epoch"] = dict(zip(data.task_names, schedule.task_counts.tolist()))
            log.info("data mix %s: records per epoch %s", task_mix, stats.extra["records_per_epoch"])
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * schedule.steps_per_epoch))
        warmup = int(cfg.warmup_ratio * total)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg)
        checkpoint = Checkpoint(checkpoint_dir, _fingerprint(model_spec, parts, cfg))
        step, metrics, padded_total = 0, [], 0
        if (state := checkpoint.load()) is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step, metrics, padded_total = state["step"], state["metrics"], state.get("padded", 0)
            log.info("resuming %s from step %d (%s)", cfg.stage, step, checkpoint.path)
        first_step = step
        keeper = None
        if ddp.rank == 0 and keep_snapshots > 0:
            keeper = SnapshotKeeper(
                snapshot_dir(checkpoint_dir), keep=keep_snapshots, fingerprint=_fingerprint(model_spec, parts, cfg)
            )
        log.info(
            "%s: %d records in %d part(s), index %.1f bytes per record, %d steps (%d per epoch), batch %d over "
            "%d process(es), group %d, %s, homogeneous ratio %.2f, mini-batch %s, checkpointing %s",
            cfg.stage,
            len(data),
            len(parts),
            data.index_nbytes / len(data),
            total,
            schedule.steps_per_epoch,
            cfg.batch_size,
            ddp.world,
            n_neg + 1,
            amp or torch.float32,
            cfg.homogeneous_ratio,
            cfg.mini_batch_size or "-",
            cfg.gradient_checkpointing,
        )
        tracker.log_config(
            {
                **dataclasses.asdict(cfg),
                "model": model_spec,
                "data": [str(p) for p in parts],
                "records": len(data),
                "steps": total,
                "world_size": ddp.world,
            },
            start_step=step,
        )
        t_start, cpu_start = time.time(), time.process_time()
        progress = Progress(total, step, cfg.progress_every_s)
        best_dir = (
            Path(checkpoint_dir) / "best"
            if checkpoint_dir
            else Path(tempfile.gettempdir()) / f"kalm-best-{os.getpid()}"
        )
        periodic = PeriodicEval(eval_tasks, cfg.eval_every, total, best_dir, metrics)
        while step < total:
            t0 = time.time()
            # dropout masks: a function of (step, rank); seed * 1_000_003 + step in one process, as before
            torch.manual_seed((cfg.seed * 1_000_003 + step) * ddp.world + ddp.rank)
            sample_rng = random.Random(f"{cfg.seed}:step:{step}")
            mix_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            batch = data.records(schedule(step))  # the global batch's records, read from the memory map
            lr = lr_at(step, total, warmup, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Every rank builds the texts of the whole global batch (same RNG: same texts as one
            # process) and encodes its own slice of queries, with their positives and negatives.
            texts = batch_texts(batch, n_neg, symmetric, sample_rng, pad, in_batch)
            masked = texts.column_mask()  # the same on every rank: built from the global batch's texts
            distill = texts.distill_targets() if cfg.distill_weight > 0 else None
            slices = rank_slices(len(batch), ddp.world)
            lo, hi = slices[ddp.rank]
            q_sizes = [b - a for a, b in slices]
            neg_sizes = [sum(len(n) for n in texts.negatives[a:b]) for a, b in slices]
            per_query = texts.negs_per_query()
            terms: dict[str, float] = {}

            def loss_on(q_local, p_local):
                q = ddp.gather_rows(q_local, q_sizes)
                p = torch.cat(
                    [ddp.gather_rows(p_local[: hi - lo], q_sizes), ddp.gather_rows(p_local[hi - lo :], neg_sizes)]
                )
                return contrastive_loss(q, p, cfg, per_query, mix_gen, terms, masked.mask, distill)

            optimizer.zero_grad(set_to_none=True)
            loss, tokens = forward_backward(
                model, texts.queries[lo:hi], texts.passages(lo, hi), loss_on, cfg.mini_batch_size, amp
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{cfg.stage}: loss is {loss.item()} at step {step + 1} (task {batch[0]['task']})"
                )
            ddp.all_reduce_grads(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)  # before clipping
            optimizer.step()
            tokens = ddp.sum(tokens)
            step += 1
            padded_total += texts.padded
            dt = time.time() - t0
            metrics.append(
                {
                    "step": step,
                    "stage": cfg.stage,
                    "task": batch[0]["task"],
                    "loss": round(loss.item(), 6),
                    **{k: round(v, 6) for k, v in terms.items()},
                    "grad_norm": round(grad_norm.item(), 6),
                    "lr": lr,
                    "batch": len(batch),
                    "passages": len(texts.positives) + sum(map(len, texts.negatives)),
                    "padded_negatives": texts.padded,
                    "short_records": texts.short,
                    "false_negatives_masked": masked.false_negatives,
                    "duplicates_masked": masked.duplicates,
                    "tokens": int(tokens),
                    "samples_per_s": round(len(batch) / dt, 3),
                    "tokens_per_s": round(tokens / dt, 1),
                    "elapsed_s": round(time.time() - t_start, 3),
                }
            )
            if periodic.due(step):  # the same answer on every rank: rank 0 scores, the others wait
                if ddp.rank == 0:
                    metrics[-1].update(periodic.run(model, step, prompts))
                ddp.barrier()
            tracker.log_metrics(step, metrics[-1])
            if line := progress.line(step):
                log.info("%s loss %.4f lr %.2e (%s)", line, metrics[-1]["loss"], lr, batch[0]["task"])
            if keeper is not None and step % snapshot_every == 0 and step < total:
                keeper.save(model, step)
            if ddp.rank == 0 and checkpoint_every and step % checkpoint_every == 0 and step < total:
                checkpoint.save(model, optimizer, step, metrics, padded_total)
            if stop_after_steps is not None and step >= stop_after_steps:
                log.warning("stopping abruptly after step %d (simulated kill)", step)
                os._exit(137)
        seconds, cpu_seconds = time.time() - t_start, time.process_time() - cpu_start
        if ddp.rank == 0:
            model.eval()
            if cfg.gradient_checkpointing:
                disable_gradient_checkpointing(model)
            save_model(model.to(getattr(torch, cfg.save_dtype)), out_dir, prompts)
            if keeper is not None:
                keeper.finish(out_dir, final_step=total)
            write_jsonl(metrics_path or f"{out_dir}.metrics.jsonl", metrics)
            if periodic.active:
                stats.extra.update(periodic.summary())
                if best_out:
                    periodic.export(best_out)
            stats.extra.update(
                negatives_padded_random=padded_total,
                steps=total,
                world_size=ddp.world,
                records_left_out_per_epoch=schedule.left_out_per_epoch,
                loaded_dtype=str(loaded_dtype or torch.float32).replace("torch.", ""),
                save_dtype=cfg.save_dtype,
                false_negatives_masked=sum(m["false_negatives_masked"] for m in metrics),
                precision=str(amp or torch.float32).replace("torch.", ""),
                gradient_checkpointing=cfg.gradient_checkpointing,
                mini_batch_size=cfg.mini_batch_size,
                homogeneous_ratio=cfg.homogeneous_ratio,
                loss_first=metrics[0]["loss"] if metrics else None,
                loss_last=metrics[-1]["loss"] if metrics else None,
                samples_per_s=round(sum(m["batch"] for m in metrics[first_step:]) / max(seconds, 1e-9), 3),
            )
            stats.write(stats_path or f"{out_dir}.stats.json")
            checkpoint.remove()
        ddp.barrier()  # every rank returns once the model is on disk
        if checkpoint_dir and not data_cache and ddp.local_rank == 0:
            remove_cache(cache)  # the checkpoint's companion: a finished run needs neither
        return {"steps": total, "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3)}
    finally:
        tracker.close()
        if scratch is not None:
            scratch.cleanup()
        ddp.close()


def task_mix_codes(task_mix: dict[str, dict] | None, task_names: list[str]) -> dict[int, tuple[float, int | None]]:
    """The data mix by task code; a task of the mix that the data lacks is an error naming it."""
    unknown = sorted(set(task_mix or {}) - set(task_names))
    if unknown:
        raise ValueError(f"task mix names {unknown}, which the training data does not have ({task_names})")
    code = {t: i for i, t in enumerate(task_names)}
    return {code[t]: (float(m.get("weight", 1.0)), m.get("max_records")) for t, m in (task_mix or {}).items()}


def tracking_config(args: argparse.Namespace) -> TrackingConfig:
    """``--tracking``, its run name ``<run_name>/<job>`` (``--tracking-run``, default the stage), or the job's."""
    return job_tracking(args.tracking, args.tracking_run or args.stage)


def _run(args: argparse.Namespace) -> None:
    cfg = options.from_args(TrainConfig, args, args.options)
    train(
        args.model,
        args.data,
        args.out,
        cfg,
        json.loads(args.symmetric),
        args.metrics,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        stop_after_steps=args.stop_after_steps,
        stats_path=args.stats,
        keep_snapshots=args.keep_snapshots,
        snapshot_every=args.snapshot_every,
        in_batch=json.loads(args.in_batch_negatives),
        data_cache=args.data_cache,
        tracking=tracking_config(args),
        prompts=read_json(args.prompts) if args.prompts else None,
        task_mix=json.loads(args.task_mix),
        eval_tasks=json.loads(args.eval_tasks_json) if args.eval_tasks_json else None,
        best_out=args.best_out,
    )


def register(sub) -> None:
    p = sub.add_parser("train", help="contrastive pretraining or fine-tuning (torchrun: data parallel)")
    p.add_argument("--stage", choices=["pretrain", "finetune"], required=True)  # TrainConfig.stage
    p.add_argument("--model", required=True, help="model spec to start from")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="Parquet parts or JSON Lines files, or folders of them (read in this order)",
    )
    p.add_argument(
        "--data-cache",
        help="folder of the Arrow copies of the data, kept "
        "(default: CHECKPOINT_DIR/arrow, removed after the run; without it a temporary folder)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", help="per-step metrics JSONL (default: OUT.metrics.jsonl)")
    p.add_argument("--stats", help="counts JSON (default: OUT.stats.json)")
    p.add_argument("--symmetric", default="{}", help='JSON {"task": bool}: instruction on both sides')
    p.add_argument(
        "--in-batch-negatives",
        default="{}",
        help='JSON {"task": false}: those tasks\' queries see only their own hard negatives',
    )
    p.add_argument("--checkpoint-dir", help="resumable state, outside the declared output (Snakemake deletes those)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: none)")
    p.add_argument(
        "--keep-snapshots",
        type=int,
        default=0,
        help="keep the last K models saved every --snapshot-every steps (soup ingredients), in CHECKPOINT_DIR/snapshots",
    )
    p.add_argument("--snapshot-every", type=int, default=0, help="steps between soup snapshots")
    p.add_argument("--eval-tasks-json", help="with --eval-every: JSON list of local task specs scored during training")
    p.add_argument("--best-out", help="with --eval-every: where the best model by the first eval task goes")
    p.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # tests: simulate a kill
    p.add_argument(
        "--options",
        type=json.loads,
        default={},
        help="JSON {option: value} of the options below (the workflow passes a stage's config section); "
        "a flag given as well wins",
    )
    p.add_argument(
        "--tracking",
        type=json.loads,
        default={},
        help="JSON {backend, project, run_name, dir}: experiment tracking (the workflow passes its tracking "
        "section; default: none)",
    )
    p.add_argument("--prompts", help="prompts JSON (kalm prompts) the saved model carries")
    p.add_argument(
        "--task-mix",
        default="{}",
        help='JSON {"task": {"weight": w, "max_records": m}}: per-task sampling weight and cap per epoch',
    )
    p.add_argument("--tracking-run", help="the job's name in the tracked run's name, after run_name (default: STAGE)")
    options.add_arguments(p, TrainConfig, skip=("stage",))
    p.set_defaults(func=_run)
