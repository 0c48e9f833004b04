# Names, input functions and helpers shared by the .smk files (rules stay thin): every
# rule runs one `kalm` subcommand; this file turns the config into file names.

import functools
import json
import os
import shlex
import sys

# one rule for which side of a task carries its instruction, in training and evaluation alike
from kalm.evaluation.instructions import instruction_sides
from kalm.data.config import DecontaminateConfig, DedupConfig
from kalm.data.labelled import LabelledConfig
from kalm.mining.config import EmbedConfig, MineConfig, TeacherConfig
from kalm.options import options_json
from kalm.release.config import ReleaseConfig, folder_name
from kalm.training.config import SoupConfig, TrainConfig
from kalm.data.validate import ValidationError as _ValidationError, task_files as _task_files
from kalm.data.fetch import (
    SourceError as _SourceError,
    output_name as _source_output_name,
    source_files as _source_files,
)

KALM = f"{shlex.quote(sys.executable)} -m kalm"
DATA_STAGES = ["pretrain", "finetune"]
FINETUNE_RUNS = list(range(config["finetune"]["runs"]))
NUM_SHARDS = config["embed"]["shards"]
if config["pretrain"]["enabled"] and not config["data"]["pretrain"]:
    raise ValueError(
        "config: pretrain.enabled is true but data.pretrain lists no weak-pair tasks "
        "(add some, or set pretrain.enabled: false to fine-tune the base model directly)"
    )


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
    raise ValueError(
        "config: embed.model is 'pretrain' (mine with models/pretrain) but pretrain.enabled is false, "
        "so the pretrain job never runs (set pretrain.enabled to true, or embed.model to null to mine with "
        "base_model, or a model path)"
    )


def data_tasks(stage):
    return sorted(config["data"][stage])


def data_task(stage, task):
    return config["data"][stage][task]


def dedup_settings():
    """config data.dedup (kalm.data.config.DedupConfig declares its keys; the schema filled in their defaults)."""
    return config["data"]["dedup"]


def decontaminate_settings():
    return config["data"]["decontaminate"]


# ---- the data stages' shard files (issue 15): every consumer names its inputs through these --------


def fetched_file(stage, dtask, repo_path):
    """Where rule fetch writes a source file of a task (kalm.data.fetch.output_name)."""
    return os.path.join("corpora", stage, dtask, _source_output_name(repo_path))


@functools.lru_cache(maxsize=None)
def _source_names(stage, dtask):
    """{fetched file name: repository path} of a task's source (its globs expanded once)."""
    files = _source_files(data_task(stage, dtask)["source"], f"data.{stage}.{dtask}")
    return {_source_output_name(f): f for f in files}


def source_file_of(stage, dtask, name):
    """The repository path of fetched file `name` of a task (rule fetch's wildcards)."""
    try:
        return _source_names(stage, dtask)[f"{name}.parquet"]
    except KeyError:
        raise ValueError(f"data.{stage}.{dtask}: no source file named {name}") from None


@functools.lru_cache(maxsize=None)
def task_input_files(stage, dtask):
    """The files validate reads for a task, one validate job each: its own files (raw_task_files), or for a
    `format: labelled` task the KaLM records rule labelled makes of them (rules/labelled.smk)."""
    if data_task(stage, dtask).get("format") == "labelled":
        return (f"work/data/{stage}/labelled/{dtask}.parquet",)
    return raw_task_files(stage, dtask)


@functools.lru_cache(maxsize=None)
def raw_task_files(stage, dtask):
    """The files of a training task (kalm.data.validate.task_files: the file, or the .jsonl/.parquet files
    of its folder in sorted order; or its source's fetched files), read when the DAG is built."""
    spec = data_task(stage, dtask)
    if "source" in spec and "path" not in spec:  # fetched by rule fetch (rules/sources.smk), one job per file
        try:
            return tuple(fetched_file(stage, dtask, f) for f in _source_names(stage, dtask).values())
        except _SourceError as e:
            raise ValueError(f"config {e}") from None
    path = spec["path"]
    try:
        return tuple(str(f) for f in _task_files(path))
    except _ValidationError as e:
        raise ValueError(f"config data.{stage}.{dtask}.path: {e}") from None


