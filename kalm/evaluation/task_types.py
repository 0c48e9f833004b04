"""Evaluation task types: one registry of what a type is.

Everything the pipeline knows about an MTEB task type is one :class:`TaskType` entry of ``TASK_TYPES``:
how its two sides relate (which sides carry an instruction, kalm.evaluation.instructions), how mteb
encodes it (query and document prompts, candidate lists; kalm.evaluation.evaluate), KaLM's instruction
rule for it (kalm.evaluation.task_instructions), the config's data type names that train it, and, for the
types a local task folder may have, its files, mteb base class, main score and loader
(kalm.evaluation.local_tasks). Adding a type is one entry here (and a loader in local_tasks for a local
folder of it).

Light on purpose (mteb is imported by local_tasks only when a task class is made): the workflow imports
the instruction rule when it builds the DAG.
"""

from __future__ import annotations

from dataclasses import dataclass

QUERY_DOCUMENT, PAIR, SINGLE = "query_document", "pair", "single"
OTHER = "other"  # bitext mining, summarization: mteb's own encoding, no per-side prompt rule of kalm's


@dataclass(frozen=True)
class TaskType:
    name: str  # mteb's task type
    # QUERY_DOCUMENT (queries against documents), PAIR (two texts of a kind scored as a pair: mteb passes no
    # prompt type for either side), SINGLE (one text per example), OTHER
    sides: str
    symmetric: bool  # both sides texts of the same kind: KaLM puts the instruction on both
    reranking: bool = False  # ranks given candidate lists (mteb: AbsTaskRetrieval with top_ranked)
    # KaLM V1's instruction: "retrieval" (the generic retrieval one), "none" (uninstructed), "table" (its
    # per-task table only), None (KaLM gives none: the config must)
    kalm_v1: str | None = None
    kalm_v2_default: str | None = None  # a task missing from the V2 table gets this one
    data_names: tuple[str, ...] = ()  # config data types (lower case) that are tasks of this type
    # a local task folder of this type (kalm's format): its files (in the order they are hashed into the
    # dataset revision), mteb's base class ("module:Class"), main score and kalm.evaluation.local_tasks' loader
    local_files: tuple[str, ...] = ()
    mteb_base: str | None = None
    main_score: str | None = None
    loader: str | None = None


RETRIEVAL_V2 = "Given a query, retrieve documents that answer the query"
SIMILAR_V2 = "Retrieve semantically similar text"

TASK_TYPES: dict[str, TaskType] = {
    t.name: t
    for t in (
        TaskType(
            "Retrieval",
            QUERY_DOCUMENT,
            symmetric=False,
            kalm_v1="retrieval",
            kalm_v2_default=RETRIEVAL_V2,
            data_names=("retrieval", "weak"),  # weak pairs (title -> passage) are query/document pairs
            local_files=("corpus.jsonl", "queries.jsonl", "qrels.tsv"),
            mteb_base="mteb.abstasks.retrieval:AbsTaskRetrieval",
            main_score="ndcg_at_10",
            loader="_load_retrieval",
        ),
        TaskType(
            "Reranking",
            QUERY_DOCUMENT,
            symmetric=False,
            reranking=True,
            kalm_v1="retrieval",
            kalm_v2_default=RETRIEVAL_V2,
            data_names=("reranking",),
            local_files=("corpus.jsonl", "queries.jsonl", "qrels.tsv", "top_ranked.jsonl"),
            mteb_base="mteb.abstasks.retrieval:AbsTaskRetrieval",
            main_score="map_at_1000",
            loader="_load_reranking",
        ),
        TaskType("InstructionRetrieval", QUERY_DOCUMENT, symmetric=False),
        TaskType("InstructionReranking", QUERY_DOCUMENT, symmetric=False, reranking=True),
        TaskType(
            "STS",
            PAIR,
            symmetric=True,
            kalm_v1="none",
            kalm_v2_default=SIMILAR_V2,
            data_names=("sts",),
            local_files=("test.jsonl",),
            mteb_base="mteb.abstasks.sts:AbsTaskSTS",
            main_score="cosine_spearman",
            loader="_load_sts",
        ),
        TaskType(
            "PairClassification",
            PAIR,
            symmetric=True,
            kalm_v1="none",
            kalm_v2_default=SIMILAR_V2,
            data_names=("pair_classification", "pairclassification"),
            local_files=("test.jsonl",),
            mteb_base="mteb.abstasks.pair_classification:AbsTaskPairClassification",
            main_score="max_ap",
            loader="_load_pair_classification",
        ),
        TaskType(
            "Classification",
            SINGLE,
            symmetric=False,
            kalm_v1="table",
            data_names=("classification",),
            local_files=("train.jsonl", "test.jsonl"),
            mteb_base="mteb.abstasks.classification:AbsTaskClassification",
            main_score="accuracy",
            loader="_load_classification",
        ),
        TaskType(
            "Clustering",
            SINGLE,
            symmetric=True,
            kalm_v1="table",
            data_names=("clustering",),
            local_files=("test.jsonl",),
            mteb_base="mteb.abstasks.clustering:AbsTaskClustering",
            main_score="v_measure",
            loader="_load_clustering",
        ),
        TaskType("BitextMining", OTHER, symmetric=True, kalm_v1="none", data_names=("bitextmining", "bitext_mining")),
        TaskType("Summarization", OTHER, symmetric=True, kalm_v1="none", data_names=("summarization",)),
    )
}


def types_where(**facts) -> frozenset[str]:
    """The names of the types whose fields equal ``facts`` (``types_where(sides=PAIR)``)."""
    return frozenset(t.name for t in TASK_TYPES.values() if all(getattr(t, k) == v for k, v in facts.items()))


LOCAL_TYPES = tuple(name for name, t in TASK_TYPES.items() if t.local_files)  # a local folder may be one
