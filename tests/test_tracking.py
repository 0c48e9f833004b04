"""Experiment tracking (kalm.training.tracking): each backend's files read back with the backend's own reader
give the numbers logged; through the trainer, TensorBoard's loss curve is the metrics JSONL's."""

import glob
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from kalm.io import read_jsonl
from kalm.training.config import TrackingConfig, TrainConfig
from kalm.training.tracking import Tracker, make_tracker

ROOT = Path(__file__).resolve().parents[1]

# lines as the trainer writes them: strings (stage, task) are not tracked, every number but the step is
RECORDS = [
    {"step": s, "stage": "finetune", "task": "toy", "loss": 2.0 / s + 0.123456, "lr": 1e-5 * s, "tokens": 100 + s}
    for s in (1, 2, 3)
]
CONFIG = {"batch_size": 8, "lr": 1e-5, "matryoshka_dims": (64, 16), "data": ["a.parquet"]}
SUMMARY = {"mteb_en": {"DemoSTSEn": 0.75}, "loss_last": 0.5}


def _log_run(backend: str, root: Path, name: str = "exp/finetune_run0"):
    tracker = make_tracker(TrackingConfig(backend=backend, project="kalm-test", run_name=name, dir=str(root)))
    assert type(tracker) is not Tracker
    tracker.log_config(CONFIG)
    for r in RECORDS:
        tracker.log_metrics(r["step"], r)
    tracker.log_summary(SUMMARY)
    tracker.close()
    return tracker


def _tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _float32(values):
    return [(s, float(np.float32(v))) for s, v in values]  # TensorBoard stores scalars as float32


def test_none_and_the_ranks_but_0_track_nothing(tmp_path):
    assert type(make_tracker(None)) is Tracker and type(make_tracker(TrackingConfig())) is Tracker
    assert type(make_tracker(TrackingConfig(backend="tensorboard", dir=str(tmp_path)), rank=1)) is Tracker
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="tracking.backend"):
        make_tracker(TrackingConfig(backend="neptune"))


def test_a_missing_backend_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb: ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        make_tracker(TrackingConfig(backend="wandb"))


