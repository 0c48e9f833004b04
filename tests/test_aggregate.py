"""kalm.evaluation.aggregate: hand-written per-task sidecars -> results/mteb_<lang>.json (+ baseline gain, markdown)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kalm.evaluation.aggregate import AggregateError, aggregate
from kalm.io import read_json, write_json

# name: (type, main_score, metric, instruction)
FINAL = {
    "T2Retrieval": ("Retrieval", 0.80, "ndcg_at_10", "Given a Chinese search query, retrieve relevant passages"),
    "DuRetrieval": ("Retrieval", 0.70, "ndcg_at_10", "Given a Chinese search query, retrieve relevant passages"),
    "AFQMC": ("STS", 0.40, "cosine_spearman", None),
    "LCQMC": ("STS", 0.60, "cosine_spearman", "Retrieve semantically similar text"),
    "TNews": ("Classification", 0.50, "accuracy", "Classify the news title"),
}
BASE = {"T2Retrieval": 0.60, "DuRetrieval": 0.65, "AFQMC": 0.30, "LCQMC": 0.62, "TNews": 0.40}


def write_sidecars(folder: Path, scores: dict, model: str = "results/models/final") -> list[str]:
    paths = []
    for name, (ty, score, metric, instruction) in scores.items():
        raw = folder / f"{name}.json"
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text("{}")  # stands in for mteb's raw result; the sidecar is what is read
        write_json(
            folder / f"{name}.kalm.json",
            {
                "task": name,
                "type": ty,
                "lang": "zh",
                "main_score": score,
                "metric": metric,
                "model": model,
                "instruction": instruction,
                "prompts": {},
                "max_seq_length": 512,
                "dtype": "float32",
                "mteb_version": "2.26.24",
                "seconds": 1.0,
            },
        )
        paths.append(str(raw))
    return paths


def test_aggregate_fields_and_means(tmp_path):
    paths = write_sidecars(tmp_path / "mteb" / "zh", FINAL)
    out = tmp_path / "mteb_zh.json"
    agg = aggregate(paths, "final", str(out))
    assert read_json(out) == json.loads(json.dumps(agg))
    assert agg["model"] == "final" and agg["mteb_version"] == "2.26.24"
    assert agg["tasks"]["AFQMC"] == {"type": "STS", "main_score": 0.40, "metric": "cosine_spearman"}
    assert set(agg["tasks"]) == set(FINAL)
    assert agg["by_type"] == pytest.approx({"Retrieval": 0.75, "STS": 0.50, "Classification": 0.50})
    assert agg["mean_task"] == pytest.approx((0.8 + 0.7 + 0.4 + 0.6 + 0.5) / 5)  # 0.60
    # mean of the per-type means, not of the tasks
    assert agg["mean_type"] == pytest.approx((0.75 + 0.50 + 0.50) / 3)
    assert agg["mean_type"] != pytest.approx(agg["mean_task"])
    assert agg["max_seq_length"] == 512 and agg["dtype"] == "float32" and agg["lang"] == "zh"
    assert agg["instructions"]["T2Retrieval"] == FINAL["T2Retrieval"][3]
    assert agg["instructions"]["AFQMC"] is None
    assert "baseline" not in agg and "gain" not in agg
    assert not out.with_suffix(".md").exists()


def test_sidecar_paths_work_as_inputs(tmp_path):
    paths = write_sidecars(tmp_path, FINAL)
    sidecars = [p.replace(".json", ".kalm.json") for p in paths]
    a = aggregate(paths, "m", str(tmp_path / "a.json"))
    b = aggregate(sidecars, "m", str(tmp_path / "b.json"))
    assert a == b


def test_baseline_gain_and_markdown(tmp_path):
    base_scores = {n: (FINAL[n][0], s, FINAL[n][2], FINAL[n][3]) for n, s in BASE.items()}
    base_paths = write_sidecars(tmp_path / "baseline", base_scores, model="package:base")
    base_out = tmp_path / "baseline" / "mteb_zh.json"
    base = aggregate(base_paths, "base", str(base_out))

    paths = write_sidecars(tmp_path / "final", FINAL)
    out = tmp_path / "mteb_zh.json"
    agg = aggregate(paths, "final", str(out), baseline_path=str(base_out))

    assert agg["baseline"]["model"] == "base"
    assert agg["baseline"]["mean_task"] == pytest.approx(base["mean_task"])
    assert agg["baseline"]["mean_type"] == pytest.approx(base["mean_type"])
    assert agg["baseline"]["tasks"] == pytest.approx(BASE)
    assert agg["gain"]["tasks"]["T2Retrieval"] == pytest.approx(0.20)
    assert agg["gain"]["tasks"]["LCQMC"] == pytest.approx(-0.02)
    assert agg["gain"]["mean_task"] == pytest.approx(agg["mean_task"] - sum(BASE.values()) / 5)
    assert agg["gain"]["mean_type"] == pytest.approx(agg["mean_type"] - base["mean_type"])
    assert read_json(out)["gain"] == json.loads(json.dumps(agg["gain"]))

    md = out.with_suffix(".md").read_text()
    assert "| Task | Type | Metric | Base | Final | Δ |" in md
    assert "| T2Retrieval | Retrieval | ndcg_at_10 | 60.00 | 80.00 | +20.00 |" in md
    assert "| LCQMC | STS | cosine_spearman | 62.00 | 60.00 | -2.00 |" in md
    assert f"| **mean (task)** | | | {100 * base['mean_task']:.2f} | {100 * agg['mean_task']:.2f} |" in md
    assert "**mean (type)**" in md


def test_baseline_with_different_task_set(tmp_path):
    base_scores = {n: (FINAL[n][0], s, FINAL[n][2], None) for n, s in BASE.items() if n != "TNews"}
    base_out = tmp_path / "base.json"
    aggregate(write_sidecars(tmp_path / "b", base_scores), "base", str(base_out))
    agg = aggregate(write_sidecars(tmp_path / "f", FINAL), "final", str(tmp_path / "f.json"), str(base_out))
    assert agg["gain"]["missing_in_baseline"] == ["TNews"]
    assert agg["gain"]["common_tasks"] == 4
    assert agg["gain"]["mean_task"] == pytest.approx((0.8 + 0.7 + 0.4 + 0.6) / 4 - (0.6 + 0.65 + 0.3 + 0.62) / 4)
    assert "TNews" not in agg["gain"]["tasks"]
    assert "| TNews | Classification | accuracy | – | 50.00 | – |" in (tmp_path / "f.md").read_text()


def test_errors(tmp_path):
    paths = write_sidecars(tmp_path / "a", FINAL)
    with pytest.raises(AggregateError, match="appears twice"):
        aggregate(paths + paths[:1], "m", str(tmp_path / "x.json"))
    other = write_sidecars(tmp_path / "b", {"Extra": ("STS", 0.5, "cosine_spearman", None)}, model="other")
    with pytest.raises(AggregateError, match="different models"):
        aggregate(paths + other, "m", str(tmp_path / "x.json"))
    hundred = write_sidecars(tmp_path / "c", {"Pct": ("STS", 55.0, "cosine_spearman", None)})
    with pytest.raises(AggregateError, match="0-1 scale"):
        aggregate(hundred, "m", str(tmp_path / "x.json"))
    with pytest.raises(AggregateError, match="not found"):
        aggregate([str(tmp_path / "missing.json")], "m", str(tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists()


def test_raw_mteb_result_without_sidecar(tmp_path):
    """A raw mteb result of a registered task (no sidecar) is read with the type from mteb's registry."""
    from mteb.results import TaskResult

    raw = {
        "dataset_revision": "a0d554a64d88156834ff5ae9920b964011b16384",
        "task_name": "STS12",
        "mteb_version": "2.26.24",
        "scores": {
            "test": [{"cosine_spearman": 0.7, "main_score": 0.7, "hf_subset": "default", "languages": ["eng-Latn"]}]
        },
        "evaluation_time": 1.0,
        "kg_co2_emissions": None,
    }
    path = tmp_path / "STS12.json"
    TaskResult.from_dict(raw).to_disk(path)
    agg = aggregate([str(path)], "m", str(tmp_path / "out.json"))
    assert agg["tasks"]["STS12"] == {"type": "STS", "main_score": pytest.approx(0.7), "metric": "cosine_spearman"}


