"""Validate and normalise one KaLM-format training file (JSON Lines).

A record is ``{"query": str, "pos": [str, ...], "neg": [str, ...] (optional),
"instruction": str (optional)}``. Bad records either stop the run with an error naming
file, line and field (``on_error="stop"``, the default) or go to a rejects file with
their reason (``on_error="quarantine"``); either way the stats JSON accounts for every line.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from kalm.io import StageStats, atomic_path
from kalm.text import normalize_text

log = logging.getLogger(__name__)


class ValidationError(ValueError):
    def __init__(self, path: str, line: int, field: str, reason: str):
        self.path, self.line, self.field, self.reason = path, line, field, reason
        super().__init__(f"{path}:{line}: field '{field}': {reason}")


def _text(value, path: str, line: int, field: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(path, line, field, f"expected a string, got {type(value).__name__}")
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


def parse_record(raw: bytes, path: str, line: int, require_neg: bool = False) -> dict:
    """Parse and normalise one line; raise ValidationError naming the field at fault."""
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


def validate_file(
    path: str,
    task: str,
    out_path: str,
    stats_path: str,
    on_error: str = "stop",
    rejects_path: str | None = None,
    instruction: str | None = None,
) -> StageStats:
    """Validate ``path`` into ``out_path`` (records gain a ``task`` field)."""
    if on_error not in ("stop", "quarantine"):
        raise ValueError(f"on_error must be 'stop' or 'quarantine', not {on_error!r}")
    stats = StageStats("validate", source=str(path), task=task)
    rejects = []
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out, open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines are layout, not records
            stats.seen(task=task)
            try:
                rec = parse_record(raw.rstrip(b"\r\n"), str(path), line_no)
            except ValidationError as e:
                if on_error == "stop":
                    raise
                stats.drop(f"invalid:{e.field.split('[')[0]}", task=task)
                rejects.append({"file": str(path), "line": line_no, "field": e.field, "reason": e.reason,
                                "raw": raw.decode("utf-8", errors="replace").rstrip("\n")})
                continue
            if instruction and "instruction" not in rec:
                rec["instruction"] = instruction
            rec["task"] = task
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            stats.keep(task=task)
    if rejects_path is not None:
        with atomic_path(rejects_path) as tmp:
            Path(tmp).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects), encoding="utf-8")
    stats.write(stats_path)
    log.info("validated %s: %d in, %d kept", path, stats.n_in, stats.kept)
    return stats


def _run(args: argparse.Namespace) -> None:
    try:
        validate_file(args.input, args.task, args.out, args.stats, args.on_error, args.rejects, args.instruction)
    except ValidationError as e:
        raise SystemExit(f"kalm validate: {e}") from None


def register(sub) -> None:
    p = sub.add_parser("validate", help="validate and normalise one training file")
    p.add_argument("--input", required=True)
    p.add_argument("--task", required=True, help="task name (the file's task)")
    p.add_argument("--out", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--rejects", help="quarantine file (written with --on-error quarantine)")
    p.add_argument("--on-error", choices=["stop", "quarantine"], default="stop")
    p.add_argument("--instruction", help="task instruction for records that carry none")
    p.set_defaults(func=_run)
