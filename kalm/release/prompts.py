"""The prompts a saved model carries: KaLM's instructions in ``config_sentence_transformers.json``.

Without them the instructions exist only inside ``kalm evaluate``: ``SentenceTransformer(path).encode_query``,
mteb's own runner, a vector database or an inference server would embed un-instructed queries. The dict,
``prompts`` of sentence-transformers (a prefix per name), holds

- ``query``: the default query instruction, ``Instruct: {instruction} \\n Query: `` (the instruction set's
  generic retrieval instruction, or ``release.query_instruction``), and ``document``: ``""``, so
  ``encode_query`` / ``encode_document`` (sentence-transformers >= 5) and mteb's prompt-type fallback do the
  right thing;
- per evaluated task, in mteb's key names (``<Task>-query`` / ``<Task>-document`` for query-document and pair
  types, ``<Task>`` for single-input types and symmetric pairs): exactly what ``kalm evaluate`` applies
  (:func:`kalm.evaluation.evaluate.build_prompts`), written out for every side so that mteb's lookup never
  falls through to another key (an un-instructed side gets ``""``);
- per task type the same, from the first evaluated task of that type (config order): mteb looks up
  ``<Type>-query`` / ``<Type>`` for a task whose name it does not know (a local task);
- per training task (its name, e.g. ``retrieval_en``): the query-side prefix it was trained with, for
  ``model.encode(queries, prompt_name="retrieval_en")``.

``default_prompt_name`` stays ``None``: ``encode_query`` already picks ``query``, and a default would prefix
every plain ``encode()`` call, documents and STS sentences included (and mteb passes no prompt for those).

:func:`mteb_resolution` asks mteb's own lookup (``get_prompt_name`` over the keys mteb accepts) which
prefix it would use for each side of each evaluated task, so the card can say which scores mteb's runner
alone reproduces.
"""

from __future__ import annotations

from kalm.evaluation.instructions import DEFAULT_INSTRUCTION_SET, instruction_sides, query_prefix
from kalm.evaluation.task_types import PAIR, QUERY_DOCUMENT, SINGLE, TASK_TYPES

QUERY, DOCUMENT = "query", "document"


def default_query_instruction(instruction_set: str | None, train_tasks: dict[str, dict]) -> str | None:
    """The ``query`` prompt's instruction: the set's generic retrieval instruction (kalm: KaLM's; kalm_v2:
    V2's), under ``none`` the first retrieval training task's."""
    from kalm.evaluation.task_instructions import KALM_RETRIEVAL_INSTRUCTION, KALM_V2_TYPE_INSTRUCTIONS

    instruction_set = instruction_set or DEFAULT_INSTRUCTION_SET
    if instruction_set == "kalm":
        return KALM_RETRIEVAL_INSTRUCTION
    if instruction_set == "kalm_v2":
        return KALM_V2_TYPE_INSTRUCTIONS["Retrieval"]
    for spec in train_tasks.values():
        if (spec.get("type") or "").lower() == "retrieval" and spec.get("instruction"):
            return spec["instruction"]
    return None


def side_prompts(key: str, task_type: str, instruction: str | None, symmetric: bool) -> dict[str, str]:
    """Every side's prefix of one task (``key``: its name or its type) in mteb's key names."""
    prefix = query_prefix(instruction)
    t = TASK_TYPES.get(task_type)
    sides = t.sides if t else QUERY_DOCUMENT
    if sides == SINGLE:
        return {key: prefix}
    out = {f"{key}-{QUERY}": prefix, f"{key}-{DOCUMENT}": prefix if symmetric else ""}
    if sides == PAIR and (symmetric or not prefix):
        out[key] = prefix  # mteb encodes both texts of a pair task with no prompt type
    return out


