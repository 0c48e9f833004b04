# Data stage: validate + normalise each task (a .jsonl/.parquet file or a folder of shards: one job per
# file, Parquet parts out) and give its records their instruction (or none, by the instruction rule:
# common.smk validate_instruction_args),
# dedup across a stage (rules/dedup.smk), decontaminate against the evaluation tasks (exact, containment with
# data.decontaminate.contain_min_chars, near with data.decontaminate.near_dup): an evaluation index
# built once (eval_index), one job per dedup partition, a gather. Consumers read stage_data(stage).

from pathlib import Path

DECON = decontaminate_settings()


# one job per input file (common.smk validate_inputs: a task's file, or each file of its folder), in
# input order: part i of a task is its i-th file, its records' ids carry the file's place in the stage
rule validate:
    input:
        lambda w: validate_input(w.stage, w.dtask, w.part)[0],
    output:
        data="work/data/{stage}/validated/{dtask}/part{part}.parquet",
        stats="work/data/{stage}/validated/{dtask}/part{part}.stats.json",
        rejects="work/data/{stage}/validated/{dtask}/part{part}.rejects.jsonl",
    log:
        "logs/validate/{stage}/{dtask}/part{part}.log",
    benchmark:
        "benchmarks/validate/{stage}/{dtask}/part{part}.tsv"
    resources:
        # streams: one input line or Parquet batch, one output row group (8192 records) at a time
        mem_mb=1000,
    params:
        # the task's instruction, or --drop-instructions where eval.instruction_set's rule gives its type
        # none (the same rule as the evaluation: common.smk train_instruction_sides)
        instruction=lambda w: validate_instruction_args(w.stage, w.dtask),
        on_error=config["data"]["on_error"],
        ordinal=lambda w: validate_input(w.stage, w.dtask, w.part)[1],
    shell:
        "{KALM} validate --input {input} --task {wildcards.dtask} --shard-ordinal {params.ordinal} "
        "--out {output.data} --stats {output.stats} --rejects {output.rejects} --on-error {params.on_error} "
        "{params.instruction} > {log} 2>&1"


# a task's funnel entry (the report reads it) and its rejects in one file, from its parts
rule validate_gather:
    input:
        stats=lambda w: task_parts(w.stage, w.dtask, ".stats.json"),
        rejects=lambda w: task_parts(w.stage, w.dtask, ".rejects.jsonl"),
    output:
        stats="work/data/{stage}/validated/{dtask}.stats.json",
        rejects="work/data/{stage}/validated/{dtask}.rejects.jsonl",
    log:
        "logs/validate_gather/{stage}/{dtask}.log",
    resources:
        mem_mb=500,
    shell:
        "({KALM} shards merge-stats --stage validate --out {output.stats} {input.stats} && "
        "cat {input.rejects} > {output.rejects}) > {log} 2>&1"


# exact and near-dup dedup: rules/dedup.smk (validated parts -> work/data/{stage}/dedup/p{j}.parquet)


# the evaluation texts, gathered and indexed once for both stages (kalm.data.decontaminate.EvalIndex: exact
# hashes, containment anchors, MinHash/LSH bands), then memory-mapped by every decontaminate job
rule eval_index:
    input:
        eval_tasks=list(local_eval_tasks().values()),
    output:
        directory("work/eval_index"),
    log:
        "logs/eval_index.log",
    benchmark:
        "benchmarks/eval_index.tsv"
    resources:
        # all evaluation texts in memory while indexing: the texts, 4 * num_perm B of signatures and
        # ~40 B of hashes and band keys per text (MTEB's largest corpora: a few million passages)
        mem_mb=8000,
    params:
        eval_tasks=" ".join(f"--eval-task {shlex.quote(f'{t}={p}')}" for t, p in local_eval_tasks().items()),
        # the same task specs (subsets, mirror) as the evaluate jobs: decontaminate against their data
        mteb_tasks=" ".join(
            f"--mteb-task-json {shlex.quote(json.dumps(eval_task_spec(lang, t), ensure_ascii=False))}"
            for lang, t in mteb_eval_tasks()
        ),
        opts=f"--options {shlex.quote(options_json(DecontaminateConfig, DECON))}",
    shell:
        "{KALM} decontaminate --step index {params.eval_tasks} {params.mteb_tasks} {params.opts} "
        "--index-dir {output} > {log} 2>&1"


# one job per dedup partition (rules/dedup.smk dedup_parts): its records against the whole index
DATA_STEPS.append("decontaminated")  # after dedup; stage_data() names the last step's parts


rule decontaminate:
    input:
        data=lambda w: step_input("decontaminated", w.stage, w.part),
        index="work/eval_index",
    output:
        data="work/data/{stage}/decontaminated/p{part}.parquet",
        stats="work/data/{stage}/decontaminated/p{part}.stats.json",
        report="work/data/{stage}/decontaminated/p{part}.contamination.json",
    log:
        "logs/decontaminate/{stage}/p{part}.log",
    benchmark:
        "benchmarks/decontaminate/{stage}/p{part}.tsv"
    resources:
        # a batch of 4096 records and one output row group; the index is memory-mapped (its pages count
        # when touched: ask for its size), whatever the partition's size
        mem_mb=lambda w, input: 1000 + int(_index_dir_mb(input.index)),
    shell:
        "{KALM} decontaminate --step apply --index-dir {input.index} --input {input.data} --out {output.data} "
        "--stats {output.stats} --report {output.report} > {log} 2>&1"


# the stage's funnel entry and contamination report (the report rules and the model card read them)
rule decontaminate_gather:
    input:
        stats=lambda w: decontaminated_parts(w.stage, ".stats.json"),
        reports=lambda w: decontaminated_parts(w.stage, ".contamination.json"),
    output:
        stats="work/data/{stage}/decontaminated.stats.json",
        report="work/data/{stage}/contamination_report.json",
    log:
        "logs/decontaminate_gather/{stage}.log",
    resources:
        mem_mb=500,
    shell:
        "{KALM} decontaminate --step merge --part-stats {input.stats} --part-reports {input.reports} "
        "--stats {output.stats} --report {output.report} > {log} 2>&1"
