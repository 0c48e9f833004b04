# Publishing: the prompts every saved model carries (rule model_prompts, read by finetune and soup), and
# `snakemake release`: release/<org>__<name>/ with the model, its card, mteb's model_meta.json and the
# results in the mteb results repository's layout (kalm/release/release.py); release.push uploads it.


rule model_prompts:
    output:
        MODEL_PROMPTS,
    log:
        "logs/release/model_prompts.log",
    benchmark:
        "benchmarks/release/model_prompts.tsv"
    resources:
        mem_mb=2000,
    params:
        train=shlex.quote(train_tasks_json()),
        eval=shlex.quote(json.dumps(all_eval_specs(), ensure_ascii=False)),
        instruction_set=INSTRUCTION_SET,
        query=query_instruction_arg(),
    shell:
        "{KALM} prompts --train-tasks {params.train} --eval-tasks {params.eval} "
        "--instruction-set {params.instruction_set}{params.query} --out {output} > {log} 2>&1"


rule release_folder:
    input:
        model="models/soup",
        prompts=MODEL_PROMPTS,
        aggregates=expand("results/mteb_{lang}.json", lang=LANGUAGES),
        task_results=[f"results/mteb/{lang}/{task}.json" for lang in LANGUAGES for task in EVAL_TASKS[lang]],
        stats=[f for stage in REPORT_STAGES for f in report_funnel_stats(stage)],
        contamination=expand("work/data/{stage}/contamination_report.json", stage=REPORT_STAGES),
    output:
        directory(RELEASE_DIR),
    log:
        "logs/release/folder.log",
    benchmark:
        "benchmarks/release/folder.tsv"
    resources:
        mem_mb=8000,
    params:
        options=shlex.quote(options_json(ReleaseConfig, config["release"])),
        # a function: the recipe holds text with braces (the distillation teacher's prompts), not wildcards
        recipe=lambda w: shlex.quote(json.dumps(release_recipe(), ensure_ascii=False)),
        eval=shlex.quote(json.dumps(all_eval_specs(), ensure_ascii=False)),
        stages=" ".join(f"--stage {stage} " + " ".join(report_funnel_stats(stage)) for stage in REPORT_STAGES),
        contamination=" ".join(f"{stage}=work/data/{stage}/contamination_report.json" for stage in REPORT_STAGES),
    shell:
        "{KALM} release --model {input.model} --out {output} --options {params.options} --recipe {params.recipe} "
        "--prompts {input.prompts} --aggregates {input.aggregates} --task-results {input.task_results} "
        "{params.stages} --contamination {params.contamination} --eval-tasks {params.eval} > {log} 2>&1"


rule release_push:
    input:
        RELEASE_DIR,
    output:
        f"{RELEASE_DIR}.pushed.json",
    log:
        "logs/release/push.log",
    benchmark:
        "benchmarks/release/push.tsv"
    resources:
        mem_mb=2000,
    params:
        options=shlex.quote(options_json(ReleaseConfig, config["release"])),
    shell:
        "{KALM} release --step push --out {input} --options {params.options} --marker {output} > {log} 2>&1"


# `snakemake release`: the folder, and its upload when release.push is true
rule release:
    input:
        RELEASE_DIR,
        [f"{RELEASE_DIR}.pushed.json"] if config["release"]["push"] else [],
