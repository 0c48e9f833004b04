"""Evaluate one embedding model on one MTEB task (one Snakemake job per task).

A task spec comes from the workflow config::

    {"name": "T2Retrieval", "type": "Retrieval", "lang": "zh",
     "path": "data/eval/T2Retrieval",          # optional: local folder (kalm.local_tasks)
     "instruction": "Given a query, ...",      # optional
     "symmetric": false}                       # optional

Without ``path`` the task is the registered MTEB task of that name; its data must be
reachable (network, or a pre-populated Hugging Face datasets cache when offline).

Instructions follow KaLM-Embedding: the query side is prefixed with
``Instruct: {instruction} \\n Query: ``; symmetric tasks (STS, pair classification,
classification, clustering) put the same prefix on both sides; asymmetric tasks (retrieval,
reranking) leave documents without prefix. The prefixes reach mteb as the model's
``prompts`` dict (keys are task types, optionally with ``-query``), so mteb applies them itself.

Outputs: ``out_path`` is mteb's own TaskResult JSON (``TaskResult.to_disk``), and
``<out_path without .json>.kalm.json`` is a small sidecar the aggregate stage reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from kalm.instructions import query_prefix
from kalm.io import atomic_path, write_json

logger = logging.getLogger(__name__)

# Task types whose two sides are queries and documents.
ASYMMETRIC_TYPES = {"Retrieval", "Reranking", "InstructionRetrieval", "InstructionReranking"}
# Task types encoding two texts of the same kind (mteb passes no prompt type for either side).
PAIR_TYPES = {"STS", "PairClassification"}


class TaskSpecError(ValueError):
    """The task spec from the config is inconsistent (unknown task, wrong type or language)."""


class TaskDataUnavailable(RuntimeError):
    """A registered MTEB task whose dataset cannot be loaded (typically: offline and not cached)."""


def is_symmetric(task_spec: dict, task_type: str) -> bool:
    sym = task_spec.get("symmetric")
    if sym is None:
        return task_type not in ASYMMETRIC_TYPES
    return bool(sym)


def build_prompts(task_type: str, instruction: str | None, symmetric: bool) -> dict[str, str]:
    """The ``prompts`` dict (mteb keys) implementing KaLM-style instructions for one task type.

    - no instruction: ``{}`` (no prefix anywhere);
    - symmetric: ``{type: prefix}``, used for every input of the task;
    - asymmetric: ``{"<type>-query": prefix}``, so documents get no prefix. Single-input tasks
      (classification, clustering) only have a query side and always use ``{type: prefix}``.
    """
    if not instruction:
        return {}
    prefix = query_prefix(instruction)
    if symmetric or (task_type not in ASYMMETRIC_TYPES and task_type not in PAIR_TYPES):
        return {task_type: prefix}
    return {f"{task_type}-query": prefix}


def _lang_codes(lang: str) -> list[str]:
    return {"zh": ["cmn", "zho"], "en": ["eng"]}.get(lang, [lang])


def resolve_task(task_spec: dict):
    """Return the mteb task object for a spec: a local task with ``path``, else the registered one."""
    if not task_spec.get("name"):
        raise TaskSpecError(f"task spec {task_spec!r}: 'name' is required")
    if task_spec.get("path"):
        from kalm.local_tasks import make_task

        return make_task(task_spec)

    import mteb

    name = task_spec["name"]
    try:
        task = mteb.get_task(name)
    except KeyError as e:
        raise TaskSpecError(
            f"task {name!r} is not a registered MTEB task ({e.args[0] if e.args else e}); "
            "give it a 'path' to evaluate it from a local folder"
        ) from None
    if task_spec.get("type") and task_spec["type"] != task.metadata.type:
        raise TaskSpecError(
            f"task {name!r}: config says type {task_spec['type']!r} but MTEB's task is {task.metadata.type!r}"
        )
    if task_spec.get("lang"):
        # keep only the subsets in the configured language (multilingual tasks such as STS22)
        try:
            task = task.filter_languages(_lang_codes(task_spec["lang"]), exclusive_language_filter=True)
        except ValueError as e:
            raise TaskSpecError(f"task {name!r} has no subset in language {task_spec['lang']!r}: {e}") from None
    return task


def load_task_data(task, task_spec: dict) -> None:
    """Load the task's data now, before the model, so missing data fails at once with a useful message."""
    if task_spec.get("path"):
        task.load_data()  # LocalTaskError names file, line and field
        return
    name = task.metadata.name
    ds = task.metadata.dataset
    try:
        task.load_data()
    except Exception as e:  # datasets/huggingface_hub raise ConnectionError, OSError, FileNotFoundError, ...
        raise TaskDataUnavailable(
            f"MTEB task {name!r}: its dataset {ds.get('path')}@{ds.get('revision')} could not be loaded "
            f"({type(e).__name__}: {e}). With no network (HF_HUB_OFFLINE=1) it must be mirrored first: "
            f"either point the task's \"path\" in the config at a local folder in kalm's local-task format "
            f"(see kalm/local_tasks.py), or pre-populate the Hugging Face datasets cache on a machine with "
            f"network (python -c \"import mteb; mteb.get_task('{name}').load_data()\") and copy HF_HOME "
            f"(or HF_DATASETS_CACHE) here."
        ) from e


