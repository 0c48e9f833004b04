# Names, input functions and helpers shared by the rule files. Rules stay thin: every
# rule runs one `kalm` subcommand; this file turns the config into file names.

import functools
import json
import os
import shlex
import sys

# one rule for which side of a task carries its instruction, in training and evaluation alike
from kalm.instructions import DEFAULT_INSTRUCTION_SET, instruction_sides
from kalm.validate import ValidationError as _ValidationError, task_files as _task_files

KALM = f"{shlex.quote(sys.executable)} -m kalm"
DATA_STAGES = ["pretrain", "finetune"]
FINETUNE_RUNS = list(range(config["finetune"]["runs"]))
NUM_SHARDS = config["embed"]["shards"]
if config["pretrain"]["enabled"] and not config["data"]["pretrain"]:
    raise ValueError("config: pretrain.enabled is true but data.pretrain lists no weak-pair tasks "
                     "(add some, or set pretrain.enabled: false to fine-tune the base model directly)")


def pooling_arg():
    """`--pooling` for the commands that load the base model, when the config sets `pooling` (a plain
    Hugging Face backbone gets it; a sentence-transformers model keeps its own)."""
    return f" --pooling {config['pooling']}" if config.get("pooling") else ""


EMBED_PRETRAIN = "pretrain"  # embed.model value: mine with the output of rule pretrain


def embed_model():
    """The retriever that embeds the mining texts: embed.model (a path or model name), `pretrain`
    (models/pretrain, the weakly supervised model: KaLM mines with a trained retriever) or null (the
    base model). The word `pretrain` is reserved; write `./pretrain` for a folder of that name."""
    model = config["embed"]["model"]
    if model == EMBED_PRETRAIN:
        return "models/pretrain"
    return model or config["base_model"]


def embed_model_input():
    """models/pretrain when the embed jobs use it: they then run after rule pretrain."""
    return ["models/pretrain"] if config["embed"]["model"] == EMBED_PRETRAIN else []


def embed_pooling_arg():
    """models/pretrain is a saved sentence-transformers model: it keeps its own pooling (load_embedding_model
    ignores --pooling for it), so only a base model or a configured path gets `--pooling`."""
    return "" if config["embed"]["model"] == EMBED_PRETRAIN else pooling_arg()


if config["embed"]["model"] == EMBED_PRETRAIN and not config["pretrain"]["enabled"]:
    raise ValueError("config: embed.model is 'pretrain' (mine with models/pretrain) but pretrain.enabled is false, "
                     "so rule pretrain never runs (set pretrain.enabled: true, or embed.model: null to mine with "
                     "base_model, or a model path)")


def data_tasks(stage):
    return sorted(config["data"][stage])


def data_task(stage, task):
    return config["data"][stage][task]


DEDUP_DEFAULTS = {"near_dup": False, "threshold": 0.8, "num_perm": 128, "shingle": 5, "shards": 1, "seed": 1}
DECONTAMINATE_DEFAULTS = {"near_dup": False, "threshold": 0.8, "num_perm": 128, "shingle": 5, "mteb": True,
                          "contain_min_chars": 50}


def dedup_settings():
    """config data.dedup with defaults (exact dedup only when absent)."""
    return {**DEDUP_DEFAULTS, **config["data"].get("dedup", {})}


def decontaminate_settings():
    return {**DECONTAMINATE_DEFAULTS, **config["data"].get("decontaminate", {})}


# ---- the data stages' shard files (issue 15): every consumer names its inputs through these --------


@functools.lru_cache(maxsize=None)
def task_input_files(stage, dtask):
    """The input files of a training task (kalm.validate.task_files: the file, or the .jsonl/.parquet files
    of its folder in sorted order), read when the DAG is built: one validate job each."""
    path = data_task(stage, dtask)["path"]
    try:
        return tuple(str(f) for f in _task_files(path))
    except _ValidationError as e:
        raise ValueError(f"config data.{stage}.{dtask}.path: {e}") from None


@functools.lru_cache(maxsize=None)
def validate_inputs(stage):
    """(task, part, input file, shard ordinal) of every input file of a stage, in input order: tasks sorted
    by name (data_tasks), each task's files in task_files order; the ordinal is the place in this list
    (the records' ids, kalm.shards.record_id, put the stage in this order)."""
    out = []
    for dtask in data_tasks(stage):
        for part, path in enumerate(task_input_files(stage, dtask)):
            out.append((dtask, part, path, len(out)))
    return tuple(out)


def validate_input(stage, dtask, part):
    """(input file, shard ordinal) of validated part `part` of a task."""
    for t, i, path, ordinal in validate_inputs(stage):
        if t == dtask and i == int(part):
            return path, ordinal
    raise ValueError(f"data.{stage}.{dtask} has no input file {part} (it has {len(task_input_files(stage, dtask))})")


def task_parts(stage, dtask, suffix=".parquet"):
    """The validated parts of one task (suffix: .stats.json, .rejects.jsonl for their side files)."""
    return [f"work/data/{stage}/validated/{dtask}/part{i}{suffix}" for i in range(len(task_input_files(stage, dtask)))]


