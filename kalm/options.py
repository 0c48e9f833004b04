"""Options declared once: a dataclass field (type, default, help, bounds) is the one declaration of an
option, from which its command-line flag and its config schema entry are derived (as FlagEmbedding's
dataclass arguments through HfArgumentParser).

A field's ``metadata`` (:func:`option`) holds its ``help``, the schema's bounds (``minimum``,
``maximum``, ``exclusive_minimum``; a sequence's items), ``length`` (a sequence of exactly that many),
``choices``, ``aliases`` (more flag names, e.g. a flag's former name), ``config`` (its key in the config
section when it is not
the field's name, a dotted path for nested keys, or None when the field is not a config key of the
section) and ``flag`` (False: no command-line flag, the value comes from another argument).

This module imports nothing heavy: the workflow imports it when it builds the DAG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A dataclass field with its help and schema metadata; a mutable default goes through a factory."""
    kw: dict[str, Any] = {"metadata": {"help": help, **meta}}
    if isinstance(default, list | dict | set):
        kw["default_factory"] = lambda d=default: type(d)(d)
    else:
        kw["default"] = default
    return dataclasses.field(**kw)


def _base_type(annotation: Any) -> tuple[type, bool, bool]:
    """(element type, optional, sequence) of a field annotation such as ``int | None`` or ``tuple[int, ...]``."""
    hint, optional = annotation, False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if typing.get_origin(hint) in (tuple, list):
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _fields(cls) -> list[tuple[dataclasses.Field, tuple[type, bool, bool]]]:
    hints = typing.get_type_hints(cls)
    return [(f, _base_type(hints[f.name])) for f in dataclasses.fields(cls)]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (``--batch-size`` for ``batch_size``), with its type, default and help."""
    for f, (base, _, seq) in _fields(cls):
        if f.name in skip or f.metadata.get("flag") is False:
            continue
        meta, default = f.metadata, _default(f)
        # no default in the namespace: from_args tells a flag given from one left out (--options fills those)
        shown = "" if default in (None, ()) else f" (default: {default})"
        kw: dict[str, Any] = {"help": meta.get("help", "") + shown, "default": argparse.SUPPRESS, "dest": f.name}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _checked(base, meta)
            if seq:
                kw["nargs"] = meta.get("length", "+")
            if "choices" in meta:
                kw["choices"] = list(meta["choices"])
        parser.add_argument(flag_name(f.name), *meta.get("aliases", ()), **kw)


def _checked(base: type, meta: Mapping[str, Any]):
    """The flag's type: ``base``, with the schema's bounds enforced on the command line too."""

    def parse(text: str):
        value = base(text)
        low, high, above = meta.get("minimum"), meta.get("maximum"), meta.get("exclusive_minimum")
        if (
            (low is not None and value < low)
            or (high is not None and value > high)
            or (above is not None and value <= above)
        ):
            bounds = [
                f">= {low}" if low is not None else "",
                f"> {above}" if above is not None else "",
                f"<= {high}" if high is not None else "",
            ]
            raise argparse.ArgumentTypeError(f"{text}: must be {' and '.join(b for b in bounds if b)}")
        return value

    parse.__name__ = base.__name__
    return parse


def from_args(cls, args: argparse.Namespace, base: Mapping[str, Any] | None = None):
    """``cls`` from ``base`` ({field: value}, e.g. a stage's options JSON) and the flags given, which win;
    fields in neither keep their defaults. Sequences become tuples; an unknown key of ``base`` is an error."""
    fields = {f.name: seq for f, (_, _, seq) in _fields(cls)}
    unknown = sorted(set(base or {}) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(fields)}")
    values = {**(base or {}), **{n: getattr(args, n) for n in fields if hasattr(args, n)}}
    return cls(**{n: tuple(v) if fields[n] and v is not None else v for n, v in values.items()})


def config_key(f: dataclasses.Field) -> str | None:
    return f.metadata.get("config", f.name)


def section_keys(cls) -> dict[str, str]:
    """{config key of the section (dotted when nested): field name} for the fields that are config keys."""
    return {config_key(f): f.name for f, _ in _fields(cls) if config_key(f) is not None}


def options_from_section(cls, section: Mapping[str, Any]) -> dict[str, Any]:
    """{field name: value} of the keys ``section`` (a config section) sets; nested keys (``a.b``) followed."""
    out = {}
    for key, name in section_keys(cls).items():
        node: Any = section
        for part in key.split("."):
            node = node.get(part, dataclasses.MISSING) if isinstance(node, Mapping) else dataclasses.MISSING
        if node is not dataclasses.MISSING:
            out[name] = node
    return out


def options_json(cls, section: Mapping[str, Any]) -> str:
    return json.dumps(options_from_section(cls, section), sort_keys=True, ensure_ascii=False)


def schema_properties(cls) -> dict[str, dict]:
    """The JSON-schema ``properties`` of the section's keys (nested keys as objects), with each field's
    type, bounds, choices, default and description: what the workflow's config schema validates."""
    json_type = {int: "integer", float: "number", str: "string", bool: "boolean"}
    props: dict[str, dict] = {}
    for f, (base, optional, seq) in _fields(cls):
        key = config_key(f)
        if key is None:
            continue
        meta = f.metadata
        item: dict[str, Any] = {"type": json_type[base]}
        for ours, theirs in (("minimum", "minimum"), ("maximum", "maximum"), ("exclusive_minimum", "exclusiveMinimum")):
            if meta.get(ours) is not None:
                item[theirs] = meta[ours]
        if "choices" in meta:
            item["enum"] = list(meta["choices"])
        if "pattern" in meta:
            item["pattern"] = meta["pattern"]
        entry = {"type": "array", "items": item, "minItems": meta.get("length", 1)} if seq else dict(item)
        if seq and meta.get("length"):
            entry["maxItems"] = meta["length"]
        if optional:  # None: the option's "not set" (max_steps: the epochs decide)
            entry["type"] = [entry["type"], "null"]
        default = _default(f)
        if default is not None and (not seq or len(default)):  # an empty sequence: "not set", no default
            entry["default"] = list(default) if seq else default
        elif default is None and optional:
            entry["default"] = None  # filled in as null: the workflow reads every key of a section
        if meta.get("help"):
            entry["description"] = meta["help"]
        *parents, leaf = key.split(".")
        node = props
        for p in parents:  # a nested key: an object holding it (e.g. matryoshka: {dims, weights})
            # default {}: Snakemake's validate then fills the nested defaults of an absent object too
            obj = node.setdefault(p, {"type": "object", "additionalProperties": False, "default": {}, "properties": {}})
            node = obj["properties"]
        node[leaf] = entry
    return props


def schema_required(cls) -> dict[str, list[str]]:
    """{nested object key: its keys that are all required together} (``required_together`` metadata)."""
    out: dict[str, list[str]] = {}
    for f, _ in _fields(cls):
        key = config_key(f)
        if key and "." in key and f.metadata.get("required_together"):
            parent, leaf = key.rsplit(".", 1)
            out.setdefault(parent, []).append(leaf)
    return out
