"""Validate and normalise one KaLM-format training task: a JSON Lines or Parquet file, or a
folder of such shards.

A record is ``{"query": str, "pos": [str, ...], "neg": [str, ...] (optional),
"instruction": str (optional)}``; ``--instruction`` fills in records without one,
``--drop-instructions`` removes them all (see :func:`validate_file`). Bad records either stop
the run with an error naming file, line (JSONL) or row (Parquet, counted from 1) and field
(``on_error="stop"``, the default) or go to a rejects file with their reason
(``on_error="quarantine"``); either way the stats JSON accounts for every line and row.

A task folder is read shard by shard in sorted path order (``*.jsonl`` and ``*.parquet``,
recursively); files with other suffixes are ignored (hidden files too), and a folder without
shards is an error. Parquet is streamed in record batches with pyarrow, so a shard never has to
fit in memory; a column may have any Arrow type, and a value of the wrong type is reported like a
JSON one (``expected a string, got int``). JSON Lines are streamed too, line by line (``orjson``
parses a line when installed, ``json`` decides every line orjson rejects or that fails a check, so
accepted records and error messages are the same either way).

Output: a Parquet shard of ``kalm.data.shards.RECORD_SCHEMA`` when ``out_path`` ends with ``.parquet``
(the format between stages; written a row group at a time), else JSON Lines (hand use). Each
record's ``id`` is ``kalm.data.shards.record_id(ordinal, line or row - 1)``: ``ordinal`` is
``shard_ordinal`` for the first input file and counts up by one per file of a folder, so the
workflow's one-job-per-file validation (``--shard-ordinal`` = the file's place among the stage's
files, common.smk ``validated_parts``) and one run over the whole folder give the same ids, and an
id leads back to its file and line or row. Parquet output always has ids; JSON Lines get them when
``shard_ordinal`` is given. Rejects are streamed to their file as they come, never held.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

from kalm.data.shards import record_writer
from kalm.io import StageStats, atomic_path
from kalm.text import normalize_text

try:  # faster JSON parsing (a dependency; records/s measured by scripts/bench_validate.py)
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is in pyproject's dependencies
    _orjson = None

log = logging.getLogger(__name__)


SHARD_SUFFIXES = (".jsonl", ".parquet")


class ValidationError(ValueError):
    """``line`` is the JSONL line, or the Parquet row (``unit="row"``), counted from 1."""

    def __init__(self, path: str, line: int, field: str, reason: str, unit: str = "line"):
        self.path, self.line, self.field, self.reason, self.unit = path, line, field, reason, unit
        where = f"{path}:{line}" if unit == "line" else f"{path}: row {line}"
        super().__init__(f"{where}: field '{field}': {reason}")


def _text(value, path: str, line: int, field: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(path, line, field, f"expected a string, got {type(value).__name__}")
    if not value.isascii():
        try:  # JSON's \ud800-style escapes can encode half a surrogate pair: not text, and unwritable as UTF-8
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValidationError(
                path,
                line,
                field,
                f"lone surrogate U+{ord(value[e.start]):04X} at character {e.start} (half of a UTF-16 pair, not text)",
            ) from None
    text = normalize_text(value)
    if not text:
        raise ValidationError(path, line, field, "empty text")
    return text


def _text_list(value, path: str, line: int, field: str, required: bool) -> list[str]:
    if not isinstance(value, list):
        raise ValidationError(path, line, field, f"expected a list of strings, got {type(value).__name__}")
    if required and not value:
        raise ValidationError(path, line, field, "empty list")
    return [_text(v, path, line, f"{field}[{i}]") for i, v in enumerate(value)]


def parse_record(raw: bytes, path: str, line: int, require_neg: bool = False, fast: bool = True) -> dict:
    """Parse and normalise one line; raise ValidationError naming the field at fault.

    ``fast`` (with orjson installed): orjson parses the line; whatever it rejects (NaN, a lone
    surrogate escape, integers beyond 64 bits become floats there) or whatever then fails a check
    is parsed again with ``json``, which decides: a record orjson accepts and that passes is a dict
    of strings and lists of strings, the same as json's; errors are always json's."""
    if fast and _orjson is not None:
        try:
            obj = _orjson.loads(raw)
        except _orjson.JSONDecodeError:
            pass
        else:
            if isinstance(obj, dict):
                try:
                    return check_record(obj, path, line, require_neg)
                except ValidationError:
                    pass
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValidationError(path, line, "<line>", f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValidationError(path, line, "<line>", f"not JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise ValidationError(path, line, "<line>", "a record must be a JSON object")
    return check_record(obj, path, line, require_neg)


def check_record(obj: dict, path: str, line: int, require_neg: bool = False) -> dict:
    """Check and normalise a decoded record (a JSON object or a Parquet row)."""
    if "query" not in obj:
        raise ValidationError(path, line, "query", "missing")
    if "pos" not in obj:
        raise ValidationError(path, line, "pos", "missing")
    record = {
        "query": _text(obj["query"], path, line, "query"),
        "pos": _text_list(obj["pos"], path, line, "pos", required=True),
    }
    if "neg" in obj or require_neg:
        record["neg"] = _text_list(obj.get("neg"), path, line, "neg", required=require_neg)
    if obj.get("instruction") is not None:
        record["instruction"] = _text(obj["instruction"], path, line, "instruction")
    return record


def task_files(path: str | Path) -> list[Path]:
    """The shard files of a task: the file itself, or the .jsonl/.parquet files of a folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file()
            and f.suffix in SHARD_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not files:
            raise ValidationError(str(path), 0, "<file>", f"folder has no {' or '.join(SHARD_SUFFIXES)} shards")
        return files
    if not path.is_file():
        raise ValidationError(str(path), 0, "<file>", "no such file or folder")
    if path.suffix not in SHARD_SUFFIXES:
        raise ValidationError(
            str(path),
            0,
            "<file>",
            f"unsupported format {path.suffix or '(no suffix)'!r}: use {' or '.join(SHARD_SUFFIXES)}",
        )
    return [path]


