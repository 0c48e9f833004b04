"""Checkpoints: the resumable state of a run (bit-exact resume) and the soup's last-k snapshots."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from kalm.io import atomic_path, read_json, write_json
from kalm.training.config import TrainConfig
from kalm.training.train_data import (
    parts_fingerprint,
)

log = logging.getLogger(__name__)


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

    def save(self, model, optimizer, step: int, metrics: list[dict], padded: int) -> None:
        if not self.path:
            return
        with atomic_path(self.path) as tmp:
            torch.save(
                {
                    "fingerprint": self.fingerprint,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "metrics": metrics,
                    "padded": padded,
                },
                tmp,
            )

    def remove(self) -> None:
        if self.path:
            self.path.unlink(missing_ok=True)


def _fingerprint(model_spec: str, parts: list[Path], cfg: TrainConfig) -> dict:
    """What a checkpoint was made for: start model, every data part (path, size, mtime), config."""
    return {
        "model": model_spec,
        "data": parts_fingerprint(parts),
        "config": {k: v for k, v in asdict(cfg).items() if k != "threads"},
    }


# ---- the soup's last-k snapshots ------------------------------------------------------------


SNAPSHOT_MANIFEST = "snapshots.json"  # in a run's snapshot folder: which snapshots, of which final weights


def snapshot_dir(checkpoint_dir: str | Path) -> Path:
    """Where a run keeps its soup snapshots: beside its resumable checkpoint (outside Snakemake's
    outputs, which Snakemake deletes before a re-run)."""
    return Path(checkpoint_dir) / "snapshots"


def weights_digest(model_dir: str | Path) -> str:
    """sha256 over the weight files of a saved model: identifies the final model a run produced."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(root.rglob("*.safetensors")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


class SnapshotKeeper:
    """Keeps the last ``keep`` sentence-transformers snapshots of one training run, for the soup.

    The trainer (rank 0) calls :meth:`save` every N steps and :meth:`finish` after writing its final
    model; the soup then takes the final model and the ``k - 1`` newest snapshots before it
    (:func:`last_k_ingredients`). Snapshots are ``<folder>/step-00000100/`` (saved atomically), and
    ``<folder>/snapshots.json`` records the run's fingerprint, the kept steps and, once finished,
    the digest of the final model's weights, so the soup never mixes in snapshots of another run.
    Snapshots made under another fingerprint (start model, data, hyper-parameters) are deleted
    when a keeper with a new fingerprint is created; a resumed run (same fingerprint) keeps them and
    rewrites any step it recomputes with the same weights (training is deterministic per step).
    """

    def __init__(self, folder: str | Path, keep: int, fingerprint: dict | None = None):
        self.folder = Path(folder)
        self.keep = keep
        self.fingerprint = hashlib.sha256(
            json.dumps(fingerprint or {}, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        manifest = self._manifest()
        if manifest is not None and manifest.get("fingerprint") != self.fingerprint:
            log.info("removing soup snapshots of another run configuration in %s", self.folder)
            shutil.rmtree(self.folder, ignore_errors=True)

    def _manifest(self) -> dict | None:
        path = self.folder / SNAPSHOT_MANIFEST
        return read_json(path) if path.is_file() else None

    def steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(
            int(p.name.split("-")[1]) for p in self.folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
        )

    def save(self, model, step: int) -> Path | None:
        """Save ``model`` as the snapshot of ``step``; delete snapshots beyond the last ``keep``."""
        from kalm.models.modeling import save_model

        if self.keep <= 0:
            return None
        path = self.folder / f"step-{step:08d}"
        save_model(model, path)
        steps = self.steps()
        for old in steps[: -self.keep]:
            shutil.rmtree(self.folder / f"step-{old:08d}", ignore_errors=True)
        write_json(
            self.folder / SNAPSHOT_MANIFEST,
            {"fingerprint": self.fingerprint, "keep": self.keep, "steps": steps[-self.keep :], "finished": False},
        )
        return path

    def finish(self, final_dir: str | Path, final_step: int) -> None:
        """Record the run's final model (after it is written): only then are the snapshots usable."""
        write_json(
            self.folder / SNAPSHOT_MANIFEST,
            {
                "fingerprint": self.fingerprint,
                "keep": self.keep,
                "steps": self.steps(),
                "finished": True,
                "final": str(final_dir),
                "final_step": final_step,
                "final_weights": weights_digest(final_dir),
            },
        )
