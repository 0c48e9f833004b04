"""Experiment tracking: the trainer's numbers sent to TensorBoard, Weights & Biases or MLflow as they are made.

The metrics JSON Lines file stays the record of a run; a :class:`Tracker` gets the same numeric fields of
each step's line (loss, its terms, grad_norm, lr, samples/s, ...), the options once at the start, and final
scores (:meth:`Tracker.log_summary`). Only rank 0 of a torchrun job tracks (:func:`make_tracker`). Each
backend's package is imported when its tracker is made, so ``backend: none`` (the default) needs none.

Where the files go (``tracking.dir``, default ``logs/tracking``):

- tensorboard: ``<dir>/tensorboard/<project>/<run name>/`` (``tensorboard --logdir logs/tracking``);
- mlflow: the local file store ``<dir>/mlruns`` (experiment = project), or ``MLFLOW_TRACKING_URI`` if set;
- wandb: ``<dir>/wandb/``; offline unless ``WANDB_MODE`` says otherwise or an API key and the server are
  there (``wandb sync`` uploads an offline run later).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import netrc
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kalm.training.config import TRACKING_BACKENDS, TrackingConfig

log = logging.getLogger(__name__)

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}


def _import(backend: str, module: str):
    """``module``, or an ImportError that names the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"tracking.backend {backend!r} needs the {PACKAGES[backend]} package: "
            f"pip install {PACKAGES[backend]}  (or pip install 'kalm-pipeline[track]' for all three backends)"
        ) from err


def flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened to ``a/b`` keys (e.g. {task: {metric: score}})."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric fields of a record (flattened), but its ``step``: what a tracker plots."""
    return {
        k: v for k, v in flat(values).items() if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class Tracker:
    """The interface, and the tracker of ``backend: none`` and of every rank but 0: it does nothing."""

    def log_config(self, config: Mapping[str, Any], start_step: int = 0) -> None:
        """The run's options and setup, once at the start (``start_step``: a resumed run's checkpoint step)."""

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One metrics record (a line of the metrics JSONL): its numeric fields, at ``step``."""
        if values := scalars(metrics):
            self._log(step, values)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Final scores (numbers, possibly nested: ``{task: {metric: score}}``)."""

    def close(self) -> None:
        """Flush and finish the run."""

    def _log(self, step: int, values: dict[str, float]) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    """Scalars per step in ``<dir>/tensorboard/<project>/<run>``; the config as a text summary, final scores
    under ``summary/``. A run folder written again (a resumed or re-run job) hides what the earlier process
    logged from the new process's first step on (SummaryWriter's ``purge_step``): one curve, no overlap."""

    def __init__(self, project: str, run: str, root: Path):
        _import("tensorboard", "tensorboard")
        self.log_dir = root / "tensorboard" / project / run
        self.writer = None

    def _writer(self, first_step: int | None):
        """The writer, opened at the first event: its step is where this process starts (None: purge nothing)."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=30, purge_step=first_step)
        return self.writer

    def log_config(self, config, start_step=0):
        text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
        lines = "\n".join("    " + line for line in text.splitlines())  # a Markdown code block
        self._writer(start_step + 1).add_text("config", lines, start_step)

    def _log(self, step, values):
        writer = self._writer(step)
        for key, value in values.items():
            writer.add_scalar(key, value, step)

    def log_summary(self, summary):
        writer = self._writer(None)  # scores added later (e.g. by the evaluation) keep the curves
        for key, value in scalars(summary).items():
            writer.add_scalar(f"summary/{key}", value, 0)

    def close(self):
        if self.writer is not None:
            self.writer.close()


class MlflowTracker(Tracker):
    """A run named ``run`` in experiment ``project``: the config as params, metrics per step, final scores
    as metrics without a step. The local file store ``<dir>/mlruns`` unless MLFLOW_TRACKING_URI is set."""

    def __init__(self, project: str, run: str, root: Path):
        _import("mlflow", "mlflow")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (root / "mlruns").resolve().as_uri()
        if self.uri.startswith("file:"):
            # mlflow 3 refuses the file store (maintenance mode) unless asked; it needs no server, no database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(project)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(project)
            except MlflowException:  # another job created it meanwhile
                experiment_id = self.client.get_experiment_by_name(project).experiment_id
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run).info.run_id

    def log_config(self, config, start_step=0):
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flat(config).items()]
        for i in range(0, len(params), 100):  # mlflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _log(self, step, values):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_summary(self, summary):
        if values := scalars(summary):
            self._log(0, values)

    def close(self):
        self.client.set_terminated(self.run_id)


def _wandb_can_go_online() -> bool:
    """An API key (WANDB_API_KEY or ~/.netrc) and the server answering: else the run is kept offline."""
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        try:
            key = netrc.netrc().authenticators(host)
        except (OSError, netrc.NetrcParseError):
            key = None
    if not key:
        return False
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


class WandbTracker(Tracker):
    """A run of ``project`` named ``run`` under ``<dir>/wandb``: the config, metrics per step, final scores
    in the run's summary. Offline (``wandb sync`` later) without WANDB_MODE, an API key or the server."""

    def __init__(self, project: str, run: str, root: Path):
        wandb = _import("wandb", "wandb")
        mode = None if os.environ.get("WANDB_MODE") else ("online" if _wandb_can_go_online() else "offline")
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run, dir=str(root), mode=mode)

    def log_config(self, config, start_step=0):
        self.run.config.update(dict(config), allow_val_change=True)

    def _log(self, step, values):
        self.run.log(values, step=step)

    def log_summary(self, summary):
        self.run.summary.update(scalars(summary))

    def close(self):
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


def job_tracking(section: Mapping[str, Any], job: str | None) -> TrackingConfig:
    """The ``tracking`` section as a job's settings: its run is ``<run_name>/<job>``, or ``<job>`` without a
    run name (``job`` None: the section as it is)."""
    from kalm import options

    settings = options.from_args(TrackingConfig, argparse.Namespace(), section)
    if job:
        settings.run_name = f"{settings.run_name}/{job}" if settings.run_name else job
    return settings


def make_tracker(settings: TrackingConfig | None, rank: int = 0, name: str = "train") -> Tracker:
    """The tracker of ``settings`` (the ``tracking`` section) for rank 0, run ``settings.run_name`` or
    ``name``; a no-op tracker for ``backend: none`` and the other ranks."""
    if settings is None or settings.backend == "none" or rank != 0:
        return Tracker()
    if settings.backend not in BACKENDS:
        raise ValueError(f"tracking.backend must be one of {list(TRACKING_BACKENDS)}, got {settings.backend!r}")
    run = settings.run_name or name
    tracker = BACKENDS[settings.backend](settings.project, run, Path(settings.dir))
    log.info("tracking with %s: project %s, run %s, in %s", settings.backend, settings.project, run, settings.dir)
    return tracker