@functools.lru_cache(maxsize=None)
def validate_inputs(stage):
    """(task, part, input file, shard ordinal) of every input file of a stage, in input order: tasks sorted
    by name (data_tasks), each task's files in task_files order; the ordinal is the place in this list
    (the records' ids, kalm.data.shards.record_id, put the stage in this order)."""
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


# The data steps after dedup, in pipeline order: each rule file that adds one appends its name beside its
# rules (rules/data.smk: "decontaminated"), and the step writes work/data/{stage}/{step}/p{j}.parquet, one
# part per dedup partition, with {step}.stats.json as its funnel entry.
DATA_STEPS = []


def step_parts(step, stage, suffix=".parquet"):
    return [f"work/data/{stage}/{step}/p{j}{suffix}" for j in data_partitions()]


def step_input(step, stage, part):
    """Part `part` of the records data step `step` reads: the previous step's, or dedup's for the first."""
    i = DATA_STEPS.index(step)
    return (step_parts(DATA_STEPS[i - 1], stage) if i else dedup_parts(stage))[int(part)]


def decontaminated_parts(stage, suffix=".parquet"):
    return step_parts("decontaminated", stage, suffix)


def stage_data(stage):
    """The records a stage's consumers read (embed, mine, pretrain): the last data step's Parquet parts.
    The ONE place that names them, from DATA_STEPS: a new filter step is its rules and its entry there."""
    return step_parts(DATA_STEPS[-1], stage)


def mined_parts(suffix=".parquet", step="mined"):
    """The mined fine-tuning records: one part per query shard, i.e. per part of stage_data("finetune")
    (step "teacher": the same parts with a distillation teacher's scores)."""
    return [f"work/data/finetune/{step}/p{j}{suffix}" for j in range(len(stage_data("finetune")))]


# Contrastive distillation (KaLM V2.5): with finetune.distill.teacher set, each mined part gets the teacher's
# scores (rule teacher_score) and fine-tuning reads those parts instead.
TEACHER = config["finetune"]["distill"].get("teacher")
if config["pretrain"]["distill"]["weight"] > 0:
    raise ValueError("pretrain.distill.weight: distillation scores mined candidates, so it is a finetune option only")
if config["finetune"]["distill"]["weight"] > 0 and not TEACHER:
    raise ValueError(
        "finetune.distill.weight > 0 needs finetune.distill.teacher (the model that scores the candidates)"
    )


def finetune_parts(suffix=".parquet"):
    """What fine-tuning reads: the mined parts, or, with a distillation teacher, the same parts with its scores."""
    return mined_parts(suffix, "teacher" if TEACHER else "mined")


def teacher_args():
    """The teacher's options (kalm.mining.config.TeacherConfig's keys of finetune.distill) as `--options` JSON."""
    return f"--options {shlex.quote(options_json(TeacherConfig, config['finetune']['distill']))}"


MINE_POOL = config["mine"]["pool"]


def mine_pools():
    """The candidate pools of mining: each mined task's, or one global pool."""
    if MINE_POOL == "global":
        return ["global"]
    return sorted(json.loads(mine_tasks_json()))


POOL_SHARDS = list(range(config["mine"]["pool_shards"]))
MINE_IVF = config["mine"]["index"]["type"] == "ivf"


def pool_shard_dirs(pool=None):
    """The pool shards (one mine_index job each): work/mine_index/{pool}/shard{j}, of one pool or of all."""
    return expand("work/mine_index/{pool}/shard{j}", pool=[pool] if pool else mine_pools(), j=POOL_SHARDS)


def ivf_quantizer(wildcards):
    """ivf: the pool's one coarse quantizer (rule mine_quantizer), which every shard of the pool files into."""
    return f"work/mine_index/{wildcards.pool}/quantizer.faiss" if MINE_IVF else []


def ivf_dirs():
    """ivf: each pool's shard lists merged on disk (rule mine_ivf), what a mine job searches."""
    return expand("work/mine_index/{pool}/ivf", pool=mine_pools()) if MINE_IVF else []


# The instruction set of the evaluation (kalm.evaluation.task_instructions) also decides where the training data's
# instructions go: one table, one rule (kalm.evaluation.instructions.instruction_sides) for both.
INSTRUCTION_SET = config["eval"]["instruction_set"]


def train_instruction_sides(stage, task):
    """(query side, passage side) of a training task's instruction: the rule evaluation applies to its type
    under eval.instruction_set (e.g. `sts`: none under kalm, both sides under kalm_v2)."""
    return instruction_sides(INSTRUCTION_SET, data_task(stage, task).get("type"))


