"""Per-task instructions for MTEB tasks and KaLM's task lists.

Instruction sets (config ``eval.instruction_set``; which sides of a task carry the instruction is
``kalm.evaluation.instructions.instruction_sides``, the one rule for evaluation and training):

- ``kalm`` (the default): the table published with KaLM-Embedding (V1), ``evaluate/utils.py`` of
  github.com/HITsz-TMG/KaLM-Embedding (commit b54b1a1, the code behind the paper's C-MTEB and
  MTEB(eng) numbers). Its rules: Classification and Clustering tasks have one instruction each
  (table below), applied to every input; every Retrieval and Reranking task uses one generic
  instruction on the query side only, documents get none; STS, PairClassification and
  Summarization get no instruction at all (and so, under this set, neither do the training records
  of those types). The strings are KaLM's, byte for byte, typos included
  ("iPhoneinto", "reviewinto", "Given a online banking query"): they were the inputs of the
  published scores, and changing them changes the embeddings. (mteb's registry entry for the
  KaLM models, ``KaLM_task_prompts`` in mteb/models/model_implementations/kalm_models.py, has the
  same table with those typos fixed; a test compares the two.)
- ``kalm_v2``: KaLM-Embedding V2's table, mteb's ``KaLM_v2_task_prompts`` (same module; the prompts
  of the KaLM-embedding-multilingual-mini-instruct-v2 / v2.5 entries), read from the installed mteb.
  Its keys are ``<task>`` (the query side, or every input of a single-input task) and
  ``<task>-query`` + ``<task>-document`` (both sides): every STS, PairClassification and
  Summarization task is instructed on both sides, as are a few duplicate-question retrieval and
  reranking tasks (QuoraRetrieval, CQADupstack*, SCIDOCS, AskUbuntuDupQuestions, SciDocsRR,
  StackOverflowDupQuestions); other retrieval and reranking tasks on the query side only. Tasks
  of the benchmarks that the table predates take the entry of their older version
  (``KALM_V2_TASK_ALIASES``: e.g. STS22.v2 -> STS22, FEVERHardNegatives -> FEVER), and a
  Retrieval, Reranking, STS or PairClassification task missing from it the table's generic
  instruction of its type (``KALM_V2_TYPE_INSTRUCTIONS``).
- ``none``: no table; a task has an instruction only if the config gives it one.

A task's instruction in the config (``eval.tasks.<name>.instruction`` or ``eval.instructions``)
always wins over the set's text; local tasks (with a ``path``) take only the config's. Where it goes
is still the set's rule: under ``kalm`` an STS task gets none, even one of the config.

Task lists (config ``eval.languages.<lang>: {benchmark: NAME}``): mteb's benchmarks
(``MTEB(cmn, v1)``: 31 tasks, ``MTEB(eng, v2)``: 41, ``MTEB(eng, v1)``: the 56 tasks of the original
English MTEB, which the KaLM-Embedding papers report) and ``KaLM-C-MTEB``: the 35 C-MTEB tasks of
KaLM's ``evaluate/tasks/zh.py`` (MTEB(cmn, v1) plus AmazonReviewsClassification,
MassiveIntentClassification, MassiveScenarioClassification and STS22, whose Chinese subsets are
the C-MTEB leaderboard's columns).
"""

from __future__ import annotations

import logging
from functools import lru_cache

from kalm.evaluation.instructions import (
    DEFAULT_INSTRUCTION_SET,
    INSTRUCTION_SETS,
    KALM_V1_UNINSTRUCTED_TYPES,
    instruction_sides,
)
from kalm.evaluation.task_types import TASK_TYPES, types_where

logger = logging.getLogger(__name__)

# The generic query instruction KaLM gives every Retrieval and Reranking task (trailing period included).
KALM_RETRIEVAL_INSTRUCTION = "Given a query, retrieve documents that answer the query."

