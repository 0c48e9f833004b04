"""Options declared once (kalm.options): a dataclass field is the flag, the config key and its schema."""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

from kalm import options
from kalm.options import option
from kalm.schema import full_schema
from kalm.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Toy:
    rate: float = option(0.5, "a rate", minimum=0, maximum=1)
    steps: int | None = option(None, "steps", minimum=1)
    mode: str = option("a", "a mode", choices=("a", "b"))
    dims: tuple[int, ...] = option((), "dims", config="nested.dims", minimum=1, required_together=True)
    flag: bool = option(False, "a switch")
    hidden: int = option(3, "not a config key", config=None)


def _parse(cls, argv):
    p = argparse.ArgumentParser()
    p.add_argument("--options", type=json.loads, default={})
    options.add_arguments(p, cls)
    args = p.parse_args(argv)
    return options.from_args(cls, args, args.options)


def test_a_field_is_its_flag_with_type_default_bounds_and_choices():
    assert _parse(Toy, []) == Toy()
    got = _parse(Toy, ["--rate", "0.25", "--steps", "7", "--mode", "b", "--dims", "4", "2", "--flag"])
    assert got == Toy(rate=0.25, steps=7, mode="b", dims=(4, 2), flag=True, hidden=3)
    for bad in (["--rate", "2"], ["--steps", "0"], ["--mode", "c"], ["--dims", "0"]):
        with pytest.raises(SystemExit):
            _parse(Toy, bad)


def test_the_options_json_sets_values_and_a_flag_given_wins():
    got = _parse(Toy, ["--options", json.dumps({"rate": 0.1, "mode": "b", "dims": [8]}), "--rate", "0.5"])
    assert (got.rate, got.mode, got.dims) == (0.5, "b", (8,))  # 0.5 equals the default, yet the flag wins
    with pytest.raises(ValueError, match="unknown Toy option"):
        _parse(Toy, ["--options", json.dumps({"rat": 0.1})])


def test_a_config_section_maps_to_fields_nested_keys_included():
    section = {"rate": 0.2, "nested": {"dims": [3, 1]}, "hidden": 9, "other": 1}
    assert options.options_from_section(Toy, section) == {"rate": 0.2, "dims": [3, 1]}
    assert _parse(Toy, ["--options", options.options_json(Toy, section)]) == Toy(rate=0.2, dims=(3, 1))


def test_the_schema_of_a_field_refuses_what_its_flag_refuses():
    props = options.schema_properties(Toy)
    assert set(props) == {"rate", "steps", "mode", "nested", "flag"}  # `hidden` is no config key
    schema = {"type": "object", "additionalProperties": False, "properties": props}
    for k, v in options.schema_required(Toy).items():
        schema["properties"][k]["required"] = v
    jsonschema.validate({"rate": 1, "steps": None, "mode": "a", "nested": {"dims": [2]}, "flag": True}, schema)
    for bad in ({"rate": 1.5}, {"steps": 0}, {"mode": "c"}, {"nested": {"dims": [0]}}, {"nested": {}}, {"ratee": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_the_workflow_schema_takes_every_trainer_option_from_train_config():
    schema = full_schema(ROOT / "workflow/schemas/config.schema.yaml")
    props = schema["$defs"]["train_stage"]["properties"]
    keys = {k.split(".")[0] for k in options.section_keys(TrainConfig)}
    assert keys <= set(props) and {"enabled", "runs", "checkpoint_every", "snapshot_every"} <= set(props)
    assert props["few_negatives"]["enum"] == ["drop", "pad_random", "keep"]
    assert props["matryoshka"]["required"] == ["dims", "weights"]
    # ... and the YAML does not declare them again (one place per option)
    import yaml

    raw = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    assert not keys & set(raw["$defs"]["train_stage"]["properties"])


@pytest.mark.parametrize(
    "path, cls_name",
    [
        (("properties", "mine"), "kalm.mining.config.MineConfig"),
        (("properties", "embed"), "kalm.mining.config.EmbedConfig"),
        (("properties", "soup"), "kalm.training.config.SoupConfig"),
        (("properties", "tracking"), "kalm.training.config.TrackingConfig"),
        (("properties", "data", "properties", "dedup"), "kalm.data.config.DedupConfig"),
        (("properties", "data", "properties", "decontaminate"), "kalm.data.config.DecontaminateConfig"),
    ],
)
def test_a_stage_section_of_the_schema_is_its_dataclass_and_validation_fills_its_defaults(path, cls_name, tmp_path):
    """The mine, data.dedup and data.decontaminate keys come from their dataclasses only, and Snakemake's
    validate fills in the declared defaults, also of a section (or a nested object) the config leaves out:
    the rules read config[...][key], never a default of their own."""
    import dataclasses
    import importlib

    import yaml
    from snakemake.utils import validate

    from kalm.schema import schema_file

    module, name = cls_name.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    raw = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    for key in path:
        raw = raw[key]
    assert not raw.get("properties"), f"{'.'.join(path)}: keys declared in the YAML beside {name}"
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    section = config
    for key in [k for k in path if k != "properties"][:-1]:
        section = section[key]
    required = raw.get("required", [])  # a section with required keys keeps those; else it is left out
    if required:
        section[path[-1]] = {k: section[path[-1]][k] for k in required}
    else:
        section.pop(path[-1], None)
    validate(config, schema_file(ROOT / "workflow/schemas/config.schema.yaml"))
    for key in [k for k in path if k != "properties"]:
        config = config[key]
    got = options.from_args(cls, argparse.Namespace(), options.options_from_section(cls, config))
    kept = {f.name for f in dataclasses.fields(cls) if options.config_key(f) is None or f.name in required}
    want = cls(**{name: getattr(got, name) for name in kept})
    assert got == want  # every config key filled with the dataclass default
    assert set(options.options_from_section(cls, config)) >= {
        f.name for f in dataclasses.fields(cls) if options.config_key(f) is not None and options._default(f) != ()
    }


def test_the_schema_default_instruction_set_is_the_evaluators():
    from kalm.evaluation.instructions import DEFAULT_INSTRUCTION_SET, INSTRUCTION_SETS

    entry = full_schema(ROOT / "workflow/schemas/config.schema.yaml")["properties"]["eval"]["properties"][
        "instruction_set"
    ]
    assert entry["default"] == DEFAULT_INSTRUCTION_SET and entry["enum"] == list(INSTRUCTION_SETS)
