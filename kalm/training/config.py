"""The trainer's options (``TrainConfig``) and their allowed values."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


PRECISIONS = ("fp32", "bf16", "auto")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    stage: str = "finetune"
    batch_size: int = 32  # the GLOBAL batch: with torchrun each rank encodes its slice of it
    group_size: int = 8
    lr: float = 1e-5
    temperature: float = 0.01
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0  # AdamW decay of weight matrices; norms and biases never decay
    max_grad_norm: float = 1.0
    seed: int = 0
    max_seq_length: int | None = None
    threads: int | None = None
    focal_gamma: float = 0.0
    mix_negatives: int = 0  # synthetic negatives per query; -1 = as many as its mined negatives
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()
    homogeneous_ratio: float = 1.0  # share of a batch's slots from its own task (1.0: task-homogeneous)
    few_negatives: str = "pad_random"  # drop | pad_random | keep, for records short of group_size - 1 negatives
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 on a CUDA device that supports it)
    gradient_checkpointing: bool = False
    mini_batch_size: int = 0  # GradCache chunk (texts per forward); 0 = the whole batch at once
    pooling: str = "mean"  # for a plain HF backbone (a sentence-transformers start model keeps its own)
    save_dtype: str = "float32"  # dtype of the saved model: float32 | bfloat16 (training is always fp32)