def test_cli(tmp_path, capsys):
    from kalm.cli import main

    base_scores = {n: (FINAL[n][0], s, FINAL[n][2], None) for n, s in BASE.items()}
    base_out = tmp_path / "baseline.json"
    assert (
        main(["aggregate", "--model", "base", "--out", str(base_out), *write_sidecars(tmp_path / "b", base_scores)])
        == 0
    )
    out = tmp_path / "results" / "mteb_zh.json"
    rc = main(
        [
            "aggregate",
            "--model",
            "final",
            "--out",
            str(out),
            "--baseline",
            str(base_out),
            *write_sidecars(tmp_path / "f", FINAL),
        ]
    )
    assert rc == 0
    assert read_json(out)["gain"]["mean_task"] == pytest.approx(0.6 - sum(BASE.values()) / 5)
    assert out.with_suffix(".md").exists()
    assert "gain mean_task=" in capsys.readouterr().out


def test_instruction_set_sources_and_differing_instructions(tmp_path):
    """The instruction set and where each task's instruction and data came from are recorded; a baseline
    evaluated with other instructions is flagged (its gain would not be the model's alone)."""

    def sidecars(folder, scores, instruction_of):
        paths = write_sidecars(folder, scores)
        for p in paths:
            side = Path(p.replace(".json", ".kalm.json"))
            rec = read_json(side)
            rec.update(
                instruction=instruction_of(rec["task"]),
                instruction_set="kalm",
                instruction_source="kalm:task",
                source="mirror",
            )
            write_json(side, rec)
        return paths

    base_scores = {n: (FINAL[n][0], s, FINAL[n][2], None) for n, s in BASE.items()}
    base_out = tmp_path / "base.json"
    base = aggregate(sidecars(tmp_path / "b", base_scores, lambda n: FINAL[n][3]), "base", str(base_out))
    assert base["instruction_set"] == "kalm" and base["data_sources"]["TNews"] == "mirror"
    assert base["instruction_sources"]["TNews"] == "kalm:task" and base["instructions"]["TNews"] == FINAL["TNews"][3]
    agg = aggregate(
        sidecars(tmp_path / "f", FINAL, lambda n: "other" if n == "TNews" else FINAL[n][3]),
        "final",
        str(tmp_path / "f.json"),
        str(base_out),
    )
    assert agg["gain"]["instructions_differ"] == ["TNews"]
    assert agg["baseline"]["instruction_set"] == "kalm"
    assert "instruction set kalm; max length 512, dtype float32" in (tmp_path / "f.md").read_text()


def test_aggregate_logs_the_scores_as_the_tracked_runs_final_scores(tmp_path):
    """`kalm aggregate --tracking`: the soup's scores land in its TensorBoard run, read back with TensorBoard."""
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    paths = write_sidecars(tmp_path / "final", FINAL)
    tracking = {"backend": "tensorboard", "project": "p", "run_name": "exp", "dir": str(tmp_path / "tb")}
    res = subprocess.run(
        [sys.executable, "-m", "kalm", "aggregate", "--model", "soup", "--out", str(tmp_path / "mteb_zh.json")]
        + ["--tracking", json.dumps(tracking), "--tracking-run", "soup", *paths],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    acc = EventAccumulator(str(tmp_path / "tb/tensorboard/p/exp/soup"))
    acc.Reload()
    logged = {tag: acc.Scalars(tag)[0].value for tag in acc.Tags()["scalars"]}
    assert logged["summary/mteb_zh/T2Retrieval"] == pytest.approx(0.80)
    assert logged["summary/mteb_zh/mean_task"] == pytest.approx(read_json(tmp_path / "mteb_zh.json")["mean_task"])