# Classification and clustering instructions, per task (KaLM evaluate/utils.py: English MTEB, C-MTEB,
# and the French, Polish and Russian tasks of the same table).
KALM_TASK_INSTRUCTIONS: dict[str, str] = {
    # classification, MTEB(eng)
    "AmazonCounterfactualClassification": "Given an Amazon review, judge whether it is counterfactual.",
    "AmazonPolarityClassification": "Classifying Amazon reviews into positive or negative sentiment",
    "AmazonReviewsClassification": "Classifying the given Amazon review into its appropriate rating category",
    "Banking77Classification": "Given a online banking query, find the corresponding intents",
    "EmotionClassification": "Classifying the emotion expressed in the given Twitter message into one of the six "
    "emotions: anger, fear, joy, love, sadness, and surprise",
    "ImdbClassification": "Classifying the sentiment expressed in the given movie review text from the IMDB dataset",
    "MassiveIntentClassification": "Given a user utterance as query, find the user intents",
    "MassiveScenarioClassification": "Given a user utterance as query, find the user scenarios",
    "MTOPDomainClassification": "Classifying the intent domain of the given utterance in task-oriented conversation",
    "MTOPIntentClassification": "Classifying the intent of the given utterance in task-oriented conversation",
    "ToxicConversationsClassification": "Classifying the given comments as either toxic or not toxic",
    "TweetSentimentExtractionClassification": "Classifying the sentiment of a given tweet as either positive, "
    "negative, or neutral",
    # classification, C-MTEB
    "TNews": "Categorizing the given news title",
    "IFlyTek": "Given an App description text, find the appropriate fine-grained category",
    "MultilingualSentiment": "Classifying sentiment of the customer review into positive, or negative",
    "JDReview": "Classifying sentiment of the customer review for iPhoneinto positive or negative",
    "OnlineShopping": "Classifying sentiment of the customer reviewinto positive or negative",
    "Waimai": "Classify the customer review from a food takeaway platform into positive or negative",
    # classification, MTEB(fra), MTEB(pol), MTEB(rus)
    "MasakhaNEWSClassification": "Classifying the category of french news.",
    "CBD": "Classifying the sentiment of polish tweet reviews",
    "PolEmo2.0-IN": "Classifying the sentiment of in-domain (medicine and hotels) online reviews",
    "PolEmo2.0-OUT": "Classifying the sentiment of out-of-domain (products and school) online reviews",
    "AllegroReviews": "Classifying the sentiment of reviews from e-commerce marketplace Allegro",
    "PAC": 'Classifying the sentence into one of the two types: "BEZPIECZNE_POSTANOWIENIE_UMOWNE" and "KLAUZULA_ABUZYWNA"',
    "GeoreviewClassification": "Classifying the sentiment of Russian reviews.",
    "HeadlineClassification": "Classifying the topic of Russian headlines.",
    "InappropriatenessClassification": "Detecting inappropriate messages on sensitive topics",
    "KinopoiskClassification": "Classifying the sentiment of Kinopoisk reviews.",
    "RuReviewsClassification": "Classifying the sentiment of Russian product reviews.",
    "RuSciBenchGRNTIClassification": "Classifying the topic of Russian scientific papers.",
    "RuSciBenchOECDClassification": "Classifying the topic of Russian scientific papers.",
    "CEDRClassification": "Classification of sentences by emotions.",
    "SensitiveTopicsClassification": "Detecting inappropriate messages on sensitive topics.",
    # clustering, MTEB(eng)
    "ArxivClusteringP2P": "Identify the main and secondary category of Arxiv papers based on the titles and abstracts",
    "ArxivClusteringS2S": "Identify the main and secondary category of Arxiv papers based on the titles",
    "BiorxivClusteringP2P": "Identify the main category of Biorxiv papers based on the titles and abstracts",
    "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles",
    "MedrxivClusteringP2P": "Identify the main category of Medrxiv papers based on the titles and abstracts",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles",
    "RedditClusteringP2P": "Identify the topic or theme of Reddit posts based on the titles and posts",
    "StackExchangeClustering": "Identify the topic or theme of StackExchange posts based on the titles",
    "StackExchangeClusteringP2P": "Identify the topic or theme of StackExchange posts based on the given paragraphs",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    # clustering, C-MTEB
    "CLSClusteringS2S": "Identify the main category of scholar papers based on the titles",
    "CLSClusteringP2P": "Identify the main category of scholar papers based on the titles and abstracts",
    "ThuNewsClusteringS2S": "Identify the topic or theme of the given news articles based on the titles",
    "ThuNewsClusteringP2P": "Identify the topic or theme of the given news articles based on the titles and contents",
    # clustering, MTEB(fra), MTEB(pol), MTEB(rus)
    "AlloProfClusteringP2P": "Identify the main category of Allo Prof document based on the titles and descriptions",
    "AlloProfClusteringS2S": "Identify the main category of Allo Prof document based on the titles",
    "HALClusteringS2S": "Identify the main category of academic passage based on the titles and contents",
    "MasakhaNEWSClusteringP2P": "Identify the topic or theme of the given news articles based on the titles and contents",
    "MasakhaNEWSClusteringS2S": "Identify the topic or theme of the given news articles based on the titles",
    "MLSUMClusteringP2P": "Identify the topic or theme of the given articles based on the titles and contents",
    "MLSUMClusteringS2S": "Identify the topic or theme of the given articles based on the titles",
    "EightTagsClustering": "Identify of headlines from social media posts in Polish  into 8 categories: film, history, "
    "food, medicine, motorization, work, sport and technology",
    "GeoreviewClusteringP2P": "Identify the topic or theme of the Russian reviews.",
    "RuSciBenchGRNTIClusteringP2P": "Identify the topic or theme of the Russian articles.",
    "RuSciBenchOECDClusteringP2P": "Identify the topic or theme of the Russian articles.",
}

