"""Evaluate one embedding model on one MTEB task (one Snakemake job per task).

A task spec comes from the workflow config (``eval_task_spec`` in workflow/rules/common.smk)::

    {"name": "T2Retrieval", "type": "Retrieval", "lang": "zh",
     "path": "data/eval/T2Retrieval",     # optional: a local task folder (kalm.evaluation.local_tasks)
     "mirror": "mirror/mteb/T2Retrieval", # optional: local mirror of the registered task's dataset
     "mirror_root": "mirror",             # optional: eval.mirror; the task's folder is <root>/<dataset path>
     "benchmark": "MTEB(cmn, v1)",        # optional: take the task as that mteb benchmark defines it
     "subsets": ["zh"],                   # optional: hf subsets to keep (multilingual tasks)
     "splits": ["validation"],            # optional: evaluation splits instead of mteb's
     "instruction": "Given a query, ...", # optional: overrides the instruction set's text
     "instruction_set": "kalm",           # kalm (default), kalm_v2 or none; see kalm.evaluation.task_instructions
     "symmetric": false}                  # optional: override of kalm.evaluation.instructions.instruction_sides

Without ``path`` the task is the registered MTEB task of that name; its data comes from its mirror
(kalm.evaluation.mteb_mirror), else from the Hugging Face hub or datasets cache. With no network and no data the
job fails at once, before the model is loaded, naming the task and how to mirror it.

Instructions follow KaLM-Embedding: the query side is prefixed with
``Instruct: {instruction} \\n Query: ``, the passage side too where the rule says so;
single-input tasks (classification, clustering) prefix every input. The rule is
``kalm.evaluation.instructions.instruction_sides`` of the instruction set and the task (type, and name for
``kalm_v2``'s per-task entries), the same the DAG applies to the training data: under ``kalm`` (V1)
STS and pair classification get no instruction, under ``kalm_v2`` one on both sides; retrieval and
reranking queries get one, their documents none. The prefixes reach mteb as the model's ``prompts``
dict (keys are task types, optionally with ``-query``), so mteb applies them.

A reranking task is only evaluated with its candidate lists: if they did not load (an offline
datasets cache can lose the 'top_ranked' config, and mteb then ranks the whole corpus instead,
silently), the job stops (:class:`RerankingWithoutCandidates`).

Outputs: ``out_path`` is mteb's own TaskResult JSON (``TaskResult.to_disk``), and
``<out_path without .json>.kalm.json`` is a small sidecar the aggregate stage reads.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from kalm.evaluation.instructions import DEFAULT_INSTRUCTION_SET, instruction_sides, query_prefix
from kalm.evaluation.task_types import PAIR, QUERY_DOCUMENT, types_where
from kalm.io import atomic_path, write_json
from kalm.models.modeling import add_pooling_argument

logger = logging.getLogger(__name__)

# Task types whose two sides are queries and documents; that encode two texts of the same kind (mteb passes
# no prompt type for either side); that rank given candidate lists (kalm.evaluation.task_types: the registry)
QUERY_DOCUMENT_TYPES = types_where(sides=QUERY_DOCUMENT)
PAIR_TYPES = types_where(sides=PAIR)
RERANKING_TYPES = types_where(reranking=True)


class TaskSpecError(ValueError):
    """The task spec from the config is inconsistent (unknown task, wrong type or language)."""


class TaskDataUnavailable(RuntimeError):
    """A registered MTEB task whose dataset cannot be loaded (typically: offline and not mirrored)."""


class RerankingWithoutCandidates(TaskDataUnavailable):
    """A reranking task whose candidate lists are missing: mteb would score it as full-corpus retrieval."""


def task_sides(
    task_spec: dict, task_type: str, instruction_set: str | None = None, name: str | None = None
) -> tuple[bool, bool]:
    """(query side, passage side) of a task's instruction: kalm.evaluation.instructions.instruction_sides of the
    spec's instruction set (default ``kalm``) and the task's type and name (a local task: its type
    only), or the spec's ``symmetric`` override."""
    instruction_set = instruction_set or task_spec.get("instruction_set") or DEFAULT_INSTRUCTION_SET
    registered = None if task_spec.get("path") else (name or task_spec.get("name"))
    return instruction_sides(instruction_set, task_type, registered, task_spec.get("symmetric"))


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
    if symmetric or (task_type not in QUERY_DOCUMENT_TYPES and task_type not in PAIR_TYPES):
        return {task_type: prefix}
    return {f"{task_type}-query": prefix}


def _lang_codes(lang: str) -> list[str]:
    # cmo: mteb tags MASSIVE's Chinese subsets as cmo-Hans; they are C-MTEB tasks too
    return {"zh": ["cmn", "zho", "cmo"], "en": ["eng"]}.get(lang, [lang])


