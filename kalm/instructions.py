"""KaLM instruction format.

Queries get ``Instruct: {instruction} \\n Query: {text}``; for symmetric tasks (STS, pair
classification, clustering-style data) the same prefix goes on both sides; passages of
asymmetric tasks (retrieval, classification exemplars) get none.
"""

from __future__ import annotations

SYMMETRIC_TYPES = {"sts", "pair_classification", "pairclassification", "clustering", "bitextmining"}


def query_prefix(instruction: str | None) -> str:
    return f"Instruct: {instruction} \n Query: " if instruction else ""


def is_symmetric(task_type: str | None) -> bool:
    return (task_type or "").lower().replace("-", "_") in SYMMETRIC_TYPES


def format_query(text: str, instruction: str | None) -> str:
    return query_prefix(instruction) + text


def format_passage(text: str, instruction: str | None, symmetric: bool) -> str:
    return format_query(text, instruction) if symmetric else text