def validate_instruction_args(stage, task):
    """`kalm validate`'s instruction option: the config's instruction for the records that carry none; or,
    for a type the rule gives no instruction, --drop-instructions (the records' own are dropped too)."""
    if not train_instruction_sides(stage, task)[0]:
        return "--drop-instructions"
    return f"--instruction {shlex.quote(data_task(stage, task).get('instruction', ''))}"


def mine_tasks_json():
    """{task: instruction on passages too} for the fine-tuning tasks whose negatives are mined."""
    tasks = config["data"]["finetune"]
    return json.dumps(
        {t: train_instruction_sides("finetune", t)[1] for t, spec in sorted(tasks.items()) if spec.get("mine", True)}
    )


def symmetric_json(stage):
    """The trainer's --symmetric: {task: instruction on both sides} (train_instruction_sides)."""
    return json.dumps({t: train_instruction_sides(stage, t)[1] for t in data_tasks(stage)})


def _language_tasks(lang):
    """{task: benchmark it was listed by, or None} for one language, in config order."""
    from kalm.evaluation.task_instructions import benchmark_tasks  # imports mteb only for mteb benchmark names

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
    """soup.dev_task and soup.guard_tasks: local tasks of eval.tasks that are not reported. The greedy soup
    keeps the ingredients that raise their score and the loss-weighted soup weights them by their loss: on a
    reported task, that would be model selection on the test set."""
    soup = config["soup"]
    dev = soup["dev_task"]
    if not dev:
        if soup["method"] == "greedy" or (soup["method"] == "weighted" and not soup.get("weights")):
            raise ValueError(
                f"config: soup.method {soup['method']} needs soup.dev_task (a held-out local task of "
                "eval.tasks)" + ("" if soup["method"] == "greedy" else " or soup.weights")
            )
        if soup.get("guard_tasks"):
            raise ValueError("config: soup.guard_tasks are weighed beside soup.dev_task: set soup.dev_task too")
        return
    tasks = config["eval"].get("tasks", {})
    for key, name in [("dev_task", dev)] + [("guard_tasks", g) for g in soup.get("guard_tasks", [])]:
        if name not in tasks or not tasks[name].get("path"):
            raise ValueError(f"config: soup.{key} {name!r} must be a local task of eval.tasks (one with a 'path')")
        held_out = os.path.realpath(tasks[name]["path"])
        for lang in LANGUAGES:
            for task in EVAL_TASKS[lang]:
                path = tasks.get(task, {}).get("path")
                if task == name or (path and os.path.realpath(path) == held_out):
                    same = "is" if task == name else f"has the data of {task!r}, which is"
                    raise ValueError(
                        f"config: soup.{key} {name!r} {same} a reported evaluation task (eval.languages.{lang}): "
                        "the greedy soup selects, and the loss-weighted soup weights, its ingredients by their score "
                        "on it, i.e. they would be chosen on the test set. Use a held-out local task of "
                        "eval.tasks (e.g. a folder of dev data) that eval.languages does not list"
                    )


check_soup_dev_task()

# Periodic evaluation during fine-tuning (finetune.eval_every): on the soup's held-out tasks, dev_task first
# (the best model is the one that scores highest there: models/finetune/run<r>.best, soup.checkpoint: best).
EVAL_EVERY = config["finetune"]["eval_every"]
if EVAL_EVERY and not config["soup"]["dev_task"]:
    raise ValueError("config: finetune.eval_every needs soup.dev_task (and optionally soup.guard_tasks) to score")
if config["soup"]["checkpoint"] == "best" and not EVAL_EVERY:
    raise ValueError("config: soup.checkpoint best needs finetune.eval_every (the best model is found by it)")
if config["soup"]["checkpoint"] == "best" and config["soup"]["last_k"] > 1:
    raise ValueError("config: soup.checkpoint best takes one model per run: soup.last_k must be 1")
FINETUNE_BEST = {"best": directory("models/finetune/run{run}.best")} if EVAL_EVERY else {}


def held_out_specs():
    """The task specs of soup.dev_task and soup.guard_tasks, in that order."""
    names = [config["soup"]["dev_task"]] + list(config["soup"].get("guard_tasks") or [])
    return [eval_task_spec(config["eval"]["tasks"][t].get("lang", "en"), t) for t in names if t]


