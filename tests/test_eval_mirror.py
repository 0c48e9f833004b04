"""Registered MTEB tasks evaluated offline from local mirrors (kalm.evaluation.mteb_mirror), against mteb's own run."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from test_evaluate import MODEL, STS_PAIRS

from kalm.evaluation import mteb_mirror
from kalm.evaluation.evaluate import RerankingWithoutCandidates, TaskDataUnavailable, evaluate_task
from kalm.evaluation.task_instructions import KALM_RETRIEVAL_INSTRUCTION

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
T2_REVISION = "a34fe6bc0dff185af1228e49a0f6fb1de1565627"  # what mteb 2.26 pins for T2Reranking

DOCS = [
    "猫坐在厨房的垫子上。",
    "巴黎是法国的首都和最大城市。",
    "Python 是一种流行的编程语言。",
    "长城有几千公里长。",
    "香蕉是一种富含钾的黄色水果。",
    "足球比赛由两队各十一名球员进行。",
    "里昂是法国的一座大城市，以美食闻名。",
    "Java 是一种运行在虚拟机上的编程语言。",
    "没人在家时，狗常常睡在沙发上。",
    "北京是中国的首都。",
]
QUERIES = {"q0": "猫在哪里？", "q1": "法国的首都是哪里？", "q2": "有哪些编程语言？", "q3": "介绍一下中国。"}
QRELS = [("q0", "d0", 1), ("q1", "d1", 1), ("q2", "d2", 1), ("q2", "d7", 1), ("q3", "d9", 1)]
TOP_RANKED = {"q0": ["d8", "d0", "d4"], "q1": ["d6", "d1", "d9"], "q2": ["d7", "d3", "d5"], "q3": ["d3", "d9", "d1"]}


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_hf_mirror(folder: Path, configs: dict[str, dict[str, list[dict]]]) -> Path:
    """A dataset repository folder as on the hub: README.md whose YAML `configs:` lists each config's files."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            _jsonl(folder / config / f"{split}.jsonl", rows)
            lines += [f"  - split: {split}", f"    path: {config}/{split}.jsonl"]
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]), encoding="utf-8")
    return folder


def t2reranking_mirror(root: Path, top_ranked: bool = True, revision: str | None = T2_REVISION) -> Path:
    """A tiny mirror of mteb/T2Reranking in the layout of mteb's converted reranking datasets."""
    configs = {
        "corpus": {"dev": [{"id": f"d{i}", "title": "", "text": t} for i, t in enumerate(DOCS)]},
        "queries": {"dev": [{"id": q, "text": t} for q, t in QUERIES.items()]},
        "default": {"dev": [{"query-id": q, "corpus-id": d, "score": s} for q, d, s in QRELS]},
    }
    if top_ranked:
        configs["top_ranked"] = {"dev": [{"query-id": q, "corpus-ids": c} for q, c in TOP_RANKED.items()]}
    folder = make_hf_mirror(mteb_mirror.mirror_folder(root, "mteb/T2Reranking"), configs)
    if revision:
        (folder / mteb_mirror.MIRROR_INFO).write_text(
            json.dumps({"task": "T2Reranking", "path": "mteb/T2Reranking", "revision": revision})
        )
    return folder


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets caches what it builds from a local folder: keep that in the test's directory."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def mteb_reference(name: str, folder: Path, prompts: dict, splits: list[str] | None = None) -> float:
    """mteb's own evaluation of mteb's own task reading the same folder (nothing of kalm.evaluation.evaluate)."""
    import mteb
    from sentence_transformers import SentenceTransformer

    from kalm.models.modeling import resolve_model_path

    task = mteb.get_task(name, eval_splits=splits)
    task.metadata = task.metadata.model_copy(deep=True)
    task.metadata.dataset = {**task.metadata.dataset, "path": str(folder)}
    model = SentenceTransformer(resolve_model_path(MODEL), device="cpu")
    model.prompts = dict(prompts)
    res = mteb.evaluate(model, [task], cache=None, encode_kwargs={"batch_size": 8}, show_progress_bar=False)
    return res.task_results[0].get_score()


def test_mteb_reranking_task_from_mirror_equals_mteb(tmp_path):
    root = tmp_path / "mirror"
    folder = t2reranking_mirror(root)
    spec = {
        "name": "T2Reranking",
        "type": "Reranking",
        "lang": "zh",
        "mirror_root": str(root),
        "instruction_set": "kalm",
    }
    sidecar = evaluate_task(MODEL, spec, str(tmp_path / "out" / "T2Reranking.json"), batch_size=8)
    prompts = {"Reranking-query": "Instruct: Given a query, retrieve documents that answer the query. \n Query: "}
    assert sidecar["prompts"] == prompts and KALM_RETRIEVAL_INSTRUCTION in prompts["Reranking-query"]
    assert (sidecar["instruction_set"], sidecar["instruction_source"]) == ("kalm", "kalm:type")
    assert sidecar["source"] == "mirror" and sidecar["mirror"]["T2Reranking"]["path"] == str(folder)
    assert sidecar["dataset_revision"] == T2_REVISION and sidecar["splits"] == ["dev"]
    assert sidecar["metric"] == "map_at_1000"
    assert sidecar["main_score"] == pytest.approx(mteb_reference("T2Reranking", folder, prompts), abs=1e-9)
    import mteb

    assert mteb.get_task("T2Reranking").metadata.dataset["path"] == "mteb/T2Reranking"  # registry untouched


