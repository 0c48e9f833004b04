"""Local Reranking and Clustering tasks (kalm.evaluation.local_tasks) and the reranking-as-retrieval guard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from test_evaluate import DOCS, MODEL, QRELS, QUERIES, make_retrieval, reference_score

from kalm.evaluation import local_tasks
from kalm.evaluation.evaluate import RerankingWithoutCandidates, evaluate_task, run_mteb
from kalm.evaluation.local_tasks import LocalTaskError

INSTRUCTION = "Given a question, retrieve passages that answer it"
# Candidate lists that leave out some relevant documents and rank distractors in: reranking them
# scores differently from retrieving over the whole corpus (the test below relies on that).
TOP_RANKED = {
    "q0": ["d8", "d0", "d4"],
    "q1": ["d6", "d1", "d9", "d5"],
    "q2": ["d7", "d0", "d3"],  # d2, relevant, is not a candidate
    "q3": ["d9", "d3", "d1"],
    "q4": ["d4", "d2"],
}
CLUSTERS = {
    "animals": [
        "The cat sleeps on the mat.",
        "Dogs bark at the postman.",
        "A horse runs in the field.",
        "The parrot repeats every word.",
        "Cows graze on the hill.",
    ],
    "food": [
        "Fresh bread from the bakery.",
        "A bowl of spicy noodle soup.",
        "Chocolate cake with cream.",
        "Grilled fish with lemon.",
        "Rice and beans for dinner.",
    ],
    "computing": [
        "The laptop needs more memory.",
        "Python code runs slowly.",
        "The server crashed at night.",
        "Install the new graphics driver.",
        "The database query timed out.",
    ],
}


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_reranking(folder: Path, top_ranked=TOP_RANKED) -> Path:
    make_retrieval(folder)
    _jsonl(folder / "top_ranked.jsonl", [{"query-id": q, "corpus-ids": c} for q, c in top_ranked.items()])
    return folder


def make_clustering(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _jsonl(folder / "test.jsonl", [{"text": t, "label": lab} for lab, texts in CLUSTERS.items() for t in texts])
    return folder


@pytest.fixture(scope="module")
def reranking_spec(tmp_path_factory):
    folder = make_reranking(tmp_path_factory.mktemp("rr") / "TinyReranking")
    return {"name": "TinyReranking", "type": "Reranking", "lang": "en", "path": str(folder), "instruction": INSTRUCTION}


def test_local_reranking_equals_mteb_and_is_not_retrieval(reranking_spec, tmp_path):
    import mteb

    sidecar = evaluate_task(MODEL, reranking_spec, str(tmp_path / "TinyReranking.json"), batch_size=8)
    prompts = {"Reranking-query": f"Instruct: {INSTRUCTION} \n Query: "}
    assert sidecar["metric"] == "map_at_1000" and sidecar["type"] == "Reranking"
    assert sidecar["prompts"] == prompts and sidecar["instruction_source"] == "config"
    assert sidecar["main_score"] == pytest.approx(reference_score(reranking_spec, prompts), abs=1e-9)
    # what the guard prevents: the same task without its candidate lists is scored as retrieval, differently
    from sentence_transformers import SentenceTransformer

    from kalm.models.modeling import resolve_model_path

    task = local_tasks.make_task(reranking_spec)
    task.load_data()
    task.dataset["default"]["test"]["top_ranked"] = None
    model = SentenceTransformer(resolve_model_path(MODEL), device="cpu")
    model.prompts = prompts
    as_retrieval = (
        mteb.evaluate(model, [task], cache=None, encode_kwargs={"batch_size": 8}, show_progress_bar=False)
        .task_results[0]
        .get_score()
    )
    assert as_retrieval != pytest.approx(sidecar["main_score"], abs=1e-3)
    with pytest.raises(RerankingWithoutCandidates, match="'TinyReranking'.*candidate lists.*did not load"):
        run_mteb(model, task, prompts)


def test_guard_names_queries_without_candidates(reranking_spec):
    task = local_tasks.make_task(reranking_spec)
    task.load_data()
    del task.dataset["default"]["test"]["top_ranked"]["q3"]
    with pytest.raises(
        RerankingWithoutCandidates, match=r"1 of 5 evaluated queries have no candidate list \(first: 'q3'\)"
    ):
        run_mteb(object(), task, {})  # stops before the model is used


@pytest.mark.parametrize(
    "rows, pattern",
    [
        ([{"query-id": "q0", "corpus-ids": ["d0"]}], r"top_ranked\.jsonl: 4 judged queries have no candidate list"),
        ([{"query-id": "q0", "corpus-ids": ["nope"]}], r"top_ranked\.jsonl:1: field 'corpus-ids\[0\]' 'nope'"),
        ([{"query-id": "q0", "corpus-ids": []}], r"top_ranked\.jsonl:1: field 'corpus-ids' is empty"),
        (
            [{"query-id": "q0", "corpus-ids": ["d0"]}, {"query-id": "q0", "corpus-ids": ["d1"]}],
            r"top_ranked\.jsonl:2: field 'query-id' 'q0' is a duplicate of line 1",
        ),
    ],
)
def test_malformed_top_ranked(tmp_path, rows, pattern):
    folder = make_retrieval(tmp_path / "bad")
    _jsonl(folder / "top_ranked.jsonl", rows)
    spec = {"name": "Bad", "type": "Reranking", "lang": "en", "path": str(folder)}
    with pytest.raises(LocalTaskError, match=pattern):
        local_tasks.make_task(spec).load_data()


def test_local_clustering_equals_mteb(tmp_path):
    spec = {
        "name": "TinyClustering",
        "type": "Clustering",
        "lang": "en",
        "path": str(make_clustering(tmp_path / "cl")),
        "instruction": "Identify the topic of the sentence",
        "n_experiments": 3,
    }  # k-means runs: CI time
    sidecar = evaluate_task(MODEL, spec, str(tmp_path / "TinyClustering.json"), batch_size=8)
    prompts = {"Clustering": "Instruct: Identify the topic of the sentence \n Query: "}
    assert sidecar["metric"] == "v_measure" and sidecar["prompts"] == prompts and sidecar["symmetric"] is True
    assert 0.3 < sidecar["main_score"] <= 1.0  # three well-separated topics
    assert sidecar["main_score"] == pytest.approx(reference_score(spec, prompts), abs=1e-9)
    task = local_tasks.make_task(spec)
    task.load_data()
    assert task.max_documents_per_cluster == 15 and task.max_fraction_of_documents_to_embed is None
    assert task.n_clusters == 3


def test_malformed_clustering(tmp_path):
    folder = tmp_path / "cl"
    folder.mkdir()
    _jsonl(folder / "test.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    with pytest.raises(LocalTaskError, match=r"test\.jsonl: need at least 2 distinct labels"):
        local_tasks.make_task({"name": "C", "type": "Clustering", "lang": "en", "path": str(folder)}).load_data()
    _jsonl(folder / "test.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(LocalTaskError, match=r"test\.jsonl:2: field 'label' is missing"):
        local_tasks.make_task({"name": "C", "type": "Clustering", "lang": "en", "path": str(folder)}).load_data()


def test_unknown_local_type(tmp_path):
    with pytest.raises(LocalTaskError, match="'BitextMining' are not supported"):
        local_tasks.make_task({"name": "B", "type": "BitextMining", "lang": "en", "path": str(tmp_path)})


assert set(TOP_RANKED) == {q for q, _, _ in QRELS} and all(d in DOCS for c in TOP_RANKED.values() for d in c)
assert set(TOP_RANKED) < set(QUERIES)


def test_out_of_memory_halves_the_batch(monkeypatch, reranking_spec):
    """The configured batch size is the first tried: on a GPU out-of-memory error the task runs again
    with half of it (simulated: CPU only here)."""
    import mteb
    import torch

    tried = []

    def fake_evaluate(model, tasks, *, encode_kwargs, **kw):
        tried.append(encode_kwargs["batch_size"])
        if encode_kwargs["batch_size"] > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return type("R", (), {"task_results": ["result"]})()

    class Model:
        prompts, default_prompt_name = {}, None

    monkeypatch.setattr(mteb, "evaluate", fake_evaluate)
    task = local_tasks.make_task(reranking_spec)
    assert run_mteb(Model(), task, {}, batch_size=128) == "result"
    assert tried == [128, 64, 32, 16] and run_mteb.last_batch_size == 16
    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):
        run_mteb(Model(), task, {}, batch_size=128, min_batch_size=64)
    assert tried == [128, 64]