def _registered_task(name: str, benchmark: str | None):
    import mteb

    if benchmark:
        # the task object of the benchmark carries its subset and split choices (e.g. MTEB(eng, v2)
        # scores AmazonCounterfactualClassification on 'en' only), the published leaderboard's
        try:
            bench = mteb.get_benchmark(benchmark)
        except (KeyError, ValueError) as e:
            raise TaskSpecError(f"task {name!r}: unknown mteb benchmark {benchmark!r} ({e})") from None
        for t in bench.tasks:
            if t.metadata.name == name:
                return copy.deepcopy(t), True
        raise TaskSpecError(f"task {name!r} is not in mteb benchmark {benchmark!r}")
    try:
        return mteb.get_task(name), False
    except KeyError as e:
        raise TaskSpecError(
            f"task {name!r} is not a registered MTEB task ({e.args[0] if e.args else e}); "
            "give it a 'path' to evaluate it from a local folder"
        ) from None


def resolve_task(task_spec: dict):
    """Return the mteb task object for a spec: a local task with ``path``, else the registered one."""
    if not task_spec.get("name"):
        raise TaskSpecError(f"task spec {task_spec!r}: 'name' is required")
    if task_spec.get("path"):
        from kalm.evaluation.local_tasks import make_task

        return make_task(task_spec)

    name = task_spec["name"]
    task, from_benchmark = _registered_task(name, task_spec.get("benchmark"))
    if task_spec.get("type") and task_spec["type"] != task.metadata.type:
        raise TaskSpecError(
            f"task {name!r}: config says type {task_spec['type']!r} but MTEB's task is {task.metadata.type!r}"
        )
    subsets = task_spec.get("subsets")
    if subsets:
        unknown = sorted(set(subsets) - set(task.metadata.hf_subsets))
        if unknown:
            raise TaskSpecError(f"task {name!r} has no subsets {unknown} (it has {sorted(task.metadata.hf_subsets)})")
        task = task.filter_languages(None, hf_subsets=list(subsets))
    elif task_spec.get("lang") and not from_benchmark:
        # keep only the subsets in the configured language (multilingual tasks such as STS22)
        try:
            task = task.filter_languages(_lang_codes(task_spec["lang"]), exclusive_language_filter=True)
        except ValueError as e:
            raise TaskSpecError(f"task {name!r} has no subset in language {task_spec['lang']!r}: {e}") from None
    if task_spec.get("splits"):
        # e.g. a dev split for model selection, or the split a paper reported (KaLM: MSMARCO 'dev')
        task = task.filter_eval_splits(list(task_spec["splits"]))
    # Its own metadata: mteb's is a class attribute, and a mirror rewrites the dataset path.
    from kalm.evaluation.mteb_mirror import dataset_tasks

    for sub in dataset_tasks(task):
        sub.metadata = sub.metadata.model_copy(deep=True)
    return task


def _mirror_target(task, task_spec: dict) -> Path | None:
    """The mirror folder to read the task from: the spec's ``mirror``, else ``<mirror_root>/<dataset
    path>`` when that folder exists (an aggregated task gets the root: each subtask has its folder)."""
    from kalm.evaluation.mteb_mirror import MirrorError, dataset_tasks, mirror_folder

    if task_spec.get("mirror"):
        folder = Path(task_spec["mirror"])
        if not folder.is_dir():
            raise MirrorError(
                f"MTEB task {task.metadata.name!r}: its mirror folder {folder} (eval.tasks."
                f"{task.metadata.name}.mirror) not found"
            )
        return folder
    root = task_spec.get("mirror_root")
    if not root:
        return None
    subs = dataset_tasks(task)
    if len(subs) > 1:
        return Path(root) if all(mirror_folder(root, s.metadata.dataset["path"]).is_dir() for s in subs) else None
    folder = mirror_folder(root, task.metadata.dataset["path"])
    return folder if folder.is_dir() else None


