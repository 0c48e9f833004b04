"""The trainer's options (``TrainConfig``): each declared once, here, with its type, default, bounds and
help. ``kalm train``'s flags and the config schema's ``pretrain`` / ``finetune`` keys are derived from
these fields (kalm.options); the workflow passes a stage's section as ``--options`` JSON.

Light on purpose (no torch): the workflow imports it when it builds the DAG.
"""

from __future__ import annotations

from dataclasses import dataclass

from kalm.models.modeling import POOLING_MODES
from kalm.options import option

PRECISIONS = ("fp32", "bf16", "auto")
SAVE_DTYPES = ("float32", "bfloat16")
FEW_NEGATIVES = ("drop", "pad_random", "keep")


@dataclass
class TrainConfig:
    stage: str = option(
        "finetune",
        "pretrain (weak pairs, in-batch negatives) or finetune",
        config=None,
        choices=("pretrain", "finetune"),
    )
    batch_size: int = option(32, "the global batch of queries (split over torchrun ranks)", minimum=2)
    group_size: int = option(8, "1 positive + (group_size - 1) hard negatives per query", minimum=1)
    lr: float = option(1e-5, "peak learning rate (linear warmup, then linear decay)", exclusive_minimum=0)
    temperature: float = option(0.01, "InfoNCE temperature on cosine similarities", exclusive_minimum=0)
    epochs: float = option(1.0, "passes over the data (fractions allowed)", exclusive_minimum=0)
    max_steps: int | None = option(None, "stop after this many steps (default: the epochs' steps)", minimum=1)
    warmup_ratio: float = option(0.1, "share of the steps spent warming up the learning rate", minimum=0, maximum=1)
    weight_decay: float = option(
        0.0,
        "AdamW weight decay of weight matrices; biases and norm weights never decay (0, as KaLM's reference)",
        minimum=0,
    )
    max_grad_norm: float = option(1.0, "gradient clipping norm", exclusive_minimum=0)
    seed: int = option(0, "seed of the batches, the sampling and the initialisation", config=None)
    max_seq_length: int | None = option(
        None, "tokens per text (the config's top-level max_seq_length)", config=None, minimum=8
    )
    threads: int | None = option(None, "CPU threads (the config's top-level threads)", config=None, minimum=1)
    focal_gamma: float = option(
        0.0, "focal reweighting (1 - p)^gamma of each example's InfoNCE term (KaLM V2: 0.5)", minimum=0
    )
    mix_negatives: int = option(
        0, "online hard-negative mixing: synthetic negatives per query; -1 = as many as its mined negatives", minimum=-1
    )
    matryoshka_dims: tuple[int, ...] = option(
        (), "Matryoshka prefix dims", config="matryoshka.dims", minimum=1, required_together=True
    )
    matryoshka_weights: tuple[float, ...] = option(
        (), "one loss weight per Matryoshka dim", config="matryoshka.weights", minimum=0, required_together=True
    )
    distill_weight: float = option(
        0.0,
        "contrastive distillation: weight w of KL(P_teacher || P_student) over each query's positive and hard "
        "negatives (KaLM V2.5); 0 = off. The records need teacher scores (distill.teacher: rule teacher_score)",
        config="distill.weight",
        minimum=0,
    )
    distill_temperature: float = option(
        0.05,
        "contrastive distillation: temperature of both softmaxes (KaLM V2.5: 0.05)",
        config="distill.temperature",
        exclusive_minimum=0,
    )
    eval_every: int = option(
        0,
        "evaluate on held-out tasks (the soup's dev_task and guard_tasks) every N steps and at the end, logged "
        "as eval_<task> in the metrics; the best model by the first task is kept (soup.checkpoint: best); 0 = off",
        minimum=0,
    )
    homogeneous_ratio: float = option(
        1.0,
        "share of a batch's slots from its own task, the rest from other tasks "
        "(KaLM semi-homogeneous batches); 1 = task-homogeneous",
        minimum=0,
        maximum=1,
    )
    few_negatives: str = option(
        "pad_random",
        "records with fewer than group_size - 1 negatives: drop them, pad "
        "with random passages of their task, or keep them short (counted)",
        choices=FEW_NEGATIVES,
    )
    precision: str = option(
        "fp32",
        "bf16 autocast (fp32 weights and loss); auto = bf16 on a CUDA GPU that supports it, else fp32",
        choices=PRECISIONS,
    )
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, one more forward")
    progress_every_s: float = option(
        30.0, "seconds between progress lines (step, loss, steps/s, ETA) in the job's log; 0: every step", minimum=0
    )
    mini_batch_size: int = option(
        0,
        "GradCache: encode the batch in chunks of this many texts (memory of one "
        "chunk, same gradients); 0 = whole batch at once",
        minimum=0,
    )
    pooling: str = option(
        "mean",
        "pooling of a plain Hugging Face backbone (mean over non-padding tokens, "
        "KaLM's); a sentence-transformers model keeps its own (the config's top-level "
        "pooling)",
        config=None,
        choices=POOLING_MODES,
    )
    save_dtype: str = option(
        "float32",
        "dtype of the saved model; training always keeps fp32 master weights, bf16 only through autocast",
        choices=SAVE_DTYPES,
    )