def eval_task_prompts(spec: dict) -> tuple[str, str, dict[str, str]]:
    """(name, mteb type, prompts by side) of one evaluation task spec, as ``kalm evaluate`` resolves it
    (without loading its data: a registered task's type comes from mteb's metadata)."""
    from kalm.evaluation.evaluate import task_sides
    from kalm.evaluation.task_instructions import resolve_instruction

    name, task_type = spec["name"], spec.get("type")
    if not task_type:
        import mteb

        task_type = mteb.get_task(name).metadata.type
    instruction_set = spec.get("instruction_set") or DEFAULT_INSTRUCTION_SET
    instruction, _ = resolve_instruction(spec, task_type, instruction_set)
    query_side, symmetric = task_sides(spec, task_type, instruction_set, name)
    if not query_side:
        instruction = None
    return name, task_type, side_prompts(name, task_type, instruction, symmetric)


def model_prompts(
    train_tasks: dict[str, dict],
    eval_specs: list[dict],
    instruction_set: str | None = None,
    query_instruction: str | None = None,
) -> dict[str, str]:
    """The ``prompts`` of a model trained on ``train_tasks`` ({name: {type, instruction}}) and evaluated on
    ``eval_specs`` (kalm evaluate's task specs, config order); see the module docstring."""
    instruction_set = instruction_set or DEFAULT_INSTRUCTION_SET
    default = query_instruction or default_query_instruction(instruction_set, train_tasks)
    prompts = {QUERY: query_prefix(default), DOCUMENT: ""}
    by_type: dict[str, str] = {}
    for spec in eval_specs:
        name, task_type, sides = eval_task_prompts(spec)
        prompts.update(sides)
        for key, prefix in sides.items():
            by_type.setdefault(task_type + key[len(name) :], prefix)  # the first task of a type gives its keys
    for key, prefix in by_type.items():
        prompts.setdefault(key, prefix)
    for task, spec in train_tasks.items():
        query_side, _ = instruction_sides(instruction_set, spec.get("type"))
        prompts.setdefault(task, query_prefix(spec.get("instruction")) if query_side else "")
    return prompts


def mteb_valid_prompts(prompts: dict[str, str]) -> dict[str, str]:
    """The keys of ``prompts`` that mteb keeps (its own validation: task names it knows, task types, prompt
    types); it drops the others (training tasks, local tasks)."""
    import warnings

    from mteb.models.abs_encoder import AbsEncoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mteb warns once per key it drops
        valid, _ = AbsEncoder.validate_task_to_prompt_name(prompts, raise_for_invalid_keys=False)
    return valid or {}


def mteb_resolution(
    prompts: dict[str, str], valid: dict[str, str], task_metadata, prompt_types=(QUERY, DOCUMENT, None)
) -> dict:
    """{side: the prefix mteb's runner would use} for one task (``None``: a pair task's texts, which mteb
    encodes with no prompt type), through mteb's lookup over ``valid`` (:func:`mteb_valid_prompts` of
    ``prompts``); a side with no key gets what sentence-transformers then applies (``encode_query``'s
    ``query``, ``encode_document``'s ``document``, plain ``encode``: none)."""
    from mteb.models.abs_encoder import get_prompt_name
    from mteb.types import PromptType

    out = {}
    for side in prompt_types:
        key = get_prompt_name(valid, task_metadata, PromptType(side) if side else None)
        out[side or "none"] = valid[key] if key else (prompts.get(side, "") if side else "")
    return out


def _run(args) -> int:
    import json

    from kalm.io import write_json

    prompts = model_prompts(
        json.loads(args.train_tasks),
        json.loads(args.eval_tasks),
        args.instruction_set,
        args.query_instruction,
    )
    write_json(args.out, prompts)
    print(f"{len(prompts)} prompts -> {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("prompts", help="the prompts (KaLM instructions) every saved model carries, as JSON")
    p.add_argument("--train-tasks", required=True, help="JSON {task: {type, instruction}} of the training tasks")
    p.add_argument("--eval-tasks", required=True, help="JSON list of kalm evaluate's task specs, config order")
    p.add_argument("--instruction-set", default=None, help="kalm (default), kalm_v2 or none")
    p.add_argument(
        "--query-instruction", default=None, help="the `query` prompt's instruction (release.query_instruction)"
    )
    p.add_argument("--out", required=True)
    p.set_defaults(func=_run)