def load_task_data(task, task_spec: dict) -> dict[str, Any]:
    """Load the task's data now, before the model, so missing data fails at once with a useful message.

    Returns where the data came from: ``{"source": "local" | "mirror" | "hub", "mirror": {...}}``.
    """
    from kalm.evaluation.mteb_mirror import MirrorError, dataset_tasks, how_to_mirror, use_mirror

    if task_spec.get("path"):
        task.load_data()  # LocalTaskError names file, line and field
        check_reranking_candidates(task)
        return {"source": "local"}
    name = task.metadata.name
    root = task_spec.get("mirror_root")
    info: dict[str, Any] = {"source": "hub"}
    try:
        folder = _mirror_target(task, task_spec)
        if folder is not None:
            info = {"source": "mirror", "mirror": use_mirror(task, folder)}
    except MirrorError as e:
        ds = task.metadata.dataset
        raise TaskDataUnavailable(f"{e}. {how_to_mirror(name, ds.get('path'), root, ds.get('revision'))}") from None
    # an aggregated task (CQADupstackRetrieval) has no data of its own: mteb evaluates its subtasks
    for sub in dataset_tasks(task):
        ds = sub.metadata.dataset
        what = f"MTEB task {name!r}" + (f" (subtask {sub.metadata.name!r})" if sub is not task else "")
        try:
            sub.load_data()
        except Exception as e:  # datasets/huggingface_hub raise ConnectionError, OSError, FileNotFoundError, ...
            where = (
                f"from its mirror {ds.get('path')}"
                if info["source"] == "mirror"
                else f"(dataset {ds.get('path')}@{ds.get('revision')}, no mirror"
                + (f" at {Path(root) / ds.get('path', '')}" if root else "")
                + ")"
            )
            raise TaskDataUnavailable(
                f"{what}: its data could not be loaded {where}: {type(e).__name__}: {e}. "
                f"{how_to_mirror(name, ds.get('path'), root, ds.get('revision'))}"
            ) from e
    check_reranking_candidates(task)
    return info


def check_reranking_candidates(task) -> None:
    """Stop if a reranking task would run as full-corpus retrieval.

    mteb's retrieval loader reads a reranking dataset's candidate lists from its 'top_ranked'
    config only if that config is listed; when it is not (an offline datasets cache that kept the
    corpus but not the list of configs, a partial mirror), ``top_ranked`` is None and mteb ranks
    every document of the corpus for every query, without a word: a different, harder benchmark
    whose numbers look plausible. Every evaluated query (one with a positive judgement) must have a
    non-empty candidate list.
    """
    from kalm.evaluation.mteb_mirror import dataset_tasks

    for sub in dataset_tasks(task):
        meta = sub.metadata
        if meta.type not in RERANKING_TYPES or not getattr(sub, "dataset", None):
            continue
        for subset in sub.hf_subsets:
            for split in sub.eval_splits:
                data = sub.dataset.get(subset, {}).get(split)
                if data is None:
                    continue  # mteb itself reports a missing split
                judged = [q for q, docs in data["relevant_docs"].items() if any(s > 0 for s in docs.values())]
                top = data.get("top_ranked")
                where = f"MTEB task {meta.name!r} (subset {subset!r}, split {split!r})"
                if not top:
                    raise RerankingWithoutCandidates(
                        f"{where} is a reranking task but its candidate lists (the dataset's 'top_ranked' config) "
                        f"did not load: mteb would rank all {len(data['corpus'])} corpus documents for each of its "
                        f"{len(judged)} queries, i.e. score it as retrieval, not as the published reranking task. "
                        f"This happens when the data comes from an offline Hugging Face cache without the "
                        f"'top_ranked' config; evaluate it from a complete mirror "
                        f"(python -m kalm mteb-mirror {meta.name} --root <mirror root>; see kalm/evaluation/mteb_mirror.py)."
                    )
                missing = [q for q in judged if not top.get(q)]
                if missing:
                    raise RerankingWithoutCandidates(
                        f"{where}: {len(missing)} of {len(judged)} evaluated queries have no candidate list "
                        f"(first: {missing[0]!r}); their documents would be searched in the whole corpus. "
                        f"The mirror or cache of its 'top_ranked' config is incomplete."
                    )


def _dtype(model) -> str:
    try:
        return str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:  # pragma: no cover - a model without parameters
        return "unknown"


def sidecar_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    stem = out_path.name.removesuffix(".json")
    return out_path.with_name(stem + ".kalm.json")


class PreparedTask(NamedTuple):
    """A loaded mteb task with the prompts implementing its instruction, and where both came from."""

    task: Any
    prompts: dict[str, str]
    instruction: str | None
    symmetric: bool
    instruction_set: str
    instruction_source: str
    data: dict[str, Any]