@pytest.fixture
def no_model(monkeypatch):
    import kalm.models.modeling

    def fail(*a, **k):
        raise AssertionError("the model must not be loaded when the task data is unusable")

    monkeypatch.setattr(kalm.models.modeling, "load_embedding_model", fail)


def test_mirror_without_candidate_lists_stops(tmp_path, no_model):
    root = tmp_path / "mirror"
    t2reranking_mirror(root, top_ranked=False)
    spec = {"name": "T2Reranking", "lang": "zh", "mirror_root": str(root)}
    with pytest.raises(RerankingWithoutCandidates, match=r"'T2Reranking'.*'top_ranked'.*rank all 10 corpus documents"):
        evaluate_task(MODEL, spec, str(tmp_path / "T2Reranking.json"))
    assert not (tmp_path / "T2Reranking.json").exists()


def test_mirror_of_another_revision_is_refused(tmp_path, no_model):
    root = tmp_path / "mirror"
    t2reranking_mirror(root, revision="0123abc")
    with pytest.raises(TaskDataUnavailable, match=r"holds revision 0123abc of mteb/T2Reranking, but mteb pins a34fe6b"):
        evaluate_task(MODEL, {"name": "T2Reranking", "lang": "zh", "mirror_root": str(root)}, str(tmp_path / "o.json"))


def test_missing_task_mirror_names_task_and_folder(tmp_path, no_model):
    spec = {"name": "STS12", "lang": "en", "mirror": str(tmp_path / "nowhere")}
    with pytest.raises(TaskDataUnavailable, match=r"'STS12'.*nowhere.*not found.*kalm mteb-mirror STS12"):
        evaluate_task(MODEL, spec, str(tmp_path / "o.json"))


def test_single_config_mirror_in_a_task_folder(tmp_path):
    """STS12 (mteb/sts12-sts) is one config of split files: a folder with test.jsonl mirrors it."""
    folder = tmp_path / "sts12"
    _jsonl(folder / "test.jsonl", [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in STS_PAIRS])
    sidecar = evaluate_task(
        MODEL, {"name": "STS12", "lang": "en", "mirror": str(folder)}, str(tmp_path / "STS12.json"), batch_size=8
    )
    assert sidecar["source"] == "mirror" and sidecar["prompts"] == {} and sidecar["instruction_source"] == "kalm:type"
    assert sidecar["main_score"] == pytest.approx(mteb_reference("STS12", folder, {}), abs=1e-9)


@pytest.mark.skipif(not (SHARED / "stsb_multi_mt" / "stsb-en-dev.csv").exists(), reason="needs ../shared/data")
def test_real_sts_benchmark_dev_pairs_from_a_mirror(tmp_path):
    """Real data: STS-B dev pairs (stsb_multi_mt, English) as the validation split of MTEB's STSBenchmark.

    Only mteb's and our evaluation of the same data are compared: this is not the pinned dataset
    revision (whose test split, the published number's, is not on this machine)."""
    with open(SHARED / "stsb_multi_mt" / "stsb-en-dev.csv", encoding="utf-8") as f:
        rows = [{"sentence1": a, "sentence2": b, "score": float(s)} for a, b, s in list(csv.reader(f))[:50]]
    folder = tmp_path / "stsbenchmark"
    _jsonl(folder / "validation.jsonl", rows)
    spec = {
        "name": "STSBenchmark",
        "lang": "en",
        "mirror": str(folder),
        "splits": ["validation"],
        "instruction_set": "none",
    }
    sidecar = evaluate_task(MODEL, spec, str(tmp_path / "STSBenchmark.json"), batch_size=32)
    assert sidecar["splits"] == ["validation"] and sidecar["metric"] == "cosine_spearman"
    assert 0.6 < sidecar["main_score"] < 1.0
    assert sidecar["main_score"] == pytest.approx(mteb_reference("STSBenchmark", folder, {}, ["validation"]), abs=1e-9)


def test_mirror_download_command(tmp_path, monkeypatch):
    """`python -m kalm mteb-mirror TASK --root R` fetches the pinned revision into R/<dataset path>."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, repo_type, revision, local_dir):
        calls.append((repo_id, repo_type, revision))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "README.md").write_text("---\n---\n")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert mteb_mirror.main(["T2Reranking", "--root", str(tmp_path)]) == 0
    folder = tmp_path / "mteb" / "T2Reranking"
    assert calls == [("mteb/T2Reranking", "dataset", T2_REVISION)]
    assert mteb_mirror.mirror_revision(folder) == T2_REVISION
    # huggingface-cli download --local-dir writes the commit into .cache/huggingface/download/*.metadata
    (folder / mteb_mirror.MIRROR_INFO).unlink()
    meta = folder / ".cache" / "huggingface" / "download" / "README.md.metadata"
    meta.parent.mkdir(parents=True)
    meta.write_text(f'{T2_REVISION}\n"etag"\n1700000000.0\n')
    assert mteb_mirror.mirror_revision(folder) == T2_REVISION
