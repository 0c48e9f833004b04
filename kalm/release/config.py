"""The ``release`` section (``ReleaseConfig``): what `snakemake release` publishes and under which name.

Light on purpose (no torch, no mteb): the workflow imports it when it builds the DAG.
"""

from __future__ import annotations

from dataclasses import dataclass

from kalm.options import option


@dataclass
class ReleaseConfig:
    """The ``release`` section: the model's hub name, licence, prompts and whether to push."""

    name: str = option(
        "local/kalm-embedding",
        "the model's hub id <org>/<name>: the folder release/<org>__<name>/, the card's title, mteb's ModelMeta "
        "name and the push target",
        pattern=r"^[\w.-]+/[\w.-]+$",
    )
    base_model_id: str | None = option(
        None,
        "the base model's hub id for the card's base_model (default: base_model when it is a hub id, not a "
        "local folder or package: model)",
        pattern=r"^[\w.-]+/[\w.-]+$",
    )
    license: str | None = option(
        None, "the model's licence, a hub licence id (e.g. apache-2.0, mit); default: the base model card's"
    )
    query_instruction: str | None = option(
        None,
        "the instruction of the saved models' `query` prompt (what encode_query applies); default: the "
        "instruction set's generic retrieval instruction",
    )
    revision: str | None = option(
        None,
        "the revision folder of the mteb results (results/<org>__<name>/<revision>/); default: the first 12 hex "
        "digits of the weights' sha256 (the hub commit is known only after a push)",
    )
    push: bool = option(
        False, "push release/<org>__<name>/model to the hub (huggingface_hub) when a token and the network exist"
    )
    private: bool = option(False, "create the hub repository as private when pushing")


def folder_name(name: str) -> str:
    """``<org>__<name>``: mteb's path-normalised model name (the release and results folders)."""
    return name.replace("/", "__")
