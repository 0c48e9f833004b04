"""The workflow's config schema: ``workflow/schemas/config.schema.yaml`` with the sections whose options kalm
declares filled in from their declarations (kalm.options): a training stage's keys (``pretrain``,
``finetune``: ``$defs.train_stage``) come from :class:`kalm.training.config.TrainConfig` (its ``distill``
object also from :class:`kalm.mining.config.TeacherConfig`), the ``mine``
section's from :class:`kalm.mining.config.MineConfig`, ``tracking``'s from
:class:`kalm.training.config.TrackingConfig`, ``data.dedup`` and ``data.decontaminate`` from
:mod:`kalm.data.config`. An option is declared once, in its dataclass, and
the schema, its defaults (Snakemake's ``validate`` fills them in) and the subcommand's flags follow.

Light (no torch, no faiss): the Snakefile calls :func:`schema_file` before it builds the DAG.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import yaml

from kalm import options
from kalm.data.config import DecontaminateConfig, DedupConfig
from kalm.data.labelled import LabelledConfig
from kalm.mining.config import EmbedConfig, MineConfig, TeacherConfig
from kalm.release.config import ReleaseConfig
from kalm.training.config import SoupConfig, TrackingConfig, TrainConfig

# schema entry (a path of keys from the root) -> the dataclass whose config keys it holds, beside the keys
# the YAML declares itself
DECLARED = {
    ("$defs", "train_stage"): TrainConfig,
    # after TrainConfig, whose distill.weight / distill.temperature make the object the teacher's keys join
    ("$defs", "train_stage", "properties", "distill"): TeacherConfig,
    ("properties", "embed"): EmbedConfig,
    ("properties", "mine"): MineConfig,
    ("properties", "soup"): SoupConfig,
    ("properties", "release"): ReleaseConfig,
    ("$defs", "data_task", "properties", "labelled"): LabelledConfig,
    ("properties", "tracking"): TrackingConfig,
    ("properties", "data", "properties", "dedup"): DedupConfig,
    ("properties", "data", "properties", "decontaminate"): DecontaminateConfig,
}


def full_schema(base: str | os.PathLike) -> dict:
    """The YAML schema at ``base`` with every DECLARED entry's properties added; a key declared in both
    places is an error (one place per option)."""
    schema = yaml.safe_load(Path(base).read_text(encoding="utf-8"))
    for path, cls in DECLARED.items():
        entry = schema
        for key in path:
            entry = entry[key]
        props = entry.setdefault("properties", {})
        derived = options.schema_properties(cls)
        twice = sorted(set(props) & set(derived))
        if twice:
            raise ValueError(f"{base}: {'.'.join(path)} declares {twice}, which {cls.__name__} declares already")
        for key, required in options.schema_required(cls).items():
            derived[key]["required"] = required
            derived[key].pop("default", None)  # an object whose keys come together has no empty default
        props.update(derived)
    return schema


def schema_file(base: str | os.PathLike) -> str:
    """:func:`full_schema` written to a file (Snakemake's ``validate`` takes a path), named by its content."""
    text = json.dumps(full_schema(base), sort_keys=True, indent=1)
    path = Path(tempfile.gettempdir()) / f"kalm-config-schema-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return str(path)
