# Training: weakly supervised pretraining, then R fine-tuning runs (different seeds and
# data orders) with mined hard negatives, then a uniform soup of the runs.
# Resumable state goes to work/checkpoints/, outside the declared outputs: Snakemake deletes a
# rule's outputs before re-running it, so a killed training job resumes from there.
# Each job writes the model, per-step metrics (loss and its terms, lr, samples/s, tokens/s) and a
# stats JSON (records in/kept, records short of negatives and what was done with them).
# With `tracking.backend` set, the trainer also sends the metrics to TensorBoard, W&B or MLflow
# (kalm/training/tracking.py), run `<tracking.run_name>/<job>` (pretrain, finetune_run<r>).


rule pretrain:
    input:
        # the Parquet parts of the decontaminated pretraining data (the trainer memory-maps them)
        data=stage_data("pretrain"),
    output:
        model=directory("models/pretrain"),
        metrics="models/pretrain.metrics.jsonl",
        stats="models/pretrain.stats.json",
    log:
        "logs/train/pretrain.log",
    benchmark:
        "benchmarks/train/pretrain.tsv"
    threads: config["threads"]
    resources:
        **gpu_resources("pretrain"),
        mem_mb=16000,
    params:
        model=config["base_model"],
        args=train_args("pretrain"),
        symmetric=shlex.quote(symmetric_json("pretrain")),
        seed=config["seed"],
    shell:
        "{GPU_RUN} --gpus {resources.gpu} --nodes {resources.nodes} --torchrun -- "
        "{KALM} train --stage pretrain --model {params.model} --data {input.data} --out {output.model} "
        "--metrics {output.metrics} --stats {output.stats} --symmetric {params.symmetric} {params.args} "
        "--seed {params.seed}{TRACKING} "
        "--checkpoint-dir work/checkpoints/pretrain "
        "--threads {threads} > {log} 2>&1"


rule finetune:
    input:
        data=finetune_parts(),  # the Parquet parts of the mined fine-tuning data (with teacher scores: distill)
        start=["models/pretrain"] if config["pretrain"]["enabled"] else [],
        # the prompts the saved model carries; ancient: a changed prompt (e.g. one more evaluation task)
        # does not retrain, the release writes the current ones (rules/release.smk)
        prompts=ancient(MODEL_PROMPTS),
    output:
        **FINETUNE_BEST,  # finetune.eval_every: the best model on soup.dev_task
        model=directory("models/finetune/run{run}"),
        metrics="models/finetune/run{run}.metrics.jsonl",
        stats="models/finetune/run{run}.stats.json",
    log:
        "logs/train/finetune_run{run}.log",
    benchmark:
        "benchmarks/train/finetune_run{run}.tsv"
    threads: config["threads"]
    resources:
        **gpu_resources("finetune"),
        mem_mb=16000,
    params:
        model=finetune_start,
        args=train_args("finetune"),
        symmetric=shlex.quote(symmetric_json("finetune")),
        in_batch=in_batch_arg("finetune"),
        eval=finetune_eval_args,
        seed=lambda w: config["seed"] + 1000 * (int(w.run) + 1),
    shell:
        "{GPU_RUN} --gpus {resources.gpu} --nodes {resources.nodes} --torchrun -- "
        "{KALM} train --stage finetune --model {params.model} --data {input.data} --out {output.model} "
        "--metrics {output.metrics} --stats {output.stats} --symmetric {params.symmetric} {params.args} "
        "--seed {params.seed}{params.in_batch}{params.eval}{TRACKING} --tracking-run finetune_run{wildcards.run} --prompts {input.prompts} "
        "--checkpoint-dir work/checkpoints/finetune_run{wildcards.run} "
        "--threads {threads} > {log} 2>&1"


rule soup:
    input:
        models=soup_models(),
        start=soup_start_model(),  # soup.include_base with pretraining: models/pretrain is an ingredient too
        prompts=ancient(MODEL_PROMPTS),  # as for finetune: not a reason to re-soup (and re-evaluate)
        dev=[config["eval"]["tasks"][config["soup"]["dev_task"]]["path"]] if config["soup"]["dev_task"] else [],
    output:
        model=directory("models/soup"),
        report="models/soup.report.json",
    log:
        "logs/soup/soup.log",
    benchmark:
        "benchmarks/soup/soup.tsv"
    resources:
        mem_mb=8000,
    params:
        args=soup_args(),
    shell:
        "{KALM} soup {input.models} --out {output.model} --report {output.report} --prompts {input.prompts} "
        "{params.args} > {log} 2>&1"


# Contrastive distillation (KaLM-Embedding-V2.5): one job per mined part, the teacher's cosine scores of each
# record's positives and negatives added (pos_teacher, neg_teacher), so the students never load the teacher.
rule teacher_score:
    input:
        data="work/data/finetune/mined/p{part}.parquet",
    output:
        data="work/data/finetune/teacher/p{part}.parquet",
        stats="work/data/finetune/teacher/p{part}.stats.json",
    log:
        "logs/teacher_score/p{part}.log",
    benchmark:
        "benchmarks/teacher_score/p{part}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=32000,  # the teacher's weights (16 GB for an 8B model in bf16) and a chunk of records
        gpu=gpus("teacher_score"),
    params:
        model=TEACHER,
        symmetric=shlex.quote(symmetric_json("finetune")),
        args=lambda w: teacher_args(),  # a function: the prompts' {text} is no wildcard
    shell:
        "{GPU_RUN} --gpus {resources.gpu} -- "
        "{KALM} teacher-score --input {input.data} --out {output.data} --stats {output.stats} "
        "--model {params.model} --symmetric {params.symmetric} {params.args} "
        "--threads {threads} > {log} 2>&1"
