"""The evaluation task-type registry (kalm.evaluation.task_types) is the one source of what a type is: the
sets the modules use are derived from it, and they are the facts the modules held before the registry."""

from kalm.evaluation import evaluate, instructions, local_tasks, task_instructions
from kalm.evaluation.task_types import PAIR, QUERY_DOCUMENT, TASK_TYPES, types_where


def test_every_module_takes_its_type_facts_from_the_registry():
    assert evaluate.QUERY_DOCUMENT_TYPES == types_where(sides=QUERY_DOCUMENT)
    assert evaluate.PAIR_TYPES == types_where(sides=PAIR)
    assert evaluate.RERANKING_TYPES == types_where(reranking=True)
    assert instructions.SYMMETRIC_MTEB_TYPES == types_where(symmetric=True)
    assert instructions.KALM_V1_UNINSTRUCTED_TYPES == types_where(kalm_v1="none")
    assert task_instructions.KALM_RETRIEVAL_TYPES == types_where(kalm_v1="retrieval")
    assert set(local_tasks.TASK_FILES) == {n for n, t in TASK_TYPES.items() if t.local_files}


def test_the_registry_holds_the_facts_the_modules_had():
    """Written out as the modules had them before the registry (a change here changes behaviour)."""
    assert types_where(sides=QUERY_DOCUMENT) == {
        "Retrieval",
        "Reranking",
        "InstructionRetrieval",
        "InstructionReranking",
    }
    assert types_where(sides=PAIR) == {"STS", "PairClassification"}
    assert types_where(reranking=True) == {"Reranking", "InstructionReranking"}
    assert types_where(symmetric=True) == {"STS", "PairClassification", "Clustering", "BitextMining", "Summarization"}
    assert types_where(kalm_v1="none") == {"STS", "PairClassification", "Summarization", "BitextMining"}
    assert types_where(kalm_v1="retrieval") == {"Retrieval", "Reranking"}
    assert types_where(kalm_v1="table") == {"Classification", "Clustering"}
    assert local_tasks.TASK_FILES == {
        "Retrieval": ["corpus.jsonl", "queries.jsonl", "qrels.tsv"],
        "STS": ["test.jsonl"],
        "PairClassification": ["test.jsonl"],
        "Classification": ["train.jsonl", "test.jsonl"],
        "Reranking": ["corpus.jsonl", "queries.jsonl", "qrels.tsv", "top_ranked.jsonl"],
        "Clustering": ["test.jsonl"],
    }
    assert instructions.DATA_TO_MTEB_TYPE == {
        "retrieval": "Retrieval",
        "reranking": "Reranking",
        "sts": "STS",
        "pair_classification": "PairClassification",
        "pairclassification": "PairClassification",
        "classification": "Classification",
        "clustering": "Clustering",
        "bitextmining": "BitextMining",
        "bitext_mining": "BitextMining",
        "summarization": "Summarization",
        "weak": "Retrieval",
    }
    assert task_instructions.KALM_V2_TYPE_INSTRUCTIONS == {
        "Retrieval": "Given a query, retrieve documents that answer the query",
        "Reranking": "Given a query, retrieve documents that answer the query",
        "STS": "Retrieve semantically similar text",
        "PairClassification": "Retrieve semantically similar text",
    }


def test_a_local_type_names_its_mteb_base_class_score_and_loader():
    for name, t in TASK_TYPES.items():
        if not t.local_files:
            continue
        base, score, loader = local_tasks._base_class(name)
        module, cls = t.mteb_base.split(":")
        assert (base.__module__, base.__name__, score) == (module, cls, t.main_score)
        assert loader is getattr(local_tasks, t.loader)