def _dtype(model) -> str:
    try:
        return str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:  # pragma: no cover - a model without parameters
        return "unknown"


def sidecar_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    stem = out_path.name[: -len(".json")] if out_path.name.endswith(".json") else out_path.name
    return out_path.with_name(stem + ".kalm.json")


def prepare_task(task: dict):
    """Resolve a task spec to a loaded mteb task and the exact prompts dict that implements its instruction."""
    from mteb.types import PromptType

    mteb_task = resolve_task(task)
    task_type = mteb_task.metadata.type
    instruction = task.get("instruction") or None
    symmetric = is_symmetric(task, task_type)
    prompts = build_prompts(task_type, instruction, symmetric)
    if prompts and not symmetric and task_type in PAIR_TYPES:
        # asymmetric pair task: first input is the query side, second the document side
        mteb_task.input1_prompt_type = PromptType.query
        mteb_task.input2_prompt_type = PromptType.document
    load_task_data(mteb_task, task)
    return mteb_task, prompts, instruction, symmetric


def run_mteb(model, mteb_task, prompts: dict[str, str], batch_size: int = 64):
    """mteb's own evaluation of an in-memory model on one prepared task; returns the TaskResult."""
    import mteb

    # Exactly these prompts and nothing else: drop the model's own (e.g. {"query": "", ...}).
    saved = model.prompts, model.default_prompt_name
    model.prompts = dict(prompts)
    model.default_prompt_name = None
    try:
        with warnings.catch_warnings():
            # mteb nags when a prompts dict lacks generic "query"/"document" keys; ours are deliberate
            warnings.filterwarnings("ignore", message="SentenceTransformers that use prompts most often")
            result = mteb.evaluate(
                model,
                [mteb_task],
                cache=None,
                encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
                show_progress_bar=False,
            )
    finally:
        model.prompts, model.default_prompt_name = saved
    (task_result,) = result.task_results
    return task_result


def evaluate_task(
    model_spec: str,
    task: dict,
    out_path: str,
    batch_size: int = 64,
    max_seq_length: int | None = None,
    device: str | None = None,
) -> dict:
    """Evaluate ``model_spec`` on one task; write mteb's result JSON and the kalm sidecar; return the sidecar."""
    import mteb

    from kalm.modeling import load_embedding_model

    t0 = time.time()
    mteb_task, prompts, instruction, symmetric = prepare_task(task)
    task_type, name = mteb_task.metadata.type, mteb_task.metadata.name
    model = load_embedding_model(model_spec, max_seq_length=max_seq_length, device=device)
    logger.info("evaluating %s on %s (%s) with prompts %s", model_spec, name, task_type, prompts)
    task_result = run_mteb(model, mteb_task, prompts, batch_size)

    with atomic_path(out_path) as tmp:
        task_result.to_disk(tmp)  # the file mteb itself writes into its results cache

    sidecar = {
        "task": name,
        "type": task_type,
        "lang": task.get("lang"),
        "main_score": float(task_result.get_score()),
        "metric": mteb_task.metadata.main_score,
        "model": model_spec,
        "instruction": instruction,
        "symmetric": symmetric,
        "prompts": prompts,
        "max_seq_length": model.max_seq_length,
        "dtype": _dtype(model),
        "mteb_version": task_result.mteb_version or mteb.__version__,
        "dataset_revision": task_result.dataset_revision,
        "source": "local" if task.get("path") else "mteb",
        "path": task.get("path"),
        "seconds": round(time.time() - t0, 3),
    }
    write_json(sidecar_path(out_path), sidecar)
    logger.info("%s: %s = %.4f", name, sidecar["metric"], sidecar["main_score"])
    return sidecar


def _run(args: argparse.Namespace) -> int:
    from kalm.local_tasks import LocalTaskError

    try:
        spec = json.loads(args.task_json)
    except json.JSONDecodeError as e:
        raise SystemExit(f"kalm evaluate: --task-json is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise SystemExit("kalm evaluate: --task-json must be a JSON object")
    try:
        sidecar = evaluate_task(
            args.model,
            spec,
            args.out,
            batch_size=args.batch_size,
            max_seq_length=args.max_seq_length,
            device=args.device,
        )
    except (LocalTaskError, TaskSpecError, TaskDataUnavailable) as e:
        raise SystemExit(f"kalm evaluate: {e}") from None
    print(f"{sidecar['task']}\t{sidecar['metric']}\t{sidecar['main_score']:.6f}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate a model on one MTEB task (local folder or registered task)")
    p.add_argument("--model", required=True, help="model path or package:<name>")
    p.add_argument("--task-json", required=True, help="task spec as JSON: name, type, lang, [path, instruction, symmetric]")
    p.add_argument("--out", required=True, help="mteb result JSON to write; the sidecar goes to <out minus .json>.kalm.json")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-seq-length", type=int, default=None)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.set_defaults(func=_run)