# Newer versions of tasks in the table, which MTEB(eng, v2) uses instead of them: same data source and
# label set (ArXivHierarchical*: the main and secondary arXiv categories that the ArxivClustering
# instruction already names), so the table's instruction carries over. This mapping is kalm's, not
# KaLM's (their table predates these tasks); results record such an instruction as 'kalm:alias'.
KALM_TASK_ALIASES: dict[str, str] = {
    "BiorxivClusteringP2P.v2": "BiorxivClusteringP2P",
    "BiorxivClusteringS2S.v2": "BiorxivClusteringS2S",
    "MedrxivClusteringP2P.v2": "MedrxivClusteringP2P",
    "MedrxivClusteringS2S.v2": "MedrxivClusteringS2S",
    "StackExchangeClustering.v2": "StackExchangeClustering",
    "StackExchangeClusteringP2P.v2": "StackExchangeClusteringP2P",
    "TwentyNewsgroupsClustering.v2": "TwentyNewsgroupsClustering",
    "ArXivHierarchicalClusteringP2P": "ArxivClusteringP2P",
    "ArXivHierarchicalClusteringS2S": "ArxivClusteringS2S",
}

# Task types whose every task gets the generic retrieval instruction (query side), and types KaLM
# evaluates without instruction.
KALM_RETRIEVAL_TYPES = types_where(kalm_v1="retrieval")
KALM_TABLE_TYPES = types_where(kalm_v1="table")  # per-task instructions only
KALM_NO_INSTRUCTION_TYPES = KALM_V1_UNINSTRUCTED_TYPES


class InstructionError(ValueError):
    """No instruction can be given for a task under the configured instruction set."""


def kalm_instruction(name: str, task_type: str) -> tuple[str | None, str]:
    """KaLM's instruction for an MTEB task and where it came from: ``(instruction, source)``.

    ``source`` is ``kalm:task`` (the per-task table), ``kalm:alias`` (the table's entry for the older
    version of the task, see ``KALM_TASK_ALIASES``) or ``kalm:type`` (the rule for the task's type).
    A Classification or Clustering task missing from the table has no KaLM instruction: that is an
    error rather than a silent guess, since KaLM's own script fails on it too (KeyError).
    """
    if task_type in KALM_TABLE_TYPES:
        if name in KALM_TASK_INSTRUCTIONS:
            return KALM_TASK_INSTRUCTIONS[name], "kalm:task"
        if KALM_TASK_ALIASES.get(name) in KALM_TASK_INSTRUCTIONS:
            return KALM_TASK_INSTRUCTIONS[KALM_TASK_ALIASES[name]], "kalm:alias"
    if task_type in KALM_RETRIEVAL_TYPES:
        return KALM_RETRIEVAL_INSTRUCTION, "kalm:type"
    if task_type in KALM_NO_INSTRUCTION_TYPES:
        return None, "kalm:type"
    raise InstructionError(
        f"task {name!r} ({task_type}) has no instruction in KaLM's published table; give it one in the config "
        f"(eval.tasks.{name}.instruction or eval.instructions.{name}) or use eval.instruction_set: none"
    )


# --------------------------------------------------------------------------------------------
# KaLM V2 (mteb's KaLM_v2_task_prompts)
# --------------------------------------------------------------------------------------------