def validated_parts(stage):
    """All validated parts of a stage, in input order (the part's index here is its shard ordinal)."""
    return [f"work/data/{stage}/validated/{t}/part{i}.parquet" for t, i, _, _ in validate_inputs(stage)]


def data_partitions():
    """The partitions j of a stage after dedup (data.dedup.shards; rules/dedup.smk's dedup_parts)."""
    return list(range(dedup_settings()["shards"]))


def decontaminated_parts(stage, suffix=".parquet"):
    return [f"work/data/{stage}/decontaminated/p{j}{suffix}" for j in data_partitions()]


def stage_data(stage):
    """The records a stage's consumers read (embed, mine, pretrain): the last data step's Parquet parts.
    The ONE place that names them: a new filter stage after decontamination changes only this."""
    return decontaminated_parts(stage)


def mined_parts(suffix=".parquet"):
    """The mined fine-tuning records: one part per query shard, i.e. per part of stage_data("finetune")."""
    return [f"work/data/finetune/mined/p{j}{suffix}" for j in range(len(stage_data("finetune")))]


MINE_POOL = config["mine"].get("pool", "task")


def mine_pools():
    """The candidate pools of mining: each mined task's, or one global pool."""
    if MINE_POOL == "global":
        return ["global"]
    return sorted(json.loads(mine_tasks_json()))


POOL_SHARDS = list(range(config["mine"].get("pool_shards", 1)))


def pool_shard_dirs(pool=None):
    """The pool shards (one mine_index job each): work/mine_index/{pool}/shard{j}, of one pool or of all."""
    return expand("work/mine_index/{pool}/shard{j}", pool=[pool] if pool else mine_pools(), j=POOL_SHARDS)


# The instruction set of the evaluation (kalm.task_instructions) also decides where the training data's
# instructions go: one table, one rule (kalm.instructions.instruction_sides) for both.
INSTRUCTION_SET = config["eval"].get("instruction_set") or DEFAULT_INSTRUCTION_SET


def train_instruction_sides(stage, task):
    """(query side, passage side) of a training task's instruction: the rule evaluation applies to its type
    under eval.instruction_set (e.g. `sts`: none under kalm, both sides under kalm_v2)."""
    return instruction_sides(INSTRUCTION_SET, data_task(stage, task).get("type"))


def validate_instruction_args(stage, task):
    """`kalm validate`'s instruction option: the config's instruction for the records that carry none; or,
    for a type the rule gives no instruction, --drop-instructions (the records' own are dropped too)."""
    if not train_instruction_sides(stage, task)[0]:
        return "--drop-instructions"
    return "--instruction " + shlex.quote(data_task(stage, task).get("instruction", ""))


def mine_tasks_json():
    """{task: instruction on passages too} for the fine-tuning tasks whose negatives are mined."""
    tasks = config["data"]["finetune"]
    return json.dumps({t: train_instruction_sides("finetune", t)[1] for t, spec in sorted(tasks.items())
                       if spec.get("mine", True)})


def symmetric_json(stage):
    """The trainer's --symmetric: {task: instruction on both sides} (train_instruction_sides)."""
    return json.dumps({t: train_instruction_sides(stage, t)[1] for t in data_tasks(stage)})


def _language_tasks(lang):
    """{task: benchmark it was listed by, or None} for one language, in config order."""
    from kalm.task_instructions import benchmark_tasks  # imports mteb only for mteb benchmark names

    entry = config["eval"]["languages"][lang]
    if isinstance(entry, dict):
        tasks = {t: entry["benchmark"] for t in benchmark_tasks(entry["benchmark"])}
        tasks.update({t: None for t in entry.get("tasks", []) if t not in tasks})
        return tasks
    return {t: None for t in entry}


LANGUAGES = sorted(config["eval"]["languages"])
EVAL_TASK_SOURCES = {lang: _language_tasks(lang) for lang in LANGUAGES}
EVAL_TASKS = {lang: list(tasks) for lang, tasks in EVAL_TASK_SOURCES.items()}


def check_soup_dev_task():
    """soup.dev_task: a local task of eval.tasks that is not reported. The greedy soup keeps the ingredients
    that raise its score and the loss-weighted soup weights them by its loss: on a reported task, that
    would be model selection on the test set."""
    soup = config["soup"]
    dev = soup.get("dev_task")
    if not dev:
        if soup["method"] == "greedy" or (soup["method"] == "weighted" and not soup.get("weights")):
            raise ValueError(f"config: soup.method {soup['method']} needs soup.dev_task (a held-out local task of "
                             "eval.tasks)" + ("" if soup["method"] == "greedy" else " or soup.weights"))
        return
    tasks = config["eval"].get("tasks", {})
    if dev not in tasks or not tasks[dev].get("path"):
        raise ValueError(f"config: soup.dev_task {dev!r} must be a local task of eval.tasks (one with a 'path')")
    dev_path = os.path.realpath(tasks[dev]["path"])
    for lang in LANGUAGES:
        for task in EVAL_TASKS[lang]:
            path = tasks.get(task, {}).get("path")
            if task == dev or (path and os.path.realpath(path) == dev_path):
                same = "is" if task == dev else f"has the data of {task!r}, which is"
                raise ValueError(
                    f"config: soup.dev_task {dev!r} {same} a reported evaluation task (eval.languages.{lang}): "
                    "the greedy soup selects, and the loss-weighted soup weights, its ingredients by their score on "
                    "the dev task, i.e. they would be chosen on the test set. Use a held-out local task of "
                    "eval.tasks (e.g. a folder of dev data) that eval.languages does not list")