class _RawLine:
    """A JSONL line, parsed lazily so that a bad one is reported (or quarantined) in place."""

    __slots__ = ("raw", "path", "line", "fast")

    def __init__(self, raw: bytes, path: str, line: int, fast: bool = True):
        self.raw, self.path, self.line, self.fast = raw, path, line, fast

    def __call__(self) -> dict:
        return parse_record(self.raw, self.path, self.line, fast=self.fast)


class _Row:
    __slots__ = ("obj", "path", "row")

    def __init__(self, obj: dict, path: str, row: int):
        self.obj, self.path, self.row = obj, path, row

    def __call__(self) -> dict:
        try:
            return check_record(self.obj, self.path, self.row)
        except ValidationError as e:
            raise ValidationError(e.path, e.line, e.field, e.reason, unit="row") from None


def _raw_repr(item) -> str:
    if isinstance(item, _RawLine):
        return item.raw.decode("utf-8", errors="replace")
    if isinstance(item, _Row):
        return json.dumps(item.obj, ensure_ascii=False, default=repr)
    return ""  # pragma: no cover


def _raw_records(path: Path, fast_json: bool = True):
    """Yield (line or row number, item) for every record of one shard, streamed (a line, or a Parquet
    batch, at a time); item() parses it."""
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    with open(path, "rb", buffering=1 << 20) as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():  # blank lines are layout, not records
                yield line_no, _RawLine(raw.rstrip(b"\r\n"), str(path), line_no, fast_json)


def _parquet_rows(path: Path, batch_size: int = 8192):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValidationError(str(path), 0, "<file>", f"not a readable Parquet file: {e}", unit="row") from None
    columns = [c for c in pf.schema_arrow.names if c in ("query", "pos", "neg", "instruction")]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            for obj in batch.to_pylist():
                row += 1
                # a null optional column is the same as an absent key
                for key in ("neg", "instruction"):
                    if key in obj and obj[key] is None:
                        del obj[key]
                yield row, _Row(obj, str(path), row)
    except pa.ArrowException as e:
        raise ValidationError(str(path), row + 1, "<file>", f"unreadable Parquet data: {e}", unit="row") from None


