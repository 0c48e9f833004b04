"""The contrastive trainer (its loop, batches, checkpoints) and its memory-mapped data; the objective is kalm.losses."""