check_soup_dev_task()


def eval_task_spec(lang, task):
    """The task spec `kalm evaluate --task-json` gets (see kalm/evaluate.py): the benchmark's defaults
    for the task, then the config's eval.tasks entry, instruction, instruction set and mirror root."""
    from kalm.task_instructions import benchmark_task_defaults

    bench = EVAL_TASK_SOURCES.get(lang, {}).get(task)
    spec = benchmark_task_defaults(bench, task) if bench else {}
    spec.update(config["eval"].get("tasks", {}).get(task, {}))
    spec.setdefault("name", task)
    spec.setdefault("lang", lang)
    if task in config["eval"].get("instructions", {}):
        spec.setdefault("instruction", config["eval"]["instructions"][task])
    if config["eval"].get("instruction_set"):
        spec.setdefault("instruction_set", config["eval"]["instruction_set"])
    if config["eval"].get("mirror") and not spec.get("path"):
        spec.setdefault("mirror_root", config["eval"]["mirror"])
    return spec


def local_eval_tasks():
    """{name: folder} of evaluation tasks with local data: the decontamination targets."""
    return {t: s["path"] for t, s in sorted(config["eval"].get("tasks", {}).items()) if s.get("path")}


def mteb_eval_tasks():
    """(language, task) of the evaluation tasks without local data (registered MTEB tasks):
    decontamination targets when their data is mirrored or cached offline (kalm.decontaminate skips
    the others with a note)."""
    if not decontaminate_settings()["mteb"]:
        return []
    local = local_eval_tasks()
    return sorted({(lang, t) for lang, tasks in EVAL_TASKS.items() for t in tasks if t not in local})


def eval_model(which):
    """The model scored under a results folder: results -> the soup, results/runs/run<r> -> fine-tune
    run r (config report.eval_runs), results/baseline -> the base model."""
    if which == "results":
        return "models/soup"
    if which.startswith("results/runs/run"):
        return "models/finetune/" + which.rsplit("/", 1)[1]
    return config["base_model"]


def eval_model_input(wildcards):
    model = eval_model(wildcards.which)
    return [model] if model.startswith("models/") else []


def eval_task_input(wildcards):
    """A local task's folder, or a task's own mirror folder (a missing one is then a missing input);
    a mirror root is not an input: tasks without a folder there fall back to the datasets cache."""
    spec = eval_task_spec(wildcards.lang, wildcards.task)
    return [spec[k] for k in ("path", "mirror") if spec.get(k)]


def finetune_start():
    return "models/pretrain" if config["pretrain"]["enabled"] else config["base_model"]


# GPUs. A rule's `gpu` resource is its GPU count (config resources.gpus, per node): Snakemake caps
# concurrent GPU jobs with it (profiles/local: the machine's device count) and the SLURM plugin turns
# it into `sbatch --gpus=N` (`--gpus=<model>:N` with the profile's gpu_model). Snakemake does not say
# *which* devices a job gets, so every GPU rule's command starts with GPU_RUN (kalm gpu-slots): it
# locks that many free devices, sets CUDA_VISIBLE_DEVICES and, for training with --torchrun, starts
# torchrun on them (srun + torchrun per node for a multi-node job).
GPU_RUN = f"{shlex.quote(sys.executable)} -m kalm gpu-slots"


def gpus(rule_name):
    return config["resources"]["gpus"].get(rule_name, 0)


def nodes(rule_name):
    return config["resources"].get("nodes", {}).get(rule_name, 1)


def gpu_resources(rule_name):
    """The GPU resources of a rule, in the SLURM plugin's canonical form.

    One node: `gpu` (sbatch --gpus). Several nodes (training only): `gpu` is the total over the
    nodes, `tasks` = one task per node, `mpi` makes the plugin run the job's shell in the batch step
    instead of wrapping it in a one-node `srun -n1` (the launcher calls srun itself), and
    `tasks_per_gpu=0` stops the plugin from also turning `tasks` into --ntasks-per-gpu."""
    n = nodes(rule_name)
    res = {"gpu": gpus(rule_name) * n, "nodes": n}
    if n > 1:
        res.update(tasks=n, tasks_per_gpu=0, mpi="srun")
    return res


wildcard_constraints:
    stage="pretrain|finetune",
    dtask="[^/]+",
    lang="[a-z]+",
    task=r"(?!.*\.kalm$)[^/]+",
    run=r"\d+",
    shard=r"\d+",
    part=r"\d+",
    which=r"results|results/baseline|results/runs/run\d+",
