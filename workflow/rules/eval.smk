# Evaluation: one MTEB job per (model, task), then one aggregate per language. The base
# model is evaluated too (results/baseline/...), and the final aggregate reports the gain.


rule evaluate:
    input:
        model=eval_model_input,
        task=eval_task_input,
    output:
        raw="{which}/mteb/{lang}/{task}.json",
        meta="{which}/mteb/{lang}/{task}.kalm.json",
    log:
        "logs/evaluate/{which}/{lang}/{task}.log",
    benchmark:
        "benchmarks/evaluate/{which}/{lang}/{task}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        gpu=gpus("evaluate"),
    params:
        model=lambda w: eval_model(w.which),
        task=lambda w: shlex.quote(json.dumps(eval_task_spec(w.lang, w.task), ensure_ascii=False)),
        batch_size=config["eval"]["batch_size"],
        max_len=config["max_seq_length"],
        pooling=pooling_arg(),
    shell:
        "{GPU_RUN} --gpus {resources.gpu} -- "
        "OMP_NUM_THREADS={threads} {KALM} evaluate --model {params.model} --task-json {params.task} "
        "--out {output.raw} --batch-size {params.batch_size} --max-seq-length {params.max_len}{params.pooling} > {log} 2>&1"


rule aggregate_baseline:
    input:
        lambda w: expand("results/baseline/mteb/{lang}/{task}.kalm.json", lang=w.lang, task=EVAL_TASKS[w.lang]),
    output:
        "results/baseline/mteb_{lang}.json",
    log:
        "logs/aggregate/baseline_{lang}.log",
    benchmark:
        "benchmarks/aggregate/baseline_{lang}.tsv"
    resources:
        mem_mb=1000,
    params:
        model=config["base_model"],
    shell:
        "{KALM} aggregate --model {params.model} --out {output} {input} > {log} 2>&1"


# The soup's aggregate (results/mteb_<lang>.json) and, with report.eval_runs, each fine-tune run's
# (results/runs/run<r>/mteb_<lang>.json): both report the gain over the base model.
rule aggregate:
    input:
        results=lambda w: expand(
            "{which}/mteb/{lang}/{task}.kalm.json", which=w.which, lang=w.lang, task=EVAL_TASKS[w.lang]
        ),
        baseline="results/baseline/mteb_{lang}.json",
    output:
        r"{which,results|results/runs/run\d+}/mteb_{lang}.json",
    log:
        "logs/aggregate/{which}/{lang}.log",
    benchmark:
        "benchmarks/aggregate/{which}/{lang}.tsv"
    resources:
        mem_mb=1000,
    params:
        model=lambda w: eval_model(w.which),
        tracking=lambda w: tracking_scores_arg(w.which),  # the scores as the tracked run's final scores
    shell:
        "{KALM} aggregate --model {params.model} --baseline {input.baseline} --out {output}{params.tracking} "
        "{input.results} > {log} 2>&1"