def validate_file(
    path: str,
    task: str,
    out_path: str,
    stats_path: str,
    on_error: str = "stop",
    rejects_path: str | None = None,
    instruction: str | None = None,
    drop_instructions: bool = False,
    shard_ordinal: int | None = None,
    fast_json: bool = True,
) -> StageStats:
    """Validate ``path`` (a file or a folder of shards) into ``out_path`` (records gain a ``task`` field,
    and an ``id``: module docstring; Parquet when ``out_path`` ends with ``.parquet``).

    ``instruction`` goes to the records that carry none. ``drop_instructions``: the records get no
    instruction at all, their own removed (counted as ``instructions_dropped`` in the stats): the
    workflow asks for it where the instruction set evaluates the task's type without instruction
    (kalm.evaluation.instructions.instruction_sides, e.g. STS under KaLM V1), so training matches evaluation.

    An unreadable file (missing, unsupported suffix, not Parquet) stops the run in both modes."""
    from kalm.data.shards import record_id

    if on_error not in ("stop", "quarantine"):
        raise ValueError(f"on_error must be 'stop' or 'quarantine', not {on_error!r}")
    if drop_instructions and instruction:
        raise ValueError("validate: give an instruction or drop_instructions, not both")
    with_ids = shard_ordinal is not None or str(out_path).endswith(".parquet")
    ordinal = shard_ordinal or 0
    dropped = 0
    stats = StageStats("validate", source=str(path), task=task)
    shards = task_files(path)
    if len(shards) > 1 or Path(path).is_dir():
        stats.extra["shards"] = [str(f) for f in shards]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(record_writer(out_path))
        rejects = None
        if rejects_path is not None:
            rejects = stack.enter_context(open(stack.enter_context(atomic_path(rejects_path)), "w", encoding="utf-8"))
        for n, shard in enumerate(shards):
            for where, item in _raw_records(shard, fast_json):
                stats.seen(task=task)
                try:
                    rec = item()
                except ValidationError as e:
                    if on_error == "stop":
                        raise
                    stats.drop(f"invalid:{e.field.split('[')[0]}", task=task)
                    if rejects is not None:
                        rejects.write(
                            json.dumps(
                                {
                                    "file": str(shard),
                                    e.unit: where,
                                    "field": e.field,
                                    "reason": e.reason,
                                    "raw": _raw_repr(item),
                                },
                                ensure_ascii=False,
                            )
                            + "\n"
                        )
                    continue
                if drop_instructions:
                    dropped += rec.pop("instruction", None) is not None
                elif instruction and "instruction" not in rec:
                    rec["instruction"] = instruction
                rec["task"] = task
                if with_ids:
                    rec["id"] = record_id(ordinal + n, where - 1)
                out.write(rec)
                stats.keep(task=task)
    if drop_instructions:
        stats.extra["instructions_dropped"] = dropped
    stats.write(stats_path)
    log.info("validated %s: %d in, %d kept", path, stats.n_in, stats.kept)
    return stats


def _run(args: argparse.Namespace) -> None:
    try:
        validate_file(
            args.input,
            args.task,
            args.out,
            args.stats,
            args.on_error,
            args.rejects,
            args.instruction,
            args.drop_instructions,
            args.shard_ordinal,
        )
    except ValidationError as e:
        raise SystemExit(f"kalm validate: {e}") from None


def register(sub) -> None:
    p = sub.add_parser(
        "validate", help="validate and normalise one training task (a .jsonl/.parquet file or a folder of shards)"
    )
    p.add_argument("--input", required=True, help="a .jsonl or .parquet file, or a folder of them")
    p.add_argument("--task", required=True, help="task name (the file's task)")
    p.add_argument("--out", required=True, help="a .parquet shard (the format between stages) or .jsonl")
    p.add_argument("--stats", required=True)
    p.add_argument("--rejects", help="quarantine file (written with --on-error quarantine)")
    p.add_argument(
        "--shard-ordinal",
        type=int,
        metavar="N",
        help="the input file's place among the stage's files: records get id = (N << 32) | (line or row - 1) "
        "(a folder's files N, N+1, ...); default 0 for .parquet output, no ids in .jsonl",
    )
    p.add_argument("--on-error", choices=["stop", "quarantine"], default="stop")
    instr = p.add_mutually_exclusive_group()
    instr.add_argument("--instruction", help="task instruction for records that carry none")
    instr.add_argument(
        "--drop-instructions",
        action="store_true",
        help="records get no instruction, their own removed (a task type evaluated without one)",
    )
    p.set_defaults(func=_run)
