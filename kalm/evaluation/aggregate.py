"""Aggregate per-task MTEB results into ``results/mteb_<lang>.json`` (the contract in docs/design.md).

Inputs are the per-task files written by ``kalm evaluate``: either the kalm sidecar
(``<task>.kalm.json``) or mteb's raw result (``<task>.json``, whose sidecar is then read;
without a sidecar a raw result of a registered MTEB task is read directly).

Output::

    {"model", "mteb_version", "tasks": {name: {"type", "main_score", "metric"}},
     "by_type": {type: mean main_score}, "mean_task", "mean_type",
     "model_spec" (the model path the jobs loaded), "max_seq_length", "dtype", "lang", "n_tasks",
     "instruction_set" (kalm / none: kalm.evaluation.task_instructions), "instructions": {task: instruction},
     "instruction_sources": {task: config | kalm:task | kalm:alias | kalm:type | none},
     "data_sources": {task: local | mirror | hub},
     # with a baseline aggregate (the base model's output of this same stage):
     "baseline": {"model", "mean_task", "mean_type", "tasks": {name: main_score}},
     "gain": {"mean_task", "mean_type", "tasks": {name: final - base}}}

``mean_type`` is the mean of the per-type means (MTEB's "mean (task type)"). Scores stay on
mteb's 0-1 scale. With a baseline a markdown table (same name, ``.md``) is written too.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from statistics import fmean
from typing import Any

from kalm.io import atomic_path, read_json, write_json

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".kalm.json"


class AggregateError(ValueError):
    """Per-task results that cannot be aggregated (missing, duplicated, or from different models)."""


def _sidecar_for(path: Path) -> Path:
    if path.name.endswith(SIDECAR_SUFFIX):
        return path
    stem = path.name.removesuffix(".json")
    return path.with_name(stem + SIDECAR_SUFFIX)


def _from_raw(path: Path) -> dict:
    """A task record from mteb's raw TaskResult JSON (registered MTEB tasks only: the type comes from mteb)."""
    import mteb
    from mteb.results import TaskResult

    try:
        result = TaskResult.from_disk(path)
    except (OSError, ValueError, KeyError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        raise AggregateError(f"{path}: not an mteb result file ({type(e).__name__}: {e})") from None
    try:
        meta = mteb.get_task(result.task_name).metadata
    except KeyError:
        raise AggregateError(
            f"{path}: task {result.task_name!r} is not a registered MTEB task and its sidecar "
            f"{_sidecar_for(path).name} is missing, so its type is unknown"
        ) from None
    return {
        "task": result.task_name,
        "type": meta.type,
        "main_score": float(result.get_score()),
        "metric": meta.main_score,
        "mteb_version": result.mteb_version,
    }


def read_task_record(path: str | Path) -> dict:
    """Read one per-task result (sidecar preferred) as a dict with at least task, type, main_score, metric."""
    path = Path(path)
    sidecar = _sidecar_for(path)
    if sidecar.exists():
        try:
            rec = read_json(sidecar)
        except ValueError as e:
            raise AggregateError(f"{sidecar}: invalid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise AggregateError(f"{sidecar}: expected a JSON object")
        source = sidecar
    elif path.exists():
        rec = _from_raw(path)
        source = path
    else:
        raise AggregateError(f"{path}: result file not found")
    for key in ("task", "type", "main_score", "metric"):
        if rec.get(key) is None:
            raise AggregateError(f"{source}: field {key!r} is missing")
    if isinstance(rec["main_score"], bool) or not isinstance(rec["main_score"], (int, float)):
        raise AggregateError(f"{source}: field 'main_score' must be a number, got {rec['main_score']!r}")
    if not -1.0 <= rec["main_score"] <= 1.0:  # correlations may be negative; >1 means a x100 score
        raise AggregateError(f"{source}: field 'main_score' = {rec['main_score']} is not on mteb's 0-1 scale")
    rec["_source"] = str(source)
    return rec


def _common(records: list[dict], key: str) -> Any:
    """The value of ``key`` shared by all records; None if absent; a sorted list (and a warning) if they differ."""
    values = {repr(r.get(key)): r.get(key) for r in records if r.get(key) is not None}
    if not values:
        return None
    if len(values) == 1:
        return next(iter(values.values()))
    logger.warning("per-task results differ in %s: %s", key, sorted(values))
    return [values[k] for k in sorted(values)]


def summarize(tasks: dict[str, dict]) -> tuple[dict[str, float], float, float]:
    """(by_type, mean_task, mean_type) for {name: {"type", "main_score"}}."""
    per_type: dict[str, list[float]] = {}
    for t in tasks.values():
        per_type.setdefault(t["type"], []).append(t["main_score"])
    by_type = {ty: fmean(v) for ty, v in sorted(per_type.items())}
    mean_task = fmean(t["main_score"] for t in tasks.values())
    mean_type = fmean(by_type.values())
    return by_type, mean_task, mean_type


def aggregate(result_paths: list[str], model: str, out_path: str, baseline_path: str | None = None) -> dict:
    """Combine per-task results into one JSON (and a markdown comparison when a baseline is given)."""
    if not result_paths:
        raise AggregateError("no per-task results given")
    records = [read_task_record(p) for p in result_paths]

    tasks: dict[str, dict] = {}
    instructions: dict[str, str | None] = {}
    instruction_sources: dict[str, str | None] = {}
    data_sources: dict[str, str | None] = {}
    sources: dict[str, str] = {}
    for rec in records:
        name = rec["task"]
        if name in tasks:
            raise AggregateError(f"task {name!r} appears twice: {sources[name]} and {rec['_source']}")
        tasks[name] = {"type": rec["type"], "main_score": float(rec["main_score"]), "metric": rec["metric"]}
        instructions[name] = rec.get("instruction")
        instruction_sources[name] = rec.get("instruction_source")
        data_sources[name] = rec.get("source")
        sources[name] = rec["_source"]

    models = {r["model"] for r in records if r.get("model")}
    if len(models) > 1:
        raise AggregateError(f"per-task results come from different models: {sorted(models)}")

    by_type, mean_task, mean_type = summarize(tasks)
    out: dict[str, Any] = {
        "model": model,
        "mteb_version": _common(records, "mteb_version"),
        "tasks": tasks,
        "by_type": by_type,
        "mean_task": mean_task,
        "mean_type": mean_type,
        "n_tasks": len(tasks),
        "lang": _common(records, "lang"),
        "model_spec": next(iter(models), None),
        "max_seq_length": _common(records, "max_seq_length"),
        "dtype": _common(records, "dtype"),
        "instruction_set": _common(records, "instruction_set"),
        "instructions": instructions,
        "instruction_sources": instruction_sources,
        "data_sources": data_sources,
    }

    if baseline_path:
        try:
            base = read_json(baseline_path)
        except (OSError, ValueError) as e:
            raise AggregateError(f"{baseline_path}: cannot read baseline aggregate ({e})") from None
        for key in ("model", "mean_task", "mean_type", "tasks"):
            if key not in base:
                raise AggregateError(f"{baseline_path}: field {key!r} is missing (not an aggregate written by kalm)")
        base_scores = {n: float(t["main_score"]) for n, t in base["tasks"].items()}
        out["baseline"] = {
            "model": base["model"],
            "mean_task": base["mean_task"],
            "mean_type": base["mean_type"],
            "tasks": base_scores,
            "instruction_set": base.get("instruction_set"),
        }
        common = [n for n in tasks if n in base_scores]
        missing = sorted(set(tasks) - set(base_scores))
        extra = sorted(set(base_scores) - set(tasks))
        if missing or extra:
            logger.warning("baseline task set differs: missing in baseline %s, only in baseline %s", missing, extra)
        gain: dict[str, Any] = {"tasks": {n: tasks[n]["main_score"] - base_scores[n] for n in common}}
        # a gain is only the model's if both were evaluated with the same instructions
        base_instructions = base.get("instructions") or {}
        differ = sorted(n for n in common if n in base_instructions and base_instructions[n] != instructions[n])
        if differ:
            logger.warning("final and baseline were evaluated with different instructions on %s", differ)
        gain["instructions_differ"] = differ
        if not missing and not extra:
            gain["mean_task"] = mean_task - base["mean_task"]
            gain["mean_type"] = mean_type - base["mean_type"]
        elif common:
            # compare like with like: means over the tasks both results have
            _, ft, fty = summarize({n: tasks[n] for n in common})
            _, bt, bty = summarize({n: {"type": tasks[n]["type"], "main_score": base_scores[n]} for n in common})
            gain["mean_task"] = ft - bt
            gain["mean_type"] = fty - bty
            gain["common_tasks"] = len(common)
            gain["missing_in_baseline"] = missing
            gain["only_in_baseline"] = extra
        else:
            gain["mean_task"] = gain["mean_type"] = None
        out["gain"] = gain

    write_json(out_path, out)
    if baseline_path:
        md_path = markdown_path(out_path)
        with atomic_path(md_path) as tmp:
            tmp.write_text(markdown_table(out), encoding="utf-8")
    return out


def markdown_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_suffix(".md")


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def markdown_table(agg: dict) -> str:
    """Base vs final per task, per-type means and overall means (scores x100)."""
    base = agg["baseline"]
    gain = agg["gain"]
    lang = f" ({agg['lang']})" if isinstance(agg.get("lang"), str) else ""
    lines = [
        f"# MTEB{lang}: {agg['model']} vs {base['model']}",
        "",
        (
            f"Scores are mteb main scores x100; mteb {agg.get('mteb_version')}; instruction set "
            f"{agg.get('instruction_set')}; max length {agg.get('max_seq_length')}, dtype {agg.get('dtype')}."
        ),
        "",
        "| Task | Type | Metric | Base | Final | Δ |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, t in sorted(agg["tasks"].items(), key=lambda kv: (kv[1]["type"], kv[0])):
        b = base["tasks"].get(name)
        d = gain["tasks"].get(name)
        lines.append(
            f"| {name} | {t['type']} | {t['metric']} | {_fmt(b)} | {_fmt(t['main_score'])} | {_fmt(d, True)} |"
        )
    base_tasks = {
        n: {"type": agg["tasks"][n]["type"], "main_score": s} for n, s in base["tasks"].items() if n in agg["tasks"]
    }
    base_by_type = summarize(base_tasks)[0] if base_tasks else {}
    for ty, v in agg["by_type"].items():
        b = base_by_type.get(ty)
        lines.append(f"| *mean {ty}* | {ty} | | {_fmt(b)} | {_fmt(v)} | {_fmt(None if b is None else v - b, True)} |")
    lines.append(
        f"| **mean (task)** | | | {_fmt(base['mean_task'])} | {_fmt(agg['mean_task'])} | {_fmt(gain.get('mean_task'), True)} |"
    )
    lines.append(
        f"| **mean (type)** | | | {_fmt(base['mean_type'])} | {_fmt(agg['mean_type'])} | {_fmt(gain.get('mean_type'), True)} |"
    )
    if gain.get("common_tasks") is not None:
        lines += ["", f"Gains of the means are over the {gain['common_tasks']} tasks both results have."]
    return "\n".join(lines) + "\n"


def track_scores(out: dict, tracking: dict, run: str | None) -> None:
    """The aggregate's scores as the final scores of the tracked run (kalm.training.tracking): per task, the
    means and the gains over the base model, under ``mteb_<lang>/``."""
    from kalm.training.tracking import job_tracking, make_tracker

    settings = job_tracking(tracking, run)
    prefix = f"mteb_{out.get('lang') or 'all'}"
    summary = {f"{prefix}/{task}": r["main_score"] for task, r in out["tasks"].items()}
    summary.update({f"{prefix}/mean_task": out["mean_task"], f"{prefix}/mean_type": out["mean_type"]})
    for key, value in (out.get("gain") or {}).items():
        if isinstance(value, int | float):
            summary[f"{prefix}/gain_{key}"] = value
    with make_tracker(settings, 0, run or "eval") as tracker:
        tracker.log_summary(summary)


def _run(args: argparse.Namespace) -> int:
    try:
        out = aggregate(args.results, args.model, args.out, baseline_path=args.baseline)
    except AggregateError as e:
        raise SystemExit(f"kalm aggregate: {e}") from None
    if args.tracking:
        track_scores(out, json.loads(args.tracking), args.tracking_run)
    msg = f"{args.model}: {out['n_tasks']} tasks, mean_task={out['mean_task']:.4f}, mean_type={out['mean_type']:.4f}"
    if "gain" in out and out["gain"].get("mean_task") is not None:
        msg += f", gain mean_task={out['gain']['mean_task']:+.4f}"
    print(msg)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("aggregate", help="combine per-task MTEB results into results/mteb_<lang>.json")
    p.add_argument("--model", required=True, help="model name recorded in the aggregate")
    p.add_argument("--out", required=True, help="aggregate JSON to write (a .md table goes beside it with --baseline)")
    p.add_argument("--baseline", default=None, help="aggregate JSON of the base model, to report gains")
    p.add_argument("--tracking", help="JSON tracking section: log the scores as the tracked run's final scores")
    p.add_argument("--tracking-run", help="the tracked run's job name (e.g. soup), after tracking.run_name")
    p.add_argument("results", nargs="+", metavar="RESULT_JSON", help="per-task result (task.json or task.kalm.json)")
    p.set_defaults(func=_run)
