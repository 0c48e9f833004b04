"""Several processes (torchrun): each rank's slice of the global batch, gathers, gradient all-reduce."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


def rank_slices(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous slices of n records over ``world`` ranks, sizes differing by at most one."""
    sizes = [n // world + (r < n % world) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(s, s + k) for s, k in zip(starts, sizes)]


@dataclass
class Distributed:
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), or a single process (world 1).

    Data parallel with cross-device negatives, written out rather than wrapped in
    ``DistributedDataParallel``: every rank computes the loss of the WHOLE global batch from the
    all-gathered embeddings, in which only its own rows carry a graph. Its parameter gradient is
    then the part of the full-batch gradient that flows through its own texts, and the SUM over
    ranks is the full-batch gradient (DDP would average; with GradCache it would also all-reduce
    after each of the several backward passes of a step).
    """

    world: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")))
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", "0")))
    local_rank: int = field(default_factory=lambda: int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def device(self) -> torch.device | None:
        """This rank's GPU (LOCAL_RANK) under torchrun; None (sentence-transformers' choice) otherwise."""
        if not self.enabled:
            return None
        if torch.cuda.is_available():
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
            return device
        return torch.device("cpu")

    def start(self, device: torch.device | None) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self._device = device

    def gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """All ranks' rows, rank after rank (rank r has ``sizes[r]``); this rank's rows keep their graph."""
        if not self.enabled or max(sizes) == 0:
            return x
        import torch.distributed as dist

        buf = x.detach().new_zeros((max(sizes), x.shape[1]))  # all_gather needs equal shapes
        buf[: x.shape[0]] = x.detach()
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        parts[self.rank] = x
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks (see the class docstring for why a sum)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        # A parameter no rank touched (e.g. BERT's unused pooler) keeps grad None, as in one process,
        # so AdamW skips it there too; one a rank did not touch (no query in its slice) counts as 0.
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self._device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        pending = []
        for p, h in zip(params, has.tolist()):
            if h:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                pending.append(dist.all_reduce(p.grad, async_op=True))
        for work in pending:
            work.wait()

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._device)
        dist.all_reduce(t)
        return t.item()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
