"""KaLM instruction format and the one definition of a "symmetric" task.

Queries get ``Instruct: {instruction} \\n Query: {text}``; for symmetric tasks the same prefix goes
on both sides; passages of asymmetric tasks get none.

Task types come in two spellings: the training-data types of the config (``retrieval``, ``sts``,
``pair_classification``, ...) and MTEB's task types (``Retrieval``, ``STS``,
``PairClassification``, ...). Both are mapped to the MTEB type (:func:`mteb_type`) and
symmetry is decided there, once, for the data stages, the trainer and ``kalm evaluate``:

- symmetric (both sides are texts of the same kind, so both carry the instruction): STS,
  PairClassification, Clustering, BitextMining, Summarization;
- asymmetric (queries vs documents): Retrieval, Reranking and the rest. Classification is
  asymmetric as training data (a text vs its label description); as an MTEB task it has a
  single input, which always carries the instruction (``kalm.evaluate.build_prompts``).
"""

from __future__ import annotations

# config data type (lower case, '-' or '_') -> MTEB task type
DATA_TO_MTEB_TYPE = {
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
    # weak pretraining pairs (title -> passage, question -> answer) are query/document pairs
    "weak": "Retrieval",
}

SYMMETRIC_MTEB_TYPES = frozenset({"STS", "PairClassification", "Clustering", "BitextMining", "Summarization"})


def mteb_type(task_type: str | None) -> str | None:
    """The MTEB task type of a data type (``pair_classification``) or an MTEB type (``PairClassification``)."""
    if not task_type:
        return None
    key = task_type.lower().replace("-", "_")
    if key in DATA_TO_MTEB_TYPE:
        return DATA_TO_MTEB_TYPE[key]
    return task_type  # an MTEB type (or one we do not know: asymmetric)


def query_prefix(instruction: str | None) -> str:
    return f"Instruct: {instruction} \n Query: " if instruction else ""


def is_symmetric(task_type: str | None) -> bool:
    """True when both sides of the task are texts of the same kind (see the module docstring)."""
    return mteb_type(task_type) in SYMMETRIC_MTEB_TYPES


def format_query(text: str, instruction: str | None) -> str:
    return query_prefix(instruction) + text


def format_passage(text: str, instruction: str | None, symmetric: bool) -> str:
    return format_query(text, instruction) if symmetric else text