def prepare_task(task: dict) -> PreparedTask:
    """Resolve a task spec to a loaded mteb task and the exact prompts dict that implements its instruction."""
    from mteb.types import PromptType

    from kalm.evaluation.task_instructions import InstructionError, resolve_instruction

    mteb_task = resolve_task(task)
    task_type, name = mteb_task.metadata.type, mteb_task.metadata.name
    instruction_set = task.get("instruction_set") or DEFAULT_INSTRUCTION_SET
    try:
        instruction, source = resolve_instruction({**task, "name": name}, task_type, instruction_set)
        query_side, symmetric = task_sides(task, task_type, instruction_set, name)
    except (InstructionError, ValueError) as e:
        raise TaskSpecError(str(e)) from None
    if not query_side:  # (resolve_instruction already gives none there)
        instruction = None
    prompts = build_prompts(task_type, instruction, symmetric)
    if prompts and not symmetric and task_type in PAIR_TYPES:
        # asymmetric pair task: first input is the query side, second the document side
        mteb_task.input1_prompt_type = PromptType.query
        mteb_task.input2_prompt_type = PromptType.document
    data = load_task_data(mteb_task, task)
    return PreparedTask(mteb_task, prompts, instruction, symmetric, instruction_set, source, data)


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_mteb(model, mteb_task, prompts: dict[str, str], batch_size: int = 64, min_batch_size: int = 1):
    """mteb's own evaluation of an in-memory model on one prepared task; returns the TaskResult.

    ``batch_size`` is the first batch size tried: on a GPU out-of-memory error the task is run again
    with half of it (down to ``min_batch_size``), so the configured size can be the largest that
    might fit. The size that ran is ``run_mteb.last_batch_size``. Texts are encoded in one
    sentence-transformers ``encode`` call per side, which sorts them by length.
    """
    import mteb

    check_reranking_candidates(mteb_task)  # also for callers that load data themselves (soup dev task)
    # Exactly these prompts and nothing else: drop the model's own (e.g. {"query": "", ...}).
    saved = model.prompts, model.default_prompt_name
    model.prompts = dict(prompts)
    model.default_prompt_name = None
    try:
        while True:
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
                break
            except Exception as e:
                if not _is_oom(e) or batch_size // 2 < min_batch_size:
                    raise
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                logger.warning(
                    "%s: out of memory at batch size %d; retrying with %d",
                    mteb_task.metadata.name,
                    batch_size,
                    batch_size // 2,
                )
                batch_size //= 2
    finally:
        model.prompts, model.default_prompt_name = saved
    run_mteb.last_batch_size = batch_size
    (task_result,) = result.task_results
    return task_result


run_mteb.last_batch_size = None


def evaluate_task(
    model_spec: str,
    task: dict,
    out_path: str,
    batch_size: int = 64,
    max_seq_length: int | None = None,
    device: str | None = None,
    pooling: str = "mean",
) -> dict:
    """Evaluate ``model_spec`` on one task; write mteb's result JSON and the kalm sidecar; return the sidecar."""
    import mteb

    from kalm.models.modeling import load_embedding_model

    t0 = time.time()
    prep = prepare_task(task)
    mteb_task, prompts = prep.task, prep.prompts
    task_type, name = mteb_task.metadata.type, mteb_task.metadata.name
    model = load_embedding_model(model_spec, max_seq_length=max_seq_length, device=device, pooling=pooling)
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
        "instruction": prep.instruction,
        "instruction_set": prep.instruction_set,
        "instruction_source": prep.instruction_source,
        "symmetric": prep.symmetric,
        "prompts": prompts,
        "max_seq_length": model.max_seq_length,
        "dtype": _dtype(model),
        "batch_size": run_mteb.last_batch_size,
        "mteb_version": task_result.mteb_version or mteb.__version__,
        "dataset_revision": task_result.dataset_revision,
        "subsets": sorted(mteb_task.hf_subsets),
        "splits": list(mteb_task.eval_splits),
        "source": prep.data["source"],
        "path": task.get("path"),
        "mirror": prep.data.get("mirror"),
        "benchmark": task.get("benchmark"),
        "seconds": round(time.time() - t0, 3),
    }
    write_json(sidecar_path(out_path), sidecar)
    logger.info("%s: %s = %.4f", name, sidecar["metric"], sidecar["main_score"])
    return sidecar


def _run(args: argparse.Namespace) -> int:
    from kalm.evaluation.local_tasks import LocalTaskError

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
            pooling=args.pooling,
            device=args.device,
        )
    except (LocalTaskError, TaskSpecError, TaskDataUnavailable) as e:
        raise SystemExit(f"kalm evaluate: {e}") from None
    print(f"{sidecar['task']}\t{sidecar['metric']}\t{sidecar['main_score']:.6f}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate a model on one MTEB task (local folder or registered task)")
    p.add_argument("--model", required=True, help="model path or package:<name>")
    p.add_argument(
        "--task-json",
        required=True,
        help="task spec as JSON: name, type, lang, [path, mirror, mirror_root, benchmark, subsets, splits, "
        "instruction, instruction_set, symmetric]",
    )
    p.add_argument(
        "--out", required=True, help="mteb result JSON to write; the sidecar goes to <out minus .json>.kalm.json"
    )
    p.add_argument("--batch-size", type=int, default=64, help="first batch size tried; halved on GPU out-of-memory")
    p.add_argument("--max-seq-length", type=int, default=None)
    add_pooling_argument(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.set_defaults(func=_run)