SOUP_METHODS = ("uniform", "weighted", "greedy")


@dataclass
class SoupConfig:
    """The soup stage's options (``kalm soup``, kalm/soup.py). Declared here beside the trainer's because
    kalm/soup.py imports torch and the workflow reads these when it builds the DAG."""

    method: str = option("uniform", "uniform, weighted (LM-Cocktail) or greedy soup of the runs", choices=SOUP_METHODS)
    weights: tuple[float, ...] = option(
        (),
        "weighted soup: one weight per run (split evenly over its last k) or per ingredient, summing to 1",
        minimum=0,
    )
    dev_task: str | None = option(
        None,
        "a held-out local task of eval.tasks, not listed in eval.languages (a reported task is refused: the soup "
        "would select on the test set): greedy soup scores on it; weighted soup without weights uses its loss",
        flag=False,  # the rule passes its task spec (--dev-task-json)
    )
    temperature: float = option(5.0, "loss-weighted soup: softmax temperature (LM-Cocktail)", exclusive_minimum=0)
    last_k: int = option(
        1,
        "ingredients per fine-tune run: its final model and the last_k - 1 snapshots the trainer kept before it",
        minimum=1,
    )
    checkpoint: str = option(
        "final",
        "each fine-tune run's ingredient: its final model, or its best one by the periodic evaluation "
        "(finetune.eval_every, on soup.dev_task)",
        choices=("final", "best"),
        flag=False,  # the rule picks the run folders (models/finetune/run<r> or run<r>.best)
    )
    include_base: bool = option(
        False,
        "one more ingredient: the model fine-tuning started from (models/pretrain, else base_model), LM-Cocktail's "
        "guard against forgetting; uniform gives it an equal share, weighted and greedy decide it on dev and guards",
    )
    guard_tasks: tuple[str, ...] = option(
        (),
        "held-out local tasks of eval.tasks (not reported) for what fine-tuning must not forget: the loss-weighted "
        "soup's losses and the greedy soup's scores are the mean over soup.dev_task and these",
        flag=False,  # the rule passes their task specs (--guard-task-json)
    )


TRACKING_BACKENDS = ("none", "tensorboard", "wandb", "mlflow")


@dataclass
class TrackingConfig:
    """Experiment tracking of the training jobs (``tracking`` section; kalm/training/tracking.py). The
    metrics JSON Lines file stays the record; a tracker gets the same numbers as they are made. The rules
    pass the section as ``kalm train --tracking`` JSON, its run name completed with the job's."""

    backend: str = option(
        "none",
        "none, tensorboard, wandb or mlflow (pip install 'kalm-pipeline[track]' installs the three)",
        choices=TRACKING_BACKENDS,
    )
    project: str = option("kalm", "the project (wandb), experiment (mlflow) or folder (tensorboard) of the runs")
    run_name: str | None = option(
        None, "prefix of the run names (<run_name>/pretrain, <run_name>/finetune_run0); default: the job's name alone"
    )
    dir: str = option(
        "logs/tracking",
        "folder of the tracking files: tensorboard/, mlruns/ (a local mlflow store), wandb/ (offline runs)",
    )