def finetune_eval_args(wildcards):
    """`--eval-tasks-json` and `--best-out` of a fine-tune run with finetune.eval_every, else nothing."""
    if not EVAL_EVERY:
        return ""
    specs = shlex.quote(json.dumps(held_out_specs(), ensure_ascii=False))
    return f" --eval-tasks-json {specs} --best-out models/finetune/run{wildcards.run}.best"


def soup_models():
    """The runs' ingredients: their final models, or their best ones (soup.checkpoint: best)."""
    pattern = "models/finetune/run{run}.best" if config["soup"]["checkpoint"] == "best" else "models/finetune/run{run}"
    return expand(pattern, run=FINETUNE_RUNS)


def soup_start_model():
    """soup.include_base: the model fine-tuning started from (models/pretrain, else base_model), or nothing."""
    if not config["soup"]["include_base"]:
        return []
    return ["models/pretrain"] if config["pretrain"]["enabled"] else []


def eval_task_spec(lang, task):
    """The task spec `kalm evaluate --task-json` gets (see kalm/evaluation/evaluate.py): the benchmark's defaults
    for the task, then the config's eval.tasks entry, instruction, instruction set and mirror root."""
    from kalm.evaluation.task_instructions import benchmark_task_defaults

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
    decontamination targets when their data is mirrored or cached offline (kalm.data.decontaminate skips
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
        return f"models/finetune/{which.rsplit('/', 1)[1]}"
    return config["base_model"]


# ` --tracking JSON` (the config's tracking section), or nothing with backend none. A variable rather than a
# param: params are a rerun trigger, and turning tracking on or off must not retrain the models.
TRACKING = (
    f" --tracking {shlex.quote(json.dumps(config['tracking'], sort_keys=True))}"
    if config["tracking"]["backend"] != "none"
    else ""
)


def tracking_scores_arg(which):
    """`kalm aggregate`'s tracking flags: the soup's (or a run's) scores go to the tracked run (tracking.backend)."""
    if not TRACKING:
        return ""
    run = "soup" if which == "results" else f"finetune_{which.rsplit('/', 1)[1]}"
    return f"{TRACKING} --tracking-run {run}"


def eval_model_input(wildcards):
    model = eval_model(wildcards.which)
    return [model] if model.startswith("models/") else []


def eval_task_input(wildcards):
    """A local task's folder, or a task's own mirror folder (a missing one is then a missing input);
    a mirror root is not an input: tasks without a folder there fall back to the datasets cache."""
    spec = eval_task_spec(wildcards.lang, wildcards.task)
    return [spec[k] for k in ("path", "mirror") if spec.get(k)]


def finetune_start(wildcards, input):
    """The model fine-tuning starts from: the pretrained one (rule finetune's input), else base_model."""
    return input.start[0] if input.start else config["base_model"]


# GPUs. A rule's `gpu` resource is its GPU count (config resources.gpus, per node): Snakemake caps
# concurrent GPU jobs with it (profiles/local: the machine's device count) and the SLURM plugin turns
# it into `sbatch --gpus=N` (`--gpus=<model>:N` with the profile's gpu_model). Snakemake does not say
# *which* devices a job gets, so every GPU rule's command starts with GPU_RUN (kalm gpu-slots): it
# locks that many free devices, sets CUDA_VISIBLE_DEVICES and, for training with --torchrun, starts
# torchrun on them (srun + torchrun per node for a multi-node job).
GPU_RUN = f"{shlex.quote(sys.executable)} -m kalm gpu-slots"


def gpus(rule_name):
    return config["resources"]["gpus"][rule_name]


def nodes(rule_name):
    return config["resources"]["nodes"][rule_name]


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


# ---- validation and decontamination (rules/data.smk) ---------------------------------------------


def _index_dir_mb(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20 if os.path.isdir(path) else 0


# ---- embedding and mining (rules/mine.smk) -------------------------------------------------------


def embed_texts(wildcards):
    """An embed job's texts: every part's scatter file (rule embed_texts), of which it reads its partition."""
    return [f"work/embed/texts/p{p}.texts.arrow" for p in range(len(stage_data("finetune")))]


def instruction_args():
    """kalm embed formats the mining texts as kalm mine does: the mine section's instruction options."""
    m = config["mine"]
    args = f"--passage-instruction {m['passage_instruction']}"
    return args if m["query_instruction"] else f"{args} --no-query-instruction"


def mine_args():
    """The mine section as `--options` JSON (kalm.mining.config.MineConfig declares its keys; the schema
    filled in their defaults)."""
    return f"--options {shlex.quote(options_json(MineConfig, config['mine']))}"


def _files_mb(paths):
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 2**20


def _ids_files(shards):
    return [p[: -len(".npy")] + ".ids.json" for p in shards]


def mine_index_mem_mb(wildcards, input):
    """A pool shard of at most the whole store: its texts (the builder's map; the ids files measure the
    store's text volume), its float32 vectors in an ivf/hnsw index (2x the float16 store), divided among
    the pool's shards. The store itself is looked up by memory-mapped digests (no text map)."""
    per_shard = (3 * _files_mb(input.shards) + 3 * _files_mb(_ids_files(input.shards))) / len(POOL_SHARDS)
    return int(2048 + per_shard)


def mine_mem_mb(wildcards, input):
    """Measured: 1M x 896 float16 (1.7 GiB) mined with a flat index peaks at 6.1 GiB: a float32 index (2x
    the vectors) and the records' texts. A query shard holds one task's records of its part, the vectors of
    their own texts and one pool (memory-mapped texts and vectors, 8 B keys) with one shard's index: ask
    for the largest pool shard's index and the part's records, plus headroom."""
    shards = [_files_mb([os.path.join(d, "vectors.npy")]) for d in input.pools] or [0]
    return int(2048 + 3 * max(shards) + 4 * _files_mb([input.data]))


# ---- training and soup (rules/train.smk) ---------------------------------------------------------


def train_args(stage):
    """The stage's trainer options as one JSON (its config section's keys that TrainConfig declares: the
    trainer's defaults hold for the rest), the top-level max_seq_length and pooling, and the checkpoints."""
    c = config[stage]
    args = f"--options {shlex.quote(options_json(TrainConfig, c))} --max-seq-length {config['max_seq_length']}"
    args += pooling_arg()
    if c.get("checkpoint_every"):
        args += f" --checkpoint-every {c['checkpoint_every']}"
    last_k = config["soup"]["last_k"]
    if stage == "finetune" and last_k > 1:
        # the soup's last-k ingredients: the final model and the k-1 snapshots kept before it
        every = c.get("snapshot_every") or c.get("checkpoint_every")
        if not every:
            raise ValueError(
                "config: soup.last_k > 1 needs finetune.snapshot_every (steps between the snapshots the soup averages)"
            )
        args += f" --keep-snapshots {last_k - 1} --snapshot-every {every}"
    return args + task_mix_arg(stage)


def in_batch_arg(stage):
    """`--in-batch-negatives` for the tasks whose config sets `in_batch_negatives: false` (their queries
    see only their own hard negatives; FlagEmbedding's no_in_batch_neg), or nothing."""
    off = {t: False for t, spec in sorted(config["data"][stage].items()) if spec.get("in_batch_negatives") is False}
    return f" --in-batch-negatives {shlex.quote(json.dumps(off))}" if off else ""


def task_mix_arg(stage):
    """`kalm train --task-mix`: the tasks of a stage with a sampling weight or a cap (the data mix), or nothing."""
    mix = {
        t: {k: spec[k] for k in ("weight", "max_records") if k in spec}
        for t, spec in sorted(config["data"][stage].items())
        if "weight" in spec or "max_records" in spec
    }
    return f" --task-mix {shlex.quote(json.dumps(mix))}" if mix else ""


def soup_snapshot_dirs():
    """The snapshot folders of the fine-tune runs (kalm.soup.snapshot_dir of each run's --checkpoint-dir)."""
    return [f"work/checkpoints/finetune_run{r}/snapshots" for r in FINETUNE_RUNS]


def soup_args():
    """The soup section as `--options` JSON (SoupConfig), the dev task's spec, and the runs' snapshots."""
    c = config["soup"]
    args = f"--options {shlex.quote(options_json(SoupConfig, c))}"
    specs = held_out_specs()  # the dev task, then the guards (guards without a dev task are refused)
    if c["dev_task"]:
        args += f" --dev-task-json {shlex.quote(json.dumps(specs[0], ensure_ascii=False))}"
    if c.get("guard_tasks"):  # a list option: no schema default (absent = none)
        args += f" --guard-task-json {shlex.quote(json.dumps(specs[1:], ensure_ascii=False))}"
    if c["include_base"]:  # the start model: rule soup's input models/pretrain, else the base model
        args += f" --base-model {shlex.quote((soup_start_model() or [config['base_model']])[0])}"
    if c["last_k"] > 1:
        # the last k checkpoints of each run: its final model and the k-1 snapshots the trainer kept
        # beside its resumable checkpoint (not Snakemake outputs: their manifest ties them to the run)
        args += f" --snapshots {' '.join(soup_snapshot_dirs())}"
    return args


# ---- the report (rules/report.smk) ---------------------------------------------------------------


def report_funnel_stats(stage):
    """The stats JSON of each data step of a stage, in pipeline order (the trainer's last: its few-negatives policy)."""
    files = expand("work/data/{stage}/validated/{dtask}.stats.json", stage=stage, dtask=data_tasks(stage))
    files += [f"work/data/{stage}/dedup.stats.json"] + [f"work/data/{stage}/{step}.stats.json" for step in DATA_STEPS]
    if stage == "finetune":
        files += ["work/data/finetune/mined.stats.json", "models/finetune/run0.stats.json"]
    else:
        files += ["models/pretrain.stats.json"]
    return files


def report_mteb_models(lang):
    """{label: aggregate} of the models the MTEB chart compares."""
    models = {"base": f"results/baseline/mteb_{lang}.json"}
    if EVAL_RUNS:
        models.update({f"run{r}": f"results/runs/run{r}/mteb_{lang}.json" for r in FINETUNE_RUNS})
    models["soup"] = f"results/mteb_{lang}.json"
    return models


def report_mteb_args():
    return " ".join(
        f"--lang {lang} " + " ".join(f"{label}={path}" for label, path in report_mteb_models(lang).items())
        for lang in LANGUAGES
    )


def report_training_metrics(stage):
    if stage == "pretrain":
        return {"pretrain": "models/pretrain.metrics.jsonl"}
    return {f"run{r}": f"models/finetune/run{r}.metrics.jsonl" for r in FINETUNE_RUNS}


def rulegraph_targets():
    return [p for lang in LANGUAGES for p in (f"results/mteb_{lang}.json", f"results/baseline/mteb_{lang}.json")]


# ---- publishing (rules/release.smk) -------------------------------------------------------------

MODEL_PROMPTS = "work/model_prompts.json"  # the prompts every saved model carries (rule model_prompts)
RELEASE_DIR = os.path.join("release", folder_name(config["release"]["name"]))


def train_tasks_json():
    """{task: {type, instruction}} of every training task (both stages): the saved models' per-task prompts."""
    tasks = {}
    for stage in ("pretrain", "finetune"):
        if stage == "pretrain" and not config["pretrain"]["enabled"]:
            continue
        for t, spec in sorted(config["data"][stage].items()):
            tasks.setdefault(t, {"type": spec.get("type"), "instruction": spec.get("instruction")})
    return json.dumps(tasks, ensure_ascii=False)


def all_eval_specs():
    """kalm evaluate's task spec of every evaluated task, in config order (languages sorted)."""
    return [eval_task_spec(lang, t) for lang in LANGUAGES for t in EVAL_TASKS[lang]]


def query_instruction_arg():
    q = config["release"]["query_instruction"]
    return f" --query-instruction {shlex.quote(q)}" if q else ""


def _hub_id(spec):
    """``spec`` when it names a hub model (``org/name``, not a local folder or a ``package:`` model), else None."""
    import re

    return spec if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not os.path.exists(spec) else None


def release_recipe():
    """What the model card says of the recipe: the base model, the training sections and the data tasks."""
    return {
        "base_model": config["base_model"],
        "base_model_id": config["release"]["base_model_id"] or _hub_id(config["base_model"]),
        "max_seq_length": config["max_seq_length"],
        "pretrain": config["pretrain"] if config["pretrain"]["enabled"] else None,
        "finetune": config["finetune"],
        "finetune_runs": config["finetune"]["runs"],
        "soup": config["soup"],
        "data": {
            stage: {t: {"type": s.get("type"), "source": s.get("source")} for t, s in config["data"][stage].items()}
            for stage in DATA_STAGES
        },
    }