# Tasks of MTEB(eng, v2) / MTEB(eng, v1) newer than the V2 table, or aggregates of tasks in it: the
# entry of the task they replace (same data source and labels, see KALM_TASK_ALIASES) or, for
# CQADupstackRetrieval (mteb's aggregate of the 12 CQADupstack*Retrieval subtasks), of a subtask:
# the table gives all 12 the same instruction on both sides (a test checks it). kalm's mapping.
KALM_V2_TASK_ALIASES: dict[str, str] = {
    **KALM_TASK_ALIASES,
    "FEVERHardNegatives": "FEVER",
    "ClimateFEVERHardNegatives": "ClimateFEVER",
    "HotpotQAHardNegatives": "HotpotQA",
    "Touche2020Retrieval.v3": "Touche2020",
    "STS22.v2": "STS22",
    "SummEvalSummarization.v2": "SummEval",
    "CQADupstackRetrieval": "CQADupstackAndroidRetrieval",
}

# A task of these types missing from the V2 table gets the instruction the table gives most tasks of
# the type (query side only for retrieval / reranking, both sides for the pair types).
KALM_V2_TYPE_INSTRUCTIONS: dict[str, str] = {n: t.kalm_v2_default for n, t in TASK_TYPES.items() if t.kalm_v2_default}


@lru_cache(maxsize=1)
def kalm_v2_task_prompts() -> dict[str, str]:
    """mteb's ``KaLM_v2_task_prompts`` (keys ``<task>``, ``<task>-query``, ``<task>-document``)."""
    try:
        from mteb.models.model_implementations.kalm_models import KaLM_v2_task_prompts
    except ImportError as e:  # pragma: no cover - another mteb layout
        raise InstructionError(
            f"instruction set kalm_v2 reads mteb's KaLM_v2_task_prompts, which this mteb does "
            f"not have ({e}); use eval.instruction_set kalm or none"
        ) from None
    return dict(KaLM_v2_task_prompts)


def _v2_entry(name: str | None) -> tuple[str, bool] | None:
    """(instruction, both sides) of a task name in the V2 table, or None."""
    table = kalm_v2_task_prompts()
    if not name:
        return None
    if f"{name}-query" in table:
        return table[f"{name}-query"], f"{name}-document" in table
    if name in table:
        return table[name], False
    return None


def _v2_lookup(name: str) -> tuple[tuple[str, bool] | None, str]:
    entry = _v2_entry(name)
    if entry is not None:
        return entry, "kalm_v2:task"
    entry = _v2_entry(KALM_V2_TASK_ALIASES.get(name))
    return entry, "kalm_v2:alias"


def kalm_v2_both_sides(name: str) -> bool:
    """True when the V2 table instructs both sides of the registered task ``name`` (its ``-query`` and
    ``-document`` keys, or those of its alias)."""
    entry, _ = _v2_lookup(name)
    return bool(entry and entry[1])


def kalm_v2_instruction(name: str, task_type: str) -> tuple[str | None, str]:
    """KaLM V2's instruction for an MTEB task and its source: ``kalm_v2:task``, ``kalm_v2:alias`` or
    ``kalm_v2:type`` (``KALM_V2_TYPE_INSTRUCTIONS``). Other tasks missing from the table (a
    classification or clustering task) are an error, as under ``kalm``."""
    entry, source = _v2_lookup(name)
    if entry is not None:
        return entry[0], source
    if task_type in KALM_V2_TYPE_INSTRUCTIONS:
        return KALM_V2_TYPE_INSTRUCTIONS[task_type], "kalm_v2:type"
    raise InstructionError(
        f"task {name!r} ({task_type}) has no instruction in KaLM V2's table (mteb's KaLM_v2_task_prompts); give it "
        f"one in the config (eval.tasks.{name}.instruction or eval.instructions.{name}) or use another instruction set"
    )


# --------------------------------------------------------------------------------------------
# One task's instruction
# --------------------------------------------------------------------------------------------