def test_tensorboard_event_files_hold_the_logged_curves(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = _log_run("tensorboard", tmp_path)
    assert tracker.log_dir == tmp_path / "tensorboard" / "kalm-test" / "exp" / "finetune_run0"
    for key in ("loss", "lr", "tokens"):
        assert _tensorboard_scalars(tracker.log_dir, key) == _float32([(r["step"], r[key]) for r in RECORDS])
    acc = EventAccumulator(str(tracker.log_dir))
    acc.Reload()
    assert "step" not in acc.Tags()["scalars"] and "task" not in acc.Tags()["scalars"]
    assert _tensorboard_scalars(tracker.log_dir, "summary/mteb_en/DemoSTSEn") == _float32([(0, 0.75)])
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"batch_size": 8' in text


def test_a_resumed_tensorboard_run_replaces_the_steps_past_its_checkpoint(tmp_path):
    """A job killed after step 3 with a checkpoint at step 2 resumes at step 3: one curve, the new steps;
    scores logged afterwards leave it as it is."""
    pytest.importorskip("tensorboard")
    settings = TrackingConfig(backend="tensorboard", run_name="finetune_run0", dir=str(tmp_path))
    with make_tracker(settings) as killed:
        killed.log_config(CONFIG)
        for r in RECORDS:
            killed.log_metrics(r["step"], r)
    with make_tracker(settings) as resumed:
        resumed.log_config(CONFIG, start_step=2)
        for step in (3, 4):
            resumed.log_metrics(step, {"step": step, "loss": 10.0 + step})
    want = [(1, RECORDS[0]["loss"]), (2, RECORDS[1]["loss"]), (3, 13.0), (4, 14.0)]
    assert _tensorboard_scalars(resumed.log_dir, "loss") == _float32(want)
    with make_tracker(settings) as scores:  # final scores logged later, by another process: the curve stays
        scores.log_summary({"score": 0.5})
    assert _tensorboard_scalars(resumed.log_dir, "loss") == _float32(want)
    assert _tensorboard_scalars(resumed.log_dir, "summary/score") == [(0, 0.5)]


def test_mlflow_file_store_holds_the_run_with_its_params_and_metric_history(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    tracker = _log_run("mlflow", tmp_path)
    _log_run("mlflow", tmp_path, "exp/finetune_run1")  # the experiment exists already: a second run in it
    assert tracker.uri == (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=tracker.uri)
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (r["step"], r["loss"]) for r in RECORDS
    ]
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "exp/finetune_run0" and run.info.status == "FINISHED"
    assert run.data.params["batch_size"] == "8" and run.data.params["matryoshka_dims"] == "(64, 16)"
    assert run.data.metrics["mteb_en/DemoSTSEn"] == 0.75
    experiment = client.get_experiment_by_name("kalm-test")
    assert len(client.search_runs([experiment.experiment_id])) == 2


def _wandb_records(path: str):
    """The protobuf records of a .wandb file (a LevelDB-style log: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = Path(path).read_bytes(), 7, b""  # after the header (":W&B", magic, version)
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header: padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            return
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline_run_holds_the_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_run("wandb", tmp_path)
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))  # offline: no key
    for _ in range(100):  # wandb's service may still be writing the file when finish() returns
        if any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(run_file)):
            break
        time.sleep(0.1)
    history, names, summary = [], [], {}

    def items(entries):
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in entries}

    for r in _wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append((r.history.step.num, {k: v for k, v in items(r.history.item).items() if k[0] != "_"}))
        elif kind == "run":
            names.append((r.run.project, r.run.display_name))
        elif kind == "summary":
            summary.update(items(r.summary.update))
    assert history == [(r["step"], {k: r[k] for k in ("loss", "lr", "tokens")}) for r in RECORDS]
    assert ("kalm-test", "exp/finetune_run0") in names and summary["mteb_en/DemoSTSEn"] == 0.75


def test_the_trainers_tensorboard_curves_are_its_metrics_jsonl(tmp_path, tiny_qwen_dir):
    pytest.importorskip("tensorboard")
    from kalm.training.train import train

    words = ["river", "bridge", "tower", "harbour", "market", "garden"]
    recs = [
        {"task": "toy", "query": f"where is the {w}", "pos": [f"the {w} is north"], "neg": [f"the {w} is south"]}
        for w in words
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    cfg = TrainConfig(stage="finetune", batch_size=6, group_size=2, lr=1e-3, max_steps=3, threads=1, focal_gamma=0.5)
    tracking = TrackingConfig(backend="tensorboard", project="p", run_name="demo/finetune_run0", dir=str(tmp_path))
    train(tiny_qwen_dir, str(data), str(tmp_path / "m"), cfg, {}, str(tmp_path / "m.jsonl"), tracking=tracking)
    lines = list(read_jsonl(tmp_path / "m.jsonl"))
    run_dir = tmp_path / "tensorboard" / "p" / "demo" / "finetune_run0"
    assert len(lines) == 3
    for key in ("loss", "loss_infonce", "loss_focal", "lr", "grad_norm", "samples_per_s", "tokens"):
        assert _tensorboard_scalars(run_dir, key) == _float32([(m["step"], m[key]) for m in lines]), key


def _train_commands(cfg: dict, tmp_path: Path) -> dict[str, str]:
    """{stage: its `kalm train` command} of a dry run of fine-tune run 1 with config ``cfg``."""
    from conftest import dry_run_commands

    lines = dry_run_commands(cfg, tmp_path, "models/finetune/run1")
    return {
        stage: next(line for line in lines if f"train --stage {stage}" in line) for stage in ("pretrain", "finetune")
    }


def test_the_workflow_passes_the_tracking_section_and_each_jobs_run_name(tmp_path):
    """The section reaches both training commands with the job's run name; the trainer's parser reads it.
    Without tracking (backend none, the schema's default; the demo config tracks with TensorBoard) the
    commands carry no --tracking."""
    import shlex

    from conftest import train_config_of

    from kalm.cli import build_parser
    from kalm.training.train import tracking_config

    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    del cfg["tracking"]  # the schema's default: none
    assert not any(" --tracking '" in line for line in _train_commands(cfg, tmp_path).values())
    cfg["tracking"] = {"backend": "mlflow", "run_name": "exp1"}
    commands = _train_commands(cfg, tmp_path)
    for stage, run in (("pretrain", "exp1/pretrain"), ("finetune", "exp1/finetune_run1")):
        line = commands[stage]
        assert train_config_of(line).stage == stage
        argv = shlex.split(line.split(" -m kalm train ", 1)[1].split(" > ", 1)[0])
        args = build_parser(["kalm.training.train"]).parse_args(["train", *argv])
        # the schema filled in the section's defaults; the trainer completes the run name
        assert args.tracking == {"backend": "mlflow", "project": "kalm", "run_name": "exp1", "dir": "logs/tracking"}
        assert tracking_config(args) == TrackingConfig("mlflow", "kalm", run, "logs/tracking")
