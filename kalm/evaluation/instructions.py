"""KaLM instruction format and the one rule saying which side of a task carries its instruction.

Queries get ``Instruct: {instruction} \\n Query: {text}``; passages get the same prefix or none.

Task types come in two spellings: the training-data types of the config (``retrieval``, ``sts``,
``pair_classification``, ...) and MTEB's task types (``Retrieval``, ``STS``,
``PairClassification``, ...). Both are mapped to the MTEB type (:func:`mteb_type`).

Which sides carry the instruction is decided once, by :func:`instruction_sides`, from the
instruction set (config ``eval.instruction_set``, see kalm.evaluation.task_instructions) and the task type, for
``kalm evaluate`` (its ``prompts``), for the data stages (validate keeps or drops the records'
instruction, mining encodes with it) and for the trainer (``--symmetric`` {task: passage side}):

    MTEB type                                     kalm (V1)         kalm_v2        none
    STS, PairClassification, Summarization,       no instruction    both sides     both sides
      BitextMining
    Clustering                                    both sides        both sides     both sides
    Retrieval, Reranking, Classification, other   query side only   query side*    query side
      types, and weak pairs (no type)

    * kalm_v2: both sides for the retrieval/reranking tasks its table instructs so (evaluation only)

- symmetric types (both sides are texts of the same kind, :data:`SYMMETRIC_MTEB_TYPES`) carry the
  instruction on both sides, asymmetric ones (queries vs documents; Classification as training data:
  a text vs its label description) on the query side only; that is KaLM's format, and the whole rule
  of ``kalm_v2`` (by type) and of ``none`` (which has no table: only the config's instructions);
- ``kalm`` is KaLM-Embedding V1's evaluation: STS, PairClassification, Summarization (and
  BitextMining) get no instruction at all, so training under it gives their records none either
  (validate drops the config's and the records' own: ``--drop-instructions``);
- ``kalm_v2`` (mteb's ``KaLM_v2_task_prompts``) also instructs both sides of a few retrieval and
  reranking tasks (duplicate-question search: QuoraRetrieval, CQADupstack*, SCIDOCS, SciDocsRR, ...):
  given the task's name, evaluation follows the table; training data only has types, so a training
  task of type ``retrieval`` is query-side only;
- single-input MTEB tasks (Classification, Clustering) prefix every input whenever the query side
  carries the instruction (``kalm.evaluation.evaluate.build_prompts``);
- an evaluation spec's explicit ``symmetric`` overrides the rule: the query side carries the
  instruction, the passage side iff ``symmetric``.

The rule places any instruction, whichever its source (the set's table, ``eval.tasks.<t>.instruction``,
``data.<stage>.<t>.instruction`` or a record's own): where it gives a type no side, a configured
instruction is not used (kalm.evaluation.task_instructions.resolve_instruction logs that).
"""

from __future__ import annotations

from kalm.evaluation.task_types import TASK_TYPES, types_where

# config eval.instruction_set values (tables: kalm.evaluation.task_instructions)
INSTRUCTION_SETS = ("kalm", "kalm_v2", "none")
DEFAULT_INSTRUCTION_SET = "kalm"

# config data type (lower case, '-' or '_') -> MTEB task type; the types' facts: kalm.evaluation.task_types
DATA_TO_MTEB_TYPE = {alias: t.name for t in TASK_TYPES.values() for alias in t.data_names}
SYMMETRIC_MTEB_TYPES = types_where(symmetric=True)
# MTEB types KaLM-Embedding V1 evaluates without any instruction (instruction set ``kalm``)
KALM_V1_UNINSTRUCTED_TYPES = types_where(kalm_v1="none")


def mteb_type(task_type: str | None) -> str | None:
    """The MTEB task type of a data type (``pair_classification``) or an MTEB type (``PairClassification``)."""
    if not task_type:
        return None
    key = task_type.lower().replace("-", "_")
    if key in DATA_TO_MTEB_TYPE:
        return DATA_TO_MTEB_TYPE[key]
    return task_type  # an MTEB type (or one we do not know: asymmetric)


def query_prefix(instruction: str | None) -> str:
    return f"Instruct: {instruction} \n Query: " if instruction else ""


def is_symmetric(task_type: str | None) -> bool:
    """True when both sides of the task are texts of the same kind (KaLM's format; which sides carry an
    instruction under an instruction set: :func:`instruction_sides`)."""
    return mteb_type(task_type) in SYMMETRIC_MTEB_TYPES


def check_instruction_set(instruction_set: str) -> str:
    if instruction_set not in INSTRUCTION_SETS:
        raise ValueError(f"unknown instruction set {instruction_set!r} (known: {', '.join(INSTRUCTION_SETS)})")
    return instruction_set


def instruction_sides(
    instruction_set: str | None, task_type: str | None, task: str | None = None, symmetric: bool | None = None
) -> tuple[bool, bool]:
    """``(query side, passage side)``: whether each side of a task carries its instruction (the rule of
    the module docstring), for training and evaluation alike.

    ``instruction_set``: ``kalm`` (also for None), ``kalm_v2`` or ``none``; ``task_type``: a data type
    (``sts``) or an MTEB type (``STS``); ``task``: the name of a registered MTEB task, for the
    per-task exceptions of ``kalm_v2``'s table (None: the type's rule, as for training data);
    ``symmetric``: an explicit override (evaluation specs): ``(True, symmetric)``.
    """
    instruction_set = check_instruction_set(instruction_set or DEFAULT_INSTRUCTION_SET)
    if symmetric is not None:
        return True, bool(symmetric)
    mtype = mteb_type(task_type)
    if instruction_set == "kalm" and mtype in KALM_V1_UNINSTRUCTED_TYPES:
        return False, False
    if instruction_set == "kalm_v2" and task:
        from kalm.evaluation.task_instructions import kalm_v2_both_sides

        if kalm_v2_both_sides(task):
            return True, True
    return True, mtype in SYMMETRIC_MTEB_TYPES


def format_query(text: str, instruction: str | None) -> str:
    return query_prefix(instruction) + text


def format_passage(text: str, instruction: str | None, symmetric: bool) -> str:
    return format_query(text, instruction) if symmetric else text