def resolve_instruction(
    spec: dict, task_type: str, instruction_set: str = DEFAULT_INSTRUCTION_SET
) -> tuple[str | None, str]:
    """The instruction of one task and its source: ``config``, ``kalm:task`` / ``kalm_v2:task``,
    ``kalm:alias`` / ``kalm_v2:alias``, ``kalm:type`` / ``kalm_v2:type`` or ``none``.

    First the rule (``kalm.evaluation.instructions.instruction_sides``): a task whose type the set instructs on
    no side (``kalm``: STS, PairClassification, ...) gets none, even one of the config (logged as not
    used; the training records of such a type get none either) unless the spec's ``symmetric`` asks for
    one. Then the config's instruction (the key present in the spec, even empty) wins; a local task
    (with a ``path``) takes only the config's; otherwise the instruction set's table decides.
    """
    if instruction_set not in INSTRUCTION_SETS:
        raise InstructionError(f"unknown instruction set {instruction_set!r} (known: {', '.join(INSTRUCTION_SETS)})")
    query_side, _ = instruction_sides(instruction_set, task_type, symmetric=spec.get("symmetric"))
    if not query_side:
        if spec.get("instruction"):
            logger.warning(
                "task %s (%s): instruction set %s gives %s tasks no instruction; the configured one (%r) is not used",
                spec.get("name"),
                task_type,
                instruction_set,
                task_type,
                spec["instruction"],
            )
        return None, f"{instruction_set}:type"
    if "instruction" in spec:
        return spec["instruction"] or None, "config"
    if spec.get("path") or instruction_set == "none":
        return None, "none"
    if instruction_set == "kalm_v2":
        return kalm_v2_instruction(spec["name"], task_type)
    return kalm_instruction(spec["name"], task_type)


# --------------------------------------------------------------------------------------------
# Task lists
# --------------------------------------------------------------------------------------------

# KaLM evaluate/tasks/zh.py, in its order: retrieval, reranking, STS, pair classification,
# clustering, classification (8 + 4 + 8 + 2 + 4 + 9 = 35).
KALM_CMTEB_TASKS: list[str] = [
    "CmedqaRetrieval",
    "CovidRetrieval",
    "DuRetrieval",
    "EcomRetrieval",
    "MedicalRetrieval",
    "MMarcoRetrieval",
    "T2Retrieval",
    "VideoRetrieval",
    "CMedQAv1-reranking",
    "CMedQAv2-reranking",
    "MMarcoReranking",
    "T2Reranking",
    "AFQMC",
    "ATEC",
    "BQ",
    "LCQMC",
    "PAWSX",
    "QBQTC",
    "STS22",
    "STSB",
    "Cmnli",
    "Ocnli",
    "CLSClusteringP2P",
    "CLSClusteringS2S",
    "ThuNewsClusteringP2P",
    "ThuNewsClusteringS2S",
    "AmazonReviewsClassification",
    "IFlyTek",
    "JDReview",
    "MassiveIntentClassification",
    "MassiveScenarioClassification",
    "MultilingualSentiment",
    "OnlineShopping",
    "TNews",
    "Waimai",
]

# Multilingual tasks of the list: the subset C-MTEB reports. Without it the language filter would also
# keep STS22's 'zh-en' pairs and MASSIVE's traditional-Chinese 'zh-TW' (tagged cmo-Hans by mteb).
KALM_CMTEB_SUBSETS: dict[str, list[str]] = {
    "STS22": ["zh"],
    "AmazonReviewsClassification": ["zh"],
    "MassiveIntentClassification": ["zh-CN"],
    "MassiveScenarioClassification": ["zh-CN"],
}

KALM_BENCHMARKS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "KaLM-C-MTEB": (KALM_CMTEB_TASKS, KALM_CMTEB_SUBSETS),
}


def benchmark_tasks(name: str) -> list[str]:
    """Task names of a benchmark: KaLM's lists first, then mteb's registry (``MTEB(cmn, v1)``, ...)."""
    if name in KALM_BENCHMARKS:
        return list(KALM_BENCHMARKS[name][0])
    import mteb

    try:
        bench = mteb.get_benchmark(name)
    except (KeyError, ValueError) as e:
        raise InstructionError(
            f"unknown benchmark {name!r} (KaLM lists: {', '.join(KALM_BENCHMARKS)}; "
            f"otherwise an mteb benchmark name): {e}"
        ) from None
    return [t.metadata.name for t in bench.tasks]


def benchmark_task_defaults(benchmark: str, task: str) -> dict:
    """Spec defaults a task gets from the benchmark it was listed by (the subsets it is scored on)."""
    if benchmark in KALM_BENCHMARKS:
        subsets = KALM_BENCHMARKS[benchmark][1].get(task)
        return {"subsets": list(subsets)} if subsets else {}
    # an mteb benchmark: kalm.evaluation.evaluate takes the task object from the benchmark (its subsets and splits)
    return {"benchmark": benchmark}
